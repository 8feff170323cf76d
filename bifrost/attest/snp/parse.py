"""AMD SEV-SNP parsing: the 0x4A0-byte ATTESTATION_REPORT, the extended-report certificate table,
and the KDS extensions of a VCEK/VLEK certificate (product line, TCB SPLs, hwID).

All multi-byte integers in the report are little-endian. Parsing checks only the format
(``report_format``, ``cert_table``, ``cert_extensions``); nothing here is authenticated.
"""

from __future__ import annotations

import struct
import uuid
from dataclasses import dataclass

from cryptography import x509

from .. import _der
from .._x509 import opaque_extension
from ..errors import CertificateChainError, EvidenceFormatError

SNP_REPORT_SIZE = 0x4A0
SNP_SIGNED_SIZE = 0x2A0
SNP_CHIP_ID_SIZE = 64
SIGNATURE_ALGO_ECDSA_P384_SHA384 = 1
POLICY_DEBUG_BIT = 1 << 19
POLICY_MIGRATE_MA_BIT = 1 << 18
POLICY_SMT_BIT = 1 << 16
SIGNER_VCEK, SIGNER_VLEK, SIGNER_NONE = 0, 1, 7
SIGNER_INFO_AUTHOR_KEY_EN = 1 << 0
SIGNER_INFO_MASK_CHIP_KEY = 1 << 1
TURIN_HWID_SIZE = 8  # Turin VCEKs carry the first 8 bytes of CHIP_ID as hwID (AMD KDS; go-sev-guest TurinHWIDSize)

_AMD_OID = "1.3.6.1.4.1.3704.1."
OID_PRODUCT_NAME = _AMD_OID + "2"
OID_HWID = _AMD_OID + "4"
OID_SPL = {
    "bootloader": _AMD_OID + "3.1",
    "tee": _AMD_OID + "3.2",
    "snp": _AMD_OID + "3.3",
    "microcode": _AMD_OID + "3.8",
    "fmc": _AMD_OID + "3.9",
}
TURIN_FAMILY = 0x1A

# auxblob / extended-report certificate table GUIDs (AMD GHCB spec).
CERT_TABLE_GUIDS = {
    "c0b406a4-a803-4952-9743-3fb6014cd0ae": "ark",
    "4ab7b379-bbac-4fe4-a02f-05aef327c782": "ask",
    "63da758d-e664-4564-adc5-f4b93be8accd": "vcek",
    "a8074bc2-a25a-483e-aae6-39c045a0b8a1": "vlek",
}


@dataclass(frozen=True)
class SnpTcbVersion:
    """A TCB_VERSION (u64). Layout differs: Milan/Genoa bytes [bl, tee, 0,0,0,0, snp, ucode];
    Turin bytes [fmc, bl, tee, snp, 0,0,0, ucode]."""

    raw: int
    bootloader: int
    tee: int
    snp: int
    microcode: int
    fmc: int | None = None

    @classmethod
    def decode(cls, raw: int, turin: bool = False) -> "SnpTcbVersion":
        b = raw.to_bytes(8, "little")
        if turin:
            return cls(raw, bootloader=b[1], tee=b[2], snp=b[3], microcode=b[7], fmc=b[0])
        return cls(raw, bootloader=b[0], tee=b[1], snp=b[6], microcode=b[7])

    def components(self) -> dict[str, int]:
        out = {"bootloader": self.bootloader, "tee": self.tee, "snp": self.snp, "microcode": self.microcode}
        if self.fmc is not None:
            out["fmc"] = self.fmc
        return out

    def __str__(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.components().items())


@dataclass(frozen=True)
class SnpReport:
    """Every field of ATTESTATION_REPORT (AMD SEV-SNP ABI spec, table 'ATTESTATION_REPORT')."""

    version: int
    guest_svn: int
    policy: int
    family_id: bytes
    image_id: bytes
    vmpl: int
    signature_algo: int
    current_tcb: SnpTcbVersion
    platform_info: int
    signer_info: int
    report_data: bytes
    measurement: bytes
    host_data: bytes
    id_key_digest: bytes
    author_key_digest: bytes
    report_id: bytes
    report_id_ma: bytes
    reported_tcb: SnpTcbVersion
    cpuid_fam_id: int | None
    cpuid_mod_id: int | None
    cpuid_step: int | None
    chip_id: bytes
    committed_tcb: SnpTcbVersion
    current_version: tuple[int, int, int]
    committed_version: tuple[int, int, int]
    launch_tcb: SnpTcbVersion
    launch_mit_vector: int | None
    current_mit_vector: int | None
    signature_r: int
    signature_s: int
    raw: bytes

    @property
    def debug(self) -> bool:
        return bool(self.policy & POLICY_DEBUG_BIT)

    @property
    def signing_key(self) -> int:
        return (self.signer_info >> 2) & 0x7

    @property
    def author_key_en(self) -> bool:
        """SIGNER_INFO bit 0: the guest was launched with an ID block carrying an author key."""
        return bool(self.signer_info & SIGNER_INFO_AUTHOR_KEY_EN)

    @property
    def mask_chip_key(self) -> bool:
        """SIGNER_INFO bit 1 (AMD SNP ABI spec: MASK_CHIP_KEY): the platform's SNP_CONFIG masks the
        chip key, so the VCEK signs nothing (the report is VLEK-signed or unsigned)."""
        return bool(self.signer_info & SIGNER_INFO_MASK_CHIP_KEY)

    @property
    def chip_id_masked(self) -> bool:
        """CHIP_ID is all zero: the platform's SNP_CONFIG sets MASK_CHIP_ID (no per-chip identifier)."""
        return not any(self.chip_id)

    @property
    def signed_bytes(self) -> bytes:
        return self.raw[:SNP_SIGNED_SIZE]


