"""Load test: N concurrent attested sessions on loopback, each generating T tokens (default 16 x 32).

Starts the serving app in this process exactly as ``bifrost serve`` does (Ray actors by default,
local CKKS worker processes), runs the sessions from client threads, and reports throughput,
p50/p99 time per output token, time to first token, peak memory per process, errors (must be
zero) and the canary check: every session's prompt carries a secret string that must not appear
in any other session's output nor anywhere in the run folder (serve log, worker logs, Ray logs).

    .venv/bin/python benchmarks/load_test.py --model gpt2-2l --sessions 16 --tokens 32   # the recorded results
    .venv/bin/python benchmarks/load_test.py --model gpt2-mini   # a quick functional run

Prints a rich table to stderr and one JSON object to stdout.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
import statistics
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _pct(xs: list[float], p: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    k = min(len(xs) - 1, max(0, round(p / 100 * (len(xs) - 1))))
    return xs[k]


def _vm_hwm(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gpt2-mini", help="GPT-2-architecture model (gpt2-mini, gpt2-2l, gpt2)")
    ap.add_argument("--sessions", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--workers", type=int, default=2, help="local CKKS worker processes")
    ap.add_argument("--runtime", choices=("ray", "local"), default="ray")
    ap.add_argument("--backend", help="CKKS backend (default: the run config's)")
    ap.add_argument("--run-root", default="runs")
    ap.add_argument("--no-batch", action="store_true",
                    help="serve with batch_decode off (sessions' steps interleave under a lock) to compare")
    args = ap.parse_args(argv)

    from rich.console import Console
    from rich.table import Table

    from bifrost.config_loader import load_config
    from bifrost.model.catalog import resolve
    from bifrost.model.digests import model_digest
    from bifrost.serve.client import BifrostClient
    from bifrost.serve.config import load_serve_config
    from bifrost.tee.deploy import ServeApp
    from bifrost.attest.policy import policy_from_mapping

    cfg = load_config().replace(model=args.model)
    if args.backend:
        cfg = cfg.replace(backend=args.backend)
    scfg = load_serve_config().replace(runtime=args.runtime, port=0, replicas=args.replicas, local_workers=args.workers,
                                       workers=(), max_sessions=max(args.sessions, 1), max_new_tokens=max(args.tokens, 1),
                                       max_pending_sessions=max(args.sessions, 1), ray_num_cpus=max(2, args.replicas),
                                       run_dir=args.run_root,
                                       quarantine_file=str(Path(args.run_root) / "worker-quarantine.json"),
                                       batch_decode=not args.no_batch)
    t_start = time.perf_counter()
    app = ServeApp(cfg, scfg)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        handlers=[logging.FileHandler(app.run_dir / "serve.log")])
    app.start()
    startup_s = time.perf_counter() - t_start
    policy = policy_from_mapping({"allow_simulated": True,
                                  "model_digests": [model_digest(resolve(args.model), cfg.seed).hex()]})
    canaries = [f"CANARY-{secrets.token_hex(8)}" for _ in range(args.sessions)]
    results: dict[int, dict] = {}
    errors: list[str] = []
    barrier = threading.Barrier(args.sessions)

    def session(i: int) -> None:
        try:
            with BifrostClient(f"127.0.0.1:{app.port}", policy, timeout_s=1800) as c:
                t0 = time.perf_counter()
                c.attest()
                attest_s = time.perf_counter() - t0
                barrier.wait(timeout=600)
                r = c.chat(f"Session secret {canaries[i]}:", args.tokens)
                results[i] = {"tokens": r.tokens, "text": r.text, "ttft": r.ttft_s, "gaps": r.token_times_s[1:],
                              "attest_s": attest_s, "end": time.perf_counter()}
        except Exception as exc:  # noqa: BLE001 - counted as an error
            errors.append(f"session {i}: {exc!r}")
            try:
                barrier.abort()
            except Exception:  # noqa: BLE001
                pass

    threads = [threading.Thread(target=session, args=(i,)) for i in range(args.sessions)]
    t_run = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t_run
    # memory peaks (VmHWM) per process: this front end, each replica (Ray actor), each worker
    mem = {"front_end": _vm_hwm(os.getpid())}
    batching = {"batched_worker_calls": 0, "max_items_per_call": 0, "items": 0.0}
    quarantined: set[str] = set()  # worker identities caught deviating (honest local workers: none)
    for i, r in enumerate(app.replicas):
        try:
            st = r.stats()
            mem[f"replica_{i}"] = _vm_hwm(st["pid"]) or st["max_rss_bytes"]
            batching["batched_worker_calls"] += st["batched_worker_calls"]
            batching["items"] += st["mean_items_per_batched_call"] * st["batched_worker_calls"]
            batching["max_items_per_call"] = max(batching["max_items_per_call"], st["max_items_per_batched_call"])
            quarantined.update(st.get("quarantined_workers", ()))
            if i == 0:
                failovers = st["failovers"]
        except Exception:  # noqa: BLE001
            pass
    for i, w in enumerate(app.local_workers):
        mem[f"worker_{i}"] = _vm_hwm(w.proc.pid)
    run_dir = app.run_dir
    app.stop()
    logging.shutdown()

    # canary check: other sessions' outputs, and every file of the run folder (logs incl. Ray's)
    leaks = []
    for i, res in results.items():
        for j, canary in enumerate(canaries):
            if j != i and canary in res["text"]:
                leaks.append(f"session {i} output holds session {j}'s canary")
    scanned = 0
    for p in run_dir.rglob("*"):
        if p.is_file() and not p.is_symlink():
            try:
                data = p.read_bytes()
            except OSError:
                continue
            scanned += 1
            for canary in canaries:
                if canary.encode() in data:
                    leaks.append(f"{p.relative_to(run_dir)} holds a canary")
    gaps = [g for r in results.values() for g in r["gaps"]]
    ttfts = [r["ttft"] for r in results.values()]
    n_tokens = sum(len(r["tokens"]) for r in results.values())
    report = {
        "model": args.model, "backend": cfg.backend, "runtime": args.runtime, "replicas": args.replicas,
        "workers": args.workers, "sessions": args.sessions, "tokens_per_session": args.tokens,
        "startup_s": round(startup_s, 2), "wall_s": round(wall, 2), "tokens": n_tokens,
        "throughput_tok_s": round(n_tokens / wall, 3) if wall else 0.0,
        "tpot_p50_s": round(_pct(gaps, 50), 4), "tpot_p99_s": round(_pct(gaps, 99), 4),
        "tpot_mean_s": round(statistics.fmean(gaps), 4) if gaps else None,
        "ttft_p50_s": round(_pct(ttfts, 50), 3), "ttft_p99_s": round(_pct(ttfts, 99), 3),
        "attest_p50_s": round(_pct([r["attest_s"] for r in results.values()], 50), 3),
        "batch_decode": not args.no_batch, "batched_worker_calls": batching["batched_worker_calls"],
        "mean_items_per_batched_call": round(batching["items"] / batching["batched_worker_calls"], 2)
        if batching["batched_worker_calls"] else 0.0, "max_items_per_batched_call": batching["max_items_per_call"],
        "peak_rss_bytes": mem, "peak_rss_total_bytes": sum(mem.values()),
        "errors": errors, "error_count": len(errors), "worker_failovers": locals().get("failovers", None),
        "quarantined_workers": sorted(quarantined),
        "canary_check": {"passed": not leaks and len(results) == args.sessions, "leaks": leaks,
                         "run_files_scanned": scanned},
        "run_dir": str(run_dir), "cpu_count": os.cpu_count(),
    }
    table = Table(title=f"bifrost load test: {args.sessions} sessions x {args.tokens} tokens, {args.model}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    rows = [("throughput", f"{report['throughput_tok_s']:.2f} tok/s ({n_tokens} tokens in {wall:.1f} s)"),
            ("time per output token p50 / p99", f"{report['tpot_p50_s'] * 1000:.0f} / {report['tpot_p99_s'] * 1000:.0f} ms"),
            ("time to first token p50 / p99", f"{report['ttft_p50_s'] * 1000:.0f} / {report['ttft_p99_s'] * 1000:.0f} ms"),
            ("attest (keygen + worker sessions) p50", f"{report['attest_p50_s'] * 1000:.0f} ms"),
            ("peak RSS (sum of process peaks)", f"{report['peak_rss_total_bytes'] / 2**20:.0f} MiB"),
            *[(f"  peak RSS {k}", f"{v / 2**20:.0f} MiB") for k, v in mem.items()],
            ("batched decode: worker calls / mean items / max items",
             f"{report['batched_worker_calls']} / {report['mean_items_per_batched_call']} / "
             f"{report['max_items_per_batched_call']}" if report["batch_decode"] else "off"),
            ("errors", str(len(errors))),
            ("workers quarantined (TEE checks)", str(len(quarantined))),
            ("canary check", "passed" if report["canary_check"]["passed"] else f"FAILED: {leaks[:3]}"),
            ("startup (workers, Ray, replicas)", f"{startup_s:.1f} s")]
    for k, v in rows:
        table.add_row(k, v)
    Console(stderr=True).print(table)
    print(json.dumps(report, indent=2))
    return 0 if not errors and report["canary_check"]["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
