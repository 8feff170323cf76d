"""``bifrost demo`` / ``bifrost generate`` / ``bifrost embed``: the trusted runtime from the command line.

With no worker address configured, a local worker process is started on 127.0.0.1 (the embedded
default) and stopped at exit.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys

from ..config import MODES
from ..config_loader import placement_of


DEMO_MODEL = "smollm2-135m-instruct"  # real SmolLM2-135M-Instruct (configs/models.yaml); --model or --config overrides
DEMO_PROMPT = "What is the capital of France?"
DEMO_NEW_TOKENS = 12


def add_parser(sub: argparse._SubParsersAction) -> None:
    def common(p):
        p.add_argument("--config", help="run config YAML (default: configs/default.yaml)")
        p.add_argument("--model", help="model name (configs/models.yaml) or local checkpoint directory")
        p.add_argument("--backend", help="CKKS backend name")
        p.add_argument("--worker", help="host:port of a running worker (default: start one on loopback)")
        p.add_argument("--worker-cert", help="that worker's certificate (PEM), pinned (default: worker.cert)")
        p.add_argument("--identity", help="folder of this trusted runtime's TLS key + certificate, created if missing "
                                          "(default: tee.identity; none: a fresh one per run, for local workers); "
                                          "a remote worker must trust <folder>/cert.pem")
        p.add_argument("--seed", type=int, help="seed of random-init named models")
        p.add_argument("--policy", help="placement policy: " + ", ".join(_policy_names()) + ", or a YAML path "
                                        "(default: the config's policy)")
        p.add_argument("--adapter", help="a LoRA adapter directory (peft) on top of the model, run in the TEE")
        p.add_argument("--json", action="store_true", help="print a JSON report instead of tables")

    for name, helptext in (("demo", "encrypted generation on the embedded default, compared with plaintext"),
                           ("generate", "generate text through the hybrid TEE-CKKS path")):
        p = sub.add_parser(name, help=helptext)
        common(p)
        p.add_argument("--prompt", help="prompt text")
        p.add_argument("--max-new-tokens", type=int)
        p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
        p.add_argument("--mode", choices=MODES,
                       help="bifrost: the prompt through CKKS too; bifrost+: the prompt prefilled in the TEE, only "
                            "decode steps delegated (default: the config's, bifrost)")
        p.add_argument("--no-compare", dest="compare", action="store_false", default=(name == "demo"),
                       help="skip the plaintext comparison")
        if name == "generate":
            p.add_argument("--compare", dest="compare", action="store_true", help="compare with plaintext inference")
            p.add_argument("--chat", action="store_true", help="send the prompt as a user message in the model's "
                                                               "chat template (when its tokenizer has one)")
            p.set_defaults(func=run_generate)
        else:
            p.add_argument("--no-chat", dest="chat", action="store_false",
                           help="send the prompt as raw text, not as a user message in the model's chat template")
            # without --config: a real pretrained chat model, a question, a short answer (~3.6 s/token on 2 cores)
            p.set_defaults(func=run_generate, chat=True, model_default=DEMO_MODEL, prompt_default=DEMO_PROMPT,
                           max_new_tokens_default=DEMO_NEW_TOKENS)
    p = sub.add_parser("embed", help="sentence embeddings from an encoder with every linear delegated")
    common(p)
    p.add_argument("texts", nargs="+", help="sentences to embed")
    p.add_argument("--compare", action="store_true", help="cosine similarity to plaintext embeddings")
    p.set_defaults(func=run_embed, model_default="minilm")


def _config(args):
    from ..config_loader import load_config
    from ..errors import UserError

    cfg = load_config(args.config)
    changes = {}
    if args.model:
        changes["model"] = args.model
    elif getattr(args, "model_default", None) and (args.func is run_embed or not args.config):
        changes["model"] = args.model_default  # embed: always; demo: unless a --config names the run
    if args.backend:
        changes["backend"] = args.backend
    if args.seed is not None:
        changes["seed"] = args.seed
    if getattr(args, "policy", None):
        changes["policy"] = args.policy
    if getattr(args, "adapter", None):
        changes["adapter"] = args.adapter
    if args.identity:
        import dataclasses

        changes["tee"] = dataclasses.replace(cfg.tee, identity=args.identity)
    cfg = cfg.replace(**changes)
    gen = {}
    demo_defaults = getattr(args, "prompt_default", None) is not None and not args.config
    if getattr(args, "prompt", None) is not None:
        gen["prompt"] = args.prompt
    elif demo_defaults:
        gen["prompt"] = args.prompt_default
    if getattr(args, "max_new_tokens", None) is None and demo_defaults:
        gen["max_new_tokens"] = args.max_new_tokens_default
    elif getattr(args, "max_new_tokens", None) is not None:
        if args.max_new_tokens < 1:
            raise UserError("--max-new-tokens must be at least 1")
        gen["max_new_tokens"] = args.max_new_tokens
    if getattr(args, "sample", False):
        gen["do_sample"] = True
    if getattr(args, "mode", None):
        gen["mode"] = args.mode
    if gen:
        import dataclasses

        cfg = cfg.replace(generation=dataclasses.replace(cfg.generation, **gen))
    from ..ckks.registry import available_backends

    if cfg.backend not in available_backends():
        raise UserError(f"unknown CKKS backend {cfg.backend!r}; known: {available_backends()}")
    from ..model.catalog import resolve

    resolve(cfg.model)  # fail fast (one line) on a bad model name or checkpoint path
    placement_of(cfg)  # and on an unknown or malformed placement policy
    return cfg


def _policy_names() -> list[str]:
    from ..model.placement import policy_names

    return policy_names()


@contextlib.contextmanager
def _worker(cfg, args):
    """The worker endpoint: a running worker (address + pinned certificate), else a local one on loopback
    that trusts this process's TLS identity; None when the placement policy delegates nothing."""
    from ..attest.mtls import WorkerEndpoint

    if placement_of(cfg).delegates_nothing:
        yield None
        return
    from ..errors import UserError

    address = args.worker or cfg.worker.address
    if address:
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            raise UserError(f"worker address {address!r} is not host:port")
        cert = args.worker_cert or cfg.worker.cert
        if not cert:
            raise UserError(f"worker {address}: give its certificate to pin with --worker-cert (or worker.cert)")
        yield WorkerEndpoint.from_files(address, cert)
        return
    from ..tee.runtime import trusted_identity
    from ..worker.launcher import LocalWorker

    with _status(f"starting a local CKKS worker for {cfg.model}"):
        worker = LocalWorker(cfg.model, cfg.seed, [trusted_identity(cfg).cert_pem], config=args.config,
                             policy=cfg.policy).start()
    try:
        yield worker.endpoint
    finally:
        worker.stop()


