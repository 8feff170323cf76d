"""RNS moduli and arithmetic for the native backend.

A modulus chain is ``Q = q_0 · q_1 · … · q_{L-1}`` of distinct NTT-friendly primes
(``q_i ≡ 1 (mod 2N)``, so a negacyclic NTT of length N exists mod each). Products are exact mod Q and
travel as residues mod every prime (nothing is rescaled).

Invariants: every prime < 2^31 (so a product of two residues fits in int64 with room for a sum), and
``Q < 2^62`` (so the CRT-composed integer fits in int64).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

MAX_PRIME_BITS = 31
MAX_LOG_Q = 62


def is_prime(n: int) -> bool:
    """Deterministic Miller-Rabin for n < 3.3·10^24 (covers all 64-bit n)."""
    if n < 2:
        return False
    small = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41)
    for p in small:
        if n % p == 0:
            return n == p
    d, s = n - 1, 0
    while d % 2 == 0:
        d, s = d // 2, s + 1
    for a in small:
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(s - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


@lru_cache(maxsize=None)
def ntt_primes(n: int, bit_sizes: tuple[int, ...]) -> tuple[int, ...]:
    """Deterministic chain: for each size b, the largest unused prime q ≡ 1 mod 2n with 2^(b-1) < q < 2^b."""
    if any(b > MAX_PRIME_BITS for b in bit_sizes):
        raise ValueError(f"native backend needs primes of at most {MAX_PRIME_BITS} bits, got {bit_sizes}")
    if sum(bit_sizes) > MAX_LOG_Q:
        raise ValueError(f"native backend needs log2(Q) <= {MAX_LOG_Q}, got {sum(bit_sizes)}")
    step, used = 2 * n, set()
    out = []
    for b in bit_sizes:
        q = ((1 << b) - 1) // step * step + 1
        while q > (1 << (b - 1)) and (q in used or not is_prime(q)):
            q -= step
        if q <= (1 << (b - 1)):
            raise ValueError(f"no {b}-bit prime ≡ 1 mod {step}")
        used.add(q)
        out.append(q)
    return tuple(out)


def primitive_2n_root(q: int, n: int) -> int:
    """A primitive 2n-th root of unity mod prime q (requires q ≡ 1 mod 2n); smallest generator-derived one."""
    for g in range(2, q):
        psi = pow(g, (q - 1) // (2 * n), q)
        if pow(psi, n, q) == q - 1:
            return psi
    raise ValueError("no primitive root")


class RNSBasis:
    """Precomputed constants of one chain ``q_0 … q_{L-1}`` (all Python ints / int64 numpy)."""

    def __init__(self, primes: tuple[int, ...]):
        self.primes = tuple(int(q) for q in primes)
        self.Q = int(np.prod([int(q) for q in self.primes], dtype=object))
        if self.Q.bit_length() > MAX_LOG_Q:
            raise ValueError(f"log2(Q) = {self.Q.bit_length()} exceeds {MAX_LOG_Q}")
        self.q_col = np.array(self.primes, dtype=np.int64)
        # Garner: inv[i][j] = q_j^{-1} mod q_i for j < i
        self.garner_inv = [[pow(self.primes[j], -1, self.primes[i]) for j in range(i)] for i in range(len(self.primes))]

    @property
    def size(self) -> int:
        return len(self.primes)

    def compose_centered(self, residues: np.ndarray) -> np.ndarray:
        """CRT: residues [..., L] (each in [0, q_i)) -> the integer in [-Q/2, Q/2) as int64 (Garner, no overflow)."""
        r = residues.astype(np.int64, copy=False)
        digits = [r[..., 0]]
        for i in range(1, self.size):
            qi = self.primes[i]
            v = r[..., i] % qi
            for j in range(i):
                v = ((v - digits[j]) % qi) * self.garner_inv[i][j] % qi
            digits.append(v)
        x = np.zeros(r.shape[:-1], dtype=np.int64)
        radix = 1
        for i, d in enumerate(digits):
            x = x + d * radix  # < Q < 2^62 throughout
            radix *= self.primes[i]
        return np.where(x >= (self.Q + 1) // 2, x - self.Q, x)

    def decompose(self, x: np.ndarray) -> np.ndarray:
        """Integers (int64, any sign) -> residues [..., L] in [0, q_i)."""
        return np.stack([np.mod(x, q) for q in self.primes], axis=-1)
