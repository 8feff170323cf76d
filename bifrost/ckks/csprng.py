"""Every sampler of keys, errors, masks and check vectors: the OS CSPRNG only (never torch/numpy RNGs).

Sources: ``os.urandom`` for short requests and seeds; otherwise AES-256 (``cryptography``) keyed by 32 fresh
``os.urandom`` bytes per request (:func:`random_bytes`: several times faster than the kernel's pool for the
megabytes a layer or a session's check vectors need), or keyed by a 32-byte seed (:func:`expand_uniform_many`).

- check vectors: :func:`uniform01`, :func:`standard_normal` (float64);
- secret key (native backend): uniform ternary {-1, 0, 1}^N (the HE-standard table's secret distribution);
- errors: centered binomial with η = 32 (σ = 4 ≥ the standard's 3.19), 64 random bits each;
- uniform polynomials (the native backend's public masks a_b): expanded from a 32-byte seed and an index ``i``
  with AES-256 in counter mode (key = seed, counter block = i ‖ j as two big-endian 64-bit halves), 32-bit
  words masked to bitlen(q_l) and rejection-sampled mod each prime (exactly uniform, deterministic in
  (seed, i): worker and trusted side expand identically). The native backend draws its mask seed once per
  process (``MASK_SEED``): the masks are public and fixed; every encryption's secret and errors are fresh.
"""

from __future__ import annotations

import os

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

_ZERO_IV = bytes(16)
SEED_BYTES = 32
ERROR_ETA = 32  # centered binomial parameter: variance η/2 = 16


def aes_ctr_stream(key: bytes, length: int) -> bytes:
    """``length`` bytes of AES-256-CTR keystream (key 32 bytes, counter block starting at 0)."""
    encryptor = Cipher(algorithms.AES(key), modes.CTR(_ZERO_IV)).encryptor()
    return encryptor.update(bytes(length)) + encryptor.finalize()


def random_bytes(length: int) -> bytes:
    """``length`` CSPRNG bytes: AES-256-CTR under a fresh key from ``os.urandom`` (short requests: urandom)."""
    if length <= 4096:
        return os.urandom(length)
    return aes_ctr_stream(os.urandom(32), length)


def uniform01(shape: tuple[int, ...]) -> np.ndarray:
    """float64 uniform on the open interval (0, 1): 53 random bits per value, plus half an ulp."""
    count = int(np.prod(shape))
    words = np.frombuffer(random_bytes(8 * count), dtype="<u8") >> np.uint64(11)
    return ((words.astype(np.float64) + 0.5) * 2.0 ** -53).reshape(shape)


