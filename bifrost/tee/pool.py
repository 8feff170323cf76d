"""A pool of CKKS workers behind the ``WorkerLink`` Protocol: least-loaded dispatch and fail-over.

:class:`WorkerDirectory` is shared by every session of a process: one gRPC channel per worker, the
in-flight load and health of each worker. :class:`WorkerPool` is one session's link (one CKKS key
set): it opens the session on every worker with the same public context, sends each layer call to
the least-loaded healthy worker, and when a call fails with UNAVAILABLE / DEADLINE_EXCEEDED /
CANCELLED / ABORTED (a dead, hung or restarting worker) it marks that worker down and retries the
same call on another one. CKKS layer calls are pure functions of (public context, ciphertexts), so
a retry cannot change the result. A worker marked down is tried again after ``retry_after_s``.

Only public material passes through here (public contexts, ciphertexts, layer ids).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Sequence

import grpc

from ..errors import BifrostError
from ..proto import worker_pb2
from .link import MAX_MESSAGE_BYTES, GrpcWorkerLink, WorkerCallError

log = logging.getLogger("bifrost.pool")

RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                       grpc.StatusCode.CANCELLED, grpc.StatusCode.ABORTED})


@dataclass
class WorkerState:
    address: str
    channel: grpc.Channel
    inflight: int = 0
    calls: int = 0
    failures: int = 0
    down_until: float = 0.0
    last_error: str = ""

    def up(self, now: float) -> bool:
        return self.down_until <= now


@dataclass
class PoolStats:
    failovers: int = 0          # calls retried on another worker
    calls_by_worker: dict[str, int] = field(default_factory=dict)


class WorkerDirectory:
    """The workers known to this process (shared by all sessions' pools). Thread-safe."""

    def __init__(self, addresses: Sequence[str], timeout_s: float = 60.0, retry_after_s: float = 30.0) -> None:
        if not addresses:
            raise BifrostError("a worker pool needs at least one worker address")
        if len(set(addresses)) != len(addresses):
            raise BifrostError("worker addresses must be distinct")
        self.timeout_s, self.retry_after_s = timeout_s, retry_after_s
        opts = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)]
        self.workers = [WorkerState(a, grpc.insecure_channel(a, options=opts)) for a in addresses]
        self._lock = threading.Lock()
        self._describe: list | None = None
        self.stats = PoolStats()

    def pick(self, exclude: set[str]) -> WorkerState | None:
        """The healthy worker with the fewest calls in flight (ties: fewest calls so far)."""
        now = time.monotonic()
        with self._lock:
            live = [w for w in self.workers if w.address not in exclude and w.up(now)]
            if not live:  # everyone is marked down: try the ones not yet tried in this call anyway
                live = [w for w in self.workers if w.address not in exclude]
            if not live:
                return None
            w = min(live, key=lambda s: (s.inflight, s.calls))
            w.inflight += 1
            w.calls += 1
            return w

    def release(self, w: WorkerState) -> None:
        with self._lock:
            w.inflight -= 1

    def mark_down(self, w: WorkerState, reason: str) -> None:
        with self._lock:
            w.failures += 1
            w.down_until = time.monotonic() + self.retry_after_s
            w.last_error = reason
        log.warning("worker %s marked down for %.0f s: %s", w.address, self.retry_after_s, reason)

    def mark_up(self, w: WorkerState) -> None:
        if w.down_until:
            with self._lock:
                w.down_until = 0.0

    def link(self, w: WorkerState) -> GrpcWorkerLink:
        return GrpcWorkerLink(w.channel, self.timeout_s, w.address)

    def describe(self) -> list[worker_pb2.LayerInfo]:
        """Layers served (checked identical on every worker that answers)."""
        if self._describe is not None:
            return self._describe
        seen, errors = None, []
        for w in self.workers:
            try:
                layers = list(self.link(w).describe())
            except WorkerCallError as exc:
                errors.append(f"{w.address}: {exc.code.name}")
                if exc.code in RETRYABLE:
                    self.mark_down(w, exc.details)
                continue
            key = [(l.name, l.digest) for l in layers]
            if seen is None:
                seen = (key, layers)
            elif key != seen[0]:
                raise BifrostError(f"worker {w.address} serves different layers or weights than the others")
        if seen is None:
            raise BifrostError(f"no CKKS worker answered ({'; '.join(errors)})")
        self._describe = seen[1]
        return self._describe

    def snapshot(self) -> list[dict]:
        now = time.monotonic()
        with self._lock:
            return [{"address": w.address, "up": w.up(now), "inflight": w.inflight, "calls": w.calls,
                     "failures": w.failures} for w in self.workers]

    def close(self) -> None:
        for w in self.workers:
            w.channel.close()


