"""The trusted side of serving: one :class:`TrustedReplica` per model replica.

A replica wraps one :class:`~bifrost.tee.runtime.TrustedRuntime` (the model loaded once) and holds,
per user session: the server half of the attested channel (:class:`~bifrost.attest.channel.SecureChannel`),
its own CKKS keys (a :class:`~bifrost.tee.engine.DelegationEngine` over its own worker sessions), and the
conversation history. The gRPC front end (:mod:`bifrost.serve.server`) only ever hands this class
*sealed* records and gets sealed records back, so prompts, tokens, activations, KV state and CKKS secret
keys exist only in this process. Every turn's tokens come from the replica's one decode loop
(:class:`~bifrost.tee.scheduler.StepLoop`); the KV cache lives in the turn.

The class is plain Python: ``bifrost serve`` runs it as a Ray actor (``runtime: ray``) or in-process
(``runtime: local``: the serving process then holds the keys and must itself run in the TEE). Methods
return the typed messages of :mod:`bifrost.proto.replica` and never raise for bad input.

Refusals: before a request's sealed record is opened (unknown or busy session, a record that does not
authenticate or is a replay) a :class:`~bifrost.proto.replica.Refusal` carries the reason in cleartext.
Such a record changes nothing: the session stays open and its receive sequence number does not move
(the channel's server role). Once the record is opened, every refusal carries its exact reason and
status *sealed* (``Refusal.sealed``: a TokenChunk or EmbedResult) and the cleartext message is the
generic :data:`~bifrost.proto.wire.SEALED_REFUSAL`; Generate yields the sealed chunk as a
``SealedReply`` and then the refusal. Counts and sizes (prompt tokens, limits, conversation length)
never appear outside the channel.

Generation parameters (sealed, in the GenerateBody): per-turn sampling (temperature, top_p, top_k over the
``generation:`` config), stop sequences (text that may begin one is held back; when one appears the turn
is cancelled in the step loop, like a consumer that left, and the last chunk says ``finish_reason:
stop``), the model's end-of-sequence token (ends the turn, not streamed) and chat ``messages`` rendered by
the tokenizer's chat template. Messages are the whole conversation: the session's history is neither
prepended nor changed by such a turn.

Session life cycle: one request (a *turn*) at a time per session, under the session's lock. A turn
can be stopped between tokens: :meth:`TrustedReplica.cancel` (the client hung up) or
:meth:`TrustedReplica.close_session`. Closing a session while a turn runs only marks it; the turn
releases the session (channel keys, history, CKKS keys, worker sessions) when it ends, so a session
is never torn down under a running generation.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Iterator

from google.protobuf.message import DecodeError

from ..attest.binding import compute_report_data
from ..attest.channel import SUITES, SecureChannel, ServerHandshake
from ..attest.errors import AttestationError, ChannelClosedError, ChannelError
from ..attest.evidence import get_provider
from ..config import RunConfig
from ..errors import BifrostError
from ..attest.mtls import WorkerEndpoint
from ..model.digests import model_digest
from ..model.tokenizer import chat_ids
from ..proto import serving_pb2
from ..proto.replica import Attested, Closed, Refusal, ReplicaInfo, SealedReply, Status
from ..proto.wire import AAD_CHUNK, AAD_CLOSE, AAD_EMBED, AAD_EMBED_RESULT, AAD_GENERATE, SEALED_REFUSAL
from ..serve.config import ServeConfig, serving_config_digest
from .batching import DecodeBatcher
from .engine import DelegationEngine
from .link import WorkerCallError
from .pool import WorkerSessions
from .quarantine import WorkerQuarantine
from .runtime import Sampling, TrustedRuntime, context_tokens
from .scheduler import StepLoop, TokenEvent, Turn, TurnEnd

log = logging.getLogger("bifrost.tee.replica")

MAX_STOP_SEQUENCES = 4  # per request
MAX_STOP_CHARS = 64     # per stop sequence
MAX_TEMPERATURE = 2.0
CHAT_ROLES = ("system", "user", "assistant")
TURN_WAIT_S = 10.0      # a request waits this long for the session's previous turn to finish
CANCELLED_REMEMBERED = 32  # request ids of cancelled turns kept per session


# --------------------------------------------------------------------------- the replica

@dataclass
class _Session:
    channel: SecureChannel
    engine: DelegationEngine | None  # None: nothing is delegated (tee-only)
    report_data: bytes
    history: list[int] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)    # one turn at a time
    state: threading.Lock = field(default_factory=threading.Lock)   # guards busy / closing / released
    busy: bool = False       # a turn holds ``lock``
    closing: bool = False    # closed: running turn stops at the next token and releases the session
    released: bool = False
    cancelled: collections.deque = field(default_factory=lambda: collections.deque(maxlen=CANCELLED_REMEMBERED))
    last_used: float = field(default_factory=time.monotonic)

    def stopped(self, request_id: str) -> bool:
        return self.closing or (bool(request_id) and request_id in self.cancelled)


@dataclass(frozen=True)
class _Request:
    """A checked Generate request: the ids to prefill, tokens to make, sampling, stop sequences; ``chat``:
    it came as messages (the session's history was not prepended and is not changed)."""

    ids: list[int]
    n_new: int
    sampling: Sampling
    stop: list[str]
    chat: bool


class _Refused(Exception):
    """A refusal before the request's record was opened: the message goes back in cleartext."""

    def __init__(self, status: Status, message: str) -> None:
        super().__init__(message)
        self.refusal = Refusal(status, message)


class _Rejected(Exception):
    """A refusal after the request's record was opened: the reason goes back sealed."""

    def __init__(self, status: Status, reason: str) -> None:
        super().__init__(reason)
        self.status, self.reason = status, reason


class TrustedReplica:
    """One model replica and the sessions assigned to it. Thread-safe (Ray threaded actor)."""

    def __init__(self, cfg: RunConfig, scfg: ServeConfig, workers: list[WorkerEndpoint], replica_index: int = 0) -> None:
        """``workers``: the CKKS workers (address + pinned certificate); this replica presents the TLS identity
        ``cfg.tee.identity`` to them and shares ``scfg.quarantine_file`` with every replica and later run."""
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        self.cfg, self.scfg, self.index = cfg, scfg, replica_index
        self.runtime = TrustedRuntime(cfg, None, quarantine=WorkerQuarantine(scfg.quarantine_file))
        # no CKKS worker when the placement policy delegates nothing (tee-only)
        self.pool = (self.runtime.worker_pool(list(workers), scfg.worker_call_timeout_s, scfg.worker_retry_after_s)
                     if self.runtime.sites else None)
        self.spec = self.runtime.spec
        # the base model's digest (public weights; an adapter is bound through the serving-config digest)
        self.model_digest = model_digest(self.spec, cfg.seed, None if cfg.adapter else self.runtime.reference)
        # what this replica loaded (not a second read of the files): its policy and adapter
        self.config_digest = serving_config_digest(cfg, scfg, placement=self.runtime.placement,
                                                   adapter_digest=self.runtime.adapter_digest)
        self.provider = get_provider(scfg.evidence_provider)
        self.context = context_tokens(self.runtime.model)
        self._sessions: dict[bytes, _Session] = {}
        self._lock = threading.Lock()
        self._embed_lock = threading.Lock()
        self.turns_cancelled = 0
        # batch_decode: the decode passes of a step run concurrently (each its own keys and KV cache) and
        # the batcher merges their layer calls; otherwise they run one after another.
        self.batcher = (DecodeBatcher(self.pool, scfg.batch_window_s, scfg.batch_max_rows)
                        if scfg.batch_decode and self.pool is not None else None)
        self.loop = (StepLoop(self.runtime, cfg.generation.mode, self.batcher, max_concurrent=scfg.max_sessions)
                     if self.spec.task == "causal-lm" else None)
        log.info("replica %d ready: model %s, %d delegated layers", replica_index, cfg.model, len(self.runtime.sites))

    # -- public info -----------------------------------------------------------------------
    def info(self) -> ReplicaInfo:
        return ReplicaInfo(self.cfg.model, self.spec.task, self.model_digest, self.config_digest, self.context,
                           self.provider.name, self.cfg.generation.mode, os.getpid())

    def stats(self) -> dict:
        import resource

        with self._lock:
            n = len(self._sessions)
        batching = self.batcher.stats if self.batcher is not None else None
        pool = self.pool
        return {"sessions": n, "workers": pool.snapshot() if pool else [], "failovers": pool.stats.failovers if pool else 0,
                "quarantined_workers": sorted(self.runtime.quarantine.entries()),
                "workers_refused_at_start": list(pool.refused) if pool else [],
                "batched_worker_calls": batching.worker_calls if batching else 0,
                "mean_items_per_batched_call": batching.mean_items if batching else 0.0,
                "max_items_per_batched_call": batching.max_items if batching else 0,
                "max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "pid": os.getpid(),
                "turns_cancelled": self.turns_cancelled}

    def session_count(self) -> int:
        with self._lock:
            return len(self._sessions)

    # -- handshake ---------------------------------------------------------------------------
    def attest(self, nonce: bytes, client_public_key: bytes, suite: str) -> Attested | Refusal:
        """Fresh channel key, evidence binding it, the channel keys, and this session's CKKS keys."""
        suite = suite or "AES-256-GCM"
        if suite not in SUITES:
            return Refusal(Status.INVALID_ARGUMENT, f"unknown suite {suite!r}; choose {', '.join(SUITES)}")
        if len(nonce) < 16 or len(nonce) > 1024:
            return Refusal(Status.INVALID_ARGUMENT, "nonce must be 16..1024 bytes")
        if len(client_public_key) != 32:
            return Refusal(Status.INVALID_ARGUMENT, "client_public_key must be a 32-byte raw X25519 key")
        try:
            hs = ServerHandshake()
            report_data = compute_report_data(hs.public_key, nonce, self.model_digest, self.config_digest)
            evidence = self.provider.get_evidence(report_data)
            channel = hs.accept(client_public_key, nonce, report_data, suite)
        except AttestationError as exc:
            status = Status.INVALID_ARGUMENT if isinstance(exc, ChannelError) else Status.UNAVAILABLE
            return Refusal(status, f"handshake failed: {exc}")
        engine = None  # nothing delegated (tee-only): no CKKS keys, no worker sessions
        worker_sessions = WorkerSessions(self.pool) if self.pool is not None else None
        try:  # this session's own CKKS key pair and worker sessions
            if worker_sessions is not None:
                link = self.batcher.link_for(worker_sessions) if self.batcher is not None else worker_sessions
                engine = self.runtime.new_engine(link)
        except BaseException as exc:
            worker_sessions.close()  # worker sessions opened before the failure
            if isinstance(exc, WorkerCallError) and exc.code.name == "RESOURCE_EXHAUSTED":
                return Refusal(Status.RESOURCE_EXHAUSTED,
                               "the CKKS workers hold their maximum number of worker sessions; try later")
            if isinstance(exc, BifrostError):
                return Refusal(Status.UNAVAILABLE, f"cannot open a CKKS worker session: {exc}")
            raise
        sid = channel.session_id
        with self._lock:
            self._sessions[sid] = _Session(channel, engine, report_data)
        log.info("replica %d: session %s… opened", self.index, sid.hex()[:8])
        return Attested(sid, hs.public_key, report_data, evidence.evidence_type, evidence.raw, self.model_digest,
                        self.config_digest, suite, dict(evidence.endorsements))

    def close_session(self, session_id: bytes) -> bool:
        """End a session. If a turn is running it stops at its next token and releases the session."""
        with self._lock:
            s = self._sessions.pop(session_id, None)
        if s is None:
            return False
        with s.state:
            s.closing = True
            release = not s.busy and not s.released
            s.released = s.released or release
        if release:
            self._release(s, session_id)
        return True

    def _release(self, s: _Session, session_id: bytes) -> None:
        s.channel.close("session ended")
        s.history.clear()
        if s.engine is not None:
            s.engine.close()
        log.info("replica %d: session %s… closed", self.index, session_id.hex()[:8])

    def cancel(self, session_id: bytes, request_id: str) -> bool:
        """Stop the turn of ``request_id`` (running or still queued) at its next token."""
        with self._lock:
            s = self._sessions.get(session_id)
        if s is None or not request_id:
            return False
        s.cancelled.append(request_id)
        return True

    def close_idle(self, idle_s: float) -> list[bytes]:
        """Backstop for sessions the front end lost track of: close those idle for ``idle_s``."""
        now = time.monotonic()
        with self._lock:
            idle = [sid for sid, s in self._sessions.items()
                    if now - s.last_used > idle_s and not s.busy and not s.lock.locked()]
        for sid in idle:
            self.close_session(sid)
        return idle

    @contextlib.contextmanager
    def _turn(self, session_id: bytes):
        """Hold the session for one request; raises :class:`_Refused`."""
        with self._lock:
            s = self._sessions.get(session_id)
        if s is None:
            raise _Refused(Status.NOT_FOUND, "unknown or closed session; attest again")
        if not s.lock.acquire(timeout=TURN_WAIT_S):  # the previous turn may still be winding down
            raise _Refused(Status.FAILED_PRECONDITION, "this session already has a request in progress")
        with s.state:
            closed = s.closing
            s.busy = not closed
        if closed:
            s.lock.release()
            raise _Refused(Status.NOT_FOUND, "unknown or closed session; attest again")
        try:
            yield s
        finally:
            with s.state:
                s.busy = False
                release = s.closing and not s.released
                s.released = s.released or release
            s.lock.release()
            if release:
                self._release(s, session_id)

    def _open(self, s: _Session, session_id: bytes, sealed: bytes, aad: bytes, body_cls):
        """Open the record (inside the session's turn) and parse the body. A record that does not open
        raises :class:`_Refused` and leaves the session as it was; a bad body raises :class:`_Rejected`."""
        try:
            plaintext = s.channel.open(sealed, aad)
        except ChannelError as exc:
            log.warning("replica %d: session %s…: record refused (%s)", self.index, session_id.hex()[:8], exc.check)
            raise _Refused(Status.PERMISSION_DENIED, f"sealed payload rejected ({exc.check}); the session is unchanged") from None
        s.last_used = time.monotonic()  # only an authentic record restarts the idle time
        try:
            return body_cls.FromString(plaintext)
        except DecodeError:
            raise _Rejected(Status.INVALID_ARGUMENT, f"sealed payload is not a valid {body_cls.__name__}") from None

    @staticmethod
    def _refusal(s: _Session, exc: _Rejected, reply, aad: bytes) -> bytes | None:
        """``reply`` (a TokenChunk or EmbedResult) carrying the refusal, sealed; None if the channel is closed."""
        reply.error, reply.error_code = exc.reason, exc.status.value
        try:
            return s.channel.seal(reply.SerializeToString(), aad)
        except ChannelError:
            return None

    def close_sealed(self, session_id: bytes, sealed: bytes) -> Closed | Refusal:
        """CloseSession from the client: the sealed CloseBody must open first. A record that does not open
        (empty, forged, replayed) leaves the session as it was."""
        with self._lock:
            s = self._sessions.get(session_id)
        if s is None:
            return Refusal(Status.NOT_FOUND, "unknown or closed session; attest again")
        try:  # not under the turn lock: a close stops a running turn at its next token
            plaintext = s.channel.open(sealed, AAD_CLOSE)
        except ChannelClosedError:
            return Refusal(Status.NOT_FOUND, "unknown or closed session; attest again")
        except ChannelError as exc:
            log.warning("replica %d: session %s…: close refused (%s)", self.index, session_id.hex()[:8], exc.check)
            return Refusal(Status.PERMISSION_DENIED, f"sealed CloseSession record rejected ({exc.check}); the session is unchanged")
        try:
            serving_pb2.CloseBody.FromString(plaintext)
        except DecodeError:
            return Refusal(Status.INVALID_ARGUMENT, "sealed payload is not a valid CloseBody")
        self.close_session(session_id)
        return Closed()

    # -- generation --------------------------------------------------------------------------
    def generate(self, session_id: bytes, sealed: bytes, request_id: str = "") -> Iterator[SealedReply | Refusal]:
        """Yields a ``SealedReply`` (TokenChunk) per token, or one ``Refusal`` (after a sealed refusal chunk
        when the record was opened).

        Stops between tokens when ``request_id`` is cancelled or the session is closed."""
        try:
            with self._turn(session_id) as s:
                try:
                    yield from self._generate_locked(s, session_id, sealed, request_id)
                except _Rejected as exc:
                    record = self._refusal(s, exc, serving_pb2.TokenChunk(done=True), AAD_CHUNK)
                    if record is not None:
                        yield SealedReply(record)
                    yield Refusal(exc.status, SEALED_REFUSAL)
        except _Refused as exc:
            yield exc.refusal

    def _generate_locked(self, s: _Session, session_id: bytes, sealed: bytes, request_id: str):
        body = self._open(s, session_id, sealed, AAD_GENERATE, serving_pb2.GenerateBody)
        req = self._check_generate(s, body)
        ids, n_new = req.ids, req.n_new
        if s.stopped(request_id):  # cancelled while it waited for the previous turn
            yield from self._stopped(s, session_id, 0)
            return
        turn = self.loop.submit(Turn(s.engine, ids, n_new, lambda: s.stopped(request_id),
                                     body.sample_seed if body.has_sample_seed else None, req.sampling,
                                     self.runtime.tokenizer.eos_token_id))
        tokens: list[int] = []
        text_so_far = ""  # the text streamed so far
        ended = False
        try:
            for event in _events(turn):
                if isinstance(event, TurnEnd):
                    ended = True
                    if event.stopped or turn.cancelled:  # (cancelled here: a stop noticed at the last token)
                        yield from self._stopped(s, session_id, len(tokens))
                    elif isinstance(event.error, BifrostError):  # workers exhausted etc.: the reason goes back sealed
                        log.warning("replica %d: session %s… generation failed: %s", self.index,
                                    session_id.hex()[:8], type(event.error).__name__)
                        raise _Rejected(Status.UNAVAILABLE, "generation failed: CKKS workers unavailable")
                    elif event.error is not None:
                        raise event.error
                    return
                if s.stopped(request_id):  # checked between tokens: the client left or the session closed
                    turn.cancel()
                    continue  # the loop retires the turn at its next step and says so (TurnEnd)
                s.last_used = time.monotonic()
                eos = event.token == turn.eos  # ends the turn; never streamed as text
                if not eos:
                    tokens.append(event.token)
                text = self.runtime.tokenizer.decode(tokens)
                hit = _find_stop(text, req.stop)
                if hit is not None:
                    finish, stable = "stop", text[:max(hit, len(text_so_far))]
                elif eos:
                    finish, stable = "stop", text
                elif event.index == n_new - 1:
                    finish, stable = "length", text
                else:  # hold back split UTF-8 and text that may be the start of a stop sequence
                    finish, stable = "", text.rstrip("\ufffd")
                    stable = stable[:len(stable) - _stop_prefix(stable, req.stop)]
                delta, text_so_far = stable[len(text_so_far):], stable if stable.startswith(text_so_far) else text_so_far
                chunk = serving_pb2.TokenChunk(token_ids=[] if eos else [event.token], text=delta, done=bool(finish),
                                               token_seconds=event.seconds, finish_reason=finish,
                                               prompt_tokens=len(ids) if event.index == 0 else 0)
                if finish and not req.chat:  # commit the turn before the last chunk leaves (the client may hang up)
                    s.history = ids + tokens + ([event.token] if eos else [])
                yield SealedReply(s.channel.seal(chunk.SerializeToString(), AAD_CHUNK))
                if finish:
                    return  # a stop sequence: the turn is cancelled and drained below (its engine is released)
        finally:
            if not ended:  # stopped early (a stop sequence) or the consumer left (GeneratorExit): the session's
                turn.cancel()  # engine is released only once the loop is done with it
                _drain(turn)

    def _check_generate(self, s: _Session, body) -> "_Request":
        """The conversation to prefill, the tokens to make, the sampling and stop sequences; :class:`_Rejected`
        (sealed) for a bad parameter or over a limit."""
        if self.spec.task != "causal-lm":
            raise _Rejected(Status.FAILED_PRECONDITION, f"{self.cfg.model} is an encoder model; use Embed")
        n_new = body.max_new_tokens or min(self.cfg.generation.max_new_tokens, self.scfg.max_new_tokens)
        if n_new > self.scfg.max_new_tokens:
            raise _Rejected(Status.INVALID_ARGUMENT, f"max_new_tokens {n_new} is over the limit of {self.scfg.max_new_tokens}")
        sampling = self._sampling(body)
        stop = list(body.stop)
        if len(stop) > MAX_STOP_SEQUENCES or any(not 1 <= len(x) <= MAX_STOP_CHARS for x in stop):
            raise _Rejected(Status.INVALID_ARGUMENT, f"stop: up to {MAX_STOP_SEQUENCES} stop sequences of "
                                                     f"1..{MAX_STOP_CHARS} characters each")
        chat = len(body.messages) > 0
        if chat:
            prompt_ids = self._chat_ids(body)
        else:
            prompt_ids = self.runtime.tokenizer.encode(body.prompt)
            if not prompt_ids:
                raise _Rejected(Status.INVALID_ARGUMENT, "the prompt is empty")
        if len(prompt_ids) > self.scfg.max_prompt_tokens:
            raise _Rejected(Status.INVALID_ARGUMENT, f"prompt has {len(prompt_ids)} tokens; the limit is "
                                                     f"max_prompt_tokens={self.scfg.max_prompt_tokens}")
        if body.reset_history:
            s.history = []
        ids = prompt_ids if chat else s.history + prompt_ids  # messages are the whole conversation
        if self.context and len(ids) + n_new > self.context:
            raise _Rejected(Status.INVALID_ARGUMENT, f"conversation ({len(ids)} tokens) + {n_new} new tokens exceeds "
                                                     f"the model context of {self.context} tokens; reset the history")
        return _Request(ids, n_new, sampling, stop, chat)

    def _chat_ids(self, body) -> list[int]:
        if body.prompt:
            raise _Rejected(Status.INVALID_ARGUMENT, "give a prompt or messages, not both")
        for m in body.messages:
            if m.role not in CHAT_ROLES:
                raise _Rejected(Status.INVALID_ARGUMENT, f"message role {m.role[:32]!r}: use one of {', '.join(CHAT_ROLES)}")
        try:  # the model's own chat template, else the documented plain fallback (``role: content`` lines)
            ids = chat_ids(self.runtime.tokenizer, [{"role": m.role, "content": m.content} for m in body.messages])
        except Exception as exc:  # noqa: BLE001 - a template that rejects this conversation (e.g. role order)
            raise _Rejected(Status.INVALID_ARGUMENT, f"the chat template refused these messages: "
                                                     f"{type(exc).__name__}: {str(exc)[:200]}") from None
        if not ids:
            raise _Rejected(Status.INVALID_ARGUMENT, "the chat template rendered the messages as no tokens")
        return ids

    def _sampling(self, body) -> Sampling:
        """The turn's sampling: the body's parameters over the ``generation:`` config; temperature 0: greedy."""
        base = Sampling.from_config(self.cfg.generation)
        vocab = int(getattr(self.runtime.model.config, "vocab_size", 0) or 0)
        if body.HasField("temperature") and not 0.0 <= body.temperature <= MAX_TEMPERATURE:
            raise _Rejected(Status.INVALID_ARGUMENT, f"temperature must be 0..{MAX_TEMPERATURE:g} (0: greedy)")
        if body.HasField("top_p") and not 0.0 < body.top_p <= 1.0:
            raise _Rejected(Status.INVALID_ARGUMENT, "top_p must be in (0, 1]")
        if body.HasField("top_k") and vocab and body.top_k > vocab:
            raise _Rejected(Status.INVALID_ARGUMENT, f"top_k must be 0 (off) .. the vocabulary size {vocab}")
        temperature = body.temperature if body.HasField("temperature") else base.temperature
        do_sample = temperature > 0 if body.HasField("temperature") else base.do_sample
        if not do_sample:
            return Sampling(False, base.temperature, base.top_k, base.top_p)
        return Sampling(True, float(temperature), int(body.top_k) if body.HasField("top_k") else base.top_k,
                        float(body.top_p) if body.HasField("top_p") else base.top_p)

    def _stopped(self, s: _Session, session_id: bytes, produced: int):
        log.info("replica %d: session %s… turn stopped after %d tokens (%s)", self.index, session_id.hex()[:8],
                 produced, "session closed" if s.closing else "cancelled")
        if s.closing:
            yield Refusal(Status.ABORTED, "the session was closed during this turn")
        else:
            with self._lock:
                self.turns_cancelled += 1

    # -- embeddings --------------------------------------------------------------------------
    def embed(self, session_id: bytes, sealed: bytes) -> SealedReply | Refusal:
        """The sealed EmbedResult, or a refusal (carrying a sealed EmbedResult once the record was opened)."""
        try:
            with self._turn(session_id) as s:
                try:
                    return self._embed_locked(s, session_id, sealed)
                except _Rejected as exc:
                    return Refusal(exc.status, SEALED_REFUSAL, self._refusal(s, exc, serving_pb2.EmbedResult(),
                                                                             AAD_EMBED_RESULT))
        except _Refused as exc:
            return exc.refusal

    def _embed_locked(self, s: _Session, session_id: bytes, sealed: bytes):
        body = self._open(s, session_id, sealed, AAD_EMBED, serving_pb2.EmbedBody)
        if self.spec.task != "encoder":
            raise _Rejected(Status.FAILED_PRECONDITION, f"{self.cfg.model} is not an encoder model; use Generate")
        if not body.texts or len(body.texts) > 64:
            raise _Rejected(Status.INVALID_ARGUMENT, "send 1..64 texts")
        for t in body.texts:
            n = len(self.runtime.tokenizer.encode(t))
            if n == 0 or n > self.scfg.max_prompt_tokens:
                raise _Rejected(Status.INVALID_ARGUMENT,
                                f"each text needs 1..max_prompt_tokens={self.scfg.max_prompt_tokens} tokens")
        try:
            with self._embed_lock:
                vectors = self.runtime.embed(list(body.texts), s.engine)
        except BifrostError:
            raise _Rejected(Status.UNAVAILABLE, "embedding failed: CKKS workers unavailable") from None
        result = serving_pb2.EmbedResult(vectors=[serving_pb2.Vector(values=v.tolist()) for v in vectors])
        return SealedReply(s.channel.seal(result.SerializeToString(), AAD_EMBED_RESULT))

    def shutdown(self) -> None:
        """Close every session (a running turn ends ABORTED at its next token and then releases its
        session), stop the decode loop once its passes are done, then the runtime and the worker pool."""
        with self._lock:
            sessions = list(self._sessions.values())
            sids = list(self._sessions)
        for sid in sids:
            self.close_session(sid)
        if self.loop is not None:
            self.loop.close()
        deadline = time.monotonic() + 30.0
        while time.monotonic() < deadline and not all(s.released for s in sessions):
            time.sleep(0.01)  # the turns' consumers release their sessions (engines) before the pool closes
        self.runtime.close()
        if self.pool is not None:
            self.pool.close()


def _events(turn: Turn) -> Iterator[TokenEvent | TurnEnd]:
    """The turn's events until its ``TurnEnd`` (inclusive)."""
    while True:
        event = turn.events.get()
        yield event
        if isinstance(event, TurnEnd):
            return


def _find_stop(text: str, stops: list[str]) -> int | None:
    """Where the earliest stop sequence starts in ``text``, or None."""
    hits = [i for i in (text.find(x) for x in stops) if i >= 0]
    return min(hits) if hits else None


def _stop_prefix(text: str, stops: list[str]) -> int:
    """The length of the longest end of ``text`` that begins a stop sequence (held back until it resolves)."""
    best = 0
    for x in stops:
        for k in range(min(len(x) - 1, len(text)), best, -1):
            if text.endswith(x[:k]):
                best = k
                break
    return best


def _drain(turn: Turn) -> None:
    """Wait until the loop is done with a (cancelled) turn: at most one step."""
    for _ in _events(turn):
        pass

