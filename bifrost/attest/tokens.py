"""Attestation tokens: Ed25519-signed, time-limited claims issued after successful verification.

Token text = base64url(payload JSON) "." base64url(Ed25519 signature over the payload bytes).
Payload: ``iss``, ``sub`` (node ID), ``iat``/``exp`` (Unix seconds), ``jti`` (random 16-byte hex),
``evidence_type``, ``measurement`` (SNP MEASUREMENT / TDX MRTD), ``rtmrs`` (TDX RTMR0-3; empty
otherwise), ``tcb_status``, ``tcb`` (the verdict's TCB fields, e.g. SNP reported/current TCB, TDX
platform/QE/module status), ``model_digest``, ``report_data`` (binds the token to the attested
channel key), ``simulated``. Tokens without ``rtmrs``/``tcb`` (older issuers) still verify.

:class:`TokenGate` is what a service puts in front of requests: valid signature from a trusted
issuer key, ``iat <= now < exp`` (else :class:`TokenExpiredError` -> re-attest), optional session
binding, and each (token, request ID) accepted once (:class:`TokenReplayError`). It is thread-safe.
"""

from __future__ import annotations

import base64
import binascii
import heapq
import hmac
import json
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from .errors import TokenError, TokenExpiredError, TokenReplayError, TokenSignatureError
from .types import Verdict

DEFAULT_LIFETIME_S = 300
MAX_LIFETIME_S = 24 * 3600
CLOCK_SKEW_S = 30


@dataclass(frozen=True)
class TokenClaims:
    """Verified token contents. Times are Unix seconds; digests are hex strings."""

    issuer: str
    node_id: str
    issued_at: int
    expires_at: int
    token_id: str
    evidence_type: str
    measurement: str
    tcb_status: str
    model_digest: str
    report_data: str
    simulated: bool
    rtmrs: tuple[str, ...] = ()
    tcb: Mapping[str, str] = field(default_factory=dict)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class TokenIssuer:
    """The attestation service's signer. ``lifetime_s`` in seconds (1..86400)."""

    def __init__(self, signing_key: Ed25519PrivateKey, issuer: str = "bifrost-attestation", lifetime_s: int = DEFAULT_LIFETIME_S):
        if not 0 < lifetime_s <= MAX_LIFETIME_S:
            raise TokenError("token_lifetime", f"lifetime must be 1..{MAX_LIFETIME_S} seconds")
        self._key = signing_key
        self.issuer = issuer
        self.lifetime_s = lifetime_s

    @property
    def public_key(self) -> Ed25519PublicKey:
        return self._key.public_key()

    def issue(self, verdict: Verdict, *, node_id: str, model_digest: bytes, now: float | None = None) -> str:
        """Issue a token for a verdict that already passed verification (failures raise earlier)."""
        issued = int(time.time() if now is None else now)
        payload = {
            "iss": self.issuer,
            "sub": node_id,
            "iat": issued,
            "exp": issued + self.lifetime_s,
            "jti": secrets.token_hex(16),
            "evidence_type": verdict.evidence_type,
            "measurement": verdict.measurement.hex(),
            "rtmrs": [verdict.fields[f"rtmr{i}"] for i in range(4)] if all(f"rtmr{i}" in verdict.fields for i in range(4)) else [],
            "tcb_status": verdict.tcb_status,
            "tcb": {str(k): str(v) for k, v in verdict.tcb.items()},
            "model_digest": model_digest.hex(),
            "report_data": verdict.report_data.hex(),
            "simulated": verdict.simulated,
        }
        body = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
        return _b64(body) + "." + _b64(self._key.sign(body))


def verify_token(token: str, trusted_keys: Iterable[Ed25519PublicKey], *, now: float | None = None) -> TokenClaims:
    """Check format, signature (any trusted key) and validity window; return the claims."""
    if not isinstance(token, str) or token.count(".") != 1:
        raise TokenError("token_format", "token must be <payload>.<signature>")
    body_b64, sig_b64 = token.split(".")
    try:
        body, signature = _unb64(body_b64), _unb64(sig_b64)
    except (binascii.Error, ValueError):
        raise TokenError("token_format", "token is not base64url") from None
    for key in trusted_keys:
        try:
            key.verify(signature, body)
            break
        except InvalidSignature:
            continue
    else:
        raise TokenSignatureError("token_signature", "token is not signed by a trusted attestation service key")
    try:
        p = json.loads(body)
        claims = TokenClaims(
            issuer=str(p["iss"]), node_id=str(p["sub"]), issued_at=int(p["iat"]), expires_at=int(p["exp"]),
            token_id=str(p["jti"]), evidence_type=str(p["evidence_type"]), measurement=str(p["measurement"]),
            tcb_status=str(p["tcb_status"]), model_digest=str(p["model_digest"]), report_data=str(p["report_data"]),
            simulated=bool(p["simulated"]), rtmrs=_str_list(p.get("rtmrs", [])), tcb=_str_map(p.get("tcb", {})),
        )
    except (ValueError, KeyError, TypeError):
        raise TokenError("token_format", "token payload is malformed") from None
    t = time.time() if now is None else now
    if t + CLOCK_SKEW_S < claims.issued_at:
        raise TokenExpiredError("token_not_yet_valid", "token issued in the future; re-attest")
    if t >= claims.expires_at:
        raise TokenExpiredError("token_expired", "token expired; re-attestation required")
    return claims


def _str_list(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise TypeError("expected a list of strings")
    return tuple(value)


def _str_map(value: Any) -> dict[str, str]:
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise TypeError("expected a string mapping")
    return dict(value)


def public_key_bytes(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


class TokenGate:
    """Admission control for a service: one instance per service process.

    Remembers used (token ID, request ID) pairs until the token expires (memory bounded by live
    tokens x requests; expired pairs leave through a heap ordered by expiry, O(log n) each).
    ``allow_simulated`` False refuses tokens minted for simulated evidence. Thread-safe: the
    replay check and the insert happen under one lock, so a request ID is accepted at most once
    however many threads present it.
    """

    def __init__(self, trusted_keys: Iterable[Ed25519PublicKey], *, model_digest: bytes | None = None, allow_simulated: bool = False):
        self._keys = tuple(trusted_keys)
        self._model_digest = model_digest
        self._allow_simulated = allow_simulated
        self._seen: set[tuple[str, str]] = set()
        self._expiry: list[tuple[int, tuple[str, str]]] = []  # heap of (expires_at, key)
        self._lock = threading.Lock()

    def __len__(self) -> int:
        """Remembered (token ID, request ID) pairs."""
        with self._lock:
            return len(self._seen)

    def authorize(self, token: str, request_id: str, *, session_report_data: bytes | None = None, now: float | None = None) -> TokenClaims:
        t = time.time() if now is None else now
        claims = verify_token(token, self._keys, now=t)
        if claims.simulated and not self._allow_simulated:
            raise TokenError("token_simulated", "token was issued for simulated evidence")
        if self._model_digest is not None and claims.model_digest != self._model_digest.hex():
            raise TokenError("token_model", "token names a different model digest")
        if session_report_data is not None and not hmac.compare_digest(claims.report_data, session_report_data.hex()):
            raise TokenReplayError("token_binding", "token is bound to a different attested session")
        key = (claims.token_id, request_id)
        with self._lock:
            while self._expiry and self._expiry[0][0] <= t:
                _, old = heapq.heappop(self._expiry)
                self._seen.discard(old)
            if key in self._seen:
                raise TokenReplayError("request_replay", f"request {request_id!r} already seen with this token")
            self._seen.add(key)
            heapq.heappush(self._expiry, (claims.expires_at, key))
        return claims
