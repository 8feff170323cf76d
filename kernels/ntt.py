"""Negacyclic number-theoretic transform mod an NTT-friendly prime (torch int64, batched, any device).

``forward(a)[..., k] = a(ψ^(2·br(k)+1)) mod q`` (bit-reversed order), ψ a primitive 2N-th root of unity
mod q; ``inverse(forward(a)) == a``. Pointwise products of transforms are negacyclic products
(mod X^N + 1, mod q). Requires q < 2^31 so every product of two residues fits in int64.

The native backend's worker multiplies with exact float64 FFTs by default (faster on CPU and GPU, see
``linear.py``); this module is the RNS/NTT reference and the ``polymul="ntt"`` path.
"""

from __future__ import annotations

from functools import lru_cache

import torch

from .rns import primitive_2n_root


def _bitrev(n: int) -> list[int]:
    bits = n.bit_length() - 1
    return [int(format(i, f"0{bits}b")[::-1], 2) for i in range(n)]


@lru_cache(maxsize=None)
def _tables(q: int, n: int, device: str):
    psi = primitive_2n_root(q, n)
    br = _bitrev(n)
    # Cooley-Tukey (Longa-Naehrig) order: psi powers in bit-reversed order
    fwd = torch.tensor([pow(psi, br[i], q) for i in range(n)], dtype=torch.int64, device=device)
    psi_inv = pow(psi, -1, q)
    inv = torch.tensor([pow(psi_inv, br[i], q) for i in range(n)], dtype=torch.int64, device=device)
    return fwd, inv, pow(n, -1, q)


def forward(a: torch.Tensor, q: int) -> torch.Tensor:
    """[..., N] residues in [0, q) -> NTT [..., N] (bit-reversed evaluation order)."""
    n = a.shape[-1]
    fwd, _, _ = _tables(q, n, str(a.device))
    x = a.clone()
    lead = x.shape[:-1]
    m, t = 1, n
    while m < n:
        t //= 2
        x = x.reshape(*lead, m, 2, t)
        w = fwd[m: 2 * m].reshape(m, 1)
        u = x[..., 0, :]
        v = (x[..., 1, :] * w) % q
        x = torch.stack([(u + v) % q, (u - v) % q], dim=-2)
        m *= 2
    return x.reshape(*lead, n)


def inverse(a: torch.Tensor, q: int) -> torch.Tensor:
    """Inverse of :func:`forward` (Gentleman-Sande), output in [0, q)."""
    n = a.shape[-1]
    _, inv, n_inv = _tables(q, n, str(a.device))
    x = a.clone()
    lead = x.shape[:-1]
    m, t = n, 1
    while m > 1:
        h = m // 2
        x = x.reshape(*lead, h, 2, t)
        w = inv[h: 2 * h].reshape(h, 1)
        u, v = x[..., 0, :], x[..., 1, :]
        x = torch.stack([(u + v) % q, ((u - v) * w) % q], dim=-2)
        t *= 2
        m = h
    return (x.reshape(*lead, n) * n_inv) % q
