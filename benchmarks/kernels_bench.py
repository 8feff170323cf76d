"""Benchmark of the native CKKS kernels (``bifrost_kernels``) vs the TenSEAL backend — not a test.

One run on one machine reports, per layer shape (rows = 1, i.e. one decode step):
worker latency (``Evaluator.apply``), trusted-side encrypt/decrypt time, the TEE's check of the reply
(``verify``, as the engine runs it on every call: native, the exact check ``ExactTrustedContext.verify``;
TenSEAL, the backend's error bound + the range/Freivalds check of :mod:`bifrost.tee.verify`), bytes sent (inputs) and received (outputs), max error vs float64 relative
to the closed-form bound 2^-B·‖x‖₁·max|W| (``err/bound``) and to the backend's worst-case bound
``TrustedContext.error_bound`` (``err/ε``), and the same shapes through the repo's TenSEAL backend;
plus plain TenSEAL ``CKKSVector.mm`` on 768×768, the NTT reference product, prefill of a 768×2304 layer at
32/64 rows (one call; the engine splits longer prompts into calls of 64 rows), and
per-token projections for GPT-2 124M and Qwen3-0.6B. Right after the native shapes it runs
``openfhe_bsgs.py`` (OpenFHE hoisted baby-step/giant-step, 768×768) under the separate OpenFHE venv that
``make bench-kernels`` creates, and reports the measured ratio; without that venv the report says why the
baseline was skipped.

    .venv/bin/python benchmarks/kernels_bench.py [--repeats 7] [--skip-tenseal] [--json out.json]
                                                 [--openfhe-python benchmarks/.venv-openfhe/bin/python]

Prints one JSON document, then a rich table. Timings are medians (seconds) over ``--repeats``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

# Passive OpenMP waiting: on a shared, oversubscribed CPU busy-waiting threads slow torch ops by 10-50×.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bifrost.ckks import CKKSParams, GroupShape, WeightStats  # noqa: E402
from bifrost.ckks.registry import get_backend  # noqa: E402
from bifrost.ckks import ExactTrustedContext  # noqa: E402
from bifrost.tee.verify import ProductVerifier  # noqa: E402

SHAPES = [(768, 768), (768, 2304), (768, 3072), (3072, 768), (1024, 2048), (1024, 3072), (3072, 1024)]
# Per-layer groups as a decode step delegates them (members sharing an input form one group).
GPT2_LAYER = [GroupShape(768, (2304,)), GroupShape(768, (768,)), GroupShape(768, (3072,)), GroupShape(3072, (768,))]
GPT2_LAYERS = 12
QWEN3_LAYER = [GroupShape(1024, (2048, 1024, 1024)), GroupShape(2048, (1024,)), GroupShape(1024, (3072, 3072)),
               GroupShape(3072, (1024,))]
QWEN3_LAYERS = 28
PREFILL_ROWS = (32, 64)
OPENFHE_SCRIPT = Path(__file__).with_name("openfhe_bsgs.py")
OPENFHE_PYTHON = Path(__file__).with_name(".venv-openfhe") / "bin" / "python"  # made by `make bench-kernels`
OPENFHE_SHAPES = ("768x768",)
OPENFHE_LAYOUTS = ("packed", "plain")  # the ratio is against "packed" (the faster); "plain" = textbook BSGS


def activations(rng: np.random.Generator, rows: int, d_in: int) -> np.ndarray:
    x = rng.normal(0, 1, (rows, d_in))
    x[:, rng.choice(d_in, 3, replace=False)] = rng.uniform(150, 400, (rows, 3))  # GPT-2-like outliers
    return x


def median_time(fn, repeats: int, best: list | None = None):
    """Median wall time of ``fn`` over ``repeats`` calls (the minimum is appended to ``best``)."""
    result, times = None, []
    for _ in range(repeats):
        t = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t)
    if best is not None:
        best.append(min(times))
    return statistics.median(times), result


def measure(ctx, ev, shape: GroupShape, rows: int, repeats: int, seed: int = 0, weight_bits: int | None = None) -> dict:
    rng = np.random.default_rng(seed)
    ws = [rng.normal(0, 0.05, (d, shape.d_in)) for d in shape.d_outs]
    stats = [WeightStats.of(w) for w in ws]  # the trusted side's statistics of its own weights
    x = activations(rng, rows, shape.d_in)
    t = time.perf_counter()
    prepared = ev.prepare(shape, ws)
    prepare_s = time.perf_counter() - t
    t = time.perf_counter()
    ctx.prepare(shape, stats)                           # the trusted side's mask products (once per group)
    trusted_prepare_s = time.perf_counter() - t
    batch = ctx.encrypt(shape, x)                       # warm-up (allocations, FFT plans)
    out = ev.apply(prepared, batch.ciphertexts)
    ctx.decrypt(shape, out, batch, stats)
    best: list[float] = []
    enc_s, batch = median_time(lambda: ctx.encrypt(shape, x), repeats, best)
    ready = []  # encrypt as the engine runs it: the masks prepared ahead while the previous call was out
    for _ in range(repeats):
        ctx.prefetch(shape, rows)
        for pending in list(getattr(ctx, "_masks", {}).values()):
            pending.result()
        t = time.perf_counter()
        ctx.encrypt(shape, x)
        ready.append(time.perf_counter() - t)
    apply_s, out = median_time(lambda: ev.apply(prepared, batch.ciphertexts), repeats, best)
    dec_s, ys = median_time(lambda: ctx.decrypt(shape, out, batch, stats), repeats, best)
    # The TEE's check of the reply (as the engine runs it). Exact backends (native): Freivalds mod each prime on the
    # reply, its side of what was sent (v·c_0) ready from the background thread, the parse shared with decrypt.
    # Tolerance backends: the backend's error bound, then range + Freivalds with the default secret vectors (drawn
    # once per session, not timed here).
    if isinstance(ctx, ExactTrustedContext):
        vbatch = ctx.encrypt(shape, x, stats)
        vout = ev.apply(prepared, vbatch.ciphertexts)
        ctx.decrypt(shape, vout, vbatch, stats)  # parses the reply, as the engine does before verifying
        vbatch.state.check_term.result()
        verify_s, passed = median_time(lambda: ctx.verify(shape, vout, vbatch, stats), repeats, best)
        worst = None
    else:
        verifier = ProductVerifier({("group",): ws})
        verify = lambda: verifier.check(("group",), x, ys, ctx.error_bound(shape, batch, stats))  # noqa: E731
        verify_s, checked = median_time(verify, repeats, best)
        passed, worst = checked.ok, checked.worst
    eps = ctx.error_bound(shape, batch, stats)  # rows × members
    err = max(float(np.abs(y - x @ w.T).max()) for y, w in zip(ys, ws))
    row = {
        "shape": f"{shape.d_in}x{'+'.join(map(str, shape.d_outs))}", "rows": rows,
        "worker_apply_s": apply_s, "encrypt_s": enc_s, "encrypt_prefetched_s": statistics.median(ready),
        "decrypt_s": dec_s, "verify_s": verify_s, "prepare_s": prepare_s, "trusted_prepare_s": trusted_prepare_s,
        "best_worker_apply_s": best[1], "best_encrypt_s": best[0], "best_decrypt_s": best[2], "best_verify_s": best[3],
        "ciphertexts_in": len(batch.ciphertexts), "ciphertexts_out": sum(map(len, out)),
        "bytes_sent": sum(map(len, batch.ciphertexts)), "bytes_received": sum(len(c) for o in out for c in o),
        "max_abs_error": err,
        # error over the backend's worst-case bound per output (TrustedContext.error_bound: what the TEE's
        # range and product checks are sized by); the check's worst |s·ŷ − u·x| / tolerance (≤ 1 passes)
        "error_over_error_bound": max(float((np.abs(y - x @ w.T) / eps[:, [m]]).max())
                                      for m, (y, w) in enumerate(zip(ys, ws))),
        "verify_passed": passed, "verify_worst_over_tolerance": worst,
    }
    if weight_bits is not None:  # the closed form 2^-B·‖x_r‖₁·max|W| (B = weight bits), as recorded before
        bound = max(float((2.0 ** -weight_bits * np.abs(x).sum(1) * np.abs(w).max()).min()) for w in ws)
        row["error_over_bound"] = err / bound
    return row


def shape_rows(ctx, ev, repeats: int, shapes=SHAPES) -> list[dict]:
    """:func:`measure` of one decode row (rows = 1) through each single-layer shape (d_in, d_out) of ``shapes``."""
    return [measure(ctx, ev, GroupShape(i, (o,)), 1, repeats, k, ev.weight_bits) for k, (i, o) in enumerate(shapes)]


def group_rows(ctx, ev, repeats: int, groups=QWEN3_LAYER) -> list[dict]:
    """:func:`measure` of one decode row through each layer group of ``groups`` (default: a Qwen3-0.6B block)."""
    return [measure(ctx, ev, g, 1, repeats, 100 + k, ev.weight_bits) for k, g in enumerate(groups)]


def plain_tenseal_mm(repeats: int = 1) -> float:
    import tenseal as ts

    ctx = ts.context(ts.SCHEME_TYPE.CKKS, poly_modulus_degree=8192, coeff_mod_bit_sizes=[60, 40, 60])
    ctx.global_scale = 2 ** 40
    ctx.generate_galois_keys()
    rng = np.random.default_rng(0)
    w, x = rng.normal(0, 0.05, (768, 768)), rng.normal(0, 1, 768)
    vec = ts.ckks_vector(ctx, x.tolist())
    wt = w.T.tolist()
    s, _ = median_time(lambda: vec.mm(wt), repeats)
    return s


def openfhe_baseline(python: str | None, repeats: int, threads: int = 0, shapes=OPENFHE_SHAPES,
                     layouts=OPENFHE_LAYOUTS, timeout_s: float = 1800) -> dict:
    """Run ``openfhe_bsgs.py`` on ``shapes`` under ``python`` (the OpenFHE venv's interpreter).

    Returns its JSON report, or ``{"skipped": reason}`` when there is no interpreter, it fails, or its
    product misses its error bound (then the report is kept under ``"report"``). Never raises.
    """
    if not python:
        return {"skipped": f"no OpenFHE venv at {OPENFHE_PYTHON} (`make bench-kernels` creates it from a "
                           "Python 3.10/3.12: PYTHON310=...) and no --openfhe-python given"}
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    cmd = [python, str(OPENFHE_SCRIPT), "--repeats", str(repeats), "--shapes", *shapes, "--layouts", *layouts]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env)
    except (OSError, subprocess.SubprocessError) as exc:
        return {"skipped": f"cannot run {python}: {type(exc).__name__}: {exc}"}
    lines = proc.stderr.strip().splitlines()
    why = lines[-1] if lines else "no message"
    try:
        report = json.loads(proc.stdout)
    except ValueError:
        return {"skipped": f"{OPENFHE_SCRIPT.name} under {python} exited {proc.returncode}: {why}"}
    if proc.returncode != 0:
        return {"skipped": f"{OPENFHE_SCRIPT.name} exited {proc.returncode}: {why}", "report": report}
    return report


def project(rows: list[dict], layers: int) -> dict:
    return {
        "worker_s": layers * sum(r["worker_apply_s"] for r in rows),
        "trusted_encrypt_decrypt_s": layers * sum(r["encrypt_s"] + r["decrypt_s"] for r in rows),
        "trusted_critical_path_s": layers * sum(r["encrypt_prefetched_s"] + r["decrypt_s"] for r in rows),
        "trusted_verify_s": layers * sum(r["verify_s"] for r in rows),
        "bytes": layers * sum(r["bytes_sent"] + r["bytes_received"] for r in rows),
        "wire_s_at_300MBps": layers * sum(r["bytes_sent"] + r["bytes_received"] for r in rows) / 300e6,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--skip-tenseal", action="store_true")
    ap.add_argument("--json", help="also write the JSON report here")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch default)")
    ap.add_argument("--openfhe-python", default=str(OPENFHE_PYTHON) if OPENFHE_PYTHON.exists() else None,
                    help=f"interpreter with openfhe for the OpenFHE baseline (default: {OPENFHE_PYTHON} if present)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    native = get_backend("native")
    ctx = native.keygen(native.default_params, [])
    ev = native.evaluator(ctx.public_context())
    report = {
        "machine": {"platform": platform.platform(), "cpu_threads": torch.get_num_threads(),
                    "load_average_1min_at_start": os.getloadavg()[0],
                    "device": str(ev.device), "torch": torch.__version__},
        "native_params": {"N": native.default_params.poly_modulus_degree,
                          "coeff_mod_bit_sizes": list(native.default_params.coeff_mod_bit_sizes),
                          "scale_bits": native.default_params.scale_bits, "weight_bits": ev.weight_bits},
        "native": shape_rows(ctx, ev, args.repeats),
    }
    by_shape = {r["shape"]: r for r in report["native"]}
    report["openfhe_bsgs"] = openfhe_baseline(args.openfhe_python, args.repeats, args.threads)
    ofhe = {(r["shape"], r["layout"]): r for r in report["openfhe_bsgs"].get("results", [])}
    if ("768x768", "packed") in ofhe:
        o768, n768 = ofhe["768x768", "packed"], by_shape["768x768"]
        report["openfhe_bsgs_768x768_s"] = o768["product_s"]
        report["speedup_768x768_vs_openfhe_bsgs"] = o768["product_s"] / n768["worker_apply_s"]
        report["speedup_768x768_vs_openfhe_bsgs_best"] = o768["best_product_s"] / n768["best_worker_apply_s"]
    if ("768x768", "plain") in ofhe:
        report["openfhe_bsgs_plain_768x768_s"] = ofhe["768x768", "plain"]["product_s"]
    gpt2 = [by_shape[f"{g.d_in}x{g.d_outs[0]}"] for g in GPT2_LAYER]
    qwen = group_rows(ctx, ev, args.repeats)
    report["qwen3_groups"] = qwen
    report["gpt2_124m_per_token"] = project(gpt2, GPT2_LAYERS)
    report["qwen3_0.6b_per_token"] = project(qwen, QWEN3_LAYERS)

    ntt_ev = native.evaluator(ctx.public_context(), polymul="ntt")
    ntt_row = measure(ctx, ntt_ev, GroupShape(768, (768,)), 1, max(2, args.repeats // 3))
    report["ntt_engine_768x768_apply_s"] = ntt_row["worker_apply_s"]
    # Prefill: one row per ciphertext, one call of up to ROWS_PER_FFT_CALL rows.
    report["prefill_768x2304"] = []
    for rows in PREFILL_ROWS:
        row = measure(ctx, ev, GroupShape(768, (2304,)), rows, max(2, args.repeats // 3), 7, ev.weight_bits)
        report["prefill_768x2304"].append(row)

    if not args.skip_tenseal:
        try:
            tenseal = get_backend("tenseal")
            tparams = CKKSParams()
            shapes = [GroupShape(i, (o,)) for i, o in SHAPES]
            tctx = tenseal.keygen(tparams, shapes)
            tev = tenseal.evaluator(tctx.public_context())
            report["tenseal_params"] = {"N": tparams.poly_modulus_degree,
                                        "coeff_mod_bit_sizes": list(tparams.coeff_mod_bit_sizes)}
            report["tenseal"] = [measure(tctx, tev, s, 1, 1, k) for k, s in enumerate(shapes)]
        except Exception as exc:  # the benchmark still reports the native numbers
            report["tenseal_error"] = f"{type(exc).__name__}: {exc}"
        report["plain_tenseal_mm_768x768_s"] = plain_tenseal_mm()
        n768 = by_shape["768x768"]["worker_apply_s"]
        report["speedup_768x768_vs_plain_tenseal_mm"] = report["plain_tenseal_mm_768x768_s"] / n768
        if "tenseal" in report:
            report["speedup_768x768_vs_tenseal_backend"] = report["tenseal"][0]["worker_apply_s"] / n768

    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    _table(report)
    return 0


def _table(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    ms = lambda s: f"{1e3 * s:.1f}"  # noqa: E731
    kb = lambda b: f"{b / 1024:.0f}"  # noqa: E731
    t = Table(title=f"native CKKS kernels, rows=1 ({report['machine']['device']}, "
                    f"{report['machine']['cpu_threads']} threads); median ms (best), KiB")
    for col in ("shape", "worker", "encrypt (masks ready)", "decrypt", "verify", "cts in/out", "sent", "recv", "err/bound",
                "err/ε",
                "TenSEAL worker", "TenSEAL enc+dec", "TenSEAL sent+recv", "× TenSEAL"):
        t.add_column(col, justify="right")
    tens = {r["shape"]: r for r in report.get("tenseal", [])}
    for r in report["native"] + report["qwen3_groups"] + report["prefill_768x2304"]:
        tr = tens.get(r["shape"]) if r["rows"] == 1 else None
        t.add_row(r["shape"] + ("" if r["rows"] == 1 else f" ×{r['rows']} rows"),
                  f"{ms(r['worker_apply_s'])} ({ms(r['best_worker_apply_s'])})",
                  f"{ms(r['encrypt_s'])} ({ms(r['encrypt_prefetched_s'])})", ms(r["decrypt_s"]), ms(r["verify_s"]) + ("" if r["verify_passed"] else " FAIL"),
                  f"{r['ciphertexts_in']}/{r['ciphertexts_out']}", kb(r["bytes_sent"]), kb(r["bytes_received"]),
                  f"{r.get('error_over_bound', float('nan')):.2f}", f"{r['error_over_error_bound']:.3f}",
                  ms(tr["worker_apply_s"]) if tr else "", ms(tr["encrypt_s"] + tr["decrypt_s"]) if tr else "",
                  kb(tr["bytes_sent"] + tr["bytes_received"]) if tr else "",
                  f"{tr['worker_apply_s'] / r['worker_apply_s']:.0f}" if tr else "")
    console = Console(width=200)
    console.print(t)
    for name in ("gpt2_124m_per_token", "qwen3_0.6b_per_token"):
        p = report[name]
        console.print(f"{name}: worker {p['worker_s']:.2f} s, trusted enc+dec {p['trusted_encrypt_decrypt_s']:.2f} s "
                      f"({p['trusted_critical_path_s']:.2f} s with masks ready), "
                      f"verify {p['trusted_verify_s']:.3f} s, "
                      f"wire {p['bytes'] / 1e6:.1f} MB (≈{p['wire_s_at_300MBps']:.2f} s at 300 MB/s)")
    extra = [f"NTT product 768x768 worker {ms(report['ntt_engine_768x768_apply_s'])} ms"]
    if "speedup_768x768_vs_openfhe_bsgs" in report:
        extra.append(f"OpenFHE hoisted BSGS 768x768 {ms(report['openfhe_bsgs_768x768_s'])} ms "
                     f"(×{report['speedup_768x768_vs_openfhe_bsgs']:.1f}; best vs best "
                     f"×{report['speedup_768x768_vs_openfhe_bsgs_best']:.1f})")
    if "openfhe_bsgs_plain_768x768_s" in report:
        extra.append(f"OpenFHE textbook BSGS (1 diagonal/multiply) {ms(report['openfhe_bsgs_plain_768x768_s'])} ms")
    if "skipped" in report["openfhe_bsgs"]:
        extra.append(f"OpenFHE baseline skipped: {report['openfhe_bsgs']['skipped']}")
    if "plain_tenseal_mm_768x768_s" in report:
        extra.append(f"plain TenSEAL mm 768x768 {report['plain_tenseal_mm_768x768_s']:.2f} s "
                     f"(×{report['speedup_768x768_vs_plain_tenseal_mm']:.0f})")
    if "tenseal_error" in report:
        extra.append(f"TenSEAL backend failed: {report['tenseal_error']}")
    console.print("; ".join(extra))


if __name__ == "__main__":
    sys.exit(main())
