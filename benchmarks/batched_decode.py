"""Cross-session batched decode: k concurrent sessions, batched layer calls vs one session at a time.

For each session count k, in one run on one machine with one local worker process (loopback gRPC):
- ``interleaved``: one replica step loop without a batcher: each step runs the sessions' decode passes one after another
  (every layer call is its own worker call) — what ``batch_decode: false`` serves;
- ``batched``: the sessions run their steps concurrently and a :class:`~bifrost.tee.batching.DecodeBatcher`
  merges their layer calls into one ``LinearBatch`` call per layer group — ``batch_decode: true``.
Every session has its own CKKS keys, check vectors and KV cache (every delegated product is verified in
the TEE; ``verify_s`` is that time, summed over the sessions); prompts are prefilled inside the TEE
(Bifrost+) so that the numbers are decode steps. The local worker runs over pinned-key mutual TLS.
Each session's tokens are checked against plaintext greedy decoding; a difference whose first step is a
plaintext near-tie (top-two logits < NEAR_TIE apart, below the CKKS logit error) is reported as such,
any other difference as NO.

A second table isolates the worker: one group's k single-session ``Linear`` calls vs one ``LinearBatch``
of k items (worker compute + transfer, no trusted-side work).

Usage: ``python benchmarks/batched_decode.py [--model gpt2] [--sessions 1 4 8 16] [--new-tokens 4]``
Writes JSON (``--out``) and a PNG plot (``--plot``), prints tables.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


NEAR_TIE = 1e-2  # plaintext top-1/top-2 logit gap below which CKKS noise (≈1e-3 at GPT-2 width) may flip a token


def _plaintext_reference(model, ids, n_new):
    """Plaintext greedy tokens and the top-1/top-2 logit gap at each step."""
    import torch

    past, step, tokens, gaps = None, torch.tensor([ids]), [], []
    with torch.no_grad():
        for _ in range(n_new):
            out = model(input_ids=step, cache=past, use_cache=True)
            top = torch.topk(out.logits[0, -1], 2)
            tokens.append(int(top.indices[0]))
            gaps.append(float(top.values[0] - top.values[1]))
            past, step = out.cache, torch.tensor([[tokens[-1]]])
    return tokens, gaps


def _agreement(got: list[int], ref: tuple[list[int], list[float]]) -> str:
    """"equal", "near-tie" (first difference where plaintext's top two logits are < NEAR_TIE apart), or "DIFFERENT"."""
    tokens, gaps = ref
    if got == tokens:
        return "equal"
    first = next(i for i, (a, b) in enumerate(zip(got, tokens)) if a != b)
    return "near-tie" if gaps[first] < NEAR_TIE else "DIFFERENT"


def _decode_concurrently(rt, engines, prompts, n_new, batcher):
    """Every session's turn goes through one replica step loop (:class:`~bifrost.tee.scheduler.StepLoop`,
    with or without a batcher); returns (wall s, per-session tokens, inter-token gaps s).

    A gap is the wall time a session waits between two of its tokens, queueing for its turn in the step
    or for a batch included (what a user sees as time per output token)."""
    from bifrost.tee.scheduler import StepLoop, TokenEvent, Turn

    loop = StepLoop(rt, "bifrost+", batcher, max_concurrent=len(engines))
    t0 = time.perf_counter()
    turns = [loop.submit(Turn(e, p, n_new)) for e, p in zip(engines, prompts)]
    tokens, step_s, errors = {}, [], []

    def consume(i, turn):  # one reader per session, as a serving replica has
        out, last = [], None
        while True:
            ev = turn.events.get()
            if not isinstance(ev, TokenEvent):
                if ev.error is not None:
                    errors.append(f"session {i}: {ev.error!r}")
                break
            now = time.perf_counter()
            out.append(ev.token)
            if last is not None:
                step_s.append(now - last)
            last = now
        tokens[i] = out

    readers = [threading.Thread(target=consume, args=(i, t)) for i, t in enumerate(turns)]
    for r in readers:
        r.start()
    for r in readers:
        r.join()
    wall = time.perf_counter() - t0
    loop.close()
    if errors:
        raise SystemExit("batched_decode.py: " + "; ".join(errors))
    return wall, tokens, step_s


def end_to_end(model_name, counts, n_new, prompt_len, backend, log) -> list[dict]:
    import numpy as np

    from bifrost.config_loader import load_config
    from bifrost.model.catalog import load_model, resolve
    from bifrost.tee.deploy import run_config_yaml
    from bifrost.tee.batching import DecodeBatcher
    from bifrost.tee.pool import WorkerSessions
    from bifrost.tee.runtime import TrustedRuntime, trusted_identity
    from bifrost.worker.launcher import LocalWorker

    cfg = load_config().replace(model=model_name, backend=backend)
    plain = load_model(resolve(model_name), cfg.seed)
    vocab = plain.config.vocab_size
    rows = []
    with tempfile.TemporaryDirectory() as d:
        wcfg = Path(d) / "worker.yaml"
        wcfg.write_text(run_config_yaml(cfg, max_sessions=2 * max(counts) + 4))
        with LocalWorker(model_name, cfg.seed, [trusted_identity(cfg).cert_pem], config=str(wcfg)) as worker:
            rt = TrustedRuntime(cfg, None)  # the model; every session gets its own engine (keys, check vectors)
            pool = rt.worker_pool([worker.endpoint], timeout_s=600)
            for k in counts:
                prompts = [np.random.default_rng(100 + i).integers(256, vocab, size=prompt_len).tolist() for i in range(k)]
                expected = [_plaintext_reference(plain, p, n_new) for p in prompts]
                row = {"sessions": k}
                for variant in ("interleaved", "batched"):
                    batcher = DecodeBatcher(pool) if variant == "batched" else None
                    engines = [rt.new_engine(batcher.link_for(WorkerSessions(pool)) if batcher else WorkerSessions(pool))
                               for _ in range(k)]
                    wall, tokens, gaps = _decode_concurrently(rt, engines, prompts, n_new, batcher)
                    calls = sum(e.stats.calls for e in engines)
                    row[variant] = {
                        "wall_s": wall, "tokens_per_s": k * n_new / wall,
                        "tpot_mean_s": statistics.fmean(gaps), "tpot_p50_s": statistics.median(gaps),
                        "tpot_p99_s": sorted(gaps)[min(len(gaps) - 1, round(0.99 * (len(gaps) - 1)))],
                        "worker_calls": batcher.stats.worker_calls if batcher else calls,
                        "mean_items_per_call": batcher.stats.mean_items if batcher else 1.0,
                        "encrypt_s": sum(e.stats.encrypt_s for e in engines),
                        "decrypt_s": sum(e.stats.decrypt_s for e in engines),
                        "verify_s": sum(e.stats.verify_s for e in engines),
                        "deviations": sum(e.stats.deviations for e in engines),
                        "agreement": [_agreement(tokens[i], expected[i]) for i in range(k)],
                    }
                    for e in engines:
                        e.close()
                row["throughput_ratio"] = row["batched"]["tokens_per_s"] / row["interleaved"]["tokens_per_s"]
                rows.append(row)
                log(f"{model_name} k={k}: interleaved {row['interleaved']['tokens_per_s']:.2f} tok/s, "
                    f"batched {row['batched']['tokens_per_s']:.2f} tok/s ({row['throughput_ratio']:.2f}×)")
            rt.close()
            pool.close()
    return rows


def worker_only(model_name, counts, backend, repeats, log) -> list[dict]:
    """k Linear calls (one per session) vs one LinearBatch of k items, per layer group of one block."""
    import numpy as np

    from bifrost.ckks import GroupShape
    from bifrost.ckks.registry import get_backend
    from bifrost.config_loader import ckks_params_of, load_config
    from bifrost.model.delegation import fuse_groups
    from bifrost.proto import worker_pb2, worker_pb2_grpc
    from bifrost.tee.deploy import run_config_yaml
    from bifrost.tee.link import connect
    from bifrost.tee.runtime import trusted_identity
    from bifrost.worker.launcher import LocalWorker

    cfg = load_config().replace(model=model_name, backend=backend)
    impl = get_backend(backend)
    rows = []
    with tempfile.TemporaryDirectory() as d:
        wcfg = Path(d) / "worker.yaml"
        wcfg.write_text(run_config_yaml(cfg, max_sessions=max(counts) + 4))
        identity = trusted_identity(cfg)
        with LocalWorker(model_name, cfg.seed, [identity.cert_pem], config=str(wcfg)) as worker:
            stub = worker_pb2_grpc.CKKSWorkerStub(connect(worker.endpoint, identity))
            infos = {l.name: l for l in stub.Describe(worker_pb2.DescribeRequest()).layers}
            first_block = [n for n in infos if ".0." in n]  # the first block's layers
            groups = fuse_groups(first_block, cfg.delegation)
            worker_sessions = []  # (keys, worker session id), one per simulated user session
            for _ in range(max(counts)):
                keys = impl.keygen(ckks_params_of(cfg), [])
                refs = [worker_pb2.LayerGroup(layers=[worker_pb2.LayerRef(name=n, digest=infos[n].digest) for n in g])
                        for g in groups]
                sid = stub.OpenSession(worker_pb2.OpenSessionRequest(backend=backend, public_context=keys.public_context(),
                                                                     prepare=refs)).session_id
                worker_sessions.append((keys, sid))
            for g, ref in zip(groups, refs):
                shape = GroupShape(infos[g[0]].d_in, tuple(infos[n].d_out for n in g))
                for k in counts:
                    cts = [keys.encrypt(shape, np.random.default_rng(i).normal(size=(1, shape.d_in))).ciphertexts
                           for i, (keys, _) in enumerate(worker_sessions[:k])]
                    single, batched = [], []
                    for _ in range(repeats):
                        t0 = time.perf_counter()
                        for (_, sid), c in zip(worker_sessions, cts):
                            stub.Linear(worker_pb2.LinearRequest(session_id=sid, group=ref, ciphertexts=c), timeout=600)
                        single.append(time.perf_counter() - t0)
                        t0 = time.perf_counter()
                        stub.LinearBatch(worker_pb2.LinearBatchRequest(group=ref, items=[
                            worker_pb2.LinearBatchItem(session_id=sid, ciphertexts=c) for (_, sid), c in zip(worker_sessions, cts)]),
                            timeout=600)
                        batched.append(time.perf_counter() - t0)
                    row = {"group": "+".join(n.rsplit(".", 1)[-1] for n in g), "d_in": shape.d_in,
                           "d_out": sum(shape.d_outs), "sessions": k, "single_calls_s": statistics.median(single),
                           "one_batch_s": statistics.median(batched)}
                    row["ratio"] = row["single_calls_s"] / row["one_batch_s"]
                    rows.append(row)
                    log(f"{row['group']} {shape.d_in}->{row['d_out']} k={k}: {k} calls {row['single_calls_s'] * 1e3:.0f} ms, "
                        f"one batch {row['one_batch_s'] * 1e3:.0f} ms ({row['ratio']:.2f}×)")
    return rows


def _agreement_cell(verdicts: list[str]) -> str:
    if "DIFFERENT" in verdicts:
        return "NO"
    ties = verdicts.count("near-tie")
    return f"yes ({ties} near-tie flip{'s' if ties > 1 else ''})" if ties else "yes"


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["end_to_end"]
    fig, ax = plt.subplots(figsize=(6, 4.2))
    ks = [r["sessions"] for r in rows]
    for variant, style in (("interleaved", "o--"), ("batched", "s-")):
        ax.plot(ks, [r[variant]["tokens_per_s"] for r in rows], style, label=variant)
    ax.set_xscale("log", base=2)
    ax.set_ylim(bottom=0)
    ax.set_xlabel("concurrent sessions")
    ax.set_ylabel("aggregate decode throughput (tokens/s)")
    ax.set_title(f"{result['model']} · backend {result['backend']} · {result['cpu_count']} CPUs")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gpt2")
    ap.add_argument("--sessions", nargs="+", type=int, default=[1, 4, 8, 16])
    ap.add_argument("--new-tokens", type=int, default=4)
    ap.add_argument("--prompt-tokens", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3, help="repeats of the worker-only measurement (median)")
    ap.add_argument("--backend", default="native")
    ap.add_argument("--skip-worker-only", action="store_true")
    ap.add_argument("--out", default="benchmarks/results/batched_decode.json")
    ap.add_argument("--plot", default="benchmarks/results/batched_decode.png")
    args = ap.parse_args()
    if args.new_tokens < 2 or args.prompt_tokens < 1 or any(k < 1 or k > 64 for k in args.sessions):
        raise SystemExit("batched_decode.py: need --new-tokens >= 2, --prompt-tokens >= 1, sessions in 1..64")

    from rich.console import Console
    from rich.table import Table

    console = Console(stderr=True)
    log = lambda m: console.print(f"[dim]{m}[/dim]")  # noqa: E731
    result = {"model": args.model, "backend": args.backend, "cpu_count": os.cpu_count(),
              "new_tokens": args.new_tokens, "prompt_tokens": args.prompt_tokens}
    result["worker_only"] = [] if args.skip_worker_only else worker_only(args.model, args.sessions, args.backend,
                                                                         args.repeats, log)
    result["end_to_end"] = end_to_end(args.model, args.sessions, args.new_tokens, args.prompt_tokens, args.backend, log)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    plot(result, args.plot)

    table = Table(title=f"Decode throughput, {args.model} · backend {args.backend} · one run, one machine")
    for col in ("sessions", "interleaved tok/s", "batched tok/s", "batched/interleaved", "TPOT p50 interleaved",
                "TPOT p50 batched", "verify ms/token (i / b)", "worker calls (i / b)", "items per call",
                "tokens = plaintext"):
        table.add_column(col, justify="right")
    for r in result["end_to_end"]:
        i, b = r["interleaved"], r["batched"]
        steps = r["sessions"] * (args.new_tokens - 1)  # delegated decode steps (the prompt is prefilled in the TEE)
        table.add_row(str(r["sessions"]), f"{i['tokens_per_s']:.2f}", f"{b['tokens_per_s']:.2f}",
                      f"{r['throughput_ratio']:.2f}×", f"{i['tpot_p50_s']:.2f} s", f"{b['tpot_p50_s']:.2f} s",
                      f"{i['verify_s'] / steps * 1e3:.1f} / {b['verify_s'] / steps * 1e3:.1f}",
                      f"{i['worker_calls']} / {b['worker_calls']}", f"{b['mean_items_per_call']:.1f}",
                      _agreement_cell(i["agreement"] + b["agreement"])
                      + (f" ({i['deviations'] + b['deviations']} deviations)" if i["deviations"] + b["deviations"] else ""))
    Console(width=200).print(table)
    if result["worker_only"]:
        wt = Table(title="Worker only: k single-session Linear calls vs one LinearBatch of k items (median)")
        for col in ("group", "shape", "sessions", "k calls", "one batch", "ratio"):
            wt.add_column(col, justify="right")
        for r in result["worker_only"]:
            wt.add_row(r["group"], f"{r['d_in']}→{r['d_out']}", str(r["sessions"]), f"{r['single_calls_s'] * 1e3:.0f} ms",
                       f"{r['one_batch_s'] * 1e3:.0f} ms", f"{r['ratio']:.2f}×")
        Console(width=160).print(wt)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
