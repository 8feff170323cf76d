"""The public gRPC front end (``bifrost.serving.v1.BifrostServing``) and the serving app around it.

The front end authenticates requests (session tokens), enforces limits and routes *sealed* records
to the replica that owns the session; it never holds channel keys, so it cannot read prompts or
tokens. Every bad input ends as a gRPC status with a message; nothing here lets one request crash
the server or touch another session.

Status mapping: missing/bad/expired token -> UNAUTHENTICATED; token of another session ->
PERMISSION_DENIED; tampered/forged/replayed sealed record -> PERMISSION_DENIED and the session is left
exactly as it was (not closed; anyone holding a sniffed bearer token can send garbage); malformed
fields, empty or oversized sealed payload -> INVALID_ARGUMENT; session limits
(``max_sessions``, ``max_sessions_per_replica``, ``max_pending_sessions``, full CKKS workers), a session past
``max_turns_per_session``, more than ``max_concurrent_rpcs`` RPCs at once -> RESOURCE_EXHAUSTED (every limit:
:mod:`bifrost.limits`); unknown
session -> NOT_FOUND; a turn while the session's previous one still runs -> FAILED_PRECONDITION;
workers or replicas unavailable, replica timeout, a draining server (:meth:`ServingService.drain`: new sessions,
requests and turns, and a turn still running after ``drain_s``) -> UNAVAILABLE; anything unexpected -> INTERNAL
with a generic message (logged by exception type and code location only). The bad-input plumbing (a
request deserializer that never raises, the handler wrappers, the error-class -> status table) is
:mod:`bifrost.proto.edge`, shared with the CKKS worker.

Refusals after the replica opened the sealed record (prompt over ``max_prompt_tokens``,
``max_new_tokens`` over the limit, empty prompt, conversation over the context, wrong model task, bad
Embed texts, worker failure mid-turn) carry their reason and code sealed; the cleartext status has the
same code and only :data:`~bifrost.proto.wire.SEALED_REFUSAL` (no counts or sizes). Generate streams the sealed
TokenChunk before the status; Embed puts the sealed EmbedResult in the trailing metadata
``bifrost-sealed-bin``. CloseSession closes a session only once the replica opened its sealed CloseBody.

TLS (``tls_cert_file``/``tls_key_file``) hides bearer tokens and metadata from the network; the
attested channel stays the confidentiality layer either way.

Replica failure: a replica whose actor died is marked dead, its sessions are dropped, new sessions
go to the others (also past a replica that does not answer an Attest), and health turns NOT_SERVING when
none is left. A client that hangs up stops its turn on the replica at the next token (the replica's ``cancel``).

Session lost: every answer after which this front end holds no session for the request's session id carries
the trailing metadata ``bifrost-session-lost`` (:data:`~bifrost.proto.wire.SESSION_LOST_TRAILER`) naming why:
``replica-lost`` (UNAVAILABLE, or INTERNAL for a replica bug: its replica died, its node was lost, it is
unreachable or timed out; a running stream ends with it as soon as Ray reports the actor gone),
``unknown-session`` (NOT_FOUND: closed, idle-expired or never known; UNAUTHENTICATED for a token this front end
did not sign, e.g. after a restart), ``session-closed`` (ABORTED: closed during the turn), ``token-expired``
(UNAUTHENTICATED), ``server-draining`` (UNAVAILABLE: this front end is shutting down, a request it no longer
accepts or a turn the drain's deadline stopped; the session ends with the process). A client attests again and
may retry what is safe to run twice (the marker is cleartext).

Replicas are reached through :class:`~.replicas.ReplicaHandle` (the typed
:class:`~bifrost.proto.replica.ReplicaAPI`, each wait bounded by ``replica_timeout_s``); they answer with the typed
messages of :mod:`bifrost.proto.replica` (a refusal's status maps to a gRPC code in ``GRPC_CODES``, one table). This
module never imports the trusted runtime: the deployment (:mod:`bifrost.tee.deploy`) builds the replicas
and hands them over.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from concurrent import futures
from dataclasses import dataclass
from typing import Any

import grpc
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ..attest.errors import AttestationError, TokenError, TokenExpiredError, TokenReplayError, TokenSignatureError
from ..attest.tokens import TokenGate, TokenIssuer
from ..attest.policy import AttestationPolicy, load_policy
from ..attest.verdict import Evidence, Verdict, verify_evidence
from ..config import RunConfig
from ..errors import UserError
from ..proto import serving_pb2
from ..proto.edge import Abort, Edge, parse_or_malformed
from ..proto.replica import (GRPC_CODES, Attested, AttestRequest, CancelRequest, CloseIdle, CloseRequest, DropSession,
                             EmbedRequest, GenerateRequest, Refusal, ReplicaInfo, SealedReply, Status)
from ..proto.wire import SEALED_TRAILER, SESSION_LOST_TRAILER, serving_options
from .config import ServeConfig
from .replicas import ReplicaDeadError, ReplicaHandle, ReplicaTimeoutError, ReplicaUnavailableError
from .sessions import NoReplicaError, SessionLimitError, SessionTable, TurnLimitError

log = logging.getLogger("bifrost.serve")

SERVICE_NAME = "bifrost.serving.v1.BifrostServing"
SESSION_ID_SIZE = 16


def session_lost(reason: str) -> tuple[tuple[str, str], ...]:
    """The session-lost marker (trailing metadata) of an answer after which this front end holds no session
    for the request's session id; ``reason``: one of :data:`~bifrost.proto.wire.SESSION_LOST_REASONS`."""
    return ((SESSION_LOST_TRAILER, reason),)


