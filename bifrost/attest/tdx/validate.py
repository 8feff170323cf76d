"""Intel TDX policy validation of an authenticated quote.

``tcb_status``: the merged TCB status (:func:`.verify.merge_tcb_status`) is one the policy allows.
``rtmr0``..``rtmr3``: each RTMR in its allow-list. Debug (TD_ATTRIBUTES.DEBUG), the MRTD allow-list
and ``report_data`` use the shared :mod:`..checks`.
"""

from __future__ import annotations

from ..checks import CheckLog, check_allow_list
from ..errors import TcbError
from ..policy import AttestationPolicy
from .parse import TdReportBody
from .verify import TcbLevel


def check_tcb_status(tcb: TcbLevel, policy: AttestationPolicy, log: CheckLog) -> None:
    """``tcb_status``: the merged TCB status is in ``tdx.allowed_tcb_statuses``."""
    if tcb.status not in policy.tdx.allowed_tcb_statuses:
        raise TcbError(
            "tcb_status", f"TCB status {tcb.status} not in allowed {list(policy.tdx.allowed_tcb_statuses)}"
            + (f" (advisories {', '.join(tcb.advisories)})" if tcb.advisories else "")
        )
    log.ok("tcb_status")


def check_rtmrs(body: TdReportBody, policy: AttestationPolicy, log: CheckLog) -> None:
    """``rtmr0``..``rtmr3``: each runtime measurement register in its allow-list (skipped if unpinned)."""
    for i in range(4):
        check_allow_list(f"rtmr{i}", body.rtmrs[i], policy.tdx.rtmrs[i], log)
