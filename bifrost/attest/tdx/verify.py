"""Intel TDX verification: the PCK chain, the QE report and quote signatures, the collateral (its
signatures, issuer chains, windows, CRLs and revocation) and the TCB levels it assigns.

``pck_chain``: PCK leaf <- PCK Platform/Processor CA <- Intel SGX Root CA; signatures, issuers are
CAs (basicConstraints, path length, keyCertSign), validity at the verification time; the root must
be the trusted Intel SGX Root CA (:class:`~..options.VerifyOptions`, default :mod:`..roots`). The
chain is not signed by anything in the quote, so every malformed certificate must end as a typed
error (:mod:`.._x509`). ``qe_report_signature``: QE report signed by the PCK key (ECDSA P-256,
SHA-256). ``qe_report_binding``: QE REPORTDATA[0:32] = SHA-256(attestation key || QE auth data),
rest zero. ``quote_signature``: header||body signed by the attestation key.

``collateral`` (``CollateralError``): TCB info and QE identity signatures and issuer chains to the
Intel root, their issueDate..nextUpdate window, the PCK CRL issuer chain (to the Intel root, naming
the quote's PCK CA), Root CA CRL and PCK CRL signatures and windows; revocation
(:func:`check_revocation`, ``CertificateChainError`` ``revoked``): PCK leaf in the PCK CRL,
intermediates (PCK CA, collateral signing chains) in the Root CA CRL. ``fmspc``: FMSPC/PCE-ID match.

TCB (``TcbError``): ``qe_identity`` (MRSIGNER, ISVPRODID, masked MISCSELECT/ATTRIBUTES, QE TCB
level); ``tcb_level`` (platform: SGX components + PCESVN from the PCK certificate, TDX components
from TEE_TCB_SVN); ``tdx_module`` (TDX module identity). :func:`merge_tcb_status` gives the status
the policy then judges (:mod:`.validate`).
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Mapping, Sequence

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, utils as asym_utils

from .._x509 import X509_ERRORS, ErrorType, load_certificate, load_crl, load_pem_chain, name_of, spki_sha256, verify_chain
from ..checks import CheckLog, check_window, masked_equal, svns_at_least
from ..errors import CertificateChainError, CollateralError, SignatureError, TcbError
from ..policy import TDX_TCB_STATUSES
from ..types import Evidence
from .parse import (QeReport, TdReportBody, TdxCollateral, TdxQuote, component_svns, hex_field, level_status,
                    load_tdx_collateral, parse_timestamp)


@dataclass(frozen=True)
class TcbLevel:
    """A matched TCB level: its ``status`` and ``advisories`` (Intel advisory IDs)."""

    status: str
    advisories: tuple[str, ...] = ()


@functools.lru_cache(maxsize=4)
def intel_root(pem: str) -> x509.Certificate:
    """The Intel SGX Root CA from its PEM (parsed once per process)."""
    return load_certificate(pem.encode(), "bundled Intel SGX Root CA")


def _verify_raw_ecdsa(public_key: Any, signature: bytes, data: bytes) -> bool:
    if not isinstance(public_key, ec.EllipticCurvePublicKey) or len(signature) != 64:
        return False
    der = asym_utils.encode_dss_signature(int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big"))
    try:
        public_key.verify(der, data, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        return False
    return True


def verify_chain_to_root(
    pem: bytes, root: x509.Certificate, at: datetime, what: str, error: ErrorType, check: str
) -> list[x509.Certificate]:
    """Verify leaf <- ... <- ``root`` (:func:`.._x509.verify_chain`); return the chain (leaf first,
    root last). Every failure raises ``error(check, ...)``."""
    certs = load_pem_chain(pem, what, error, check)
    if len(certs) < 2:
        raise error(check, f"{what} needs at least leaf and root, got {len(certs)} certificate(s)")
    if certs[-1] != root:  # byte-identical to the trusted root, not merely the same key
        raise error(check, f"{what} does not end at the Intel SGX Root CA")
    verify_chain(certs, [name_of(c) for c in certs], at, error, check)
    return certs


# --------------------------------------------------------------------------- quote signatures


def require_collateral(evidence: Evidence) -> TdxCollateral:
    """``collateral_missing`` / ``collateral_format``: the ``collateral`` endorsement, parsed."""
    if "collateral" not in evidence.endorsements:
        raise CollateralError("collateral_missing", "TDX verification needs collateral (--collateral FILE)")
    return load_tdx_collateral(evidence.endorsements["collateral"])


def check_pck_chain(quote: TdxQuote, root: x509.Certificate, at: datetime, log: CheckLog) -> list[x509.Certificate]:
    """``pck_chain``: the quote's PCK chain ends at the Intel root; returns it (leaf first)."""
    chain = verify_chain_to_root(quote.pck_chain_pem, root, at, "PCK chain", CertificateChainError, "pck_chain")
    log.ok("pck_chain")
    return chain


