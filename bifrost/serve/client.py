"""Client SDK: attest the server, then talk to it only through the sealed channel.

``attest()`` sends a fresh nonce and an ephemeral X25519 key (nothing secret), verifies the returned
evidence against the caller's :class:`~bifrost.attest.policy.AttestationPolicy` with report_data
bound to (server channel key, nonce, model digest, serving-config digest), checks the pinned model
digest (mandatory) and serving-config digest, derives the channel keys, and only then is anything
sealed and sent. Simulated evidence is refused unless the policy says ``allow_simulated: true``.

Threads: one client may be shared. Its requests are serialized by a per-client lock held from sealing
a request until its answer is consumed (for ``generate``: until the stream ends or the generator is
closed), so records reach the server in sequence order and answers are opened in order. A thread that
starts a request while its own Generate stream is still open gets a :class:`BifrostError` at once
(it would otherwise wait for itself); other threads wait up to ``timeout_s``.

Refusals: :class:`ServingError` carries the status code and the server's reason; ``sealed`` says the
reason came through the attested channel (the cleartext status only says "request refused").

Session lost: an answer carrying the server's session-lost marker (trailing metadata ``bifrost-session-lost``:
its replica or node was lost, the front end restarted or forgot the session, the token expired) makes the
client close the old session (best effort: the marker may be forged and the session alive) and attest a new
one, which must carry the same model and serving-config digests as the lost one (else nothing is sent and the
caller must call ``attest()``: a forged marker cannot move it to another pinned configuration). The request is
then sent again, once, only where that is safe: an Embed, or a turn none of whose output reached the caller and
that does not read the lost session's conversation history (the session's first turn, ``reset_history=True``, or
``messages=``; a prompt turn counts as history from the moment it is sent). Otherwise it raises
:class:`SessionLostError` (which says whether the history went with the session and whether the streamed output
is partial); the client then holds the new session and is usable. ``on_session_lost`` is told of every loss
(:class:`SessionLoss`). The marker is cleartext: a forged one costs a re-attestation and at most one repeated
run of a request that had produced nothing; an unknown marker value is kept as ``"unrecognized"``. A status
after a verified final chunk changes nothing: the answer is whole.

TLS: ``tls_ca_file`` (PEM) or ``tls_root_certificates`` (PEM bytes) connects with TLS, verifying the
server certificate against those roots. TLS hides the bearer token and gRPC metadata from the network;
prompts and answers are sealed by the attested channel either way.
"""

from __future__ import annotations

import contextlib
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Generator, cast

import grpc
import numpy as np

from ..attest.binding import check_pinned_digests, compute_report_data
from ..attest.channel import ClientHandshake, SecureChannel, answer_aad
from ..attest.policy import AttestationPolicy
from ..attest.verdict import Evidence, Verdict, verify_evidence
from ..errors import BifrostError, RefusedError, UnavailableError, UserError
from ..proto import serving_pb2, serving_pb2_grpc
from ..proto.wire import (AAD_CHUNK, AAD_CLOSE, AAD_EMBED, AAD_EMBED_RESULT, AAD_GENERATE, SEALED_TRAILER,
                          SESSION_LOST_REASONS, SESSION_LOST_TRAILER, serving_options)


class ServingError(BifrostError):
    """The server answered with an error status. ``sealed``: ``details`` came inside the attested channel;
    ``session_lost``: the server's session-lost marker (why it no longer holds the session), else None."""

    def __init__(self, code: grpc.StatusCode, details: str, sealed: bool = False,
                 session_lost: str | None = None) -> None:
        super().__init__(f"server: {code.name}: {details}")
        self.code, self.details, self.sealed, self.session_lost = code, details, sealed, session_lost


class SessionLostError(ServingError):
    """The server lost this client's session and the request was not sent again: ``partial`` (output of
    this turn had reached the caller: it is all there is), ``history_lost`` (the lost session held the
    conversation history; it is gone), ``reattested`` (the client holds a new session and is usable; else the
    re-attestation failed too and ``attest()`` must be called again)."""

    def __init__(self, cause: ServingError, *, partial: bool, history_lost: bool, reattested: bool,
                 reattest_error: BaseException | None = None) -> None:
        parts = [f"session lost ({cause.session_lost}): {cause.details}"]
        if partial:
            parts.append("the streamed output of this turn is partial")
        if history_lost:
            parts.append("the conversation history went with the session")
        parts.append("the client attested a new session" if reattested else
                     f"re-attesting failed too ({reattest_error}); call attest() again")
        super().__init__(cause.code, "; ".join(parts), cause.sealed, cause.session_lost)
        self.partial, self.history_lost, self.reattested = partial, history_lost, reattested


