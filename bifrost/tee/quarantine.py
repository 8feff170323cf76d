"""Worker identities caught deviating: their results are never used again.

A worker whose reply arrived intact (mutual TLS) and fails verification — malformed, over the exact size of an
honest reply, or not the product (the native exact check; TenSEAL's range, product or replay checks) — is
*quarantined*: from that call on, every result it returns — to any session of any replica — is discarded and
the product is computed inside the TEE from the trusted copy of the weights. A call that brings back no reply
(a transport failure, a timeout, any error status) never quarantines anyone (bifrost.tee.pool): someone on the
path can cause those. The worker keeps receiving exactly the requests it would have received (same sessions,
sizes and order). It is refused outright when the trusted side next starts (identities are pinned TLS keys,
see :mod:`bifrost.attest.mtls`).

What a caught worker can observe. Not the requests: they are those of an honest run. But their *timing*: once
it is quarantined, the TEE computes each of its products itself (started as the request leaves, so it overlaps
the round trip), and the gap between a reply and the next request can grow (``benchmarks/quarantine_timing.py``;
the README states the measured gaps). So a worker may learn during the session, not only at the next start,
that it was caught. What that tells it depends on the backend:
- native: the verdict is exact, a function of the reply and the secret check vectors only, never of the
  plaintext. The worker knew its reply was wrong; learning that it was caught tells it nothing about the data.
- TenSEAL: a tolerance verdict can depend on the plaintext (a worker holding evaluation keys can add
  g·Enc(⟨w, x⟩), which fails only when |⟨w, x⟩| is large), so the quarantine answers one yes/no question about
  the data, once per identity: the first failed verdict is the identity's last one.

The registry is shared by every session of a process and, through ``path`` (a JSON file, updated under
an exclusive ``fcntl`` lock and replaced atomically), by every replica and every later run that names
the same file. Thread-safe.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import threading
import time
from pathlib import Path

log = logging.getLogger("bifrost.quarantine")

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
            log.error("quarantine file %s is unreadable; keeping the identities already known", path)
            return dict(self._entries)
        if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("workers"), dict):
            log.error("quarantine file %s has an unknown format; keeping the identities already known", path)
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
                with self._lock:
                    self._write(self.path, identity, entry)
            log.warning("worker %s quarantined (%s): its results are discarded and recomputed in the TEE; it is "
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
                tmp.write_text(json.dumps({"format": FORMAT, "workers": current}, indent=1, sort_keys=True))
                os.replace(tmp, path)
                st = os.stat(path)
                self._stamp = (st.st_mtime_ns, st.st_size)
            finally:
                fcntl.flock(lock_file, fcntl.LOCK_UN)
