"""Bifrost vs Bifrost+ vs plaintext: time to first token (TTFT) and time per output token (TPOT).

For each model and prompt length, in one run on one machine:
- ``plaintext``: the same PyTorch model with no delegation (prefill + decode on this CPU);
- ``bifrost``: the prompt goes through the hybrid CKKS path (a layer group's prompt rows in calls of 64
  rows), then decode steps do too;
- ``bifrost+``: the prompt's KV state is built inside the trusted runtime in plaintext; decode steps use
  the hybrid path.
A local worker (loopback gRPC, pinned-key mutual TLS) serves the delegated layers; every delegated
product is verified in the TEE (``ttft_verify_s`` / ``tpot_verify_s``: that time, part of TTFT / TPOT).
Prompts are fixed pseudo-random token ids (public benchmark input). Tokens of every mode are compared
with plaintext greedy decoding.

Writes JSON (``--out``) and a PNG plot (``--plot``), prints a table with the Bifrost/Bifrost+ TTFT ratio.
Usage: ``python benchmarks/ttft.py [--models gpt2 qwen3-0.6b] [--lengths 16 64 128 256 512] [--new-tokens 4]``
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _plaintext(model, ids, n_new):
    import torch

    past, step, tokens, times = None, torch.tensor([ids]), [], []
    with torch.no_grad():
        for _ in range(n_new):
            t0 = time.perf_counter()
            out = model(input_ids=step, cache=past, use_cache=True)
            tok = int(torch.argmax(out.logits[0, -1]))
            times.append(time.perf_counter() - t0)
            tokens.append(tok)
            past, step = out.cache, torch.tensor([[tok]])
    return tokens, times


def run(models, lengths, n_new, backend, log, lengths_for=None, checkpoint=None, done=()) -> dict:
    """Measure every (model, length); ``checkpoint(result)`` is called after each row (partial results
    survive an interrupted sweep), and rows already in ``done`` are kept rather than re-measured."""
    import numpy as np

    from bifrost.config_loader import load_config
    from bifrost.model.catalog import load_model, resolve
    from bifrost.tee.runtime import TrustedRuntime, trusted_identity
    from bifrost.worker.launcher import LocalWorker

    rows = list(done)
    measured = {(r["model"], r["prompt_tokens"]) for r in rows}
    for model_name in models:
        todo = [L for L in (lengths_for or {}).get(model_name, lengths) if (model_name, L) not in measured]
        if not todo:
            continue
        cfg = load_config().replace(model=model_name, backend=backend)
        plain = load_model(resolve(model_name), cfg.seed)
        vocab = plain.config.vocab_size
        with LocalWorker(model_name, cfg.seed, [trusted_identity(cfg).cert_pem]) as worker:
            rt = TrustedRuntime(cfg, worker.endpoint)
            log(f"{model_name}: session ready (setup {rt.setup_s:.1f} s, weights encoded in {rt.engine.prepare_seconds:.1f} s)")
            for L in todo:
                ids = np.random.default_rng(L).integers(256, vocab, size=L).tolist()
                ref_tokens, ref_times = _plaintext(plain, ids, n_new)
                row = {"model": model_name, "prompt_tokens": L, "new_tokens": n_new,
                       "plaintext": {"ttft_s": ref_times[0], "tpot_s": statistics.fmean(ref_times[1:] or ref_times)}}
                for mode in ("bifrost+", "bifrost"):
                    t0 = time.perf_counter()
                    res = rt.generate(ids, n_new, mode=mode)
                    t = res.timings
                    row[mode] = {"ttft_s": t[0].total_s, "tpot_s": statistics.fmean(x.total_s for x in t[1:] or t),
                                 "ttft_bytes": t[0].bytes_sent + t[0].bytes_received,
                                 "ttft_worker_s": t[0].worker_s,
                                 "ttft_trusted_crypto_s": t[0].encrypt_s + t[0].decrypt_s,
                                 "ttft_verify_s": t[0].verify_s,
                                 "tpot_verify_s": statistics.fmean(x.verify_s for x in t[1:] or t),
                                 "deviations": sum(x.deviations for x in t),
                                 "tokens_equal_plaintext": res.tokens == ref_tokens, "wall_s": time.perf_counter() - t0}
                row["ttft_ratio_bifrost_over_bifrost_plus"] = row["bifrost"]["ttft_s"] / row["bifrost+"]["ttft_s"]
                rows.append(row)
                if checkpoint:
                    checkpoint({"backend": backend, "cpu_count": os.cpu_count(), "rows": rows})
                log(f"{model_name} L={L}: TTFT plaintext {row['plaintext']['ttft_s']:.3f} s, bifrost+ "
                    f"{row['bifrost+']['ttft_s']:.2f} s, bifrost {row['bifrost']['ttft_s']:.1f} s "
                    f"(ratio {row['ttft_ratio_bifrost_over_bifrost_plus']:.1f}x)")
            rt.close()
        del plain
    order = {m: i for i, m in enumerate(models)}
    rows.sort(key=lambda r: (order.get(r["model"], len(order)), r["prompt_tokens"]))
    return {"backend": backend, "cpu_count": os.cpu_count(), "rows": rows}


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r["model"] for r in result["rows"]}, key=[r["model"] for r in result["rows"]].index)
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.5), squeeze=False)
    for ax, model in zip(axes[0], models):
        rows = sorted((r for r in result["rows"] if r["model"] == model), key=lambda r: r["prompt_tokens"])
        L = [r["prompt_tokens"] for r in rows]
        for mode, style in (("bifrost", "o-"), ("bifrost+", "s-"), ("plaintext", "^--")):
            ax.plot(L, [r[mode]["ttft_s"] for r in rows], style, label=mode)
        for r in rows:
            ax.annotate(f"{r['ttft_ratio_bifrost_over_bifrost_plus']:.0f}×", (r["prompt_tokens"], r["bifrost"]["ttft_s"]),
                        textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("prompt tokens")
        ax.set_ylabel("time to first token (s)")
        ax.set_title(f"{model} · backend {result['backend']}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["gpt2", "qwen3-0.6b"])
    ap.add_argument("--lengths", nargs="+", type=int, default=[16, 64, 128, 256, 512])
    ap.add_argument("--lengths-for", action="append", default=[], metavar="MODEL=L1,L2",
                    help="prompt lengths for one model (e.g. qwen3-0.6b=16,64,128 when the full sweep would take hours)")
    ap.add_argument("--resume", action="store_true", help="keep the rows already in --out, measure the rest")
    ap.add_argument("--new-tokens", type=int, default=4)
    ap.add_argument("--backend", default="native")
    ap.add_argument("--out", default="benchmarks/results/ttft.json")
    ap.add_argument("--plot", default="benchmarks/results/ttft.png")
    args = ap.parse_args()
    if args.new_tokens < 2 or any(L < 1 for L in args.lengths):
        raise SystemExit("ttft.py: need --new-tokens >= 2 and positive --lengths")

    from rich.console import Console
    from rich.table import Table

    console = Console(stderr=True)
    try:
        lengths_for = {k: [int(x) for x in v.split(",")] for k, v in (s.split("=", 1) for s in args.lengths_for)}
    except ValueError:
        raise SystemExit("ttft.py: --lengths-for takes MODEL=L1,L2,...") from None
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = []
    if args.resume and out.exists():
        previous = json.loads(out.read_text())
        if previous.get("backend") != args.backend:
            raise SystemExit(f"ttft.py: {out} holds backend {previous.get('backend')!r} results, not {args.backend!r}")
        done = previous["rows"]

    def checkpoint(partial: dict) -> None:
        out.write_text(json.dumps(partial, indent=2))
        plot(partial, args.plot)

    result = run(args.models, args.lengths, args.new_tokens, args.backend,
                 lambda m: console.print(f"[dim]{m}[/dim]"), lengths_for, checkpoint, done)
    checkpoint(result)
    nan = float("nan")
    table = Table(title=f"TTFT / TPOT · backend {result['backend']} · one run, one machine")
    for col in ("model", "prompt", "plaintext TTFT", "bifrost+ TTFT", "bifrost TTFT", "bifrost/bifrost+",
                "TPOT plain", "TPOT bifrost+", "TPOT bifrost", "bifrost verify TTFT/TPOT", "tokens = plaintext"):
        table.add_column(col, justify="right")
    for r in result["rows"]:
        same = all(r[m]["tokens_equal_plaintext"] for m in ("bifrost", "bifrost+"))
        deviations = sum(r[m].get("deviations", 0) for m in ("bifrost", "bifrost+"))
        table.add_row(r["model"], str(r["prompt_tokens"]), f"{r['plaintext']['ttft_s']:.3f} s",
                      f"{r['bifrost+']['ttft_s']:.2f} s", f"{r['bifrost']['ttft_s']:.1f} s",
                      f"{r['ttft_ratio_bifrost_over_bifrost_plus']:.1f}×", f"{r['plaintext']['tpot_s'] * 1e3:.0f} ms",
                      f"{r['bifrost+']['tpot_s']:.2f} s", f"{r['bifrost']['tpot_s']:.2f} s",
                      f"{r['bifrost'].get('ttft_verify_s', nan) * 1e3:.1f} / "  # rows of --resume may predate it
                      f"{r['bifrost'].get('tpot_verify_s', nan) * 1e3:.1f} ms",
                      ("yes" if same else "NO") + (f" ({deviations} deviations)" if deviations else ""))
    Console(width=180).print(table)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
