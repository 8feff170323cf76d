"""X.509 helpers shared by the SEV-SNP and TDX verifiers.

``cryptography`` decodes most certificate and CRL fields lazily: a malformed subject, extension or
key only raises when it is first read, and with a zoo of exception types (``ValueError``,
``InvalidVersion``, ``DuplicateExtension``, ``UnsupportedAlgorithm``...). The loaders here read every
field the verifiers use once, inside ``try``, so a certificate or CRL that loads is safe to use
afterwards; every failure becomes the caller's typed :class:`AttestationError` (``error``/``check``).

Chain rule (:func:`verify_chain`): each certificate is signed by the next one, every issuer is a CA
(basicConstraints CA=true, path length not exceeded, keyCertSign when keyUsage is present), the
last one is self-signed, and every certificate is valid at the verification time.
"""

from __future__ import annotations

import hashlib
import warnings
from datetime import datetime
from typing import Sequence

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

from .errors import AttestationError, CertificateChainError, CollateralError

# Everything cryptography raises for a structurally bad certificate, CRL or key.
X509_ERRORS: tuple[type[Exception], ...] = (
    ValueError,
    TypeError,
    x509.InvalidVersion,
    x509.DuplicateExtension,
    x509.UnsupportedGeneralNameType,
    UnsupportedAlgorithm,
)
_SIGNATURE_ERRORS: tuple[type[Exception], ...] = (InvalidSignature, *X509_ERRORS)

ErrorType = type[AttestationError]


def _parse_certificate_fields(cert: x509.Certificate) -> None:
    """Touch every lazily decoded field once (raises one of :data:`X509_ERRORS` when malformed)."""
    cert.subject.rfc4514_string()
    cert.issuer.rfc4514_string()
    _ = cert.serial_number, cert.not_valid_before_utc, cert.not_valid_after_utc, cert.signature_algorithm_oid
    for ext in cert.extensions:
        _ = ext.value
    cert.public_key()


def load_certificate(data: bytes, what: str, error: ErrorType = CertificateChainError, check: str = "cert_parse") -> x509.Certificate:
    """One DER or PEM certificate, fully parsed."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # AMD VCEKs carry serial 0 (a deprecation warning only)
            if bytes(data).lstrip().startswith(b"-----BEGIN"):
                cert = x509.load_pem_x509_certificate(data)
            else:
                cert = x509.load_der_x509_certificate(data)
            _parse_certificate_fields(cert)
    except X509_ERRORS as exc:
        raise error(check, f"cannot parse {what} certificate: {exc}") from None
    return cert


def load_pem_chain(data: bytes, what: str, error: ErrorType = CertificateChainError, check: str = "cert_parse") -> list[x509.Certificate]:
    """All certificates of a PEM bundle, in order, fully parsed."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            certs = x509.load_pem_x509_certificates(data)
            for cert in certs:
                _parse_certificate_fields(cert)
    except X509_ERRORS as exc:
        raise error(check, f"cannot parse {what}: {exc}") from None
    return certs


def load_crl(data: bytes, what: str, error: ErrorType = CollateralError, check: str = "crl") -> x509.CertificateRevocationList:
    """A DER CRL with its issuer, dates, extensions and every revoked entry parsed."""
    try:
        crl = x509.load_der_x509_crl(data)
        crl.issuer.rfc4514_string()
        _ = crl.last_update_utc, crl.next_update_utc, crl.signature_algorithm_oid
        for ext in crl.extensions:
            _ = ext.value
        for entry in crl:
            _ = entry.serial_number, entry.revocation_date_utc
            for ext in entry.extensions:
                _ = ext.value
    except X509_ERRORS as exc:
        raise error(check, f"cannot parse {what}: {exc}") from None
    return crl


def name_of(cert: x509.Certificate) -> str:
    """The subject as an RFC 4514 string (safe on certificates from the loaders above)."""
    return cert.subject.rfc4514_string()


def spki_sha256(cert: x509.Certificate) -> bytes:
    der = cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).digest()


def opaque_extension(cert: x509.Certificate, oid: str, error: ErrorType = CertificateChainError,
                     check: str = "cert_extensions") -> bytes | None:
    """Raw DER value of an extension ``cryptography`` does not know (vendor OIDs), or None if absent."""
    try:
        ext = cert.extensions.get_extension_for_oid(x509.ObjectIdentifier(oid)).value
    except x509.ExtensionNotFound:
        return None
    value = getattr(ext, "value", None)
    if not isinstance(value, bytes):
        raise error(check, f"extension {oid} is not an opaque value")
    return value


def check_validity(cert: x509.Certificate, at: datetime, what: str, error: ErrorType = CertificateChainError, check: str = "cert_validity") -> None:
    if not cert.not_valid_before_utc <= at <= cert.not_valid_after_utc:
        raise error(
            check,
            f"{what} certificate valid {cert.not_valid_before_utc:%Y-%m-%d}..{cert.not_valid_after_utc:%Y-%m-%d}, "
            f"verification time {at:%Y-%m-%d %H:%M:%S}Z is outside",
        )


def check_issued_by(cert: x509.Certificate, issuer: x509.Certificate, what: str, error: ErrorType = CertificateChainError, check: str = "cert_chain") -> None:
    """Issuer name match and signature (RSA-PSS, RSA PKCS#1 or ECDSA, as the certificate says)."""
    try:
        cert.verify_directly_issued_by(issuer)
    except _SIGNATURE_ERRORS as exc:
        raise error(check, f"{what} is not signed by {name_of(issuer)}: {exc or 'bad signature'}") from None


def check_ca(cert: x509.Certificate, what: str, cas_below: int, error: ErrorType = CertificateChainError, check: str = "cert_chain") -> None:
    """``cert`` may issue certificates: basicConstraints CA=true, its path length admits
    ``cas_below`` intermediate CAs beneath it, keyCertSign set when keyUsage is present."""
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        raise error(check, f"{what} ({name_of(cert)}) has no basicConstraints; it cannot act as a CA") from None
    if not constraints.ca:
        raise error(check, f"{what} ({name_of(cert)}) is not a CA certificate (basicConstraints CA=false)")
    if constraints.path_length is not None and cas_below > constraints.path_length:
        raise error(check, f"{what} ({name_of(cert)}) path length {constraints.path_length} < {cas_below} CA(s) below it")
    try:
        usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return
    if not usage.key_cert_sign:
        raise error(check, f"{what} ({name_of(cert)}) keyUsage lacks keyCertSign")


def verify_chain(
    certs: Sequence[x509.Certificate],
    names: Sequence[str],
    at: datetime,
    error: ErrorType = CertificateChainError,
    check: str = "cert_chain",
    validity_check: str | None = None,
) -> None:
    """Verify ``certs`` (leaf first, self-signed root last; ``names`` label them in messages).

    Order: the root's self-signature, each link's signature (root downwards), CA constraints of
    every issuer, then validity windows (``validity_check`` names that failure; default ``check``).
    """
    if len(certs) != len(names) or len(certs) < 2:
        raise error(check, f"a chain needs a leaf and a root, got {len(certs)} certificate(s)")
    root = certs[-1]
    check_issued_by(root, root, f"{names[-1]} (self-signed)", error, check)
    for i in range(len(certs) - 2, -1, -1):
        check_issued_by(certs[i], certs[i + 1], names[i], error, check)
    for i in range(1, len(certs)):
        check_ca(certs[i], names[i], cas_below=i - 1, error=error, check=check)
    for cert, name in zip(certs, names):
        check_validity(cert, at, name, error, validity_check or check)
