"""The third seed's claim, measured: ``tee-only`` serving (the whole model in the trusted runtime, over the
attested channel) against plain PyTorch generation of the same model, same prompt, same tokens.

For each repeat, in one run and interleaved (plain, served, plain, served, ...):
- **plain**: ``model(...)`` with a KV cache in this process: TTFT = the prompt's forward pass + greedy pick;
  TPOT = the mean of the following steps;
- **served**: ``bifrost serve``'s stack in this process (``runtime: local`` by default; ``--runtime ray``
  adds the Ray actor hop), policy ``tee-only`` (no CKKS worker), simulated evidence; a client that attested
  once sends the prompt sealed and times the sealed token stream: TTFT = request sent → first token
  received, TPOT = mean gap after it (ChatResult). Attestation (once per session) is reported apart.

Tokens must be identical (greedy). Output: a table, and JSON in benchmarks/results/tee_only_overhead.json.

What this machine can and cannot show: there is no TEE here. The figures are the overhead of Bifrost's
software path (attested channel, gRPC, sealing and padding of records, the replica's step loop) over a
bare forward loop on the same CPU. They do not include what a confidential VM itself costs (memory
encryption, VM exits, bounce buffers for I/O), which only TDX / SEV-SNP hardware can measure.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def plain_generation(model, ids: list[int], n_new: int) -> tuple[list[int], float, float]:
    """(tokens, TTFT s, TPOT s) of greedy decoding with a KV cache."""
    tokens, gaps = [], []
    with torch.no_grad():
        t0 = time.perf_counter()
        out = model(input_ids=torch.tensor([ids]), use_cache=True)
        tokens.append(int(torch.argmax(out.logits[0, -1])))
        ttft = time.perf_counter() - t0
        past = out.cache
        for _ in range(n_new - 1):
            t = time.perf_counter()
            out = model(input_ids=torch.tensor([[tokens[-1]]]), cache=past, use_cache=True)
            past = out.cache
            tokens.append(int(torch.argmax(out.logits[0, -1])))
            gaps.append(time.perf_counter() - t)
    return tokens, ttft, statistics.fmean(gaps) if gaps else 0.0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gpt2")
    ap.add_argument("--prompt", default="Confidential inference runs the whole model inside the TEE, and")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--runtime", choices=("local", "ray"), default="local")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/tee_only_overhead.json"))
    args = ap.parse_args()

    import tempfile

    from rich.console import Console
    from rich.table import Table

    from bifrost.attest.policy import AttestationPolicy
    from bifrost.config_loader import load_config
    from bifrost.model.catalog import load_model, resolve
    from bifrost.model.tokenizer import load_tokenizer
    from bifrost.serve.client import BifrostClient
    from bifrost.serve.config import load_serve_config
    from bifrost.tee.deploy import ServeApp

    cfg = load_config().replace(model=args.model, policy="tee-only")
    spec = resolve(args.model)
    ids = load_tokenizer(spec.path).encode(args.prompt)
    model = load_model(spec, cfg.seed)
    run_root = tempfile.mkdtemp(prefix="tee-only-", dir=str(ROOT / "runs") if (ROOT / "runs").is_dir() else None)
    scfg = load_serve_config().replace(runtime=args.runtime, port=0, evidence_provider="simulated", run_dir=run_root,
                                       max_new_tokens=max(args.new_tokens, 1), max_prompt_tokens=max(len(ids), 1),
                                       workers=(), worker_certs=(), replicas=1)
    app = ServeApp(cfg, scfg).start()
    rows = {"plain": [], "served": []}
    try:
        policy = AttestationPolicy(allow_simulated=True, model_digests=(app.service.info.model_digest,))
        with BifrostClient(f"127.0.0.1:{app.port}", policy, timeout_s=600) as client:
            t0 = time.perf_counter()
            client.attest()
            attest_s = time.perf_counter() - t0
            client.chat(args.prompt, 2, reset_history=True)  # warm-up (both paths)
            plain_generation(model, ids, 2)
            for r in range(args.repeats):
                tokens, ttft, tpot = plain_generation(model, ids, args.new_tokens)
                rows["plain"].append({"ttft_s": ttft, "tpot_s": tpot, "tokens": tokens})
                res = client.chat(args.prompt, args.new_tokens, reset_history=True)
                rows["served"].append({"ttft_s": res.ttft_s, "tpot_s": res.tpot_s, "tokens": res.tokens})
                print(f"repeat {r + 1}/{args.repeats}: plain TTFT {ttft * 1e3:.1f} ms TPOT {tpot * 1e3:.2f} ms; "
                      f"served TTFT {res.ttft_s * 1e3:.1f} ms TPOT {res.tpot_s * 1e3:.2f} ms", file=sys.stderr)
    finally:
        app.stop()
    same = all(p["tokens"] == s["tokens"] for p, s in zip(rows["plain"], rows["served"]))
    med = {k: {m: statistics.median(x[m] for x in v) for m in ("ttft_s", "tpot_s")} for k, v in rows.items()}
    overhead = {m: 100.0 * (med["served"][m] / med["plain"][m] - 1.0) for m in ("ttft_s", "tpot_s")}
    report = {"model": args.model, "prompt_tokens": len(ids), "new_tokens": args.new_tokens, "repeats": args.repeats,
              "runtime": args.runtime, "tokens_identical": same, "attest_s": attest_s, "median": med,
              "overhead_percent": {"ttft": overhead["ttft_s"], "tpot": overhead["tpot_s"]},
              "runs": rows, "threads": torch.get_num_threads(),
              "note": "no TEE hardware here: software-path overhead only (see the module docstring)"}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    table = Table(title=f"tee-only serving vs plain PyTorch: {args.model}, {len(ids)}-token prompt, "
                        f"{args.new_tokens} new tokens, median of {args.repeats} ({args.runtime} runtime)")
    for col in ("", "plain PyTorch", "tee-only served", "overhead"):
        table.add_column(col)
    table.add_row("TTFT", f"{med['plain']['ttft_s'] * 1e3:.1f} ms", f"{med['served']['ttft_s'] * 1e3:.1f} ms",
                  f"{overhead['ttft_s']:+.1f} %")
    table.add_row("TPOT", f"{med['plain']['tpot_s'] * 1e3:.2f} ms", f"{med['served']['tpot_s'] * 1e3:.2f} ms",
                  f"{overhead['tpot_s']:+.1f} %")
    Console().print(table)
    print(f"tokens identical: {same}; attestation (once per session): {attest_s * 1e3:.0f} ms; JSON: {args.out}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
