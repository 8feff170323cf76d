"""Coefficient-encoding layout ("blocking") of a delegated linear layer — no rotations.

One ciphertext holds an ``r × n_i`` block of the input X (row r, column j at coefficient
``r·n_o·n_i + j``); one plaintext holds an ``n_o × n_i`` block of W (W[k, j] at ``k·n_i + n_i − 1 − j``).
Their negacyclic product carries the ``r × n_o`` inner products Σ_j X[r, j]·W[k, j] at the coefficients
``r·n_o·n_i + k·n_i + n_i − 1`` (no other term lands there, nothing wraps onto them) provided
``r·n_o·n_i ≤ N``. The worker sums these products over the input blocks.

Per row block a matrix d_in → d_out costs ⌈d_in/n_i⌉ input and ⌈d_out/n_o⌉ output ciphertexts and
⌈d_in/n_i⌉·⌈d_out/n_o⌉ polynomial products. :func:`plan` picks (n_i, n_o), with r = 1, minimising a time model
of wire bytes + per-ciphertext trusted/worker work + worker products; it is a deterministic function of
public values (N, prime sizes, shape, rows) so both sides agree without negotiation.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

# Time model (seconds): a least-squares fit of trusted encrypt + worker apply + trusted decrypt, in one process,
# over n_i = 16…512 for the GPT-2 and Qwen3-0.6B layer groups at one row on the 2-core dev box (30 blockings,
# within ±20 % of each; benchmarks/kernels_bench.py reports the measured per-shape figures). Only ratios matter
# for the choices below, and both sides compute them identically.
WIRE_BYTES_PER_S = 300e6
SECONDS_PER_INPUT_CT = 210e-6   # worker unpack/compose/digits/FFT of c_0 + trusted add/pack
SECONDS_PER_OUTPUT_CT = 45e-6   # worker inverse at the wanted coefficients/recombine + trusted mask term/decode
SECONDS_PER_PRODUCT = 2.4e-6    # one ciphertext-block × weight-block product in the FFT domain
HEADER_BYTES = 64


@dataclass(frozen=True)
class Blocking:
    n: int            # ring dimension N
    rows_per_ct: int  # r
    in_per_ct: int    # n_i
    out_per_ct: int   # n_o

    def __post_init__(self) -> None:
        if min(self.rows_per_ct, self.in_per_ct, self.out_per_ct) < 1 or \
                self.rows_per_ct * self.in_per_ct * self.out_per_ct > self.n:
            raise ValueError(f"invalid blocking {self}")

    @property
    def row_stride(self) -> int:
        return self.out_per_ct * self.in_per_ct

    def row_blocks(self, rows: int) -> int:
        return -(-rows // self.rows_per_ct)

    def in_blocks(self, d_in: int) -> int:
        return -(-d_in // self.in_per_ct)

    def out_blocks(self, d_out: int) -> int:
        return -(-d_out // self.out_per_ct)

    def input_positions(self) -> np.ndarray:
        """[r, n_i] coefficient index of X[r, j] inside an input polynomial."""
        r = np.arange(self.rows_per_ct)[:, None] * self.row_stride
        return r + np.arange(self.in_per_ct)[None, :]

    def output_positions(self) -> np.ndarray:
        """[r, n_o] coefficient index of Y[r, k] inside an output polynomial."""
        r = np.arange(self.rows_per_ct)[:, None] * self.row_stride
        return r + np.arange(self.out_per_ct)[None, :] * self.in_per_ct + self.in_per_ct - 1


def _ct_costs(n: int, prime_bits: tuple[int, ...], rows_per_ct: int, n_o: int) -> tuple[float, float]:
    in_bytes = HEADER_BYTES + n * sum(prime_bits) / 8
    out_bytes = HEADER_BYTES + rows_per_ct * n_o * sum(prime_bits) / 8
    return (in_bytes / WIRE_BYTES_PER_S + SECONDS_PER_INPUT_CT,
            out_bytes / WIRE_BYTES_PER_S + SECONDS_PER_OUTPUT_CT)


@lru_cache(maxsize=4096)
def best_blocking_for_rows_per_ct(n: int, prime_bits: tuple[int, ...], d_in: int, d_outs: tuple[int, ...],
                                  rows_per_ct: int) -> tuple[Blocking, float]:
    """Best (n_i, n_o) for a fixed rows-per-ciphertext; returns it with its modelled seconds per row block."""
    cap = n // rows_per_ct
    best: tuple[float, int, int] | None = None
    for n_i in range(1, min(d_in, cap) + 1):
        n_o = min(cap // n_i, max(d_outs))
        if n_o < 1:
            break
        t_in, t_out = _ct_costs(n, prime_bits, rows_per_ct, n_o)
        k_in = -(-d_in // n_i)
        k_out = sum(-(-d // n_o) for d in d_outs)
        cost = k_in * t_in + k_out * t_out + k_in * k_out * SECONDS_PER_PRODUCT
        if best is None or cost < best[0] - 1e-12:
            best = (cost, n_i, n_o)
    assert best is not None
    return Blocking(n, rows_per_ct, best[1], best[2]), best[0]


@lru_cache(maxsize=4096)
def plan(n: int, prime_bits: tuple[int, ...], d_in: int, d_outs: tuple[int, ...], rows: int) -> Blocking:
    """Blocking for ``rows`` input rows: one row per ciphertext, whatever ``rows``.

    One row per ciphertext (r = 1) keeps a single weight encoding per group, prepared once and shared by
    prefill and decode, and a single product of the public masks with the weights on the trusted side
    (backend.py). Packing r > 1 rows with polynomial products would leave the worker's work unchanged
    but multiply the encoded weights' memory and encoding time by r (measured: a 768×2304 matrix at r=64
    took 20 s to encode and several GB; r=512 ran out of 24 GiB).
    """
    if rows < 1:
        raise ValueError("rows must be ≥ 1")
    return best_blocking_for_rows_per_ct(n, prime_bits, d_in, d_outs, 1)[0]
