"""The front end's session table: which replica owns a session, its binding, limits, idle expiry.

Holds no secrets: session ids (16 bytes derived by HKDF from the channel's key exchange, so they are
unguessable and bound to the channel keys), the public report_data the session token is bound to,
and bookkeeping. Thread-safe.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field


class SessionLimitError(Exception):
    pass


@dataclass
class SessionEntry:
    session_id: bytes
    replica: int
    report_data: bytes = b""
    created: float = field(default_factory=time.monotonic)
    last_used: float = field(default_factory=time.monotonic)


class SessionTable:
    def __init__(self, max_sessions: int, replicas: int) -> None:
        self.max_sessions, self.replicas = max_sessions, replicas
        self._entries: dict[bytes, SessionEntry] = {}
        self._reserved = [0] * replicas  # handshakes in progress, per replica
        self._lock = threading.Lock()

    def reserve(self) -> int:
        """Claim a slot on the least-loaded replica, or raise :class:`SessionLimitError`."""
        with self._lock:
            if len(self._entries) + sum(self._reserved) >= self.max_sessions:
                raise SessionLimitError(f"server already holds {self.max_sessions} sessions (max_sessions)")
            load = [self._reserved[r] + sum(1 for e in self._entries.values() if e.replica == r)
                    for r in range(self.replicas)]
            r = min(range(self.replicas), key=lambda i: load[i])
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
            e = self._entries.get(session_id)
            if e is not None:
                e.last_used = time.monotonic()
            return e

    def remove(self, session_id: bytes) -> SessionEntry | None:
        with self._lock:
            return self._entries.pop(session_id, None)

    def idle(self, idle_s: float) -> list[SessionEntry]:
        now = time.monotonic()
        with self._lock:
            return [e for e in self._entries.values() if now - e.last_used > idle_s]

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)
