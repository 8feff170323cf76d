"""The worker's message-size limit (bifrost/limits.py), tested just past it: the request is refused unread and
the worker session it named goes on computing correct products."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from bifrost.ckks import CKKSParams, GroupShape, WeightStats
from bifrost.ckks.registry import get_backend
from bifrost.proto import worker_pb2, worker_pb2_grpc
from bifrost.tee.link import connect

LAYER = "transformer.h.0.attn.c_proj"


def test_worker_request_over_its_message_limit_is_refused_unread(run_config, monkeypatch):
    """WORKER_MAX_REQUEST_BYTES lowered to 8 MiB for one worker (a TenSEAL public context is ~5 MB): a Linear
    request over 8 MiB is RESOURCE_EXHAUSTED; the worker session it named still gives the right product."""
    from bifrost.proto import wire

    from tests.workers import start_worker

    with monkeypatch.context() as m:
        m.setattr(wire, "WORKER_MAX_REQUEST_BYTES", 8 << 20)  # read when the worker's server is made
        service, server, endpoint = start_worker(run_config, "gpt2-mini")
    try:
        stub = worker_pb2_grpc.CKKSWorkerStub(connect(endpoint))  # this side sends up to the real limit
        info = {layer.name: layer for layer in stub.Describe(worker_pb2.DescribeRequest()).layers}[LAYER]
        shape = GroupShape(info.d_in, (info.d_out,))
        keys = get_backend("tenseal").keygen(CKKSParams(), [shape])
        sid = stub.OpenSession(worker_pb2.OpenSessionRequest(backend="tenseal", public_context=keys.public_context()),
                               timeout=60).session_id
        group = worker_pb2.LayerGroup(layers=[worker_pb2.LayerRef(name=LAYER, digest=info.digest)])
        big = worker_pb2.LinearRequest(session_id=sid, group=group, ciphertexts=[bytes(8 << 20)])
        assert big.ByteSize() > 8 << 20
        with pytest.raises(grpc.RpcError) as exc:
            stub.Linear(big, timeout=60)
        assert exc.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        x = np.linspace(-1, 1, shape.d_in)[None, :]
        batch = keys.encrypt(shape, x)
        reply = stub.Linear(worker_pb2.LinearRequest(session_id=sid, group=group, ciphertexts=batch.ciphertexts),
                            timeout=60)
        weight = service.layers[LAYER][1]
        (y,) = keys.decrypt(shape, [list(reply.outputs[0].ciphertexts)], batch, [WeightStats.of(weight)])
        assert np.abs(y[0] - weight @ x[0]).max() < 1e-4
    finally:
        server.stop(grace=None)
