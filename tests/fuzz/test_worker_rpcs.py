"""The worker's RPCs through a real in-process worker over its real mutual-TLS gRPC channel.

Targets: OpenSession (genuine, mutated and rewritten public contexts of both backends, any backend name,
prepare groups; then a genuine Linear on every worker session it opened), Linear and LinearBatch (genuine and
mutated ciphertexts, counts, layer names and digests, session ids), CloseSession, and every method
(Describe included) with raw request bytes that need not parse.

Property, for every RPC and every input: the call succeeds, or fails with a documented code
(INVALID_ARGUMENT, NOT_FOUND, FAILED_PRECONDITION, RESOURCE_EXHAUSTED) and a non-empty message; never
INTERNAL/UNKNOWN (an exception the worker did not map); and after each call the worker still answers a
genuine Linear call correctly (decrypted and compared with the plaintext product)."""

from __future__ import annotations

import json
import struct

import grpc
import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from bifrost.ckks import CKKSParams, GroupShape, WeightStats
from bifrost.ckks.registry import get_backend
from bifrost.ckks.tenseal_backend import PUB_MAGIC
from bifrost.proto import worker_pb2, worker_pb2_grpc
from bifrost.tee.link import connect
from bifrost.worker.service import MAX_BATCH_ITEMS, MAX_CIPHERTEXTS_PER_CALL, MAX_PREPARE_GROUPS
from tests.workers import start_worker

from .fuzzlib import LIST_EDITS, Ref, budget, edit, junk, mutated, record, text, weighted

DOCUMENTED = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION,
              grpc.StatusCode.RESOURCE_EXHAUSTED}
TIMEOUT_S = 120  # hang guard only
LAYER = "transformer.h.0.attn.c_proj"  # 64 -> 64 in gpt2-mini
MAX_SESSIONS = 5  # the two reference worker sessions + three: a few fuzzed OpenSessions in one example exhaust it


@pytest.fixture(scope="module")
def w(run_config):
    """A dedicated worker (its worker sessions are fuzzed), with one genuine native and one TenSEAL worker session on
    LAYER and genuine ciphertexts for both."""
    service, server, endpoint = start_worker(run_config, "gpt2-mini", max_sessions=MAX_SESSIONS)
    channel = connect(endpoint)
    stub = worker_pb2_grpc.CKKSWorkerStub(channel)
    describe = stub.Describe(worker_pb2.DescribeRequest(), timeout=TIMEOUT_S)
    infos = {layer.name: layer for layer in describe.layers}
    info = infos[LAYER]
    shape = GroupShape(info.d_in, (info.d_out,))
    group = worker_pb2.LayerGroup(layers=[worker_pb2.LayerRef(name=LAYER, digest=info.digest)])
    native, other_native = get_backend("native").keygen(None, []), get_backend("native").keygen(None, [])
    tenseal = get_backend("tenseal").keygen(CKKSParams(), [shape])

    def open_worker_session(backend, keys):
        return stub.OpenSession(worker_pb2.OpenSessionRequest(backend=backend, public_context=keys.public_context(),
                                                              prepare=[group]), timeout=TIMEOUT_S).session_id

    rng = np.random.default_rng(0)
    x1, x3 = rng.normal(0, 1, (1, shape.d_in)), rng.normal(0, 1, (3, shape.d_in))
    ref = Ref(stub=stub, channel=channel, service=service, describe=describe, infos=infos, shape=shape, group=group,
              native=native, tenseal=tenseal, x1=x1, batch1=native.encrypt(shape, x1),
              native_sid=open_worker_session("native", native), tenseal_sid=open_worker_session("tenseal", tenseal),
              native_ctx=native.public_context(), tenseal_ctx=tenseal.public_context(),
              other_native_ctx=other_native.public_context(),
              tenseal_other_keys=_galois_keys(get_backend("tenseal").keygen(CKKSParams(), [GroupShape(4, (4,))])))
    ref.cts = {
        "native1": ref.batch1.ciphertexts,
        "native3": native.encrypt(shape, x3).ciphertexts,
        "tenseal1": tenseal.encrypt(shape, x1).ciphertexts,
        "foreign": other_native.encrypt(shape, x1).ciphertexts,  # another context
        "wide": native.encrypt(GroupShape(4 * shape.d_in, shape.d_outs), np.ones((1, 4 * shape.d_in))).ciphertexts,
    }
    ref.worker_sessions = {"native": ref.native_sid, "tenseal": ref.tenseal_sid}
    yield ref
    channel.close()
    server.stop(grace=None)


