"""``bifrost estimate calibrate``: micro-benchmarks of this machine, written as a hardware profile.

Measured: the CKKS backend's primitives (rotation, plaintext multiply, add, rescale, ciphertext
load/dump) and its whole linear layer at several shapes (to fit ``accelerator.efficiency``), encryption
and decryption per ciphertext, PyTorch non-linear ops and matmul rates, per-layer framework overhead of
the Hugging Face decoder families, and gRPC loopback transfer with the worker's own message types.
Optionally (not ``--quick``) the deep-context operations of the all-FHE baseline.

Medians of several repetitions are taken; the machine is shared, so expect noise of ±10-20 %.
"""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import time
from typing import Callable

import numpy as np

from bifrost.errors import BifrostError

from .profile import FHE, TEE, Accelerator, CKKSOps, Link, Profile, Source
from .shapes import LinearGroup


def _median_time(fn: Callable[[], object], reps: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def _log(verbose: bool, msg: str) -> None:
    if verbose:
        print(f"[calibrate] {msg}", flush=True)


# ------------------------------------------------------------------------------------------------
# CKKS (TenSEAL / SEAL)
# ------------------------------------------------------------------------------------------------
def _seal_ops(n: int, bits: tuple[int, ...], reps: int, with_ct_mult: bool = False, enforce_128: bool = True) -> dict:
    import tenseal.sealapi as seal

    parms = seal.EncryptionParameters(seal.SCHEME_TYPE.CKKS)
    parms.set_poly_modulus_degree(n)
    parms.set_coeff_modulus(seal.CoeffModulus.Create(n, list(bits)))
    ctx = seal.SEALContext(parms, True, seal.SEC_LEVEL_TYPE.TC128 if enforce_128 else seal.SEC_LEVEL_TYPE.NONE)
    if not ctx.parameters_set():
        raise BifrostError(f"SEAL refused N={n}, {bits}: {ctx.parameters_error_message()}")
    enc = seal.CKKSEncoder(ctx)
    kg = seal.KeyGenerator(ctx)
    sk = kg.secret_key()
    encryptor, ev = seal.Encryptor(ctx, sk), seal.Evaluator(ctx)
    gk = seal.GaloisKeys()
    kg.create_galois_keys([pow(3, 1, 2 * n)], gk)
    scale = 2.0 ** 40
    rng = np.random.default_rng(0)
    pt = seal.Plaintext()
    enc.encode(rng.uniform(-1, 1, n // 2).tolist(), scale, pt)
    ct, ct2 = seal.Ciphertext(), seal.Ciphertext()
    encryptor.encrypt_symmetric(pt, ct)
    encryptor.encrypt_symmetric(pt, ct2)
    w = seal.Plaintext()
    enc.encode(rng.uniform(-1, 1, n // 2).tolist(), scale, w)
    out = {}
    r = seal.Ciphertext()
    out["rotate_s"] = _median_time(lambda: ev.rotate_vector(ct, 1, gk, r), reps)
    out["mul_plain_s"] = _median_time(lambda: ev.multiply_plain(ct, w, r), reps)
    out["add_s"] = _median_time(lambda: ev.add(ct, ct2, r), reps)

    def rescale():
        x = seal.Ciphertext()
        ev.multiply_plain(ct, w, x)
        ev.rescale_to_next_inplace(x)

    out["rescale_s"] = max(_median_time(rescale, reps) - out["mul_plain_s"], 1e-7)
    if with_ct_mult:
        rk = seal.RelinKeys()
        kg.create_relin_keys(rk)

        def mul_ct():
            x = seal.Ciphertext()
            ev.multiply(ct, ct2, x)
            ev.relinearize_inplace(x, rk)

        out["mul_ct_s"] = _median_time(mul_ct, reps)
    return out


def _nnls(rows: list[list[float]], y: list[float]) -> list[float]:
    """Non-negative least squares on *relative* residuals (each case weighted by 1/measured), exact by
    enumerating the subsets of active coefficients (a handful of unknowns)."""
    import itertools

    A, b = np.asarray(rows, dtype=float), np.asarray(y, dtype=float)
    w = 1.0 / np.maximum(b, 1e-9)
    Aw, bw = A * w[:, None], b * w
    best, best_res = np.zeros(A.shape[1]), float("inf")
    for k in range(1, A.shape[1] + 1):
        for subset in itertools.combinations(range(A.shape[1]), k):
            coef = np.zeros(A.shape[1])
            coef[list(subset)] = np.linalg.lstsq(Aw[:, subset], bw, rcond=None)[0]
            if (coef < 0).any():
                continue
            res = float(np.sum((Aw @ coef - bw) ** 2))
            if res < best_res - 1e-15:
                best, best_res = coef, res
    return best.tolist()


def _backend_layer(backend_name: str, params, verbose: bool, quick: bool) -> tuple[dict, list[dict]]:
    """Backend-level timings of encrypt / apply / decrypt at several (shape, rows); per-ciphertext fits."""
    from bifrost.ckks import GroupShape, get_backend

    from .model import linear_counts

    cases = [(GroupShape(64, (192,)), 1), (GroupShape(256, (64,)), 1), (GroupShape(64, (64, 64, 64)), 4)]
    gpt2 = [GroupShape(768, (2304,)), GroupShape(768, (768,)), GroupShape(768, (3072,)), GroupShape(3072, (768,))]
    if backend_name == "native":  # milliseconds per case: cover the GPT-2 shapes at several row counts
        cases += [(s, r) for s in gpt2 for r in ((1, 4) if quick else (1, 4, 16))]
    elif not quick:
        cases += [(GroupShape(768, (768,)), 1), (GroupShape(768, (3072,)), 1), (GroupShape(3072, (768,)), 1),
                  (GroupShape(768, (2304,)), 8)]
    backend = get_backend(backend_name)
    shapes = sorted({s for s, _ in cases}, key=repr)
    t0 = time.perf_counter()
    keys = backend.keygen(params, shapes)
    ev = backend.evaluator(keys.public_context())
    _log(verbose, f"{backend_name} keygen for {len(shapes)} shapes: {time.perf_counter() - t0:.1f} s")
    ops0 = CKKSOps(params.poly_modulus_degree, tuple(params.coeff_mod_bit_sizes), 0.0, 1.0, 0.0, 0.0)
    rng = np.random.default_rng(1)
    prepared, out = {}, []
    for shape, rows in cases:
        if shape not in prepared:
            prepared[shape] = ev.prepare(shape, [rng.normal(0, 0.05, (d, shape.d_in)) for d in shape.d_outs])
        x = rng.normal(0, 1, (rows, shape.d_in))
        reps = 3 if quick else 5
        enc_s = _median_time(lambda: keys.encrypt(shape, x), reps)
        batch = keys.encrypt(shape, x)
        apply_s = _median_time(lambda: ev.apply(prepared[shape], batch.ciphertexts), reps)
        outputs = ev.apply(prepared[shape], batch.ciphertexts)
        dec_s = _median_time(lambda: keys.decrypt(shape, outputs, rows), reps)
        c = linear_counts(backend_name, ops0, LinearGroup("cal", shape.d_in, tuple(shape.d_outs)), rows)
        assert c.cts_in == len(batch.ciphertexts) and c.cts_out == sum(len(o) for o in outputs), (shape, rows, c)
        out.append({"d_in": shape.d_in, "d_outs": list(shape.d_outs), "rows": rows, "counts": c,
                    "encrypt_s": enc_s, "apply_s": apply_s, "decrypt_s": dec_s,
                    "in_bytes": float(np.mean([len(b) for b in batch.ciphertexts])),
                    "out_bytes": float(np.mean([len(b) for o in outputs for b in o]))})
        _log(verbose, f"{backend_name} {shape.d_in}->{list(shape.d_outs)} x{rows}: enc {enc_s * 1e3:.2f} ms, "
                      f"apply {apply_s * 1e3:.2f} ms, dec {dec_s * 1e3:.2f} ms ({c.cts_in} in, {c.cts_out} out)")
    e0, e1 = _nnls([[1, r["counts"].cts_in] for r in out], [r["encrypt_s"] for r in out])
    d0, d1 = _nnls([[1, r["counts"].cts_out] for r in out], [r["decrypt_s"] for r in out])
    be = {"encrypt_call_s": e0, "encrypt_ct_s": e1, "decrypt_call_s": d0, "decrypt_ct_s": d1,
          "ct_in_bytes": int(np.median([r["in_bytes"] for r in out])),
          "ct_out_bytes": int(np.median([r["out_bytes"] for r in out]))}
    if e1 <= 0 or d1 <= 0:  # degenerate fit (noise): fall back to plain per-ciphertext averages
        be["encrypt_ct_s"] = float(np.median([r["encrypt_s"] / r["counts"].cts_in for r in out]))
        be["decrypt_ct_s"] = float(np.median([r["decrypt_s"] / r["counts"].cts_out for r in out]))
        be["encrypt_call_s"] = be["decrypt_call_s"] = 0.0
    return be, out


# ------------------------------------------------------------------------------------------------
# TEE: PyTorch
# ------------------------------------------------------------------------------------------------
def _torch_ops(verbose: bool, quick: bool) -> dict:
    import torch
    import torch.nn.functional as F

    reps = 5 if quick else 9
    out = {}
    with torch.no_grad():
        a, b = torch.randn(256, 1024), torch.randn(1024, 1024)
        out["gemm_flops"] = 2 * 256 * 1024 * 1024 / _median_time(lambda: a @ b, reps)
        w, x = torch.randn(50257, 768), torch.randn(1, 768)
        out["mem_bandwidth_Bps"] = w.numel() * 4 / _median_time(lambda: F.linear(x, w), reps)
        h = torch.randn(512, 1024)
        g, bb = torch.ones(1024), torch.zeros(1024)
        out["norm_s_per_elem"] = _median_time(lambda: F.layer_norm(h, (1024,), g, bb), reps) / h.numel()
        s = torch.randn(16, 128, 256)
        out["softmax_s_per_elem"] = _median_time(lambda: torch.softmax(s, -1), reps) / s.numel()
        f = torch.randn(256, 3072)
        out["act_s_per_elem"] = _median_time(lambda: F.gelu(f), reps) / f.numel()
        q, k = torch.randn(16, 64, 64), torch.randn(16, 64, 512)
        out["attn_s_per_mac"] = _median_time(lambda: torch.bmm(q, k), reps) / (16 * 64 * 64 * 512)
        logits = torch.randn(50257)
        out["sample_s_per_vocab"] = _median_time(lambda: int(torch.argmax(logits)), reps) / logits.numel()
        y = np.random.default_rng(0).normal(size=(1, 768))
        xt, bias = torch.randn(1, 1, 768), torch.randn(768)

        def glue():
            xt.detach().reshape(-1, 768).to("cpu").double().numpy()
            (torch.from_numpy(y).reshape(1, 1, 768) + bias.to(torch.float64)).to(torch.float32)

        out["call_overhead_s"] = _median_time(glue, reps * 3)
    out["layer_overhead_s"], out["forward_overhead_s"] = _framework_overhead(verbose, quick)
    return out


def _framework_overhead(verbose: bool, quick: bool) -> tuple[dict, float]:
    """Hugging Face decode-step time of tiny models (negligible FLOPs) vs. layer count: slope and intercept."""
    import torch
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, Qwen3Config

    def cfg(family: str, layers: int):
        if family == "gpt2":
            c = GPT2Config(n_layer=layers, n_embd=64, n_head=4, vocab_size=256, n_positions=512)
        elif family == "llama":
            c = LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=layers, num_attention_heads=4,
                            num_key_value_heads=2, vocab_size=256, max_position_embeddings=512)
        else:
            c = Qwen3Config(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                            num_key_value_heads=2, head_dim=16, vocab_size=256, max_position_embeddings=512)
        c._attn_implementation = "eager"
        return c

    per_layer, intercepts = {}, []
    reps = 7 if quick else 15
    lo, hi = 1, 5
    for family in ("gpt2", "llama", "qwen3"):
        times = {}
        for n in (lo, hi):
            with torch.no_grad():
                model = AutoModelForCausalLM.from_config(cfg(family, n), dtype=torch.float32).eval()
                out = model(input_ids=torch.arange(8)[None], use_cache=True)
                past = out.past_key_values
                tok = torch.tensor([[3]])

                def step():
                    return model(input_ids=tok, past_key_values=past, use_cache=True)

                # a fresh DynamicCache grows on every call; re-run from the same 8-token prefix each time
                def step_fresh():
                    nonlocal past
                    o = model(input_ids=torch.arange(8)[None], use_cache=True)
                    past = o.past_key_values
                    t0 = time.perf_counter()
                    model(input_ids=tok, past_key_values=past, use_cache=True)
                    return time.perf_counter() - t0

                step_fresh()
                times[n] = statistics.median(step_fresh() for _ in range(reps))
        per_layer[family] = max((times[hi] - times[lo]) / (hi - lo), 0.0)
        intercepts.append(max(times[lo] - per_layer[family] * lo, 0.0))
        _log(verbose, f"framework overhead {family}: {per_layer[family] * 1e3:.2f} ms/layer, "
                      f"{intercepts[-1] * 1e3:.2f} ms/forward")
    return per_layer, statistics.median(intercepts)


# ------------------------------------------------------------------------------------------------
# Link: gRPC loopback with the worker's message types
# ------------------------------------------------------------------------------------------------
def _grpc_link(ct_in: int, ct_out: int, verbose: bool, quick: bool) -> dict:
    from concurrent import futures

    import grpc

    from bifrost.proto import worker_pb2
    from bifrost.tee.link import MAX_MESSAGE_BYTES

    def echo(request, context):
        n = len(request.ciphertexts)
        return worker_pb2.LinearReply(outputs=[worker_pb2.CiphertextList(
            ciphertexts=[b"\0" * ct_out] * n)], compute_seconds=0.0)

    handler = grpc.method_handlers_generic_handler("bifrost.calibrate.Echo", {
        "Linear": grpc.unary_unary_rpc_method_handler(echo, worker_pb2.LinearRequest.FromString,
                                                      worker_pb2.LinearReply.SerializeToString)})
    opts = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES), ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), options=opts)
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=opts)
        call = channel.unary_unary("/bifrost.calibrate.Echo/Linear",
                                   request_serializer=worker_pb2.LinearRequest.SerializeToString,
                                   response_deserializer=worker_pb2.LinearReply.FromString)
        reps = 7 if quick else 15

        def rpc(n: int):
            return lambda: call(worker_pb2.LinearRequest(session_id="x", ciphertexts=[b"\1" * ct_in] * n))

        small = _median_time(rpc(1), reps, warmup=3)
        n_big = 16
        big = _median_time(rpc(n_big), reps)
        extra = (n_big - 1) * (ct_in + ct_out)
        bw = extra / max(big - small, 1e-6)
        latency = max(small - (ct_in + ct_out) / bw, 1e-6)
        channel.close()
    finally:
        server.stop(None)
    _log(verbose, f"gRPC loopback: {latency * 1e3:.2f} ms/call, {bw / 1e6:.0f} MB/s")
    return {"latency_s": latency, "bandwidth_Bps": bw}


