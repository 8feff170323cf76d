"""Evidence providers: configfs-tsm against a fake configfs tree, simulated provider, registries."""

from __future__ import annotations

import secrets
import uuid

import pytest

from bifrost.attest.binding import compute_report_data
from bifrost.attest.channel import ClientHandshake, ServerHandshake
from bifrost.attest.errors import (
    EvidenceFormatError,
    PolicyViolationError,
    ProviderError,
    SignatureError,
    UnsupportedEvidenceError,
)
from bifrost.attest.evidence import (
    CONFIGFS_TSM_REPORT_ROOT,
    ConfigfsTsmProvider,
    SimulatedProvider,
    auto_provider,
    detect_tsm_evidence_type,
    get_provider,
    provider_names,
)
from bifrost.attest.policy import DEFAULT_POLICY, AttestationPolicy
from bifrost.attest.tokens import TokenGate, TokenIssuer
from bifrost.attest.verdict import Evidence, get_verifier, verify_evidence

from .conftest import SNP_VECTORS, read

ALLOW_SIM = AttestationPolicy(allow_simulated=True)


def fake_tsm(tmp_path, provider: str, outblob: bytes, auxblob: bytes | None = None, entry: str = "e0"):
    """A configfs-tsm report entry as the kernel exposes it (attributes as files)."""
    root = tmp_path / "tsm" / "report"
    d = root / entry
    d.mkdir(parents=True)
    (d / "provider").write_text(provider + "\n")
    (d / "generation").write_text("1\n")
    (d / "inblob").write_bytes(b"")
    (d / "outblob").write_bytes(outblob)
    if auxblob is not None:
        (d / "auxblob").write_bytes(auxblob)
    return root


def cert_table(entries: dict[str, bytes]) -> bytes:
    offset = 24 * (len(entries) + 1)
    table, blobs = b"", b""
    for guid, blob in entries.items():
        table += uuid.UUID(guid).bytes_le + offset.to_bytes(4, "little") + len(blob).to_bytes(4, "little")
        blobs += blob
        offset += len(blob)
    return table + bytes(24) + blobs


def test_configfs_snp_report_and_certs(tmp_path) -> None:
    v = SNP_VECTORS["genoa_vcek_v3"]
    vcek = read("snp_genoa_vcek.pem")
    root = fake_tsm(tmp_path, "sev_guest", read(v.report), cert_table({"63da758d-e664-4564-adc5-f4b93be8accd": vcek}))
    provider = ConfigfsTsmProvider("sev-snp", root=root, entry_name="e0")
    assert provider.is_available()
    report_data = secrets.token_bytes(64)
    ev = provider.get_evidence(report_data)
    assert (root / "e0" / "inblob").read_bytes() == report_data  # the real write protocol
    assert ev.evidence_type == "sev-snp" and ev.raw == read(v.report)
    assert ev.endorsements == {"vcek": vcek}
    verdict = verify_evidence(ev, DEFAULT_POLICY, at=v.at)  # verifies end to end from configfs output
    assert "report_signature" in verdict.checks_passed


def test_configfs_tdx_quote(tmp_path) -> None:
    quote = read("tdx_quote_v4_dcapqvl.dat")
    root = fake_tsm(tmp_path, "tdx_guest", quote)
    ev = ConfigfsTsmProvider("tdx", root=root, entry_name="e0").get_evidence(bytes(64))
    assert ev.evidence_type == "tdx" and ev.raw == quote and ev.endorsements == {}


def test_configfs_provider_mismatch(tmp_path) -> None:
    root = fake_tsm(tmp_path, "sev_guest", b"x")
    with pytest.raises(ProviderError) as exc:
        ConfigfsTsmProvider("tdx", root=root, entry_name="e0").get_evidence(bytes(64))
    assert exc.value.check == "provider_mismatch"


def test_configfs_generation_race_detected(tmp_path, monkeypatch) -> None:
    root = fake_tsm(tmp_path, "tdx_guest", b"quote")
    provider = ConfigfsTsmProvider("tdx", root=root, entry_name="e0")
    gen = root / "e0" / "generation"
    from pathlib import Path

    real_read_bytes = Path.read_bytes

    def racing_read(self):
        data = real_read_bytes(self)
        if self.name == "outblob":  # another writer bumps generation while we read
            gen.write_text("2\n")
        return data

    monkeypatch.setattr(Path, "read_bytes", racing_read)
    with pytest.raises(ProviderError) as exc:
        provider.get_evidence(bytes(64))
    assert exc.value.check == "generation"


def test_configfs_new_entry_is_created_and_removed(tmp_path) -> None:
    """Without entry_name the provider mkdirs its own entry; on a plain directory the kernel does
    not populate it, so reading fails cleanly and the entry is removed again."""
    root = tmp_path / "report"
    root.mkdir()
    with pytest.raises(ProviderError) as exc:
        ConfigfsTsmProvider("sev-snp", root=root).get_evidence(bytes(64))
    assert exc.value.check == "configfs_io"
    assert list(root.iterdir()) == []


def test_configfs_unavailable_and_bad_input(tmp_path) -> None:
    provider = ConfigfsTsmProvider("tdx", root=tmp_path / "absent")
    assert not provider.is_available()
    with pytest.raises(ProviderError) as exc:
        provider.get_evidence(bytes(64))
    assert exc.value.check == "provider_unavailable"
    with pytest.raises(ProviderError):
        provider.get_evidence(bytes(32))
    with pytest.raises(ProviderError):
        ConfigfsTsmProvider("simulated")


