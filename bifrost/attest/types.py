"""Evidence, verdicts and the verifier protocol: the types every verifier shares.

This module imports no verifier; the table of verifiers (evidence type -> verifier class) and
:func:`~.verdict.verify_evidence` are in :mod:`.verdict`, which imports the verifiers.

``Evidence.endorsements`` carries the files a verifier needs besides the evidence itself, by name:
SEV-SNP ``"vcek"`` / ``"vlek"`` (DER or PEM leaf) and optional ``"cert_chain"`` (PEM, ASK/ASVK then
ARK); TDX ``"collateral"`` (dcap-qvl QuoteCollateralV3 JSON). Nothing is fetched over the network.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Mapping, Protocol

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