# ------------------------------------------------------------------------------------------------
def calibrate(name: str = "local", quick: bool = False, fhe: bool = True, verbose: bool = False,
              command: str = "", backend: str | None = None) -> tuple[Profile, dict]:
    """Run the micro-benchmarks; returns the profile and a report of the fits (per-case errors)."""
    from bifrost.ckks import available_backends, get_backend
    from bifrost.config import load_config

    from .model import _ckks_seconds

    cfg = load_config()
    backend = backend or cfg.backend
    if backend not in available_backends():
        raise BifrostError(f"backend {backend!r} is not installed; available: {', '.join(available_backends())}")
    if backend not in ("tenseal", "native"):
        raise BifrostError(f"the estimator models the tenseal and native backends, not {backend!r}")
    params = cfg.ckks_params() if backend == cfg.backend else get_backend(backend).default_params
    reps = 5 if quick else 15
    t0 = time.perf_counter()
    be, cases = _backend_layer(backend, params, verbose, quick)
    if backend == "tenseal":
        lin = _seal_ops(params.poly_modulus_degree, params.coeff_mod_bit_sizes, reps)
        _log(verbose, "seal ops: " + ", ".join(f"{k} {v * 1e3:.3f} ms" for k, v in lin.items()))
        from bifrost.ckks.tenseal_backend import _scratch  # noqa: F401  (load/dump through the same tmpfs path)
        ops = CKKSOps(params.poly_modulus_degree, tuple(params.coeff_mod_bit_sizes), lin["rotate_s"],
                      lin["mul_plain_s"], lin["add_s"], lin["rescale_s"], usable_levels=1)
        # per-ciphertext load/dump and the efficiency factor: fit apply = eff * ops + load*in + dump*out
        base = [_ckks_seconds(ops, r["counts"]) for r in cases]
        eff, w_in, w_out = _nnls([[b, r["counts"].cts_in, r["counts"].cts_out] for b, r in zip(base, cases)],
                                 [r["apply_s"] for r in cases])
        eff = eff or 1.0
        acc = Accelerator("", backend, ops, w_in / eff, w_out / eff, 0.0, eff)
    else:
        w0, w_in, w_out, w_prod = _nnls([[1, r["counts"].cts_in, r["counts"].cts_out, r["counts"].mul_plain]
                                         for r in cases], [r["apply_s"] for r in cases])
        ops = CKKSOps(params.poly_modulus_degree, tuple(params.coeff_mod_bit_sizes), 0.0, max(w_prod, 1e-9), 0.0, 0.0)
        acc = Accelerator("", backend, ops, w_in, w_out, w0, 1.0)
    fit = []
    for r in cases:
        c = r["counts"]
        pred = acc.efficiency * (_ckks_seconds(acc.linear, c) + c.cts_in * acc.ct_load_s + c.cts_out * acc.ct_dump_s) \
            + acc.call_overhead_s
        fit.append({"d_in": r["d_in"], "d_outs": r["d_outs"], "rows": r["rows"], "apply_measured_s": r["apply_s"],
                    "apply_model_s": pred, "error": pred / r["apply_s"] - 1})
    torch_ops = _torch_ops(verbose, quick)
    link = _grpc_link(be["ct_in_bytes"], be["ct_out_bytes"], verbose, quick)

    fhe_section = None
    assumptions = ["link: gRPC echo with the worker's own LinearRequest/LinearReply messages over loopback; "
                   "worker-side request handling outside apply() is inside link.latency_s",
                   f"link ciphertext sizes: medians over the calibration cases ({backend} backend)"]
    if fhe:
        mm_bits = (60, 40, 40, 40, 60)  # Euston's matmul context, N = 2^13
        mm = _seal_ops(8192, mm_bits, max(3, reps // 3), enforce_128=False)
        deep_n, deep_bits = 32768, (60,) + (40,) * 15 + (60,)
        _log(verbose, "deep-context ops (N=2^15, 17 primes): slow key generation ...")
        deep = _seal_ops(deep_n, deep_bits, 3, with_ct_mult=True)
        boot_equiv, usable = 60, 6
        fhe_section = FHE(
            CKKSOps(8192, mm_bits, mm["rotate_s"], mm["mul_plain_s"], mm["add_s"], mm["rescale_s"], usable_levels=3),
            CKKSOps(deep_n, deep_bits, deep["rotate_s"], deep["mul_plain_s"], deep["add_s"], deep["rescale_s"],
                    mul_ct_s=deep["mul_ct_s"], bootstrap_s=boot_equiv * deep["rotate_s"], usable_levels=usable))
        assumptions += [
            f"fhe.deep.bootstrap_s = {boot_equiv} x fhe.deep.rotate_s (SEAL/TenSEAL has no bootstrapping; "
            "CoeffToSlot + EvalMod + SlotToCoeff ~ 60 top-level key-switch equivalents)",
            f"fhe.deep.usable_levels = {usable}: 15 data levels at N=2^15 minus ~9 consumed by bootstrapping",
            "fhe ops measured with SEAL at N=2^15 (17 primes), not Euston's N=2^16 on a GPU",
            "fhe.matmul uses Euston's N=2^13, {60,40,40,40,60}: 240 bits exceeds the HE-standard 128-bit bound "
            "(218 bits) at N=2^13; measured with SEAL's security check off, for comparability only"]

    tee = TEE(
        name=f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores), PyTorch {_torch_version()}",
        encrypt_ct_s=be["encrypt_ct_s"], decrypt_ct_s=be["decrypt_ct_s"],
        call_overhead_s=torch_ops["call_overhead_s"] + be["encrypt_call_s"] + be["decrypt_call_s"],
        gemm_flops=torch_ops["gemm_flops"], mem_bandwidth_Bps=torch_ops["mem_bandwidth_Bps"],
        norm_s_per_elem=torch_ops["norm_s_per_elem"], softmax_s_per_elem=torch_ops["softmax_s_per_elem"],
        act_s_per_elem=torch_ops["act_s_per_elem"], attn_s_per_mac=torch_ops["attn_s_per_mac"],
        layer_overhead_s=torch_ops["layer_overhead_s"], forward_overhead_s=torch_ops["forward_overhead_s"],
        sample_s_per_vocab=torch_ops["sample_s_per_vocab"])
    import dataclasses as _dc

    acc = _dc.replace(acc, name=f"{os.cpu_count()}-core CPU, backend '{backend}' (worker on the same machine)")
    profile = Profile(
        name=name,
        description=f"This machine, measured by `bifrost estimate calibrate` ({backend} backend, "
                    f"N={params.poly_modulus_degree}, primes {list(params.coeff_mod_bit_sizes)}; worker on the same "
                    f"CPU, gRPC over loopback).",
        source=Source("measured", "micro-benchmarks on this machine (medians; shared machine, noisy)",
                      date=datetime.datetime.now().isoformat(timespec="seconds"), command=command,
                      assumptions=tuple(assumptions)),
        accelerator=acc, tee=tee,
        link=Link("gRPC over loopback", link["bandwidth_Bps"], link["latency_s"], be["ct_in_bytes"], be["ct_out_bytes"]),
        fhe=fhe_section)
    report = {"seconds": time.perf_counter() - t0, "backend": backend, "linear_fit": fit,
              "encrypt_fit": {"per_call_s": be["encrypt_call_s"], "per_ct_s": be["encrypt_ct_s"]},
              "decrypt_fit": {"per_call_s": be["decrypt_call_s"], "per_ct_s": be["decrypt_ct_s"]}}
    return profile, report


def _torch_version() -> str:
    import torch

    return torch.__version__