def check_qe_report_signature(quote: TdxQuote, pck_leaf: x509.Certificate, log: CheckLog) -> None:
    """``qe_report_signature``: the QE report is signed by the PCK key."""
    if not _verify_raw_ecdsa(pck_leaf.public_key(), quote.qe_report_signature, quote.qe_report.raw):
        raise SignatureError("qe_report_signature", "QE report is not signed by the PCK key")
    log.ok("qe_report_signature")


def check_qe_report_binding(quote: TdxQuote, log: CheckLog) -> None:
    """``qe_report_binding``: the QE report vouches for the attestation key."""
    expected = hashlib.sha256(quote.attestation_key + quote.qe_auth_data).digest() + bytes(32)
    if quote.qe_report.report_data != expected:
        raise SignatureError("qe_report_binding", "QE REPORTDATA != SHA-256(attestation key || QE auth data)")
    log.ok("qe_report_binding")


def check_quote_signature(quote: TdxQuote, log: CheckLog) -> None:
    """``quote_signature``: header || body is signed by the attestation key."""
    try:
        att_key = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), b"\x04" + quote.attestation_key)
    except ValueError:
        raise SignatureError("quote_signature", "attestation key is not a P-256 point") from None
    if not _verify_raw_ecdsa(att_key, quote.signature, quote.signed_bytes):
        raise SignatureError("quote_signature", "quote is not signed by the attestation key")
    log.ok("quote_signature")


# --------------------------------------------------------------------------- collateral


def _check_json_window(obj: Mapping[str, Any], at: datetime, what: str, check: str) -> None:
    issue = parse_timestamp(obj.get("issueDate"), f"{what} issueDate")
    nxt = parse_timestamp(obj.get("nextUpdate"), f"{what} nextUpdate")
    check_window(issue, nxt, at, what, check)


def _verify_signed_json(
    name: str, text: str, signature: bytes, chain_pem: bytes, root: x509.Certificate, at: datetime
) -> tuple[dict[str, Any], list[x509.Certificate]]:
    """A signed collateral object (``tcb_info`` / ``qe_identity``): issuer chain to the root,
    signature over the exact text, JSON object, current at ``at``. Returns (object, issuer chain)."""
    chain = verify_chain_to_root(chain_pem, root, at, f"{name} issuer chain", CollateralError, f"{name}_chain")
    if not _verify_raw_ecdsa(chain[0].public_key(), signature, text.encode("utf-8")):
        raise CollateralError(f"{name}_signature", f"{name} signature does not verify")
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError):
        raise CollateralError("collateral_format", f"{name} is not JSON") from None
    if not isinstance(obj, dict):
        raise CollateralError("collateral_format", f"{name} must be a JSON object")
    _check_json_window(obj, at, name, f"{name}_expired")
    return obj, chain


