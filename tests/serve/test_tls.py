"""TLS on the serving port: config validation, attest + chat over TLS, `bifrost chat --tls-ca`, and clear
errors for a plaintext client on a TLS port or a TLS client that does not trust the certificate."""

from __future__ import annotations

import datetime
import ipaddress
import ssl

import grpc
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from bifrost.errors import BifrostError
from bifrost.model.tokenizer import ByteTokenizer
from bifrost.serve.config import ServeConfig

from .conftest import MODEL, make_policy, plaintext_greedy


def _self_signed(folder, name: str = "server"):
    """A self-signed certificate for localhost / 127.0.0.1 (it is its own CA); returns (cert, key) paths."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = folder / f"{name}.crt", folder / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


@pytest.fixture()
def certs(tmp_path):
    return _self_signed(tmp_path)


@pytest.fixture()
def tls_app(app_factory, worker_factory, certs):
    _, _, address = worker_factory(MODEL, 64)
    cert, key = certs
    return app_factory(worker=address, tls_cert_file=str(cert), tls_key_file=str(key))


def test_tls_config_is_validated_at_load(certs, tmp_path):
    cert, key = certs
    assert ServeConfig(tls_cert_file=str(cert), tls_key_file=str(key)).tls_credentials()[1] == cert.read_bytes()
    assert ServeConfig().tls_credentials() is None
    with pytest.raises(BifrostError, match="both tls_cert_file and tls_key_file"):
        ServeConfig(tls_cert_file=str(cert))
    with pytest.raises(BifrostError, match="serve.tls_key_file: cannot read"):
        ServeConfig(tls_cert_file=str(cert), tls_key_file=str(tmp_path / "missing.key"))
    with pytest.raises(BifrostError, match="no PEM certificate"):
        ServeConfig(tls_cert_file=str(key), tls_key_file=str(key))
    with pytest.raises(BifrostError, match="no PEM private key"):
        ServeConfig(tls_cert_file=str(cert), tls_key_file=str(cert))
    other_cert, other_key = _self_signed(tmp_path, "other")
    with pytest.raises(BifrostError, match="not the key of the certificate"):
        ServeConfig(tls_cert_file=str(cert), tls_key_file=str(other_key))
    encrypted = tmp_path / "encrypted.key"
    k = serialization.load_pem_private_key(key.read_bytes(), None)
    encrypted.write_bytes(k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.BestAvailableEncryption(b"pw")))
    with pytest.raises(BifrostError, match="encrypted"):
        ServeConfig(tls_cert_file=str(cert), tls_key_file=str(encrypted))


def test_serve_cli_refuses_half_a_tls_pair_in_one_line(certs, tmp_path, capsys):
    from bifrost.cli import main

    code = main(["serve", "--run-dir", str(tmp_path / "run"), "--tls-cert", str(certs[0])])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) == 1 and err[0].startswith("bifrost: error:") and "--tls-key" in err[0]


def test_attest_and_chat_over_tls(tls_app, certs, serve_run_config):
    from bifrost.serve.client import BifrostClient

    assert ssl.get_server_certificate(("127.0.0.1", tls_app.port)).strip() == certs[0].read_text().strip()
    policy = make_policy(tls_app.service.info.model_digest)
    with BifrostClient(f"127.0.0.1:{tls_app.port}", policy, timeout_s=120, tls_ca_file=str(certs[0])) as c:
        assert c.attest().simulated
        result = c.chat("Over TLS", 3)
    assert result.tokens == plaintext_greedy(MODEL, serve_run_config.seed, ByteTokenizer().encode("Over TLS"), 3)
    with BifrostClient(f"localhost:{tls_app.port}", policy, timeout_s=120,
                       tls_root_certificates=certs[0].read_bytes()) as c:  # the DNS name in the SAN works too
        c.attest()
        assert len(c.chat("by name", 1).tokens) == 1


def test_plaintext_client_on_a_tls_port_and_an_untrusting_tls_client_fail_clearly(tls_app, tmp_path):
    from bifrost.serve.client import BifrostClient, ServingError

    policy = make_policy(tls_app.service.info.model_digest)
    with BifrostClient(f"127.0.0.1:{tls_app.port}", policy, timeout_s=30) as plain:
        with pytest.raises(ServingError) as err:
            plain.attest()
    assert err.value.code == grpc.StatusCode.UNAVAILABLE and "tls_ca_file" in err.value.details
    assert "--tls-ca" in err.value.details
    wrong_ca, _ = _self_signed(tmp_path, "unrelated")
    with BifrostClient(f"127.0.0.1:{tls_app.port}", policy, timeout_s=30, tls_ca_file=str(wrong_ca)) as untrusting:
        with pytest.raises(ServingError) as err:
            untrusting.attest()
    assert err.value.code == grpc.StatusCode.UNAVAILABLE and "CA file" in err.value.details
    with pytest.raises(BifrostError, match="cannot read the TLS CA file"):
        BifrostClient("127.0.0.1:1", policy, tls_ca_file=str(tmp_path / "missing.pem"))


def test_chat_cli_with_tls_ca(tls_app, certs, tmp_path, capsys):
    from bifrost.cli import main

    policy_file = tmp_path / "policy.yaml"
    policy_file.write_text(yaml.safe_dump({"allow_simulated": True,
                                           "model_digests": [tls_app.service.info.model_digest.hex()]}))
    args = ["chat", "--address", f"127.0.0.1:{tls_app.port}", "--policy", str(policy_file), "--prompt", "hello",
            "--max-new-tokens", "2"]
    assert main(args + ["--tls-ca", str(certs[0])]) == 0
    err = capsys.readouterr().err
    assert "[2 tokens, finished: length]" in err
    assert main(args) != 0  # no --tls-ca: one clear line, no traceback
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith("bifrost: error:") and "--tls-ca" in last and "Traceback" not in err
