"""Worker-side plaintext-weight × ciphertext linear layer (torch; the same code runs on CPU and CUDA).

For one row block, input ciphertexts ct_b = (c_0, c_1 = a) mod Q (b over input blocks) and weight
polynomials W_{b,o} (integers, |w| < 2^weight_bits), the worker computes

    out_o = Σ_b ct_b · W_{b,o}   (mod X^N+1, mod Q),   then rescales out_o from Q to q_0.

Engine "fft" (default, chosen by measurement): each ciphertext polynomial is CRT-composed to its
centred integer (|c| < Q/2 < 2^61), split into D signed digits of β ≤ 18 bits, and multiplied with W
exactly by float64 FFTs; the sum over b is a batched complex matmul [F, rows·2·D, B] @ [F, B, O]
(F = N/2 frequencies) — one BLAS/cuBLAS call per group. Exactness: digit sums are integers of typical
magnitude 2^(β-1)·2^weight_bits·sqrt(B·n_i·n_o) ≈ 2^40, far inside float64's 2^53; every rounding is
verified (|x − round(x)| < 1/4, else :class:`~.negacyclic_fft.FFTPrecisionError`), so it is exact or fails.
Engine "ntt": the RNS/NTT reference (per-prime NTT, pointwise multiply-accumulate mod q_i).

Scalar blockings (one input column per ciphertext, ``r`` token rows in its coefficients; see
``layout.Blocking.is_scalar``) need no polynomial products at all: output k is Σ_j W[k, j]·ct_j, a plain
matrix product over Z_Q. :func:`apply_scalar` computes it as D float64 GEMMs [ΣO, B] @ [B, ·] on signed
digits small enough that every partial sum is an exact integer (< 2^53), then reduces mod each prime.
This is the prefill path for long prompts: a few big GEMMs instead of many small FFT products.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from . import negacyclic_fft as nfft
from . import ntt
from .layout import Blocking

MAX_DIGIT_BITS = 18


def digit_plan(log_q: int) -> tuple[int, int]:
    """(D, β): D signed digits of β bits cover a centred integer |c| < 2^(log_q - 1)."""
    d = -(-log_q // MAX_DIGIT_BITS)
    return d, -(-log_q // d)


def scalar_digit_plan(log_q: int, weight_bits: int, d_in: int) -> tuple[int, int]:
    """(D, β) for :func:`apply_scalar`: signed digits (|digit| ≤ 2^(β−1) + 1) such that a GEMM row sum
    d_in·(2^weight_bits − 1)·(2^(β−1) + 1) stays ≤ 2^53, so float64 accumulation is exact in any order."""
    beta = 30
    while beta > 2 and d_in * ((1 << weight_bits) - 1) * ((1 << (beta - 1)) + 1) > 1 << 53:
        beta -= 1
    d = -(-log_q // beta)
    return d, -(-log_q // d)


def signed_digits(x: torch.Tensor, count: int, bits: int) -> torch.Tensor:
    """int64 [...] -> float64 [..., count] with x = Σ_d digit_d · 2^(bits·d), |digit_d| ≤ 2^(bits-1) (last may carry).

    Bit operations only: ``(x + half) & mask`` is the non-negative residue mod 2^bits and the arithmetic
    shift of ``x − digit`` (a multiple of 2^bits) is an exact division.
    """
    out = []
    half, mask = 1 << (bits - 1), (1 << bits) - 1
    for _ in range(count - 1):
        d = torch.bitwise_and(x + half, mask) - half
        out.append(d)
        x = torch.bitwise_right_shift(x - d, bits)
    out.append(x)
    return torch.stack(out, dim=-2).to(torch.float64)  # digits on the second-to-last axis: [..., D, N]


def compose_centered(res: torch.Tensor, primes: tuple[int, ...]) -> torch.Tensor:
    """Garner CRT on [..., L, N] residues -> centred int64 [..., N] (requires Q < 2^62)."""
    digits = [res[..., 0, :]]
    for i in range(1, len(primes)):
        qi = primes[i]
        v = res[..., i, :]
        for j in range(i):
            v = torch.remainder((v - digits[j]) * pow(primes[j], -1, qi), qi)
        digits.append(v)
    x = torch.zeros_like(digits[0])
    radix = 1
    for i, d in enumerate(digits):
        x = x + d * radix
        radix *= primes[i]
    return torch.where(x >= (radix + 1) // 2, x - radix, x)


def rescale_to_first(res: torch.Tensor, primes: tuple[int, ...]) -> torch.Tensor:
    """[..., L, N] residues mod Q -> [..., N] residues mod q_0 of round(c / (q_1···q_{L-1})) (exact RNS rescale)."""
    limbs = [res[..., i, :] for i in range(len(primes))]
    for last in range(len(primes) - 1, 0, -1):
        ql = primes[last]
        c = limbs[last]
        c = torch.where(c > ql // 2, c - ql, c)  # centred remainder
        for i in range(last):
            qi = primes[i]
            limbs[i] = torch.remainder(torch.remainder(limbs[i] - c, qi) * pow(ql, -1, qi), qi)
    return limbs[0]


def weight_polynomials(blocking: Blocking, weight_ints: torch.Tensor, d_in: int) -> torch.Tensor:
    """Integer weights [d_out, d_in] -> polynomials [B, O, N] (W[k, j] at k·n_i + n_i − 1 − j)."""
    n_i, n_o, n = blocking.in_per_ct, blocking.out_per_ct, blocking.n
    b_count, o_count = blocking.in_blocks(d_in), blocking.out_blocks(weight_ints.shape[0])
    padded = torch.zeros(o_count * n_o, b_count * n_i, dtype=weight_ints.dtype, device=weight_ints.device)
    padded[: weight_ints.shape[0], :d_in] = weight_ints
    blocks = padded.reshape(o_count, n_o, b_count, n_i).flip(-1).permute(2, 0, 1, 3)
    polys = torch.zeros(b_count, o_count, n, dtype=weight_ints.dtype, device=weight_ints.device)
    polys[..., : n_o * n_i] = blocks.reshape(b_count, o_count, n_o * n_i)
    return polys


@dataclass
class EncodedWeights:
    """A group's weights encoded for one blocking: the FFT product's [F, B, ΣO] spectra (complex128) or the
    NTT product's [L, B, ΣO, N] transforms; ``out_blocks`` per member in concatenation order."""

    blocking: Blocking
    out_blocks: tuple[int, ...]
    fft_spectra: torch.Tensor | None = None
    ntt_transforms: torch.Tensor | None = None
    scalar_weights: torch.Tensor | None = None  # scalar blockings: the weights themselves [ΣO, B] (float64)
    extra: dict = field(default_factory=dict)


