"""The native backend's exact check: what it costs the trusted side, per model.

Per model (its catalog CKKS parameters), in one process with an in-process worker evaluator:
- per replica: the time to draw the check vectors and compute v = rᵀ·M for every delegated group (done once per
  trusted process, at its first session), and their memory;
- per decode token: the critical-path check (r·Y, compare) summed over one call per group, the reply's parse
  (which decryption needs anyway, and reuses), and the part prepared on a background thread while the worker computes
  (v·c_0);
- per prefill call of 64 rows: the same for the largest group.
The share of decode time comes from ``bifrost demo --json`` (``decode_breakdown_mean_s.verify_s``), not from here.

Usage: ``python benchmarks/exact_check.py [--models gpt2 smollm2-135m-instruct qwen3-0.6b] [--repeats 5]
[--out benchmarks/results/exact_check.json]``
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from _report import write_report  # noqa: E402 - benchmarks/ is on sys.path when run as a script


def measure(model: str, repeats: int) -> dict:
    import numpy as np

    from bifrost.ckks import GroupShape, WeightStats
    from bifrost.config_loader import load_config
    from bifrost.tee.runtime import TrustedRuntime
    from bifrost_kernels import backend as nb

    cfg = load_config().replace(model=model, backend="native", ckks=None)
    rt = TrustedRuntime(cfg, None)
    params = rt.params
    be = nb.NativeBackend()
    keys = be.keygen(params)
    ev = be.evaluator(keys.public_context())
    groups = []
    for g in rt.groups:
        mats = [rt.weights[n] for n in g]
        groups.append((GroupShape(mats[0].shape[1], tuple(m.shape[0] for m in mats)), [WeightStats.of(m) for m in mats]))
    t0 = time.perf_counter()
    for shape, stats in groups:  # the check vectors and v = rᵀM of every group (what prepare adds)
        keys._check_vectors(shape, keys._codec.blocking(shape, 1), keys._matrices(shape, stats))
    setup_s = time.perf_counter() - t0
    memory = sum(nb.check_table_bytes(params, shape) for shape, _ in groups)
    for shape, stats in groups:
        keys._mask_products(shape, keys._codec.blocking(shape, 1), keys._matrices(shape, stats))

    rng = np.random.default_rng(0)

    def per_call(shape, stats, rows):
        prepared = ev.prepare(shape, [s.matrix for s in stats])
        x = rng.normal(size=(rows, shape.d_in))
        crit, side, parse = [], [], []
        for _ in range(repeats):
            batch = keys.encrypt(shape, x, stats)
            out = ev.apply(prepared, batch.ciphertexts)
            batch.state.check_term.result()  # ready, as after a worker's round trip
            t1 = time.perf_counter()  # what the background thread spent on it, timed again here
            keys._check_term(shape, batch.state.blocking, keys._matrices(shape, stats), batch.state.c0)
            t2 = time.perf_counter()
            keys._read_outputs(shape, out, batch.state)  # the reply's parse, which decrypt needed before and reuses
            t3 = time.perf_counter()
            if not keys.verify(shape, out, batch, stats):
                raise SystemExit(f"{model}: an honest reply failed the exact check")
            crit.append(time.perf_counter() - t3)
            side.append(t2 - t1)
            parse.append(t3 - t2)
        return statistics.median(crit), statistics.median(side), statistics.median(parse)

    k, bits = nb.check_vector_plan(tuple(keys._codec.primes))
    decode = [per_call(shape, stats, 1) for shape, stats in groups]
    widest = max(groups, key=lambda g: g[0].d_in * sum(g[0].d_outs))
    prefill = per_call(*widest, 64)[:2]
    return {"model": model, "groups": len(groups), "params": str(params),
            "check_vectors": (k, bits), "miss_probability_log2": -k * bits,
            "setup_s_per_replica": setup_s, "memory_bytes_per_replica": memory,
            "decode_check_ms_per_token": 1e3 * sum(c for c, _, _ in decode),
            "decode_background_ms_per_token": 1e3 * sum(s for _, s, _ in decode),
            "decode_parse_ms_per_token": 1e3 * sum(p for _, _, p in decode),
            "prefill64_widest_group": str(widest[0]), "prefill64_check_ms": 1e3 * prefill[0],
            "prefill64_background_ms": 1e3 * prefill[1]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["gpt2", "smollm2-135m-instruct", "qwen3-0.6b"])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default="benchmarks/results/exact_check.json")
    args = ap.parse_args()

    from rich.console import Console
    from rich.table import Table

    rows = [measure(m, args.repeats) for m in args.models]
    table = Table(title="native exact check (trusted side; one process)", title_justify="left")
    for col in ("model", "k × S bits", "per replica: set-up", "memory", "decode: check ms/token",
                "background ms/token", "parse ms/token", "64-row call: check / background ms"):
        table.add_column(col, justify="right")
    for r in rows:
        k, s = r["check_vectors"]
        table.add_row(r["model"], f"{k} × {s} (miss ≤ 2^{r['miss_probability_log2']})", f"{r['setup_s_per_replica']:.2f} s",
                      f"{r['memory_bytes_per_replica'] / 2**20:.0f} MiB", f"{r['decode_check_ms_per_token']:.1f}",
                      f"{r['decode_background_ms_per_token']:.1f}", f"{r['decode_parse_ms_per_token']:.1f}",
                      f"{r['prefill64_check_ms']:.1f} / {r['prefill64_background_ms']:.1f}")
    Console().print(table)
    write_report(args.out, {"models": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