def _galois_keys(keys) -> bytes:
    blob = keys.public_context()
    (n,) = struct.unpack_from("<I", blob, len(PUB_MAGIC))
    return blob[len(PUB_MAGIC) + 4 + n:]


# ------------------------------------------------------------------------------ helpers
def rpc(target: str, fn):
    """One RPC: counted; a failure must carry a documented code and a message."""
    try:
        reply = fn()
    except grpc.RpcError as exc:
        code, details = exc.code(), exc.details()
        if code not in DOCUMENTED:
            record(target, f"UNTYPED {code.name}")
            raise AssertionError(f"{target}: undocumented status {code.name}: {details!r}") from None
        record(target, code.name)
        assert details, f"{target}: {code.name} without a message"
        return None
    record(target, "ok")
    return reply


def assert_serving(w, backend: str = "native") -> None:
    """A genuine Linear call on the reference worker session of ``backend`` decrypts to x·Wᵀ within the bound."""
    keys = w.native if backend == "native" else w.tenseal
    batch = w.batch1 if backend == "native" else keys.encrypt(w.shape, w.x1)
    reply = w.stub.Linear(worker_pb2.LinearRequest(session_id=w.worker_sessions[backend], group=w.group,
                                                   ciphertexts=batch.ciphertexts), timeout=TIMEOUT_S)
    weight = w.service.layers[LAYER][1]
    stats = [WeightStats.of(weight)]
    (y,) = keys.decrypt(w.shape, [list(reply.outputs[0].ciphertexts)], batch, stats)
    bound = keys.error_bound(w.shape, batch, stats)[:, 0]
    assert (np.abs(y - w.x1 @ weight.T).max(axis=1) <= bound).all()


# ------------------------------------------------------------------------------ strategies
def layer_ref(w):
    names = sorted(w.infos)
    valid = st.sampled_from(names).map(lambda n: worker_pb2.LayerRef(name=n, digest=w.infos[n].digest))
    wrong_digest = st.builds(lambda n, d: worker_pb2.LayerRef(name=n, digest=d), st.sampled_from(names),
                             st.one_of(text, st.sampled_from(names).map(lambda n: w.infos[n].digest),
                                       st.sampled_from(names).map(lambda n: w.infos[n].digest.upper())))
    near_name = st.builds(lambda n, cut, tail: worker_pb2.LayerRef(name=n[:cut] + tail, digest=w.infos[n].digest),
                          st.sampled_from(names), st.integers(0, 40), st.sampled_from(["", ".", "0", " ", "\x00", "é"]))
    anything = st.builds(lambda n, d: worker_pb2.LayerRef(name=n, digest=d), text, text)
    return weighted((4, valid), (1, wrong_digest), (1, near_name), (1, anything))


def layer_group(w):
    """Mostly the reference group (so the call gets past group checks), else 0-18 fuzzed refs."""
    refs = st.lists(layer_ref(w), max_size=18).map(lambda r: worker_pb2.LayerGroup(layers=r))
    return weighted((5, st.just(w.group)), (1, refs))


def session_id(w, backend: str):
    """Mostly the reference worker session of ``backend``, else the other one, a near miss, or any text."""
    mine, other = w.worker_sessions[backend], w.worker_sessions["tenseal" if backend == "native" else "native"]
    near = st.sampled_from([mine.upper(), mine[:-1], mine + "0", ""])
    return weighted((10, st.just(mine)), (1, st.just(other)), (1, near), (1, text))


@st.composite
def ciphertexts(draw, w, backend: str):
    """A genuine list (mostly of ``backend``; else native 3 rows, TenSEAL, another context's, a wider layer's),
    then 0-3 edits (mutations of a ciphertext, drops, duplicates, swaps, junk, inserted foreign ones)."""
    mine = "native1" if backend == "native" else "tenseal1"
    cts = list(w.cts[draw(st.sampled_from([mine, mine, mine, "native3", "tenseal1", "foreign", "wide"]))])
    pool = w.cts["tenseal1"] + w.cts["native1"] + w.cts["foreign"]
    for op in draw(st.lists(st.sampled_from(LIST_EDITS), max_size=3)):
        edit(draw, cts, op, pool, hot=80)
    return cts


backends = st.sampled_from(["native", "native", "tenseal"])


def many_empty(limit: int) -> list[bytes]:
    return [b""] * (limit + 1)