def standard_normal(shape: tuple[int, ...]) -> np.ndarray:
    """float64 N(0, 1) samples (Box–Muller on :func:`uniform01`)."""
    count = int(np.prod(shape))
    half = -(-count // 2)
    u1, u2 = uniform01((half,)), uniform01((half,))
    radius = np.sqrt(-2.0 * np.log(u1))
    z = np.concatenate([radius * np.cos(2 * np.pi * u2), radius * np.sin(2 * np.pi * u2)])
    return z[:count].reshape(shape)


def uniform_bits(count: int, bits: int) -> np.ndarray:
    """``count`` int64 uniform in [0, 2^bits) (bits ≤ 32): the top ``bits`` of 32 random bits each."""
    words = np.frombuffer(random_bytes(4 * count), dtype="<u4")
    return (words >> np.uint32(32 - bits)).astype(np.int64)


def ternary_secret(n: int) -> np.ndarray:
    """Uniform {-1,0,1}^n from os.urandom by rejection (bytes ≥ 255 dropped so each value has prob 1/3)."""
    out = np.empty(0, dtype=np.int64)
    while out.size < n:
        b = np.frombuffer(os.urandom(2 * n), dtype=np.uint8)
        out = np.concatenate([out, (b[b < 255] % 3).astype(np.int64) - 1])
    return out[:n]


def centered_binomial(shape: tuple[int, ...]) -> np.ndarray:
    """Errors in [-η, η], σ = 4: popcount(low 32 bits) − popcount(high 32 bits) of a random 64-bit word."""
    count = int(np.prod(shape))
    words = np.frombuffer(random_bytes(8 * count), dtype="<u8")
    low = np.bitwise_count(words & np.uint64(0xFFFFFFFF)).astype(np.int64)
    return (low - np.bitwise_count(words >> np.uint64(32))).reshape(shape)


def fresh_seed() -> bytes:
    """A fresh 32-byte seed from the OS CSPRNG (the native backend's public masks are expanded from one)."""
    return os.urandom(SEED_BYTES)


def _indexed_keystreams(key: bytes, indices: np.ndarray, length: int) -> bytes:
    """For each index i, ``length`` bytes (a multiple of 16) of AES-256_key(i ‖ 0), AES(i ‖ 1), … — the
    CTR keystream with initial counter block i·2^64 — all in one ECB pass over the counter blocks."""
    blocks = length // 16
    counters = np.zeros((len(indices), blocks, 2), dtype=">u8")
    counters[:, :, 0] = np.asarray(indices, dtype=np.uint64)[:, None]
    counters[:, :, 1] = np.arange(blocks, dtype=np.uint64)[None, :]
    encryptor = Cipher(algorithms.AES(key), modes.ECB()).encryptor()
    return encryptor.update(counters.tobytes()) + encryptor.finalize()


def _first_accepted(words: np.ndarray, q: int, n: int) -> np.ndarray:
    """Rows of ``words`` [C, K] -> the first n entries < q of each row [C, n] (the caller passes only rows
    with at least n; ValueError otherwise).

    Rejections are rare for the primes used (q just below a power of two), so instead of a running count
    each row's cut-off index is found by iterating ``cut = n + #rejected before cut`` to its fixed point.
    """
    ok = words < q
    if (ok.sum(axis=1) < n).any():
        raise ValueError(f"a row has fewer than {n} words below {q}")
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


EXPANSION_CHUNK = 128  # ciphertexts expanded together: bounds the temporaries (~3 MB) so they stay in cache


def expand_uniform_many(seed: bytes, indices, primes: tuple[int, ...], n: int) -> np.ndarray:
    """Uniform polynomials [C, L, n] for ciphertexts ``indices`` of the call seeded by ``seed``; row (c, l)
    in [0, q_l). Deterministic in (seed, index).

    Ciphertext i's keystream (:func:`_indexed_keystreams`) is read as little-endian 32-bit words; limb l
    takes the words of its own region ``[l·K, (l+1)·K)`` (K = n + n/4 + 64 words, doubled, for that
    ciphertext alone, until every limb has n accepted words), each masked to bitlen(q_l) bits and kept if
    < q_l. Acceptance is q_l / 2^bitlen(q_l) > 1/2 per word.
    """
    indices = np.asarray(indices, dtype=np.int64).reshape(-1)
    if len(seed) != SEED_BYTES or (indices < 0).any():
        raise ValueError("expansion needs a 32-byte seed and non-negative indices")
    masks = np.array([(1 << q.bit_length()) - 1 for q in primes], dtype=np.uint32)
    out = np.empty((len(indices), len(primes), n), dtype=np.int64)
    for start in range(0, len(indices), EXPANSION_CHUNK):
        rows = np.arange(start, min(start + EXPANSION_CHUNK, len(indices)))
        per_limb = n + n // 4 + 64
        while len(rows):
            raw = _indexed_keystreams(seed, indices[rows], -(-4 * per_limb * len(primes) // 16) * 16)
            words = np.frombuffer(raw, dtype="<u4").reshape(len(rows), -1)[:, : per_limb * len(primes)]
            words = words.reshape(len(rows), len(primes), per_limb) & masks[:, None]
            short = np.zeros(len(rows), dtype=bool)
            for i, q in enumerate(primes):
                short |= (words[:, i, :] < q).sum(axis=1) < n
            done = np.flatnonzero(~short)
            for i, q in enumerate(primes):
                out[rows[done], i, :] = _first_accepted(words[done, i, :], q, n)
            rows = rows[short]  # rare: redo those ciphertexts with longer regions
            per_limb *= 2
    return out


def expand_uniform(seed: bytes, primes: tuple[int, ...], n: int, index: int = 0) -> np.ndarray:
    """Uniform polynomial [L, n] of ciphertext ``index`` (see :func:`expand_uniform_many`)."""
    return expand_uniform_many(seed, [index], primes, n)[0]
