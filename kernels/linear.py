"""Plaintext-weight × ciphertext linear layer (torch; the same code runs on CPU and CUDA).

For one row block, input polynomials c_b mod Q (b over input blocks; the worker's c_0 halves, the trusted
side's public masks a_b) and weight polynomials W_{b,o} (integers, |w| < 2^weight_bits), it computes

    out_o = Σ_b c_b · W_{b,o}   (mod X^N+1, mod Q)

at the wanted coefficients only (or all N), as residues mod each prime. Nothing is rescaled: the trusted side
decodes the exact result mod Q.

Engine "fft" (default, chosen by measurement): each polynomial is CRT-composed to its centred integer
(|c| < Q/2 < 2^61), split into D signed digits of β ≤ 18 bits, and multiplied with W exactly by float64
FFTs; the sum over b is a batched complex matmul [F, rows·D, B] @ [F, B, O] (F = N/2 frequencies) — one
BLAS/cuBLAS call per group. Exactness: digit sums are integers of typical magnitude
2^(β-1)·2^weight_bits·sqrt(B·n_i·n_o) ≈ 2^40, far inside float64's 2^53; every rounding is verified
(|x − round(x)| < 1/4, else :class:`~.negacyclic_fft.FFTPrecisionError`), so it is exact or fails.
Engine "ntt": the RNS/NTT reference (per-prime NTT, pointwise multiply-accumulate mod q_i).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch

from . import negacyclic_fft as nfft
from . import ntt
from .layout import Blocking

MAX_DIGIT_BITS = 18


def digit_plan(log_q: int) -> tuple[int, int]:
    """(D, β): D signed digits of β bits cover a centred integer |c| < 2^(log_q - 1)."""
    d = -(-log_q // MAX_DIGIT_BITS)
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

    def spectra(self) -> torch.Tensor:
        if self.fft_spectra is None:
            raise ValueError("these weights were encoded for the NTT product: no FFT spectra")
        return self.fft_spectra

    def transforms(self) -> torch.Tensor:
        if self.ntt_transforms is None:
            raise ValueError("these weights were encoded for the FFT product: no NTT transforms")
        return self.ntt_transforms


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


DIRECT_INVERSE_MAX_POSITIONS = 64  # up to this many wanted coefficients, one GEMM instead of inverse FFTs (measured)


@lru_cache(maxsize=256)
def _inverse_rows(f: int, positions: tuple[int, ...], device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows of the negacyclic inverse at ``positions``: coefficient p is Re (p < F) or Im (p ≥ F) of
    Σ_f y[f]·ψ^(−j)·e^{2πi·f·j/F}/F with j = p mod F; returns ([P, F] complex128, [P] bool "take Im")."""
    j = torch.tensor(positions, dtype=torch.int64) % f
    k = torch.arange(f, dtype=torch.int64)
    turns = (j[:, None] * k[None, :]) % f                                  # exact phase index, no float drift
    ang = 2 * math.pi * turns.to(torch.float64) / f - math.pi * j[:, None].to(torch.float64) / (2 * f)
    rows = torch.polar(torch.full_like(ang, 1.0 / f), ang)
    return rows.to(device), (torch.tensor(positions) >= f).to(device)


def _inverse_at(y: torch.Tensor, rb: int, d: int, positions: torch.Tensor | None) -> torch.Tensor:
    """Spectra [F, RB·D, O] (as the GEMM leaves them) -> coefficients [RB, O, D, P] (float64, not yet rounded)
    at ``positions`` (P of them; None: all N). Few positions: one complex GEMM with the inverse's rows at
    them (3.5× faster than the inverse FFTs at 12 rows, measured); otherwise inverse FFTs along the GEMM's axis."""
    f, _, o = y.shape
    if positions is not None and len(positions) <= DIRECT_INVERSE_MAX_POSITIONS:
        rows, imag = _inverse_rows(f, tuple(positions.tolist()), str(y.device))
        v = rows @ y.reshape(f, -1)                                        # [P, RB·D·O]
        v = torch.where(imag[:, None], v.imag, v.real)
        return v.reshape(-1, rb, d, o).permute(1, 3, 2, 0)                 # [RB, O, D, P]
    v = nfft.inverse_unfolded(y, dim=0)                                    # [F, RB·D, O, 2]: (re, im) halves
    if positions is None:
        return v.reshape(f, rb, d, o, 2).permute(1, 3, 2, 4, 0).reshape(rb, o, d, 2 * f)
    half, idx = torch.div(positions, f, rounding_mode="floor"), torch.remainder(positions, f)
    return v[idx, :, :, half].reshape(-1, rb, d, o).permute(1, 3, 2, 0)  # [RB, O, D, P]


def apply_fft(enc: EncodedWeights, polys: torch.Tensor, primes: tuple[int, ...], log_q: int,
              positions: torch.Tensor | None, weight_bits: int) -> torch.Tensor:
    """polys [RB, B, L, N] residues mod q_i -> Σ_b polys_b · W_{b,o} mod each q_i at ``positions`` (None: all
    N coefficients), residues [RB, ΣO, L, P]. Exact (every FFT rounding is checked)."""
    rb, b, _, n = polys.shape
    d, beta = digit_plan(log_q)
    centred = compose_centered(polys, primes)                     # [RB, B, N]
    spec = nfft.forward(signed_digits(centred, d, beta))          # [RB, B, D, F]
    f = spec.shape[-1]
    # contiguous: torch's batched GEMM on a strided view runs ~6x slower (measured, CPU)
    x = spec.permute(3, 0, 2, 1).reshape(f, rb * d, b).contiguous()  # [F, RB·D, B]
    y = torch.bmm(x, enc.spectra())                               # [F, RB·D, O]
    ints = nfft.round_exact(_inverse_at(y, rb, d, positions))     # [RB, O, D, P], exact
    # each is a sum of B·n_i·n_o digit × weight products (a weight polynomial has n_o·n_i coefficients), every
    # one below 2^(β−1+1)·2^weight_bits in magnitude, whatever the input
    blk = enc.blocking
    magnitude_bits = (b * blk.in_per_ct * blk.out_per_ct).bit_length() + weight_bits + beta
    return recombine(ints, primes, beta, magnitude_bits)          # [RB, O, L, P]


def recombine(ints: torch.Tensor, primes: tuple[int, ...], beta: int, magnitude_bits: int) -> torch.Tensor:
    """Exact digit results [..., D, M] (value = Σ_k ints_k·2^(β·k), every |ints| < 2^magnitude_bits) ->
    residues mod each q_i [..., L, M]."""
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
    return torch.stack(limbs, dim=-2)


def apply_ntt(enc: EncodedWeights, polys: torch.Tensor, primes: tuple[int, ...],
              positions: torch.Tensor | None) -> torch.Tensor:
    """Same contract as :func:`apply_fft`, via per-prime NTTs (the reference product)."""
    rb, b, L, n = polys.shape
    limbs = []
    for i, q in enumerate(primes):
        x = ntt.forward(polys[:, :, i, :], q)                      # [RB, B, N]
        w = enc.transforms()[i]                                    # [B, O, N]
        acc = torch.zeros(rb, w.shape[1], n, dtype=torch.int64, device=polys.device)
        for j in range(b):
            acc = torch.remainder(acc + x[:, j, None, :] * w[j, None, :, :], q)
        out = ntt.inverse(acc, q)
        limbs.append(out if positions is None else out.index_select(-1, positions))
    return torch.stack(limbs, dim=-2)
