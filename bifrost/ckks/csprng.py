"""Cryptographically secure randomness for keys, errors, masks and check vectors (never torch/numpy RNGs).

``random_bytes`` reads ``os.urandom`` for short requests and otherwise expands 32 fresh ``os.urandom``
bytes with AES-256-CTR (``cryptography``): a CSPRNG that is several times faster than the kernel's pool
for the megabytes a layer or a session's check vectors need.
"""

from __future__ import annotations

import os

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

_ZERO_IV = bytes(16)


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
