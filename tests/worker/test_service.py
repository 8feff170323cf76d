"""The worker answers bad requests with a status + message and keeps serving."""

import json
import struct

import grpc
import numpy as np
import pytest

from bifrost.ckks import CKKSParams, GroupShape, get_backend
from bifrost.ckks.tenseal_backend import PUB_MAGIC
from bifrost.proto import worker_pb2, worker_pb2_grpc
from bifrost.tee.link import connect


@pytest.fixture(scope="module")
def worker(worker_factory):
    service, _, address = worker_factory("gpt2-mini", max_sessions=3)
    stub = worker_pb2_grpc.CKKSWorkerStub(connect(address))
    layers = {l.name: l for l in stub.Describe(worker_pb2.DescribeRequest()).layers}
    name = "transformer.h.0.attn.c_proj"
    info = layers[name]
    shape = GroupShape(info.d_in, (info.d_out,))
    keys = get_backend("tenseal").keygen(CKKSParams(), [shape])
    reply = stub.OpenSession(worker_pb2.OpenSessionRequest(backend="tenseal", public_context=keys.public_context()))
    group = worker_pb2.LayerGroup(layers=[worker_pb2.LayerRef(name=name, digest=info.digest)])
    return dict(stub=stub, keys=keys, shape=shape, session=reply.session_id, group=group, info=info, service=service)


def _linear(w, cts, session=None, group=None):
    return w["stub"].Linear(worker_pb2.LinearRequest(session_id=session or w["session"], group=group or w["group"],
                                                     ciphertexts=cts), timeout=60)


def _assert_still_serving(w):
    x = np.linspace(-1, 1, w["shape"].d_in)[None, :]
    reply = _linear(w, w["keys"].encrypt(w["shape"], x).ciphertexts)
    (y,) = w["keys"].decrypt(w["shape"], [list(reply.outputs[0].ciphertexts)], 1)
    weight = w["service"].layers[w["info"].name][1]
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


def test_unknown_layer_and_session_are_not_found(worker):
    bad_group = worker_pb2.LayerGroup(layers=[worker_pb2.LayerRef(name="transformer.h.9.nope", digest="00")])
    cts = worker["keys"].encrypt(worker["shape"], np.ones((1, worker["shape"].d_in))).ciphertexts
    code, details = _code(lambda: _linear(worker, cts, group=bad_group))
    assert code == grpc.StatusCode.NOT_FOUND and "unknown layer" in details
    code, _ = _code(lambda: _linear(worker, cts, session="f" * 32))
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
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "unknown CKKS backend" in details
    meta = json.dumps({"params": {"poly_modulus_degree": 4096, "coeff_mod_bit_sizes": [60, 60], "scale_bits": 40},
                       "context_id": "00" * 16, "galois_steps": []}).encode()
    code, details = _code(lambda: worker["stub"].OpenSession(worker_pb2.OpenSessionRequest(
        backend="tenseal", public_context=PUB_MAGIC + struct.pack("<I", len(meta)) + meta)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "128-bit" in details


def test_too_many_sessions_is_resource_exhausted(worker):
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
        "from bifrost.worker.launcher import LocalWorker\n"
        "w = LocalWorker('gpt2-mini', 0).start()\n"
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
