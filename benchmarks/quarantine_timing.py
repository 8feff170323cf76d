"""What a caught worker can still observe: the timing of the calls after its quarantine.

A quarantined worker keeps receiving every request an honest run sends (same sessions, sizes, order), but the
TEE discards its replies and computes each product itself. What may differ is *when* the next request leaves:
the gap between a reply and the next request. This runs the same generation alternately against an honest
worker and against one that deviates once (a +1 in one residue, native; a constant on one slot, TenSEAL) on the
first decode step's first call and is honest afterwards, and compares the reply → next-request gaps of every
later layer call with the same calls of the honest runs (median, mean, p90, Mann-Whitney U). With the native
backend the verdict does not depend on the plaintext (exact check), so a visible quarantine tells the worker
only what it did; with TenSEAL a tolerance verdict can depend on it (at most one bit per identity).

Usage: ``python benchmarks/quarantine_timing.py [--runs 2] [--tokens 12] [--out benchmarks/results/quarantine_timing.json]``
(from the repository root: the attacks live in tests/adversary.py). Writes JSON and a plot beside it.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from _report import write_report  # noqa: E402 - benchmarks/ is on sys.path when run as a script

CASES = (("native", "gpt2"), ("tenseal", "gpt2-mini"))


def _summary(gaps: list[float]) -> dict:
    ms = sorted(g * 1e3 for g in gaps)
    return {"count": len(ms), "median_ms": statistics.median(ms), "mean_ms": statistics.fmean(ms),
            "p90_ms": ms[int(0.9 * (len(ms) - 1))]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=2, help="honest/caught pairs per case, interleaved (default 2)")
    ap.add_argument("--tokens", type=int, default=12, help="new tokens per run (default 12)")
    ap.add_argument("--out", default="benchmarks/results/quarantine_timing.json")
    args = ap.parse_args()

    from rich.console import Console
    from rich.table import Table
    from scipy.stats import mannwhitneyu

    from bifrost.config_loader import load_config
    from tests import adversary as adv

    cfg = load_config()
    prompt = adv.SHORT
    report, rows = {"tokens": args.tokens, "runs": args.runs, "prompt": prompt, "cases": []}, []
    for backend, model in CASES:
        when = adv.on_layer("transformer.h.0.attn.c_attn", 1)  # the first call of the first decode step
        deviate = adv.one_residue(when) if backend == "native" else adv.tenseal_constant(when, 0.05)

        honest_gaps, caught_gaps, detected_at, tokens_ok = [], [], [], True
        for _ in range(args.runs):
            out = adv.run_attack(cfg, model, deviate, prompt, backend, args.tokens)
            base = adv.run_attack(cfg, model, None, prompt, backend, args.tokens)
            if not out.quarantined or not out.deviated:
                raise SystemExit(f"{backend}: the deviation was not caught ({out.deviated}, {out.quarantined})")
            tokens_ok &= out.tokens == out.plaintext == base.tokens
            first = out.deviated[0]
            detected_at.append(first)
            # gap k follows reply k: compare every gap after the detected call's, position by position
            caught_gaps += out.gaps()[first + 1:]
            honest_gaps += base.gaps()[first + 1:]
        test = mannwhitneyu(caught_gaps, honest_gaps, alternative="two-sided")
        case = {"backend": backend, "model": model, "detected_at_call": detected_at, "tokens_equal_plaintext": tokens_ok,
                "honest": _summary(honest_gaps), "quarantined": _summary(caught_gaps),
                "mann_whitney_p": float(test.pvalue), "honest_gaps_ms": [g * 1e3 for g in honest_gaps],
                "quarantined_gaps_ms": [g * 1e3 for g in caught_gaps]}
        report["cases"].append(case)
        rows.append(case)

    table = Table(title="reply → next request, every layer call after the detected one (ms)", title_justify="left")
    for col in ("backend · model", "gaps", "honest median / mean / p90", "quarantined median / mean / p90",
                "Mann-Whitney p", "tokens = plaintext"):
        table.add_column(col, justify="right")
    for c in rows:
        h, q = c["honest"], c["quarantined"]
        table.add_row(f"{c['backend']} · {c['model']}", str(h["count"]),
                      f"{h['median_ms']:.1f} / {h['mean_ms']:.1f} / {h['p90_ms']:.1f}",
                      f"{q['median_ms']:.1f} / {q['mean_ms']:.1f} / {q['p90_ms']:.1f}",
                      f"{c['mann_whitney_p']:.2g}", str(c["tokens_equal_plaintext"]))
    Console().print(table)
    write_report(args.out, report)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(rows), figsize=(6 * len(rows), 4))
    for ax, c in zip(axes, rows):
        top = max(max(c["honest_gaps_ms"]), max(c["quarantined_gaps_ms"]))
        bins = [top * i / 40 for i in range(41)]
        ax.hist(c["honest_gaps_ms"], bins=bins, alpha=0.6, label="honest worker")
        ax.hist(c["quarantined_gaps_ms"], bins=bins, alpha=0.6, label="quarantined worker")
        ax.set_title(f"{c['backend']} · {c['model']}: p = {c['mann_whitney_p']:.2g}")
        ax.set_xlabel("reply → next request (ms)")
        ax.legend()
    fig.tight_layout()
    png = str(Path(args.out).with_suffix(".png"))
    fig.savefig(png, dpi=100)
    print(f"wrote {png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
