"""AMD SEV-SNP verification: the endorsement key, its certificate chain, the report signature, and
REPORTED_TCB against the key's TCB.

``signing_key``: SIGNER_INFO names VCEK (0) or VLEK (1), MASK_CHIP_KEY is not set with a VCEK
signer, the supplied leaf is of that kind (CN ``SEV-VCEK``/``SEV-VLEK``) and of the report's CPU
family (``product``). ``cert_chain``: leaf <- ASK (VCEK) or ASVK (VLEK) <- ARK, RSA-PSS signatures,
issuers are CAs (basicConstraints, path length, keyCertSign), every certificate valid at the
verification time (``cert_validity``), the ARK's key one of the trusted pins
(:class:`~..options.VerifyOptions`; ``root_not_trusted``). ``report_signature``: ECDSA-P384 over
bytes [0, 0x2A0) with the leaf key. ``reported_tcb``: REPORTED_TCB equals the TCB the leaf was
issued for (its SPL extensions; Turin keys also name the FMC SPL). The CHIP_ID binding
(:func:`check_chip_id_matches_hwid`) is applied by :func:`.validate.check_chip_id`, which the policy governs.
"""

from __future__ import annotations

import functools
import types
from dataclasses import dataclass
from datetime import datetime
from typing import Mapping

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, utils as asym_utils

from .._x509 import load_certificate, load_pem_chain, spki_sha256, verify_chain
from ..checks import CheckLog
from ..errors import CertificateChainError, EndorsementMismatchError, SignatureError, TcbError
from ..options import DEFAULT_OPTIONS, VerifyOptions
from ..types import Evidence
from .parse import (SIGNER_VCEK, SIGNER_VLEK, SNP_CHIP_ID_SIZE, TURIN_FAMILY, TURIN_HWID_SIZE, SnpReport, SnpTcbVersion,
                    leaf_tcb_components, product_name)

_PRODUCT_FAMILIES = {"Milan": (0x19,), "Genoa": (0x19,), "Turin": (TURIN_FAMILY,)}


@dataclass(frozen=True)
class Signer:
    """The report's endorsement key: ``kind`` "VCEK" or "VLEK", its certificate, its product line."""

    kind: str
    leaf: x509.Certificate
    product: str | None


@functools.lru_cache(maxsize=None)
def _parse_chain(pem: str) -> tuple[x509.Certificate, ...]:
    """A bundled ASK/ASVK + ARK chain, parsed once per process."""
    return tuple(load_pem_chain(pem.encode(), "bundled AMD chain"))


@functools.lru_cache(maxsize=8)
def _ark_pins(*tables: tuple[tuple[str, str], ...]) -> Mapping[bytes, str]:
    pins: dict[bytes, str] = {}
    for table in tables:
        for product, pem in table:
            pins[spki_sha256(_parse_chain(pem)[-1])] = f"ARK-{product}"
    return types.MappingProxyType(pins)


def trusted_ark_pins(options: VerifyOptions) -> Mapping[bytes, str]:
    """SHA-256 of each trusted ARK SubjectPublicKeyInfo -> label: ``options.amd_ark_pins``, or the
    ARKs of the options' chain tables (``"ARK-<product>"``)."""
    if options.amd_ark_pins is not None:
        return options.amd_ark_pins
    return _ark_pins(tuple(options.amd_vcek_chains.items()), tuple(options.amd_vlek_chains.items()))


def bundled_ark_pins() -> Mapping[bytes, str]:
    """The pins of the bundled AMD roots (read-only)."""
    return trusted_ark_pins(DEFAULT_OPTIONS)


def check_signing_key(report: SnpReport, evidence: Evidence, log: CheckLog) -> Signer:
    """``signing_key`` (and ``product``, ``cert_missing``): the supplied leaf is the report's signer."""
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
    product = product_name(leaf)
    if report.cpuid_fam_id is not None and product is not None:
        family = _PRODUCT_FAMILIES.get(product)
        if family is not None and report.cpuid_fam_id not in family:
            raise EndorsementMismatchError("product", f"report CPU family {report.cpuid_fam_id:#x} does not match {product} key")
    if product == "Turin" and report.cpuid_fam_id is None:
        raise EndorsementMismatchError("product", f"a Turin key signed a v{report.version} report without CPUID fields")
    log.ok("signing_key")
    return Signer(kind.upper(), leaf, product)


def check_cert_chain(signer: Signer, evidence: Evidence, at: datetime, options: VerifyOptions, log: CheckLog) -> None:
    """``cert_chain`` (and ``cert_missing``, ``root_not_trusted``, ``cert_validity``): leaf <- ASK/ASVK
    <- a trusted ARK; the supplied ``cert_chain`` endorsement, else the options' chain for the product."""
    if "cert_chain" in evidence.endorsements:
        chain = load_pem_chain(evidence.endorsements["cert_chain"], "AMD certificate chain")
    else:
        table = options.amd_chains(signer.kind.lower())
        if signer.product is None or signer.product not in table:
            raise CertificateChainError("cert_missing", f"no bundled AMD chain for product {signer.product!r}; supply --cert-chain")
        chain = list(_parse_chain(table[signer.product]))
    if len(chain) != 2:
        raise CertificateChainError("cert_chain", f"AMD chain must be ASK/ASVK then ARK, got {len(chain)} certificates")
    intermediate, ark = chain
    if spki_sha256(ark) not in trusted_ark_pins(options):
        raise CertificateChainError("root_not_trusted", "ARK is not one of the bundled AMD root keys")
    verify_chain([signer.leaf, intermediate, ark], [signer.kind, "ASK/ASVK", "ARK"], at, validity_check="cert_validity")
    log.ok("cert_chain")


def check_report_signature(report: SnpReport, signer: Signer, log: CheckLog) -> None:
    """``report_signature`` (and ``cert_key``): ECDSA P-384 / SHA-384 by the leaf key."""
    public_key = signer.leaf.public_key()
    if not isinstance(public_key, ec.EllipticCurvePublicKey) or public_key.curve.name != "secp384r1":
        raise CertificateChainError("cert_key", f"{signer.kind} key is not ECDSA P-384")
    try:
        signature = asym_utils.encode_dss_signature(report.signature_r, report.signature_s)
        public_key.verify(signature, report.signed_bytes, ec.ECDSA(hashes.SHA384()))
    except (InvalidSignature, ValueError):
        raise SignatureError("report_signature", f"report signature does not verify with the {signer.kind}") from None
    log.ok("report_signature")


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


def check_reported_tcb(report: SnpReport, signer: Signer, log: CheckLog) -> None:
    """``reported_tcb``: the report's REPORTED_TCB is the TCB the endorsement key was issued for."""
    check_tcb_matches_leaf(report.reported_tcb, leaf_tcb_components(signer.leaf))
    log.ok("reported_tcb")


def check_chip_id_matches_hwid(report: SnpReport, hwid: bytes | None, product: str | None) -> None:
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
