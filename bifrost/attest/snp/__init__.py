"""AMD SEV-SNP: parse the 0x4A0-byte ATTESTATION_REPORT and verify it offline.

Laid out by concern: :mod:`.parse` (report, certificate table, VCEK extensions), :mod:`.verify`
(endorsement key, AMD chain, report signature, REPORTED_TCB), :mod:`.validate` (policy). The
:class:`SnpVerifier` runs the checks in this order; the first failure raises, ``check`` names it:

 1. ``report_format``: length 0x4A0, version 2..5, signature algorithm 1 (ECDSA P-384 / SHA-384).
 2. ``signing_key``: signer_info says VCEK (0) or VLEK (1); the supplied leaf is of that kind.
 3. ``cert_chain``: leaf <- ASK (VCEK) or ASVK (VLEK) <- ARK, RSA-PSS signatures, issuers are CAs
    (basicConstraints, path length, keyCertSign), every certificate valid at the verification time
    (``cert_validity``), ARK self-signed and its key one of the trusted pins (default: the bundled
    AMD roots, :mod:`bifrost.attest.roots`; ``root_not_trusted``). Unparsable certificates: ``cert_parse``.
 4. ``report_signature``: ECDSA-P384 over bytes [0, 0x2A0) with the leaf key.
 5. ``reported_tcb``: REPORTED_TCB equals the TCB the leaf was issued for (its SPL extensions).
 6. ``chip_id``: CHIP_ID equals the VCEK hwID (Turin: the 8-byte hwID equals CHIP_ID[0:8]). An
    all-zero CHIP_ID (firmware MASK_CHIP_ID) has no chip binding and is refused unless the policy
    sets ``snp.allow_masked_chip_id``. SIGNER_INFO.MASK_CHIP_KEY with a VCEK signer is refused.
 7. Policy: ``debug`` (guest policy bit 19), ``vmpl``, ``measurement``, ``host_data``, ``min_tcb``,
    ``report_data`` (exact match with the expected binding).
"""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime
from typing import Mapping

from ..checks import CheckLog, check_allow_list, check_debug, check_report_data
from ..options import DEFAULT_OPTIONS, VerifyOptions
from ..policy import AttestationPolicy
from ..types import Evidence, Verdict
from . import validate, verify
from .parse import SNP_REPORT_SIZE, SnpReport, SnpTcbVersion, parse_cert_table, parse_snp_report
from .verify import Signer, bundled_ark_pins, check_tcb_matches_leaf

__all__ = [
    "SNP_REPORT_SIZE",
    "SnpReport",
    "SnpTcbVersion",
    "SnpVerifier",
    "bundled_ark_pins",
    "check_tcb_matches_leaf",
    "parse_cert_table",
    "parse_snp_report",
]


class SnpVerifier:
    """Verifier for evidence type ``sev-snp`` (see the package docstring for the checks).

    ``options`` carries the clock and the trust roots (default: system clock, bundled AMD roots).
    ``trusted_arks`` (SHA-256 of each trusted ARK SubjectPublicKeyInfo -> label) replaces the
    options' ARK pins; only tests with self-made chains pass it.
    """

    evidence_type = "sev-snp"

    def __init__(self, options: VerifyOptions | None = None, *, trusted_arks: Mapping[bytes, str] | None = None) -> None:
        options = options or DEFAULT_OPTIONS
        self.options = options if trusted_arks is None else replace(options, amd_ark_pins=dict(trusted_arks))

    def verify(
        self,
        evidence: Evidence,
        policy: AttestationPolicy,
        *,
        at: datetime | None = None,
        expected_report_data: bytes | None = None,
    ) -> Verdict:
        at = self.options.time(at)
        log = CheckLog()
        report = parse_snp_report(evidence.raw)
        log.ok("report_format")
        signer = verify.check_signing_key(report, evidence, log)
        verify.check_cert_chain(signer, evidence, at, self.options, log)
        verify.check_report_signature(report, signer, log)
        verify.check_reported_tcb(report, signer, log)
        validate.check_chip_id(report, signer, policy, log)
        check_debug(report.debug, policy.allow_debug, "guest policy has DEBUG set; the policy refuses debug guests", log)
        validate.check_vmpl(report, policy, log)
        check_allow_list("measurement", report.measurement, policy.snp.measurements, log)
        check_allow_list("host_data", report.host_data, policy.snp.host_data, log)
        validate.check_min_tcb(report, policy, log)
        check_report_data(report.report_data, expected_report_data, log)
        return _verdict(report, signer, at, log)


def _verdict(report: SnpReport, signer: Signer, at: datetime, log: CheckLog) -> Verdict:
    return Verdict(
        evidence_type="sev-snp",
        measurement=report.measurement,
        report_data=report.report_data,
        debug=report.debug,
        tcb_status=f"REPORTED_TCB matches {signer.kind} (TCB currency not assessed; pin snp.min_tcb)",
        tcb={
            "reported": str(report.reported_tcb),
            "current": str(report.current_tcb),
            "committed": str(report.committed_tcb),
            "launch": str(report.launch_tcb),
        },
        fields={
            "version": str(report.version),
            "signer": signer.kind,
            "product": signer.product or "unknown",
            "vmpl": str(report.vmpl),
            "guest_policy": f"{report.policy:#018x}",
            "guest_svn": str(report.guest_svn),
            "host_data": report.host_data.hex(),
            "chip_id": report.chip_id.hex(),
            "firmware": "{}.{}.{}".format(*report.current_version),
        },
        verified_at=at,
        checks_passed=tuple(log.passed),
        checks_skipped=tuple(log.skipped),
    )
