"""Test helpers: self-made certificate chains and CRLs (built with ``cryptography``), and systematic
DER byte flips over the structure of real certificates and CRLs."""

from __future__ import annotations

import base64
import re
from datetime import datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from bifrost.attest import _der

from .conftest import utc

NOT_BEFORE, NOT_AFTER = utc(2020, 1, 1), utc(2040, 1, 1)
PSS_SHA384 = padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=48)  # AMD's ARK/ASK signature scheme


def name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, cn)])


def make_cert(
    subject: str,
    key,
    issuer: str | None = None,
    issuer_key=None,
    *,
    ca: bool | None = True,
    path_length: int | None = None,
    key_cert_sign: bool | None = None,
    serial: int = 1,
    extensions: tuple[x509.ExtensionType, ...] = (),
    pss: bool = False,
) -> x509.Certificate:
    """A certificate for ``key``'s public key; self-signed when ``issuer_key`` is None.
    ``ca=None`` omits basicConstraints; ``key_cert_sign=None`` omits keyUsage."""
    builder = (
        x509.CertificateBuilder().subject_name(name(subject)).issuer_name(name(issuer or subject))
        .public_key(key.public_key()).serial_number(serial).not_valid_before(NOT_BEFORE).not_valid_after(NOT_AFTER)
    )
    if ca is not None:
        builder = builder.add_extension(x509.BasicConstraints(ca=ca, path_length=path_length if ca else None), critical=True)
    if key_cert_sign is not None:
        builder = builder.add_extension(
            x509.KeyUsage(digital_signature=not key_cert_sign, content_commitment=False, key_encipherment=False,
                          data_encipherment=False, key_agreement=False, key_cert_sign=key_cert_sign, crl_sign=key_cert_sign,
                          encipher_only=False, decipher_only=False),
            critical=True,
        )
    for ext in extensions:
        builder = builder.add_extension(ext, critical=False)
    signer = issuer_key or key
    if isinstance(signer, rsa.RSAPrivateKey):
        return builder.sign(signer, hashes.SHA384(), rsa_padding=PSS_SHA384 if pss else None)
    return builder.sign(signer, hashes.SHA256() if isinstance(signer.curve, ec.SECP256R1) else hashes.SHA384())


def make_crl(issuer: x509.Certificate, issuer_key, revoked_serials=(), *, last: datetime, days: int = 30) -> bytes:
    """A DER CRL issued by ``issuer`` (signed with ``issuer_key``), valid ``last``..``last + days``."""
    builder = x509.CertificateRevocationListBuilder().issuer_name(issuer.subject).last_update(last)
    builder = builder.next_update(last + timedelta(days=days))
    for serial in revoked_serials:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(last).build()
        )
    crl = builder.sign(issuer_key, hashes.SHA256())
    return crl.public_bytes(serialization.Encoding.DER)


def der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def pem(cert_der: bytes, width: int = 64) -> bytes:
    body = base64.b64encode(cert_der)
    lines = b"\n".join(body[i : i + width] for i in range(0, len(body), width))
    return b"-----BEGIN CERTIFICATE-----\n" + lines + b"\n-----END CERTIFICATE-----\n"


_PEM_BLOCK = re.compile(rb"-----BEGIN CERTIFICATE-----\n(.*?)\n-----END CERTIFICATE-----\n", re.S)


def pem_blocks_der(text: bytes) -> list[bytes]:
    return [base64.b64decode(m.group(1)) for m in _PEM_BLOCK.finditer(text)]


def replace_pem_block(text: bytes, index: int, new_der: bytes) -> bytes:
    """``text`` with its ``index``-th PEM certificate replaced by ``new_der`` (same 64-column layout)."""
    match = list(_PEM_BLOCK.finditer(text))[index]
    return text[: match.start()] + pem(new_der) + text[match.end() :]


# ----------------------------------------------------------------------------- DER flips

FLIP_MASKS = (0x01, 0x80, 0xFF, 0x20)


def der_structure_offsets(data: bytes, base: int = 0) -> list[int]:
    """Offsets of every tag and length byte in a DER tree, descending into constructed values and
    into OCTET STRING contents that are themselves DER (certificate extension values)."""
    out: list[int] = []
    pos = 0
    while pos < len(data):
        try:
            tag, value, end = _der.read_tlv(data, pos)
        except ValueError:
            break
        start = end - len(value)
        out.extend(range(base + pos, base + start))
        if tag & 0x20 or (tag == _der.TAG_OCTET_STRING and _is_der(value)):
            out.extend(der_structure_offsets(value, base + start))
        pos = end
    return out


def _is_der(data: bytes) -> bool:
    pos = 0
    try:
        while pos < len(data):
            _, _, pos = _der.read_tlv(data, pos)
    except ValueError:
        return False
    return len(data) > 0


def flip_cases(data: bytes, limit: int, value_stride: int = 13) -> list[tuple[int, int]]:
    """(offset, XOR mask) pairs: every DER tag/length byte plus every ``value_stride``-th byte,
    thinned evenly to at most ``limit``; masks rotate through :data:`FLIP_MASKS`."""
    offsets = sorted(set(der_structure_offsets(data)) | set(range(0, len(data), value_stride)))
    if len(offsets) > limit:
        step = len(offsets) / limit
        offsets = [offsets[int(i * step)] for i in range(limit)]
    return [(off, FLIP_MASKS[i % len(FLIP_MASKS)]) for i, off in enumerate(offsets)]


def flipped(data: bytes, offset: int, mask: int) -> bytes:
    out = bytearray(data)
    out[offset] ^= mask
    return bytes(out)


def signed_range(data: bytes, signed_part: bytes) -> range:
    """Where the signed part (TBSCertificate / TBSCertList) lies inside the DER."""
    start = data.find(signed_part)
    assert start >= 0
    return range(start, start + len(signed_part))
