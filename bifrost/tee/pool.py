"""The CKKS workers of a process: latency-aware, least-loaded dispatch and fail-over, behind ``WorkerLink``.

:class:`WorkerPool` is shared by every session of a process: one mutual-TLS gRPC channel and stub per worker
(pinned certificate, see :mod:`bifrost.attest.mtls`), the in-flight load and health of each worker.
Its one call, :meth:`WorkerPool.call`, evaluates a layer group for a batch of items (one item: a
``Linear`` RPC; several sessions' items: one ``LinearBatch`` RPC) on one healthy worker (dispatch, below).
:class:`WorkerSessions` is one session's link (one CKKS key set): its worker sessions (one per
worker, opened with the same public context), and ``linear`` = a one-item :meth:`WorkerPool.call`.

Failure classes. A layer call that brings back no reply — a broken TLS record, a reset or closed connection,
UNAVAILABLE, DEADLINE_EXCEEDED, CANCELLED, UNKNOWN, or any error status the worker sends (INVALID_ARGUMENT,
INTERNAL, RESOURCE_EXHAUSTED for a reply over the size cap, …) — is an *availability* event: the worker is
marked down and the same call moves to another one (CKKS layer calls are pure functions of (public context,
ciphertexts), so a retry cannot change the result); when none is left, the engine computes the product in the
TEE. A worker marked down is tried again after ``retry_after_s``. Statuses never quarantine: an outsider on the
path can break a TLS record (the peers see UNAVAILABLE or UNKNOWN) and must not be able to get an honest
worker banned, and a status carries no result, so reacting to it answers nothing about the plaintext. A worker
that sends error statuses to valid requests is therefore only marked down, each time. Only a reply that arrived
intact over mutual TLS and fails verification is a deviation (:mod:`bifrost.tee.engine`).

Dispatch. The pool times every call a worker answers (wall time, measured here: a worker's own claim is not
used) and keeps, per worker and call size (power-of-two bucket of the ciphertexts sent), an estimate: a new sample
moves it by ``LATENCY_ALPHA``, a faster one replaces it. A call goes first to a worker not yet timed on calls of its
size; else workers within ``SLOW_FACTOR`` of the fastest estimate are *fast* and the call goes to the one with the
fewest calls in flight (ties: the least recently used, so equal workers take turns); a *slow* one gets it only
if it would still answer sooner, (in flight + 1) × estimate, or as a probe once ``PROBE_EVERY`` picks went by
without it (so a worker that recovered is used again: one fast answer makes it fast). A worker 10× slower than
the others thus gets about one call in ``PROBE_EVERY`` instead of every other one. The estimates are the workers'
own timing (nothing secret: a CKKS product takes the same time whatever the plaintext); a worker that answers
slowly gets fewer calls, which it can see, as it can see the timing of the requests (quarantine section below).
A quarantined worker counts as no faster than the fastest honest one, so a worker that answers garbage at once
does not draw the traffic to itself (every such answer would be recomputed in the TEE).

Workers in the quarantine file when the pool is built (caught deviating in an earlier run or by
another replica before this one started) are refused outright. Workers quarantined while it runs stay in
the rotation (their results are discarded by the engine): see the quarantine section below for why.

Only public material passes through here (public contexts, ciphertexts, layer ids).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import grpc

from ..attest.mtls import TLSIdentity, WorkerEndpoint, process_identity, worker_channel
from ..errors import InternalError, RefusedError, UnavailableError, UserError
from ..proto import worker_pb2
from ..proto.wire import worker_client_options
from .link import WorkerCallError, WorkerReply, WorkerStub

log = logging.getLogger("bifrost.pool")

# Statuses of a worker that is down, hung or restarting (or of a broken connection to it): for Describe and
# OpenSession these mark the worker down, any other status there is a configuration error reported as such. On a
# layer call every status marks the worker down (module docstring). RESOURCE_EXHAUSTED from OpenSession means
# "no room for another worker session, try later".
RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                       grpc.StatusCode.CANCELLED, grpc.StatusCode.ABORTED, grpc.StatusCode.UNKNOWN})

# Dispatch (module docstring): a worker whose latency estimate is over SLOW_FACTOR times the fastest one's is slow;
# a new sample moves the estimate by LATENCY_ALPHA (a faster one replaces it: a recovered worker is trusted at once);
# a slow worker gets one call (a probe) once PROBE_EVERY picks went by without one.
SLOW_FACTOR = 4.0
LATENCY_ALPHA = 0.2
PROBE_EVERY = 32


def size_class(ciphertexts: int) -> int:
    """The latency estimates' key of a call of ``ciphertexts`` ciphertexts: its power-of-two bucket."""
    return max(1, ciphertexts).bit_length()


