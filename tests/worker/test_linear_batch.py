"""LinearBatch: several worker sessions' inputs (different keys) for one layer group in one call."""

import grpc
import numpy as np
import pytest

from bifrost.ckks import GroupShape, WeightStats
from bifrost.ckks.registry import get_backend
from bifrost.proto import worker_pb2, worker_pb2_grpc
from bifrost.tee.link import connect

GROUP = ("transformer.h.0.mlp.c_fc",)


@pytest.fixture(scope="module")
def setup(worker_factory):
    service, _, endpoint = worker_factory("gpt2-mini", max_sessions=8)
    stub = worker_pb2_grpc.CKKSWorkerStub(connect(endpoint))
    infos = {l.name: l for l in stub.Describe(worker_pb2.DescribeRequest()).layers}
    info = infos[GROUP[0]]
    shape = GroupShape(info.d_in, (info.d_out,))
    group = worker_pb2.LayerGroup(layers=[worker_pb2.LayerRef(name=info.name, digest=info.digest)])
    worker_sessions = []
    for _ in range(3):  # three worker sessions, three independent native key sets
        keys = get_backend("native").keygen(None, [shape])
        sid = stub.OpenSession(worker_pb2.OpenSessionRequest(backend="native", public_context=keys.public_context(),
                                                             prepare=[group])).session_id
        worker_sessions.append((keys, sid))
    weight = service.layers[info.name][1].astype(np.float64)
    return dict(stub=stub, shape=shape, group=group, worker_sessions=worker_sessions, weight=weight)


def _batch(setup, items):
    return setup["stub"].LinearBatch(worker_pb2.LinearBatchRequest(
        group=setup["group"], items=[worker_pb2.LinearBatchItem(session_id=s, ciphertexts=c) for s, c in items]),
        timeout=60)


def test_each_worker_session_decrypts_its_own_result_and_matches_a_single_call(setup):
    rng = np.random.default_rng(0)
    xs = [rng.normal(size=(rows, setup["shape"].d_in)) for rows in (1, 2, 1)]
    batches = [keys.encrypt(setup["shape"], x) for (keys, _), x in zip(setup["worker_sessions"], xs)]
    reply = _batch(setup, [(sid, b.ciphertexts) for (_, sid), b in zip(setup["worker_sessions"], batches)])
    assert len(reply.results) == 3 and reply.compute_seconds > 0
    for (keys, sid), x, b, result in zip(setup["worker_sessions"], xs, batches, reply.results):
        stats = [WeightStats.of(setup["weight"])]
        (y,) = keys.decrypt(setup["shape"], [list(result.outputs[0].ciphertexts)], b, stats)
        ref = x @ setup["weight"].T
        bound = 2.0 ** -14 * np.abs(x).sum(1, keepdims=True) * np.abs(setup["weight"]).max()
        assert np.all(np.abs(y - ref) <= bound)
        single = setup["stub"].Linear(worker_pb2.LinearRequest(session_id=sid, group=setup["group"],
                                                               ciphertexts=b.ciphertexts), timeout=60)
        (y1,) = keys.decrypt(setup["shape"], [list(single.outputs[0].ciphertexts)], b, stats)
        assert np.array_equal(y, y1)  # batching changes nothing but the number of calls


def test_a_result_cannot_be_decrypted_by_another_worker_session(setup):
    (k0, s0), (k1, s1) = setup["worker_sessions"][:2]
    x = np.ones((1, setup["shape"].d_in))
    b0 = k0.encrypt(setup["shape"], x)
    reply = _batch(setup, [(s0, b0.ciphertexts), (s1, k1.encrypt(setup["shape"], x).ciphertexts)])
    from bifrost.ckks import CiphertextError

    with pytest.raises(CiphertextError):  # worker session 1's output carries its own context id
        k0.decrypt(setup["shape"], [list(reply.results[1].outputs[0].ciphertexts)], b0, [WeightStats.of(setup["weight"])])


def test_bad_batches_are_rejected_with_a_status(setup):
    (k0, s0), (k1, s1) = setup["worker_sessions"][:2]
    x = np.ones((1, setup["shape"].d_in))
    cts0 = k0.encrypt(setup["shape"], x).ciphertexts
    cases = {
        "no items": ([], grpc.StatusCode.INVALID_ARGUMENT),
        "unknown worker session": ([("f" * 32, cts0)], grpc.StatusCode.NOT_FOUND),
        "ciphertexts under the wrong worker session": ([(s0, cts0), (s1, cts0)], grpc.StatusCode.INVALID_ARGUMENT),
        "empty item": ([(s0, cts0), (s1, [])], grpc.StatusCode.INVALID_ARGUMENT),
        "truncated": ([(s0, [c[:-5] for c in cts0])], grpc.StatusCode.INVALID_ARGUMENT),
    }
    for name, (items, code) in cases.items():
        with pytest.raises(grpc.RpcError) as exc:
            _batch(setup, items)
        assert exc.value.code() == code and exc.value.details(), name
    test_each_worker_session_decrypts_its_own_result_and_matches_a_single_call(setup)  # still serving
