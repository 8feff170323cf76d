"""The trusted side of serving: one :class:`TrustedReplica` per model replica.

A replica wraps one :class:`~bifrost.tee.runtime.TrustedRuntime` (the model loaded once) and holds,
per user session: the server half of the attested channel (:class:`~bifrost.attest.channel.SecureChannel`),
its own CKKS keys (a :class:`~bifrost.tee.engine.DelegationEngine` over its own worker sessions), and the
conversation history. The gRPC front end (:mod:`bifrost.serve.server`) only ever hands this class
*sealed* records and gets sealed records back, so prompts, tokens, activations, KV state and CKKS secret
keys exist only in this process. Every turn's tokens come from the replica's one decode loop
(:class:`~bifrost.tee.scheduler.StepLoop`); the KV cache lives in the turn.

The class is plain Python and implements :class:`~bifrost.proto.replica.ReplicaAPI` (typed requests in,
typed replies out): ``bifrost serve`` runs it as a Ray actor (``runtime: ray``) or in-process (``runtime:
local``: the serving process then holds the keys and must itself run in the TEE). Methods never raise
for bad input.

Refusals: before a request's sealed record is opened (unknown or busy session, a record that does not
authenticate or is a replay) a :class:`~bifrost.proto.replica.Refusal` carries the reason in cleartext.
Such a record changes nothing: the session stays open and its receive sequence number does not move
(the channel's server role). Once the record is opened, every refusal carries its exact reason and
status *sealed* (``Refusal.sealed``: a TokenChunk or EmbedResult) and the cleartext message is the
generic :data:`~bifrost.proto.wire.SEALED_REFUSAL`; Generate yields the sealed chunk as a
``SealedReply`` and then the refusal. Counts and sizes (prompt tokens, limits, conversation length)
never appear outside the channel.

Generation parameters (sealed, in the GenerateBody) are checked by :mod:`bifrost.tee.validation`: per-turn
sampling, stop sequences, the model's end-of-sequence token (ends the turn, not streamed) and chat
``messages`` (the whole conversation: the session's history is neither prepended nor changed by such a
turn). Text comes from the turn's :class:`~bifrost.tee.detokenize.OutputProcessor` (only new tokens
decoded; text that may begin a stop sequence held back; at a stop sequence the turn is cancelled and the
last chunk says ``finish_reason: stop``).

Session life cycle: one request (a *turn*) at a time per session, under the session's lock. A turn
is stopped through one channel, :meth:`Turn.cancel <bifrost.tee.scheduler.Turn.cancel>`: by
:meth:`TrustedReplica.cancel` (the client hung up), by closing the session, or by a stop sequence. Closing a session while a turn runs only marks it; the turn
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
from ..attest.channel import SUITES, SecureChannel, ServerHandshake, answer_aad
from ..attest.errors import AttestationError, ChannelClosedError, ChannelError
from ..attest.evidence import get_provider
from ..attest.mtls import WorkerEndpoint
from ..config import RunConfig
from ..errors import BifrostError, ErrorKind, error_kind
from ..model.digests import model_digest
from ..proto import serving_pb2
from ..proto.replica import (AttestRequest, Attested, CancelRequest, CloseIdle, CloseRequest, Closed, DropSession,
                             EmbedRequest, GenerateRequest, Refusal, ReplicaInfo, SealedReply, Status)
from ..proto.wire import AAD_CHUNK, AAD_CLOSE, AAD_EMBED, AAD_EMBED_RESULT, AAD_GENERATE, SEALED_REFUSAL
from ..serve.config import ServeConfig, serving_config_digest
from .batching import DecodeBatcher
from .engine import DelegationEngine
from .link import WorkerCallError
from .pool import WorkerQuarantine, WorkerSessions
from .detokenize import OutputProcessor
from .runtime import TrustedRuntime, context_tokens
from .scheduler import Sampling, StepLoop, TokenEvent, Turn, TurnEnd
from .validation import Limits, Rejected, check_embed, check_generate


class ClearRefusal(Exception):
    """A request turned down *before* its record was opened (unknown or busy session, a record that does not
    open): the reason says nothing about the session's plaintext and goes back in cleartext. Nothing changed."""

    def __init__(self, status: Status, reason: str) -> None:
        super().__init__(reason)
        self.refusal = Refusal(status, reason)

