"""What each of issue 13's defences costs, measured in one run on this machine (GPT-2 124M shapes, native backend).

- the exact check of every reply (Freivalds mod each prime, k = 3): its time per decode call against the call's
  decrypt time, for every GPT-2 124M layer group; once per replica, the check vectors and v = rᵀM;
- mutual TLS to the worker: one decode call's bytes (GPT-2 c_fc) through a gRPC echo over mTLS and over
  plaintext gRPC on loopback, best of ``--repeats``;
- row padding: extra rows the worker computes for prompt lengths 1..1024 (mean and worst);
- record padding: bytes of a sealed TokenChunk and GenerateBody before and after the buckets.

The end-to-end share of the checks in a decode step is the ``verify`` column of ``bifrost demo``.
Usage: ``python benchmarks/defence_overheads.py [--repeats 20] [--out benchmarks/results/defence_overheads.json]``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from concurrent import futures

import numpy as np

GPT2_GROUPS = [(768, (2304,)), (768, (768,)), (768, (3072,)), (3072, (768,))]


def best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def checks(repeats: int) -> dict:
    """The native exact check as the engine runs it: per decode call, the critical-path part (parse + r·Y +
    compare; the reply is parsed once and decrypt reuses it) against the call's decrypt; per replica, the check
    vectors and v = rᵀM for the whole model (its first session pays it, later ones nothing)."""
    from bifrost.ckks import GroupShape, WeightStats
    from bifrost.ckks.registry import get_backend

    backend = get_backend("native")
    keys = backend.keygen(None, [])
    ev = backend.evaluator(keys.public_context(), device="cpu")
    rng = np.random.default_rng(0)
    rows, tables = [], 0.0
    for d_in, d_outs in GPT2_GROUPS:
        shape = GroupShape(d_in, d_outs)
        ws = [rng.normal(0, 0.02, (d, d_in)) for d in d_outs]
        stats = [WeightStats.of(w) for w in ws]
        keys.prepare(shape, stats)  # mask products and check vectors
        t1 = time.perf_counter()
        keys._check_vectors(shape, keys._codec.blocking(shape, 1), [w.copy() for w in ws])  # fresh: timed alone
        tables += (time.perf_counter() - t1) * 12  # 12 layers
        prepared = ev.prepare(shape, ws)
        x = rng.normal(0, 1, (1, d_in))
        batch = keys.encrypt(shape, x, stats)
        out = ev.apply(prepared, batch.ciphertexts)
        batch.state.check_term.result()

        def check():  # a fresh parse each time, as the engine's first look at a reply
            batch.state.parsed.clear()
            assert keys.verify(shape, out, batch, stats)

        def decrypt():
            keys.decrypt(shape, out, batch, stats)

        rows.append({"shape": f"{d_in}x{'+'.join(map(str, d_outs))}", "decrypt_ms": best(decrypt, repeats) * 1e3,
                     "check_ms": best(check, repeats) * 1e3, "output_cts": sum(len(o) for o in out)})
    per_token_check = 12 * sum(r["check_ms"] for r in rows)
    per_token_decrypt = 12 * sum(r["decrypt_ms"] for r in rows)
    return {"per_group": rows, "per_token_check_ms": per_token_check, "per_token_decrypt_ms": per_token_decrypt,
            "check_over_decrypt": per_token_check / per_token_decrypt, "check_vectors_per_replica_s": tables}


def tls_vs_plain(repeats: int) -> dict:
    import grpc

    from bifrost.attest.mtls import (TRUSTED_TLS_NAME, WORKER_TLS_NAME, TLSIdentity, WorkerEndpoint,
                                     server_credentials, worker_channel)
    from bifrost.proto.wire import worker_server_options

    payload = b"\x5a" * (24 * 13_895)  # one GPT-2 c_fc decode call's input ciphertexts (24 × 13.9 KB)
    reply = b"\xa5" * (48 * 7_993)      # and its 48 outputs

    def echo(request, context):
        return reply

    handler = grpc.method_handlers_generic_handler("bench.Echo", {
        "Call": grpc.unary_unary_rpc_method_handler(echo, lambda b: b, lambda b: b)})
    opts = worker_server_options()  # sized as a worker's channel
    worker, client = TLSIdentity.generate(WORKER_TLS_NAME), TLSIdentity.generate(TRUSTED_TLS_NAME)
    out = {}
    for name in ("plaintext", "mutual TLS"):
        server = grpc.server(futures.ThreadPoolExecutor(2), options=opts)
        server.add_generic_rpc_handlers((handler,))
        if name == "plaintext":
            port = server.add_insecure_port("127.0.0.1:0")
            channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=opts)
        else:
            port = server.add_secure_port("127.0.0.1:0", server_credentials(worker, [client.cert_pem]))
            channel = worker_channel(WorkerEndpoint(f"127.0.0.1:{port}", worker.cert_pem), client, opts)
        server.start()
        call = channel.unary_unary("/bench.Echo/Call", request_serializer=lambda b: b, response_deserializer=lambda b: b)
        call(payload, timeout=30)  # handshake outside the timing
        out[name] = best(lambda: call(payload, timeout=30), repeats)
        channel.close()
        server.stop(None)
    return {"bytes_each_way": [len(payload), len(reply)], "plaintext_ms": out["plaintext"] * 1e3,
            "mtls_ms": out["mutual TLS"] * 1e3, "mtls_over_plaintext": out["mutual TLS"] / out["plaintext"]}


def row_padding() -> dict:
    from bifrost.ckks import row_bucket

    extra = [row_bucket(n) / n - 1 for n in range(1, 1025)]
    return {"mean_extra_rows": statistics.fmean(extra), "worst_extra_rows": max(extra),
            "examples": {n: row_bucket(n) for n in (1, 5, 11, 33, 75, 100, 200, 513)}}


def record_padding() -> dict:
    from bifrost.attest.channel import ServerHandshake, ClientHandshake
    from bifrost.proto import serving_pb2

    nonce = b"n" * 32
    server, client = ServerHandshake(), ClientHandshake(nonce)
    s = server.accept(client.public_key, nonce, b"r" * 64)
    chunk = serving_pb2.TokenChunk(token_ids=[6342], text=" capital", token_seconds=1.3).SerializeToString()
    body = serving_pb2.GenerateBody(prompt="What is the capital of France?", max_new_tokens=8).SerializeToString()
    return {"token_chunk_plain_bytes": len(chunk), "token_chunk_record_bytes": len(s.seal(chunk)),
            "generate_body_plain_bytes": len(body), "generate_body_record_bytes": len(s.seal(body))}


from _report import write_report  # noqa: E402 - benchmarks/ is on sys.path when run as a script


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--out", default="benchmarks/results/defence_overheads.json")
    args = ap.parse_args()
    report = {"checks": checks(args.repeats),
              "tls": tls_vs_plain(args.repeats), "row_padding": row_padding(), "record_padding": record_padding()}
    c, t, r, p = report["checks"], report["tls"], report["row_padding"], report["record_padding"]
    print(f"exact check per GPT-2 decode token: {c['per_token_check_ms']:.1f} ms (with its parse, which decrypt then "
          f"reuses; {c['check_over_decrypt']:.1%} of the {c['per_token_decrypt_ms']:.0f} ms of decryption); check "
          f"vectors and v = rᵀM for the model: {c['check_vectors_per_replica_s']:.2f} s once per replica")
    for g in c["per_group"]:
        print(f"  {g['shape']:>10}: check {g['check_ms']:.2f} ms, decrypt {g['decrypt_ms']:.2f} ms "
              f"({g['output_cts']} output ciphertexts)")
    print(f"mutual TLS vs plaintext gRPC, one c_fc decode call's bytes: {t['mtls_ms']:.2f} vs {t['plaintext_ms']:.2f} ms "
          f"(x{t['mtls_over_plaintext']:.2f})")
    print(f"row padding: {r['mean_extra_rows']:.1%} extra rows on average over prompts of 1..1024, worst "
          f"{r['worst_extra_rows']:.0%}; e.g. {r['examples']}")
    print(f"record padding: TokenChunk {p['token_chunk_plain_bytes']} -> {p['token_chunk_record_bytes']} B, "
          f"GenerateBody {p['generate_body_plain_bytes']} -> {p['generate_body_record_bytes']} B")
    write_report(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
