"""Handles through which the front end reaches its replicas (``bifrost.tee.replica.TrustedReplica``, built
by the deployment, :mod:`bifrost.tee.deploy`): in-process (:class:`LocalReplica`) or Ray actors
(:class:`RayReplica`), behind the :class:`ReplicaHandle` Protocol. This module never imports the replica
class: a handle calls its methods by name and gets the typed messages of :mod:`bifrost.proto.replica`.

Every wait is bounded: calls take ``timeout_s`` (Ray) and streams a per-item timeout (both runtimes).
Failures become three exceptions: :class:`ReplicaDeadError` (the actor is gone for good),
:class:`ReplicaTimeoutError`, :class:`ReplicaUnavailableError` (transient); anything else raised
inside the replica propagates unchanged (the front end answers INTERNAL).
"""

from __future__ import annotations

import queue
import threading
from typing import Protocol

from ..errors import BifrostError
from ..proto.replica import ReplicaInfo
from .config import ServeConfig


class ReplicaUnavailableError(Exception):
    """A replica did not answer (transient unless a subclass says otherwise)."""


class ReplicaDeadError(ReplicaUnavailableError):
    """The replica's process is gone for good (``max_restarts=0``): it gets no more sessions."""


class ReplicaTimeoutError(ReplicaUnavailableError):
    """No answer within ``replica_timeout_s``."""


class ReplicaStream(Protocol):
    """A replica's streamed answer. There is deliberately no task-level cancel (``ray.cancel``): a turn
    is stopped by the replica's own ``cancel(session_id, request_id)``, between tokens and after its
    sealed request was opened; a cancelled *queued* Ray task would never open its record and the
    channel's sequence numbers would no longer match the client's."""

    def next(self, timeout_s: float):
        """The next item; raises StopIteration at the end, :class:`ReplicaUnavailableError` on timeout/death."""


class ReplicaHandle(Protocol):
    """How the front end reaches one replica (in-process or a Ray actor)."""

    def call(self, method: str, *args, timeout_s: float | None = None): ...

    def cast(self, method: str, *args) -> None:
        """Call without waiting for (or ever seeing) the result."""

    def stream(self, method: str, *args) -> ReplicaStream: ...

    def kill(self) -> None: ...


class _ThreadStream:
    """A generator run in its own thread, so that the consumer can wait with a timeout."""

    def __init__(self, gen) -> None:
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


class LocalReplica:
    """A replica object in this process (``runtime: local``, tests). Calls run in the caller's thread (no
    timeout: they cannot be interrupted); streams run in their own thread."""

    def __init__(self, obj) -> None:
        self.obj = obj
        self.dead = False

    def _method(self, method: str):
        if self.dead:
            raise ReplicaDeadError("replica was shut down")
        return getattr(self.obj, method)

    def call(self, method: str, *args, timeout_s: float | None = None):
        return self._method(method)(*args)

    def cast(self, method: str, *args) -> None:
        fn = self._method(method)
        threading.Thread(target=fn, args=args, daemon=True, name=f"replica-{method}").start()

    def stream(self, method: str, *args) -> ReplicaStream:
        return _ThreadStream(self._method(method)(*args))

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


class _RayStream:
    def __init__(self, gen) -> None:
        self.gen = gen

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
    """The same class as a Ray actor: one actor call per request; streams are Ray streaming generators."""

    def __init__(self, actor) -> None:
        self.actor = actor
        self.ready = False

    def call(self, method: str, *args, timeout_s: float | None = None):
        import ray

        ref = getattr(self.actor, method).remote(*args)
        try:
            return ray.get(ref, timeout=timeout_s)
        except Exception as exc:  # noqa: BLE001
            mapped = _ray_error(exc)
            if isinstance(mapped, ReplicaTimeoutError):
                try:
                    ray.cancel(ref)
                except Exception:  # noqa: BLE001
                    pass
            raise mapped from None

    def cast(self, method: str, *args) -> None:
        getattr(self.actor, method).remote(*args)

    def stream(self, method: str, *args) -> ReplicaStream:
        return _RayStream(getattr(self.actor, method).options(num_returns="streaming").remote(*args))

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
    """Every replica's ``info`` once it has loaded its model, or a :class:`BifrostError` naming why not
    (unschedulable: not enough Ray CPUs; the constructor failed; startup slower than startup_timeout_s)."""
    import ray

    refs = [r.actor.info.remote() for r in replicas]
    _, pending = ray.wait(refs, num_returns=len(refs), timeout=scfg.startup_timeout_s)
    if pending:
        free = ray.available_resources().get("CPU", 0.0)
        raise BifrostError(
            f"{len(pending)} of {len(refs)} replicas did not start within startup_timeout_s={scfg.startup_timeout_s:g} s: "
            f"Ray has no room for them (each reserves replica_cpus={scfg.replica_cpus:g}; free Ray CPUs: {free:g}) "
            f"or loading the model is slow ({log_hint})")
    infos = []
    for i, (r, ref) in enumerate(zip(replicas, refs)):
        try:
            infos.append(ray.get(ref))
        except Exception as exc:  # noqa: BLE001 - the actor's constructor raised
            last = (str(exc).strip().splitlines() or [type(exc).__name__])[-1][:300]
            raise BifrostError(f"replica {i} failed to start: {last} ({log_hint})") from None
        r.ready = True
    return infos


def check_replicas_agree(infos: list[ReplicaInfo]) -> ReplicaInfo:
    """All replicas must serve the same model and configuration (same install on every node)."""
    for i, info in enumerate(infos[1:], 1):
        for key in ("model_digest", "serving_config_digest"):
            if getattr(info, key) != getattr(infos[0], key):
                raise BifrostError(f"replica {i} reports a different {key} than replica 0: is the same bifrost "
                                   "and model installed on every node?")
    return infos[0]