@pytest.mark.parametrize("kernel,expected", [("tdx_guest", "tdx"), ("sev_guest", "sev-snp")])
def test_auto_provider_picks_the_tee_from_configfs(tmp_path, kernel: str, expected: str) -> None:
    quote = read("tdx_quote_v4_dcapqvl.dat") if expected == "tdx" else read(SNP_VECTORS["genoa_vcek_v3"].report)
    root = fake_tsm(tmp_path, kernel, quote)
    provider = auto_provider(root, entry_name="e0")
    assert isinstance(provider, ConfigfsTsmProvider) and provider.name == expected
    ev = provider.get_evidence(b"\x05" * 64)
    assert ev.evidence_type == expected and ev.raw == quote
    assert (root / "e0" / "inblob").read_bytes() == b"\x05" * 64


def test_auto_provider_unknown_kernel_provider(tmp_path) -> None:
    root = fake_tsm(tmp_path, "arm_cca_guest", b"x")
    with pytest.raises(ProviderError) as exc:
        detect_tsm_evidence_type(root, entry_name="e0")
    assert exc.value.check == "provider_unknown" and "arm_cca_guest" in exc.value.detail


def test_auto_provider_without_configfs_fails_clearly_and_never_simulates(tmp_path) -> None:
    with pytest.raises(ProviderError) as exc:
        auto_provider(tmp_path / "no-configfs")
    assert exc.value.check == "provider_unavailable" and "simulated explicitly" in exc.value.detail
    if not CONFIGFS_TSM_REPORT_ROOT.is_dir():  # this machine is not a TDX/SEV-SNP guest
        with pytest.raises(ProviderError):
            get_provider("auto")


def test_auto_provider_probe_entry_is_removed(tmp_path) -> None:
    """Without entry_name, detection mkdirs a probe entry; a plain directory has no provider
    attribute (the kernel would populate it), so detection fails cleanly and removes the probe."""
    root = tmp_path / "report"
    root.mkdir()
    with pytest.raises(ProviderError) as exc:
        detect_tsm_evidence_type(root)
    assert exc.value.check == "configfs_io"
    assert list(root.iterdir()) == []


def test_simulated_refused_by_default_policy() -> None:
    ev = SimulatedProvider().get_evidence(bytes(64))
    with pytest.raises(PolicyViolationError) as exc:
        verify_evidence(ev, DEFAULT_POLICY)
    assert exc.value.check == "simulated"


def test_simulated_accepted_only_when_allowed_and_says_so() -> None:
    provider = SimulatedProvider(measurement=b"\x05" * 48)
    rd = secrets.token_bytes(64)
    verdict = verify_evidence(provider.get_evidence(rd), ALLOW_SIM, expected_report_data=rd)
    assert verdict.simulated is True
    assert "SIMULATED" in verdict.summary and "SIMULATED" in verdict.tcb_status
    assert verdict.measurement == b"\x05" * 48 and verdict.report_data == rd
    pinned = AttestationPolicy(allow_simulated=True, simulated_public_keys=(provider.public_key_bytes,))
    assert "simulated_signer" in verify_evidence(provider.get_evidence(rd), pinned).checks_passed
    other = AttestationPolicy(allow_simulated=True, simulated_public_keys=(b"\x00" * 32,))
    with pytest.raises(PolicyViolationError):
        verify_evidence(provider.get_evidence(rd), other)


@pytest.mark.parametrize("offset", [40, 80, -70, -1])
def test_simulated_tamper(offset: int) -> None:
    raw = bytearray(SimulatedProvider().get_evidence(bytes(64)).raw)
    raw[offset] ^= 1
    with pytest.raises((SignatureError, EvidenceFormatError)):
        verify_evidence(Evidence("simulated", bytes(raw)), ALLOW_SIM)
    with pytest.raises(EvidenceFormatError):
        verify_evidence(Evidence("simulated", bytes(raw[:50])), ALLOW_SIM)


def test_registries() -> None:
    assert set(provider_names()) >= {"auto", "tdx", "sev-snp", "simulated"}
    assert get_provider("simulated").name == "simulated"
    assert get_provider("tdx").name == "tdx"
    with pytest.raises(ProviderError):
        get_provider("sgx")
    for kind in ("tdx", "sev-snp", "simulated"):
        assert get_verifier(kind).evidence_type == kind
    with pytest.raises(UnsupportedEvidenceError):
        get_verifier("nitro")


def test_end_to_end_simulated_session() -> None:
    """Server binds its channel key into evidence; client verifies, connects; service checks token."""
    model, config = b"\x11" * 32, b"\x22" * 32
    server, nonce = ServerHandshake(), secrets.token_bytes(32)
    rd = compute_report_data(server.public_key, nonce, model, config)
    ev = SimulatedProvider().get_evidence(rd)
    verdict = verify_evidence(ev, ALLOW_SIM, expected_report_data=compute_report_data(server.public_key, nonce, model, config))
    client = ClientHandshake(nonce)
    c = client.connect(server.public_key, verdict.report_data)
    s = server.accept(client.public_key, nonce, rd)
    assert s.open(c.seal(b"prompt")) == b"prompt"
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    issuer = TokenIssuer(Ed25519PrivateKey.generate())
    token = issuer.issue(verdict, node_id="sim-node", model_digest=model)
    claims = TokenGate([issuer.public_key], model_digest=model, allow_simulated=True).authorize(token, "r1", session_report_data=rd)
    assert claims.simulated and claims.node_id == "sim-node"