# ------------------------------------------------------------------------------ OpenSession
@st.composite
def rewritten_tenseal_ctx(draw, w):
    """The reference TenSEAL context with its JSON rewritten (context id, claimed rotation steps) and its
    Galois keys kept, dropped, cut or taken from a context with other steps: well-formed, maybe lying."""
    (n,) = struct.unpack_from("<I", w.tenseal_ctx, len(PUB_MAGIC))
    meta = json.loads(w.tenseal_ctx[len(PUB_MAGIC) + 4:len(PUB_MAGIC) + 4 + n])
    keys = w.tenseal_ctx[len(PUB_MAGIC) + 4 + n:]
    if draw(st.booleans()):
        meta["galois_steps"] = draw(st.lists(st.integers(1, 80), max_size=20))
    if draw(st.booleans()):
        meta["context_id"] = draw(st.binary(min_size=16, max_size=16)).hex()
    keys = draw(st.sampled_from([keys, b"", keys[: len(keys) // 2], w.tenseal_other_keys]))
    blob = json.dumps(meta).encode()
    return PUB_MAGIC + struct.pack("<I", len(blob)) + blob + keys


@st.composite
def open_request(draw, w):
    backend = draw(weighted((4, st.sampled_from(["native", "tenseal"])),
                            (1, st.sampled_from(["NATIVE", "tenseal ", "openfhe", ""])), (1, text)))
    ctx = draw(weighted(
        (2, st.sampled_from([w.native_ctx, w.other_native_ctx, w.tenseal_ctx])),
        (4, st.sampled_from([w.native_ctx, w.tenseal_ctx]).flatmap(lambda b: mutated(b, hot=300))),
        (2, rewritten_tenseal_ctx(w)),
        (1, junk()),
    ))
    groups = draw(weighted((8, st.lists(layer_group(w), max_size=3)), (1, st.just([w.group] * (MAX_PREPARE_GROUPS + 1)))))
    return worker_pb2.OpenSessionRequest(backend=backend, public_context=ctx, prepare=groups)


@given(st.data())
@example(None)
@budget("grpc")
def test_open_session(w, data):
    requests = ([worker_pb2.OpenSessionRequest(backend="native", public_context=w.native_ctx, prepare=[w.group])] * 4
                if data is None else  # the genuine request until the worker is full: RESOURCE_EXHAUSTED
                data.draw(st.lists(open_request(w), min_size=1, max_size=4)))
    opened = []
    try:
        for request in requests:
            reply = rpc("worker.OpenSession", lambda: w.stub.OpenSession(request, timeout=TIMEOUT_S))
            if reply is not None:
                assert len(reply.session_id) == 32
                opened.append(reply.session_id)
                # whatever context was accepted, a genuine call on the new worker session gets a documented answer
                cts = w.cts["native1" if request.backend == "native" else "tenseal1"]
                rpc("worker.Linear[fuzzed session]", lambda: w.stub.Linear(worker_pb2.LinearRequest(
                    session_id=reply.session_id, group=w.group, ciphertexts=cts), timeout=TIMEOUT_S))
        assert len(opened) <= MAX_SESSIONS - 2
    finally:
        for sid in opened:
            w.stub.CloseSession(worker_pb2.CloseSessionRequest(session_id=sid), timeout=TIMEOUT_S)
    assert_serving(w)


# ------------------------------------------------------------------------------ Linear
@given(st.data())
@example(None)
@budget("grpc")
def test_linear(w, data):
    if data is None:
        request = worker_pb2.LinearRequest(session_id=w.native_sid, group=w.group,
                                           ciphertexts=many_empty(MAX_CIPHERTEXTS_PER_CALL))
    else:
        backend = data.draw(backends)
        request = worker_pb2.LinearRequest(session_id=data.draw(session_id(w, backend)),
                                           group=data.draw(layer_group(w)), ciphertexts=data.draw(ciphertexts(w, backend)))
    reply = rpc("worker.Linear", lambda: w.stub.Linear(request, timeout=TIMEOUT_S))
    if reply is not None:
        assert len(reply.outputs) == len(request.group.layers)
    assert_serving(w)


# ------------------------------------------------------------------------------ LinearBatch
@given(st.data())
@example(None)
@budget("grpc")
def test_linear_batch(w, data):
    if data is None:  # one item over the limit
        items = [worker_pb2.LinearBatchItem(session_id=w.native_sid, ciphertexts=w.cts["native1"])] * (MAX_BATCH_ITEMS + 1)
        group = w.group
    else:
        item = backends.flatmap(lambda b: st.builds(lambda s, c: worker_pb2.LinearBatchItem(session_id=s, ciphertexts=c),
                                                    session_id(w, b), ciphertexts(w, b)))
        items, group = data.draw(st.lists(item, max_size=4)), data.draw(layer_group(w))
    request = worker_pb2.LinearBatchRequest(group=group, items=items)
    reply = rpc("worker.LinearBatch", lambda: w.stub.LinearBatch(request, timeout=TIMEOUT_S))
    if reply is not None:
        assert len(reply.results) == len(items)
        assert all(len(r.outputs) == len(group.layers) for r in reply.results)
    assert_serving(w)


# ------------------------------------------------------------------------------ CloseSession
@given(st.data())
@example(None)
@budget("grpc")
def test_close_session(w, data):
    """CloseSession of anything succeeds (idempotent); a closed worker session answers NOT_FOUND afterwards; the
    reference worker sessions are never among the fuzzed ids."""
    # every draw before the worker session is opened: hypothesis may abandon an example at a draw
    kinds = ["fresh", "fresh"] if data is None else data.draw(st.lists(st.one_of(
        st.sampled_from(["fresh", "upper", "cut", ""]), text), min_size=1, max_size=4))
    fresh = w.stub.OpenSession(worker_pb2.OpenSessionRequest(backend="native", public_context=w.native_ctx),
                               timeout=TIMEOUT_S).session_id
    ids = [{"fresh": fresh, "upper": fresh.upper(), "cut": fresh[:-1]}.get(k, k) for k in kinds]
    for sid in ids:
        assert rpc("worker.CloseSession", lambda: w.stub.CloseSession(
            worker_pb2.CloseSessionRequest(session_id=sid), timeout=TIMEOUT_S)) is not None
    w.stub.CloseSession(worker_pb2.CloseSessionRequest(session_id=fresh), timeout=TIMEOUT_S)
    with pytest.raises(grpc.RpcError) as exc:
        w.stub.Linear(worker_pb2.LinearRequest(session_id=fresh, group=w.group, ciphertexts=w.cts["native1"]),
                      timeout=TIMEOUT_S)
    assert exc.value.code() == grpc.StatusCode.NOT_FOUND
    assert_serving(w)


# ------------------------------------------------------------------------------ raw request bytes
METHODS = {"Describe": worker_pb2.DescribeRequest, "OpenSession": worker_pb2.OpenSessionRequest,
           "Linear": worker_pb2.LinearRequest, "LinearBatch": worker_pb2.LinearBatchRequest,
           "CloseSession": worker_pb2.CloseSessionRequest}


@given(st.data())
@example(None)
@budget("grpc")
def test_raw_request_bytes(w, data):
    """Every method, with request bodies that are not (or not quite) protobuf: mutations of genuine
    requests (invalid UTF-8 in a string field, broken lengths, wrong wire types, unknown fields) and junk.
    Describe's reply never changes."""
    genuine = {
        "Describe": worker_pb2.DescribeRequest(),
        "OpenSession": worker_pb2.OpenSessionRequest(backend="native", public_context=w.native_ctx, prepare=[w.group]),
        "Linear": worker_pb2.LinearRequest(session_id=w.native_sid, group=w.group, ciphertexts=w.cts["native1"]),
        "LinearBatch": worker_pb2.LinearBatchRequest(group=w.group, items=[
            worker_pb2.LinearBatchItem(session_id=w.native_sid, ciphertexts=w.cts["native1"])]),
        "CloseSession": worker_pb2.CloseSessionRequest(session_id="0" * 32),
    }
    if data is None:  # a worker session id that is not UTF-8
        method, body = "Linear", b"\x0a\x02\xff\xfe"
    else:
        method = data.draw(st.sampled_from(sorted(METHODS)))
        body = data.draw(st.one_of(mutated(genuine[method].SerializeToString(), hot=64), junk(128)))
    call = w.channel.unary_unary(f"/bifrost.worker.v1.CKKSWorker/{method}", request_serializer=None,
                                 response_deserializer=None)
    reply = rpc(f"worker.raw.{method}", lambda: call(body, timeout=TIMEOUT_S))
    if reply is not None and method == "OpenSession":
        opened = worker_pb2.OpenSessionReply.FromString(reply).session_id
        w.stub.CloseSession(worker_pb2.CloseSessionRequest(session_id=opened), timeout=TIMEOUT_S)
    assert w.stub.Describe(worker_pb2.DescribeRequest(), timeout=TIMEOUT_S) == w.describe
    assert_serving(w)


# ------------------------------------------------------------------------------ afterwards
def test_worker_still_serves_both_backends(w):
    """After all of the above (or alone): both reference worker sessions still compute correctly."""
    assert_serving(w, "native")
    assert_serving(w, "tenseal")
    assert w.stub.Describe(worker_pb2.DescribeRequest(), timeout=TIMEOUT_S) == w.describe
