"""Several trusted runtimes per worker: a worker accepts every runtime identity in its trusted-client list and
no other, a runtime taken off the list is locked out at the worker's restart, and trust roots TLS could not
tell apart are refused at load. Real mutual TLS over gRPC (in-process servers and a worker process)."""

from __future__ import annotations

import datetime
import json

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from bifrost.attest.mtls import (TRUSTED_TLS_NAME, WORKER_TLS_NAME, TLSIdentity, WorkerEndpoint, server_credentials,
                                 worker_channel)
from bifrost.cli import main
from bifrost.errors import UserError
from bifrost.proto import worker_pb2, worker_pb2_grpc
from bifrost.worker.service import serve

MODEL = "gpt2-mini"


def _accepts(endpoint: WorkerEndpoint, identity: TLSIdentity) -> bool:
    """Whether the worker at ``endpoint`` answers an RPC from ``identity`` (the handshake needs a trusted
    client certificate)."""
    channel = worker_channel(endpoint, identity)
    try:
        layers = worker_pb2_grpc.CKKSWorkerStub(channel).Describe(worker_pb2.DescribeRequest(), timeout=30).layers
        assert layers  # a real answer, not an empty reply
        return True
    except grpc.RpcError as exc:
        assert exc.code() == grpc.StatusCode.UNAVAILABLE  # refused in the TLS handshake, nothing else
        return False
    finally:
        channel.close()


@pytest.fixture(scope="module")
def service(run_config):
    from tests.workers import make_service

    return make_service(run_config, MODEL)


def test_a_worker_process_accepts_each_of_three_runtimes_and_no_other(run_config):
    """The operator's path: ``bifrost worker --trusted-client A --trusted-client B --trusted-client C``."""
    from bifrost.worker.launcher import LocalWorker

    runtimes = [TLSIdentity.generate(TRUSTED_TLS_NAME) for _ in range(3)]
    stranger = TLSIdentity.generate(TRUSTED_TLS_NAME)
    with LocalWorker(MODEL, run_config.seed, [r.cert_pem for r in runtimes]) as worker:
        assert [_accepts(worker.endpoint, r) for r in runtimes] == [True, True, True]
        assert not _accepts(worker.endpoint, stranger)
        assert [_accepts(worker.endpoint, r) for r in reversed(runtimes)] == [True, True, True]


def test_a_runtime_taken_off_the_list_is_locked_out_when_the_worker_restarts(service):
    runtimes = [TLSIdentity.generate(TRUSTED_TLS_NAME) for _ in range(3)]
    worker = TLSIdentity.generate(WORKER_TLS_NAME)  # the worker keeps its identity across the restart

    def start(trusted: list[TLSIdentity]):
        server, port = serve(service, server_credentials(worker, [r.cert_pem for r in trusted]), "127.0.0.1", 0)
        return server, WorkerEndpoint(f"127.0.0.1:{port}", worker.cert_pem)

    server, endpoint = start(runtimes)
    try:
        assert all(_accepts(endpoint, r) for r in runtimes)
    finally:
        server.stop(grace=None)
    server, endpoint = start([runtimes[0], runtimes[2]])  # runtime 1 retired
    try:
        assert [_accepts(endpoint, r) for r in runtimes] == [True, False, True]
    finally:
        server.stop(grace=None)


def _legacy_certificate() -> bytes:
    """A runtime certificate as identities were made before subjects named their keys (CN only)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, TRUSTED_TLS_NAME)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .sign(key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.PEM)


def test_trusted_certificates_that_share_a_subject_are_refused_by_name():
    worker = TLSIdentity.generate(WORKER_TLS_NAME)
    a, b = _legacy_certificate(), _legacy_certificate()
    with pytest.raises(UserError, match="share the subject") as caught:
        server_credentials(worker, [a, b])
    assert "bifrost identity create" in str(caught.value)
    server_credentials(worker, [a, a, TLSIdentity.generate(TRUSTED_TLS_NAME).cert_pem])  # one legacy one is fine


def test_identity_create_and_show(tmp_path, capsys):
    folder = tmp_path / "runtime-1"
    assert main(["identity", "create", str(folder)]) == 0
    made = TLSIdentity.load(folder)
    assert made.fingerprint in capsys.readouterr().out
    assert main(["identity", "show", str(folder), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["fingerprint"] == made.fingerprint and shown["role"] == "runtime" and shown["subject_names_key"]
    assert made.fingerprint.removeprefix("sha256:") in shown["subject"]
    assert main(["identity", "create", str(folder)]) == 2  # never overwrites a key
    assert "already holds an identity" in capsys.readouterr().err and TLSIdentity.load(folder) == made
    assert main(["identity", "create", str(tmp_path / "w"), "--role", "worker"]) == 0
    legacy = tmp_path / "legacy.pem"
    legacy.write_bytes(_legacy_certificate())
    capsys.readouterr()
    assert main(["identity", "show", str(legacy)]) == 0
    out = capsys.readouterr().out
    assert "subject_names_key: False" in out and "recreate it" in out