class WorkerPool:
    """One session's ``WorkerLink`` over all workers of a :class:`WorkerDirectory`."""

    def __init__(self, directory: WorkerDirectory, owns_directory: bool = False) -> None:
        self.dir = directory
        self._owns = owns_directory
        self._sessions: dict[str, str] = {}  # worker address -> worker session id
        self._open_args: tuple | None = None
        self._lock = threading.Lock()

    @classmethod
    def from_addresses(cls, addresses: Sequence[str], timeout_s: float = 60.0, retry_after_s: float = 30.0) -> "WorkerPool":
        return cls(WorkerDirectory(addresses, timeout_s, retry_after_s), owns_directory=True)

    # -- WorkerLink ------------------------------------------------------------------------
    def describe(self):
        return self.dir.describe()

    def open_session(self, backend: str, public_context: bytes, prepare: Sequence[worker_pb2.LayerGroup]) -> float:
        """Open the session on every reachable worker; succeed if at least one accepts it.

        Raises :class:`WorkerCallError` RESOURCE_EXHAUSTED when every worker refused for that reason
        (all full: retry later), :class:`BifrostError` when none accepted for other reasons."""
        self._open_args = (backend, public_context, list(prepare))
        worst, errors, codes = 0.0, [], set()
        for w in self.dir.workers:
            try:
                worst = max(worst, self._open_on(w))
            except WorkerCallError as exc:
                errors.append(f"{w.address}: {exc.code.name}: {exc.details}")
                codes.add(exc.code)
                if exc.code in RETRYABLE:
                    self.dir.mark_down(w, exc.details)
                elif exc.code != grpc.StatusCode.RESOURCE_EXHAUSTED:
                    self.close()  # sessions opened on the workers before this one
                    raise
        if not self._sessions:
            if codes == {grpc.StatusCode.RESOURCE_EXHAUSTED}:
                raise WorkerCallError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                      f"every CKKS worker is full ({'; '.join(errors)})")
            raise BifrostError(f"no CKKS worker accepted the session ({'; '.join(errors)})")
        return worst

    def _open_on(self, w: WorkerState) -> float:
        backend, public_context, prepare = self._open_args
        link = self.dir.link(w)
        seconds = link.open_session(backend, public_context, prepare)
        with self._lock:
            self._sessions[w.address] = link.session_id
        return seconds

    def linear(self, group, ciphertexts, rows: int = 1):
        outputs, seconds = linear_on_pool(self.dir, [self], group, [ciphertexts])
        return outputs[0], seconds

    def _session_on(self, w: WorkerState) -> str:
        """This pool's session id on worker ``w``, opening it there first if needed."""
        if w.address not in self._sessions:  # worker was down at open time, or restarted
            self._open_on(w)
        return self._sessions[w.address]

    def _forget(self, w: WorkerState) -> None:
        with self._lock:
            self._sessions.pop(w.address, None)

    def close(self) -> None:
        with self._lock:
            sessions, self._sessions = dict(self._sessions), {}
        by_addr = {w.address: w for w in self.dir.workers}
        for address, sid in sessions.items():
            link = self.dir.link(by_addr[address])
            try:
                link.stub.CloseSession(worker_pb2.CloseSessionRequest(session_id=sid), timeout=5)
            except grpc.RpcError:
                pass
        if self._owns:
            self.dir.close()


def linear_on_pool(directory: WorkerDirectory, pools: Sequence[WorkerPool], group: worker_pb2.LayerGroup,
                   inputs: Sequence[Sequence[bytes]]) -> tuple[list[list[list[bytes]]], float]:
    """Evaluate ``group`` for ``inputs[i]`` under ``pools[i]``'s session (its own CKKS keys) on one worker.

    One item is a ``Linear`` call; several are one ``LinearBatch`` call (cross-session batching). The
    call goes to the least-loaded healthy worker; on a retryable failure it moves to another worker,
    and a worker that lost the sessions (restart) gets them reopened once. Returns (outputs per item,
    worker compute seconds).
    """
    tried: set[str] = set()
    reopened: set[str] = set()
    last: WorkerCallError | None = None
    while True:
        w = directory.pick(tried)
        if w is None:
            raise last or BifrostError("no CKKS worker available")
        try:
            sids = [p._session_on(w) for p in pools]
            link = directory.link(w)
            if len(pools) == 1:
                link.session_id = sids[0]
                out, seconds = link.linear(group, inputs[0])
                outputs = [out]
            else:
                outputs, seconds = link.linear_batch(group, list(zip(sids, inputs)))
            directory.mark_up(w)
            with directory._lock:
                directory.stats.calls_by_worker[w.address] = directory.stats.calls_by_worker.get(w.address, 0) + 1
            return outputs, seconds
        except WorkerCallError as exc:
            if exc.code == grpc.StatusCode.NOT_FOUND and "session" in exc.details and w.address not in reopened:
                reopened.add(w.address)  # the worker lost our sessions (it restarted): reopen once
                for p in pools:
                    p._forget(w)
                continue
            if exc.code not in RETRYABLE:
                raise
            last = exc
            tried.add(w.address)
            directory.mark_down(w, f"{exc.code.name}: {exc.details}")
            with directory._lock:
                directory.stats.failovers += 1
            for p in pools:
                p._forget(w)
        finally:
            directory.release(w)
