"""Evidence, verdicts and the verifier registry (keyed by evidence type).

``Evidence.endorsements`` carries the files a verifier needs besides the evidence itself, by name:
SEV-SNP ``"vcek"`` / ``"vlek"`` (DER or PEM leaf) and optional ``"cert_chain"`` (PEM, ASK/ASVK then
ARK); TDX ``"collateral"`` (dcap-qvl QuoteCollateralV3 JSON). Nothing is fetched over the network.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Callable, Mapping, Protocol

from .errors import UnsupportedEvidenceError
from .options import DEFAULT_OPTIONS, VerifyOptions
from .policy import AttestationPolicy

EVIDENCE_TYPES = ("sev-snp", "tdx", "simulated")


@dataclass(frozen=True)
class Evidence:
    """Raw attestation evidence of one type plus its endorsements (bytes, by name)."""

    evidence_type: str
    raw: bytes
    endorsements: Mapping[str, bytes] = field(default_factory=dict)


@dataclass(frozen=True)
class Verdict:
    """Result of a *successful* verification. Failures raise an :class:`AttestationError` instead.

    Invariants: ``report_data`` is 64 bytes; ``measurement`` is the launch measurement (SNP
    MEASUREMENT or TDX MRTD, 48 bytes; simulated: 48 bytes); ``simulated`` is True only for
    simulated evidence, and then ``summary`` says so.
    """

    evidence_type: str
    measurement: bytes
    report_data: bytes
    debug: bool
    tcb_status: str
    tcb: Mapping[str, str]
    fields: Mapping[str, str]
    verified_at: datetime
    checks_passed: tuple[str, ...]
    checks_skipped: tuple[str, ...] = ()
    advisory_ids: tuple[str, ...] = ()
    simulated: bool = False

    @property
    def summary(self) -> str:
        prefix = "SIMULATED EVIDENCE (not a TEE; accepted only because the policy allows it): " if self.simulated else ""
        return f"{prefix}{self.evidence_type} evidence verified, TCB {self.tcb_status}"


class Verifier(Protocol):
    """Verifies one evidence type. A verifier is made from a :class:`~.options.VerifyOptions` (its
    clock and trust roots); ``at`` is the verification time, by default the options' clock."""

    evidence_type: str

    def verify(
        self,
        evidence: Evidence,
        policy: AttestationPolicy,
        *,
        at: datetime | None = None,
        expected_report_data: bytes | None = None,
    ) -> Verdict: ...


_VERIFIERS: dict[str, Callable[[VerifyOptions], Verifier]] = {}


def register_verifier(evidence_type: str, factory: Callable[[VerifyOptions], Verifier]) -> None:
    _VERIFIERS[evidence_type] = factory


def get_verifier(evidence_type: str, options: VerifyOptions | None = None) -> Verifier:
    _load_builtin_verifiers()
    factory = _VERIFIERS.get(evidence_type)
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


def _load_builtin_verifiers() -> None:
    from . import evidence, snp, tdx  # noqa: F401  (modules register themselves on import)
