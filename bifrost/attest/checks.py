"""Validation helpers shared by the SEV-SNP, TDX and simulated verifiers.

:class:`CheckLog` collects the names of the checks a verification passed and skipped (they become
``Verdict.checks_passed`` / ``checks_skipped``). The helpers below raise a typed
:class:`~.errors.AttestationError` whose ``check`` names the failed check, or return quietly.
"""

from __future__ import annotations

import hmac
from datetime import datetime
from typing import Mapping, Sequence

from .errors import AttestationError, BindingError, CollateralError, PolicyViolationError

REPORT_DATA_SIZE = 64


class CheckLog:
    """The checks passed and skipped so far, in order. A skipped check is logged as ``"name (why)"``."""

    def __init__(self) -> None:
        self.passed: list[str] = []
        self.skipped: list[str] = []

    def ok(self, *names: str) -> None:
        self.passed.extend(names)

    def skip(self, name: str, why: str) -> None:
        self.skipped.append(f"{name} ({why})")


def check_debug(debug: bool, policy_allows: bool, detail: str, log: CheckLog) -> None:
    """``debug``: evidence of a debuggable guest is refused unless the policy allows debug."""
    if debug and not policy_allows:
        raise PolicyViolationError("debug", detail)
    log.ok("debug")


def check_allow_list(name: str, value: bytes, allowed: Sequence[bytes], log: CheckLog) -> None:
    """``name``: ``value`` is in the policy allow-list; an empty list is "not pinned" (skipped)."""
    if not allowed:
        log.skip(name, "not pinned")
        return
    if value not in allowed:
        raise PolicyViolationError(name, f"{name} {value.hex()} is not in the policy allow-list")
    log.ok(name)


def check_report_data(actual: bytes, expected: bytes | None, log: CheckLog) -> None:
    """``report_data``: equal (constant time) to the expected 64-byte binding, when one is given."""
    if expected is None:
        log.skip("report_data", "no expected binding given")
        return
    if len(expected) != REPORT_DATA_SIZE or not hmac.compare_digest(actual, expected):
        raise BindingError("report_data", "report_data does not equal the expected binding")
    log.ok("report_data")


def masked_equal(actual: bytes, expected: bytes, mask: bytes) -> bool:
    """``actual & mask == expected & mask``, byte by byte. ValueError when the lengths differ."""
    if len(expected) != len(actual) or len(mask) != len(actual):
        raise ValueError("expected value and mask must be as long as the value")
    return all((x & m) == (y & m) for x, y, m in zip(actual, expected, mask))


def tcb_shortfalls(have: Mapping[str, int], minimum: Mapping[str, int]) -> list[str]:
    """The TCB components of ``have`` below ``minimum``, as ``"name have < min"`` (a component
    missing from ``have`` is below every minimum)."""
    return [f"{k} {have.get(k)} < {v}" for k, v in minimum.items() if have.get(k, -1) < v]


def svns_at_least(have: Sequence[int], need: Sequence[int]) -> bool:
    """Every SVN in ``have`` is at least its counterpart in ``need`` (pairwise)."""
    return all(h >= n for h, n in zip(have, need))


def check_window(
    start: datetime, end: datetime, at: datetime, what: str, check: str, error: type[AttestationError] = CollateralError
) -> None:
    """``check``: ``start <= at <= end`` (a signed object's issue..next-update window)."""
    if not start <= at <= end:
        raise error(check, f"{what} valid {start:%Y-%m-%d}..{end:%Y-%m-%d}; verification time {at:%Y-%m-%d} is outside")