def unknown_session() -> Abort:
    return Abort(grpc.StatusCode.NOT_FOUND, "session lost: unknown or closed session; attest again",
                 trailers=session_lost("unknown-session"))


# --------------------------------------------------------------------------- the servicer

EDGE = Edge(log, "internal server error", sealed_trailer=SEALED_TRAILER)


class ServingService:
    def __init__(self, cfg: RunConfig, scfg: ServeConfig, replicas: list[ReplicaHandle], info: ReplicaInfo,
                 issuer_key: Ed25519PrivateKey | None = None) -> None:
        self.cfg, self.scfg, self.replicas, self.info = cfg, scfg, replicas, info
        self.issuer = TokenIssuer(issuer_key or Ed25519PrivateKey.generate(), issuer="bifrost-serve",
                                  lifetime_s=scfg.token_lifetime_s)
        self.gate = TokenGate([self.issuer.public_key], model_digest=self.info.model_digest,
                              allow_simulated=self.info.evidence_type == "simulated")
        self.sessions = SessionTable(scfg.max_sessions, len(replicas), scfg.max_pending_sessions,
                                     max_per_replica=scfg.replica_sessions, max_turns=scfg.max_turns_per_session)
        self.node_id = f"bifrost-serve-{secrets.token_hex(4)}"
        self.issuer_policy = issuer_policy(scfg)
        self.health: Any = None  # grpc_health servicer, set by start_grpc
        self._stop = threading.Event()
        self._background = futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="serve-bg")
        self._probing: set[int] = set()
        self._probing_lock = threading.Lock()
        self._sweeper = threading.Thread(target=self._sweep, daemon=True, name="session-sweeper")
        self._sweeper.start()
        self.draining = threading.Event()  # set by drain(): no new session or request is accepted
        self._turns: set[_Running] = set()  # Generate and Embed requests in progress (drain waits for them)
        self._turns_cv = threading.Condition()

    # -- helpers ---------------------------------------------------------------------------
    def _verify_replica_evidence(self, out: Attested) -> Verdict:
        """The issuer's own verification of a replica's fresh evidence (bound to this session's channel key):
        a token names only what passed ``issuer_policy``. A failure refuses the session (UNAVAILABLE)."""
        evidence = Evidence(out.evidence_type, out.evidence, out.endorsements)
        try:
            return verify_evidence(evidence, self.issuer_policy, expected_report_data=out.report_data)
        except AttestationError as exc:
            log.error("replica evidence refused by the issuer policy: %s", exc.check)
            raise Abort(grpc.StatusCode.UNAVAILABLE,
                        f"the server's own evidence failed its issuer policy ({exc.check}); no token issued") from None

    def _check_sealed_request(self, req, context):
        if len(req.session_id) != SESSION_ID_SIZE:
            raise Abort(grpc.StatusCode.INVALID_ARGUMENT, f"session_id must be {SESSION_ID_SIZE} bytes")
        if not 1 <= len(req.request_id) <= 64:
            raise Abort(grpc.StatusCode.INVALID_ARGUMENT, "request_id must be 1..64 characters")
        if not req.sealed:
            raise Abort(grpc.StatusCode.INVALID_ARGUMENT, "sealed payload is empty")
        if len(req.sealed) > self.scfg.max_request_bytes:
            raise Abort(grpc.StatusCode.INVALID_ARGUMENT,
                        f"sealed payload is {len(req.sealed)} bytes; the limit is max_request_bytes={self.scfg.max_request_bytes}")
        token = None
        for key, value in context.invocation_metadata() or ():
            if key == "authorization" and isinstance(value, str) and value.startswith("Bearer "):
                token = value[len("Bearer "):]
        if not token:
            raise Abort(grpc.StatusCode.UNAUTHENTICATED, "missing 'authorization: Bearer <token>' metadata; attest first")
        entry = self.sessions.get(bytes(req.session_id))
        try:
            self.gate.authorize(token, req.request_id, session_report_data=entry.report_data if entry else None)
        except TokenReplayError as exc:
            code = grpc.StatusCode.PERMISSION_DENIED if exc.check == "token_binding" else grpc.StatusCode.UNAUTHENTICATED
            raise Abort(code, str(exc)) from None
        except TokenError as exc:
            # a token this front end did not sign (it restarted: new issuer key) or one past its lifetime:
            # the session is unusable whatever it was
            lost = ("unknown-session" if isinstance(exc, TokenSignatureError) else
                    "token-expired" if isinstance(exc, TokenExpiredError) else None)
            raise Abort(grpc.StatusCode.UNAUTHENTICATED, str(exc), trailers=session_lost(lost) if lost else ()) from None
        if entry is None:
            raise unknown_session()
        return entry

    def _replica_refused(self, entry, refusal: Refusal, trailer: bool = False) -> Abort:
        """A replica's refusal as a gRPC status (``trailer``: its sealed record goes in the trailing metadata);
        NOT_FOUND / ABORTED: the session is gone there, so it goes here too."""
        lost: tuple[tuple[str, str], ...] = ()
        if refusal.status.ends_session:
            self.sessions.remove(entry.session_id)
            lost = session_lost("unknown-session" if refusal.status is Status.NOT_FOUND else "session-closed")
        return Abort(GRPC_CODES[refusal.status], refusal.message, refusal.sealed if trailer else None, lost)

    def _replica_failed(self, entry, exc: BaseException) -> BaseException:
        """A replica call for ``entry`` raised: drop the session everywhere; the status to answer with, which
        carries the session-lost marker ``replica-lost`` (the session is gone whatever the cause)."""
        lost = session_lost("replica-lost")
        if isinstance(exc, ReplicaDeadError):
            self._replica_died(entry.replica)
            return Abort(grpc.StatusCode.UNAVAILABLE, "session lost: its replica failed; attest again", trailers=lost)
        self._drop(entry)  # the replica may be alive and still hold the session: close it there too
        log.error("replica %d: request failed (%s); session %s… closed", entry.replica, type(exc).__name__,
                  entry.session_id.hex()[:8])
        if isinstance(exc, ReplicaTimeoutError):
            return Abort(grpc.StatusCode.UNAVAILABLE, f"session lost: its replica did not answer within "
                                                      f"replica_timeout_s={self.scfg.replica_timeout_s:g} s; attest "
                                                      "again", trailers=lost)
        if isinstance(exc, ReplicaUnavailableError):
            return Abort(grpc.StatusCode.UNAVAILABLE, "session lost: its replica is unreachable; attest again",
                         trailers=lost)
        bug = self._replica_bug(exc)
        return Abort(bug.code, bug.message, trailers=lost)

    def _drop(self, entry) -> None:
        """Forget a session here and close it on its replica (without waiting)."""
        self.sessions.remove(entry.session_id)
        self._drop_on(entry.replica, entry.session_id)

    def _drop_on(self, r: int, session_id: bytes) -> None:
        """Close ``session_id`` on replica ``r`` without waiting (best effort)."""
        try:
            self.replicas[r].drop_session(DropSession(session_id))
        except ReplicaDeadError:
            self._replica_died(r)
        except Exception as exc:  # noqa: BLE001 - best effort
            log.warning("replica %d: drop_session not delivered (%s)", r, type(exc).__name__)

    def _cancel_on(self, r: int, session_id: bytes, request_id: str) -> None:
        """Stop the turn ``request_id`` on replica ``r`` at its next token, without waiting (best effort)."""
        try:
            self.replicas[r].cancel(CancelRequest(session_id, request_id))
        except ReplicaDeadError:
            self._replica_died(r)
        except Exception as exc:  # noqa: BLE001 - best effort
            log.warning("replica %d: cancel not delivered (%s)", r, type(exc).__name__)

    @staticmethod
    def _replica_bug(exc: BaseException) -> Abort:
        """A replica call raised something unexpected (not an availability failure): INTERNAL without its
        message, whatever its class: the replica holds the session's secrets, a message could carry them."""
        code, message = EDGE.internal("replica", exc)
        return Abort(code, message)

    def _replica_died(self, r: int) -> None:
        if r not in self.sessions.live_replicas():
            return
        gone = self.sessions.mark_dead(r)
        live = self.sessions.live_replicas()
        log.error("replica %d is dead: %d sessions dropped, %d replicas left", r, len(gone), len(live))
        if not live and self.health is not None:
            from grpc_health.v1 import health_pb2

            for name in ("", SERVICE_NAME):
                self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)

    # -- RPCs ------------------------------------------------------------------------------
    def _refuse_if_draining(self, session: bool = True) -> None:
        """UNAVAILABLE while draining; ``session``: the request names a session, which ends with this process."""
        if self.draining.is_set():
            if session:
                raise Abort(grpc.StatusCode.UNAVAILABLE, "session lost: " + DRAINING, trailers=session_lost("server-draining"))
            raise Abort(grpc.StatusCode.UNAVAILABLE, DRAINING)

    def Attest(self, req, context):
        self._refuse_if_draining(session=False)
        if not 16 <= len(req.nonce) <= 1024:
            raise Abort(grpc.StatusCode.INVALID_ARGUMENT, "nonce must be 16..1024 bytes")
        if len(req.client_public_key) != 32:
            raise Abort(grpc.StatusCode.INVALID_ARGUMENT, "client_public_key must be a 32-byte raw X25519 key")
        tried: set[int] = set()
        unreachable = 0  # replicas that did not answer (their node may be lost before Ray says so)
        full: Refusal | None = None  # a replica's own RESOURCE_EXHAUSTED (it still holds sessions closed here)
        while True:
            try:
                r = self.sessions.reserve(tried)
            except SessionLimitError as exc:
                raise Abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)) from None
            except NoReplicaError:
                if full is not None:
                    raise Abort(GRPC_CODES[full.status], full.message) from None
                if unreachable:
                    raise Abort(grpc.StatusCode.UNAVAILABLE, f"replica unavailable ({unreachable} did not "
                                                             "answer); try again later") from None
                raise Abort(grpc.StatusCode.UNAVAILABLE, "no live replica: the server cannot open sessions") from None
            try:
                out = self.replicas[r].attest(AttestRequest(bytes(req.nonce), bytes(req.client_public_key), req.suite))
            except ReplicaDeadError:
                self.sessions.cancel(r)
                self._replica_died(r)
                tried.add(r)  # a new session goes to another replica
                continue
            except ReplicaUnavailableError as exc:
                self.sessions.cancel(r)
                log.error("replica %d attest failed: %s", r, type(exc).__name__)
                unreachable += 1
                tried.add(r)  # try the others
                continue
            except Exception as exc:  # noqa: BLE001 - a bug in the replica
                self.sessions.cancel(r)
                raise self._replica_bug(exc) from None
            except BaseException:
                self.sessions.cancel(r)
                raise
            if isinstance(out, Refusal) and out.status is Status.RESOURCE_EXHAUSTED:
                self.sessions.cancel(r)
                full = out
                tried.add(r)  # the others may have room
                continue
            break
        if isinstance(out, Refusal):
            self.sessions.cancel(r)
            raise Abort(GRPC_CODES[out.status], out.message)
        try:
            verdict = self._verify_replica_evidence(out)
            now = time.time()
            token = self.issuer.issue(verdict, node_id=self.node_id, model_digest=out.model_digest, now=now)
        except BaseException:
            self.sessions.cancel(r)
            self._drop_on(r, out.session_id)
            raise
        self.sessions.commit(r, out.session_id, out.report_data)
        log.info("session %s… attested on replica %d (%d sessions)", out.session_id.hex()[:8], r, len(self.sessions))
        return serving_pb2.AttestReply(
            evidence_type=out.evidence_type, evidence=out.evidence, endorsements=out.endorsements,
            server_public_key=out.server_public_key, model_digest=out.model_digest,
            serving_config_digest=out.serving_config_digest, session_id=out.session_id, token=token,
            token_expires_at=int(now) + self.scfg.token_lifetime_s, suite=out.suite)

    def _admit(self, entry, request_id: str, turn: bool) -> "_Running":
        """Count a request in progress (what :meth:`drain` waits for); refused while draining (one lock for
        both, so no request starts unseen by a drain)."""
        with self._turns_cv:
            self._refuse_if_draining()
            running = _Running(entry.replica, entry.session_id, request_id, turn)
            self._turns.add(running)
        return running

    def _retire(self, running: "_Running") -> None:
        with self._turns_cv:
            self._turns.discard(running)
            self._turns_cv.notify_all()

    def Generate(self, req, context):
        entry = self._check_sealed_request(req, context)
        running = self._admit(entry, req.request_id, turn=True)
        try:
            yield from self._generate(req, context, entry, running)
        finally:
            self._retire(running)

    def _generate(self, req, context, entry, running: "_Running"):
        sid, rid = entry.session_id, req.request_id
        finished = threading.Event()  # the turn ended on the replica (or will not run)
        cancel_sent = threading.Event()

        def stop_turn() -> None:  # the client hung up / its deadline passed: stop the turn between tokens
            if finished.is_set() or cancel_sent.is_set():
                return
            cancel_sent.set()
            try:
                self._background.submit(self._cancel_on, entry.replica, sid, rid)
            except RuntimeError:  # shutting down: replicas are stopped anyway
                pass

        if not context.add_callback(stop_turn):  # (runs when the RPC ends for any reason)
            return  # the client is gone already
        try:
            began = self.sessions.begin(sid, turn=True)
        except TurnLimitError as exc:  # the count of turns is visible on the wire anyway: cleartext
            finished.set()
            raise Abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)) from None
        if began is None:
            finished.set()
            raise unknown_session()
        stream = None
        opened = False  # the replica answered with a sealed record: it opened this request's record
        try:
            while True:
                try:
                    if stream is None:
                        stream = self.replicas[entry.replica].generate(GenerateRequest(sid, bytes(req.sealed), rid))
                    item = next(stream)  # waits at most replica_timeout_s
                except StopIteration:
                    finished.set()
                    if running.ended_by_drain:  # stopped by the drain's deadline: never a silently short stream
                        raise Abort(grpc.StatusCode.UNAVAILABLE, f"session lost: the server shut down before this turn finished "
                                                                 f"(serve.drain_s={self.scfg.drain_s:g} s); attest again",
                                    trailers=session_lost("server-draining"))
                    return
                except Exception as exc:  # noqa: BLE001 - replica died, timed out, or failed
                    finished.set()
                    raise self._replica_failed(entry, exc) from None
                if isinstance(item, Refusal):
                    finished.set()
                    raise self._replica_refused(entry, item)
                opened = True
                if not context.is_active():
                    stop_turn()
                    return
                yield serving_pb2.SealedReply(sealed=item.record)
        except GeneratorExit:  # gRPC dropped the call (client gone)
            stop_turn()
            raise
        except BaseException:
            finished.set()
            raise
        finally:
            self.sessions.end(sid, opened, turn=True)

    def Embed(self, req, context):
        entry = self._check_sealed_request(req, context)
        running = self._admit(entry, req.request_id, turn=False)
        try:
            return self._embed(req, entry)
        finally:
            self._retire(running)

    def _embed(self, req, entry):
        if self.sessions.begin(entry.session_id) is None:
            raise unknown_session()
        item = None
        try:
            try:
                item = self.replicas[entry.replica].embed(EmbedRequest(entry.session_id, bytes(req.sealed)))
            except Exception as exc:  # noqa: BLE001
                raise self._replica_failed(entry, exc) from None
            if isinstance(item, Refusal):
                raise self._replica_refused(entry, item, trailer=True)
            return serving_pb2.SealedReply(sealed=item.record)
        finally:  # opened: the answer (or the refusal's sealed record) is a sealed record
            self.sessions.end(entry.session_id, opened=isinstance(item, SealedReply) or
                              (isinstance(item, Refusal) and item.opened))

    def CloseSession(self, req, context):
        """Closes the session only after its replica opened the sealed CloseBody; otherwise nothing changes."""
        entry = self._check_sealed_request(req, context)
        try:  # waits only for the bookkeeping: a running turn stops at its next token and cleans up
            out = self.replicas[entry.replica].close_sealed(CloseRequest(entry.session_id, bytes(req.sealed)))
        except Exception as exc:  # noqa: BLE001 - replica died, timed out, or failed
            raise self._replica_failed(entry, exc) from None
        if isinstance(out, Refusal):
            raise self._replica_refused(entry, out)
        self.sessions.remove(entry.session_id)
        return serving_pb2.CloseSessionReply()

    def ListModels(self, req, context):
        i = self.info
        return serving_pb2.ListModelsReply(
            models=[serving_pb2.ModelInfo(
                name=i.name, task=i.task, model_digest=i.model_digest,
                serving_config_digest=i.serving_config_digest, max_prompt_tokens=self.scfg.max_prompt_tokens,
                max_new_tokens=self.scfg.max_new_tokens, context_tokens=i.context_tokens,
                replicas=len(self.sessions.live_replicas()), mode=i.mode)],
            evidence_type=i.evidence_type, max_sessions=self.scfg.max_sessions)

    # -- housekeeping ------------------------------------------------------------------------
    def _sweep(self) -> None:
        """Drop idle sessions (never one with a request in progress), and probe every live replica:
        ``close_idle`` there doubles as a liveness check and closes sessions the front end lost.
        Never blocks on a replica: closes are fire-and-forget, probes run in the background."""
        sc = self.scfg
        period = max(0.05, min(30.0, min(sc.session_idle_s, sc.pending_idle_s) / 4))
        while not self._stop.wait(period):
            for e in self.sessions.idle(sc.session_idle_s, sc.pending_idle_s):
                if self.sessions.remove(e.session_id) is not None:
                    log.info("session %s… closed after %s", e.session_id.hex()[:8],
                             "idle time" if e.used else "pending_idle_s without a request")
                    self._drop_on(e.replica, e.session_id)
            for r in self.sessions.live_replicas():
                with self._probing_lock:
                    if r in self._probing:
                        continue  # the last probe has not answered yet (a busy or hung replica)
                    self._probing.add(r)
                try:
                    self._background.submit(self._probe, r)
                except RuntimeError:  # shut down
                    return

    def _probe(self, r: int) -> None:
        # The replica's backstop waits for the longer of the two idle limits: the front end itself keeps a
        # session that never sent a request for pending_idle_s, and the replica cannot tell the two apart.
        backstop = max(self.scfg.session_idle_s, self.scfg.pending_idle_s)
        try:
            self.replicas[r].close_idle(CloseIdle(backstop))
        except ReplicaDeadError:
            self._replica_died(r)
        except Exception as exc:  # noqa: BLE001 - slow or transiently unreachable: next round
            log.warning("replica %d: probe failed (%s)", r, type(exc).__name__)
        finally:
            with self._probing_lock:
                self._probing.discard(r)

    def drain(self, grace_s: float, abort: threading.Event | None = None) -> int:
        """Stop accepting (Attest, Generate and Embed answer UNAVAILABLE :data:`DRAINING`; CloseSession still
        works), let running turns finish for up to ``grace_s`` seconds (less if ``abort`` is set), then stop the
        rest between tokens: their streams end with UNAVAILABLE, never silently short. Returns how many turns
        were stopped that way."""
        deadline = time.monotonic() + grace_s
        with self._turns_cv:
            self.draining.set()  # (under the lock _admit takes: no request starts unseen)
            log.info("draining: %d request(s) running, waiting up to serve.drain_s=%g s", len(self._turns), grace_s)
            while self._turns and not (abort is not None and abort.is_set()):
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._turns_cv.wait(min(left, 0.1))
            stopped = [r for r in self._turns if r.turn]  # (an Embed left running is cut when the server stops)
            for turn in stopped:
                turn.ended_by_drain = True
        for turn in stopped:
            self._cancel_on(turn.replica, turn.session_id, turn.request_id)
        with self._turns_cv:  # their streams end at the next token: wait for them to say so (bounded)
            end = time.monotonic() + min(10.0, self.scfg.replica_timeout_s)
            while self._turns and time.monotonic() < end:
                self._turns_cv.wait(0.1)
        if stopped:
            log.warning("drain: %d turn(s) stopped after serve.drain_s=%g s", len(stopped), grace_s)
        return len(stopped)

    def stop(self) -> None:
        self._stop.set()
        self._background.shutdown(wait=False, cancel_futures=True)

    def handler(self) -> grpc.GenericRpcHandler:
        P = serving_pb2
        ser = lambda m: m.SerializeToString()  # noqa: E731
        sealed = parse_or_malformed(P.SealedRequest)
        return grpc.method_handlers_generic_handler(SERVICE_NAME, {
            "Attest": grpc.unary_unary_rpc_method_handler(
                EDGE.unary("Attest", self.Attest, "AttestRequest"), parse_or_malformed(P.AttestRequest), ser),
            "Generate": grpc.unary_stream_rpc_method_handler(
                EDGE.streaming("Generate", self.Generate, "SealedRequest"), sealed, ser),
            "Embed": grpc.unary_unary_rpc_method_handler(EDGE.unary("Embed", self.Embed, "SealedRequest"), sealed, ser),
            "CloseSession": grpc.unary_unary_rpc_method_handler(
                EDGE.unary("CloseSession", self.CloseSession, "SealedRequest"), sealed, ser),
            "ListModels": grpc.unary_unary_rpc_method_handler(
                EDGE.unary("ListModels", self.ListModels, "ListModelsRequest"), parse_or_malformed(P.ListModelsRequest),
                ser),
        })


