"""This build against another checkout of Bifrost, in one run: decode time per component, TTFT and bytes.

Runs ``bifrost demo --json --no-compare`` (GPT-2 124M, native backend, one local worker, the 11-token
prompt "Private LLM" padded to 12 rows, 8 new tokens by default) alternately from each checkout (A B A B …)
so both see the same machine load, and prints the per-component means with their ratio this/other. The
other checkout is any directory holding the repository at the revision to compare with, e.g.
``git worktree add /tmp/before HEAD~3``. Each side imports its own ``bifrost``, ``bifrost_kernels`` and
``bifrost_estimator`` (a temporary folder of links puts the latter two on its path).

Usage: ``python benchmarks/ab_decode.py --other /tmp/before [--runs 2] [--tokens 8] [--model gpt2]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import link_packages, write_report  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
COMPONENTS = ("nonlinear_s", "encrypt_s", "transfer_s", "worker_s", "decrypt_s", "verify_s")


def _path_for(checkout: Path, links: Path) -> str:
    """PYTHONPATH that makes ``checkout`` the imported build: its packages linked under their installed names."""
    return os.pathsep.join([str(checkout), str(link_packages(checkout, links))])


def _demo(checkout: Path, pythonpath: str, args) -> dict:
    cmd = [sys.executable, "-m", "bifrost.cli", "demo", "--model", args.model, "--prompt", args.prompt,
           "--max-new-tokens", str(args.tokens), "--no-compare", "--json"]
    env = dict(os.environ, PYTHONPATH=pythonpath)
    r = subprocess.run(cmd, cwd=checkout, env=env, capture_output=True, text=True, timeout=1800)
    if r.returncode != 0:
        raise SystemExit(f"ab_decode: the demo failed in {checkout}: {r.stderr.strip().splitlines()[-1:]}")
    rep = json.loads(r.stdout)
    decode = rep["per_token"][1:]
    out = {"ttft_s": rep["time_to_first_token_s"], "decode_s": rep["decode_s_per_token_mean"],
           "mb_sent": rep["decode_bytes_per_token"]["sent"] / 1e6,
           "mb_received": rep["decode_bytes_per_token"]["received"] / 1e6, "tokens": rep["tokens"]}
    out.update({k: statistics.fmean(t[k] for t in decode) for k in COMPONENTS})
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--other", required=True, help="checkout of the build to compare with")
    ap.add_argument("--runs", type=int, default=2, help="demo runs per build, interleaved")
    ap.add_argument("--tokens", type=int, default=8)
    ap.add_argument("--model", default="gpt2")
    ap.add_argument("--prompt", default="Private LLM")
    ap.add_argument("--out", default="benchmarks/results/ab_decode.json")
    args = ap.parse_args()
    other = Path(args.other).resolve()
    if not (other / "bifrost" / "cli.py").is_file():
        print(f"ab_decode: error: {other} is not a Bifrost checkout", file=sys.stderr)
        return 2
    builds = {"this": ROOT, "other": other}
    runs: dict[str, list[dict]] = {k: [] for k in builds}
    with tempfile.TemporaryDirectory() as tmp:
        paths = {k: _path_for(v, Path(tmp) / k) for k, v in builds.items()}
        for i in range(args.runs):
            for k in ("other", "this") if i % 2 == 0 else ("this", "other"):
                runs[k].append(_demo(builds[k], paths[k], args))
                print(f"run {i + 1}/{args.runs} {k}: {runs[k][-1]['decode_s']:.3f} s/token", flush=True)
    keys = ("decode_s", *COMPONENTS, "ttft_s", "mb_sent", "mb_received")
    mean = {k: {m: statistics.fmean(r[m] for r in v) for m in keys} for k, v in runs.items()}
    same_tokens = all(r["tokens"] == runs["this"][0]["tokens"] for v in runs.values() for r in v)
    write_report(args.out, {"model": args.model, "prompt": args.prompt, "tokens": args.tokens, "runs": runs,
                            "mean": mean, "ratio_this_over_other": {m: mean["this"][m] / mean["other"][m]
                                                                    if mean["other"][m] else None for m in keys},
                            "same_tokens": same_tokens, "other": str(other)})
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"{args.model}: this build vs {other} · {args.runs} interleaved runs each · "
                    f"tokens identical across runs: {same_tokens}")
    for col in ("per token", "other", "this", "this/other"):
        t.add_column(col, justify="right")
    for m in keys:
        a, b = mean["other"][m], mean["this"][m]
        unit = "MB" if m.startswith("mb") else "s"
        t.add_row(m.removesuffix("_s"), f"{a:.3f} {unit}", f"{b:.3f} {unit}", f"{b / a:.2f}" if a else "-")
    Console(width=120).print(t)
    return 0


if __name__ == "__main__":
    sys.exit(main())
