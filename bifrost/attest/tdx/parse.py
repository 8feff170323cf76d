"""Intel TDX parsing: DCAP quotes v4 and v5, collateral JSON (dcap-qvl QuoteCollateralV3 layout),
and the SGX extension of a PCK certificate.

Quote format (``quote_format``): header (version 4/5, ECDSA-256-with-P-256 key, TEE type 0x81,
Intel QE vendor ID), TD report body (v5 body type 2 = TDX 1.0, 3 = TDX 1.5), signature section, QE
report certification data (type 6) wrapping a PEM PCK chain (type 5). Bytes after the signature
section (padding some quote generators append) are ignored: nothing there is signed. Malformed
collateral is ``collateral_format``; a malformed PCK SGX extension ``pck_extension``. Nothing here
is authenticated.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Mapping

from cryptography import x509

from .. import _der
from .._x509 import opaque_extension
from ..errors import CertificateChainError, CollateralError, EvidenceFormatError, UnsupportedEvidenceError
from ..policy import TDX_TCB_STATUSES

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


def parse_pck_extension(leaf: x509.Certificate) -> dict[str, Any]:
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


# Readers of the signed collateral JSON (TCB info, QE identity): used only after its signature verified.


def parse_timestamp(value: Any, what: str) -> datetime:
    if not isinstance(value, str):
        raise CollateralError("collateral_format", f"{what} is missing")
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).astimezone(timezone.utc)
    except ValueError:
        raise CollateralError("collateral_format", f"{what} {value!r} is not a timestamp") from None


def hex_field(obj: Mapping[str, Any], key: str, what: str) -> bytes:
    try:
        return bytes.fromhex(obj[key])
    except (KeyError, TypeError, ValueError):
        raise CollateralError("collateral_format", f"{what} {key} is missing or not hex") from None


def component_svns(components: Any) -> list[int]:
    """The 16 SVNs of a TCB level's ``sgxtcbcomponents`` / ``tdxtcbcomponents``."""
    if not isinstance(components, list) or len(components) != 16:
        raise CollateralError("collateral_format", "TCB level components must be a list of 16")
    out = []
    for c in components:
        if not isinstance(c, dict) or type(c.get("svn")) is not int:
            raise CollateralError("collateral_format", "TCB component lacks an integer svn")
        out.append(c["svn"])
    return out


def level_status(level: Mapping[str, Any]) -> tuple[str, tuple[str, ...]]:
    """(tcbStatus, advisoryIDs) of a matched TCB level."""
    status, advisories = level.get("tcbStatus"), level.get("advisoryIDs", [])
    if status not in TDX_TCB_STATUSES or not isinstance(advisories, list) or not all(isinstance(a, str) for a in advisories):
        raise CollateralError("collateral_format", f"TCB level has an unknown tcbStatus {status!r} or malformed advisoryIDs")
    return status, tuple(advisories)