@dataclass
class WorkerState:
    endpoint: WorkerEndpoint
    identity: str
    channel: grpc.Channel
    stub: WorkerStub
    inflight: int = 0
    calls: int = 0
    failures: int = 0
    down_until: float = 0.0
    timed_out: bool = False  # marked down because a call got no answer in time (not a quick failure)
    latency_s: dict[int, float] = field(default_factory=dict)  # by call size class: see "Dispatch"
    last_pick: int = 0       # the pool's pick count at this worker's last call

    @property
    def address(self) -> str:
        return self.endpoint.address

    def up(self, now: float) -> bool:
        return self.down_until <= now


@dataclass
class PoolStats:
    failovers: int = 0          # calls retried on another worker
    calls_by_worker: dict[str, int] = field(default_factory=dict)  # by address


@dataclass(frozen=True)
class LayerCall:
    """One item of a batched layer call: ``ciphertexts`` encrypted under the CKKS keys of ``worker_sessions``."""

    worker_sessions: "WorkerSessions"
    ciphertexts: Sequence[bytes]


class WorkerPool:
    """The workers known to this process (shared by all sessions). Thread-safe."""

    def __init__(self, endpoints: Sequence[WorkerEndpoint], identity: TLSIdentity | None = None,
                 timeout_s: float = 60.0, retry_after_s: float = 30.0, max_reply_bytes: int = 1 << 30,
                 quarantine: WorkerQuarantine | None = None, try_down_workers: bool = False) -> None:
        """``try_down_workers``: when every worker is marked down, try them all anyway (``on_no_worker: fail``, where
        a call without a reply ends the turn); else only those whose failure was quick, and a call with none left
        is computed in the TEE at once: a partition costs one timeout per worker every ``retry_after_s``, not one
        per call."""
        if not endpoints:
            raise UserError("a worker pool needs at least one worker")
        if not all(isinstance(e, WorkerEndpoint) for e in endpoints):
            raise InternalError("workers are given as WorkerEndpoint (address + pinned certificate)")
        if len({e.address for e in endpoints}) != len(endpoints) or len({e.identity for e in endpoints}) != len(endpoints):
            raise UserError("worker addresses and certificates must be distinct")
        self.quarantine = quarantine if quarantine is not None else WorkerQuarantine()
        refused = [e for e in endpoints if e.identity in self.quarantine]
        for e in refused:
            log.warning("worker %s (%s) is quarantined: refused", e.address, e.identity[:23])
        endpoints = [e for e in endpoints if e not in refused]
        if not endpoints:
            raise RefusedError("every configured CKKS worker is quarantined (caught deviating); "
                               "configure other workers")
        self.timeout_s, self.retry_after_s, self.try_down_workers = timeout_s, retry_after_s, try_down_workers
        self.identity = identity or process_identity()
        opts = worker_client_options(max_reply_bytes)
        self.workers = []
        for e in endpoints:
            channel = worker_channel(e, self.identity, opts)
            self.workers.append(WorkerState(e, e.identity, channel, WorkerStub(channel, e.identity, timeout_s, e.address)))
        self.refused = [e.address for e in refused]
        self._lock = threading.Lock()
        self._picks = 0
        self._describe: list | None = None
        self.stats = PoolStats()

    def pick(self, exclude: set[str], ciphertexts: int = 1) -> WorkerState | None:
        """The healthy worker for a call of ``ciphertexts`` ciphertexts (module docstring: dispatch)."""
        now = time.monotonic()
        with self._lock:
            self._picks += 1
            live = [w for w in self.workers if w.address not in exclude and w.up(now)]
            if not live:  # everyone is marked down: try again the ones whose failure was quick (a reset, an error
                # status: retrying costs little); one that timed out waits for retry_after_s, unless on_no_worker is
                # fail (try_down_workers), so a partition does not cost a timeout per call
                live = [w for w in self.workers if w.address not in exclude and (self.try_down_workers or not w.timed_out)]
            if not live:
                return None
            w = self._choose(live, size_class(ciphertexts))
            w.inflight += 1
            w.calls += 1
            w.last_pick = self._picks
            return w

    def _choose(self, live: list[WorkerState], key: int) -> WorkerState:
        """Among ``live`` (lock held): a worker never timed on calls of this size first; else a slow one due a probe;
        else the least loaded, least recently used of the fast ones, unless a slow one would still answer sooner."""
        unknown = [w for w in live if key not in w.latency_s]
        if unknown:
            return min(unknown, key=lambda s: (s.inflight, s.last_pick))
        # A quarantined worker's answers are discarded, so answering fast (garbage, at once) must not win it the
        # traffic: the fastest honest worker sets the baseline, and it counts as no faster than that.
        caught = {w.address for w in live if w.identity in self.quarantine}
        honest = [w.latency_s[key] for w in live if w.address not in caught]
        floor = min(honest) if honest else 0.0
        est = {w.address: max(w.latency_s[key], floor) if w.address in caught else w.latency_s[key] for w in live}
        best = min(est.values())
        fast = [w for w in live if est[w.address] <= SLOW_FACTOR * best]
        slow = [w for w in live if est[w.address] > SLOW_FACTOR * best]
        due = [w for w in slow if self._picks - w.last_pick > PROBE_EVERY]
        if due:
            return min(due, key=lambda s: s.last_pick)
        w = min(fast, key=lambda s: (s.inflight, s.last_pick))
        if slow:  # the fast ones may be busy enough that a slow one answers sooner
            alt = min(slow, key=lambda s: (s.inflight + 1) * est[s.address])
            if (alt.inflight + 1) * est[alt.address] < (w.inflight + 1) * est[w.address]:
                return alt
        return w

    def observe(self, w: WorkerState, ciphertexts: int, seconds: float) -> None:
        """Fold the wall time of a call that ``w`` answered into its latency estimate."""
        key = size_class(ciphertexts)
        with self._lock:
            old = w.latency_s.get(key)
            w.latency_s[key] = seconds if old is None or seconds < old else old + LATENCY_ALPHA * (seconds - old)

    def release(self, w: WorkerState) -> None:
        with self._lock:
            w.inflight -= 1

    def mark_down(self, w: WorkerState, reason: str, timed_out: bool = False) -> None:
        with self._lock:
            w.failures += 1
            w.down_until = time.monotonic() + self.retry_after_s
            w.timed_out = timed_out
        log.warning("worker %s marked down for %.0f s: %s", w.address, self.retry_after_s, reason)

    def mark_up(self, w: WorkerState) -> None:
        if w.down_until:
            with self._lock:
                w.down_until = 0.0

    def describe(self) -> list[worker_pb2.LayerInfo]:
        """Layers served (checked identical on every worker that answers)."""
        if self._describe is not None:
            return self._describe
        seen, errors = None, []
        for w in self.workers:
            try:
                layers = list(w.stub.describe())
            except WorkerCallError as exc:
                errors.append(f"{w.address}: {exc.code.name}")
                if exc.code in RETRYABLE:
                    self.mark_down(w, exc.details)
                continue
            key = [(l.name, l.digest) for l in layers]
            if seen is None:
                seen = (key, layers)
            elif key != seen[0]:
                raise UserError(f"worker {w.address} serves different layers or weights than the others")
        if seen is None:
            raise UnavailableError(f"no CKKS worker answered ({'; '.join(errors)}): is it running, does it list this "
                               "runtime's certificate among its trusted clients, and is its own certificate the "
                               "pinned one?")
        self._describe = seen[1]
        return self._describe

    def snapshot(self) -> list[dict]:
        now = time.monotonic()
        with self._lock:
            return [{"address": w.address, "identity": w.identity, "up": w.up(now), "inflight": w.inflight,
                     "calls": w.calls, "failures": w.failures, "quarantined": w.identity in self.quarantine}
                    for w in self.workers]

    def call(self, group: worker_pb2.LayerGroup, items: Sequence[LayerCall]) -> tuple[list[WorkerReply], float]:
        """Evaluate ``group`` for every item under its own worker session (its own CKKS keys) on one worker:
        one item is a ``Linear`` RPC, several are one ``LinearBatch`` RPC (cross-session batching).

        The call goes to a healthy worker (module docstring: dispatch); on any failure it moves to another one (module
        docstring: failure classes), and a worker that lost the worker sessions (restart, idle expiry) gets them
        reopened once. Returns one reply per item and the worker's compute seconds. Raises
        :class:`WorkerCallError` (without ``worker``) when every worker was tried and none replied."""
        tried: set[str] = set()
        reopened: set[str] = set()
        last: WorkerCallError | None = None
        size = sum(len(item.ciphertexts) for item in items)
        while True:
            w = self.pick(tried, size)
            if w is None:
                if last is not None:
                    raise WorkerCallError(last.code, last.details)
                raise WorkerCallError(grpc.StatusCode.UNAVAILABLE, f"every CKKS worker is marked down (tried again "
                                                                   f"after worker_retry_after_s={self.retry_after_s:g} s)")
            try:
                try:
                    sids = [item.worker_sessions.id_on(w) for item in items]
                except WorkerCallError as exc:
                    if exc.code != grpc.StatusCode.RESOURCE_EXHAUSTED:
                        raise
                    # a full worker cannot take a (re)opened worker session: availability, not a deviation
                    last = WorkerCallError(exc.code, exc.details)
                    tried.add(w.address)
                    continue
                started = time.monotonic()
                if len(items) == 1:
                    reply = w.stub.linear(sids[0], group, items[0].ciphertexts)
                    replies, seconds = [reply], reply.compute_s
                else:
                    outputs, seconds = w.stub.linear_batch(group, [(sid, item.ciphertexts) for sid, item in zip(sids, items)])
                    replies = [WorkerReply(out, seconds, w.identity) for out in outputs]
                self.observe(w, size, time.monotonic() - started)
                self.mark_up(w)
                with self._lock:
                    self.stats.calls_by_worker[w.address] = self.stats.calls_by_worker.get(w.address, 0) + 1
                return replies, seconds
            except WorkerCallError as exc:
                # NOT_FOUND for a worker session ("unknown, expired or closed worker session"), not for a layer
                if exc.code == grpc.StatusCode.NOT_FOUND and "session" in exc.details and w.address not in reopened:
                    reopened.add(w.address)  # the worker lost our worker sessions (restart, idle expiry): reopen once
                    for item in items:
                        item.worker_sessions.forget(w)
                    continue
                last = exc
                tried.add(w.address)
                self.mark_down(w, f"{exc.code.name}: {exc.details}", exc.code == grpc.StatusCode.DEADLINE_EXCEEDED)
                with self._lock:
                    self.stats.failovers += 1
                for item in items:
                    item.worker_sessions.forget(w)
            finally:
                self.release(w)

    def close(self) -> None:
        for w in self.workers:
            w.channel.close()