def check_collateral(
    collateral: TdxCollateral, pck_chain: list[x509.Certificate], root: x509.Certificate, at: datetime, log: CheckLog
) -> tuple[dict[str, Any], dict[str, Any]]:
    """``collateral``: TCB info and QE identity authentic and current, the PCK CRL issued by the
    quote's PCK CA, nothing revoked. Returns (TCB info, QE identity)."""
    tcb_info, tcb_chain = _verify_signed_json(
        "tcb_info", collateral.tcb_info, collateral.tcb_info_signature, collateral.tcb_info_issuer_chain, root, at
    )
    qe_identity, qe_chain = _verify_signed_json(
        "qe_identity", collateral.qe_identity, collateral.qe_identity_signature, collateral.qe_identity_issuer_chain, root, at
    )
    if tcb_info.get("id") != "TDX" or tcb_info.get("version") != 3:
        raise CollateralError("collateral_format", "tcb_info must be TDX TCB info version 3")
    if qe_identity.get("id") != "TD_QE":
        raise CollateralError("collateral_format", "qe_identity must be the TD_QE identity")
    pck_crl_chain = verify_chain_to_root(
        collateral.pck_crl_issuer_chain, root, at, "pck_crl issuer chain", CollateralError, "pck_crl_chain"
    )
    pck_ca = pck_chain[1]
    if pck_crl_chain[0].subject != pck_ca.subject or spki_sha256(pck_crl_chain[0]) != spki_sha256(pck_ca):
        raise CollateralError("pck_crl_chain", f"PCK CRL issuer chain is for {name_of(pck_crl_chain[0])}, not the quote's {name_of(pck_ca)}")
    check_revocation(pck_chain, collateral.pck_crl, collateral.root_ca_crl, at, tcb_chain[:-1] + qe_chain[:-1] + pck_crl_chain[:-1])
    log.ok("collateral")
    return tcb_info, qe_identity


def _check_crl(crl_der: bytes, issuer: x509.Certificate, at: datetime, what: str) -> x509.CertificateRevocationList:
    """Parse a DER CRL, check it is signed by ``issuer`` and current at ``at`` (``CollateralError`` ``crl``)."""
    crl = load_crl(crl_der, what)
    try:
        signed = crl.issuer == issuer.subject and crl.is_signature_valid(issuer.public_key())  # type: ignore[arg-type]
    except X509_ERRORS:
        signed = False
    if not signed:
        raise CollateralError("crl", f"{what} is not signed by {name_of(issuer)}")
    nxt = crl.next_update_utc
    if nxt is None:
        raise CollateralError("crl", f"{what} has no nextUpdate; its freshness cannot be judged")
    check_window(crl.last_update_utc, nxt, at, what, "crl")
    return crl


def check_revocation(
    pck_chain: list[x509.Certificate],
    pck_crl_der: bytes,
    root_crl_der: bytes,
    at: datetime,
    other_intermediates: Sequence[x509.Certificate] = (),
) -> None:
    """Revocation of a verified PCK chain (leaf, PCK CA, ..., root): the PCK CRL must be issued by
    the PCK CA and the Root CA CRL by the root, both current at ``at`` (``CollateralError`` ``crl``);
    the PCK leaf must not be in the PCK CRL, and no intermediate (the PCK CA, and the collateral
    signing chains' ``other_intermediates``) in the Root CA CRL (``CertificateChainError`` ``revoked``)."""
    root, pck_ca, leaf = pck_chain[-1], pck_chain[1], pck_chain[0]
    root_crl = _check_crl(root_crl_der, root, at, "Root CA CRL")
    pck_crl = _check_crl(pck_crl_der, pck_ca, at, "PCK CRL")
    if pck_crl.get_revoked_certificate_by_serial_number(leaf.serial_number) is not None:
        raise CertificateChainError("revoked", f"PCK certificate (serial {leaf.serial_number:#x}) is revoked (PCK CRL)")
    for cert in list(pck_chain[1:-1]) + list(other_intermediates):
        if root_crl.get_revoked_certificate_by_serial_number(cert.serial_number) is not None:
            raise CertificateChainError("revoked", f"{name_of(cert)} is revoked (Root CA CRL)")