log = logging.getLogger("bifrost.tee.replica")

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
    state: threading.Lock = field(default_factory=threading.Lock)   # guards the fields below
    busy: bool = False       # a turn holds ``lock``
    closing: bool = False    # closed: the running turn is cancelled and releases the session when it ends
    released: bool = False
    turn: Turn | None = None  # the running turn and its request id (for CancelRequest)
    request_id: str = ""
    cancelled: collections.deque = field(default_factory=lambda: collections.deque(maxlen=CANCELLED_REMEMBERED))
    last_used: float = field(default_factory=time.monotonic)
    turns: int = 0           # Generate records opened on this session (serve.max_turns_per_session)

    def start(self, turn: Turn, request_id: str) -> bool:
        """Make ``turn`` the running one; False (and nothing changes) when it was cancelled or the session
        closed before it started."""
        with self.state:
            if self.closing or (request_id and request_id in self.cancelled):
                return False
            self.turn, self.request_id = turn, request_id
            return True

    def cancel(self, request_id: str | None) -> None:
        """Cancel ``request_id`` (None: whatever runs, the session is closing), running or still to come."""
        with self.state:
            if request_id:
                self.cancelled.append(request_id)
            if self.turn is not None and (request_id is None or request_id == self.request_id):
                self.turn.cancel()


