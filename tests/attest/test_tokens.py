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
