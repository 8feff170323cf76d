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
    return bytes(_aes_ctr_streams([key], length))


def _aes_ctr_streams(keys: list[bytes], length: int) -> memoryview:
    """The keystreams of several keys, concatenated (``len(keys)·length`` bytes), written in place."""
    zeros = bytes(length)
    buf = bytearray(len(keys) * length + 15)  # update_into needs a block's slack at the end
    view = memoryview(buf)
    for k, key in enumerate(keys):
        Cipher(algorithms.AES(key), modes.CTR(_ZERO_IV)).encryptor().update_into(zeros, view[k * length:])
    return view[: len(keys) * length]


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
    """Rows of ``words`` [C, K] -> the first n entries < q of each row [C, n]; None if a row has fewer.

    Rejections are rare for the primes used (q just below a power of two), so instead of a running count
    each row's cut-off index is found by iterating ``cut = n + #rejected before cut`` to its fixed point.
    """
    ok = words < q
    if (ok.sum(axis=1) < n).any():
        return None
    rejected_at = np.nonzero(~ok)  # few: (row, column) pairs
    cut = np.full(words.shape[0], n)
    while True:
        inside = rejected_at[1] < cut[rejected_at[0]]
        new_cut = n + np.bincount(rejected_at[0][inside], minlength=words.shape[0])
        if (new_cut == cut).all():
            break
        cut = new_cut
    keep = ok & (np.arange(words.shape[1]) < cut[:, None])
    return words[keep].reshape(words.shape[0], n)


EXPANSION_CHUNK = 128  # seeds expanded together: bounds the temporaries (~3 MB) so they stay in cache


def expand_uniform_many(seeds: list[bytes], primes: tuple[int, ...], n: int) -> np.ndarray:
    """Uniform polynomials [C, L, n], row (c, i) in [0, q_i), one per seed. Deterministic in the seed.

    Seed c's AES-256-CTR keystream is read as little-endian 32-bit words; limb i takes the words of its own
    region ``[i·K, (i+1)·K)`` (K = n + n/4 + 64 words, doubled until every limb has n accepted words), each
    masked to bitlen(q_i) bits and kept if < q_i. Acceptance is q_i / 2^bitlen(q_i) > 1/2 per word.
    """
    out = np.empty((len(seeds), len(primes), n), dtype=np.int64)
    for start in range(0, len(seeds), EXPANSION_CHUNK):
        chunk = list(range(start, min(start + EXPANSION_CHUNK, len(seeds))))
        per_limb = n + n // 4 + 64
        while chunk:
            raw = _aes_ctr_streams([seeds[c] for c in chunk], 4 * per_limb * len(primes))
            masks = np.array([(1 << q.bit_length()) - 1 for q in primes], dtype=np.uint32)
            words = np.frombuffer(raw, dtype="<u4").reshape(len(chunk), len(primes), per_limb) & masks[:, None]
            short = np.zeros(len(chunk), dtype=bool)
            for i, q in enumerate(primes):
                short |= (words[:, i, :] < q).sum(axis=1) < n
            done = np.flatnonzero(~short)
            for i, q in enumerate(primes):
                out[[chunk[k] for k in done], i, :] = _first_accepted(words[done, i, :], q, n)
            chunk = [chunk[k] for k in np.flatnonzero(short)]  # rare: redo with longer regions
            per_limb *= 2
    return out


def expand_uniform(seed: bytes, primes: tuple[int, ...], n: int) -> np.ndarray:
    """Uniform polynomial [L, n] from one seed (see :func:`expand_uniform_many`)."""
    return expand_uniform_many([seed], primes, n)[0]
