"""The worker answers bad requests with a status + message and keeps serving."""

import json
import struct

import grpc
import numpy as np
import pytest

from bifrost.ckks import CKKSParams, GroupShape, WeightStats
from bifrost.ckks.registry import get_backend
from bifrost.ckks.tenseal_backend import PUB_MAGIC
from bifrost.proto import worker_pb2, worker_pb2_grpc
from bifrost.tee.link import connect


@pytest.fixture(scope="module")
def worker(worker_factory):
    service, _, endpoint = worker_factory("gpt2-mini", max_sessions=3)
    channel = connect(endpoint)
    stub = worker_pb2_grpc.CKKSWorkerStub(channel)
    layers = {l.name: l for l in stub.Describe(worker_pb2.DescribeRequest()).layers}
    name = "transformer.h.0.attn.c_proj"
    info = layers[name]
    shape = GroupShape(info.d_in, (info.d_out,))
    keys = get_backend("tenseal").keygen(CKKSParams(), [shape])
    reply = stub.OpenSession(worker_pb2.OpenSessionRequest(backend="tenseal", public_context=keys.public_context()))
    group = worker_pb2.LayerGroup(layers=[worker_pb2.LayerRef(name=name, digest=info.digest)])
    return dict(stub=stub, channel=channel, keys=keys, shape=shape, worker_session=reply.session_id, group=group,
                info=info, service=service)


def _linear(w, cts, worker_session=None, group=None):
    return w["stub"].Linear(worker_pb2.LinearRequest(session_id=worker_session or w["worker_session"],
                                                     group=group or w["group"], ciphertexts=cts), timeout=60)


def _assert_still_serving(w):
    x = np.linspace(-1, 1, w["shape"].d_in)[None, :]
    batch = w["keys"].encrypt(w["shape"], x)
    reply = _linear(w, batch.ciphertexts)
    weight = w["service"].layers[w["info"].name][1]
    (y,) = w["keys"].decrypt(w["shape"], [list(reply.outputs[0].ciphertexts)], batch, [WeightStats.of(weight)])
    assert np.abs(y[0] - weight @ x[0]).max() < 1e-4


def _code(fn):
    with pytest.raises(grpc.RpcError) as exc:
        fn()
    return exc.value.code(), exc.value.details()


def test_valid_call_matches_plaintext(worker):
    _assert_still_serving(worker)


