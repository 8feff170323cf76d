"""The trusted side of serving: one :class:`ReplicaActor` per model replica.

A replica wraps one :class:`~bifrost.tee.runtime.TrustedRuntime` (the model loaded once) and holds,
per user session: the server half of the attested channel (:class:`~bifrost.attest.channel.SecureSession`),
its own CKKS keys (a :class:`~bifrost.tee.engine.DelegationEngine` over its own worker-pool link),
and the conversation history. The gRPC front end only ever hands this class *sealed* records and
gets sealed records back, so prompts, tokens, activations, KV state and CKKS secret keys exist only
in this process. The KV cache lives in the decode loop's local state of one turn.

The class is plain Python: ``bifrost serve`` runs it as a Ray actor (``runtime: ray``); tests and
``runtime: local`` run the *same class* in-process. Methods return plain data and never raise for
bad input: errors are ``("error", <grpc status name>, message)`` tuples.

Refusals: before a request's sealed record is opened (unknown or busy session, a record that does not
authenticate or is a replay) the error tuple's message is the reason, for the client in cleartext.
Such a record changes nothing: the session stays open and its receive sequence number does not move
(the channel's server role). Once the record is opened, every refusal carries its exact reason and
status-code name *sealed*, and the tuple's message is the generic :data:`SEALED_REFUSAL`: Generate
yields ``("chunk", sealed TokenChunk(error, error_code, done))`` and then the error tuple; Embed returns
``("error", code, SEALED_REFUSAL, sealed EmbedResult(error, error_code))``. Counts and sizes (prompt
tokens, limits, conversation length) never appear outside the channel.

Session life cycle: one request (a *turn*) at a time per session, under the session's lock. A turn
can be stopped between tokens: :meth:`ReplicaActor.cancel` (the client hung up) or
:meth:`ReplicaActor.close_session`. Closing a session while a turn runs only marks it; the turn
releases the session (channel keys, history, CKKS keys, worker sessions) when it ends, so a session
is never torn down under a running generation.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import logging
import os
import tempfile
import threading
import time
from dataclasses import dataclass, field

import torch
from google.protobuf.message import DecodeError

from ..attest.binding import compute_model_digest, compute_report_data, compute_serving_config_digest
from ..attest.channel import SUITES, SecureSession, ServerHandshake
from ..attest.errors import AttestationError, ChannelClosedError, ChannelError
from ..attest.evidence import get_provider
from ..config import RunConfig
from ..errors import BifrostError
from ..model.catalog import ModelSpec, load_model
from ..proto import serving_pb2
from ..attest.mtls import WorkerEndpoint
from ..tee.batching import MAX_ITEM_ROWS, DecodeBatcher
from ..tee.delegate import using_engine
from ..tee.engine import DelegationEngine
from ..tee.link import WorkerCallError
from ..tee.pool import WorkerPool
from ..tee.quarantine import WorkerQuarantine
from ..tee.runtime import TrustedRuntime
from .config import ServeConfig

log = logging.getLogger("bifrost.serve.replica")

# Associated data of sealed records: binds each record to its message type.
AAD_GENERATE = b"bifrost.serving.v1.GenerateBody"
AAD_CHUNK = b"bifrost.serving.v1.TokenChunk"
AAD_EMBED = b"bifrost.serving.v1.EmbedBody"
AAD_EMBED_RESULT = b"bifrost.serving.v1.EmbedResult"
AAD_CLOSE = b"bifrost.serving.v1.CloseBody"
SEALED_REFUSAL = "request refused; the reason is in the sealed reply"  # the cleartext message of such refusals
SEALED_TRAILER = "bifrost-sealed-bin"  # Embed: trailing metadata carrying the sealed refusal

TURN_WAIT_S = 10.0      # a request waits this long for the session's previous turn to finish
CANCELLED_REMEMBERED = 32  # request ids of cancelled turns kept per session


def _err(code: str, message: str) -> tuple[str, str, str]:
    return ("error", code, message)


# --------------------------------------------------------------------------- digests (public)

def model_digest(spec: ModelSpec, seed: int, model: torch.nn.Module | None = None) -> bytes:
    """The model digest a client pins. A checkpoint directory: :func:`compute_model_digest` over its
    files. A catalog model (architecture + seed, random init): the same digest over a one-file
    manifest holding the architecture, the seed and SHA-256 of every weight tensor."""
    if spec.path is not None:
        return compute_model_digest(spec.path)
    model = model if model is not None else load_model(spec, seed)
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.numpy().tobytes())
    manifest = json.dumps({"name": spec.name, "family": spec.family, "task": spec.task, "config": spec.config,
                           "seed": seed, "weights_sha256": h.hexdigest()}, sort_keys=True).encode()
    with tempfile.TemporaryDirectory() as d:
        with open(os.path.join(d, "manifest.json"), "wb") as f:
            f.write(manifest)
        return compute_model_digest(d)


def serving_config(cfg: RunConfig, scfg: ServeConfig) -> dict:
    """The public serving configuration bound into report_data (what a client may pin)."""
    import dataclasses

    return {
        "model": cfg.model, "seed": cfg.seed, "backend": cfg.backend,
        "ckks": dataclasses.asdict(cfg.ckks) if cfg.ckks is not None else None, "delegation": json.loads(json.dumps(dataclasses.asdict(cfg.delegation))),
        "generation": {k: v for k, v in dataclasses.asdict(cfg.generation).items() if k != "prompt"},
        "max_prompt_tokens": scfg.max_prompt_tokens, "max_new_tokens": scfg.max_new_tokens,
        "max_sessions": scfg.max_sessions, "token_lifetime_s": scfg.token_lifetime_s,
    }


def serving_config_digest(cfg: RunConfig, scfg: ServeConfig) -> bytes:
    return compute_serving_config_digest(serving_config(cfg, scfg))


# --------------------------------------------------------------------------- the actor

@dataclass
class _Session:
    channel: SecureSession
    engine: DelegationEngine
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


class _Refused(Exception):
    """A refusal before the request's record was opened: the message goes back in cleartext."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.error = _err(code, message)