def check_fmspc(tcb_info: Mapping[str, Any], pck: Mapping[str, Any], log: CheckLog) -> None:
    """``fmspc``: the TCB info is for this platform (FMSPC and PCE-ID of the PCK certificate)."""
    if hex_field(tcb_info, "fmspc", "tcb_info") != pck["fmspc"]:
        raise CollateralError("fmspc", f"TCB info FMSPC {tcb_info.get('fmspc')} != PCK FMSPC {pck['fmspc'].hex()}")
    if hex_field(tcb_info, "pceId", "tcb_info") != pck["pceid"]:
        raise CollateralError("fmspc", "TCB info PCE-ID does not match the PCK certificate")
    log.ok("fmspc")


# --------------------------------------------------------------------------- TCB levels


def _masked_match(actual: bytes, expected_hex: Any, mask_hex: Any, what: str) -> bool:
    try:
        expected, mask = bytes.fromhex(expected_hex), bytes.fromhex(mask_hex)
    except (TypeError, ValueError):
        raise CollateralError("collateral_format", f"{what} expected value/mask is not hex") from None
    try:
        return masked_equal(actual, expected, mask)
    except ValueError:
        raise CollateralError("collateral_format", f"{what} expected value/mask has the wrong length") from None


def _first_reached(levels: Any, svn: int, what: str) -> TcbLevel | None:
    """The first TCB level whose ``tcb.isvsvn`` is at most ``svn`` (Intel lists levels newest first)."""
    for level in levels:
        try:
            reached = svn >= level["tcb"]["isvsvn"]
        except (KeyError, TypeError):
            raise CollateralError("collateral_format", f"{what} TCB level is malformed") from None
        if reached:
            return TcbLevel(*level_status(level))
    return None


def check_qe_identity(qe: QeReport, identity: Mapping[str, Any], log: CheckLog) -> TcbLevel:
    """``qe_identity``: the QE is Intel's TD QE (MRSIGNER, ISVPRODID, masked MISCSELECT/ATTRIBUTES)
    at a known TCB level (the first level its ISVSVN reaches)."""
    try:
        if hex_field(identity, "mrsigner", "qe_identity") != qe.mr_signer:
            raise TcbError("qe_identity", "QE MRSIGNER does not match the QE identity")
        if identity["isvprodid"] != qe.isv_prod_id:
            raise TcbError("qe_identity", "QE ISVPRODID does not match the QE identity")
    except (KeyError, TypeError, ValueError):
        raise CollateralError("collateral_format", "qe_identity lacks mrsigner/isvprodid") from None
    if not _masked_match(qe.misc_select, identity.get("miscselect"), identity.get("miscselectMask"), "QE MISCSELECT"):
        raise TcbError("qe_identity", "QE MISCSELECT does not match the QE identity")
    if not _masked_match(qe.attributes, identity.get("attributes"), identity.get("attributesMask"), "QE ATTRIBUTES"):
        raise TcbError("qe_identity", "QE ATTRIBUTES do not match the QE identity")
    levels = identity.get("tcbLevels")
    if not isinstance(levels, list):
        raise CollateralError("collateral_format", "qe_identity lacks tcbLevels")
    matched = _first_reached(levels, qe.isv_svn, "qe_identity")
    if matched is None:
        raise TcbError("qe_identity", f"no QE identity TCB level for QE ISVSVN {qe.isv_svn}")
    log.ok("qe_identity")
    return matched


