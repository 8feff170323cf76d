"""Handles through which the front end reaches its replicas (``bifrost.tee.replica.TrustedReplica``, built
by the deployment, :mod:`bifrost.tee.deploy`): in-process (:class:`LocalReplica`) or Ray actors
(:class:`RayReplica`). Both implement :class:`~bifrost.proto.replica.ReplicaAPI` method by method (typed
requests in, the typed messages of :mod:`bifrost.proto.replica` out) plus :meth:`kill`; there is no dispatch
by method name. This module never imports the replica class.

Every wait is bounded by the handle's ``timeout_s`` (``replica_timeout_s``): a call waits that long (Ray;
an in-process call runs in the caller's thread and cannot be interrupted) and a stream that long for each
item (both runtimes). Failures become three exceptions: :class:`ReplicaDeadError` (the actor is gone for
good), :class:`ReplicaTimeoutError`, :class:`ReplicaUnavailableError` (transient); anything else raised
inside the replica propagates unchanged (the front end answers INTERNAL, without its message).
:meth:`cancel` and :meth:`drop_session` are fire-and-forget: they return once sent (``None``), never wait.
"""

from __future__ import annotations

import queue
import threading
from typing import Iterator, Protocol

from ..errors import UnavailableError, UserError
from ..proto.replica import (Attested, AttestRequest, CancelRequest, CloseIdle, Closed, CloseRequest, DropSession,
                             EmbedRequest, GenerateRequest, Refusal, ReplicaInfo, SealedReply)
from .config import ServeConfig

DEFAULT_TIMEOUT_S = 60.0


class ReplicaUnavailableError(Exception):
    """A replica did not answer (transient unless a subclass says otherwise)."""


class ReplicaDeadError(ReplicaUnavailableError):
    """The replica's process is gone for good (``max_restarts=0``): it gets no more sessions."""


class ReplicaTimeoutError(ReplicaUnavailableError):
    """No answer within ``replica_timeout_s``."""


class ReplicaStream(Protocol):
    """A replica's streamed answer (``generate``): an iterator whose every item waits at most the handle's
    ``timeout_s``. There is deliberately no task-level cancel (``ray.cancel``): a turn is stopped by the
    replica's own ``cancel(CancelRequest)``, between tokens and after its sealed request was opened; a
    cancelled *queued* Ray task would never open its record and the channel's sequence numbers would no
    longer match the client's."""

    def __iter__(self) -> Iterator[SealedReply | Refusal]: ...

    def __next__(self) -> SealedReply | Refusal:
        """The next item; StopIteration at the end, :class:`ReplicaUnavailableError` on timeout/death."""

    def next(self, timeout_s: float) -> SealedReply | Refusal:
        """The same with an explicit per-item timeout."""


class ReplicaHandle(Protocol):
    """How the front end reaches one replica (in-process or a Ray actor): :class:`ReplicaAPI` with bounded
    waits, fire-and-forget ``cancel``/``drop_session``, and ``kill``."""

    timeout_s: float

    def info(self) -> ReplicaInfo: ...

    def stats(self) -> dict: ...

    def attest(self, req: AttestRequest) -> Attested | Refusal: ...

    def generate(self, req: GenerateRequest) -> ReplicaStream: ...

    def embed(self, req: EmbedRequest) -> SealedReply | Refusal: ...

    def close_sealed(self, req: CloseRequest) -> Closed | Refusal: ...

    def cancel(self, req: CancelRequest) -> None: ...

    def drop_session(self, req: DropSession) -> None: ...

    def close_idle(self, req: CloseIdle) -> list[bytes]: ...

    def shutdown(self) -> None: ...

    def kill(self) -> None: ...


class _Stream:
    """Iterator protocol over ``next(timeout_s)`` with the handle's default timeout."""

    timeout_s: float

    def __iter__(self):
        return self

    def __next__(self):
        return self.next(self.timeout_s)

    def next(self, timeout_s: float):  # pragma: no cover - overridden
        raise NotImplementedError


