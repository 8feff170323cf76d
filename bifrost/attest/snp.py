"""AMD SEV-SNP: parse the 0x4A0-byte ATTESTATION_REPORT and verify it offline.

Checks, in order (the first failure raises; ``check`` names it):
 1. ``report_format``: length 0x4A0, version 2..5, signature algorithm 1 (ECDSA P-384 / SHA-384).
 2. ``signing_key``: signer_info says VCEK (0) or VLEK (1); the supplied leaf is of that kind.
 3. ``cert_chain``: leaf <- ASK (VCEK) or ASVK (VLEK) <- ARK, RSA-PSS signatures, issuers are CAs
    (basicConstraints, path length, keyCertSign), every certificate valid at the verification time
    (``cert_validity``), ARK self-signed and its key equal to a bundled AMD root
    (:mod:`bifrost.attest.roots`; ``root_not_trusted``). Unparsable certificates: ``cert_parse``.
 4. ``report_signature``: ECDSA-P384 over bytes [0, 0x2A0) with the leaf key.
 5. ``reported_tcb``: REPORTED_TCB equals the TCB the leaf was issued for (its SPL extensions);
    ``chip_id``: CHIP_ID equals the VCEK hwID (Turin: the 8-byte hwID equals CHIP_ID[0:8]). An
    all-zero CHIP_ID (firmware MASK_CHIP_ID) has no chip binding and is refused unless the policy
    sets ``snp.allow_masked_chip_id``. SIGNER_INFO.MASK_CHIP_KEY with a VCEK signer is refused.
 6. Policy: ``debug`` (guest policy bit 19), ``vmpl``, ``measurement``, ``host_data``, ``min_tcb``,
    ``report_data`` (exact match with the expected binding).

All multi-byte integers in the report are little-endian.
"""

from __future__ import annotations

import functools
import struct
import types
from dataclasses import dataclass
from datetime import datetime
from typing import Mapping, Sequence

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, utils as asym_utils

from . import _der
from ._x509 import load_certificate, load_pem_chain, opaque_extension, spki_sha256, verify_chain
from .errors import (
    BindingError,
    CertificateChainError,
    EndorsementMismatchError,
    EvidenceFormatError,
    PolicyViolationError,
    SignatureError,
    TcbError,
)
from .policy import AttestationPolicy
from .roots import AMD_VCEK_CHAINS_PEM, AMD_VLEK_CHAINS_PEM
from .verdict import Evidence, Verdict, register_verifier

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
    import uuid

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


@functools.lru_cache(maxsize=None)
def _bundled_chain(kind: str, product: str) -> tuple[x509.Certificate, ...]:
    """The bundled ASK/ASVK + ARK of ``product`` for ``kind`` ("vcek"/"vlek"), parsed once per process."""
    table = AMD_VCEK_CHAINS_PEM if kind == "vcek" else AMD_VLEK_CHAINS_PEM
    return tuple(load_pem_chain(table[product].encode(), "bundled AMD chain"))


@functools.lru_cache(maxsize=1)
def bundled_ark_pins() -> Mapping[bytes, str]:
    """SHA-256 of each bundled ARK's SubjectPublicKeyInfo -> ``"ARK-<product>"`` (read-only)."""
    pins: dict[bytes, str] = {}
    for kind, table in (("vcek", AMD_VCEK_CHAINS_PEM), ("vlek", AMD_VLEK_CHAINS_PEM)):
        for product in table:
            pins[spki_sha256(_bundled_chain(kind, product)[-1])] = f"ARK-{product}"
    return types.MappingProxyType(pins)


def _product_name(cert: x509.Certificate) -> str | None:
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


def check_chip_id(report: SnpReport, hwid: bytes | None, product: str | None) -> None:
    """CHIP_ID must match the VCEK hwID (check ``chip_id``). Turin VCEKs carry 8 bytes, compared
    with CHIP_ID[0:8]; every other product carries the full 64 bytes."""
    if hwid is None:
        raise EndorsementMismatchError("chip_id", "VCEK has no hwID extension; it cannot be bound to this chip")
    turin = product == "Turin" or report.cpuid_fam_id == TURIN_FAMILY
    if len(hwid) == TURIN_HWID_SIZE and turin:
        if hwid != report.chip_id[:TURIN_HWID_SIZE]:
            raise EndorsementMismatchError("chip_id", "CHIP_ID[0:8] does not match the Turin VCEK hwID")
        return
    if len(hwid) != SNP_CHIP_ID_SIZE:
        raise EndorsementMismatchError("chip_id", f"VCEK hwID is {len(hwid)} bytes; {product or 'this product'} needs {SNP_CHIP_ID_SIZE}")
    if hwid != report.chip_id:
        raise EndorsementMismatchError("chip_id", "CHIP_ID does not match the VCEK hwID")