def _u32(b: bytes, off: int) -> int:
    return struct.unpack_from("<I", b, off)[0]


def _u64(b: bytes, off: int) -> int:
    return struct.unpack_from("<Q", b, off)[0]


def parse_snp_report(raw: bytes) -> SnpReport:
    """Parse a raw report. Raises :class:`EvidenceFormatError` (check ``report_format``)."""
    if not isinstance(raw, (bytes, bytearray)) or len(raw) != SNP_REPORT_SIZE:
        size = len(raw) if isinstance(raw, (bytes, bytearray)) else "non-bytes"
        raise EvidenceFormatError("report_format", f"SEV-SNP report must be {SNP_REPORT_SIZE} bytes, got {size}")
    raw = bytes(raw)
    version = _u32(raw, 0x00)
    if not 2 <= version <= 5:
        raise EvidenceFormatError("report_format", f"unsupported SEV-SNP report version {version}")
    sig_algo = _u32(raw, 0x34)
    if sig_algo != SIGNATURE_ALGO_ECDSA_P384_SHA384:
        raise EvidenceFormatError("report_format", f"unsupported signature algorithm {sig_algo}")
    has_cpuid = version >= 3
    fam = raw[0x188] if has_cpuid else None
    turin = fam == TURIN_FAMILY

    def tcb(off: int) -> SnpTcbVersion:
        return SnpTcbVersion.decode(_u64(raw, off), turin)

    return SnpReport(
        version=version,
        guest_svn=_u32(raw, 0x04),
        policy=_u64(raw, 0x08),
        family_id=raw[0x10:0x20],
        image_id=raw[0x20:0x30],
        vmpl=_u32(raw, 0x30),
        signature_algo=sig_algo,
        current_tcb=tcb(0x38),
        platform_info=_u64(raw, 0x40),
        signer_info=_u32(raw, 0x48),
        report_data=raw[0x50:0x90],
        measurement=raw[0x90:0xC0],
        host_data=raw[0xC0:0xE0],
        id_key_digest=raw[0xE0:0x110],
        author_key_digest=raw[0x110:0x140],
        report_id=raw[0x140:0x160],
        report_id_ma=raw[0x160:0x180],
        reported_tcb=tcb(0x180),
        cpuid_fam_id=fam,
        cpuid_mod_id=raw[0x189] if has_cpuid else None,
        cpuid_step=raw[0x18A] if has_cpuid else None,
        chip_id=raw[0x1A0:0x1E0],
        committed_tcb=tcb(0x1E0),
        current_version=(raw[0x1EA], raw[0x1E9], raw[0x1E8]),
        committed_version=(raw[0x1EE], raw[0x1ED], raw[0x1EC]),
        launch_tcb=tcb(0x1F0),
        launch_mit_vector=_u64(raw, 0x1F8) if version >= 5 else None,
        current_mit_vector=_u64(raw, 0x200) if version >= 5 else None,
        signature_r=int.from_bytes(raw[0x2A0:0x2E8], "little"),
        signature_s=int.from_bytes(raw[0x2E8:0x330], "little"),
        raw=raw,
    )


def parse_cert_table(aux: bytes) -> dict[str, bytes]:
    """Parse the GUID certificate table from configfs-tsm ``auxblob`` / SNP extended report.

    Entries are (GUID 16 bytes, offset u32, length u32), terminated by an all-zero entry.
    Returns ``{"ark"|"ask"|"vcek"|"vlek": DER bytes}``; unknown GUIDs are ignored.
    """
    out: dict[str, bytes] = {}
    pos = 0
    while True:
        if pos + 24 > len(aux):
            raise EvidenceFormatError("cert_table", "certificate table is truncated")
        guid_bytes, offset, length = aux[pos : pos + 16], _u32(aux, pos + 16), _u32(aux, pos + 20)
        if guid_bytes == bytes(16) and offset == 0 and length == 0:
            return out
        if offset + length > len(aux):
            raise EvidenceFormatError("cert_table", "certificate table entry points past the end")
        name = CERT_TABLE_GUIDS.get(str(uuid.UUID(bytes_le=guid_bytes)))
        if name:
            out[name] = aux[offset : offset + length]
        pos += 24



def product_name(cert: x509.Certificate) -> str | None:
    """Product line from the KDS product-name extension ("Milan-B0" -> "Milan"), or None."""
    value = opaque_extension(cert, OID_PRODUCT_NAME)
    if value is None:
        return None
    try:
        tag, body, _ = _der.read_tlv(value)
        return body.decode("ascii").split("-")[0] if tag == _der.TAG_IA5STRING else None
    except (ValueError, UnicodeDecodeError):
        return None


def leaf_tcb_components(cert: x509.Certificate) -> dict[str, int]:
    """The TCB SPL values the VCEK/VLEK was issued for (absent OIDs are omitted)."""
    out: dict[str, int] = {}
    for name, oid in OID_SPL.items():
        value = opaque_extension(cert, oid)
        if value is None:
            continue
        try:
            out[name] = _der.parse_integer(value)
        except ValueError:
            raise CertificateChainError("cert_extensions", f"VCEK extension {oid} is not a DER INTEGER") from None
    return out


def leaf_hwid(cert: x509.Certificate) -> bytes | None:
    """The VCEK hwID: 64 bytes (Milan, Genoa) or 8 bytes (Turin); KDS stores it without a DER
    header, but a DER OCTET STRING wrapper is accepted too."""
    value = opaque_extension(cert, OID_HWID)
    if value is None or len(value) in (SNP_CHIP_ID_SIZE, TURIN_HWID_SIZE):
        return value
    try:
        tag, body, end = _der.read_tlv(value)
    except ValueError:
        return value
    return body if tag == _der.TAG_OCTET_STRING and end == len(value) else value