class WorkerSessions:
    """One session's ``WorkerLink`` over all workers of a :class:`WorkerPool`: its worker session on each worker."""

    def __init__(self, pool: WorkerPool, owns_pool: bool = False) -> None:
        self.pool = pool
        self._owns = owns_pool
        self._worker_sessions: dict[str, str] = {}  # worker address -> worker session id
        self._open_args: tuple[str, bytes, list[worker_pb2.LayerGroup]] | None = None
        self._lock = threading.Lock()
        self._closed = False

    @classmethod
    def from_endpoints(cls, endpoints: Sequence[WorkerEndpoint], **kwargs) -> "WorkerSessions":
        return cls(WorkerPool(endpoints, **kwargs), owns_pool=True)

    # -- WorkerLink ------------------------------------------------------------------------
    def describe(self):
        return self.pool.describe()

    def identities(self) -> list[str]:
        return [w.identity for w in self.pool.workers]

    def open_worker_sessions(self, backend: str, public_context: bytes,
                             prepare: Sequence[worker_pb2.LayerGroup]) -> float:
        """Open a worker session on every reachable worker; succeed if at least one accepts it (a worker that
        refuses with any other status is marked down: it blocks no session while others accept).

        Raises :class:`WorkerCallError` RESOURCE_EXHAUSTED when every worker refused for that reason
        (all full: retry later), :class:`BifrostError` naming each worker's refusal when none accepted."""
        self._open_args = (backend, public_context, list(prepare))
        worst, errors, codes = 0.0, [], set()
        for w in self.pool.workers:
            try:
                worst = max(worst, self._open_on(w))
            except WorkerCallError as exc:
                errors.append(f"{w.address}: {exc.code.name}: {exc.details}")
                codes.add(exc.code)
                if exc.code != grpc.StatusCode.RESOURCE_EXHAUSTED:  # one refusing worker blocks no session
                    self.pool.mark_down(w, f"{exc.code.name}: {exc.details}")
        if not self._worker_sessions:
            if codes == {grpc.StatusCode.RESOURCE_EXHAUSTED}:
                raise WorkerCallError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                      f"every CKKS worker is full ({'; '.join(errors)})")
            raise UnavailableError(f"no CKKS worker accepted the worker session ({'; '.join(errors)})")
        return worst

    def _open_on(self, w: WorkerState) -> float:
        if self._open_args is None:
            raise InternalError("a worker session is opened on one worker only after open_worker_sessions")
        backend, public_context, prepare = self._open_args
        sid, seconds = w.stub.open_worker_session(backend, public_context, prepare)
        with self._lock:
            self._worker_sessions[w.address] = sid
        return seconds

    def linear(self, group, ciphertexts, rows: int = 1) -> WorkerReply:
        replies, _ = self.pool.call(group, [LayerCall(self, ciphertexts)])
        return replies[0]

    def id_on(self, w: WorkerState) -> str:
        """The id of this link's worker session on worker ``w``, opening it there first if needed."""
        if self._closed:  # never reopen a worker session for a link that was closed (it would leak)
            raise UnavailableError("this session's worker sessions are closed")
        if w.address not in self._worker_sessions:  # worker was down at open time, restarted, or expired us
            self._open_on(w)
        return self._worker_sessions[w.address]

    def forget(self, w: WorkerState) -> None:
        """Drop the worker session id on ``w`` (the worker lost it, or is down): reopened on the next call there."""
        with self._lock:
            self._worker_sessions.pop(w.address, None)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            worker_sessions, self._worker_sessions = dict(self._worker_sessions), {}
        by_addr = {w.address: w for w in self.pool.workers}
        for address, sid in worker_sessions.items():
            by_addr[address].stub.close_worker_session(sid)
        if self._owns:
            self.pool.close()