def check_tcb_matches_leaf(reported: SnpTcbVersion, leaf_tcb: Mapping[str, int]) -> None:
    """REPORTED_TCB must equal every SPL the leaf certificate names (check ``reported_tcb``).
    Turin keys must also name the FMC SPL."""
    components = reported.components()
    required = ("bootloader", "tee", "snp", "microcode") + (("fmc",) if "fmc" in components else ())
    missing = [k for k in required if k not in leaf_tcb]
    if missing:
        raise TcbError("reported_tcb", f"endorsement key lacks TCB extension(s) {', '.join(missing)}")
    diffs = [f"{k}: report {components[k]} != key {v}" for k, v in leaf_tcb.items() if k in components and components[k] != v]
    if diffs:
        raise TcbError("reported_tcb", "REPORTED_TCB differs from the endorsement key's TCB (" + "; ".join(diffs) + ")")


def _resolve_chain(
    report: SnpReport, evidence: Evidence, at: datetime, trusted_arks: Mapping[bytes, str]
) -> tuple[x509.Certificate, str, str | None]:
    """Return the verified leaf certificate, its kind ("VCEK"/"VLEK") and its product line."""
    kind = {SIGNER_VCEK: "vcek", SIGNER_VLEK: "vlek"}.get(report.signing_key)
    if kind is None:
        raise EndorsementMismatchError("signing_key", f"report signer_info.signing_key={report.signing_key} (not VCEK/VLEK)")
    if kind == "vcek" and report.mask_chip_key:
        raise EndorsementMismatchError(
            "signing_key", "SIGNER_INFO has MASK_CHIP_KEY set (the VCEK signs nothing on this platform) but names the VCEK as signer"
        )
    leaf_bytes = evidence.endorsements.get(kind)
    if leaf_bytes is None:
        other = "vlek" if kind == "vcek" else "vcek"
        if other in evidence.endorsements:
            raise EndorsementMismatchError("signing_key", f"report is signed by the {kind.upper()}, but a {other.upper()} was supplied")
        raise CertificateChainError("cert_missing", f"report is signed by the {kind.upper()}; supply its certificate")
    leaf = load_certificate(leaf_bytes, kind.upper())
    expected_cn = f"SEV-{kind.upper()}"
    cns = [a.value for a in leaf.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)]
    if cns != [expected_cn]:
        raise EndorsementMismatchError("signing_key", f"leaf certificate CN {cns} is not {expected_cn}")
    product = _product_name(leaf)
    if report.cpuid_fam_id is not None and product is not None:
        family = {"Milan": (0x19,), "Genoa": (0x19,), "Turin": (TURIN_FAMILY,)}.get(product)
        if family is not None and report.cpuid_fam_id not in family:
            raise EndorsementMismatchError("product", f"report CPU family {report.cpuid_fam_id:#x} does not match {product} key")
    if product == "Turin" and report.cpuid_fam_id is None:
        raise EndorsementMismatchError("product", f"a Turin key signed a v{report.version} report without CPUID fields")

    if "cert_chain" in evidence.endorsements:
        chain = load_pem_chain(evidence.endorsements["cert_chain"], "AMD certificate chain")
    else:
        table = AMD_VCEK_CHAINS_PEM if kind == "vcek" else AMD_VLEK_CHAINS_PEM
        if product not in table:
            raise CertificateChainError("cert_missing", f"no bundled AMD chain for product {product!r}; supply --cert-chain")
        chain = list(_bundled_chain(kind, product))
    if len(chain) != 2:
        raise CertificateChainError("cert_chain", f"AMD chain must be ASK/ASVK then ARK, got {len(chain)} certificates")
    intermediate, ark = chain
    if spki_sha256(ark) not in trusted_arks:
        raise CertificateChainError("root_not_trusted", "ARK is not one of the bundled AMD root keys")
    verify_chain([leaf, intermediate, ark], [kind.upper(), "ASK/ASVK", "ARK"], at, validity_check="cert_validity")
    return leaf, kind.upper(), product


