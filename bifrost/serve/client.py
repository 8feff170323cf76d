"""Client SDK: attest the server, then talk to it only through the sealed channel.

``attest()`` sends a fresh nonce and an ephemeral X25519 key (nothing secret), verifies the returned
evidence against the caller's :class:`~bifrost.attest.policy.AttestationPolicy` with report_data
bound to (server channel key, nonce, model digest, serving-config digest), checks the pinned model
digest (mandatory) and serving-config digest, derives the channel keys, and only then is anything
sealed and sent. Simulated evidence is refused unless the policy says ``allow_simulated: true``.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field
from typing import Iterator

import grpc
import numpy as np

from ..attest.binding import check_pinned_digests, compute_report_data
from ..attest.channel import ClientHandshake, SecureSession
from ..attest.policy import AttestationPolicy
from ..attest.verdict import Evidence, Verdict, verify_evidence
from ..errors import BifrostError
from ..proto import serving_pb2, serving_pb2_grpc
from .actors import AAD_CHUNK, AAD_EMBED, AAD_EMBED_RESULT, AAD_GENERATE


class ServingError(BifrostError):
    """The server answered with an error status."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"server: {code.name}: {details}")
        self.code, self.details = code, details


@dataclass
class StreamEvent:
    token_ids: list[int]
    text: str
    received_at: float  # time.perf_counter() on arrival
    server_seconds: float


@dataclass
class ChatResult:
    tokens: list[int]
    text: str
    ttft_s: float             # request sent -> first token received
    tpot_s: float             # mean time per output token after the first (0 for one token)
    token_times_s: list[float] = field(default_factory=list)  # arrival gap per token (first: TTFT)


class BifrostClient:
    def __init__(self, address: str, policy: AttestationPolicy, suite: str = "AES-256-GCM",
                 timeout_s: float = 600.0) -> None:
        self.address, self.policy, self.suite, self.timeout = address, policy, suite, timeout_s
        self.channel = grpc.insecure_channel(address, options=[("grpc.max_receive_message_length", 64 << 20)])
        self.stub = serving_pb2_grpc.BifrostServingStub(self.channel)
        self.session: SecureSession | None = None
        self.session_id: bytes | None = None
        self.token: str | None = None
        self.verdict: Verdict | None = None
        self.model_digest: bytes | None = None

    # -- plumbing ------------------------------------------------------------------------------
    def _rpc(self, fn, *args, **kwargs):
        try:
            return fn(*args, timeout=self.timeout, **kwargs)
        except grpc.RpcError as exc:
            raise ServingError(exc.code(), exc.details()) from None

    def _meta(self):
        return (("authorization", f"Bearer {self.token}"),)

    def _request(self, sealed: bytes = b"") -> serving_pb2.SealedRequest:
        if self.session is None:
            raise BifrostError("not attested: call attest() first")
        return serving_pb2.SealedRequest(session_id=self.session_id, request_id=secrets.token_hex(16), sealed=sealed)

    # -- API -------------------------------------------------------------------------------------
    def list_models(self) -> serving_pb2.ListModelsReply:
        return self._rpc(self.stub.ListModels, serving_pb2.ListModelsRequest())

    def attest(self) -> Verdict:
        nonce = secrets.token_bytes(32)
        hs = ClientHandshake(nonce)
        reply = self._rpc(self.stub.Attest, serving_pb2.AttestRequest(nonce=nonce, client_public_key=hs.public_key,
                                                                      suite=self.suite))
        if len(reply.server_public_key) != 32 or len(reply.model_digest) != 32 or len(reply.serving_config_digest) != 32:
            raise BifrostError("attestation reply is malformed (key or digest sizes)")
        expected = compute_report_data(reply.server_public_key, nonce, reply.model_digest, reply.serving_config_digest)
        evidence = Evidence(reply.evidence_type, reply.evidence, dict(reply.endorsements))
        verdict = verify_evidence(evidence, self.policy, expected_report_data=expected)  # raises on any failure
        if verdict.report_data != expected:
            raise BifrostError("evidence report_data does not bind this channel")
        check_pinned_digests(reply.model_digest, reply.serving_config_digest, self.policy)
        session = hs.connect(reply.server_public_key, verdict.report_data, self.suite)
        if session.session_id != reply.session_id:
            raise BifrostError("server's session id does not match the derived channel keys")
        self.session, self.session_id, self.token = session, reply.session_id, reply.token
        self.verdict, self.model_digest = verdict, reply.model_digest
        return verdict

    def generate(self, prompt: str, max_new_tokens: int = 0, reset_history: bool = False,
                 sample_seed: int | None = None) -> Iterator[StreamEvent]:
        body = serving_pb2.GenerateBody(prompt=prompt, max_new_tokens=max_new_tokens, reset_history=reset_history,
                                        has_sample_seed=sample_seed is not None, sample_seed=sample_seed or 0)
        req = self._request(self.session.seal(body.SerializeToString(), AAD_GENERATE) if self.session else b"")
        call = self.stub.Generate(req, metadata=self._meta(), timeout=self.timeout)
        done = False
        try:
            for reply in call:
                if done:
                    raise BifrostError("server sent data after the final chunk")
                chunk = serving_pb2.TokenChunk.FromString(self.session.open(reply.sealed, AAD_CHUNK))
                if chunk.error:
                    raise BifrostError(f"server: {chunk.error}")
                done = chunk.done
                if chunk.token_ids:
                    yield StreamEvent(list(chunk.token_ids), chunk.text, time.perf_counter(), chunk.token_seconds)
        except grpc.RpcError as exc:
            raise ServingError(exc.code(), exc.details()) from None
        finally:
            call.cancel()  # no-op when complete; stops the server's generation when the caller stops early
        if not done:  # every turn ends with a sealed done=True chunk: anything else lost its end
            raise BifrostError("token stream ended before its final chunk (truncated); the reply is incomplete")

    def chat(self, prompt: str, max_new_tokens: int = 0, reset_history: bool = False, sample_seed: int | None = None,
             on_text=None) -> ChatResult:
        t0 = time.perf_counter()
        tokens, text, gaps, last = [], [], [], t0
        for ev in self.generate(prompt, max_new_tokens, reset_history, sample_seed):
            tokens += ev.token_ids
            text.append(ev.text)
            gaps.append(ev.received_at - last)
            last = ev.received_at
            if on_text is not None:
                on_text(ev.text)
        ttft = gaps[0] if gaps else 0.0
        tpot = sum(gaps[1:]) / (len(gaps) - 1) if len(gaps) > 1 else 0.0
        return ChatResult(tokens, "".join(text), ttft, tpot, gaps)

    def embed(self, texts: list[str]) -> np.ndarray:
        body = serving_pb2.EmbedBody(texts=texts)
        req = self._request(self.session.seal(body.SerializeToString(), AAD_EMBED) if self.session else b"")
        reply = self._rpc(self.stub.Embed, req, metadata=self._meta())
        result = serving_pb2.EmbedResult.FromString(self.session.open(reply.sealed, AAD_EMBED_RESULT))
        return np.array([list(v.values) for v in result.vectors])

    def close(self) -> None:
        if self.session is not None:
            try:
                self._rpc(self.stub.CloseSession, self._request(), metadata=self._meta())
            except ServingError:
                pass
            self.session.close("client closed")
            self.session = None
        self.channel.close()

    def __enter__(self) -> "BifrostClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
