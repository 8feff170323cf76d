"""The verifier table (evidence type -> verifier) and :func:`verify_evidence`.

The table is one literal dict, :data:`VERIFIERS`; verifiers do not register themselves. The types
(:class:`Evidence`, :class:`Verdict`, the :class:`Verifier` protocol) are defined in :mod:`.types`
and re-exported here.
"""

from __future__ import annotations

from datetime import datetime
from typing import Callable, Mapping

from .errors import UnsupportedEvidenceError
from .evidence import SimulatedVerifier
from .options import DEFAULT_OPTIONS, VerifyOptions
from .policy import AttestationPolicy
from .snp import SnpVerifier
from .tdx import TdxVerifier
from .types import EVIDENCE_TYPES, Evidence, Verdict, Verifier

__all__ = ["EVIDENCE_TYPES", "VERIFIERS", "Evidence", "Verdict", "Verifier", "get_verifier", "verify_evidence"]

# Every verifier, by evidence type (a verifier class is made from a VerifyOptions).
VERIFIERS: Mapping[str, Callable[[VerifyOptions], Verifier]] = {
    "sev-snp": SnpVerifier,
    "tdx": TdxVerifier,
    "simulated": SimulatedVerifier,
}
assert tuple(VERIFIERS) == EVIDENCE_TYPES


def get_verifier(evidence_type: str, options: VerifyOptions | None = None) -> Verifier:
    factory = VERIFIERS.get(evidence_type)
    if factory is None:
        raise UnsupportedEvidenceError("evidence_type", f"no verifier for {evidence_type!r}")
    return factory(options or DEFAULT_OPTIONS)


def verify_evidence(
    evidence: Evidence,
    policy: AttestationPolicy,
    *,
    at: datetime | None = None,
    expected_report_data: bytes | None = None,
    options: VerifyOptions | None = None,
) -> Verdict:
    """Dispatch to the verifier for ``evidence.evidence_type``, made with ``options`` (default: the
    system clock and the bundled trust roots). ``at`` defaults to ``options.now()``; a naive ``at``
    is taken as UTC."""
    options = options or DEFAULT_OPTIONS
    return get_verifier(evidence.evidence_type, options).verify(
        evidence, policy, at=options.time(at), expected_report_data=expected_report_data
    )