class _Rejected(Exception):
    """A refusal after the request's record was opened: the reason goes back sealed."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code, self.reason = code, reason


class ReplicaActor:
    """One model replica and the sessions assigned to it. Thread-safe (Ray threaded actor)."""

    def __init__(self, cfg: RunConfig, scfg: ServeConfig, workers: list[WorkerEndpoint], replica_index: int = 0) -> None:
        """``workers``: the CKKS workers (address + pinned certificate); this replica presents the TLS identity
        ``cfg.tee.identity`` to them and shares ``scfg.quarantine_file`` with every replica and later run."""
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        self.cfg, self.scfg, self.index = cfg, scfg, replica_index
        self.runtime = TrustedRuntime(cfg, None, quarantine=WorkerQuarantine(scfg.quarantine_file))
        self.directory = self.runtime.directory(list(workers), scfg.worker_call_timeout_s, scfg.worker_retry_after_s)
        self.spec = self.runtime.spec
        self.model_digest = model_digest(self.spec, cfg.seed, self.runtime.reference or _public_copy(self.spec, cfg.seed))
        self.config_digest = serving_config_digest(cfg, scfg)
        self.provider = get_provider(scfg.evidence_provider)
        mc = self.runtime.model.config
        self.context = int(getattr(mc, "n_positions", None) or getattr(mc, "max_position_embeddings", None) or 0)
        self._sessions: dict[bytes, _Session] = {}
        self._lock = threading.Lock()
        self._model_lock = threading.Lock()
        self._prefill_lock = threading.Lock()
        self.turns_cancelled = 0
        # batch_decode: sessions run their decode steps concurrently (each its own keys and KV cache) and
        # the batcher merges their layer calls; otherwise the model lock interleaves their steps.
        self.batcher = (DecodeBatcher(self.directory, scfg.batch_window_s, scfg.batch_max_rows)
                        if scfg.batch_decode else None)
        log.info("replica %d ready: model %s, %d delegated layers", replica_index, cfg.model, len(self.runtime.sites))

    # -- public info -----------------------------------------------------------------------
    def info(self) -> dict:
        return {"name": self.cfg.model, "task": self.spec.task, "model_digest": self.model_digest,
                "serving_config_digest": self.config_digest, "context_tokens": self.context,
                "evidence_type": self.provider.name, "pid": os.getpid(), "mode": self.cfg.generation.mode}

    def stats(self) -> dict:
        import resource

        with self._lock:
            n = len(self._sessions)
        batching = self.batcher.stats if self.batcher is not None else None
        return {"sessions": n, "workers": self.directory.snapshot(), "failovers": self.directory.stats.failovers,
                "quarantined_workers": sorted(self.runtime.quarantine.entries()),
                "workers_refused_at_start": list(self.directory.refused),
                "batched_worker_calls": batching.worker_calls if batching else 0,
                "mean_items_per_batched_call": batching.mean_items if batching else 0.0,
                "max_items_per_batched_call": batching.max_items if batching else 0,
                "max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "pid": os.getpid(),
                "turns_cancelled": self.turns_cancelled}

    def session_count(self) -> int:
        with self._lock:
            return len(self._sessions)

    # -- handshake ---------------------------------------------------------------------------
    def attest(self, nonce: bytes, client_public_key: bytes, suite: str):
        """Fresh channel key, evidence binding it, session keys, and this session's CKKS keys."""
        suite = suite or "AES-256-GCM"
        if suite not in SUITES:
            return _err("INVALID_ARGUMENT", f"unknown suite {suite!r}; choose {', '.join(SUITES)}")
        if len(nonce) < 16 or len(nonce) > 1024:
            return _err("INVALID_ARGUMENT", "nonce must be 16..1024 bytes")
        if len(client_public_key) != 32:
            return _err("INVALID_ARGUMENT", "client_public_key must be a 32-byte raw X25519 key")
        try:
            hs = ServerHandshake()
            report_data = compute_report_data(hs.public_key, nonce, self.model_digest, self.config_digest)
            evidence = self.provider.get_evidence(report_data)
            channel = hs.accept(client_public_key, nonce, report_data, suite)
        except AttestationError as exc:
            code = "INVALID_ARGUMENT" if isinstance(exc, ChannelError) else "UNAVAILABLE"
            return _err(code, f"handshake failed: {exc}")
        pool = WorkerPool(self.directory)
        try:  # this session's own CKKS key pair and worker sessions
            link = self.batcher.link_for(pool) if self.batcher is not None else pool
            engine = self.runtime.new_engine(link)
        except BaseException as exc:
            pool.close()  # worker sessions opened before the failure
            if isinstance(exc, WorkerCallError) and exc.code.name == "RESOURCE_EXHAUSTED":
                return _err("RESOURCE_EXHAUSTED", "the CKKS workers hold their maximum number of sessions; try later")
            if isinstance(exc, BifrostError):
                return _err("UNAVAILABLE", f"cannot open a CKKS worker session: {exc}")
            raise
        sid = channel.session_id
        with self._lock:
            self._sessions[sid] = _Session(channel, engine, report_data)
        log.info("replica %d: session %s… opened", self.index, sid.hex()[:8])
        return {"session_id": sid, "server_public_key": hs.public_key, "report_data": report_data,
                "evidence_type": evidence.evidence_type, "evidence": evidence.raw,
                "endorsements": dict(evidence.endorsements),
                "model_digest": self.model_digest, "serving_config_digest": self.config_digest, "suite": suite}

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
            raise _Refused("NOT_FOUND", "unknown or closed session; attest again")
        if not s.lock.acquire(timeout=TURN_WAIT_S):  # the previous turn may still be winding down
            raise _Refused("FAILED_PRECONDITION", "this session already has a request in progress")
        with s.state:
            closed = s.closing
            s.busy = not closed
        if closed:
            s.lock.release()
            raise _Refused("NOT_FOUND", "unknown or closed session; attest again")
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
            raise _Refused("PERMISSION_DENIED", f"sealed payload rejected ({exc.check}); the session is unchanged") from None
        s.last_used = time.monotonic()  # only an authentic record restarts the idle time
        try:
            return body_cls.FromString(plaintext)
        except DecodeError:
            raise _Rejected("INVALID_ARGUMENT", f"sealed payload is not a valid {body_cls.__name__}") from None

    @staticmethod
    def _refusal(s: _Session, exc: _Rejected, reply, aad: bytes) -> bytes | None:
        """``reply`` (a TokenChunk or EmbedResult) carrying the refusal, sealed; None if the channel is closed."""
        reply.error, reply.error_code = exc.reason, exc.code
        try:
            return s.channel.seal(reply.SerializeToString(), aad)
        except ChannelError:
            return None

    def close_sealed(self, session_id: bytes, sealed: bytes):
        """CloseSession from the client: the sealed CloseBody must open first. Returns True, or an error
        tuple; a record that does not open (empty, forged, replayed) leaves the session as it was."""
        with self._lock:
            s = self._sessions.get(session_id)
        if s is None:
            return _err("NOT_FOUND", "unknown or closed session; attest again")
        try:  # not under the turn lock: a close stops a running turn at its next token
            plaintext = s.channel.open(sealed, AAD_CLOSE)
        except ChannelClosedError:
            return _err("NOT_FOUND", "unknown or closed session; attest again")
        except ChannelError as exc:
            log.warning("replica %d: session %s…: close refused (%s)", self.index, session_id.hex()[:8], exc.check)
            return _err("PERMISSION_DENIED", f"sealed CloseSession record rejected ({exc.check}); the session is unchanged")
        try:
            serving_pb2.CloseBody.FromString(plaintext)
        except DecodeError:
            return _err("INVALID_ARGUMENT", "sealed payload is not a valid CloseBody")
        self.close_session(session_id)
        return True

    # -- generation --------------------------------------------------------------------------
    def generate(self, session_id: bytes, sealed: bytes, request_id: str = ""):
        """Yields ``("chunk", sealed TokenChunk)`` items, or one ``("error", code, message)`` (after a sealed
        refusal chunk when the record was opened).

        Stops between tokens when ``request_id`` is cancelled or the session is closed."""
        try:
            with self._turn(session_id) as s:
                try:
                    yield from self._generate_locked(s, session_id, sealed, request_id)
                except _Rejected as exc:
                    record = self._refusal(s, exc, serving_pb2.TokenChunk(done=True), AAD_CHUNK)
                    if record is not None:
                        yield ("chunk", record)
                    yield _err(exc.code, SEALED_REFUSAL)
        except _Refused as exc:
            yield exc.error

    def _generate_locked(self, s: _Session, session_id: bytes, sealed: bytes, request_id: str):
        body = self._open(s, session_id, sealed, AAD_GENERATE, serving_pb2.GenerateBody)
        if self.spec.task != "causal-lm":
            raise _Rejected("FAILED_PRECONDITION", f"{self.cfg.model} is an encoder model; use Embed")
        n_new = body.max_new_tokens or min(self.cfg.generation.max_new_tokens, self.scfg.max_new_tokens)
        if n_new > self.scfg.max_new_tokens:
            raise _Rejected("INVALID_ARGUMENT", f"max_new_tokens {n_new} is over the limit of {self.scfg.max_new_tokens}")
        prompt_ids = self.runtime.tokenizer.encode(body.prompt)
        if not prompt_ids:
            raise _Rejected("INVALID_ARGUMENT", "the prompt is empty")
        if len(prompt_ids) > self.scfg.max_prompt_tokens:
            raise _Rejected("INVALID_ARGUMENT", f"prompt has {len(prompt_ids)} tokens; the limit is "
                                                f"max_prompt_tokens={self.scfg.max_prompt_tokens}")
        if body.reset_history:
            s.history = []
        ids = s.history + prompt_ids
        if self.context and len(ids) + n_new > self.context:
            raise _Rejected("INVALID_ARGUMENT", f"conversation ({len(ids)} tokens) + {n_new} new tokens exceeds the "
                                                f"model context of {self.context} tokens; reset the history")
        seed = body.sample_seed if body.has_sample_seed else None
        tokens: list[int] = []
        text_so_far = ""
        if s.stopped(request_id):  # cancelled while it waited for the previous turn
            yield from self._stopped(s, session_id, request_id, 0)
            return
        steps = self._decode(s, ids, n_new, seed)
        try:
            for i, (token, seconds) in enumerate(steps):
                if s.stopped(request_id):  # checked between tokens: the client left or the session closed
                    yield from self._stopped(s, session_id, request_id, len(tokens))
                    return
                s.last_used = time.monotonic()
                tokens.append(token)
                text = self.runtime.tokenizer.decode(tokens)
                stable = text.rstrip("\ufffd") if i < n_new - 1 else text  # hold back split UTF-8
                delta, text_so_far = stable[len(text_so_far):], stable if stable.startswith(text_so_far) else text_so_far
                chunk = serving_pb2.TokenChunk(token_ids=[token], text=delta, done=(i == n_new - 1),
                                               token_seconds=seconds, prompt_tokens=len(ids) if i == 0 else 0)
                if chunk.done:  # commit the turn before the last chunk leaves (the client may hang up)
                    s.history = ids + tokens
                yield ("chunk", s.channel.seal(chunk.SerializeToString(), AAD_CHUNK))
        except BifrostError as exc:  # workers exhausted etc.: the reason goes back sealed
            log.warning("replica %d: session %s… generation failed: %s", self.index, session_id.hex()[:8],
                        type(exc).__name__)
            raise _Rejected("UNAVAILABLE", "generation failed: CKKS workers unavailable") from None
        finally:
            steps.close()

    def _stopped(self, s: _Session, session_id: bytes, request_id: str, produced: int):
        log.info("replica %d: session %s… turn stopped after %d tokens (%s)", self.index, session_id.hex()[:8],
                 produced, "session closed" if s.closing else "cancelled")
        if s.closing:
            yield _err("ABORTED", "the session was closed during this turn")
        else:
            with self._lock:
                self.turns_cancelled += 1

    def _step_context(self, rows: int):
        """Without batching: one forward pass at a time. With batching: decode steps run concurrently
        (and batch their layer calls), but prompt prefills one at a time: concurrent prefills would only
        share the CPU (every one finishing late) and hold all their intermediates in memory at once."""
        if self.batcher is None:
            return self._model_lock
        if rows <= MAX_ITEM_ROWS:
            return self.batcher.participant()
        stack = contextlib.ExitStack()
        stack.enter_context(self._prefill_lock)  # wait for the lock before counting as a participant
        stack.enter_context(self.batcher.participant())
        return stack

    def _decode(self, s: _Session, ids: list[int], n_new: int, seed: int | None):
        """The runtime's decode loop with this session's engine. Sessions sharing this replica either run
        their steps concurrently with batched layer calls (``batch_decode``) or interleave per step."""
        for step in self.runtime.decode_steps(ids, n_new, mode=self.cfg.generation.mode, sample_seed=seed,
                                              engine=s.engine, step_context=self._step_context):
            yield step.timing.token, step.timing.total_s

    # -- embeddings --------------------------------------------------------------------------
    def embed(self, session_id: bytes, sealed: bytes):
        """``("ok", sealed EmbedResult)`` or an error tuple (4 items, the last a sealed EmbedResult, when
        the record was opened)."""
        try:
            with self._turn(session_id) as s:
                try:
                    return self._embed_locked(s, session_id, sealed)
                except _Rejected as exc:
                    record = self._refusal(s, exc, serving_pb2.EmbedResult(), AAD_EMBED_RESULT)
                    return _err(exc.code, SEALED_REFUSAL) + ((record,) if record is not None else ())
        except _Refused as exc:
            return exc.error

    def _embed_locked(self, s: _Session, session_id: bytes, sealed: bytes):
        body = self._open(s, session_id, sealed, AAD_EMBED, serving_pb2.EmbedBody)
        if self.spec.task != "encoder":
            raise _Rejected("FAILED_PRECONDITION", f"{self.cfg.model} is not an encoder model; use Generate")
        if not body.texts or len(body.texts) > 64:
            raise _Rejected("INVALID_ARGUMENT", "send 1..64 texts")
        for t in body.texts:
            n = len(self.runtime.tokenizer.encode(t))
            if n == 0 or n > self.scfg.max_prompt_tokens:
                raise _Rejected("INVALID_ARGUMENT",
                                f"each text needs 1..max_prompt_tokens={self.scfg.max_prompt_tokens} tokens")
        try:
            with self._model_lock, using_engine(s.engine):
                vectors = self.runtime.embed(list(body.texts))
        except BifrostError:
            raise _Rejected("UNAVAILABLE", "embedding failed: CKKS workers unavailable") from None
        result = serving_pb2.EmbedResult(vectors=[serving_pb2.Vector(values=v.tolist()) for v in vectors])
        return ("ok", s.channel.seal(result.SerializeToString(), AAD_EMBED_RESULT))

    def shutdown(self) -> None:
        with self._lock:
            sids = list(self._sessions)
        for sid in sids:
            self.close_session(sid)
        self.runtime.close()
        self.directory.close()


def _public_copy(spec: ModelSpec, seed: int) -> torch.nn.Module:
    return load_model(spec, seed)

