"""Intel TDX: parse DCAP quotes v4 and v5 and verify them offline against collateral files.

Laid out by concern: :mod:`.parse` (quote, collateral JSON, PCK SGX extension), :mod:`.verify`
(PCK chain, QE report and quote signatures, collateral, revocation, TCB levels), :mod:`.validate`
(policy). The :class:`TdxVerifier` runs the checks in this order; the first failure raises,
``check`` names it:

 1. ``quote_format``: header, TD report body, signature section, QE report certification data
    wrapping a PEM PCK chain (:mod:`.parse`).
 2. ``pck_chain``: PCK leaf <- PCK Platform/Processor CA <- Intel SGX Root CA (the trusted root
    of :class:`~..options.VerifyOptions`, default the bundled one: :mod:`..roots`).
 3. ``qe_report_signature``: QE report signed by the PCK key (ECDSA P-256, SHA-256).
 4. ``qe_report_binding``: QE REPORTDATA[0:32] = SHA-256(attestation key || QE auth data), rest zero.
 5. ``quote_signature``: header||body signed by the attestation key.
 6. ``collateral`` (``CollateralError``): TCB info and QE identity signatures and issuer chains to
    the Intel root, their issueDate..nextUpdate window, the PCK CRL issuer chain, Root CA CRL and
    PCK CRL signatures and windows; malformed JSON, strings or CRLs are ``collateral_format`` /
    ``crl``. Revocation (:func:`check_revocation`, ``CertificateChainError`` ``revoked``).
    ``fmspc``: FMSPC/PCE-ID match.
 7. TCB (``TcbError``): ``qe_identity``, ``tcb_level`` (``no_matching_tcb_level``), ``tdx_module``;
    ``tcb_status``: the merged status must be in the policy's allowed list.
 8. Policy: ``debug`` (TD_ATTRIBUTES.DEBUG), ``mrtd``, ``rtmr0``..``rtmr3``, ``report_data``.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Mapping

from ..checks import CheckLog, check_allow_list, check_debug, check_report_data
from ..options import DEFAULT_OPTIONS, VerifyOptions
from ..policy import AttestationPolicy
from ..types import Evidence, Verdict
from . import validate, verify
from .parse import TEE_TYPE_TDX, TdxCollateral, TdxQuote, load_tdx_collateral, parse_pck_extension, parse_tdx_quote
from .verify import TcbLevel, check_revocation

__all__ = [
    "TEE_TYPE_TDX",
    "TdxCollateral",
    "TdxQuote",
    "TdxVerifier",
    "check_revocation",
    "load_tdx_collateral",
    "parse_tdx_quote",
]


class TdxVerifier:
    """Verifier for evidence type ``tdx`` (see the package docstring for the checks).

    ``options`` carries the clock and the Intel SGX Root CA (default: system clock, bundled root).
    """

    evidence_type = "tdx"

    def __init__(self, options: VerifyOptions | None = None) -> None:
        self.options = options or DEFAULT_OPTIONS

    def verify(
        self,
        evidence: Evidence,
        policy: AttestationPolicy,
        *,
        at: datetime | None = None,
        expected_report_data: bytes | None = None,
    ) -> Verdict:
        at = self.options.time(at)
        root = verify.intel_root(self.options.intel_root_pem)
        log = CheckLog()
        quote = parse_tdx_quote(evidence.raw)
        log.ok("quote_format")
        collateral = verify.require_collateral(evidence)
        pck_chain = verify.check_pck_chain(quote, root, at, log)
        verify.check_qe_report_signature(quote, pck_chain[0], log)
        verify.check_qe_report_binding(quote, log)
        verify.check_quote_signature(quote, log)
        pck = parse_pck_extension(pck_chain[0])
        tcb_info, qe_identity = verify.check_collateral(collateral, pck_chain, root, at, log)
        verify.check_fmspc(tcb_info, pck, log)
        qe = verify.check_qe_identity(quote.qe_report, qe_identity, log)
        platform = verify.check_tcb_level(quote.body, pck, tcb_info, log)
        module = verify.check_tdx_module(quote.body, tcb_info, log)
        tcb = verify.merge_tcb_status(platform, qe, module)
        validate.check_tcb_status(tcb, policy, log)
        check_debug(quote.body.debug, policy.allow_debug, "TD_ATTRIBUTES.DEBUG is set; the policy refuses debug TDs", log)
        check_allow_list("mrtd", quote.body.mr_td, policy.tdx.mrtd, log)
        validate.check_rtmrs(quote.body, policy, log)
        check_report_data(quote.body.report_data, expected_report_data, log)
        return _verdict(quote, pck, tcb, platform, qe, module, at, log)


def _verdict(
    quote: TdxQuote, pck: Mapping[str, Any], tcb: TcbLevel, platform: TcbLevel, qe: TcbLevel, module: TcbLevel,
    at: datetime, log: CheckLog,
) -> Verdict:
    body = quote.body
    return Verdict(
        evidence_type="tdx",
        measurement=body.mr_td,
        report_data=body.report_data,
        debug=body.debug,
        tcb_status=tcb.status,
        tcb={
            "tee_tcb_svn": body.tee_tcb_svn.hex(),
            "pck_sgx_svns": ",".join(str(v) for v in pck["sgx_svns"]),
            "pck_pcesvn": str(pck["pcesvn"]),
            "platform": platform.status,
            "qe": qe.status,
            "tdx_module": module.status,
        },
        fields={
            "quote_version": str(quote.version),
            "body": "TDX 1.5" if quote.body_type == 3 else "TDX 1.0",
            "fmspc": pck["fmspc"].hex(),
            "td_attributes": body.td_attributes.hex(),
            "xfam": body.xfam.hex(),
            "mr_seam": body.mr_seam.hex(),
            "mr_config_id": body.mr_config_id.hex(),
            **{f"rtmr{i}": body.rtmrs[i].hex() for i in range(4)},
        },
        verified_at=at,
        checks_passed=tuple(log.passed),
        checks_skipped=tuple(log.skipped),
        advisory_ids=tcb.advisories,
    )