# --------------------------------------------------------------------------- quarantine
# Worker identities caught deviating: their results are never used again.
#
# A worker whose reply arrived intact (mutual TLS) and fails verification — malformed, over the exact size of an
# honest reply, or not the product (the native exact check; TenSEAL's range, product or replay checks) — is
# *quarantined*: from that call on, every result it returns — to any session of any replica — is discarded and
# the product is computed inside the TEE from the trusted copy of the weights. A call that brings back no reply
# (a transport failure, a timeout, any error status) never quarantines anyone (bifrost.tee.pool): someone on the
# path can cause those. The worker keeps receiving exactly the requests it would have received (same sessions,
# sizes and order). It is refused outright when the trusted side next starts (identities are pinned TLS keys,
# see :mod:`bifrost.attest.mtls`).
#
# What a caught worker can observe. Not the requests: they are those of an honest run. But their *timing*: once
# it is quarantined, the TEE computes each of its products itself (started as the request leaves, so it overlaps
# the round trip), and the gap between a reply and the next request can grow (``benchmarks/quarantine_timing.py``;
# the README states the measured gaps). So a worker may learn during the session, not only at the next start,
# that it was caught. What that tells it depends on the backend:
# - native: the verdict is exact, a function of the reply and the secret check vectors only, never of the
#   plaintext. The worker knew its reply was wrong; learning that it was caught tells it nothing about the data.
# - TenSEAL: a tolerance verdict can depend on the plaintext (a worker holding evaluation keys can add
#   g·Enc(⟨w, x⟩), which fails only when |⟨w, x⟩| is large), so the quarantine answers one yes/no question about
#   the data, once per identity: the first failed verdict is the identity's last one.
#
# The registry is shared by every session of a process and, through ``path`` (a JSON file, updated under
# an exclusive ``fcntl`` lock and replaced atomically), by every replica and every later run that names
# the same file. Thread-safe.