@contextlib.contextmanager
def _status(message: str):
    from rich.console import Console

    console = Console(stderr=True)
    if console.is_terminal:
        with console.status(message):
            yield
    else:
        console.print(f"[dim]{message}…[/dim]")
        yield


def run_generate(args) -> int:
    from ..tee.runtime import TrustedRuntime

    cfg = _config(args)
    with _worker(cfg, args) as endpoint:
        with _status("generating CKKS keys and opening a worker session (weights are encoded once)"):
            runtime = TrustedRuntime(cfg, endpoint, reference=args.compare)
        prompt = cfg.generation.prompt
        if getattr(args, "chat", False):
            from ..model.tokenizer import chat_prompt

            prompt = chat_prompt(runtime.tokenizer, prompt)
        try:
            result = runtime.generate(prompt, stop_at_eos=getattr(args, "chat", False))
        finally:
            runtime.close()
    report = _generation_report(cfg, runtime, result)
    report["prompt"] = cfg.generation.prompt
    report["chat_template"] = prompt != cfg.generation.prompt
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print_generation(report, result)
    return 0


def _generation_report(cfg, runtime, result) -> dict:
    decode = result.timings[1:] or result.timings
    rep = {
        "model": cfg.model,
        "backend": cfg.backend,
        "mode": cfg.generation.mode,
        "ckks": {"N": runtime.params.poly_modulus_degree, "coeff_mod_bit_sizes": list(runtime.params.coeff_mod_bit_sizes),
                 "scale_bits": runtime.params.scale_bits},
        "delegated_layers": len(runtime.sites),
        "tokenizer": runtime.tokenizer.name,
        "prompt_tokens": len(result.prompt_ids),
        "tokens": result.tokens,
        "text": result.text,
        "finish_reason": result.finish_reason,
        "setup_s": runtime.setup_s,
        "public_context_bytes": runtime.engine.public_context_bytes,
        "time_to_first_token_s": result.timings[0].total_s,
        "decode_s_per_token_mean": statistics.fmean(t.total_s for t in decode),
        "decode_breakdown_mean_s": {k: statistics.fmean(getattr(t, k) for t in decode)
                                    for k in ("nonlinear_s", "encrypt_s", "transfer_s", "worker_s", "decrypt_s",
                                              "verify_s", "local_s")},
        "verification": {"method": "exact" if runtime.engine.exact else "tolerance",
                         "vectors": _check_vectors(runtime), "z": None if runtime.engine.exact else cfg.verification.z,
                         "comparisons": runtime.engine.stats.checks, "deviations": runtime.engine.stats.deviations,
                         "calls_recomputed_in_tee": runtime.engine.stats.local_calls,
                         "quarantined_workers": sorted(runtime.quarantine.entries()),
                         "verify_share_of_decode": statistics.fmean(t.verify_s / t.total_s for t in decode)},
        "decode_bytes_per_token": {"sent": statistics.fmean(t.bytes_sent for t in decode),
                                   "received": statistics.fmean(t.bytes_received for t in decode)},
        "per_token": [dict(vars(t), nonlinear_s=t.nonlinear_s) for t in result.timings],
    }
    if result.fidelity is not None:
        f = result.fidelity
        rep["fidelity"] = {"steps": f.steps, "agreeing_steps": f.agreeing_steps,
                           "identical_to_plaintext_greedy": result.tokens == f.plaintext_tokens,
                           "max_abs_logit_error": f.max_abs_logit_error, "min_top1_margin": f.min_top1_margin}
    return rep


