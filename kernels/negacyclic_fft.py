"""Exact negacyclic integer convolution in Z[X]/(X^N + 1) with float64 FFTs (torch, any device).

A real polynomial ``a`` of degree < N is mapped to N/2 complex values: its evaluations at the roots
ψ^(1-4k) (ψ = e^{iπ/N}, k < N/2), computed as ``fft((a_lo + i·a_hi) · ψ^j)`` ("folding"; the other
N/2 roots are their conjugates). Products of polynomials are pointwise products of these spectra.

Exactness: the inverse returns the integer result to within float64 rounding error; for results with
|coefficient| ≤ 2^46 and N ≤ 4096 the error stays < 2^-6 in practice, and callers check
``max |x - round(x)| < 1/4`` (see :func:`round_exact`) so a precision failure can never pass silently.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch


@lru_cache(maxsize=None)
def _twist(n: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    j = torch.arange(n // 2, dtype=torch.float64)
    ang = math.pi * j / n
    tw = torch.polar(torch.ones_like(ang), ang).to(device)
    return tw, tw.conj()


def forward(a: torch.Tensor) -> torch.Tensor:
    """[..., N] real (float64, integer-valued) -> [..., N/2] complex128 spectrum."""
    n = a.shape[-1]
    tw, _ = _twist(n, str(a.device))
    v = torch.complex(a[..., : n // 2].to(torch.float64), a[..., n // 2:].to(torch.float64)) * tw
    return torch.fft.fft(v, dim=-1)


def inverse(spec: torch.Tensor) -> torch.Tensor:
    """[..., N/2] complex128 spectrum -> [..., N] float64 coefficients (not yet rounded)."""
    half = spec.shape[-1]
    _, itw = _twist(2 * half, str(spec.device))
    v = torch.fft.ifft(spec, dim=-1) * itw
    return torch.cat([v.real, v.imag], dim=-1)


def inverse_unfolded(spec: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """:func:`inverse` along any axis ``dim`` of length N/2, returned as ``torch.view_as_real``: the last
    axis (size 2) holds (real, imag) = (coefficients j, coefficients j + N/2). Avoids moving ``dim`` last."""
    half = spec.shape[dim]
    _, itw = _twist(2 * half, str(spec.device))
    shape = [1] * spec.dim()
    shape[dim] = half
    v = torch.fft.ifft(spec, dim=dim)
    v.mul_(itw.reshape(shape))
    return torch.view_as_real(v)


class FFTPrecisionError(RuntimeError):
    """An FFT result was not close enough to an integer to be rounded exactly (parameters misused)."""


def round_exact(x: torch.Tensor, tolerance: float = 0.25) -> torch.Tensor:
    """Round to int64, asserting every value lies within ``tolerance`` of an integer."""
    r = torch.round(x)
    if x.numel():
        err = float((x - r).abs().max())
        if not err < tolerance:
            raise FFTPrecisionError(f"float64 FFT rounding error {err:.3g} ≥ {tolerance}: result not exact")
    return r.to(torch.int64)


def negacyclic_multiply(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact a·b mod X^N+1 for integer polynomials whose product coefficients stay well below 2^46."""
    return round_exact(inverse(forward(a) * forward(b)))
