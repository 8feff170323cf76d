"""The tolerance check of backends whose replies are not exact (``verification = "tolerance"``: TenSEAL), a
Freivalds-style test made inside the TEE before a product is used. A backend verified exactly (native: the reply
is an exact function of public data, checked by ``ExactTrustedContext.verify`` with no tolerance) does not use it.

Per session and per delegated weight matrix W (d_out × d_in), ``k`` secret vectors s_1..s_k ~ N(0, I_d_out)
are drawn from the OS CSPRNG and u_j = s_jᵀW is computed once (float64) from the trusted copy of W. A
decoded worker output ŷ (rows × d_out) for the input x (rows × d_in) passes when, for every row r and j,

    range:   |ŷ_rk| ≤ ‖x_r‖₁·max|W| + ε_r           for every output k (the product cannot be larger)
    product: |s_j·ŷ_r − u_j·x̂_r| ≤ τ_r = z·√d_out·ε̂_r + (float64 rounding slack)

where ε_r is the backend's documented worst-case error per output (``TrustedContext.error_bound``). The
product check is made against the operands *as encoded* (x̂ = ``effective_input``, u_j = s_jᵀŴ with
Ŵ = ``quantized_weights(W)`` of the backend: the native backend's rounded activations and quantised weights, known exactly
here), so its tolerance ε̂ (``error_bound(effective=True)``) holds only the encryption noise (and TenSEAL's rescale).

Why these numbers. Honest error e = ŷ_r − x̂_rŴᵀ has ‖e‖₂ ≤ √d_out·ε̂_r, and s_j·e ~ N(0, ‖e‖₂²) for a
secret Gaussian s_j drawn independently of e, so an honest product fails a vector with probability
≤ erfc(z/√2): 1.2e-15 at the default z = 8. A deviation Δ (anything but the product: another input, a
replay, other weights, a scaled or shifted output) passes one vector with probability at most
P(|N(0, ‖Δ‖₂²)| ≤ τ) ≤ √(2/π)·τ/‖Δ‖₂, and all k independent vectors with at most (0.80·τ/‖Δ‖₂)^k. With
the default k = 8: a deviation of norm 2τ escapes with probability ≤ 6.5e-4, 4τ with ≤ 2.6e-6,
10τ with ≤ 1.7e-8, and one of 10⁴·τ (an inflated scale) with ≤ 1.7e-33; the first miss quarantines the
worker for good (:class:`~bifrost.tee.pool.WorkerQuarantine`), so an attacker gets one such draw per identity. k = 8 keeps the
per-session cost small: k·(d_in + d_out) multiply-adds per row and member per call, plus k·d_in·d_out
once per session to form u (a few plaintext decode steps' worth of work).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from ..ckks.backend import WeightStats
from ..ckks.csprng import standard_normal
from ..config import VerificationConfig

_U53 = 2.0 ** -53


def false_positive_bound(cfg: VerificationConfig) -> float:
    """Probability that one honest row of one member fails (any of the k vectors)."""
    return min(1.0, cfg.vectors * math.erfc(cfg.z / math.sqrt(2)))


def miss_probability(cfg: VerificationConfig, norm_over_tau: float) -> float:
    """Upper bound on a deviation of ℓ2 norm ``norm_over_tau``·τ escaping all k vectors."""
    return min(1.0, math.sqrt(2 / math.pi) / max(norm_over_tau, 1e-300)) ** cfg.vectors


@dataclass(frozen=True)
class CheckResult:
    ok: bool
    reason: str          # "" | "range" | "product" | "not finite"
    worst: float         # max |s·ŷ − u·x| / τ over rows, members and vectors (≤ 1 passes)
    comparisons: int     # rows × members × vectors compared


@dataclass(frozen=True)
class CheckOperand:
    """What the product check needs of one weight matrix W, shared by every session of a replica: ``stats`` of
    W itself (range check, error bounds) and the matrix the product is checked against, W' = m / c exactly
    (the backend's ``quantized_weights``: the native backend's integers and Δw; TenSEAL's W and 1), with
    ``col_abs`` = Σ_k |W'_ki| per input column."""

    stats: WeightStats
    m: np.ndarray | None
    c: float
    col_abs: np.ndarray | None

    @classmethod
    def stats_only(cls, w: np.ndarray) -> "CheckOperand":
        """For a backend verified exactly: W's statistics only (decryption needs them; no check matrix)."""
        return cls(WeightStats.of(w), None, 1.0, None)

    @classmethod
    def of(cls, w: np.ndarray, quantize=None) -> "CheckOperand":
        """``quantize``: the backend's ``w -> (m, c)`` (None: W itself)."""
        w64 = np.asarray(w, dtype=np.float64)  # transient where w is not float64: the stats reference w itself
        m, c = quantize(w64) if quantize is not None else (w64, 1.0)
        return cls(WeightStats.of(w), m, float(c), np.abs(m).sum(axis=0, dtype=np.float64) / c)


class _Member:
    """One session's check vectors for one weight matrix: S [k, d_out], U = S·W' [k, d_in], and U_abs ≥ |S|·|W'|
    (max_k |s_jk| · Σ_k |W'_ki|: bounds the float64 rounding of U without a second product)."""

    def __init__(self, op: CheckOperand, k: int) -> None:
        if op.m is None or op.col_abs is None:
            raise ValueError("a stats-only operand (a backend verified exactly) has no matrix to check against")
        self.d_out, self.d_in = op.m.shape
        self.stats = op.stats
        self.S = standard_normal((k, self.d_out))
        self.U = (self.S @ op.m.astype(np.float64)) / op.c
        self.S_abs = np.abs(self.S)
        self.U_abs = np.outer(self.S_abs.max(axis=1), op.col_abs)


class ProductVerifier:
    """One session's check vectors for every delegated group (members in group order)."""

    def __init__(self, groups: Mapping[tuple[str, ...], Sequence], cfg: VerificationConfig | None = None):
        """``groups``: per group, one :class:`CheckOperand` per member (or a weight matrix: checked as it is)."""
        cfg = cfg or VerificationConfig()
        self.cfg = cfg
        self._members = {g: [_Member(op if isinstance(op, CheckOperand) else CheckOperand.of(op), cfg.vectors)
                             for op in ops] for g, ops in groups.items()}

    def weight_stats(self, group: tuple[str, ...]) -> list[WeightStats]:
        return [m.stats for m in self._members[group]]

    def check(self, group: tuple[str, ...], x: np.ndarray, ys: Sequence[np.ndarray], bounds: np.ndarray,
              x_check: np.ndarray | None = None, check_bounds: np.ndarray | None = None) -> CheckResult:
        """``x`` (rows × d_in) the input, ``ys`` the decoded outputs per member, ``bounds`` (rows × members) the
        backend's error bound ε (range check); ``x_check`` / ``check_bounds``: the operand and the bound of the
        product check when it is made against the encoded operands (default: ``x``, ``bounds``). Pure
        arithmetic on trusted data: no early exit."""
        members = self._members[group]
        x = np.asarray(x, dtype=np.float64)
        x_l1 = np.abs(x).sum(axis=1)
        x = x if x_check is None else np.asarray(x_check, dtype=np.float64)
        check_bounds = bounds if check_bounds is None else check_bounds
        x_abs = np.abs(x)
        worst, reason, comparisons = 0.0, "", 0
        for m, (mem, y) in enumerate(zip(members, ys)):
            y = np.asarray(y, dtype=np.float64)
            eps = bounds[:, m]
            if not np.isfinite(y).all():
                reason, worst = reason or "not finite", math.inf
                continue
            limit = x_l1 * mem.stats.peak + eps
            if (np.abs(y) > limit[:, None] * (1 + 1e-12)).any():
                reason, worst = reason or "range", math.inf
            residual = np.abs(y @ mem.S.T - x @ mem.U.T)                              # [rows, k]
            gamma = (max(mem.d_in, mem.d_out) + 2) * _U53
            slack = 4 * gamma * (np.abs(y) @ mem.S_abs.T + x_abs @ mem.U_abs.T)       # float64 rounding
            tau = self.cfg.z * math.sqrt(mem.d_out) * check_bounds[:, m][:, None] + slack
            with np.errstate(divide="ignore", invalid="ignore"):
                ratio = np.where(residual > tau, np.where(tau > 0, residual / tau, math.inf),
                                 np.where(tau > 0, residual / tau, 0.0))
            comparisons += ratio.size
            peak = float(ratio.max()) if ratio.size else 0.0
            if peak > 1.0:
                reason = reason or "product"
            worst = max(worst, peak)
        return CheckResult(not reason, reason, worst, comparisons)
