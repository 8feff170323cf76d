"""AMD SEV-SNP policy validation of an authenticated report.

``chip_id``: CHIP_ID equals the VCEK hwID (:func:`.verify.check_chip_id_matches_hwid`); a VLEK has
no per-chip binding (skipped); an all-zero CHIP_ID (firmware MASK_CHIP_ID) cannot be bound and is
refused unless the policy sets ``snp.allow_masked_chip_id``. ``vmpl``: in the policy's allowed
VMPLs. ``min_tcb``: REPORTED_TCB at least ``snp.min_tcb`` component by component. Debug, the
measurement and host-data allow-lists and ``report_data`` use the shared :mod:`..checks`.
"""

from __future__ import annotations

from ..checks import CheckLog, tcb_shortfalls
from ..errors import PolicyViolationError, TcbError
from ..policy import AttestationPolicy
from .parse import SnpReport, leaf_hwid
from .verify import Signer, check_chip_id_matches_hwid


def check_chip_id(report: SnpReport, signer: Signer, policy: AttestationPolicy, log: CheckLog) -> None:
    """``chip_id``: the VCEK is this chip's, unless the signer is a VLEK or the policy accepts a
    masked (all-zero) CHIP_ID; both are logged as skipped."""
    if signer.kind == "VLEK":
        log.skip("chip_id", "VLEK: no per-chip binding")
        return
    if report.chip_id_masked:
        if not policy.snp.allow_masked_chip_id:
            raise PolicyViolationError(
                "chip_id", "CHIP_ID is all zero (firmware MASK_CHIP_ID): the VCEK hwID cannot be checked; "
                "set snp.allow_masked_chip_id to accept such reports"
            )
        log.skip("chip_id", "MASK_CHIP_ID: CHIP_ID is zero; allowed by policy")
        return
    check_chip_id_matches_hwid(report, leaf_hwid(signer.leaf), signer.product)
    log.ok("chip_id")


def check_vmpl(report: SnpReport, policy: AttestationPolicy, log: CheckLog) -> None:
    """``vmpl``: the report came from an allowed VM privilege level."""
    if report.vmpl not in policy.snp.allowed_vmpls:
        raise PolicyViolationError("vmpl", f"VMPL {report.vmpl} not in allowed {list(policy.snp.allowed_vmpls)}")
    log.ok("vmpl")


def check_min_tcb(report: SnpReport, policy: AttestationPolicy, log: CheckLog) -> None:
    """``min_tcb``: REPORTED_TCB is at least the policy's pinned minimum (skipped when not pinned)."""
    if not policy.snp.min_tcb:
        log.skip("min_tcb", "not pinned")
        return
    low = tcb_shortfalls(report.reported_tcb.components(), policy.snp.min_tcb)
    if low:
        raise TcbError("min_tcb", "REPORTED_TCB below policy minimum: " + ", ".join(low))
    log.ok("min_tcb")
