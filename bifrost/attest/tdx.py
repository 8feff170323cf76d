"""Intel TDX: parse DCAP quotes v4 and v5 and verify them offline against collateral files.

Checks, in order (the first failure raises; ``check`` names it):
 1. ``quote_format``: header (version 4/5, ECDSA-256-with-P-256 key, TEE type 0x81, Intel QE
    vendor ID), TD report body (v5 body type 2 = TDX 1.0, 3 = TDX 1.5), signature section, QE
    report certification data (type 6) wrapping a PEM PCK chain (type 5). Bytes after the
    signature section (padding some quote generators append) are ignored: nothing there is signed.
 2. ``pck_chain``: PCK leaf <- PCK Platform/Processor CA <- Intel SGX Root CA; signatures, issuers
    are CAs (basicConstraints, path length, keyCertSign), validity at the verification time; the
    root must be the bundled Intel SGX Root CA (:mod:`.roots`). The chain is not signed by anything
    in the quote, so every malformed certificate must end as a typed error (:mod:`._x509`).
 3. ``qe_report_signature``: QE report signed by the PCK key (ECDSA P-256, SHA-256).
 4. ``qe_report_binding``: QE REPORTDATA[0:32] = SHA-256(attestation key || QE auth data), rest zero.
 5. ``quote_signature``: header||body signed by the attestation key.
 6. Collateral (``CollateralError``): TCB info and QE identity signatures and issuer chains to the
    Intel root, their issueDate..nextUpdate window, the PCK CRL issuer chain (to the Intel root,
    naming the quote's PCK CA), Root CA CRL and PCK CRL signatures and windows, FMSPC/PCE-ID match;
    malformed JSON, strings or CRLs are ``collateral_format`` / ``crl``. Revocation
    (:func:`check_revocation`, ``CertificateChainError`` ``revoked``): PCK leaf in the PCK CRL,
    intermediates (PCK CA, collateral signing chains) in the Root CA CRL.
 7. TCB (``TcbError``): QE identity (MRSIGNER, ISVPRODID, masked MISCSELECT/ATTRIBUTES) and QE TCB
    level; platform TCB level (SGX components + PCESVN from the PCK certificate, TDX components
    from TEE_TCB_SVN); TDX module identity; merged status must be in the policy's allowed list.
 8. Policy: ``debug`` (TD_ATTRIBUTES.DEBUG), ``mrtd``, ``rtmr0``..``rtmr3``, ``report_data``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import struct
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Mapping, Sequence

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, utils as asym_utils

from . import _der
from .errors import (
    CertificateChainError,
    CollateralError,
    EvidenceFormatError,
    PolicyViolationError,
    SignatureError,
    TcbError,
    UnsupportedEvidenceError,
)
from .policy import TDX_TCB_STATUSES, AttestationPolicy
from .roots import INTEL_SGX_ROOT_CA_PEM
from ._x509 import (X509_ERRORS, load_certificate, load_crl, load_pem_chain, name_of, opaque_extension, spki_sha256,
                    verify_chain)
from .snp import _allow_list, check_report_data
from .verdict import Evidence, Verdict, register_verifier

HEADER_SIZE = 48
TD10_BODY_SIZE = 584
TD15_BODY_SIZE = 648
QE_REPORT_SIZE = 384
TEE_TYPE_TDX = 0x81
ATT_KEY_ECDSA_P256 = 2
CERT_TYPE_PCK_CHAIN = 5
CERT_TYPE_QE_REPORT = 6
INTEL_QE_VENDOR_ID = bytes.fromhex("939a7233f79c4ca9940a0db3957f0607")
SGX_EXTENSION_OID = "1.2.840.113741.1.13.1"
TD_ATTRIBUTES_DEBUG = 0x01


@dataclass(frozen=True)
class TdReportBody:
    """TD report body (TDX 1.0: 584 bytes; TDX 1.5 adds TEE_TCB_SVN2 and MRSERVICETD: 648 bytes)."""

    tee_tcb_svn: bytes
    mr_seam: bytes
    mr_signer_seam: bytes
    seam_attributes: bytes
    td_attributes: bytes
    xfam: bytes
    mr_td: bytes
    mr_config_id: bytes
    mr_owner: bytes
    mr_owner_config: bytes
    rtmrs: tuple[bytes, bytes, bytes, bytes]
    report_data: bytes
    tee_tcb_svn2: bytes | None = None
    mr_service_td: bytes | None = None

    @property
    def debug(self) -> bool:
        return bool(self.td_attributes[0] & TD_ATTRIBUTES_DEBUG)


@dataclass(frozen=True)
class QeReport:
    """SGX enclave report body of the Quoting Enclave (384 bytes)."""

    cpu_svn: bytes
    misc_select: bytes
    attributes: bytes
    mr_enclave: bytes
    mr_signer: bytes
    isv_prod_id: int
    isv_svn: int
    report_data: bytes
    raw: bytes


@dataclass(frozen=True)
class TdxQuote:
    """A parsed quote. ``signed_bytes`` is what the attestation key signs (header || body)."""

    version: int
    attestation_key_type: int
    tee_type: int
    qe_svn: int
    pce_svn: int
    qe_vendor_id: bytes
    user_data: bytes
    body_type: int
    body: TdReportBody
    signed_bytes: bytes
    signature: bytes
    attestation_key: bytes
    qe_report: QeReport
    qe_report_signature: bytes
    qe_auth_data: bytes
    pck_chain_pem: bytes
    trailing_bytes: int


class _Reader:
    def __init__(self, data: bytes, start: int, end: int) -> None:
        self.data, self.pos, self.end = data, start, end

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or self.pos + n > self.end:
            raise EvidenceFormatError("quote_format", f"quote truncated while reading {what}")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def u16(self, what: str) -> int:
        return struct.unpack("<H", self.take(2, what))[0]

    def u32(self, what: str) -> int:
        return struct.unpack("<I", self.take(4, what))[0]


def _parse_body(raw: bytes, tdx15: bool) -> TdReportBody:
    rt = tuple(raw[328 + 48 * i : 376 + 48 * i] for i in range(4))
    return TdReportBody(
        tee_tcb_svn=raw[0:16],
        mr_seam=raw[16:64],
        mr_signer_seam=raw[64:112],
        seam_attributes=raw[112:120],
        td_attributes=raw[120:128],
        xfam=raw[128:136],
        mr_td=raw[136:184],
        mr_config_id=raw[184:232],
        mr_owner=raw[232:280],
        mr_owner_config=raw[280:328],
        rtmrs=rt,  # type: ignore[arg-type]
        report_data=raw[520:584],
        tee_tcb_svn2=raw[584:600] if tdx15 else None,
        mr_service_td=raw[600:648] if tdx15 else None,
    )


def _parse_qe_report(raw: bytes) -> QeReport:
    return QeReport(
        cpu_svn=raw[0:16],
        misc_select=raw[16:20],
        attributes=raw[48:64],
        mr_enclave=raw[64:96],
        mr_signer=raw[128:160],
        isv_prod_id=struct.unpack_from("<H", raw, 256)[0],
        isv_svn=struct.unpack_from("<H", raw, 258)[0],
        report_data=raw[320:384],
        raw=raw,
    )


def parse_tdx_quote(raw: bytes) -> TdxQuote:
    """Parse a TDX quote v4/v5. Raises :class:`EvidenceFormatError` / :class:`UnsupportedEvidenceError`."""
    if not isinstance(raw, (bytes, bytearray)):
        raise EvidenceFormatError("quote_format", "quote must be bytes")
    raw = bytes(raw)
    r = _Reader(raw, 0, len(raw))
    header = r.take(HEADER_SIZE, "header")
    version, key_type, tee_type, qe_svn, pce_svn = struct.unpack_from("<HHIHH", header, 0)
    if version not in (4, 5):
        raise UnsupportedEvidenceError("quote_format", f"unsupported quote version {version} (need 4 or 5)")
    if key_type != ATT_KEY_ECDSA_P256:
        raise UnsupportedEvidenceError("quote_format", f"unsupported attestation key type {key_type}")
    if tee_type != TEE_TYPE_TDX:
        raise UnsupportedEvidenceError("quote_format", f"TEE type {tee_type:#x} is not TDX (0x81)")
    if header[12:28] != INTEL_QE_VENDOR_ID:
        raise UnsupportedEvidenceError("quote_format", "QE vendor ID is not Intel's")
    if version == 4:
        body_type, body_raw = 2, r.take(TD10_BODY_SIZE, "TD report body")
    else:
        body_type = r.u16("body type")
        body_size = r.u32("body size")
        expected = {2: TD10_BODY_SIZE, 3: TD15_BODY_SIZE}.get(body_type)
        if expected is None:
            raise UnsupportedEvidenceError("quote_format", f"unsupported v5 body type {body_type}")
        if body_size != expected:
            raise EvidenceFormatError("quote_format", f"body type {body_type} must be {expected} bytes, got {body_size}")
        body_raw = r.take(body_size, "TD report body")
    signed_end = r.pos
    sig_len = r.u32("signature data length")
    sig_end = r.pos + sig_len
    if sig_end > len(raw):
        raise EvidenceFormatError("quote_format", f"signature data length {sig_len} runs past the end of the quote")
    s = _Reader(raw, r.pos, sig_end)
    signature = s.take(64, "quote signature")
    attestation_key = s.take(64, "attestation key")
    cert_type = s.u16("certification data type")
    cert_size = s.u32("certification data size")
    if cert_type != CERT_TYPE_QE_REPORT:
        raise UnsupportedEvidenceError("quote_format", f"certification data type {cert_type} (need 6: QE report)")
    c = _Reader(raw, s.pos, s.pos + cert_size)
    if c.end > sig_end:
        raise EvidenceFormatError("quote_format", "certification data runs past the signature data")
    qe_report_raw = c.take(QE_REPORT_SIZE, "QE report")
    qe_sig = c.take(64, "QE report signature")
    auth_len = c.u16("QE auth data size")
    auth = c.take(auth_len, "QE auth data")
    inner_type = c.u16("PCK certification data type")
    inner_size = c.u32("PCK certification data size")
    if inner_type != CERT_TYPE_PCK_CHAIN:
        raise UnsupportedEvidenceError("quote_format", f"inner certification data type {inner_type} (need 5: PCK chain)")
    pck_pem = c.take(inner_size, "PCK certificate chain")
    return TdxQuote(
        version=version,
        attestation_key_type=key_type,
        tee_type=tee_type,
        qe_svn=qe_svn,
        pce_svn=pce_svn,
        qe_vendor_id=header[12:28],
        user_data=header[28:48],
        body_type=body_type,
        body=_parse_body(body_raw, body_type == 3),
        signed_bytes=raw[:signed_end],
        signature=signature,
        attestation_key=attestation_key,
        qe_report=_parse_qe_report(qe_report_raw),
        qe_report_signature=qe_sig,
        qe_auth_data=auth,
        pck_chain_pem=pck_pem,
        trailing_bytes=len(raw) - sig_end,
    )


# --------------------------------------------------------------------------- collateral


@dataclass(frozen=True)
class TdxCollateral:
    """Collateral in dcap-qvl's QuoteCollateralV3 JSON layout. ``tcb_info``/``qe_identity`` are the
    exact signed JSON texts; signatures are raw r||s (64 bytes); CRLs are DER."""

    tcb_info: str
    tcb_info_signature: bytes
    tcb_info_issuer_chain: bytes
    qe_identity: str
    qe_identity_signature: bytes
    qe_identity_issuer_chain: bytes
    root_ca_crl: bytes
    pck_crl: bytes
    pck_crl_issuer_chain: bytes


def _hex_or_bytes(name: str, value: Any) -> bytes:
    if isinstance(value, list) and all(isinstance(v, int) and 0 <= v < 256 for v in value):
        return bytes(value)
    if isinstance(value, str):
        try:
            return bytes.fromhex(value)
        except ValueError:
            pass
    raise CollateralError("collateral_format", f"{name} must be hex")


def load_tdx_collateral(data: bytes) -> TdxCollateral:
    """Parse collateral JSON. Raises :class:`CollateralError` (check ``collateral_format``)."""
    try:
        obj = json.loads(data)
    except (ValueError, RecursionError) as exc:  # ValueError includes UnicodeDecodeError
        raise CollateralError("collateral_format", f"collateral is not JSON: {str(exc)[:200]}") from None
    if not isinstance(obj, dict):
        raise CollateralError("collateral_format", "collateral must be a JSON object")
    strings = ("tcb_info", "tcb_info_issuer_chain", "qe_identity", "qe_identity_issuer_chain", "pck_crl_issuer_chain")
    binary = ("tcb_info_signature", "qe_identity_signature", "root_ca_crl", "pck_crl")
    missing = [k for k in strings + binary if k not in obj]
    if missing:
        raise CollateralError("collateral_format", f"collateral lacks {', '.join(missing)}")
    encoded: dict[str, bytes] = {}
    for k in strings:
        if not isinstance(obj[k], str):
            raise CollateralError("collateral_format", f"{k} must be a string")
        try:
            encoded[k] = obj[k].encode("utf-8")
        except UnicodeEncodeError:
            raise CollateralError("collateral_format", f"{k} is not encodable as UTF-8 (lone surrogate escape?)") from None
    return TdxCollateral(
        tcb_info=obj["tcb_info"],
        tcb_info_signature=_hex_or_bytes("tcb_info_signature", obj["tcb_info_signature"]),
        tcb_info_issuer_chain=encoded["tcb_info_issuer_chain"],
        qe_identity=obj["qe_identity"],
        qe_identity_signature=_hex_or_bytes("qe_identity_signature", obj["qe_identity_signature"]),
        qe_identity_issuer_chain=encoded["qe_identity_issuer_chain"],
        root_ca_crl=_hex_or_bytes("root_ca_crl", obj["root_ca_crl"]),
        pck_crl=_hex_or_bytes("pck_crl", obj["pck_crl"]),
        pck_crl_issuer_chain=encoded["pck_crl_issuer_chain"],
    )


# --------------------------------------------------------------------------- helpers


@functools.lru_cache(maxsize=1)
def _intel_root() -> x509.Certificate:
    return load_certificate(INTEL_SGX_ROOT_CA_PEM.encode(), "bundled Intel SGX Root CA")


def _verify_raw_ecdsa(public_key: Any, signature: bytes, data: bytes) -> bool:
    if not isinstance(public_key, ec.EllipticCurvePublicKey) or len(signature) != 64:
        return False
    der = asym_utils.encode_dss_signature(int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big"))
    try:
        public_key.verify(der, data, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        return False
    return True


def _verify_chain_to_intel_root(pem: bytes, at: datetime, what: str, error: type, check: str) -> list[x509.Certificate]:
    """Verify leaf <- ... <- Intel SGX Root CA (:func:`._x509.verify_chain`); return the chain
    (leaf first, root last). Every failure raises ``error(check, ...)``."""
    certs = load_pem_chain(pem, what, error, check)
    if len(certs) < 2:
        raise error(check, f"{what} needs at least leaf and root, got {len(certs)} certificate(s)")
    if certs[-1] != _intel_root():  # byte-identical to the bundled root, not merely the same key
        raise error(check, f"{what} does not end at the Intel SGX Root CA")
    verify_chain(certs, [name_of(c) for c in certs], at, error, check)
    return certs


def _pck_extension(leaf: x509.Certificate) -> dict[str, Any]:
    """Extract FMSPC, PCE-ID, PCESVN, CPUSVN and the 16 SGX TCB component SVNs from the PCK cert."""
    ext = opaque_extension(leaf, SGX_EXTENSION_OID, CertificateChainError, "pck_extension")
    if ext is None:
        raise CertificateChainError("pck_extension", "PCK certificate lacks the SGX extension")
    out: dict[str, Any] = {}
    try:
        tag, seq, _ = _der.read_tlv(ext)
        for item_tag, item in _der.iter_tlvs(seq):
            oid_tag, oid_raw, pos = _der.read_tlv(item)
            oid = _der.decode_oid(oid_raw)
            vtag, value, _ = _der.read_tlv(item, pos)
            if oid == SGX_EXTENSION_OID + ".2":
                comps = [0] * 16
                for _, comp in _der.iter_tlvs(value):
                    _, coid_raw, cpos = _der.read_tlv(comp)
                    coid = _der.decode_oid(coid_raw)
                    ctag, cval, _ = _der.read_tlv(comp, cpos)
                    idx = int(coid.rsplit(".", 1)[1])
                    if 1 <= idx <= 16:
                        comps[idx - 1] = _der.decode_integer(cval)
                    elif idx == 17:
                        out["pcesvn"] = _der.decode_integer(cval)
                    elif idx == 18:
                        out["cpusvn"] = cval
                out["sgx_svns"] = comps
            elif oid == SGX_EXTENSION_OID + ".3":
                out["pceid"] = value
            elif oid == SGX_EXTENSION_OID + ".4":
                out["fmspc"] = value
    except (ValueError, IndexError):
        raise CertificateChainError("pck_extension", "PCK SGX extension is malformed") from None
    if not {"sgx_svns", "pcesvn", "fmspc", "pceid"} <= out.keys():
        raise CertificateChainError("pck_extension", "PCK SGX extension lacks TCB, FMSPC or PCE-ID")
    return out


def _parse_time(value: Any, what: str) -> datetime:
    if not isinstance(value, str):
        raise CollateralError("collateral_format", f"{what} is missing")
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).astimezone(timezone.utc)
    except ValueError:
        raise CollateralError("collateral_format", f"{what} {value!r} is not a timestamp") from None


def _check_window(obj: Mapping[str, Any], at: datetime, what: str, check: str) -> None:
    issue = _parse_time(obj.get("issueDate"), f"{what} issueDate")
    nxt = _parse_time(obj.get("nextUpdate"), f"{what} nextUpdate")
    _require_window(issue, nxt, at, what, check)


def _require_window(start: datetime, end: datetime, at: datetime, what: str, check: str) -> None:
    if not start <= at <= end:
        raise CollateralError(check, f"{what} valid {start:%Y-%m-%d}..{end:%Y-%m-%d}; verification time {at:%Y-%m-%d} is outside")


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
    _require_window(crl.last_update_utc, nxt, at, what, "crl")
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


def _worse(a: str, b: str) -> str:
    pair = {a, b}
    if "OutOfDate" in pair and pair & {"ConfigurationNeeded", "ConfigurationAndSWHardeningNeeded"}:
        return "OutOfDateConfigurationNeeded"
    rank = {s: i for i, s in enumerate(TDX_TCB_STATUSES)}
    return max(a, b, key=lambda s: rank.get(s, len(rank)))


def _svns(components: Any) -> list[int]:
    if not isinstance(components, list) or len(components) != 16:
        raise CollateralError("collateral_format", "TCB level components must be a list of 16")
    out = []
    for c in components:
        if not isinstance(c, dict) or type(c.get("svn")) is not int:
            raise CollateralError("collateral_format", "TCB component lacks an integer svn")
        out.append(c["svn"])
    return out


def _level_status(level: Mapping[str, Any]) -> tuple[str, list[str]]:
    """(tcbStatus, advisoryIDs) of a matched TCB level."""
    status, advisories = level.get("tcbStatus"), level.get("advisoryIDs", [])
    if status not in TDX_TCB_STATUSES or not isinstance(advisories, list) or not all(isinstance(a, str) for a in advisories):
        raise CollateralError("collateral_format", f"TCB level has an unknown tcbStatus {status!r} or malformed advisoryIDs")
    return status, list(advisories)


def _hex_field(obj: Mapping[str, Any], key: str, what: str) -> bytes:
    try:
        return bytes.fromhex(obj[key])
    except (KeyError, TypeError, ValueError):
        raise CollateralError("collateral_format", f"{what} {key} is missing or not hex") from None


def _masked_equal(actual: bytes, expected_hex: Any, mask_hex: Any, what: str) -> bool:
    try:
        expected, mask = bytes.fromhex(expected_hex), bytes.fromhex(mask_hex)
    except (TypeError, ValueError):
        raise CollateralError("collateral_format", f"{what} expected value/mask is not hex") from None
    if len(expected) != len(actual) or len(mask) != len(actual):
        raise CollateralError("collateral_format", f"{what} expected value/mask has the wrong length")
    return all((x & m) == (y & m) for x, y, m in zip(actual, expected, mask))


# --------------------------------------------------------------------------- verifier


class TdxVerifier:
    """Verifier for evidence type ``tdx`` (see module docstring for the checks)."""

    evidence_type = "tdx"

    def verify(
        self,
        evidence: Evidence,
        policy: AttestationPolicy,
        *,
        at: datetime,
        expected_report_data: bytes | None = None,
    ) -> Verdict:
        quote = parse_tdx_quote(evidence.raw)
        passed = ["quote_format"]
        if "collateral" not in evidence.endorsements:
            raise CollateralError("collateral_missing", "TDX verification needs collateral (--collateral FILE)")
        collateral = load_tdx_collateral(evidence.endorsements["collateral"])

        pck_chain = _verify_chain_to_intel_root(quote.pck_chain_pem, at, "PCK chain", CertificateChainError, "pck_chain")
        pck_leaf = pck_chain[0]
        passed.append("pck_chain")
        if not _verify_raw_ecdsa(pck_leaf.public_key(), quote.qe_report_signature, quote.qe_report.raw):
            raise SignatureError("qe_report_signature", "QE report is not signed by the PCK key")
        passed.append("qe_report_signature")
        expected_qe_data = hashlib.sha256(quote.attestation_key + quote.qe_auth_data).digest() + bytes(32)
        if quote.qe_report.report_data != expected_qe_data:
            raise SignatureError("qe_report_binding", "QE REPORTDATA != SHA-256(attestation key || QE auth data)")
        passed.append("qe_report_binding")
        try:
            att_key = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), b"\x04" + quote.attestation_key)
        except ValueError:
            raise SignatureError("quote_signature", "attestation key is not a P-256 point") from None
        if not _verify_raw_ecdsa(att_key, quote.signature, quote.signed_bytes):
            raise SignatureError("quote_signature", "quote is not signed by the attestation key")
        passed.append("quote_signature")

        pck = _pck_extension(pck_leaf)
        tcb_info, qe_identity = self._verify_collateral(collateral, pck_chain, at)
        passed.append("collateral")
        if _hex_field(tcb_info, "fmspc", "tcb_info") != pck["fmspc"]:
            raise CollateralError("fmspc", f"TCB info FMSPC {tcb_info.get('fmspc')} != PCK FMSPC {pck['fmspc'].hex()}")
        if _hex_field(tcb_info, "pceId", "tcb_info") != pck["pceid"]:
            raise CollateralError("fmspc", "TCB info PCE-ID does not match the PCK certificate")
        passed.append("fmspc")

        qe_status, qe_advisories = self._qe_identity_status(quote.qe_report, qe_identity)
        passed.append("qe_identity")
        platform_status, platform_advisories = self._platform_status(quote.body, pck, tcb_info)
        passed.append("tcb_level")
        module_status, module_advisories = self._module_status(quote.body, tcb_info)
        passed.append("tdx_module")
        status = _worse(_worse(platform_status, qe_status), module_status)
        advisories = tuple(sorted(set(qe_advisories + platform_advisories + module_advisories)))
        if status not in policy.tdx.allowed_tcb_statuses:
            raise TcbError(
                "tcb_status", f"TCB status {status} not in allowed {list(policy.tdx.allowed_tcb_statuses)}"
                + (f" (advisories {', '.join(advisories)})" if advisories else "")
            )
        passed.append("tcb_status")

        skipped: list[str] = []
        body = quote.body
        if body.debug and not policy.allow_debug:
            raise PolicyViolationError("debug", "TD_ATTRIBUTES.DEBUG is set; the policy refuses debug TDs")
        passed.append("debug")
        _allow_list("mrtd", body.mr_td, policy.tdx.mrtd, passed, skipped)
        for i in range(4):
            _allow_list(f"rtmr{i}", body.rtmrs[i], policy.tdx.rtmrs[i], passed, skipped)
        check_report_data(body.report_data, expected_report_data, passed, skipped)

        fields = {
            "quote_version": str(quote.version),
            "body": "TDX 1.5" if quote.body_type == 3 else "TDX 1.0",
            "fmspc": pck["fmspc"].hex(),
            "td_attributes": body.td_attributes.hex(),
            "xfam": body.xfam.hex(),
            "mr_seam": body.mr_seam.hex(),
            "mr_config_id": body.mr_config_id.hex(),
            **{f"rtmr{i}": body.rtmrs[i].hex() for i in range(4)},
        }
        return Verdict(
            evidence_type="tdx",
            measurement=body.mr_td,
            report_data=body.report_data,
            debug=body.debug,
            tcb_status=status,
            tcb={
                "tee_tcb_svn": body.tee_tcb_svn.hex(),
                "pck_sgx_svns": ",".join(str(v) for v in pck["sgx_svns"]),
                "pck_pcesvn": str(pck["pcesvn"]),
                "platform": platform_status,
                "qe": qe_status,
                "tdx_module": module_status,
            },
            fields=fields,
            verified_at=at,
            checks_passed=tuple(passed),
            checks_skipped=tuple(skipped),
            advisory_ids=advisories,
        )

    @staticmethod
    def _verify_collateral(
        collateral: TdxCollateral, pck_chain: list[x509.Certificate], at: datetime
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        signed_objects = []
        for name, text, sig, chain_pem in (
            ("tcb_info", collateral.tcb_info, collateral.tcb_info_signature, collateral.tcb_info_issuer_chain),
            ("qe_identity", collateral.qe_identity, collateral.qe_identity_signature, collateral.qe_identity_issuer_chain),
        ):
            chain = _verify_chain_to_intel_root(chain_pem, at, f"{name} issuer chain", CollateralError, f"{name}_chain")
            if not _verify_raw_ecdsa(chain[0].public_key(), sig, text.encode("utf-8")):
                raise CollateralError(f"{name}_signature", f"{name} signature does not verify")
            try:
                obj = json.loads(text)
            except (ValueError, RecursionError):
                raise CollateralError("collateral_format", f"{name} is not JSON") from None
            if not isinstance(obj, dict):
                raise CollateralError("collateral_format", f"{name} must be a JSON object")
            _check_window(obj, at, name, f"{name}_expired")
            signed_objects.append((obj, chain))
        (tcb_info, tcb_chain), (qe_identity, qe_chain) = signed_objects
        if tcb_info.get("id") != "TDX" or tcb_info.get("version") != 3:
            raise CollateralError("collateral_format", "tcb_info must be TDX TCB info version 3")
        if qe_identity.get("id") != "TD_QE":
            raise CollateralError("collateral_format", "qe_identity must be the TD_QE identity")

        pck_crl_chain = _verify_chain_to_intel_root(
            collateral.pck_crl_issuer_chain, at, "pck_crl issuer chain", CollateralError, "pck_crl_chain"
        )
        pck_ca = pck_chain[1]
        if pck_crl_chain[0].subject != pck_ca.subject or spki_sha256(pck_crl_chain[0]) != spki_sha256(pck_ca):
            raise CollateralError("pck_crl_chain", f"PCK CRL issuer chain is for {name_of(pck_crl_chain[0])}, not the quote's {name_of(pck_ca)}")
        check_revocation(pck_chain, collateral.pck_crl, collateral.root_ca_crl, at, tcb_chain[:-1] + qe_chain[:-1] + pck_crl_chain[:-1])
        return tcb_info, qe_identity

    @staticmethod
    def _qe_identity_status(qe: QeReport, identity: Mapping[str, Any]) -> tuple[str, list[str]]:
        try:
            if _hex_field(identity, "mrsigner", "qe_identity") != qe.mr_signer:
                raise TcbError("qe_identity", "QE MRSIGNER does not match the QE identity")
            if identity["isvprodid"] != qe.isv_prod_id:
                raise TcbError("qe_identity", "QE ISVPRODID does not match the QE identity")
        except (KeyError, TypeError, ValueError):
            raise CollateralError("collateral_format", "qe_identity lacks mrsigner/isvprodid") from None
        if not _masked_equal(qe.misc_select, identity.get("miscselect"), identity.get("miscselectMask"), "QE MISCSELECT"):
            raise TcbError("qe_identity", "QE MISCSELECT does not match the QE identity")
        if not _masked_equal(qe.attributes, identity.get("attributes"), identity.get("attributesMask"), "QE ATTRIBUTES"):
            raise TcbError("qe_identity", "QE ATTRIBUTES do not match the QE identity")
        levels = identity.get("tcbLevels")
        if not isinstance(levels, list):
            raise CollateralError("collateral_format", "qe_identity lacks tcbLevels")
        for level in levels:
            try:
                if qe.isv_svn >= level["tcb"]["isvsvn"]:
                    return _level_status(level)
            except (KeyError, TypeError):
                raise CollateralError("collateral_format", "qe_identity TCB level is malformed") from None
        raise TcbError("qe_identity", f"no QE identity TCB level for QE ISVSVN {qe.isv_svn}")

    @staticmethod
    def _platform_status(body: TdReportBody, pck: Mapping[str, Any], tcb_info: Mapping[str, Any]) -> tuple[str, list[str]]:
        levels = tcb_info.get("tcbLevels")
        if not isinstance(levels, list):
            raise CollateralError("collateral_format", "tcb_info lacks tcbLevels")
        start = 2 if body.tee_tcb_svn[1] > 0 else 0  # module SVN bytes are covered by the module identity
        for level in levels:
            try:
                tcb = level["tcb"]
                sgx, pcesvn, tdx = _svns(tcb["sgxtcbcomponents"]), tcb["pcesvn"], _svns(tcb["tdxtcbcomponents"])
            except (KeyError, TypeError):
                raise CollateralError("collateral_format", "tcb_info TCB level is malformed") from None
            if type(pcesvn) is not int:
                raise CollateralError("collateral_format", "tcb_info TCB level pcesvn is not an integer")
            if (
                all(p >= s for p, s in zip(pck["sgx_svns"], sgx))
                and pck["pcesvn"] >= pcesvn
                and all(body.tee_tcb_svn[i] >= tdx[i] for i in range(start, 16))
            ):
                return _level_status(level)
        raise TcbError(
            "no_matching_tcb_level",
            f"no matching TCB level (PCK SGX SVNs {pck['sgx_svns']}, PCESVN {pck['pcesvn']}, TEE_TCB_SVN {body.tee_tcb_svn.hex()})",
        )

    @staticmethod
    def _module_status(body: TdReportBody, tcb_info: Mapping[str, Any]) -> tuple[str, list[str]]:
        major = body.tee_tcb_svn[1]
        if major == 0:
            module = tcb_info.get("tdxModule")
            if isinstance(module, dict):
                if _hex_field(module, "mrsigner", "tdxModule") != body.mr_signer_seam:
                    raise TcbError("tdx_module", "MRSIGNERSEAM does not match the TDX module identity")
                if not _masked_equal(body.seam_attributes, module.get("attributes"), module.get("attributesMask"), "SEAM attributes"):
                    raise TcbError("tdx_module", "SEAM attributes do not match the TDX module identity")
            return "UpToDate", []
        wanted = f"TDX_{major:02X}"
        for identity in tcb_info.get("tdxModuleIdentities") or []:
            if not isinstance(identity, dict) or identity.get("id") != wanted:
                continue
            if _hex_field(identity, "mrsigner", wanted) != body.mr_signer_seam:
                raise TcbError("tdx_module", f"MRSIGNERSEAM does not match {wanted}")
            if not _masked_equal(body.seam_attributes, identity.get("attributes"), identity.get("attributesMask"), "SEAM attributes"):
                raise TcbError("tdx_module", f"SEAM attributes do not match {wanted}")
            for level in identity.get("tcbLevels") or []:
                try:
                    if body.tee_tcb_svn[0] >= level["tcb"]["isvsvn"]:
                        return _level_status(level)
                except (KeyError, TypeError):
                    raise CollateralError("collateral_format", "TDX module TCB level is malformed") from None
            raise TcbError("tdx_module", f"no {wanted} TCB level for module SVN {body.tee_tcb_svn[0]}")
        raise TcbError("tdx_module", f"TCB info has no module identity {wanted}")


register_verifier("tdx", TdxVerifier)
