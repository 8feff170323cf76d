"""Pinned-key mutual TLS between trusted runtimes and CKKS workers: identities are not free.

Every worker and every trusted runtime has a TLS identity: an ECDSA P-256 key and a self-signed
certificate (``cryptography``). The *identity* of a peer is the SHA-256 of its certificate's
SubjectPublicKeyInfo (hex), shown as ``sha256:<hex>``.

Each certificate's subject names its key (``CN=<role>, serialNumber=<SPKI SHA-256 hex>``) and carries its
subject key identifier. A worker trusts several runtimes by holding their self-signed certificates as trust
roots, and TLS finds the root that signed a client's certificate by subject: with one shared subject it took
the first certificate of that name, and every runtime but the first failed its handshake. A list of
trusted certificates whose subjects collide (identities made before subjects named their keys) is refused
at load, naming the certificates (:func:`check_distinct_subjects`).

- A worker listens only with TLS and requires a client certificate from a configured list
  (``worker.trusted_clients``): only those trusted runtimes can open worker sessions or call anything.
- A trusted runtime connects to a worker only under that worker's *pinned* certificate (the sole trust
  root of the gRPC channel; the TLS server name is the fixed :data:`WORKER_TLS_NAME`), so a worker cannot be
  impersonated, and a worker identity that was quarantined stays recognisable under any address.

A new identity is an operator's act (copy its certificate to the other side), so a worker banned for
misbehaviour cannot come back as a fresh one by itself.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import threading
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from ..errors import UserError

WORKER_TLS_NAME = "bifrost-worker"          # DNS name in every worker certificate; pinned, not resolved
TRUSTED_TLS_NAME = "bifrost-trusted-runtime"
KEY_FILE, CERT_FILE = "key.pem", "cert.pem"
VALIDITY_DAYS = 3650


def fingerprint(cert_pem: bytes) -> str:
    """``sha256:<hex>`` of the certificate's SubjectPublicKeyInfo (DER)."""
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
        spki = cert.public_key().public_bytes(serialization.Encoding.DER,
                                              serialization.PublicFormat.SubjectPublicKeyInfo)
    except (ValueError, TypeError) as exc:
        raise UserError(f"not a PEM certificate: {exc}") from None
    return "sha256:" + hashlib.sha256(spki).hexdigest()


@dataclass(frozen=True)
class TLSIdentity:
    """A private key and its self-signed certificate (PEM). ``fingerprint`` names the identity."""

    key_pem: bytes
    cert_pem: bytes

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.cert_pem)

    @classmethod
    def generate(cls, dns_name: str) -> "TLSIdentity":
        """A fresh P-256 key (OS CSPRNG) and a self-signed certificate for ``dns_name``."""
        key = ec.generate_private_key(ec.SECP256R1())
        spki = key.public_key().public_bytes(serialization.Encoding.DER,
                                             serialization.PublicFormat.SubjectPublicKeyInfo)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, dns_name),
                          x509.NameAttribute(NameOID.SERIAL_NUMBER, hashlib.sha256(spki).hexdigest())])
        now = datetime.datetime.now(datetime.timezone.utc)
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(days=VALIDITY_DAYS))
                .add_extension(x509.SubjectAlternativeName([x509.DNSName(dns_name)]), critical=False)
                .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                .add_extension(ski, critical=False)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
                .sign(key, hashes.SHA256()))
        key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        return cls(key_pem, cert.public_bytes(serialization.Encoding.PEM))

    def save(self, folder: str | os.PathLike) -> Path:
        """Write key.pem (mode 0600) and cert.pem into ``folder``; returns the certificate's path."""
        d = Path(folder)
        d.mkdir(parents=True, exist_ok=True)
        key_path = d / KEY_FILE
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(self.key_pem)
        (d / CERT_FILE).write_bytes(self.cert_pem)
        return d / CERT_FILE

    @classmethod
    def load(cls, folder: str | os.PathLike) -> "TLSIdentity":
        d = Path(folder)
        try:
            key_pem, cert_pem = (d / KEY_FILE).read_bytes(), (d / CERT_FILE).read_bytes()
        except OSError as exc:
            raise UserError(f"cannot read the TLS identity in {d}: {exc.strerror} ({exc.filename})") from None
        fingerprint(cert_pem)  # validates the certificate
        return cls(key_pem, cert_pem)

    @classmethod
    def load_or_create(cls, folder: str | os.PathLike, dns_name: str) -> "TLSIdentity":
        d = Path(folder)
        if (d / KEY_FILE).exists() or (d / CERT_FILE).exists():
            return cls.load(d)
        identity = cls.generate(dns_name)
        identity.save(d)
        return identity


