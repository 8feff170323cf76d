"""The front end's session table: which replica owns a session, its binding, limits, idle expiry.

Holds no secrets: session ids (16 bytes derived by HKDF from the channel's key exchange, so they are
unguessable and bound to the channel keys), the public report_data the session token is bound to,
and bookkeeping. Thread-safe.

Invariants: a session with a request in progress (``busy > 0``) is never idle; a session none of whose
requests has been opened by its replica yet is *pending* and counts against ``max_pending`` (with
handshakes in progress) and expires after ``pending_idle_s`` instead of ``idle_s``; only a request
whose sealed record the replica opened marks a session used and restarts its idle time (a forged or
replayed record, e.g. from someone holding a sniffed token, keeps no session alive); a replica marked
dead gets no new sessions and its sessions are dropped; a replica holds at most ``max_per_replica``
sessions (handshakes in progress included); a session has at most ``max_turns`` Generate turns whose
record its replica opened (a turn is counted when it begins and uncounted if its record was not opened,
so concurrent requests cannot overshoot).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field


class SessionLimitError(Exception):
    """No room for another session (``max_sessions`` or ``max_pending``): RESOURCE_EXHAUSTED."""


class TurnLimitError(Exception):
    """The session has had ``max_turns`` turns: RESOURCE_EXHAUSTED (attest a new session)."""


class NoReplicaError(Exception):
    """Every replica is dead (or was tried): UNAVAILABLE."""


@dataclass
class SessionEntry:
    session_id: bytes
    replica: int
    report_data: bytes = b""
    created: float = field(default_factory=time.monotonic)
    last_used: float = field(default_factory=time.monotonic)
    used: bool = False  # a request of this session has been opened by its replica
    busy: int = 0       # requests in progress
    turns: int = 0      # Generate turns begun, less those whose record the replica did not open


class SessionTable:
    def __init__(self, max_sessions: int, replicas: int, max_pending: int | None = None,
                 max_per_replica: int | None = None, max_turns: int | None = None) -> None:
        """``max_pending`` / ``max_per_replica`` None: ``max_sessions``; ``max_turns`` None: no turn limit."""
        self.max_sessions, self.replicas = max_sessions, replicas
        self.max_pending = max_pending if max_pending is not None else max_sessions
        self.max_per_replica = max_per_replica if max_per_replica is not None else max_sessions
        self.max_turns = max_turns
        self._entries: dict[bytes, SessionEntry] = {}
        self._reserved = [0] * replicas  # handshakes in progress, per replica
        self._dead: set[int] = set()
        self._lock = threading.Lock()

    def reserve(self, exclude: AbstractSet[int] = frozenset()) -> int:
        """Claim a slot on the least-loaded live replica not in ``exclude``, or raise
        :class:`SessionLimitError` / :class:`NoReplicaError`."""
        with self._lock:
            if len(self._entries) + sum(self._reserved) >= self.max_sessions:
                raise SessionLimitError(f"server already holds {self.max_sessions} sessions (max_sessions)")
            pending = sum(self._reserved) + sum(1 for e in self._entries.values() if not e.used)
            if pending >= self.max_pending:
                raise SessionLimitError(f"{pending} attested sessions have not sent a request yet "
                                        f"(max_pending_sessions={self.max_pending}); try again later")
            live = [r for r in range(self.replicas) if r not in self._dead and r not in exclude]
            if not live:
                raise NoReplicaError("no live replica")
            load = {r: self._reserved[r] for r in live}
            for e in self._entries.values():
                if e.replica in load:
                    load[e.replica] += 1
            r = min(live, key=lambda i: load[i])
            if load[r] >= self.max_per_replica:
                raise SessionLimitError(f"every live replica holds {self.max_per_replica} sessions "
                                        f"(max_sessions_per_replica={self.max_per_replica}); try again later")
            self._reserved[r] += 1
            return r

    def commit(self, replica: int, session_id: bytes, report_data: bytes) -> None:
        with self._lock:
            self._reserved[replica] -= 1
            self._entries[session_id] = SessionEntry(session_id, replica, report_data)

    def cancel(self, replica: int) -> None:
        with self._lock:
            self._reserved[replica] -= 1

    def get(self, session_id: bytes) -> SessionEntry | None:
        with self._lock:
            return self._entries.get(session_id)

    def begin(self, session_id: bytes, turn: bool = False) -> SessionEntry | None:
        """An authorized request starts: the session is busy until :meth:`end`. ``turn``: a Generate turn,
        counted; :class:`TurnLimitError` (and nothing changes) when the session has had ``max_turns``."""
        with self._lock:
            e = self._entries.get(session_id)
            if e is not None:
                if turn and self.max_turns is not None and e.turns >= self.max_turns:
                    raise TurnLimitError(f"this session has had {self.max_turns} turns (max_turns_per_session="
                                         f"{self.max_turns}); attest a new session")
                e.busy += 1
                e.turns += int(turn)
            return e

    def end(self, session_id: bytes, opened: bool, turn: bool = False) -> None:
        """The request ended; ``opened``: the replica opened its record (answered with a sealed one), so
        the session is used and its idle time restarts; a ``turn`` whose record was not opened is uncounted."""
        with self._lock:
            e = self._entries.get(session_id)
            if e is not None:
                e.busy = max(0, e.busy - 1)
                if opened:
                    e.used, e.last_used = True, time.monotonic()
                elif turn:
                    e.turns = max(0, e.turns - 1)

    def remove(self, session_id: bytes) -> SessionEntry | None:
        with self._lock:
            return self._entries.pop(session_id, None)

    def idle(self, idle_s: float, pending_idle_s: float | None = None) -> list[SessionEntry]:
        """Sessions without a request in progress, unused for ``idle_s`` (``pending_idle_s`` if never used)."""
        now = time.monotonic()
        pending_idle_s = idle_s if pending_idle_s is None else pending_idle_s
        with self._lock:
            return [e for e in self._entries.values()
                    if not e.busy and now - e.last_used > (idle_s if e.used else pending_idle_s)]

    def mark_dead(self, replica: int) -> list[SessionEntry]:
        """Exclude ``replica`` from new sessions; returns (and drops) the sessions it held."""
        with self._lock:
            self._dead.add(replica)
            gone = [e for e in self._entries.values() if e.replica == replica]
            for e in gone:
                del self._entries[e.session_id]
            return gone

    def live_replicas(self) -> list[int]:
        with self._lock:
            return [r for r in range(self.replicas) if r not in self._dead]

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)
