"""Cryptographically secure sampling (``secrets``/``os.urandom`` and SHAKE-256 only; never torch/numpy RNGs).

- secret key: uniform ternary {-1, 0, 1}^N (the HE-standard table's secret distribution);
- errors: centered binomial with η = 32 (σ = 4 ≥ the standard's 3.19; one 64-bit urandom word each);
- the uniform polynomial ``a`` of a fresh ciphertext: expanded from a 32-byte seed with SHAKE-256,
  rejection-sampled mod each prime (exactly uniform, identical on both sides).
"""

from __future__ import annotations

import hashlib
import os

import numpy as np

SEED_BYTES = 32
ERROR_ETA = 32  # centered binomial parameter: variance η/2 = 16


def ternary_secret(n: int) -> np.ndarray:
    """Uniform {-1,0,1}^n from os.urandom by rejection (bytes ≥ 255 dropped so each value has prob 1/3)."""
    out = np.empty(0, dtype=np.int64)
    while out.size < n:
        b = np.frombuffer(os.urandom(2 * n), dtype=np.uint8)
        out = np.concatenate([out, (b[b < 255] % 3).astype(np.int64) - 1])
    return out[:n]


def centered_binomial(shape: tuple[int, ...]) -> np.ndarray:
    """Errors: popcount(low 32 bits) − popcount(high 32 bits) of a urandom word -> [-32, 32], σ = 4."""
    count = int(np.prod(shape))
    words = np.frombuffer(os.urandom(8 * count), dtype="<u8")
    low = np.bitwise_count(words & np.uint64(0xFFFFFFFF)).astype(np.int64)
    return (low - np.bitwise_count(words >> np.uint64(32))).reshape(shape)


def fresh_seeds(count: int) -> list[bytes]:
    return [os.urandom(SEED_BYTES) for _ in range(count)]


def expand_uniform(seed: bytes, primes: tuple[int, ...], n: int) -> np.ndarray:
    """Uniform polynomial [L, n] with row i in [0, q_i), from SHAKE-256(seed ‖ i), 32-bit words masked
    to bitlen(q_i) and rejection-sampled (< q_i). Deterministic: the XOF output is prefix-stable."""
    out = np.empty((len(primes), n), dtype=np.int64)
    for i, q in enumerate(primes):
        mask = (1 << q.bit_length()) - 1
        words = n + n // 4 + 64
        while True:
            raw = hashlib.shake_256(seed + bytes([i])).digest(4 * words)
            w = np.frombuffer(raw, dtype="<u4").astype(np.int64) & mask
            ok = w[w < q]
            if ok.size >= n:
                out[i] = ok[:n]
                break
            words *= 2
    return out