def test_malformed_and_truncated_ciphertexts_are_invalid_argument(worker):
    good = worker["keys"].encrypt(worker["shape"], np.ones((1, worker["shape"].d_in))).ciphertexts[0]
    for bad in (b"\x00" * 5, good[: len(good) // 3], good[:-7], b"junk" + good[4:]):
        code, details = _code(lambda: _linear(worker, [bad]))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and details
    _assert_still_serving(worker)


def test_ciphertext_from_another_context_is_invalid_argument(worker):
    other = get_backend("tenseal").keygen(CKKSParams(), [worker["shape"]])
    cts = other.encrypt(worker["shape"], np.ones((1, worker["shape"].d_in))).ciphertexts
    code, details = _code(lambda: _linear(worker, cts))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "another CKKS context" in details
    _assert_still_serving(worker)


def test_unknown_layer_and_worker_session_are_not_found(worker):
    bad_group = worker_pb2.LayerGroup(layers=[worker_pb2.LayerRef(name="transformer.h.9.nope", digest="00")])
    cts = worker["keys"].encrypt(worker["shape"], np.ones((1, worker["shape"].d_in))).ciphertexts
    code, details = _code(lambda: _linear(worker, cts, group=bad_group))
    assert code == grpc.StatusCode.NOT_FOUND and "unknown layer" in details
    code, _ = _code(lambda: _linear(worker, cts, worker_session="f" * 32))
    assert code == grpc.StatusCode.NOT_FOUND
    _assert_still_serving(worker)


def test_digest_mismatch_is_failed_precondition(worker):
    group = worker_pb2.LayerGroup(layers=[worker_pb2.LayerRef(name=worker["info"].name, digest="ab" * 32)])
    cts = worker["keys"].encrypt(worker["shape"], np.ones((1, worker["shape"].d_in))).ciphertexts
    code, details = _code(lambda: _linear(worker, cts, group=group))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "digest" in details


def test_wrong_vector_length_and_counts_are_invalid_argument(worker):
    keys = worker["keys"]
    wide = GroupShape(worker["shape"].d_in * 4, worker["shape"].d_outs)
    # Same keys, but the vector is packed for a 4x wider layer.
    code, details = _code(lambda: _linear(worker, keys.encrypt(wide, np.ones((1, wide.d_in))).ciphertexts))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "length 256" in details
    code, _ = _code(lambda: _linear(worker, []))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(ValueError):
        keys.encrypt(worker["shape"], np.ones((1, worker["shape"].d_in + 1)))
    _assert_still_serving(worker)


def test_public_context_with_secret_key_is_refused(worker):
    import tenseal as ts

    private = ts.context(ts.SCHEME_TYPE.CKKS, 8192, coeff_mod_bit_sizes=[60, 40, 60]).serialize(save_secret_key=True)
    meta = json.dumps({"params": {}, "context_id": "00", "galois_steps": [], "secret_key": "AAAA"}).encode()
    for blob in (private, PUB_MAGIC + struct.pack("<I", len(meta)) + meta):
        code, details = _code(lambda: worker["stub"].OpenSession(
            worker_pb2.OpenSessionRequest(backend="tenseal", public_context=blob)))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "secret key" in details


def test_unknown_backend_and_insecure_parameters_are_invalid_argument(worker):
    code, details = _code(lambda: worker["stub"].OpenSession(worker_pb2.OpenSessionRequest(backend="rot13")))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "not served" in details
    meta = json.dumps({"params": {"poly_modulus_degree": 4096, "coeff_mod_bit_sizes": [60, 60], "scale_bits": 40},
                       "context_id": "00" * 16, "galois_steps": []}).encode()
    code, details = _code(lambda: worker["stub"].OpenSession(worker_pb2.OpenSessionRequest(
        backend="tenseal", public_context=PUB_MAGIC + struct.pack("<I", len(meta)) + meta)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "128-bit" in details


def test_too_many_worker_sessions_is_resource_exhausted(worker):
    stub, keys = worker["stub"], worker["keys"]
    opened = []
    with pytest.raises(grpc.RpcError) as exc:
        for _ in range(5):
            opened.append(stub.OpenSession(worker_pb2.OpenSessionRequest(backend="tenseal",
                                                                         public_context=keys.public_context())))
    assert exc.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    for r in opened:
        stub.CloseSession(worker_pb2.CloseSessionRequest(session_id=r.session_id))
    _assert_still_serving(worker)


def test_local_worker_exits_when_its_parent_dies(tmp_path):
    """A local worker started by a process that is killed must not linger (it holds the model's weights)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    script = tmp_path / "parent.py"
    script.write_text(
        "import sys, time\n"
        "from bifrost.attest.mtls import process_identity\n"
        "from bifrost.worker.launcher import LocalWorker\n"
        "w = LocalWorker('gpt2-mini', 0, [process_identity().cert_pem]).start()\n"
        "print(w.proc.pid, flush=True)\n"
        "time.sleep(600)\n")
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    worker_pid = int(parent.stdout.readline())
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            os.kill(worker_pid, 0)
        except ProcessLookupError:
            break
        try:  # reap if it became our child's zombie (it is re-parented to init, which reaps it)
            os.waitpid(worker_pid, os.WNOHANG)
        except ChildProcessError:
            pass
        time.sleep(0.2)
    else:
        os.kill(worker_pid, signal.SIGKILL)
        raise AssertionError("the local worker outlived its parent by 30 s")


def test_only_configured_parameter_sets_are_accepted(worker):
    """128-bit-secure but unconfigured parameters are refused: the prepared-weight cache has a bounded number of keys."""
    other = CKKSParams(poly_modulus_degree=2048, coeff_mod_bit_sizes=(30, 24), scale_bits=34)
    keys = get_backend("native").keygen(other, [])
    code, details = _code(lambda: worker["stub"].OpenSession(worker_pb2.OpenSessionRequest(
        backend="native", public_context=keys.public_context())))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "not configured" in details
    _assert_still_serving(worker)


def test_oversized_public_context_is_refused(worker):
    code, details = _code(lambda: worker["stub"].OpenSession(worker_pb2.OpenSessionRequest(
        backend="tenseal", public_context=PUB_MAGIC + b"\x00" * (worker["service"].limits.max_public_context_bytes + 1))))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "max_public_context_bytes" in details


@pytest.mark.parametrize("method, body", [
    ("Linear", b"\x0a\x02\xff\xfe"),       # session_id (field 1) that is not UTF-8
    ("CloseSession", b"\x0a\x01\x80"),
    ("OpenSession", b"\x12\xff\xff\xff"),  # public_context length past the end
    ("Describe", b"\xff\xff\xff"),
])
def test_request_bytes_that_do_not_parse_are_invalid_argument(worker, method, body):
    """Found by tests/fuzz: gRPC's own deserializer answered such requests INTERNAL "Exception deserializing
    request!"; the worker now answers INVALID_ARGUMENT and keeps serving."""
    call = worker["channel"].unary_unary(f"/bifrost.worker.v1.CKKSWorker/{method}")
    code, details = _code(lambda: call(body, timeout=30))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "not a valid protobuf message" in details
    _assert_still_serving(worker)


def test_unexpected_errors_are_internal_without_details(worker, monkeypatch):
    def boom(*a, **k):
        raise KeyError("secret-looking internal state")

    monkeypatch.setattr(worker["service"], "_resolve_group", boom)
    cts = worker["keys"].encrypt(worker["shape"], np.ones((1, worker["shape"].d_in))).ciphertexts
    code, details = _code(lambda: _linear(worker, cts))
    assert code == grpc.StatusCode.INTERNAL and details == "internal worker error"
    monkeypatch.undo()
    _assert_still_serving(worker)


def test_callers_without_a_trusted_certificate_cannot_reach_the_worker(worker_factory):
    """Mutual TLS: no plaintext port, and a client certificate not in trusted_clients is refused at the handshake."""
    from bifrost.attest.mtls import TRUSTED_TLS_NAME, TLSIdentity, worker_channel

    _, _, endpoint = worker_factory("gpt2-mini", max_sessions=3)
    for channel in (grpc.insecure_channel(endpoint.address),
                    worker_channel(endpoint, TLSIdentity.generate(TRUSTED_TLS_NAME))):
        stub = worker_pb2_grpc.CKKSWorkerStub(channel)
        code, _ = _code(lambda: stub.OpenSession(worker_pb2.OpenSessionRequest(backend="native"), timeout=10))
        assert code == grpc.StatusCode.UNAVAILABLE
        channel.close()


@pytest.fixture()
def clocked_worker(run_config):
    """A worker with a settable clock (seconds), max 2 worker sessions, 60 s idle expiry."""
    from tests.workers import start_worker

    now = [1000.0]
    service, server, endpoint = start_worker(run_config, "gpt2-mini", max_sessions=2, session_idle_s=60.0)
    service.clock = lambda: now[0]
    stub = worker_pb2_grpc.CKKSWorkerStub(connect(endpoint))
    yield service, stub, now
    server.stop(grace=None)


def _open_native(stub):
    keys = get_backend("native").keygen(None, [])
    return stub.OpenSession(worker_pb2.OpenSessionRequest(backend="native", public_context=keys.public_context()),
                            timeout=60).session_id


def test_idle_worker_sessions_expire_and_free_their_slots(clocked_worker):
    service, stub, now = clocked_worker
    first = _open_native(stub)
    _open_native(stub)
    assert _code(lambda: _open_native(stub))[0] == grpc.StatusCode.RESOURCE_EXHAUSTED
    now[0] += 59.0
    service._worker_session(first)  # a call keeps a worker session alive
    now[0] += 2.0            # the other one is now idle for 61 s
    _open_native(stub)       # its slot is reused
    assert len(service._worker_sessions) == 2 and first in service._worker_sessions
    now[0] += 61.0
    assert service.expire_idle() == 2
    code, details = _code(lambda: stub.Linear(worker_pb2.LinearRequest(session_id=first), timeout=60))
    assert code == grpc.StatusCode.NOT_FOUND and "session" in details  # the trusted side reopens on this


def test_concurrent_open_session_flood_never_exceeds_max_sessions(clocked_worker):
    """The slot check and the insert are one step: 12 concurrent opens on a 2-slot worker, exactly 2 succeed."""
    from concurrent.futures import ThreadPoolExecutor

    service, stub, _ = clocked_worker

    def attempt(_):
        try:
            _open_native(stub)
            return "ok"
        except grpc.RpcError as exc:
            return exc.code()

    with ThreadPoolExecutor(12) as pool:
        outcomes = list(pool.map(attempt, range(12)))
    assert outcomes.count("ok") == 2
    assert outcomes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) == 10
    assert len(service._worker_sessions) == 2 and service._reserved == 0


def test_prepared_weights_carry_their_size_and_stay_within_the_cache_budget(run_config):
    """Every group of gpt2-mini prepared under a budget of ~3 groups: the cache evicts down to its budget."""
    from bifrost.worker.service import PreparedWeightCache

    from tests.workers import start_worker

    service, server, endpoint = start_worker(run_config, "gpt2-mini")
    try:
        stub = worker_pb2_grpc.CKKSWorkerStub(connect(endpoint))
        groups = [worker_pb2.LayerGroup(layers=[worker_pb2.LayerRef(name=s.name, digest=s.digest)])
                  for s, _ in service.layers.values()]
        keys = get_backend("native").keygen(None, [])
        stub.OpenSession(worker_pb2.OpenSessionRequest(backend="native", public_context=keys.public_context(),
                                                       prepare=groups[:1]), timeout=60)
        one = service.cache.bytes
        assert one > 0  # real sizes (the old native entries counted as 0 bytes and were never evicted)
        service.cache = PreparedWeightCache(3 * one)
        for _ in range(3):  # a flood of worker sessions preparing every group
            sid = stub.OpenSession(worker_pb2.OpenSessionRequest(backend="native", public_context=keys.public_context(),
                                                                 prepare=groups), timeout=120).session_id
            stub.CloseSession(worker_pb2.CloseSessionRequest(session_id=sid))
            assert service.cache.bytes <= 3 * one
        assert service.cache.evictions >= len(groups) - 3
    finally:
        server.stop(grace=None)


def test_a_policy_matching_no_linear_layer_is_refused():
    from bifrost.errors import BifrostError
    from bifrost.model.placement import load_placement_policy, policy_from_mapping
    from bifrost.worker.service import build_service

    no_such = policy_from_mapping({"rules": [{"match": "*.no_such_layer", "placement": "ckks"},
                                             {"role": "all", "placement": "tee"}]}, "no-such")
    with pytest.raises(BifrostError, match="matches no linear layer of gpt2-mini"):
        build_service("gpt2-mini", 0, no_such)
    with pytest.raises(BifrostError, match="tee-only delegates no layer of gpt2-mini: no worker is needed"):
        build_service("gpt2-mini", 0, load_placement_policy("tee-only"))
