"""Coefficient-encoding layout ("blocking") of a delegated linear layer — no rotations.

One ciphertext holds an ``r × n_i`` block of the input X (row r, column j at coefficient
``r·n_o·n_i + j``); one plaintext holds an ``n_o × n_i`` block of W (W[k, j] at ``k·n_i + n_i − 1 − j``).
Their negacyclic product carries the ``r × n_o`` inner products Σ_j X[r, j]·W[k, j] at the coefficients
``r·n_o·n_i + k·n_i + n_i − 1`` (no other term lands there, nothing wraps onto them) provided
``r·n_o·n_i ≤ N``. The worker sums these products over the input blocks.

Per row block a matrix d_in → d_out costs ⌈d_in/n_i⌉ input and ⌈d_out/n_o⌉ output ciphertexts and
⌈d_in/n_i⌉·⌈d_out/n_o⌉ polynomial products. :func:`plan` picks (r, n_i, n_o) minimising a time model
of wire bytes + per-ciphertext trusted/worker work + worker products; it is a deterministic function of
public values (N, prime sizes, shape, rows) so both sides agree without negotiation.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

# Time model (seconds), fitted to trusted encrypt + worker apply + trusted decrypt of the GPT-2 and
# Qwen3-0.6B layer groups at 64 rows on the 2-core dev box (benchmarks/kernels_bench.py reports the
# measured per-shape figures). Only ratios matter for the choices below, and both sides compute them identically.
WIRE_BYTES_PER_S = 300e6
SECONDS_PER_INPUT_CT = 400e-6   # trusted encrypt (a·s, errors, packing) + worker unpack/expand/digits/FFT
SECONDS_PER_OUTPUT_CT = 270e-6  # worker inverse FFTs/recombine/rescale/packing + trusted decrypt
SECONDS_PER_PRODUCT = 9e-6      # one ciphertext-block × weight-block product in the FFT domain
HEADER_BYTES = 96


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
    def is_scalar(self) -> bool:
        """One input column per ciphertext (its coefficients hold ``r`` token rows): the weights act as
        scalars, so the worker computes a matrix product over Z_Q instead of polynomial products."""
        return self.in_per_ct == 1 and self.out_per_ct == 1

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
    out_bytes = HEADER_BYTES + (n + rows_per_ct * n_o) * prime_bits[0] / 8
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


# Scalar (token-packed) blockings: one GEMM over Z_Q per row block of up to N rows. Refitted after the worker's
# digit/recombine rewrite to kernels_bench's 768×2304 prefill at 128 and 512 rows (worker 0.91 / 1.03 s,
# encrypt 0.17 s, decrypt 0.26 / 0.29 s; model 1.49 / 1.63 s incl. wire): see
# ONE_ROW_MEASURED_OVER_MODEL below for where the crossover with one row per ciphertext lies.
GEMM_FLOPS_PER_S = 40e9                  # float64 GEMM (wall, 2 threads)
SECONDS_PER_SCALAR_INPUT_CT = 380e-6     # trusted encrypt + worker unpack/expand/CRT/digits (no FFT)
SECONDS_PER_SCALAR_OUTPUT_CT = 160e-6    # trusted decrypt (c_1·s) + worker per-ciphertext output work
SECONDS_PER_SCALAR_OUTPUT_COEFF = 0.01e-6  # worker digit recombination, rescale and packing, per coefficient
SCALAR_DIGIT_BITS = 26                   # typical digit size of the exact float64 GEMM (linear.scalar_digit_plan)
# The block model above ranks one-row-per-ciphertext blockings well but overstates their end-to-end time per
# prompt row: GPT-2 124M prefill measured 1.01 s/row (48 and 96 rows, trusted runtime + worker, 2 cores)
# against 1.38 s/row modelled, while the scalar model matched (73–76 s measured, 75 s modelled). Scaling the
# one-row side by the measured ratio puts the crossover where it was measured: ~74 rows (GPT-2), ~77 (Qwen3).
ONE_ROW_MEASURED_OVER_MODEL = 0.73


def scalar_seconds(n: int, prime_bits: tuple[int, ...], d_in: int, d_outs: tuple[int, ...], rows: int) -> float:
    """Modelled time of ``rows`` rows through the scalar blocking with min(rows, N) rows per ciphertext."""
    r = min(rows, n)
    row_blocks = -(-rows // r)
    digits = -(-sum(prime_bits) // SCALAR_DIGIT_BITS)
    in_bytes = HEADER_BYTES + n * sum(prime_bits) / 8
    out_bytes = HEADER_BYTES + (n + r) * prime_bits[0] / 8
    d_out = sum(d_outs)
    per_out_ct = SECONDS_PER_SCALAR_OUTPUT_CT + digits * (r + n) * SECONDS_PER_SCALAR_OUTPUT_COEFF
    per_block = (d_in * (in_bytes / WIRE_BYTES_PER_S + SECONDS_PER_SCALAR_INPUT_CT)
                 + d_out * (out_bytes / WIRE_BYTES_PER_S + per_out_ct)
                 + 2.0 * digits * (r + n) * d_in * d_out / GEMM_FLOPS_PER_S)
    return row_blocks * per_block


@lru_cache(maxsize=4096)
def plan(n: int, prime_bits: tuple[int, ...], d_in: int, d_outs: tuple[int, ...], rows: int) -> Blocking:
    """Blocking for ``rows`` input rows: one row per ciphertext, or the scalar blocking for long prompts.

    One row per ciphertext (r = 1) keeps a single weight encoding per group, prepared once and shared by
    prefill and decode. Packing r > 1 rows with polynomial products would leave the worker's work unchanged
    but multiply the encoded weights' memory and encoding time by r (measured: a 768×2304 matrix at r=64
    took 20 s to encode and several GB; r=512 ran out of 24 GiB). The scalar blocking (r = min(rows, N)
    rows, one column per ciphertext) needs no encoding at all and cuts ciphertexts per row from
    ~2·sqrt(d_in·d_out/N) to (d_in + d_out)/r, at the price of a GEMM whose width is N whatever r is: it is
    chosen when the time model says it is faster (prompts of ~75 tokens and more at N=2048).
    """
    if rows < 1:
        raise ValueError("rows must be ≥ 1")
    one_row, per_row = best_blocking_for_rows_per_ct(n, prime_bits, d_in, d_outs, 1)
    if rows > 1 and scalar_seconds(n, prime_bits, d_in, d_outs, rows) < rows * per_row * ONE_ROW_MEASURED_OVER_MODEL:
        return Blocking(n, min(rows, n), 1, 1)
    return one_row