class _ThreadStream(_Stream):
    """A generator run in its own thread, so that the consumer can wait with a timeout."""

    def __init__(self, gen, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self._q: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._pump, args=(gen,), daemon=True, name="replica-stream").start()

    def _pump(self, gen) -> None:
        try:
            for item in gen:
                self._q.put((True, item))
            self._q.put((False, None))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            self._q.put((False, exc))

    def next(self, timeout_s: float):
        try:
            ok, value = self._q.get(timeout=timeout_s)
        except queue.Empty:
            raise ReplicaTimeoutError(f"no answer within {timeout_s:g} s") from None
        if ok:
            return value
        if value is None:
            raise StopIteration
        raise value


def _in_background(fn, req, name: str) -> None:
    """Fire-and-forget in this process: the call runs in its own thread; its result and errors are dropped."""

    def run() -> None:
        try:
            fn(req)
        except Exception:  # noqa: BLE001 - nobody waits for it
            pass

    threading.Thread(target=run, daemon=True, name=name).start()


class LocalReplica:
    """A replica object in this process (``runtime: local``, tests). Calls run in the caller's thread (no
    timeout: they cannot be interrupted); streams run in their own thread (``timeout_s`` per item);
    ``cancel``/``drop_session`` in a thread of their own."""

    def __init__(self, obj, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        self.obj = obj
        self.timeout_s = timeout_s
        self.dead = False

    def _live(self):
        if self.dead:
            raise ReplicaDeadError("replica was shut down")
        return self.obj

    def info(self) -> ReplicaInfo:
        return self._live().info()

    def stats(self) -> dict:
        return self._live().stats()

    def attest(self, req: AttestRequest) -> Attested | Refusal:
        return self._live().attest(req)

    def generate(self, req: GenerateRequest) -> ReplicaStream:
        return _ThreadStream(self._live().generate(req), self.timeout_s)

    def embed(self, req: EmbedRequest) -> SealedReply | Refusal:
        return self._live().embed(req)

    def close_sealed(self, req: CloseRequest) -> Closed | Refusal:
        return self._live().close_sealed(req)

    def cancel(self, req: CancelRequest) -> None:
        _in_background(self._live().cancel, req, "replica-cancel")

    def drop_session(self, req: DropSession) -> None:
        _in_background(self._live().drop_session, req, "replica-drop-session")

    def close_idle(self, req: CloseIdle) -> list[bytes]:
        return self._live().close_idle(req)

    def shutdown(self) -> None:
        self.kill()

    def kill(self) -> None:
        if not self.dead:
            self.dead = True
            self.obj.shutdown()


def _ray_error(exc: BaseException) -> BaseException:
    """Ray's exceptions as ours: a dead actor, an unreachable one, a timeout; others unchanged."""
    import ray.exceptions as rx

    if isinstance(exc, rx.GetTimeoutError):
        return ReplicaTimeoutError(str(exc))
    if isinstance(exc, rx.ActorUnavailableError):
        return ReplicaUnavailableError("replica unreachable")
    if isinstance(exc, rx.RayActorError):
        return ReplicaDeadError("replica actor died")
    return exc


class _RayStream(_Stream):
    def __init__(self, gen, timeout_s: float) -> None:
        self.gen, self.timeout_s = gen, timeout_s

    def next(self, timeout_s: float):
        import ray

        try:
            ready, _ = ray.wait([self.gen], timeout=timeout_s)
            if not ready:
                raise ReplicaTimeoutError(f"no answer within {timeout_s:g} s")
            return ray.get(next(self.gen), timeout=timeout_s)
        except StopIteration:
            raise
        except ReplicaUnavailableError:
            raise
        except Exception as exc:  # noqa: BLE001 - mapped, or re-raised as is
            raise _ray_error(exc) from None


class RayReplica:
    """The same class as a Ray actor: one actor call per request, each awaited at most ``timeout_s``;
    ``generate`` is a Ray streaming generator; ``cancel``/``drop_session`` are sent without waiting."""

    def __init__(self, actor, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        self.actor = actor
        self.timeout_s = timeout_s
        self.ready = False

    def _get(self, ref):
        """The result of one actor call, within ``timeout_s``; a call that timed out is cancelled (it is a
        unary call: its session is dropped anyway)."""
        import ray

        try:
            return ray.get(ref, timeout=self.timeout_s)
        except Exception as exc:  # noqa: BLE001
            mapped = _ray_error(exc)
            if isinstance(mapped, ReplicaTimeoutError):
                try:
                    ray.cancel(ref)
                except Exception:  # noqa: BLE001
                    pass
            raise mapped from None

    def info(self) -> ReplicaInfo:
        return self._get(self.actor.info.remote())

    def stats(self) -> dict:
        return self._get(self.actor.stats.remote())

    def attest(self, req: AttestRequest) -> Attested | Refusal:
        return self._get(self.actor.attest.remote(req))

    def generate(self, req: GenerateRequest) -> ReplicaStream:
        return _RayStream(self.actor.generate.options(num_returns="streaming").remote(req), self.timeout_s)

    def embed(self, req: EmbedRequest) -> SealedReply | Refusal:
        return self._get(self.actor.embed.remote(req))

    def close_sealed(self, req: CloseRequest) -> Closed | Refusal:
        return self._get(self.actor.close_sealed.remote(req))

    def cancel(self, req: CancelRequest) -> None:
        self._send(lambda: self.actor.cancel.remote(req))

    def drop_session(self, req: DropSession) -> None:
        self._send(lambda: self.actor.drop_session.remote(req))

    def close_idle(self, req: CloseIdle) -> list[bytes]:
        return self._get(self.actor.close_idle.remote(req))

    @staticmethod
    def _send(submit) -> None:
        """Submit an actor call without waiting for (or ever seeing) its result."""
        try:
            submit()
        except Exception as exc:  # noqa: BLE001
            raise _ray_error(exc) from None

    def shutdown(self) -> None:
        self.kill()

    def kill(self) -> None:
        import ray

        if self.ready:
            try:
                ray.get(self.actor.shutdown.remote(), timeout=10)
            except Exception:  # noqa: BLE001 - best effort at shutdown
                pass
        try:
            ray.kill(self.actor)
        except Exception:  # noqa: BLE001 - already gone
            pass


def wait_for_ray_replicas(replicas: list[RayReplica], scfg: ServeConfig, log_hint: str) -> list[ReplicaInfo]:
    """Every replica's ``info`` once it has loaded its model, or an :class:`~bifrost.errors.UnavailableError`
    naming why not (unschedulable: not enough Ray CPUs; the constructor failed; startup slower than
    startup_timeout_s)."""
    import ray

    refs = [r.actor.info.remote() for r in replicas]
    _, pending = ray.wait(refs, num_returns=len(refs), timeout=scfg.startup_timeout_s)
    if pending:
        free = ray.available_resources().get("CPU", 0.0)
        raise UnavailableError(
            f"{len(pending)} of {len(refs)} replicas did not start within startup_timeout_s={scfg.startup_timeout_s:g} s: "
            f"Ray has no room for them (each reserves replica_cpus={scfg.replica_cpus:g}; free Ray CPUs: {free:g}) "
            f"or loading the model is slow ({log_hint})")
    infos = []
    for i, (r, ref) in enumerate(zip(replicas, refs)):
        try:
            infos.append(ray.get(ref))
        except Exception as exc:  # noqa: BLE001 - the actor's constructor raised
            last = (str(exc).strip().splitlines() or [type(exc).__name__])[-1][:300]
            raise UnavailableError(f"replica {i} failed to start: {last} ({log_hint})") from None
        r.ready = True
    return infos


def check_replicas_agree(infos: list[ReplicaInfo]) -> ReplicaInfo:
    """All replicas must serve the same model and configuration (same install on every node)."""
    for i, info in enumerate(infos[1:], 1):
        for key in ("model_digest", "serving_config_digest"):
            if getattr(info, key) != getattr(infos[0], key):
                raise UserError(f"replica {i} reports a different {key} than replica 0: is the same bifrost "
                                   "and model installed on every node?")
    return infos[0]