def check_tcb_level(body: TdReportBody, pck: Mapping[str, Any], tcb_info: Mapping[str, Any], log: CheckLog) -> TcbLevel:
    """``tcb_level`` (``no_matching_tcb_level``): the first platform TCB level that the PCK's SGX
    SVNs and PCESVN and the TD's TEE_TCB_SVN all reach."""
    levels = tcb_info.get("tcbLevels")
    if not isinstance(levels, list):
        raise CollateralError("collateral_format", "tcb_info lacks tcbLevels")
    start = 2 if body.tee_tcb_svn[1] > 0 else 0  # module SVN bytes are covered by the module identity
    for level in levels:
        try:
            tcb = level["tcb"]
            sgx, pcesvn, tdx = component_svns(tcb["sgxtcbcomponents"]), tcb["pcesvn"], component_svns(tcb["tdxtcbcomponents"])
        except (KeyError, TypeError):
            raise CollateralError("collateral_format", "tcb_info TCB level is malformed") from None
        if type(pcesvn) is not int:
            raise CollateralError("collateral_format", "tcb_info TCB level pcesvn is not an integer")
        if svns_at_least(pck["sgx_svns"], sgx) and pck["pcesvn"] >= pcesvn and svns_at_least(body.tee_tcb_svn[start:16], tdx[start:16]):
            log.ok("tcb_level")
            return TcbLevel(*level_status(level))
    raise TcbError(
        "no_matching_tcb_level",
        f"no matching TCB level (PCK SGX SVNs {pck['sgx_svns']}, PCESVN {pck['pcesvn']}, TEE_TCB_SVN {body.tee_tcb_svn.hex()})",
    )


def _check_module_identity(body: TdReportBody, identity: Mapping[str, Any], what: str, suffix: str) -> None:
    if hex_field(identity, "mrsigner", what) != body.mr_signer_seam:
        raise TcbError("tdx_module", f"MRSIGNERSEAM does not match {suffix}")
    if not _masked_match(body.seam_attributes, identity.get("attributes"), identity.get("attributesMask"), "SEAM attributes"):
        raise TcbError("tdx_module", f"SEAM attributes do not match {suffix}")


def check_tdx_module(body: TdReportBody, tcb_info: Mapping[str, Any], log: CheckLog) -> TcbLevel:
    """``tdx_module``: the TDX module is Intel's (MRSIGNERSEAM, masked SEAM attributes) and, for
    module major versions > 0, at a TCB level of its ``TDX_<major>`` identity."""
    major = body.tee_tcb_svn[1]
    if major == 0:
        module = tcb_info.get("tdxModule")
        if isinstance(module, dict):
            _check_module_identity(body, module, "tdxModule", "the TDX module identity")
        log.ok("tdx_module")
        return TcbLevel("UpToDate")
    wanted = f"TDX_{major:02X}"
    for identity in tcb_info.get("tdxModuleIdentities") or []:
        if not isinstance(identity, dict) or identity.get("id") != wanted:
            continue
        _check_module_identity(body, identity, wanted, wanted)
        matched = _first_reached(identity.get("tcbLevels") or [], body.tee_tcb_svn[0], "TDX module")
        if matched is None:
            raise TcbError("tdx_module", f"no {wanted} TCB level for module SVN {body.tee_tcb_svn[0]}")
        log.ok("tdx_module")
        return matched
    raise TcbError("tdx_module", f"TCB info has no module identity {wanted}")


def _worse(a: str, b: str) -> str:
    pair = {a, b}
    if "OutOfDate" in pair and pair & {"ConfigurationNeeded", "ConfigurationAndSWHardeningNeeded"}:
        return "OutOfDateConfigurationNeeded"
    rank = {s: i for i, s in enumerate(TDX_TCB_STATUSES)}
    return max(a, b, key=lambda s: rank.get(s, len(rank)))


def merge_tcb_status(platform: TcbLevel, qe: TcbLevel, module: TcbLevel) -> TcbLevel:
    """The overall TCB level: the worst of the three statuses, with every advisory (sorted, once)."""
    status = _worse(_worse(platform.status, qe.status), module.status)
    return TcbLevel(status, tuple(sorted(set(qe.advisories + platform.advisories + module.advisories))))