class SnpVerifier:
    """Verifier for evidence type ``sev-snp`` (see module docstring for the checks).

    ``trusted_arks``: SHA-256 of each trusted ARK SubjectPublicKeyInfo -> label; default the
    bundled AMD roots (:func:`bundled_ark_pins`). Only tests with self-made chains pass others.
    """

    evidence_type = "sev-snp"

    def __init__(self, trusted_arks: Mapping[bytes, str] | None = None) -> None:
        self.trusted_arks = bundled_ark_pins() if trusted_arks is None else dict(trusted_arks)

    def verify(
        self,
        evidence: Evidence,
        policy: AttestationPolicy,
        *,
        at: datetime,
        expected_report_data: bytes | None = None,
    ) -> Verdict:
        report = parse_snp_report(evidence.raw)
        passed = ["report_format"]
        leaf, kind, product = _resolve_chain(report, evidence, at, self.trusted_arks)
        passed += ["signing_key", "cert_chain"]

        public_key = leaf.public_key()
        if not isinstance(public_key, ec.EllipticCurvePublicKey) or public_key.curve.name != "secp384r1":
            raise CertificateChainError("cert_key", f"{kind} key is not ECDSA P-384")
        try:
            signature = asym_utils.encode_dss_signature(report.signature_r, report.signature_s)
            public_key.verify(signature, report.signed_bytes, ec.ECDSA(hashes.SHA384()))
        except (InvalidSignature, ValueError):
            raise SignatureError("report_signature", f"report signature does not verify with the {kind}") from None
        passed.append("report_signature")

        check_tcb_matches_leaf(report.reported_tcb, leaf_tcb_components(leaf))
        passed.append("reported_tcb")
        skipped: list[str] = []
        if kind == "VLEK":
            skipped.append("chip_id (VLEK: no per-chip binding)")
        elif report.chip_id_masked:
            if not policy.snp.allow_masked_chip_id:
                raise PolicyViolationError(
                    "chip_id", "CHIP_ID is all zero (firmware MASK_CHIP_ID): the VCEK hwID cannot be checked; "
                    "set snp.allow_masked_chip_id to accept such reports"
                )
            skipped.append("chip_id (MASK_CHIP_ID: CHIP_ID is zero; allowed by policy)")
        else:
            check_chip_id(report, leaf_hwid(leaf), product)
            passed.append("chip_id")

        _apply_snp_policy(report, policy, expected_report_data, passed, skipped)
        return Verdict(
            evidence_type="sev-snp",
            measurement=report.measurement,
            report_data=report.report_data,
            debug=report.debug,
            tcb_status=f"REPORTED_TCB matches {kind} (TCB currency not assessed; pin snp.min_tcb)",
            tcb={
                "reported": str(report.reported_tcb),
                "current": str(report.current_tcb),
                "committed": str(report.committed_tcb),
                "launch": str(report.launch_tcb),
            },
            fields={
                "version": str(report.version),
                "signer": kind,
                "product": product or "unknown",
                "vmpl": str(report.vmpl),
                "guest_policy": f"{report.policy:#018x}",
                "guest_svn": str(report.guest_svn),
                "host_data": report.host_data.hex(),
                "chip_id": report.chip_id.hex(),
                "firmware": "{}.{}.{}".format(*report.current_version),
            },
            verified_at=at,
            checks_passed=tuple(passed),
            checks_skipped=tuple(skipped),
        )


def _apply_snp_policy(
    report: SnpReport,
    policy: AttestationPolicy,
    expected_report_data: bytes | None,
    passed: list[str],
    skipped: list[str],
) -> None:
    if report.debug and not policy.allow_debug:
        raise PolicyViolationError("debug", "guest policy has DEBUG set; the policy refuses debug guests")
    passed.append("debug")
    if report.vmpl not in policy.snp.allowed_vmpls:
        raise PolicyViolationError("vmpl", f"VMPL {report.vmpl} not in allowed {list(policy.snp.allowed_vmpls)}")
    passed.append("vmpl")
    _allow_list("measurement", report.measurement, policy.snp.measurements, passed, skipped)
    _allow_list("host_data", report.host_data, policy.snp.host_data, passed, skipped)
    if policy.snp.min_tcb:
        have = report.reported_tcb.components()
        low = [f"{k} {have.get(k)} < {v}" for k, v in policy.snp.min_tcb.items() if have.get(k, -1) < v]
        if low:
            raise TcbError("min_tcb", "REPORTED_TCB below policy minimum: " + ", ".join(low))
        passed.append("min_tcb")
    else:
        skipped.append("min_tcb (not pinned)")
    check_report_data(report.report_data, expected_report_data, passed, skipped)


def _allow_list(name: str, value: bytes, allowed: Sequence[bytes], passed: list[str], skipped: list[str]) -> None:
    if not allowed:
        skipped.append(f"{name} (not pinned)")
        return
    if value not in allowed:
        raise PolicyViolationError(name, f"{name} {value.hex()} is not in the policy allow-list")
    passed.append(name)


def check_report_data(actual: bytes, expected: bytes | None, passed: list[str], skipped: list[str]) -> None:
    import hmac

    if expected is None:
        skipped.append("report_data (no expected binding given)")
        return
    if len(expected) != 64 or not hmac.compare_digest(actual, expected):
        raise BindingError("report_data", "report_data does not equal the expected binding")
    passed.append("report_data")


register_verifier("sev-snp", SnpVerifier)
