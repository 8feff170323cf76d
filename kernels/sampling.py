"""Cryptographically secure sampling (``os.urandom`` and AES-256-CTR from ``cryptography``; never torch/numpy RNGs).

- secret key: uniform ternary {-1, 0, 1}^N (the HE-standard table's secret distribution), from ``os.urandom``;
- errors: centered binomial with η = 32 (σ = 4 ≥ the standard's 3.19), 64 random bits each, drawn from
  :func:`random_bytes` (AES-256-CTR keyed by 32 fresh ``os.urandom`` bytes per call: a CSPRNG that is ~5x
  faster than reading the kernel's pool for the megabytes a layer needs);
- the uniform polynomial ``a`` of a fresh ciphertext: expanded from its 32-byte seed with AES-256-CTR
  (key = seed, counter from 0), 32-bit words masked to bitlen(q_i) and rejection-sampled mod each prime
  (exactly uniform, identical on both sides). A seed is fresh ``os.urandom`` output used for one ciphertext.
"""

from __future__ import annotations

import os

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

SEED_BYTES = 32
ERROR_ETA = 32  # centered binomial parameter: variance η/2 = 16
_ZERO_IV = bytes(16)


def _aes_ctr_stream(key: bytes, length: int) -> bytes:
    """``length`` bytes of AES-256-CTR keystream (key 32 bytes, counter block starting at 0)."""
    encryptor = Cipher(algorithms.AES(key), modes.CTR(_ZERO_IV)).encryptor()
    return encryptor.update(bytes(length)) + encryptor.finalize()


def random_bytes(length: int) -> bytes:
    """``length`` CSPRNG bytes: AES-256-CTR under a fresh key from ``os.urandom`` (short requests: urandom)."""
    if length <= 4096:
        return os.urandom(length)
    return _aes_ctr_stream(os.urandom(32), length)


def ternary_secret(n: int) -> np.ndarray:
    """Uniform {-1,0,1}^n from os.urandom by rejection (bytes ≥ 255 dropped so each value has prob 1/3)."""
    out = np.empty(0, dtype=np.int64)
    while out.size < n:
        b = np.frombuffer(os.urandom(2 * n), dtype=np.uint8)
        out = np.concatenate([out, (b[b < 255] % 3).astype(np.int64) - 1])
    return out[:n]


def centered_binomial(shape: tuple[int, ...]) -> np.ndarray:
    """Errors: popcount(low 32 bits) − popcount(high 32 bits) of a random word -> [-32, 32], σ = 4."""
    count = int(np.prod(shape))
    words = np.frombuffer(random_bytes(8 * count), dtype="<u8")
    low = np.bitwise_count(words & np.uint64(0xFFFFFFFF)).astype(np.int64)
    return (low - np.bitwise_count(words >> np.uint64(32))).reshape(shape)


def fresh_seeds(count: int) -> list[bytes]:
    return [os.urandom(SEED_BYTES) for _ in range(count)]


def _first_accepted(words: np.ndarray, q: int, n: int) -> np.ndarray | None:
    """Rows of ``words`` [C, K] -> the first n entries < q of each row [C, n]; None if a row has fewer."""
    ok = words < q
    if (ok.sum(axis=1) < n).any():
        return None
    keep = ok & (np.cumsum(ok, axis=1) <= n)
    return words[keep].reshape(words.shape[0], n)


def expand_uniform_many(seeds: list[bytes], primes: tuple[int, ...], n: int) -> np.ndarray:
    """Uniform polynomials [C, L, n], row (c, i) in [0, q_i), one per seed. Deterministic in the seed.

    Seed c's AES-256-CTR keystream is read as little-endian 32-bit words; limb i takes the words of its own
    region ``[i·K, (i+1)·K)`` (K = n + n/4 + 64 words, doubled until every row has n accepted words), each
    masked to bitlen(q_i) bits and kept if < q_i. Acceptance is q_i / 2^bitlen(q_i) > 1/2 per word.
    """
    count, limbs = len(seeds), len(primes)
    out = np.empty((count, limbs, n), dtype=np.int64)
    per_limb = n + n // 4 + 64
    pending = list(range(count))
    while pending:
        raw = b"".join(_aes_ctr_stream(seeds[c], 4 * per_limb * limbs) for c in pending)
        words = np.frombuffer(raw, dtype="<u4").astype(np.int64).reshape(len(pending), limbs, per_limb)
        retry = set()
        for i, q in enumerate(primes):
            masked = words[:, i, :] & ((1 << q.bit_length()) - 1)
            accepted = _first_accepted(masked, q, n)
            if accepted is None:  # some row ran short: redo those rows with longer regions (rare)
                short = (masked < q).sum(axis=1) < n
                retry |= {pending[k] for k in np.flatnonzero(short)}
                accepted = np.zeros((len(pending), n), dtype=np.int64)
                rows = np.flatnonzero(~short)
                accepted[rows] = _first_accepted(masked[rows], q, n)
            out[pending, i, :] = accepted
        pending = sorted(retry)
        per_limb *= 2
    return out


def expand_uniform(seed: bytes, primes: tuple[int, ...], n: int) -> np.ndarray:
    """Uniform polynomial [L, n] from one seed (see :func:`expand_uniform_many`)."""
    return expand_uniform_many([seed], primes, n)[0]
