"""``bifrost identity create DIR`` / ``bifrost identity show DIR|CERT``: the TLS identities of trusted runtimes
and CKKS workers (:mod:`bifrost.attest.mtls`).

An identity folder holds ``key.pem`` (mode 0600) and ``cert.pem``. A runtime's certificate goes into every
worker's ``--trusted-client`` list; a worker's certificate is pinned by the runtimes (``--worker-certs``).
``create`` never overwrites an identity: a new key is a new identity that the other side must be told about.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..errors import UserError
from .mtls import CERT_FILE, KEY_FILE, TRUSTED_TLS_NAME, WORKER_TLS_NAME, TLSIdentity, fingerprint, read_certificate

ROLES = {"runtime": TRUSTED_TLS_NAME, "worker": WORKER_TLS_NAME}


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("identity", help="create or show the TLS identity of a trusted runtime or worker")
    sub = p.add_subparsers(dest="identity_command", metavar="ACTION")
    create = sub.add_parser("create", help="a new key and self-signed certificate in a new folder")
    create.add_argument("folder", metavar="DIR")
    create.add_argument("--role", choices=sorted(ROLES), default="runtime",
                        help="runtime: presented to workers (default); worker: presented to runtimes")
    create.set_defaults(func=run_create)
    show = sub.add_parser("show", help="an identity's fingerprint, role, subject and validity")
    show.add_argument("path", metavar="DIR|CERT", help="an identity folder or a certificate (PEM)")
    show.add_argument("--json", action="store_true", help="print JSON")
    show.set_defaults(func=run_show)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def run_create(args: argparse.Namespace) -> int:
    folder = Path(args.folder)
    if (folder / KEY_FILE).exists() or (folder / CERT_FILE).exists():
        raise UserError(f"{folder} already holds an identity; choose a new folder (a new key is a new identity)")
    identity = TLSIdentity.generate(ROLES[args.role])
    cert = identity.save(folder)
    print(f"{args.role} identity {identity.fingerprint}")
    print(f"certificate: {cert}  (give it to the other side: "
          f"{'--trusted-client on each worker' if args.role == 'runtime' else '--worker-certs on each runtime'})")
    return 0


def describe(cert_pem: bytes) -> dict:
    """What ``show`` prints: fingerprint, role, subject, validity, and whether the subject names the key."""
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    cert = x509.load_pem_x509_certificate(cert_pem)
    key_hash = fingerprint(cert_pem).removeprefix("sha256:")
    names = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.SERIAL_NUMBER)]
    cn = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    role = {v: k for k, v in ROLES.items()}.get(str(cn[0]) if cn else "", "unknown")
    return {"fingerprint": fingerprint(cert_pem), "role": role, "subject": cert.subject.rfc4514_string(),
            "not_valid_after": cert.not_valid_after_utc.isoformat(),
            "subject_names_key": key_hash in names}


def run_show(args: argparse.Namespace) -> int:
    path = Path(args.path)
    info = describe(read_certificate(path / CERT_FILE if path.is_dir() else path))
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    for key, value in info.items():
        print(f"{key}: {value}")
    if not info["subject_names_key"]:
        print("note: made before subjects named their keys; a worker cannot trust it beside another such identity "
              "of the same role (recreate it with `bifrost identity create`)")
    return 0
