"""Everything the trusted side sends to a worker during a generation, checked for key material."""

import grpc
import pytest

from bifrost.proto import worker_pb2
from bifrost.tee import pool as pool_mod
from bifrost.tee.runtime import TrustedRuntime
from tests.key_material import record_secrets, secret_key_words


class _Recorder(grpc.UnaryUnaryClientInterceptor):
    def __init__(self):
        self.messages = []

    def intercept_unary_unary(self, continuation, details, request):
        self.messages.append((details.method, request))
        return continuation(details, request)


@pytest.mark.parametrize("backend", ["tenseal", "native"])
def test_requests_to_the_worker_carry_no_secret_key(worker_factory, run_config, monkeypatch, backend):
    _, _, endpoint = worker_factory("gpt2-mini")
    recorder = _Recorder()
    real_channel = pool_mod.worker_channel
    monkeypatch.setattr(pool_mod, "worker_channel", lambda *a, **kw: grpc.intercept_channel(real_channel(*a, **kw), recorder))
    runtime = TrustedRuntime(run_config.replace(model="gpt2-mini", backend=backend), endpoint)
    recorded = record_secrets(runtime.engine._keys)  # native: a fresh secret per call, every call's recorded
    runtime.generate("secret prompt", 3)
    runtime.close()

    methods = [m for m, _ in recorder.messages]
    assert any(m.endswith("/OpenSession") for m in methods) and sum(m.endswith("/Linear") for m in methods) >= 3 * 8
    wire = b"".join(req.SerializeToString() for _, req in recorder.messages)
    sk = secret_key_words(runtime.engine._keys, recorded)
    windows = [sk[i : i + 24] for i in range(0, len(sk) - 24, 397)]
    assert len(windows) > 100
    assert not any(w in wire for w in windows), "secret-key words found in traffic to the worker"
    opened = [req for _, req in recorder.messages if isinstance(req, worker_pb2.OpenSessionRequest)]
    assert len(opened) == 1 and opened[0].backend == backend
    # What was sent as the public context loads as one on the untrusted side.
    from bifrost.ckks.registry import get_backend

    assert get_backend(backend).evaluator(opened[0].public_context).params == runtime.engine._keys.params
    # The prompt's bytes never travel in clear either.
    assert b"secret prompt" not in wire


def test_worker_api_has_no_field_that_could_carry_a_secret_key():
    messages = list(worker_pb2.DESCRIPTOR.message_types_by_name.values())  # every message, new ones included
    assert {"OpenSessionRequest", "LinearRequest", "LinearBatchRequest", "LinearBatchItem"} <= {m.name for m in messages}
    for message in messages:
        names = [f.name for f in message.fields]
        assert not any("secret" in n or "private" in n or n == "key" for n in names), (message.name, names)


def test_batched_calls_of_several_sessions_carry_no_secret_key(worker_factory, run_config):
    """Cross-session batching: three sessions' rows in LinearBatch calls; none of their keys on the wire."""
    import threading

    import numpy as np

    from bifrost.tee.batching import DecodeBatcher
    from bifrost.tee.link import WorkerStub
    from bifrost.tee.pool import WorkerSessions

    _, _, endpoint = worker_factory("gpt2-mini")
    cfg = run_config.replace(model="gpt2-mini", backend="native")
    runtime = TrustedRuntime(cfg, endpoint)
    pool = runtime.worker_pool([endpoint])
    recorder = _Recorder()
    w = pool.workers[0]
    w.stub = WorkerStub(grpc.intercept_channel(w.channel, recorder), w.identity, 60.0, w.address)
    batcher = DecodeBatcher(pool, window_s=10.0)
    engines = [runtime.new_engine(batcher.link_for(WorkerSessions(pool))) for _ in range(3)]
    recorded = [record_secrets(e._keys) for e in engines]  # every call's secret, not only the last
    group = runtime.groups[0]
    barrier = threading.Barrier(3)

    def session(e):
        with batcher.participant():
            barrier.wait(timeout=30)
            e.run_group(group, np.full((1, runtime.engine.sites[group[0]].d_in), 0.5))

    threads = [threading.Thread(target=session, args=(e,)) for e in engines]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    batched = [req for m, req in recorder.messages if m.endswith("/LinearBatch")]
    assert len(batched) == 1 and len(batched[0].items) == 3
    wire = b"".join(req.SerializeToString() for _, req in recorder.messages)
    for e, calls in zip(engines, recorded):
        assert len(calls) == 1  # the one batched call of this session
        sk = secret_key_words(e._keys, calls)
        windows = [sk[i : i + 24] for i in range(0, len(sk) - 24, 397)]
        assert len(windows) > 100 and not any(w in wire for w in windows)
        e.close()
    runtime.close()