class TrustedReplica:
    """One model replica and the sessions assigned to it; implements
    :class:`~bifrost.proto.replica.ReplicaAPI`. Thread-safe (Ray threaded actor)."""

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
        model_context = context_tokens(self.runtime.model)  # 0: unknown
        # the context a turn may fill (history + prompt + new tokens): serve.max_context_tokens caps the model's
        self.context = min(filter(None, (model_context, scfg.max_context_tokens)), default=0)
        self._sessions: dict[bytes, _Session] = {}
        self._attesting = 0  # Attests past the session limit check, not yet in _sessions
        self._lock = threading.Lock()
        self._embed_lock = threading.Lock()
        self.turns_cancelled = 0
        # batch_decode: the decode passes of a step run concurrently (each its own keys and KV cache) and
        # the batcher merges their layer calls; otherwise they run one after another.
        self.batcher = (DecodeBatcher(self.pool, scfg.batch_window_s, scfg.batch_max_rows)
                        if scfg.batch_decode and self.pool is not None else None)
        self.loop = (StepLoop(self.runtime, cfg.generation.mode, self.batcher, max_concurrent=scfg.replica_sessions)
                     if self.spec.task == "causal-lm" else None)
        log.info("replica %d ready: model %s, %d delegated layers", replica_index, cfg.model, len(self.runtime.sites))

    @property
    def limits(self) -> Limits:
        """What this replica accepts (:mod:`bifrost.tee.validation`)."""
        return Limits(self.cfg.model, self.spec.task, self.context,
                      int(getattr(self.runtime.model.config, "vocab_size", 0) or 0), self.scfg.max_new_tokens,
                      self.cfg.generation.max_new_tokens, self.scfg.max_prompt_tokens,
                      Sampling.from_config(self.cfg.generation))

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
                "turns_cancelled": self.turns_cancelled, "node_id": ray_node_id()}

    def session_count(self) -> int:
        with self._lock:
            return len(self._sessions)

    # -- handshake ---------------------------------------------------------------------------
    def attest(self, req: AttestRequest) -> Attested | Refusal:
        """Fresh channel key, evidence binding it, the channel keys, and this session's CKKS keys."""
        nonce, client_public_key, suite = req.nonce, req.client_public_key, req.suite or "AES-256-GCM"
        if suite not in SUITES:
            return Refusal(Status.INVALID_ARGUMENT, f"unknown suite {suite!r}; choose {', '.join(SUITES)}")
        if len(nonce) < 16 or len(nonce) > 1024:
            return Refusal(Status.INVALID_ARGUMENT, "nonce must be 16..1024 bytes")
        if len(client_public_key) != 32:
            return Refusal(Status.INVALID_ARGUMENT, "client_public_key must be a 32-byte raw X25519 key")
        limit = self.scfg.replica_sessions  # the front end places no more; this also bounds sessions it lost
        with self._lock:  # a slot is taken before the (slow) handshake, so concurrent Attests cannot exceed it
            if len(self._sessions) + self._attesting >= limit:
                return Refusal(Status.RESOURCE_EXHAUSTED, f"this replica holds {limit} sessions "
                                                          f"(max_sessions_per_replica={limit}); try again later")
            self._attesting += 1
        try:
            return self._attest(nonce, client_public_key, suite)
        finally:
            with self._lock:
                self._attesting -= 1

    def _attest(self, nonce: bytes, client_public_key: bytes, suite: str) -> Attested | Refusal:
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
            if worker_sessions is not None:
                worker_sessions.close()  # worker sessions opened before the failure
            if isinstance(exc, WorkerCallError) and exc.code.name == "RESOURCE_EXHAUSTED":
                return Refusal(Status.RESOURCE_EXHAUSTED,
                               "the CKKS workers hold their maximum number of worker sessions; try later")
            if isinstance(exc, BifrostError) and error_kind(exc) is not ErrorKind.INTERNAL:
                return Refusal(Status.UNAVAILABLE, f"cannot open a CKKS worker session: {exc}")
            raise
        sid = channel.session_id
        with self._lock:
            self._sessions[sid] = _Session(channel, engine, report_data)
        log.info("replica %d: session %s… opened", self.index, sid.hex()[:8])
        return Attested(sid, hs.public_key, report_data, evidence.evidence_type, evidence.raw, self.model_digest,
                        self.config_digest, suite, dict(evidence.endorsements))

    def close_session(self, session_id: bytes) -> bool:
        """End a session. A running turn is cancelled and releases the session when it ends."""
        with self._lock:
            s = self._sessions.pop(session_id, None)
        if s is None:
            return False
        with s.state:
            s.closing = True
            release = not s.busy and not s.released
            s.released = s.released or release
        s.cancel(None)
        if release:
            self._release(s, session_id)
        return True

    def drop_session(self, req: DropSession) -> bool:
        """The front end forgot the session (client gone, refused): close it here too."""
        return self.close_session(req.session_id)

    def _release(self, s: _Session, session_id: bytes) -> None:
        s.channel.close("session ended")
        s.history.clear()
        if s.engine is not None:
            s.engine.close()
        log.info("replica %d: session %s… closed", self.index, session_id.hex()[:8])

    def cancel(self, req: CancelRequest) -> bool:
        """Stop the turn of ``req.request_id`` (running or still queued) at its next token."""
        with self._lock:
            s = self._sessions.get(req.session_id)
        if s is None or not req.request_id:
            return False
        s.cancel(req.request_id)
        return True

    def close_idle(self, req: CloseIdle) -> list[bytes]:
        """Backstop for sessions the front end lost track of: close those idle for ``req.idle_s``."""
        now = time.monotonic()
        with self._lock:
            idle = [sid for sid, s in self._sessions.items()
                    if now - s.last_used > req.idle_s and not s.busy and not s.lock.locked()]
        for sid in idle:
            self.close_session(sid)
        return idle

    @contextlib.contextmanager
    def _turn(self, session_id: bytes):
        """Hold the session for one request; raises :class:`ClearRefusal`."""
        with self._lock:
            s = self._sessions.get(session_id)
        if s is None:
            raise ClearRefusal(Status.NOT_FOUND, "unknown or closed session; attest again")
        if not s.lock.acquire(timeout=TURN_WAIT_S):  # the previous turn may still be winding down
            raise ClearRefusal(Status.FAILED_PRECONDITION, "this session already has a request in progress")
        with s.state:
            closed = s.closing
            s.busy = not closed
        if closed:
            s.lock.release()
            raise ClearRefusal(Status.NOT_FOUND, "unknown or closed session; attest again")
        try:
            yield s
        finally:
            with s.state:
                s.busy = False
                s.turn = None
                release = s.closing and not s.released
                s.released = s.released or release
            s.lock.release()
            if release:
                self._release(s, session_id)

    def _open(self, s: _Session, session_id: bytes, sealed: bytes, aad: bytes) -> bytes:
        """Open the record (inside the session's turn). A record that does not open raises :class:`ClearRefusal`
        and leaves the session as it was."""
        try:
            plaintext = s.channel.open(sealed, aad)
        except ChannelError as exc:
            log.warning("replica %d: session %s…: record refused (%s)", self.index, session_id.hex()[:8], exc.check)
            raise ClearRefusal(Status.PERMISSION_DENIED, f"sealed payload rejected ({exc.check}); the session is unchanged") from None
        s.last_used = time.monotonic()  # only an authentic record restarts the idle time
        return plaintext

    @staticmethod
    def _parse(plaintext: bytes, body_cls):
        try:
            return body_cls.FromString(plaintext)
        except DecodeError:
            raise Rejected(Status.INVALID_ARGUMENT, f"sealed payload is not a valid {body_cls.__name__}") from None

    @staticmethod
    def _refusal(exc: Rejected, reply, seal: "_Answer") -> bytes | None:
        """``reply`` (a TokenChunk or EmbedResult) carrying the refusal, sealed; None if the channel is closed."""
        reply.error, reply.error_code = exc.reason, exc.status.value
        try:
            return seal(reply)
        except ChannelError:
            return None

    def close_sealed(self, req: CloseRequest) -> Closed | Refusal:
        """CloseSession from the client: the sealed CloseBody must open first. A record that does not open
        (empty, forged, replayed) leaves the session as it was."""
        with self._lock:
            s = self._sessions.get(req.session_id)
        if s is None:
            return Refusal(Status.NOT_FOUND, "unknown or closed session; attest again")
        try:  # not under the turn lock: a close stops a running turn at its next token
            plaintext = s.channel.open(req.sealed, AAD_CLOSE)
        except ChannelClosedError:
            return Refusal(Status.NOT_FOUND, "unknown or closed session; attest again")
        except ChannelError as exc:
            log.warning("replica %d: session %s…: close refused (%s)", self.index, req.session_id.hex()[:8], exc.check)
            return Refusal(Status.PERMISSION_DENIED, f"sealed CloseSession record rejected ({exc.check}); the session is unchanged")
        try:
            serving_pb2.CloseBody.FromString(plaintext)
        except DecodeError:
            return Refusal(Status.INVALID_ARGUMENT, "sealed payload is not a valid CloseBody")
        self.close_session(req.session_id)
        return Closed()

    # -- generation --------------------------------------------------------------------------
    def generate(self, req: GenerateRequest) -> Iterator[SealedReply | Refusal]:
        """Yields a ``SealedReply`` (TokenChunk) per token, or one ``Refusal`` (after a sealed refusal chunk
        when the record was opened).

        Stops between tokens when ``req.request_id`` is cancelled or the session is closed."""
        try:
            with self._turn(req.session_id) as s:
                plaintext = self._open(s, req.session_id, req.sealed, AAD_GENERATE)
                seal = _Answer(s.channel, AAD_CHUNK, req.sealed)
                try:
                    yield from self._generate_locked(s, req, self._parse(plaintext, serving_pb2.GenerateBody), seal)
                except Rejected as exc:
                    record = self._refusal(exc, serving_pb2.TokenChunk(done=True), seal)
                    if record is not None:
                        yield SealedReply(record)
                    yield Refusal(exc.status, SEALED_REFUSAL)
        except ClearRefusal as exc:
            yield exc.refusal

    def _generate_locked(self, s: _Session, req: GenerateRequest, body: serving_pb2.GenerateBody, seal: "_Answer"):
        s.turns += 1  # the limit bound into the serving-config digest holds here, whatever the front end counts
        if s.turns > self.scfg.max_turns_per_session:
            raise Rejected(Status.RESOURCE_EXHAUSTED, f"this session had max_turns_per_session="
                                                      f"{self.scfg.max_turns_per_session} turns; attest a new session")
        checked = check_generate(body, [] if body.reset_history else s.history, self.runtime.tokenizer, self.limits)
        if body.reset_history:  # only an accepted request changes the conversation
            s.history = []
        assert self.loop is not None  # a decoder model (check_generate refused an encoder)
        turn = Turn(s.engine, checked.ids, checked.n_new, checked.sample_seed, checked.sampling,
                    self.runtime.tokenizer.eos_token_id)
        if not s.start(turn, req.request_id):  # cancelled while it waited for the previous turn
            yield from self._end_cancelled(s, req.session_id, 0)
            return
        self.loop.submit(turn)
        out = OutputProcessor(self.runtime.tokenizer, checked.stop)
        ended = False
        try:
            for event in _events(turn):
                if isinstance(event, TurnEnd):
                    ended = True
                    if event.cancelled or turn.cancelled:  # (cancelled here: a stop noticed at the last token)
                        yield from self._end_cancelled(s, req.session_id, len(out.tokens))
                    elif event.error is not None:
                        raise self._failed("generation", req.session_id, event.error)
                    return
                if turn.cancelled:  # the client left or the session closed: nothing more is streamed
                    continue  # the loop retires the turn at its next step and says so (TurnEnd)
                s.last_used = time.monotonic()
                eos = event.token == turn.eos  # ends the turn; never streamed as text
                last = event.index == checked.n_new - 1
                delta = out.finish() if eos else out.push(event.token, last=last)
                finish = "stop" if delta.hit_stop or eos else "length" if last else ""
                chunk = serving_pb2.TokenChunk(token_ids=[] if eos else [event.token], text=delta.text,
                                               done=bool(finish), token_seconds=event.seconds, finish_reason=finish,
                                               prompt_tokens=len(checked.ids) if event.index == 0 else 0)
                if finish and not checked.chat:  # commit the turn before the last chunk leaves (the client may hang up)
                    s.history = checked.ids + out.tokens + ([event.token] if eos else [])
                yield SealedReply(seal(chunk))
                if finish:
                    return  # all tokens or end-of-sequence (the loop ends the turn), or a stop sequence (cancelled below)
        finally:
            if not ended:  # stopped early (a stop sequence) or the consumer left (GeneratorExit): the session's
                turn.cancel()  # engine is released only once the loop is done with it
                _drain(turn)

    def _failed(self, what: str, session_id: bytes, error: BaseException) -> Rejected:
        """The refusal for a turn that failed with ``error``: status UNAVAILABLE whatever the cause (the status
        travels in cleartext and must not depend on what happened inside), the reason, by its error kind,
        sealed. A bug is raised as is (the front end answers INTERNAL and logs where)."""
        kind = error_kind(error)
        log.warning("replica %d: session %s… %s failed: %s (%s)", self.index, session_id.hex()[:8], what,
                    type(error).__name__, kind.value)
        if kind is ErrorKind.UNAVAILABLE:
            return Rejected(Status.UNAVAILABLE, f"{what} failed: CKKS workers unavailable")
        if kind is ErrorKind.REFUSED:
            return Rejected(Status.UNAVAILABLE, f"{what} refused by policy: {str(error)[:200]}")
        if kind is ErrorKind.USER:
            return Rejected(Status.UNAVAILABLE, f"{what} failed: {str(error)[:200]}")
        raise error

    def _end_cancelled(self, s: _Session, session_id: bytes, produced: int):
        log.info("replica %d: session %s… turn stopped after %d tokens (%s)", self.index, session_id.hex()[:8],
                 produced, "session closed" if s.closing else "cancelled")
        if s.closing:
            yield Refusal(Status.ABORTED, "the session was closed during this turn")
        else:
            with self._lock:
                self.turns_cancelled += 1

    # -- embeddings --------------------------------------------------------------------------
    def embed(self, req: EmbedRequest) -> SealedReply | Refusal:
        """The sealed EmbedResult, or a refusal (carrying a sealed EmbedResult once the record was opened)."""
        try:
            with self._turn(req.session_id) as s:
                plaintext = self._open(s, req.session_id, req.sealed, AAD_EMBED)
                seal = _Answer(s.channel, AAD_EMBED_RESULT, req.sealed)
                try:
                    return self._embed_locked(s, req.session_id, self._parse(plaintext, serving_pb2.EmbedBody), seal)
                except Rejected as exc:
                    return Refusal(exc.status, SEALED_REFUSAL, self._refusal(exc, serving_pb2.EmbedResult(), seal))
        except ClearRefusal as exc:
            return exc.refusal

    def _embed_locked(self, s: _Session, session_id: bytes, body: serving_pb2.EmbedBody, seal: "_Answer") -> SealedReply:
        texts = check_embed(body, self.runtime.tokenizer, self.limits)
        try:
            with self._embed_lock:
                vectors = self.runtime.embed(texts, s.engine)
        except BifrostError as exc:
            raise self._failed("embedding", session_id, exc) from None
        result = serving_pb2.EmbedResult(vectors=[serving_pb2.Vector(values=v.tolist()) for v in vectors])
        return SealedReply(seal(result))

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


def _drain(turn: Turn) -> None:
    """Wait until the loop is done with a (cancelled) turn: at most one step."""
    for _ in _events(turn):
        pass


class _Answer:
    """Seals the records of the answer to one request, in order: record ``i`` carries
    :func:`~bifrost.attest.channel.answer_aad` (``kind``, the request, ``i``), so the client opens it only as
    that record of that answer (and may skip the unread rest of an answer it stopped reading)."""

    def __init__(self, channel: SecureChannel, kind: bytes, request_record: bytes) -> None:
        self.channel, self.kind, self.request_record, self.index = channel, kind, request_record, 0

    def __call__(self, message) -> bytes:
        record = self.channel.seal(message.SerializeToString(), answer_aad(self.kind, self.request_record, self.index))
        self.index += 1
        return record


def ray_node_id() -> str | None:
    """The id (hex) of the Ray node this process runs on (a Ray actor, or a Ray driver), None without Ray."""
    import sys

    ray = sys.modules.get("ray")  # never imported here: a local replica without Ray stays without it
    if ray is None or not ray.is_initialized():
        return None
    return ray.get_runtime_context().get_node_id()
