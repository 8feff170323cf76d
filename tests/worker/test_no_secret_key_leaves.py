"""Everything the trusted side sends to a worker during a generation, checked for key material."""

import grpc
import pytest

from bifrost.proto import worker_pb2
from bifrost.tee import link as link_mod
from bifrost.tee.runtime import TrustedRuntime


class _Recorder(grpc.UnaryUnaryClientInterceptor):
    def __init__(self):
        self.messages = []

    def intercept_unary_unary(self, continuation, details, request):
        self.messages.append((details.method, request))
        return continuation(details, request)


@pytest.mark.parametrize("backend", ["tenseal", "native"])
def test_requests_to_the_worker_carry_no_secret_key(worker_factory, run_config, monkeypatch, backend):
    _, _, address = worker_factory("gpt2-mini")
    recorder = _Recorder()
    real_connect = link_mod.connect
    monkeypatch.setattr("bifrost.tee.runtime.connect",
                        lambda addr, **kw: grpc.intercept_channel(real_connect(addr, **kw), recorder))
    runtime = TrustedRuntime(run_config.replace(model="gpt2-mini", backend=backend), address)
    runtime.generate("secret prompt", 3)
    runtime.close()

    methods = [m for m, _ in recorder.messages]
    assert any(m.endswith("/OpenSession") for m in methods) and sum(m.endswith("/Linear") for m in methods) >= 3 * 8
    wire = b"".join(req.SerializeToString() for _, req in recorder.messages)
    sk = runtime.engine._keys._secret_key_words()
    windows = [sk[i : i + 24] for i in range(0, len(sk) - 24, 397)]
    assert len(windows) > 100
    assert not any(w in wire for w in windows), "secret-key words found in traffic to the worker"
    opened = [req for _, req in recorder.messages if isinstance(req, worker_pb2.OpenSessionRequest)]
    assert len(opened) == 1 and opened[0].backend == backend
    # What was sent as the public context loads as one on the untrusted side.
    from bifrost.ckks import get_backend

    assert get_backend(backend).evaluator(opened[0].public_context).params == runtime.engine._keys.params
    # The prompt's bytes never travel in clear either.
    assert b"secret prompt" not in wire


def test_worker_api_has_no_field_that_could_carry_a_secret_key():
    for message in (worker_pb2.OpenSessionRequest, worker_pb2.LinearRequest, worker_pb2.DescribeRequest,
                    worker_pb2.CloseSessionRequest, worker_pb2.LayerGroup, worker_pb2.LayerRef):
        names = [f.name for f in message.DESCRIPTOR.fields]
        assert not any("secret" in n or "private" in n or n == "key" for n in names), (message, names)