qlog = logging.getLogger("bifrost.quarantine")

FORMAT = "bifrost-worker-quarantine/v1"


class WorkerQuarantine:
    """Identities (``sha256:<hex>`` of a worker's pinned TLS key) whose results are never used."""

    def __init__(self, path: str | os.PathLike | None = None) -> None:
        self.path = Path(path) if path else None
        self._lock = threading.Lock()
        self._entries: dict[str, dict] = {}
        self._stamp: tuple[int, int] | None = None
        self._pending: list[threading.Event] = []
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._reload(self.path)

    # -- file plumbing -----------------------------------------------------------------------
    def _read_file(self, path: Path) -> dict[str, dict]:
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError):
            qlog.error("quarantine file %s is unreadable; keeping the identities already known", path)
            return dict(self._entries)
        if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("workers"), dict):
            qlog.error("quarantine file %s has an unknown format; keeping the identities already known", path)
            return dict(self._entries)
        return {str(k): v for k, v in data["workers"].items() if isinstance(v, dict)}

    def _reload(self, path: Path) -> None:
        """Re-read the file when it changed (a stat per call: cheap)."""
        try:
            st = os.stat(path)
            stamp = (st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            stamp = None
        if stamp != self._stamp:
            self._entries.update(self._read_file(path))
            self._stamp = stamp

    # -- API ---------------------------------------------------------------------------------
    def __contains__(self, identity: str) -> bool:
        with self._lock:
            if self.path is not None:
                self._reload(self.path)
            return identity in self._entries

    def __len__(self) -> int:
        with self._lock:
            if self.path is not None:
                self._reload(self.path)
            return len(self._entries)

    def entries(self) -> dict[str, dict]:
        with self._lock:
            if self.path is not None:
                self._reload(self.path)
            return {k: dict(v) for k, v in self._entries.items()}

    def add(self, identity: str, reason: str) -> bool:
        """Quarantine ``identity`` (``reason``: which check failed; no data). Returns True if it is new.

        Effective at once in this process; the file write and the operator's warning happen on a background
        thread, so the call that caught the worker is not delayed by them (its next request leaves on time)."""
        entry = {"reason": reason, "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        with self._lock:
            if identity in self._entries:
                return False
            self._entries[identity] = entry
        done = threading.Event()
        self._pending.append(done)
        threading.Thread(target=self._publish, args=(identity, entry, done), daemon=True,
                         name="quarantine-publish").start()
        return True

    def _publish(self, identity: str, entry: dict, done: threading.Event) -> None:
        try:
            if self.path is not None:
                try:
                    with self._lock:
                        self._write(self.path, identity, entry)
                except OSError as exc:  # disk full, read-only, removed: the quarantine holds in this process anyway
                    qlog.error("quarantine file %s not written (%s): worker %s stays quarantined in this process "
                               "only, not yet for other replicas or the next start", self.path,
                               exc.strerror or type(exc).__name__, identity[:23])
            qlog.warning("worker %s quarantined (%s): its results are discarded and recomputed in the TEE; it is "
                        "refused at the next start", identity[:23], entry["reason"])
        finally:
            done.set()

    def flush(self, timeout_s: float = 10.0) -> None:
        """Wait for pending file writes (tests, shutdown)."""
        for done in list(self._pending):
            done.wait(timeout_s)

    def _write(self, path: Path, identity: str, entry: dict) -> None:
        lock_path = path.with_name(path.name + ".lock")
        with open(lock_path, "a") as lock_file:
            fcntl.flock(lock_file, fcntl.LOCK_EX)
            try:
                current = self._read_file(path)
                current.setdefault(identity, entry)
                self._entries.update(current)
                tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
                try:
                    tmp.write_text(json.dumps({"format": FORMAT, "workers": current}, indent=1, sort_keys=True))
                    os.replace(tmp, path)
                except OSError:
                    tmp.unlink(missing_ok=True)  # (a partial file from a full disk)
                    raise
                st = os.stat(path)
                self._stamp = (st.st_mtime_ns, st.st_size)
            finally:
                fcntl.flock(lock_file, fcntl.LOCK_UN)
