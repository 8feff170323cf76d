"""bifrost/tee/link.py against real in-process workers: the reply cap (reply_limit), WorkerStub's handling of a
LinearBatch reply with the wrong number of results, and the gRPC code a WorkerCallError carries."""

from __future__ import annotations

import threading

import grpc
import numpy as np
import pytest

from bifrost.ckks import GroupShape, row_bucket
from bifrost.ckks.registry import get_backend
from bifrost.config_loader import ckks_params_of
from bifrost.errors import BifrostError
from bifrost.proto import worker_pb2
from bifrost.tee.batching import DecodeBatcher
from bifrost.tee.link import REPLY_OVERHEAD_BYTES, WorkerCallError, WorkerStub, connect, reply_limit
from bifrost.tee.pool import WorkerPool, WorkerSessions
from bifrost.tee.pool import WorkerQuarantine
from bifrost.tee.runtime import TrustedRuntime, context_tokens
from tests.workers import make_service, start_worker

MODEL = "gpt2-mini"
BATCH_ROWS = 16


@pytest.fixture(scope="module")
def rt(run_config):
    runtime = TrustedRuntime(run_config.replace(model=MODEL), None)
    yield runtime
    runtime.close()


def honest_outputs(backend: str, params, shape: GroupShape, rows: int, seed: int = 0) -> list[list[bytes]]:
    """What an honest worker returns for a call of ``rows`` rows of ``shape`` (real keys, real evaluator)."""
    impl = get_backend(backend)
    rng = np.random.default_rng(seed)
    keys = impl.keygen(params, [shape])
    evaluator = impl.evaluator(keys.public_context())
    weights = [rng.normal(0, 0.05, (d, shape.d_in)) for d in shape.d_outs]
    prepared = evaluator.prepare(shape, weights)
    return evaluator.apply(prepared, keys.encrypt(shape, rng.normal(0, 1, (rows, shape.d_in))).ciphertexts)


def group_of(layer: str) -> worker_pb2.LayerGroup:
    return worker_pb2.LayerGroup(layers=[worker_pb2.LayerRef(name=layer.name, digest=layer.digest)])


# ------------------------------------------------------------------ reply_limit
@pytest.mark.parametrize("backend, max_rows", [("native", 256), ("tenseal", 8)])
def test_reply_limit_bounds_an_honest_reply_of_the_largest_shape(rt, backend, max_rows):
    """The largest honest Linear reply (the widest output, the most rows the engine puts in one call) and the
    largest honest LinearBatch reply (16 one-row items) fit under reply_limit, serialized as the worker sends them;
    for the native backend (exact sizes) the limit leaves no more than the stated framing allowance above them."""
    params = ckks_params_of(rt.cfg.replace(backend=backend))
    impl = get_backend(backend)
    shapes = rt.group_shapes()
    limit = reply_limit(backend, params, shapes, max_rows, BATCH_ROWS)
    rows = min(row_bucket(max_rows), impl.rows_per_call(params, shapes[0], row_bucket(max_rows)))
    largest = max(set(shapes), key=lambda s: impl.max_output_bytes(params, s, rows))
    assert largest.d_outs == (256,) or largest.d_outs == (192,)  # c_fc or c_attn: the widest outputs

    single = honest_outputs(backend, params, largest, rows)
    linear = worker_pb2.LinearReply(outputs=[worker_pb2.CiphertextList(ciphertexts=o) for o in single],
                                    compute_seconds=1.5)
    one_row = honest_outputs(backend, params, largest, 1, seed=1)
    batch = worker_pb2.LinearBatchReply(
        results=[worker_pb2.LinearBatchResult(outputs=[worker_pb2.CiphertextList(ciphertexts=o) for o in one_row])
                 for _ in range(BATCH_ROWS)], compute_seconds=1.5)
    assert linear.ByteSize() <= limit and batch.ByteSize() <= limit
    if backend == "native":
        payload = max(sum(map(len, sum(single, []))), BATCH_ROWS * sum(map(len, sum(one_row, []))))
        assert limit - payload == REPLY_OVERHEAD_BYTES + 64 * BATCH_ROWS
        # fewer rows per call: a smaller cap (it follows the model's context, not a constant)
        assert reply_limit(backend, params, shapes, 64, BATCH_ROWS) <= limit
        assert reply_limit(backend, params, shapes, 256, 64) > limit


