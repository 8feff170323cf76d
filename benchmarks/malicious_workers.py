"""What a malicious worker achieves and observes: every attack of tests/adversary.py against a real trusted
runtime (gpt2-mini; native backend unless named TenSEAL), reported as a table and JSON.

Per attack: the check that caught it (the quarantine reason), whether the tokens equal plaintext, whether
the worker's view (every request's method, worker session, layer group and byte sizes; for TenSEAL the counts,
its zstd-compressed sizes vary at random) equals an honest run's, and the one thing it might measure:
the gap between its reply to the detected call and the next request, against the same gap in an honest
run and the honest gaps' spread. Then the half-space yes/no pair: the two answers' views compared.

Usage: ``python benchmarks/malicious_workers.py [--out benchmarks/results/malicious_workers.json]`` (from
the repository root: the attacks live in tests/adversary.py).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


from _report import write_report  # noqa: E402 - benchmarks/ is on sys.path when run as a script


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/malicious_workers.json")
    args = ap.parse_args()

    from rich.console import Console
    from rich.table import Table

    from bifrost.config_loader import load_config
    from tests import adversary as adv

    cfg = load_config()
    honest, rows = {}, []

    def baseline(sc):
        key = (str(sc.prompt), sc.backend, sc.new_tokens)
        if key not in honest:
            honest[key] = adv.run_attack(cfg, adv.MODEL, None, sc.prompt, sc.backend, sc.new_tokens)
        return honest[key]

    def view(out, sizes):
        return out.observed if sizes else [(o.method, o.worker_session, o.group, len(o.sizes)) for o in out.observed]

    for sc in adv.CATALOG:
        base = baseline(sc)
        out = adv.run_attack(cfg, adv.MODEL, sc.make(), sc.prompt, sc.backend, sc.new_tokens)
        first = out.deviated[0] if out.deviated else None
        gaps, base_gaps = out.gaps(), base.gaps()
        row = {
            "attack": sc.name, "backend": sc.backend, "deviating_calls": out.deviated,
            "caught_by": [v["reason"] for v in out.quarantined.values()],
            "tokens_equal_plaintext": out.tokens == out.plaintext == base.tokens,
            "view_equals_honest": view(out, sc.backend != "tenseal") == view(base, sc.backend != "tenseal"),
            "requests_seen": len(out.observed), "calls_recomputed_in_tee": out.local_calls,
            "gap_after_detection_ms": gaps[first] * 1e3 if first is not None and first < len(gaps) else None,
            "honest_gap_same_call_ms": base_gaps[first] * 1e3 if first is not None and first < len(base_gaps) else None,
            "honest_gap_median_ms": statistics.median(base_gaps) * 1e3,
            "honest_gap_stdev_ms": statistics.pstdev(base_gaps) * 1e3,
            "local_recompute_ms_total": out.local_s * 1e3,
        }
        rows.append(row)
        print(f"{sc.name}: caught by {row['caught_by']}, tokens ok {row['tokens_equal_plaintext']}, "
              f"view = honest {row['view_equals_honest']}", flush=True)

    yes, no = adv.yes_no_directions(cfg)
    when = adv.on_layer(adv.C_FC0, 0)
    out_yes = adv.run_attack(cfg, adv.MODEL, adv.half_space_probe(when, yes, 16), adv.SHORT)
    out_no = adv.run_attack(cfg, adv.MODEL, adv.half_space_probe(when, no, 16), adv.SHORT)
    pair = {"yes_caught": bool(out_yes.quarantined), "no_caught": bool(out_no.quarantined),
            "views_identical": out_yes.observed == out_no.observed == baseline(adv.CATALOG[0]).observed,
            "tokens_equal_plaintext": out_yes.tokens == out_no.tokens == out_yes.plaintext}

    table = Table(title="Malicious workers against the trusted runtime (gpt2-mini)")
    for col in ("attack", "caught by", "tokens = plaintext", "worker's view = honest", "gap after detection ms",
                "honest gap ms (same call)", "honest gaps median ± sd ms"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["attack"], "; ".join(r["caught_by"]) or "NOT CAUGHT", str(r["tokens_equal_plaintext"]),
                      str(r["view_equals_honest"]),
                      f"{r['gap_after_detection_ms']:.1f}" if r["gap_after_detection_ms"] is not None else "-",
                      f"{r['honest_gap_same_call_ms']:.1f}" if r["honest_gap_same_call_ms"] is not None else "-",
                      f"{r['honest_gap_median_ms']:.1f} ± {r['honest_gap_stdev_ms']:.1f}")
    Console(width=200).print(table)
    print(f"half-space query, yes vs no: caught {pair['yes_caught']} / {pair['no_caught']}, worker's views "
          f"identical (and equal to an honest run's): {pair['views_identical']}, tokens = plaintext: "
          f"{pair['tokens_equal_plaintext']}")
    write_report(args.out, {"attacks": rows,
                                          "half_space_yes_no": pair})
    return 0


if __name__ == "__main__":
    sys.exit(main())