def encode_weights(blocking: Blocking, weight_ints: list[torch.Tensor], d_in: int, primes: tuple[int, ...],
                   polymul: str) -> EncodedWeights:
    out_blocks = tuple(blocking.out_blocks(w.shape[0]) for w in weight_ints)
    polys = torch.cat([weight_polynomials(blocking, w, d_in) for w in weight_ints], dim=1)  # [B, ΣO, N]
    if polymul == "fft":
        spec = nfft.forward(polys.to(torch.float64))  # [B, O, F]
        return EncodedWeights(blocking, out_blocks, fft_spectra=spec.permute(2, 0, 1).contiguous())
    int_polys = polys.to(torch.int64)
    transforms = torch.stack([ntt.forward(torch.remainder(int_polys, q), q) for q in primes])  # [L, B, O, N]
    return EncodedWeights(blocking, out_blocks, ntt_transforms=transforms)


def _sent_layout(comps: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """[..., 2, (D,) N] -> [..., (D,) P + N]: c_0 only at the P wanted coefficients, then c_1 in full."""
    return torch.cat([comps[:, :, 0].index_select(-1, positions), comps[:, :, 1]], dim=-1)


def _inverse_in_wire_order(y: torch.Tensor, rb: int, d: int, positions: torch.Tensor) -> torch.Tensor:
    """Spectra [F, RB·2·D, O] (as the GEMM leaves them) -> coefficients [RB, O, D, P + N] (float64, not yet
    rounded): c_0 at the P wanted positions, then c_1. Same result as ``_sent_layout(nfft.inverse(·))`` of
    the permuted spectra, but the inverse FFT runs along the GEMM's own axis and only c_1 is copied whole."""
    f, _, o = y.shape
    v = nfft.inverse_unfolded(y, dim=0)                              # [F, RB·2·D, O, 2]: (re, im) halves
    v = v.reshape(f, rb, 2, d, o, 2)
    half, idx = torch.div(positions, f, rounding_mode="floor"), torch.remainder(positions, f)
    c0 = v[:, :, 0][idx, :, :, :, half].permute(1, 3, 2, 0)          # [RB, O, D, P]
    c1 = v[:, :, 1].permute(1, 3, 2, 4, 0).reshape(rb, o, d, 2 * f)  # [RB, O, D, N]
    return torch.cat([c0, c1], dim=-1)


def apply_fft(enc: EncodedWeights, cts: torch.Tensor, primes: tuple[int, ...], log_q: int,
              positions: torch.Tensor, weight_bits: int) -> torch.Tensor:
    """cts [RB, B, 2, L, N] residues -> outputs [RB, ΣO, P + N] mod q_0, rescaled, in wire order
    (c_0 at the P = r·n_o wanted positions, then c_1)."""
    rb, b, _, _, n = cts.shape
    d, beta = digit_plan(log_q)
    centred = compose_centered(cts, primes)                       # [RB, B, 2, N]
    digits = signed_digits(centred, d, beta)                      # [RB, B, 2, D, N]
    spec = nfft.forward(digits)                                   # [RB, B, 2, D, F]
    f = spec.shape[-1]
    # contiguous: torch's batched GEMM on a strided view runs ~6x slower (measured, CPU)
    x = spec.permute(4, 0, 2, 3, 1).reshape(f, rb * 2 * d, b).contiguous()  # [F, RB·2·D, B]
    y = torch.bmm(x, enc.fft_spectra)                             # [F, RB·2·D, O]
    ints = nfft.round_exact(_inverse_in_wire_order(y, rb, d, positions))  # [RB, O, D, P + N], exact
    # |ints| ≤ d_in·2^weight_bits·(2^(β−1) + 1): each is a sum of digit × weight products
    magnitude_bits = (b * enc.blocking.in_per_ct).bit_length() + weight_bits + beta
    return _recombine_and_rescale(ints, primes, beta, magnitude_bits)  # [RB, O, P + N]


def _recombine_and_rescale(ints: torch.Tensor, primes: tuple[int, ...], beta: int, magnitude_bits: int) -> torch.Tensor:
    """Exact digit results [..., D, M] (value = Σ_k ints_k·2^(β·k), every |ints| < 2^magnitude_bits) ->
    residues mod q_0 [..., M], rescaled."""
    digits = ints.shape[-2]
    if digits > 1 and magnitude_bits + beta <= 62:  # the two lowest digits combine exactly in int64
        low = ints[..., 0, :] + torch.bitwise_left_shift(ints[..., 1, :], beta)
        first = 2
    else:
        low, first = ints[..., 0, :], 1
    limbs = []
    for q in primes:
        acc = torch.remainder(low, q)
        for k in range(first, digits):
            acc = acc + torch.remainder(ints[..., k, :], q) * pow(2, beta * k, q)
        limbs.append(torch.remainder(acc, q) if digits > first else acc)
    return rescale_to_first(torch.stack(limbs, dim=-2), primes)


def apply_scalar(enc: EncodedWeights, cts: torch.Tensor, primes: tuple[int, ...], log_q: int,
                 weight_bits: int) -> torch.Tensor:
    """Scalar blocking: cts [RB, B, 2, L, N] residues (column j of r token rows per ciphertext) ->
    outputs [RB, ΣO, r + N] mod q_0, rescaled, in wire order (c_0 at the r row coefficients, then c_1)."""
    rb, b, _, _, n = cts.shape
    r = enc.blocking.rows_per_ct
    d, beta = scalar_digit_plan(log_q, weight_bits, b)
    centred = compose_centered(cts, primes)                                  # [RB, B, 2, N]
    sent = torch.cat([centred[:, :, 0, :r], centred[:, :, 1, :]], dim=-1)    # [RB, B, r + N]
    digits = signed_digits(sent, d, beta)                                    # [RB, B, D, r + N]
    x = digits.permute(1, 0, 2, 3).reshape(b, rb * d * (r + n))
    y = enc.scalar_weights @ x                                               # [ΣO, RB·D·(r + N)], exact
    o = y.shape[0]
    ints = y.reshape(o, rb, d, r + n).permute(1, 0, 2, 3).to(torch.int64)   # [RB, ΣO, D, r + N]
    return _recombine_and_rescale(ints, primes, beta, 53)  # |ints| ≤ 2^53 by the digit plan


def apply_ntt(enc: EncodedWeights, cts: torch.Tensor, primes: tuple[int, ...], positions: torch.Tensor) -> torch.Tensor:
    """Same contract as :func:`apply_fft`, via per-prime NTTs (the reference product)."""
    rb, b, _, L, n = cts.shape
    limbs = []
    for i, q in enumerate(primes):
        x = ntt.forward(cts[:, :, :, i, :], q)                     # [RB, B, 2, N]
        w = enc.ntt_transforms[i]                                  # [B, O, N]
        acc = torch.zeros(rb, w.shape[1], 2, n, dtype=torch.int64, device=cts.device)
        for j in range(b):
            acc = torch.remainder(acc + x[:, j, None, :, :] * w[j, None, :, None, :], q)
        limbs.append(_sent_layout(ntt.inverse(acc, q), positions))
    return rescale_to_first(torch.stack(limbs, dim=-2), primes)