def read_certificate(path: str | os.PathLike) -> bytes:
    """A PEM certificate file's bytes (validated), or a one-line :class:`BifrostError`."""
    try:
        pem = Path(path).read_bytes()
    except OSError as exc:
        raise UserError(f"cannot read certificate {path}: {exc.strerror}") from None
    fingerprint(pem)
    return pem


@dataclass(frozen=True)
class WorkerEndpoint:
    """Where a worker listens and the certificate it must present (its pinned identity)."""

    address: str
    cert_pem: bytes

    @property
    def identity(self) -> str:
        return fingerprint(self.cert_pem)

    @classmethod
    def from_files(cls, address: str, cert_path: str | os.PathLike) -> "WorkerEndpoint":
        return cls(address, read_certificate(cert_path))


_PROCESS_IDENTITY: TLSIdentity | None = None
_PROCESS_LOCK = threading.Lock()


def process_identity() -> TLSIdentity:
    """This process's ephemeral trusted-runtime identity (made once, kept in memory only): what a trusted
    runtime presents to workers when no identity folder is configured, e.g. to the local workers it starts."""
    global _PROCESS_IDENTITY
    with _PROCESS_LOCK:
        if _PROCESS_IDENTITY is None:
            _PROCESS_IDENTITY = TLSIdentity.generate(TRUSTED_TLS_NAME)
        return _PROCESS_IDENTITY


def server_credentials(identity: TLSIdentity, trusted_clients: list[bytes]):
    """gRPC credentials of a worker: its own identity, and a client certificate from ``trusted_clients``
    required on every connection."""
    import grpc

    if not trusted_clients:
        raise UserError("a worker needs at least one trusted runtime certificate (worker.trusted_clients)")
    check_distinct_subjects(trusted_clients)
    return grpc.ssl_server_credentials([(identity.key_pem, identity.cert_pem)],
                                       root_certificates=b"".join(trusted_clients), require_client_auth=True)


def check_distinct_subjects(certificates: list[bytes]) -> None:
    """Refuse trust roots that TLS cannot tell apart: two certificates with one subject (:class:`UserError`
    naming both by fingerprint). The same certificate listed twice is harmless and allowed."""
    seen: dict[str, str] = {}
    for pem in certificates:
        fp = fingerprint(pem)
        subject = x509.load_pem_x509_certificate(pem).subject.rfc4514_string()
        other = seen.setdefault(subject, fp)
        if other != fp:
            raise UserError(f"trusted certificates {other[:23]}… and {fp[:23]}… share the subject {subject!r}: TLS would "
                            "accept only one of them; recreate the older identity (`bifrost identity create DIR`: "
                            "a new identity's subject names its key) and list its new certificate")


def worker_channel(endpoint: WorkerEndpoint, identity: TLSIdentity, options: list[tuple] | None = None):
    """A gRPC channel to ``endpoint`` that trusts only its pinned certificate and presents ``identity``."""
    import grpc

    creds = grpc.ssl_channel_credentials(root_certificates=endpoint.cert_pem, private_key=identity.key_pem,
                                         certificate_chain=identity.cert_pem)
    opts = list(options or []) + [("grpc.ssl_target_name_override", WORKER_TLS_NAME),
                                  ("grpc.default_authority", WORKER_TLS_NAME)]
    return grpc.secure_channel(endpoint.address, creds, options=opts)