@dataclass(frozen=True)
class SessionLoss:
    """What ``on_session_lost`` is told after the client replaced a lost session with a new one."""

    reason: str         # the server's marker: replica-lost, unknown-session, session-closed, token-expired
    history_lost: bool  # the lost session held conversation history
    retried: bool       # the request is sent again on the new session (else SessionLostError follows)


def _sealed_error(code_name: str, reason: str) -> ServingError:
    """A refusal that arrived sealed: its code name (unknown names -> UNKNOWN) and exact reason."""
    code = getattr(grpc.StatusCode, code_name, None) if code_name.isupper() else None
    return ServingError(code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.UNKNOWN, reason, sealed=True)


def _rpc_error(exc: grpc.RpcError, tls: bool) -> ServingError:
    """A gRPC failure as :class:`ServingError` (with the session-lost marker, if any); a failed connection
    names the likely TLS mismatch."""
    code, details = exc.code(), exc.details() or ""
    trailers = cast("tuple[tuple[str, str | bytes], ...]", getattr(exc, "trailing_metadata", lambda: None)() or ())
    lost = dict(trailers).get(SESSION_LOST_TRAILER)
    if isinstance(lost, str) and lost:  # cleartext: only a known reason is ever kept (and printed)
        return ServingError(code, details, session_lost=lost if lost in SESSION_LOST_REASONS else "unrecognized")
    if code == grpc.StatusCode.UNAVAILABLE and any(w in details.lower() for w in ("connect", "handshake", "socket")):
        hint = ("check that the server uses TLS, that the CA file holds its certificate's issuer and that the "
                "certificate names this address" if tls else
                "if the server uses TLS, connect with tls_ca_file (bifrost chat --tls-ca FILE)")
        details = f"{details} ({hint})"
    return ServingError(code, details)


@dataclass
class StreamEvent:
    token_ids: list[int]
    text: str
    received_at: float  # time.perf_counter() on arrival
    server_seconds: float
    finish_reason: str = ""  # on the last event: "stop" (stop sequence or end-of-sequence token) | "length"
    prompt_tokens: int = 0   # context length of this turn (history + prompt, or the templated messages); first event


@dataclass
class ChatResult:
    tokens: list[int]
    text: str
    ttft_s: float             # request sent -> first token received
    tpot_s: float             # mean time per output token after the first (0 for one token)
    token_times_s: list[float] = field(default_factory=list)  # arrival gap per token (first: TTFT)
    finish_reason: str = ""   # "stop" | "length"
    prompt_tokens: int = 0


