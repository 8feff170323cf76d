"""Attestation tokens: issue after verification, expiry, wrong signer, replay, session binding."""

from __future__ import annotations

import base64
import json

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bifrost.attest.errors import TokenError, TokenExpiredError, TokenReplayError, TokenSignatureError
from bifrost.attest.policy import AttestationPolicy
from bifrost.attest.tokens import TokenGate, TokenIssuer, verify_token
from bifrost.attest.verdict import Evidence, verify_evidence

from .conftest import SNP_VECTORS, read

MODEL = b"\x07" * 32
T0 = 1_750_000_000


@pytest.fixture(scope="module")
def verdict():
    v = SNP_VECTORS["genoa_vcek_v3"]
    return verify_evidence(Evidence("sev-snp", read(v.report), {"vcek": read(v.leaf)}), AttestationPolicy(), at=v.at)


@pytest.fixture
def issuer():
    return TokenIssuer(Ed25519PrivateKey.generate(), lifetime_s=60)


def test_token_names_node_measurement_and_model(issuer, verdict) -> None:
    token = issuer.issue(verdict, node_id="node-7", model_digest=MODEL, now=T0)
    claims = verify_token(token, [issuer.public_key], now=T0 + 1)
    assert claims.node_id == "node-7"
    assert claims.measurement == verdict.measurement.hex()
    assert claims.model_digest == MODEL.hex()
    assert claims.report_data == verdict.report_data.hex()
    assert claims.expires_at - claims.issued_at == 60
    assert claims.simulated is False


def test_expired_token_forces_reattestation(issuer, verdict) -> None:
    token = issuer.issue(verdict, node_id="n", model_digest=MODEL, now=T0)
    gate = TokenGate([issuer.public_key])
    gate.authorize(token, "r1", now=T0 + 59)
    with pytest.raises(TokenExpiredError) as exc:
        gate.authorize(token, "r2", now=T0 + 60)
    assert exc.value.check == "token_expired"
    with pytest.raises(TokenExpiredError):
        verify_token(token, [issuer.public_key], now=T0 - 3600)  # issued in the future


def test_wrong_signer_rejected(issuer, verdict) -> None:
    rogue = TokenIssuer(Ed25519PrivateKey.generate())
    token = rogue.issue(verdict, node_id="n", model_digest=MODEL, now=T0)
    with pytest.raises(TokenSignatureError):
        TokenGate([issuer.public_key]).authorize(token, "r", now=T0)


def test_modified_payload_rejected(issuer, verdict) -> None:
    token = issuer.issue(verdict, node_id="n", model_digest=MODEL, now=T0)
    body, sig = token.split(".")
    payload = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    payload["exp"] += 10_000
    forged = base64.urlsafe_b64encode(json.dumps(payload).encode()).rstrip(b"=").decode() + "." + sig
    with pytest.raises(TokenSignatureError):
        verify_token(forged, [issuer.public_key], now=T0)


def test_request_replay_rejected(issuer, verdict) -> None:
    token = issuer.issue(verdict, node_id="n", model_digest=MODEL, now=T0)
    gate = TokenGate([issuer.public_key])
    gate.authorize(token, "req-1", now=T0)
    gate.authorize(token, "req-2", now=T0)
    with pytest.raises(TokenReplayError) as exc:
        gate.authorize(token, "req-1", now=T0 + 1)
    assert exc.value.check == "request_replay"


def test_token_bound_to_session(issuer, verdict) -> None:
    token = issuer.issue(verdict, node_id="n", model_digest=MODEL, now=T0)
    gate = TokenGate([issuer.public_key])
    gate.authorize(token, "a", session_report_data=verdict.report_data, now=T0)
    with pytest.raises(TokenReplayError) as exc:
        gate.authorize(token, "b", session_report_data=bytes(64), now=T0)
    assert exc.value.check == "token_binding"


def test_model_and_simulated_gates(issuer, verdict) -> None:
    token = issuer.issue(verdict, node_id="n", model_digest=MODEL, now=T0)
    with pytest.raises(TokenError) as exc:
        TokenGate([issuer.public_key], model_digest=b"\x00" * 32).authorize(token, "r", now=T0)
    assert exc.value.check == "token_model"
    import dataclasses

    sim = dataclasses.replace(verdict, simulated=True)
    sim_token = issuer.issue(sim, node_id="n", model_digest=MODEL, now=T0)
    with pytest.raises(TokenError) as exc:
        TokenGate([issuer.public_key]).authorize(sim_token, "r", now=T0)
    assert exc.value.check == "token_simulated"
    assert TokenGate([issuer.public_key], allow_simulated=True).authorize(sim_token, "r", now=T0).simulated


@pytest.mark.parametrize("bad", ["", "abc", "a.b.c", "!!!.???", "e30.AAAA"])
def test_malformed_tokens(issuer, bad: str) -> None:
    with pytest.raises(TokenError):
        verify_token(bad, [issuer.public_key], now=T0)


