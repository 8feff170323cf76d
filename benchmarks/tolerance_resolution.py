"""The resolution of TenSEAL's tolerance check under real decode activations: τ/‖y‖ per row and member.

With the TenSEAL backend a reply is not exact, so the TEE accepts a decoded product ŷ (rows × d_out) when its
Freivalds-style residuals stay under τ_r = z·√d_out·ε_r (``bifrost/tee/verify.py``; ε_r the backend's effective
error bound, ``TenSEALTrustedContext.error_bound(effective=True)``; plus a float64 rounding slack, recorded
separately). A worker deviation δ with ‖δ‖₂ well under τ passes undetected, so τ/‖y_r‖₂ (y_r the true product
row x_r·Wᵀ, from the trusted weights) is the check's *resolution*: the smallest relative change of a layer's
output it reliably sees. This runs a few ``bifrost+`` decode steps (the prompt is prefilled in the TEE, so every
CKKS call is a one-row decode call) through a real in-process TenSEAL worker, wraps the engine's
``ProductVerifier.check`` to record τ_r, ‖y_r‖ and the honest error ‖ŷ_r − y_r‖ of every (row, member), and
reports the distribution of τ/‖y‖ per model, overall and per layer role (attention qkv / attention out /
FFN up-gate / FFN down). Zero rows (padding) are skipped. Deviations must be 0 (an honest worker).

Usage: ``python benchmarks/tolerance_resolution.py [--models gpt2-mini gpt2 smollm2-135m-instruct]
[--tokens 3] [--out benchmarks/results/tolerance_resolution.json]`` (from the repository root: the in-process
worker lives in tests/workers.py). ``qwen3-0.6b`` is supported too (slower).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from _report import write_report  # noqa: E402 - benchmarks/ is on sys.path when run as a script

PROMPT = "What is the capital of France?"
CHAT_MODELS = ("smollm2", "qwen3")  # rendered in their chat template, generation ending at end-of-turn
ROLES = ("attn_qkv", "attn_out", "ffn_up", "ffn_down", "other")
_ROLE_KEYS = (  # first match wins: substrings of a layer's name
    ("attn_out", ("attn.c_proj", "o_proj", "out_proj", "attention.output.dense")),
    ("ffn_down", ("mlp.c_proj", "down_proj", "fc2", "output.dense")),
    ("attn_qkv", ("c_attn", "q_proj", "k_proj", "v_proj", "qkv", "query", "key", "value")),
    ("ffn_up", ("c_fc", "up_proj", "gate_proj", "fc1", "intermediate.dense")),
)


def role_of(name: str) -> str:
    for role, keys in _ROLE_KEYS:
        if any(k in name for k in keys):
            return role
    return "other"


def _pct(values: np.ndarray, q: float) -> float:
    return float(np.percentile(values, q)) if values.size else math.nan


def summarize(ratios: list[float]) -> dict:
    a = np.asarray(ratios, dtype=np.float64)
    if not a.size:
        return {"count": 0}
    return {"count": int(a.size), "median": float(np.median(a)), "p10": _pct(a, 10), "p90": _pct(a, 90),
            "min": float(a.min()), "max": float(a.max())}


class Recorder:
    """Wraps ``engine.verifier.check``: calls the original, then records τ, ‖y‖ and the honest error per row and
    member (τ exactly as the verifier forms it from ``check_bounds``; its float64 slack kept apart)."""

    def __init__(self, engine) -> None:
        self.engine, self.verifier = engine, engine.verifier
        self.original = self.verifier.check
        self.records: list[dict] = []
        self.failed = 0
        self.verifier.check = self.check

    def check(self, group, x, ys, bounds, x_check=None, check_bounds=None):
        result = self.original(group, x, ys, bounds, x_check, check_bounds)
        self.failed += int(not result.ok)
        z = self.verifier.cfg.z
        x = np.asarray(x, dtype=np.float64)
        xc = x if x_check is None else np.asarray(x_check, dtype=np.float64)
        cb = bounds if check_bounds is None else check_bounds
        members = self.verifier._members[group]
        for m, (name, w, mem, y_hat) in enumerate(zip(group, self.engine._weights[group], members, ys)):
            y_ref = x @ w.T
            y_hat = np.asarray(y_hat, dtype=np.float64)
            d_out = w.shape[0]
            gamma = (max(mem.d_in, mem.d_out) + 2) * 2.0 ** -53
            slack = 4 * gamma * (np.abs(y_hat) @ mem.S_abs.T + np.abs(xc) @ mem.U_abs.T)  # [rows, k]
            for r in range(len(x)):
                y_norm = float(np.linalg.norm(y_ref[r]))
                if y_norm == 0.0:
                    continue  # a padding row
                tau = z * math.sqrt(d_out) * float(cb[r, m])
                self.records.append({
                    "layer": name, "role": role_of(name), "d_out": d_out, "tau": tau, "y_norm": y_norm,
                    "ratio": tau / y_norm, "slack_over_tau": float(slack[r].max()) / tau if tau else math.inf,
                    "err_norm": float(np.linalg.norm(y_hat[r] - y_ref[r])), "eps": float(cb[r, m]),
                })
        return result


def run_model(base, model: str, tokens: int) -> dict:
    from bifrost.tee.runtime import TrustedRuntime
    from tests.workers import start_worker

    t0 = time.perf_counter()
    cfg = base.replace(model=model, backend="tenseal", ckks=None)
    _, server, endpoint = start_worker(cfg, model)  # the same cfg: the worker accepts the model's parameters
    rt = None
    try:
        rt = TrustedRuntime(cfg, endpoint)
        setup_s = time.perf_counter() - t0
        print(f"  {model}: runtime + worker ready in {setup_s:.1f}s; generating {tokens} token(s)", flush=True)
        rec = Recorder(rt.engine)
        chat = any(k in model for k in CHAT_MODELS)
        prompt = PROMPT
        if chat:
            from bifrost.model.tokenizer import chat_prompt

            prompt = chat_prompt(rt.tokenizer, PROMPT)
        t1 = time.perf_counter()
        result = rt.generate(prompt, tokens, mode="bifrost+", stop_at_eos=chat)
        gen_s = time.perf_counter() - t1
        stats = rt.engine.stats
        params = rt.engine.params
    finally:
        if rt is not None:
            rt.close()
        server.stop(grace=None)
    recs = rec.records
    ratios = [r["ratio"] for r in recs]
    med = statistics.median(ratios) if ratios else math.nan
    by_role = {role: summarize([r["ratio"] for r in recs if r["role"] == role]) for role in ROLES}
    by_role = {k: v for k, v in by_role.items() if v["count"]}
    layers = sorted({r["layer"] for r in recs})
    return {
        "model": model, "tokens_requested": tokens, "tokens_generated": len(result.tokens), "text": result.text,
        "ckks": {"poly_modulus_degree": params.poly_modulus_degree, "scale_bits": params.scale_bits},
        "z": rt.engine.verifier.cfg.z, "vectors": rt.engine.verifier.cfg.vectors,
        "calls": stats.calls, "checks_recorded": len(recs), "comparisons": stats.checks,
        "deviations": stats.deviations, "failed_checks": rec.failed, "local_calls": stats.local_calls,
        "tau_over_y": summarize(ratios), "tau_over_y_by_role": by_role,
        "delta_0p1_tau_pct_of_y_at_median": 100 * 0.1 * med,
        "honest_err_over_y": summarize([r["err_norm"] / r["y_norm"] for r in recs]),
        "honest_err_over_tau": summarize([r["err_norm"] / r["tau"] for r in recs]),
        "max_slack_over_tau": max((r["slack_over_tau"] for r in recs), default=math.nan),
        "layer_roles": {n: role_of(n) for n in layers},
        "setup_s": setup_s, "generate_s": gen_s, "wall_s": time.perf_counter() - t0,
    }


def _fmt(s: dict) -> str:
    if not s.get("count"):
        return "-"
    return f"{s['median']:.3g} ({s['p10']:.3g}–{s['p90']:.3g})"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["gpt2-mini", "gpt2", "smollm2-135m-instruct"],
                    help="catalogue models (default: gpt2-mini gpt2 smollm2-135m-instruct; qwen3-0.6b is slower)")
    ap.add_argument("--tokens", type=int, default=3, help="new tokens per model, all decode steps (default 3)")
    ap.add_argument("--out", default="benchmarks/results/tolerance_resolution.json")
    args = ap.parse_args()

    from rich.console import Console
    from rich.table import Table

    from bifrost.config_loader import load_config

    base = load_config()
    report = {"backend": "tenseal", "mode": "bifrost+", "prompt": PROMPT, "tokens": args.tokens, "models": []}
    for model in args.models:
        print(f"[{model}] starting", flush=True)
        res = run_model(base, model, args.tokens)
        report["models"].append(res)
        print(f"[{model}] done in {res['wall_s']:.1f}s (generate {res['generate_s']:.1f}s): "
              f"{res['checks_recorded']} checks, median τ/‖y‖ {res['tau_over_y'].get('median', math.nan):.3g}, "
              f"deviations {res['deviations']}", flush=True)
        write_report(args.out, report)  # after every model: a partial report survives an interrupted run

    table = Table(title="TenSEAL tolerance resolution τ/‖y‖ per (row, member): median (p10–p90), decode steps",
                  title_justify="left")
    for col in ("model", "overall", "min / max", *ROLES[:4], "checks", "dev.", "0.1τ as % ‖y‖", "err/τ max", "s"):
        table.add_column(col)
    for res in report["models"]:
        o, roles = res["tau_over_y"], res["tau_over_y_by_role"]
        table.add_row(res["model"], _fmt(o), f"{o.get('min', math.nan):.3g} / {o.get('max', math.nan):.3g}",
                      *(_fmt(roles.get(r, {})) for r in ROLES[:4]), str(res["checks_recorded"]),
                      str(res["deviations"]), f"{res['delta_0p1_tau_pct_of_y_at_median']:.3g}%",
                      f"{res['honest_err_over_tau'].get('max', math.nan):.2g}", f"{res['wall_s']:.0f}")
    Console(width=220).print(table)
    write_report(args.out, report)
    return 1 if any(r["deviations"] for r in report["models"]) else 0


if __name__ == "__main__":
    raise SystemExit(main())