class BifrostClient:
    """Attested client of one server; thread-safe (see the module docstring). ``timeout_s``: per RPC,
    and the longest wait for another thread's request on this client."""

    def __init__(self, address: str, policy: AttestationPolicy, suite: str = "AES-256-GCM",
                 timeout_s: float = 600.0, tls_ca_file: str | None = None,
                 tls_root_certificates: bytes | None = None,
                 on_session_lost: Callable[[SessionLoss], None] | None = None) -> None:
        self.address, self.policy, self.suite, self.timeout = address, policy, suite, timeout_s
        self.on_session_lost = on_session_lost
        if tls_ca_file is not None and tls_root_certificates is not None:
            raise UserError("give tls_ca_file or tls_root_certificates, not both")
        if tls_ca_file is not None:
            try:
                with open(tls_ca_file, "rb") as f:
                    tls_root_certificates = f.read()
            except OSError as exc:
                raise UserError(f"cannot read the TLS CA file {tls_ca_file}: {exc.strerror}") from None
        self.tls = tls_root_certificates is not None
        options = serving_options()
        if self.tls:
            creds = grpc.ssl_channel_credentials(root_certificates=tls_root_certificates)
            self.grpc_channel = grpc.secure_channel(address, creds, options=options)
        else:
            self.grpc_channel = grpc.insecure_channel(address, options=options)
        self.stub = serving_pb2_grpc.BifrostServingStub(self.grpc_channel)
        self.channel: SecureChannel | None = None  # the attested channel (set by attest())
        self.session_id: bytes | None = None
        self.token: str | None = None
        self.verdict: Verdict | None = None
        self.model_digest: bytes | None = None
        self.serving_config_digest: bytes | None = None
        self._lock = threading.Lock()    # one request at a time on this client's session
        self._holder: int | None = None  # thread id holding _lock
        self._history = False            # the session holds conversation history (a prompt turn ran on it)
        self.history_lost = False        # a lost session held history (until attest() or a reset_history turn)
        self.session_losses = 0          # sessions lost and replaced by this client

    # -- plumbing ------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _exclusive(self):
        """Hold this client's request lock (see the module docstring)."""
        if self._holder == threading.get_ident():
            raise UserError("this thread already has a request in progress on this client (a Generate stream "
                               "not yet consumed or closed); finish or close it first")
        if not self._lock.acquire(timeout=self.timeout):
            raise UnavailableError(f"another request on this client did not finish within timeout_s={self.timeout:g}")
        self._holder = threading.get_ident()
        try:
            yield
        finally:
            self._holder = None
            self._lock.release()

    def _rpc(self, fn, *args, **kwargs):
        try:
            return fn(*args, timeout=self.timeout, **kwargs)
        except grpc.RpcError as exc:
            raise _rpc_error(exc, self.tls) from None

    def _meta(self):
        return (("authorization", f"Bearer {self.token}"),)

    def _attested(self) -> SecureChannel:
        if self.channel is None:
            raise UserError("not attested: call attest() first")
        return self.channel

    def _request(self, sealed: bytes = b"") -> serving_pb2.SealedRequest:
        if self.channel is None:
            raise UserError("not attested: call attest() first")
        return serving_pb2.SealedRequest(session_id=self.session_id, request_id=secrets.token_hex(16), sealed=sealed)

    # -- API -------------------------------------------------------------------------------------
    def list_models(self) -> serving_pb2.ListModelsReply:
        return self._rpc(self.stub.ListModels, serving_pb2.ListModelsRequest())

    def attest(self) -> Verdict:
        with self._exclusive():
            self.history_lost = False
            return self._attest()

    def _attest(self) -> Verdict:
        nonce = secrets.token_bytes(32)
        hs = ClientHandshake(nonce)
        reply = self._rpc(self.stub.Attest, serving_pb2.AttestRequest(nonce=nonce, client_public_key=hs.public_key,
                                                                      suite=self.suite))
        if len(reply.server_public_key) != 32 or len(reply.model_digest) != 32 or len(reply.serving_config_digest) != 32:
            raise RefusedError("attestation reply is malformed (key or digest sizes)")
        expected = compute_report_data(reply.server_public_key, nonce, reply.model_digest, reply.serving_config_digest)
        evidence = Evidence(reply.evidence_type, reply.evidence, dict(reply.endorsements))
        verdict = verify_evidence(evidence, self.policy, expected_report_data=expected)  # raises on any failure
        if verdict.report_data != expected:
            raise RefusedError("evidence report_data does not bind this channel")
        check_pinned_digests(reply.model_digest, reply.serving_config_digest, self.policy)
        channel = hs.connect(reply.server_public_key, verdict.report_data, self.suite)
        if channel.session_id != reply.session_id:
            raise RefusedError("server's session id does not match the derived channel keys")
        if self.channel is not None:
            self.channel.close("replaced by a new session")
        self.channel, self.session_id, self.token = channel, reply.session_id, reply.token
        self.verdict, self.model_digest, self.serving_config_digest = verdict, reply.model_digest, reply.serving_config_digest
        self._history = False
        return verdict

    def _replace_lost_session(self, exc: ServingError, *, retry: bool, partial: bool, held: bool) -> None:
        """The server lost the session (``exc`` carries its marker; ``held``: it held conversation history before
        this request): close it there in case it was not lost after all (the marker is cleartext), attest a new one
        with the same model and serving configuration; return when the request is to be sent again (``retry``),
        else raise :class:`SessionLostError`."""
        self._close_quietly(timeout_s=min(self.timeout, 10.0))
        model, config = self.model_digest, self.serving_config_digest
        try:
            self._attest()
            if (self.model_digest, self.serving_config_digest) != (model, config):
                self._close_quietly(timeout_s=min(self.timeout, 10.0))
                raise RefusedError("the new session attested another model or serving configuration than the lost "
                                   "one; call attest() to accept it")
        except BifrostError as err:
            raise SessionLostError(exc, partial=partial, history_lost=held, reattested=False,
                                   reattest_error=err) from None
        except BifrostError as err:
            raise SessionLostError(exc, partial=partial, history_lost=held, reattested=False,
                                   reattest_error=err) from None
        self.session_losses += 1
        self.history_lost = self.history_lost or held
        if self.on_session_lost is not None:
            self.on_session_lost(SessionLoss(exc.session_lost or "", held, retry))
        if not retry:
            raise SessionLostError(exc, partial=partial, history_lost=held, reattested=True) from None

    def generate(self, prompt: str = "", max_new_tokens: int = 0, reset_history: bool = False,
                 sample_seed: int | None = None, *, messages: list[dict] | None = None,
                 temperature: float | None = None, top_p: float | None = None, top_k: int | None = None,
                 stop: list[str] | None = None) -> Generator[StreamEvent, None, None]:
        """Stream one turn. Holds this client's request lock from the first ``next()`` until the stream
        ends or the generator is closed.

        ``messages`` ([{"role": "system"|"user"|"assistant", "content": str}, ...], instead of ``prompt``): a
        chat request rendered by the model's chat template; they are the whole conversation (the session's
        history is neither prepended nor changed). ``temperature`` (0: greedy, up to 2), ``top_p`` (0, 1],
        ``top_k`` (0: off): None keeps the server's configuration. ``stop``: up to 4 stop sequences of 1..64
        characters; the text never includes them. The last event carries ``finish_reason``: "stop" (a stop
        sequence or the model's end-of-sequence token) or "length". Bad parameters: :class:`ServingError`
        (INVALID_ARGUMENT, the reason sealed). A lost session: see the module docstring (sent again once when
        nothing was yielded and the turn does not rely on the lost history, else :class:`SessionLostError`)."""
        body = serving_pb2.GenerateBody(prompt=prompt, max_new_tokens=max_new_tokens, reset_history=reset_history,
                                        has_sample_seed=sample_seed is not None, sample_seed=sample_seed or 0,
                                        stop=list(stop or ()))
        for m in messages or ():
            body.messages.add(role=str(m.get("role", "")), content=str(m.get("content", "")))
        if temperature is not None:
            body.temperature = temperature
        if top_p is not None:
            body.top_p = top_p
        if top_k is not None:
            if top_k < 0:
                raise UserError("top_k must be >= 0")
            body.top_k = top_k
        with self._exclusive():
            if reset_history:
                self.history_lost = False
            yielded = False
            for attempt in (0, 1):
                had_history = self._history  # what this turn reads, unless it resets it or brings messages
                if not messages:  # from the moment it is sent, the session may hold this turn (its record opened)
                    self._history = True
                try:
                    with contextlib.closing(self._turn(body)) as turn:  # closed (call cancelled) if the caller stops
                        for ev in turn:
                            yielded = True
                            yield ev
                    return
                except ServingError as exc:
                    if not exc.session_lost:
                        raise
                    relies_on_history = had_history and not reset_history and not messages
                    held = had_history
                    self._replace_lost_session(exc, retry=attempt == 0 and not yielded and not relies_on_history,
                                               partial=yielded, held=held)

    def _turn(self, body: serving_pb2.GenerateBody) -> Generator[StreamEvent, None, None]:
        """One Generate call on the current session (the caller holds the request lock)."""
        channel = self._attested()
        req = self._request(channel.seal(body.SerializeToString(), AAD_GENERATE))
        call = self.stub.Generate(req, metadata=self._meta(), timeout=self.timeout)
        done = False
        try:
            for index, reply in enumerate(call):
                if done:
                    raise RefusedError("server sent data after the final chunk")
                # record `index` of the answer to this very request: the first may skip the unread records of an
                # earlier answer this client stopped reading (a cancelled turn), never one of this answer's
                chunk = serving_pb2.TokenChunk.FromString(channel.open(
                    reply.sealed, answer_aad(AAD_CHUNK, req.sealed, index), first_of_answer=index == 0))
                if chunk.error:
                    raise _sealed_error(chunk.error_code, chunk.error)
                done = chunk.done
                if chunk.token_ids or chunk.done:
                    yield StreamEvent(list(chunk.token_ids), chunk.text, time.perf_counter(), chunk.token_seconds,
                                      chunk.finish_reason, chunk.prompt_tokens)
        except grpc.RpcError as exc:
            if done:  # the whole answer arrived, verified: a status after its final chunk changes nothing
                return
            raise _rpc_error(exc, self.tls) from None
        finally:
            call.cancel()  # no-op when complete; stops the server's generation when the caller stops early
        if not done:  # every turn ends with a sealed done=True chunk: anything else lost its end
            raise UnavailableError("token stream ended before its final chunk (truncated); the reply is incomplete")

    def chat(self, prompt: str = "", max_new_tokens: int = 0, reset_history: bool = False,
             sample_seed: int | None = None, on_text=None, *, messages: list[dict] | None = None,
             temperature: float | None = None, top_p: float | None = None, top_k: int | None = None,
             stop: list[str] | None = None) -> ChatResult:
        """One turn, collected (parameters as :meth:`generate`); ``on_text`` gets each text delta."""
        t0 = time.perf_counter()
        tokens, text, gaps, last = [], [], [], t0
        finish, prompt_tokens = "", 0
        for ev in self.generate(prompt, max_new_tokens, reset_history, sample_seed, messages=messages,
                                temperature=temperature, top_p=top_p, top_k=top_k, stop=stop):
            finish = ev.finish_reason or finish
            prompt_tokens = prompt_tokens or ev.prompt_tokens
            if on_text is not None and ev.text:
                on_text(ev.text)
            text.append(ev.text)
            if not ev.token_ids:  # the end-of-sequence chunk: no token
                continue
            tokens += ev.token_ids
            gaps.append(ev.received_at - last)
            last = ev.received_at
        ttft = gaps[0] if gaps else 0.0
        tpot = sum(gaps[1:]) / (len(gaps) - 1) if len(gaps) > 1 else 0.0
        return ChatResult(tokens, "".join(text), ttft, tpot, gaps, finish, prompt_tokens)

    def embed(self, texts: list[str]) -> np.ndarray:
        """Embedding vectors of ``texts`` (an encoder model). Stateless: on a lost session it is sent again,
        once, on a new one."""
        body = serving_pb2.EmbedBody(texts=texts)
        with self._exclusive():
            for attempt in (0, 1):
                try:
                    result = self._embed(body)
                    break
                except ServingError as exc:
                    if not exc.session_lost:
                        raise
                    self._replace_lost_session(exc, retry=attempt == 0, partial=False, held=self._history)
        if result.error:
            raise _sealed_error(result.error_code, result.error)
        return np.array([list(v.values) for v in result.vectors])

    def _embed(self, body: serving_pb2.EmbedBody) -> serving_pb2.EmbedResult:
        """One Embed call on the current session (the caller holds the request lock)."""
        channel = self._attested()
        req = self._request(channel.seal(body.SerializeToString(), AAD_EMBED))
        try:
            reply = self.stub.Embed(req, metadata=self._meta(), timeout=self.timeout)
        except grpc.RpcError as exc:
            # (key, value) named tuples at run time; grpc-stubs types each as a plain class
            trailers = cast("tuple[tuple[str, bytes], ...]", exc.trailing_metadata() or ())
            sealed = dict(trailers).get(SEALED_TRAILER)
            if not sealed:
                raise _rpc_error(exc, self.tls) from None
            refusal = serving_pb2.EmbedResult.FromString(
                channel.open(sealed, answer_aad(AAD_EMBED_RESULT, req.sealed, 0), first_of_answer=True))
            raise _sealed_error(refusal.error_code, refusal.error or "refused without a reason") from None
        return serving_pb2.EmbedResult.FromString(
            channel.open(reply.sealed, answer_aad(AAD_EMBED_RESULT, req.sealed, 0), first_of_answer=True))

    def close(self) -> None:
        """Close the session on the server (a sealed CloseBody) and the connection. Waits for another
        thread's request on this client to finish; from inside this thread's own open stream it goes ahead."""
        own = self._holder == threading.get_ident()
        if not own and not self._lock.acquire(timeout=self.timeout):
            raise UnavailableError(f"another request on this client did not finish within timeout_s={self.timeout:g}")
        try:
            self._close_quietly()
            self.grpc_channel.close()
        finally:
            if not own:
                self._lock.release()

    def _close_quietly(self, timeout_s: float | None = None) -> None:
        """Close the current session on the server (a sealed CloseBody; best effort: the server drops idle
        sessions anyway) and its channel here."""
        channel, self.channel = self.channel, None
        if channel is None:
            return
        try:
            sealed = channel.seal(serving_pb2.CloseBody().SerializeToString(), AAD_CLOSE)
            self.stub.CloseSession(serving_pb2.SealedRequest(session_id=self.session_id,
                                                             request_id=secrets.token_hex(16), sealed=sealed),
                                   metadata=self._meta(), timeout=timeout_s or self.timeout)
        except (BifrostError, grpc.RpcError):
            pass
        channel.close("client closed")

    def __enter__(self) -> "BifrostClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