def test_lifetime_bounds() -> None:
    with pytest.raises(TokenError):
        TokenIssuer(Ed25519PrivateKey.generate(), lifetime_s=0)


def test_token_carries_tcb_and_rtmrs_of_a_tdx_verdict(issuer) -> None:
    from .conftest import TDX_VECTORS

    v = TDX_VECTORS["dcapqvl_v4"]
    tdx = verify_evidence(Evidence("tdx", read(v.quote), {"collateral": read(v.collateral)}), AttestationPolicy(), at=v.at)
    claims = verify_token(issuer.issue(tdx, node_id="td", model_digest=MODEL, now=T0), [issuer.public_key], now=T0)
    assert claims.rtmrs == tuple(tdx.fields[f"rtmr{i}"] for i in range(4)) and len(claims.rtmrs[3]) == 96
    assert claims.measurement == tdx.measurement.hex()  # MRTD
    assert claims.tcb_status == "UpToDate" and claims.tcb["platform"] == "UpToDate" and claims.tcb["tdx_module"] == "UpToDate"


def test_token_carries_snp_tcb(issuer, verdict) -> None:
    claims = verify_token(issuer.issue(verdict, node_id="n", model_digest=MODEL, now=T0), [issuer.public_key], now=T0)
    assert claims.rtmrs == ()  # SEV-SNP has no RTMRs
    assert claims.tcb["reported"] == verdict.tcb["reported"] and "microcode=" in claims.tcb["reported"]


def test_token_without_new_claims_still_verifies(issuer) -> None:
    """Tokens from issuers that predate rtmrs/tcb (same signature scheme) keep verifying."""
    payload = {"iss": "old", "sub": "n", "iat": T0, "exp": T0 + 60, "jti": "ab" * 16, "evidence_type": "sev-snp",
               "measurement": "00" * 48, "tcb_status": "x", "model_digest": MODEL.hex(), "report_data": "00" * 64,
               "simulated": False}
    body = json.dumps(payload).encode()
    key = Ed25519PrivateKey.generate()
    token = base64.urlsafe_b64encode(body).rstrip(b"=").decode() + "." + base64.urlsafe_b64encode(key.sign(body)).rstrip(b"=").decode()
    claims = verify_token(token, [key.public_key()], now=T0)
    assert claims.rtmrs == () and dict(claims.tcb) == {}
    payload["rtmrs"] = [1, 2]  # present but malformed: refused
    body = json.dumps(payload).encode()
    bad = base64.urlsafe_b64encode(body).rstrip(b"=").decode() + "." + base64.urlsafe_b64encode(key.sign(body)).rstrip(b"=").decode()
    with pytest.raises(TokenError) as exc:
        verify_token(bad, [key.public_key()], now=T0)
    assert exc.value.check == "token_format"


def test_gate_is_thread_safe_under_contention(issuer, verdict) -> None:
    """Many threads authorize at once: every distinct request is remembered (no lost inserts, so no
    replay slips through later), and a request ID raced by all threads is accepted exactly once."""
    import sys
    import threading

    tokens = [issuer.issue(verdict, node_id="n", model_digest=MODEL, now=T0) for _ in range(4)]
    gate = TokenGate([issuer.public_key])
    n_threads, per_thread = 8, 150
    barrier = threading.Barrier(n_threads)
    errors: list[BaseException] = []
    raced: list[str] = []

    def worker(i: int) -> None:
        try:
            barrier.wait()
            for j in range(per_thread):
                gate.authorize(tokens[j % 4], f"t{i}-r{j}", now=T0 + (j % 7))
                try:
                    gate.authorize(tokens[0], f"shared-{j}", now=T0)
                    raced.append(f"shared-{j}")
                except TokenReplayError:
                    pass
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible
    try:
        threads = [threading.Thread(target=worker, args=(i,)) for i in range(n_threads)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(old)
    assert errors == []
    assert sorted(raced) == sorted(f"shared-{j}" for j in range(per_thread))  # each shared ID accepted once
    assert len(gate) == n_threads * per_thread + per_thread
    for i in range(n_threads):  # every insert survived: each request is now a replay
        for j in (0, per_thread // 2, per_thread - 1):
            with pytest.raises(TokenReplayError):
                gate.authorize(tokens[j % 4], f"t{i}-r{j}", now=T0 + 10)


def test_gate_forgets_expired_requests(issuer, verdict) -> None:
    token = issuer.issue(verdict, node_id="n", model_digest=MODEL, now=T0)
    later = issuer.issue(verdict, node_id="n", model_digest=MODEL, now=T0 + 50)
    gate = TokenGate([issuer.public_key])
    gate.authorize(token, "a", now=T0)
    gate.authorize(later, "b", now=T0 + 50)
    assert len(gate) == 2
    gate.authorize(later, "c", now=T0 + 61)  # token expired at T0 + 60: its entry is dropped
    assert len(gate) == 2
