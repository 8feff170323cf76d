"""Architecture table: tiny random checkpoints of many Hugging Face decoders through a local worker.

For every architecture the installed transformers has (Mistral, Phi, Phi-3, GPT-NeoX, Gemma 1/2/3,
Falcon, OPT, GPT-J, BLOOM, StableLM, OLMo, and the catalog's GPT-2, LLaMA, Qwen3), a checkpoint of
``tests/checkpoints.py`` (2 blocks, hidden 64, vocabulary 512, fixed seed, float32) is written with
``save_pretrained`` and run as a user's ``--model DIR`` would be: a local CKKS worker process
(``LocalWorker``, mutual TLS) serving that directory and a ``TrustedRuntime`` with the plaintext model
as reference. Bifrost has no code for any of them: the module swap is generic.

Per architecture: the linear modules inside the transformer blocks (from the model's structure), the
delegated ones, worker calls per decoded token (fused siblings share a call) and how many delegated
layers actually reached the worker (from the engine's per-group call counts), greedy tokens equal to an
independent plaintext decode (x/N), max |logit error|, the smallest plaintext top-1 margin, and a note.

BLOOM is also run as pretrained with tensor parallelism (``pretraining_tp=2, slow_but_exact=True``):
there the model multiplies by ``self_attention.dense.weight`` and ``mlp.dense_4h_to_h.weight`` itself,
so those delegated layers never call their module and never reach the worker (their products are
computed in the TEE from the trusted weight copy: same tokens, less offloaded). The table reports it.

Not a test (no assertions). Usage, from the repository root:
``python benchmarks/architectures.py [--steps 16] [--backend native] [--out benchmarks/results/architectures.json]``
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from _report import write_report  # noqa: E402 - benchmarks/ is on sys.path when run as a script

LABELS = {
    "mistral": "Mistral", "phi": "Phi", "phi3": "Phi-3", "gpt_neox": "GPT-NeoX", "gemma": "Gemma",
    "gemma2": "Gemma 2", "gemma3_text": "Gemma 3 (text)", "falcon": "Falcon", "opt": "OPT", "gptj": "GPT-J",
    "bloom": "BLOOM", "bloom_tp2": "BLOOM tp=2 slow_but_exact", "stablelm": "StableLM", "olmo": "OLMo",
    "gpt2": "GPT-2", "llama": "LLaMA", "qwen3": "Qwen3",
}


def run_one(name: str, root: Path, base, steps: int, prompt: str) -> dict:
    from bifrost.tee.runtime import TrustedRuntime, trusted_identity
    from bifrost.worker.launcher import LocalWorker
    from tests.checkpoints import ARCHITECTURES, block_linears, build_checkpoint

    model_type, kwargs = ARCHITECTURES[name]
    row = {"arch": name, "label": LABELS.get(name, name), "model_type": model_type,
           "config_variant": {k: kwargs[k] for k in ("pretraining_tp", "slow_but_exact") if k in kwargs}}
    path = str(build_checkpoint(name, root))
    cfg = base.replace(model=path)
    t0 = time.perf_counter()
    with LocalWorker(path, cfg.seed, [trusted_identity(cfg).cert_pem]) as worker:
        rt = TrustedRuntime(cfg, worker.endpoint, reference=True)
        try:
            res = rt.generate(prompt, steps)
            stats = rt.engine.stats
        finally:
            rt.close()
    f = res.fidelity
    block = block_linears(rt.reference)
    reached = sorted({n for g, s in stats.groups.items() if s.calls for n in g})
    delegated = [s.name for s in rt.sites]
    decode_calls = [t.calls for t in res.timings[1:]] or [res.timings[0].calls]
    row.update({
        "model_class": type(rt.reference).__name__, "block_linears": len(block), "delegated_layers": len(delegated),
        "every_block_linear_delegated": delegated == block, "layer_groups": len(rt.groups),
        "worker_calls_per_token": sum(decode_calls) / len(decode_calls),
        "delegated_layers_reaching_worker": len(reached),
        "never_reach_worker": [n for n in delegated if n not in reached],
        "steps": f.steps, "agreeing_steps": f.agreeing_steps, "identical_tokens": res.tokens == f.plaintext_tokens,
        "max_abs_logit_error": f.max_abs_logit_error, "min_top1_margin": f.min_top1_margin,
        "deviations": stats.deviations, "calls_recomputed_in_tee": stats.local_calls,
        "wall_s": time.perf_counter() - t0,
    })
    row["note"] = _note(row)
    return row


def _note(r: dict) -> str:
    notes = []
    if r["never_reach_worker"]:
        leaves = sorted({n.rsplit(".", 1)[-1] for n in r["never_reach_worker"]})
        notes.append(f"{len(r['never_reach_worker'])}/{r['delegated_layers']} delegated layers never reach the worker "
                     f"({', '.join(leaves)}: the model uses .weight directly; computed in the TEE)")
    if not r["every_block_linear_delegated"]:
        notes.append("delegated layers differ from the block linears")
    if r["deviations"]:
        notes.append(f"{r['deviations']} deviating replies")
    if r["min_top1_margin"] < 2 * r["max_abs_logit_error"]:
        notes.append("a top-1 margin under 2x the max logit error: tokens could have flipped")
    if not r["never_reach_worker"]:
        notes.insert(0, f"fused: {r['delegated_layers']} layers in {r['layer_groups']} calls"
                     if r["layer_groups"] < r["delegated_layers"] else "one call per layer (no siblings to fuse)")
    return "; ".join(notes)


def main() -> int:
    from tests.checkpoints import ARCHITECTURES, supported

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--archs", nargs="+", default=list(ARCHITECTURES), choices=list(ARCHITECTURES))
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--backend", default="native")
    ap.add_argument("--prompt", default="Private LLM")
    ap.add_argument("--out", default="benchmarks/results/architectures.json")
    args = ap.parse_args()
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import transformers
    from rich.console import Console
    from rich.table import Table

    from bifrost.config_loader import load_config

    from bifrost.errors import BifrostError

    base = load_config().replace(backend=args.backend)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bifrost-archs-") as tmp:
        for name in args.archs:
            if not supported(name):
                rows.append({"arch": name, "label": LABELS.get(name, name), "model_type": ARCHITECTURES[name][0],
                             "note": f"not in transformers {transformers.__version__}"})
                continue
            try:
                rows.append(run_one(name, Path(tmp), base, args.steps, args.prompt))
            except BifrostError as exc:  # refused at load, in one line (e.g. layers the model code bypasses)
                rows.append({"arch": name, "label": LABELS.get(name, name), "model_type": ARCHITECTURES[name][0],
                             "note": f"refused at load: {exc}"})
            except Exception as exc:  # a failing architecture is a row of the table, not the end of the run
                rows.append({"arch": name, "label": LABELS.get(name, name), "model_type": ARCHITECTURES[name][0],
                             "note": f"FAILED: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"})
            print(f"{name}: {rows[-1]['note']}", flush=True)

    t = Table(title=f"Architectures from local checkpoints · backend {args.backend} · {args.steps} greedy steps · "
                    f"transformers {transformers.__version__}")
    for col in ("arch", "delegated layers", "worker calls / token", "reach worker", "tokens = plaintext",
                "max |logit err|", "min top-1 margin", "note"):
        t.add_column(col, justify="left" if col in ("arch", "note") else "right")
    for r in rows:
        if "steps" not in r:
            t.add_row(r["label"], "", "", "", "", "", "", r["note"])
            continue
        t.add_row(r["label"], f"{r['delegated_layers']}/{r['block_linears']}", f"{r['worker_calls_per_token']:g}",
                  f"{r['delegated_layers_reaching_worker']}/{r['delegated_layers']}",
                  f"{r['agreeing_steps']}/{r['steps']}" + ("" if r["identical_tokens"] else " DIFFER"),
                  f"{r['max_abs_logit_error']:.1e}", f"{r['min_top1_margin']:.1e}", r["note"])
    Console(width=200).print(t)
    write_report(args.out, {"backend": args.backend, "steps": args.steps, "prompt": args.prompt,
                            "transformers": transformers.__version__,
                            "checkpoint": "tests/checkpoints.py: 2 blocks, hidden 64, vocabulary 512, seed 0, float32",
                            "architectures": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
