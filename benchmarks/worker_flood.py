"""A flood of OpenSession requests against one real worker process: its memory stays within its budget.

Starts ``bifrost worker`` (a separate process, GPT-2 124M by default) with ``cache_bytes`` set below the size
of the model's prepared weights, then sends OpenSession requests from several threads at once, each asking
to prepare every layer group (what one 4.8 KB request did to the worker before issue 13: +1.5 GB, never
freed). Half the worker sessions are closed, half are left open (idle); requests over ``max_sessions`` are refused;
an unconfigured 128-bit parameter set is refused. The worker's resident memory is sampled every 0.2 s.

Reported: RSS after start (model weights loaded), peak RSS during the flood, the budget, how many requests
were served / refused and with which status. Budget = RSS after start + cache_bytes + max_sessions × public
context + the worker's threads × the largest prepared group (each thread may be encoding one group that is
not yet in the cache: its working set) + 64 MiB for gRPC buffers and interpreter growth.

Usage: ``python benchmarks/worker_flood.py [--model gpt2] [--cache-mib 512] [--requests 48] [--threads 8]``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


from _report import write_report  # noqa: E402 - benchmarks/ is on sys.path when run as a script


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gpt2")
    ap.add_argument("--cache-mib", type=int, default=512)
    ap.add_argument("--max-sessions", type=int, default=8)
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--threads", type=int, default=8)
    ap.add_argument("--worker-threads", type=int, default=4, help="the worker's gRPC threads (bifrost worker --threads)")
    ap.add_argument("--out", default="benchmarks/results/worker_flood.json")
    args = ap.parse_args()

    import grpc
    import yaml

    from bifrost.attest.mtls import process_identity
    from bifrost.ckks import CKKSParams
    from bifrost.ckks.registry import get_backend
    from bifrost.config_loader import load_config
    from bifrost.proto import worker_pb2, worker_pb2_grpc
    from bifrost.tee.link import connect
    from bifrost.worker.launcher import LocalWorker

    cfg = load_config()
    folder = Path(tempfile.mkdtemp(prefix="bifrost-flood-"))
    (folder / "worker.yaml").write_text(yaml.safe_dump({"worker": {"cache_bytes": args.cache_mib << 20,
                                                                   "max_sessions": args.max_sessions}}))
    worker = LocalWorker(args.model, cfg.seed, [process_identity().cert_pem], config=str(folder / "worker.yaml"),
                         log_path=str(folder / "worker.log")).start()
    samples, stop = [], threading.Event()

    def sample() -> None:
        while not stop.wait(0.2):
            samples.append(rss_bytes(worker.proc.pid))

    try:
        stub = worker_pb2_grpc.CKKSWorkerStub(connect(worker.endpoint))
        layers = stub.Describe(worker_pb2.DescribeRequest(), timeout=60).layers
        groups = [worker_pb2.LayerGroup(layers=[worker_pb2.LayerRef(name=l.name, digest=l.digest)]) for l in layers]
        largest = max(layers, key=lambda l: l.d_in * l.d_out)
        import numpy as np

        from bifrost.ckks import GroupShape

        probe_keys = get_backend("native").keygen(None, [])
        group_bytes = get_backend("native").evaluator(probe_keys.public_context(), device="cpu").prepare(
            GroupShape(largest.d_in, (largest.d_out,)), [np.full((largest.d_out, largest.d_in), 0.01)]).nbytes
        start_rss = rss_bytes(worker.proc.pid)
        threading.Thread(target=sample, daemon=True).start()
        outcomes: Counter = Counter()
        context_bytes = []
        lock = threading.Lock()

        def one(i: int) -> None:
            keys = get_backend("native").keygen(None, [])
            blob = keys.public_context()
            with lock:
                context_bytes.append(len(blob))
            try:
                sid = stub.OpenSession(worker_pb2.OpenSessionRequest(backend="native", public_context=blob,
                                                                     prepare=groups), timeout=900).session_id
                outcome = "OK"
                if i % 2 == 0:
                    stub.CloseSession(worker_pb2.CloseSessionRequest(session_id=sid), timeout=60)
            except grpc.RpcError as exc:
                outcome = exc.code().name
            with lock:
                outcomes[outcome] += 1

        other = get_backend("native").keygen(CKKSParams(2048, (30, 24), 34), [])
        try:  # before the flood fills the worker session slots
            stub.OpenSession(worker_pb2.OpenSessionRequest(backend="native", public_context=other.public_context()),
                             timeout=60)
            unconfigured = "accepted"
        except grpc.RpcError as exc:
            unconfigured = f"{exc.code().name}: {exc.details()}"
        t0 = time.monotonic()
        threads = [threading.Thread(target=lambda k=k: [one(i) for i in range(k, args.requests, args.threads)])
                   for k in range(args.threads)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        flood_s = time.monotonic() - t0
        stop.set()
        peak = max(samples + [rss_bytes(worker.proc.pid)])
    finally:
        stop.set()
        worker.stop()
    budget = (start_rss + (args.cache_mib << 20) + args.max_sessions * max(context_bytes or [0])
              + args.worker_threads * group_bytes + (64 << 20))
    report = {"model": args.model, "requests": args.requests,
              "threads": args.threads, "max_sessions": args.max_sessions, "cache_bytes": args.cache_mib << 20,
              "outcomes": dict(outcomes), "unconfigured_parameters": unconfigured, "flood_s": flood_s,
              "rss_after_start_bytes": start_rss, "peak_rss_bytes": peak, "budget_bytes": budget,
              "within_budget": peak <= budget, "public_context_bytes": max(context_bytes or [0]),
              "largest_prepared_group_bytes": group_bytes, "worker_threads": args.worker_threads}
    print(f"worker {args.model}: RSS after start {start_rss / 2**20:.0f} MiB, peak during {args.requests} "
          f"OpenSession requests ({args.threads} threads, each preparing {len(groups)} groups) "
          f"{peak / 2**20:.0f} MiB; budget (start + cache {args.cache_mib} MiB + {args.max_sessions} worker sessions + "
          f"{args.worker_threads} threads x {group_bytes / 2**20:.0f} MiB + 64 MiB) "
          f"{budget / 2**20:.0f} MiB -> {'within' if peak <= budget else 'OVER'} budget; outcomes {dict(outcomes)}; "
          f"unconfigured parameters: {unconfigured}")
    write_report(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
