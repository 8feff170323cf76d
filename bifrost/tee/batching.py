"""Cross-session batched decode: one worker call per layer group for the current tokens of many sessions.

Sessions of one replica each run their decode step in their own thread, with their own CKKS keys
(:class:`~bifrost.tee.engine.DelegationEngine`) and KV cache. When a step reaches a delegated layer
group, the session encrypts its row under its own key and hands the ciphertexts to the
:class:`DecodeBatcher`, which merges the requests of all sessions waiting at the *same* group into one
``LinearBatch`` worker call (one kernel pass; a plaintext-weight × ciphertext product needs no key, so
ciphertexts of different keys stack). Each session decrypts only its own results.

When to send (the barrier rule): a forming batch is sent as soon as every session that is inside a
decode step is waiting on some worker call (nobody else can still join), when it holds
``max_batch_rows`` rows, or ``window_s`` after its first request (a session busy elsewhere, e.g. a long
plaintext prefill, does not hold the others up for longer). With one session the rule sends at once.

Only ciphertexts and public layer ids pass through here. What an observer of the worker learns in
addition is which sessions decode at the same time (visible from timing anyway).
"""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass, field
from typing import Sequence

from ..proto import worker_pb2
from .link import WorkerReply
from .pool import LayerCall, WorkerPool, WorkerSessions

DEFAULT_WINDOW_S = 0.25
DEFAULT_MAX_BATCH_ROWS = 16
MAX_ITEM_ROWS = 4  # larger inputs (prompt prefill) are already batched over their own rows: sent alone


@dataclass
class _Item:
    worker_sessions: WorkerSessions
    ciphertexts: Sequence[bytes]
    rows: int
    done: bool = False
    reply: WorkerReply | None = None
    error: BaseException | None = None


@dataclass
class _Batch:
    group: worker_pb2.LayerGroup
    created: float
    items: list[_Item] = field(default_factory=list)
    sent: bool = False
    full: bool = False  # a request did not fit: send as is

    @property
    def rows(self) -> int:
        return sum(i.rows for i in self.items)


@dataclass
class BatcherStats:
    worker_calls: int = 0
    items: int = 0
    max_items: int = 0

    @property
    def mean_items(self) -> float:
        return self.items / self.worker_calls if self.worker_calls else 0.0


class DecodeBatcher:
    """Merges concurrent sessions' layer calls (same group) into one worker call. Thread-safe."""

    def __init__(self, pool: WorkerPool, window_s: float = DEFAULT_WINDOW_S,
                 max_batch_rows: int = DEFAULT_MAX_BATCH_ROWS) -> None:
        if window_s < 0 or max_batch_rows < 1:
            raise ValueError("window_s must be >= 0 and max_batch_rows >= 1")
        self.pool, self.window_s, self.max_batch_rows = pool, window_s, max_batch_rows
        self._cv = threading.Condition()
        self._computing = 0  # sessions inside a decode step and not waiting on a worker call
        self._forming: dict[tuple, _Batch] = {}
        self._local = threading.local()
        self.stats = BatcherStats()

    @contextlib.contextmanager
    def participant(self):
        """Wrap one session's decode step (its forward pass) so that others know to wait for it."""
        if getattr(self._local, "active", False):  # re-entrant: already counted
            yield
            return
        self._local.active = True
        with self._cv:
            self._computing += 1
        try:
            yield
        finally:
            self._local.active = False
            with self._cv:
                self._computing -= 1
                self._cv.notify_all()

    def link_for(self, worker_sessions: WorkerSessions) -> "BatchedLink":
        """A :class:`~bifrost.tee.link.WorkerLink` for one session whose layer calls go through this batcher."""
        return BatchedLink(self, worker_sessions)

    # ------------------------------------------------------------------ the rendezvous
    def linear(self, worker_sessions: WorkerSessions, group: worker_pb2.LayerGroup, ciphertexts: Sequence[bytes],
               rows: int) -> WorkerReply:
        if not getattr(self._local, "active", False) or rows > MAX_ITEM_ROWS:
            with self._waiting():
                return worker_sessions.linear(group, ciphertexts)
        key = tuple((ref.name, ref.digest) for ref in group.layers)
        item = _Item(worker_sessions, ciphertexts, rows)
        leader = False
        with self._cv:
            batch = self._forming.get(key)
            if batch is not None and batch.rows + rows > self.max_batch_rows:
                batch.full = True  # its members send it; this request starts the next one
                del self._forming[key]
                batch = None
            if batch is None:
                batch = self._forming[key] = _Batch(group, time.monotonic())
            batch.items.append(item)
            self._computing -= 1
            self._cv.notify_all()
            while not item.done:
                if not batch.sent and self._ready(batch):
                    batch.sent, leader = True, True
                    if self._forming.get(key) is batch:
                        del self._forming[key]
                    break
                timeout = None if batch.sent else max(batch.created + self.window_s - time.monotonic(), 0.001)
                self._cv.wait(timeout=timeout)
        if leader:
            self._run(batch)
        with self._cv:
            self._computing += 1
        if item.error is not None:
            raise item.error
        assert item.reply is not None  # _run gives every item a reply (one per call: link.linear_batch) or an error
        return item.reply

    @contextlib.contextmanager
    def _waiting(self):
        active = getattr(self._local, "active", False)
        if active:
            with self._cv:
                self._computing -= 1
                self._cv.notify_all()
        try:
            yield
        finally:
            if active:
                with self._cv:
                    self._computing += 1

    def _ready(self, batch: _Batch) -> bool:
        return (batch.full or self._computing <= 0 or batch.rows >= self.max_batch_rows
                or time.monotonic() - batch.created >= self.window_s)

    def _run(self, batch: _Batch) -> None:
        """Send one batch (outside the lock) and wake its members. Never raises: an error (no reply: each
        session's engine computes its product in the TEE) goes to every member."""
        items = batch.items
        try:
            replies, _ = self.pool.call(batch.group, [LayerCall(i.worker_sessions, i.ciphertexts) for i in items])
            for item, reply in zip(items, replies):
                item.reply = reply
        except BaseException as exc:  # noqa: BLE001 - handed to every waiting session
            for item in items:
                item.error = exc
        with self._cv:
            self.stats.worker_calls += 1
            self.stats.items += len(items)
            self.stats.max_items = max(self.stats.max_items, len(items))
            for item in items:
                item.done = True
            self._cv.notify_all()


class BatchedLink:
    """One session's link: layer calls go through the replica's :class:`DecodeBatcher`, the rest to its
    :class:`~bifrost.tee.pool.WorkerSessions`."""

    def __init__(self, batcher: DecodeBatcher, worker_sessions: WorkerSessions) -> None:
        self.batcher, self.worker_sessions = batcher, worker_sessions

    def describe(self):
        return self.worker_sessions.describe()

    def identities(self):
        return self.worker_sessions.identities()

    def open_worker_sessions(self, backend, public_context, prepare) -> float:
        return self.worker_sessions.open_worker_sessions(backend, public_context, prepare)

    def linear(self, group, ciphertexts, rows: int = 1):
        return self.batcher.linear(self.worker_sessions, group, ciphertexts, rows)

    def close(self) -> None:
        self.worker_sessions.close()