DRAINING = "the server is shutting down (draining); attest to another instance or try again later"


@dataclass(eq=False)
class _Running:
    """A Generate (``turn``) or Embed request in progress: what :meth:`ServingService.drain` waits for, or stops.
    Compared by identity: two requests with one (client-chosen) request id are two entries."""

    replica: int
    session_id: bytes
    request_id: str
    turn: bool
    ended_by_drain: bool = False


def issuer_policy(scfg: ServeConfig) -> AttestationPolicy:
    """``serve.issuer_policy`` if set; else the default policy, which accepts simulated evidence only when
    the operator named the simulated provider (the banner and every token then say SIMULATED)."""
    if scfg.issuer_policy is not None:
        return load_policy(scfg.issuer_policy)
    return AttestationPolicy(allow_simulated=scfg.evidence_provider == "simulated")


def start_grpc(service: ServingService, host: str, port: int, threads: int, tls: tuple[bytes, bytes] | None = None):
    """Serve with health checking and reflection; ``tls``: (private key PEM, certificate chain PEM) for a
    TLS port, None for plaintext. Returns (server, port, health servicer). At most ``serve.max_concurrent_rpcs``
    RPCs run at once (gRPC answers more with RESOURCE_EXHAUSTED, unread), each on its own thread of a pool of
    at least that many ``threads``, so an admitted RPC never queues for a thread."""
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection

    limit = service.scfg.max_concurrent_rpcs
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max(threads, limit), thread_name_prefix="serve"),
                         options=serving_options(), maximum_concurrent_rpcs=limit)
    server.add_generic_rpc_handlers((service.handler(),))
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (serving_pb2.DESCRIPTOR.services_by_name["BifrostServing"].full_name, health.SERVICE_NAME,
         reflection.SERVICE_NAME), server)
    if tls is not None:
        bound = server.add_secure_port(f"{host}:{port}", grpc.ssl_server_credentials([tls]))
    else:
        bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise UserError(f"cannot listen on {host}:{port}")
    server.start()
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    service.health = health_servicer
    return server, bound, health_servicer