def _check_vectors(runtime) -> int:
    """Secret vectors per delegated group (exact check) or per weight matrix (tolerance check)."""
    if runtime.engine.exact:
        from bifrost_kernels.backend import check_vector_plan
        from bifrost_kernels.rns import ntt_primes

        p = runtime.params
        return check_vector_plan(ntt_primes(p.poly_modulus_degree, tuple(p.coeff_mod_bit_sizes)))[0]
    return runtime.cfg.verification.vectors


def _print_generation(rep: dict, result) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 140)
    table = Table(title=f"{rep['model']} · {rep['mode']} · backend {rep['backend']} · N={rep['ckks']['N']} · "
                        f"{rep['delegated_layers']} delegated layers", title_justify="left")
    for col in ("#", "token", "total ms", "non-linear", "encrypt", "transfer", "worker", "decrypt", "verify",
                "KB up", "KB down"):
        table.add_column(col, justify="right")
    for t in result.timings:
        label = "prefill" if t.index == 0 else str(t.index)
        table.add_row(label, str(t.token), f"{t.total_s * 1e3:.0f}", f"{t.nonlinear_s * 1e3:.0f}", f"{t.encrypt_s * 1e3:.0f}",
                      f"{t.transfer_s * 1e3:.0f}", f"{t.worker_s * 1e3:.0f}", f"{t.decrypt_s * 1e3:.0f}",
                      f"{t.verify_s * 1e3:.1f}", f"{t.bytes_sent / 1e3:.0f}", f"{t.bytes_received / 1e3:.0f}")
    console.print(table)
    console.print(f"tokenizer: {rep['tokenizer']}")
    if rep.get("chat_template"):
        console.print(f"user: {rep['prompt']}  (in the model's chat template)")
        console.print(f"assistant: {rep['text']}")
    end = "the model's end-of-sequence token" if rep["finish_reason"] == "stop" else "the token limit"
    console.print(f"generated: {rep['text']!r}  ({len(rep['tokens'])} tokens, ended by {end})")
    v = rep["verification"]
    status = (f"[green]all {v['comparisons']} checks passed[/green]" if not v["deviations"] else
              f"[red]{v['deviations']} deviating replies, recomputed in the TEE; quarantined: "
              f"{', '.join(w[:23] for w in v['quarantined_workers'])}[/red]")
    how = (f"exact, {v['vectors']} secret vectors per group, miss ≤ 2^-64" if v["method"] == "exact" else
           f"tolerance, {v['vectors']} secret vectors per matrix, z = {v['z']}")
    console.print(f"verification ({how}): {status}; {v['verify_share_of_decode']:.2%} of decode time")
    console.print(f"time to first token ({rep['prompt_tokens']} prompt tokens): {rep['time_to_first_token_s']:.2f} s · "
                  f"decode: {rep['decode_s_per_token_mean'] * 1e3:.0f} ms/token · setup {rep['setup_s']:.1f} s")
    if "fidelity" in rep:
        f = rep["fidelity"]
        verdict = "[green]identical[/green]" if f["identical_to_plaintext_greedy"] else "[red]DIFFERENT[/red]"
        console.print(f"agreement with plaintext PyTorch: {f['agreeing_steps']}/{f['steps']} steps, tokens {verdict}; "
                      f"max |logit error| = {f['max_abs_logit_error']:.2e} (smallest plaintext top-1 margin "
                      f"{f['min_top1_margin']:.3f})")


def run_embed(args) -> int:
    from ..errors import UserError
    from ..tee.runtime import TrustedRuntime, plaintext_embeddings

    cfg = _config(args)
    from ..model.catalog import resolve

    if resolve(cfg.model).task != "encoder":
        raise UserError(f"{cfg.model} is not an encoder model")
    with _worker(cfg, args) as endpoint:
        runtime = TrustedRuntime(cfg, endpoint)
        try:
            emb = runtime.embed(args.texts)
        finally:
            runtime.close()
    report = {"model": cfg.model, "dims": int(emb.shape[1]), "embeddings": emb.tolist()}
    if args.compare:
        ref = plaintext_embeddings(cfg.model, cfg.seed, args.texts)
        report["cosine_to_plaintext"] = [float(a @ b) for a, b in zip(emb, ref)]
    if args.json:
        print(json.dumps(report))
    else:
        for i, text in enumerate(args.texts):
            extra = f" cos={report['cosine_to_plaintext'][i]:.6f}" if args.compare else ""
            print(f"{text[:40]!r}: {emb.shape[1]} dims{extra}")
    sys.stdout.flush()
    return 0
