"""``python -m bifrost.worker`` with a read-only stats probe, for ``benchmarks/soak.py``.

The worker's gRPC API exposes no counters (Describe names the model, its layers and backends), so the soak
benchmark starts its local workers through this file instead: it records the :class:`WorkerService` that
``bifrost.worker.cli`` builds and, every ``BIFROST_SOAK_STATS_PERIOD_S`` seconds (default 5), writes its prepared-weight
cache and worker-session counters to ``$BIFROST_SOAK_WORKER_STATS/worker-<pid>.json`` (atomically). Nothing else
changes: same arguments, same code path, same process; the probe only reads attributes under the service's locks.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _probe(service, folder: Path, period_s: float) -> None:
    path = folder / f"worker-{os.getpid()}.json"
    tmp = path.with_suffix(".tmp")
    while True:
        cache = service.cache
        with cache._lock:  # noqa: SLF001 - read-only probe
            cache_entries, cache_bytes, evictions = len(cache._entries), cache.bytes, cache.evictions  # noqa: SLF001
            key_locks = len(cache._key_locks)  # noqa: SLF001
        with service._lock:  # noqa: SLF001
            sessions, reserved = len(service._worker_sessions), service._reserved  # noqa: SLF001
        doc = {"t": time.time(), "pid": os.getpid(), "cache_bytes": cache_bytes, "cache_budget_bytes": cache.budget,
               "cache_entries": cache_entries, "cache_evictions": evictions, "cache_key_locks": key_locks,
               "worker_sessions": sessions, "reserved_slots": reserved}
        try:
            tmp.write_text(json.dumps(doc))
            os.replace(tmp, path)
        except OSError:
            pass
        time.sleep(period_s)


def main() -> int:
    from bifrost.worker import cli, service as service_mod

    folder = Path(os.environ["BIFROST_SOAK_WORKER_STATS"])
    folder.mkdir(parents=True, exist_ok=True)
    period_s = float(os.environ.get("BIFROST_SOAK_STATS_PERIOD_S", "5"))
    real_build = service_mod.build_service

    def build_service(*args, **kwargs):
        svc = real_build(*args, **kwargs)
        threading.Thread(target=_probe, args=(svc, folder, period_s), daemon=True, name="soak-probe").start()
        return svc

    service_mod.build_service = build_service  # cli.run imports it from the module at call time
    return cli.main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