def test_a_pool_capped_at_the_reply_limit_takes_the_largest_call_and_refuses_more(rt, worker_factory):
    """Over real gRPC: with the runtime's cap (reply_limit for the model's context) the largest call the engine
    makes (64 rows of c_fc) is answered by the worker; with a cap below that reply the channel refuses it unread,
    which is availability (no reply: computed here, nobody quarantined), not a deviation."""
    _, _, endpoint = worker_factory(MODEL)
    limit = reply_limit("native", rt.params, rt.group_shapes(), context_tokens(rt.model))
    group = next(g for g in rt.groups if g[0].endswith("h.0.mlp.c_fc"))
    x = np.random.default_rng(0).normal(0, 1, (64, 64))
    honest = get_backend("native").max_output_bytes(rt.params, GroupShape(64, (256,)), 64)  # the reply's exact size
    assert honest < limit
    for cap, served in ((limit, True), (honest // 2, False)):
        quarantine = WorkerQuarantine()
        pool = WorkerPool([endpoint], timeout_s=30, max_reply_bytes=cap)
        link = WorkerSessions(pool, owns_pool=True)
        engine = rt.new_engine(link)
        engine.quarantine = quarantine
        try:
            y = engine.run_group(group, x)[0]
            assert np.abs(y - x @ np.asarray(rt.weights[group[0]], dtype=np.float64).T).max() < 1e-3
            st = engine.stats
            assert st.deviations == 0 and len(quarantine) == 0
            assert st.local_calls == (0 if served else 1), (cap, served)
            if not served:
                assert not pool.snapshot()[0]["up"]  # marked down (availability), not quarantined
        finally:
            engine.close()


# ------------------------------------------------------------------ LinearBatch replies
@pytest.fixture(scope="module")
def short_batch_worker(run_config):
    """A worker whose LinearBatch replies drop their last result (an intact reply that is not well formed)."""
    service = make_service(run_config, MODEL)
    inner = service.LinearBatch

    def short(request, context):
        reply = inner(request, context)
        del reply.results[-1]
        return reply

    service.LinearBatch = short  # (RPC methods are bound when serving starts)
    _, server, endpoint = start_worker(run_config, MODEL, service=service)
    yield endpoint
    server.stop(grace=None)


def _two_sessions(stub: WorkerStub, layer) -> list[tuple[str, list[bytes]]]:
    impl = get_backend("native")
    shape = GroupShape(layer.d_in, (layer.d_out,))
    items = []
    for seed in (0, 1):
        keys = impl.keygen(impl.default_params, [shape])
        sid, _ = stub.open_worker_session("native", keys.public_context(), [])
        x = np.random.default_rng(seed).normal(0, 1, (1, layer.d_in))
        items.append((sid, keys.encrypt(shape, x).ciphertexts))
    return items


@pytest.mark.parametrize("short", [False, True], ids=["honest", "one-result-short"])
def test_linear_batch_with_the_wrong_result_count_gives_every_item_empty_outputs(worker_factory, short_batch_worker,
                                                                                short):
    endpoint = short_batch_worker if short else worker_factory(MODEL)[2]
    channel = connect(endpoint)
    stub = WorkerStub(channel, endpoint.identity, 30.0, endpoint.address)
    try:
        layer = next(info for info in stub.describe() if info.name.endswith("h.0.attn.c_proj"))
        items = _two_sessions(stub, layer)
        outputs, seconds = stub.linear_batch(group_of(layer), items)
        assert len(outputs) == 2 and seconds >= 0
        if short:
            assert outputs == [[], []]  # neither item gets the other's (or a partial) result
        else:
            assert all(len(o) == 1 and len(o[0]) >= 1 and all(o[0]) for o in outputs)
            assert outputs[0] != outputs[1]
        for sid, _ in items:
            stub.close_worker_session(sid)
    finally:
        channel.close()


def test_a_short_linear_batch_reply_is_a_deviation_of_its_worker(rt, short_batch_worker):
    """Two sessions' decode calls batched into one LinearBatch; the worker's reply has one result too few: each
    session's engine refuses its empty outputs as a malformed reply (a deviation), computes its product here, and
    the worker is quarantined."""
    quarantine = WorkerQuarantine()
    pool = WorkerPool([short_batch_worker], timeout_s=30, quarantine=quarantine)
    batcher = DecodeBatcher(pool, window_s=10.0)
    engines = [rt.new_engine(batcher.link_for(WorkerSessions(pool))) for _ in range(2)]
    for e in engines:
        e.quarantine = quarantine
    group = rt.groups[0]
    x = np.random.default_rng(4).normal(0, 1, (1, rt.sites[0].d_in))
    barrier, results = threading.Barrier(2), {}

    def session(i, e):
        with batcher.participant():
            barrier.wait(timeout=30)
            results[i] = e.run_group(group, x)[0]

    threads = [threading.Thread(target=session, args=(i, e)) for i, e in enumerate(engines)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    try:
        assert batcher.stats.worker_calls == 1 and batcher.stats.max_items == 2  # one LinearBatch of both
        want = x @ np.asarray(rt.weights[group[0]], dtype=np.float64).T
        for i, e in enumerate(engines):
            assert np.allclose(results[i], want, rtol=0, atol=1e-12)
            assert (e.stats.deviations, e.stats.local_calls) == (1, 1)
        assert short_batch_worker.identity in quarantine
        assert quarantine.entries()[short_batch_worker.identity]["reason"] == "malformed reply"
    finally:
        for e in engines:
            e.close()
        pool.close()


# ------------------------------------------------------------------ WorkerCallError
def test_a_worker_call_error_carries_the_grpc_code_and_the_worker(worker_factory, run_config):
    _, _, endpoint = worker_factory(MODEL)
    channel = connect(endpoint)
    stub = WorkerStub(channel, endpoint.identity, 30.0, endpoint.address)
    try:
        layer = stub.describe()[0]
        with pytest.raises(WorkerCallError) as err:
            stub.linear("no-such-session", group_of(layer), [b"x"])
        assert err.value.code == grpc.StatusCode.NOT_FOUND and "session" in err.value.details
        assert err.value.worker == endpoint.identity and isinstance(err.value, BifrostError)
        assert "NOT_FOUND" in str(err.value)
        with pytest.raises(WorkerCallError) as err:
            stub.open_worker_session("native", b"not a public context", [])
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        channel.close()

    _, server, gone = start_worker(run_config, MODEL)
    channel = connect(gone)
    stub = WorkerStub(channel, gone.identity, 5.0, gone.address)
    try:
        server.stop(grace=None).wait()
        with pytest.raises(WorkerCallError) as err:
            stub.describe()
        assert err.value.code == grpc.StatusCode.UNAVAILABLE and err.value.worker == gone.identity
    finally:
        channel.close()
