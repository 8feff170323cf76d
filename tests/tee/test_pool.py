"""Worker pool: least-loaded dispatch, fail-over when a worker dies or hangs mid-generation."""

from __future__ import annotations

import time

import grpc
import pytest

from bifrost.attest.mtls import WORKER_TLS_NAME, TLSIdentity, WorkerEndpoint
from bifrost.tee.link import WorkerCallError
from bifrost.tee.pool import WorkerPool, WorkerSessions
from bifrost.tee.runtime import TrustedRuntime

MODEL = "gpt2-mini"


@pytest.fixture()
def make_worker(run_config):
    """Dedicated in-process workers that a test may stop (kill) or slow down."""
    from tests.workers import make_service, start_worker

    started = []

    def make(delay_linear_s: float = 0.0, max_sessions: int = 16):
        svc = make_service(run_config, MODEL, max_sessions, 2**30)
        if delay_linear_s:
            inner = svc.Linear

            def slow(request, context):
                time.sleep(delay_linear_s)
                return inner(request, context)

            svc.Linear = slow
        _, server, endpoint = start_worker(run_config, MODEL, service=svc)
        started.append(server)
        return server, endpoint

    yield make
    for s in started:
        s.stop(grace=None)


class KillAfter:
    """A WorkerLink wrapper that runs ``kill`` once, just before the n-th layer call."""

    def __init__(self, link, n: int, kill) -> None:
        self.link, self.n, self.kill, self.calls = link, n, kill, 0

    def __getattr__(self, name):
        return getattr(self.link, name)

    def linear(self, group, ciphertexts, rows: int = 1):
        self.calls += 1
        if self.calls == self.n:
            self.kill()
        return self.link.linear(group, ciphertexts, rows)


def test_least_loaded_dispatch_uses_every_worker_and_matches_plaintext(make_worker, run_config):
    (_, a), (_, b) = make_worker(), make_worker()
    worker_sessions = WorkerSessions.from_endpoints([a, b], timeout_s=30)
    rt = TrustedRuntime(run_config.replace(model=MODEL), worker_sessions, reference=True)
    result = rt.generate("pool", 4)
    stats = worker_sessions.pool.stats
    rt.close()
    assert result.tokens == result.fidelity.plaintext_tokens
    assert set(stats.calls_by_worker) == {a.address, b.address}
    assert abs(stats.calls_by_worker[a.address] - stats.calls_by_worker[b.address]) <= 1  # serial calls alternate
    assert stats.failovers == 0


def test_pick_prefers_the_worker_with_fewest_calls_in_flight():
    d = WorkerPool([WorkerEndpoint(f"127.0.0.1:{i}", TLSIdentity.generate(WORKER_TLS_NAME).cert_pem)
                         for i in (1, 2, 3)])
    first = d.pick(set())
    second = d.pick(set())
    third = d.pick(set())
    assert len({first.address, second.address, third.address}) == 3
    d.release(second)
    assert d.pick(set()) is second  # the only one with nothing in flight
    d.mark_down(first, "test")
    assert all(d.pick(set()) is not first for _ in range(4))
    d.close()


def test_worker_killed_mid_generation_fails_over(make_worker, run_config):
    (server_a, a), (_, b) = make_worker(), make_worker()
    worker_sessions = WorkerSessions.from_endpoints([a, b], timeout_s=30)
    link = KillAfter(worker_sessions, 12, lambda: server_a.stop(grace=None).wait())  # during the 2nd token
    rt = TrustedRuntime(run_config.replace(model=MODEL), link, reference=True)
    result = rt.generate("fail over", 5)
    rt.close()
    assert result.tokens == result.fidelity.plaintext_tokens
    assert worker_sessions.pool.stats.failovers >= 1
    snap = {w["address"]: w for w in worker_sessions.pool.snapshot()}
    assert not snap[a.address]["up"] and snap[b.address]["up"]


def test_hung_worker_times_out_and_the_call_moves(make_worker, run_config):
    (_, slow), (_, fast) = make_worker(delay_linear_s=3.0), make_worker()
    worker_sessions = WorkerSessions.from_endpoints([slow, fast], timeout_s=1.0, retry_after_s=600)
    rt = TrustedRuntime(run_config.replace(model=MODEL), worker_sessions, reference=True)
    result = rt.generate("slow", 3)
    rt.close()
    assert result.tokens == result.fidelity.plaintext_tokens
    assert worker_sessions.pool.stats.failovers == 1  # one timeout, then the slow worker stays marked down
    assert worker_sessions.pool.stats.calls_by_worker == {fast.address: 3 * len(rt.groups)}  # every answer came from fast
    assert len(rt.quarantine) == 0  # a timeout is an availability failure, not a deviation


def test_non_retryable_errors_are_not_retried_and_name_the_worker(make_worker, run_config):
    (_, a), (_, b) = make_worker(), make_worker()
    worker_sessions = WorkerSessions.from_endpoints([a, b], timeout_s=10)
    rt = TrustedRuntime(run_config.replace(model=MODEL), worker_sessions)
    group = next(iter(rt.engine._refs.values()))
    with pytest.raises(WorkerCallError) as err:
        worker_sessions.linear(group, [b"not a ciphertext"])
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.worker in (a.identity, b.identity)  # the engine holds this against that worker
    assert worker_sessions.pool.stats.failovers == 0
    rt.close()


def test_all_workers_down_is_an_error_not_a_hang(make_worker, run_config):
    (server_a, a), = [make_worker()]
    worker_sessions = WorkerSessions.from_endpoints([a], timeout_s=5)
    rt = TrustedRuntime(run_config.replace(model=MODEL), worker_sessions)
    server_a.stop(grace=None).wait()
    with pytest.raises(WorkerCallError) as err:
        rt.generate("x", 1)
    assert err.value.code == grpc.StatusCode.UNAVAILABLE
    rt.close()


def test_every_worker_full_is_resource_exhausted_not_unavailable(make_worker, run_config):
    """Worker sessions beyond every worker's max_sessions: RESOURCE_EXHAUSTED (retry later), and nothing half-open."""
    (_, a), (_, b) = make_worker(max_sessions=1), make_worker(max_sessions=1)
    pool = WorkerPool([a, b], timeout_s=10)
    rt = TrustedRuntime(run_config.replace(model=MODEL), WorkerSessions(pool))  # holds the one slot on each
    worker_sessions = WorkerSessions(pool)
    with pytest.raises(WorkerCallError) as err:
        rt.new_engine(worker_sessions)
    assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "full" in err.value.details
    assert worker_sessions._worker_sessions == {}
    rt.close()
    second = rt.new_engine(WorkerSessions(pool))
    second.close()  # slots freed by rt.close() are usable again
    pool.close()


def test_a_full_worker_on_a_lazy_reopen_is_unavailable_not_a_deviation(make_worker, run_config):
    """A worker session lost on a worker that is full cannot be reopened: that is availability, so the engine
    gets no worker identity to hold to account and nothing is quarantined (an honest full worker stays usable)."""
    import numpy as np

    from bifrost.errors import BifrostError

    _, endpoint = make_worker(max_sessions=2)
    rt = TrustedRuntime(run_config.replace(model=MODEL), None)
    pool = rt.worker_pool([endpoint], timeout_s=30)
    a, b = WorkerSessions(pool), WorkerSessions(pool)
    engine_a, engine_b = rt.new_engine(a), rt.new_engine(b)  # the worker now holds 2 of 2 worker sessions
    try:
        b.forget(pool.workers[0])  # as if the worker had lost b's worker session (restart): b must reopen
        x = np.full((1, rt.sites[0].d_in), 0.25)
        with pytest.raises(BifrostError) as err:
            engine_b.run_group(rt.groups[0], x)
        assert not isinstance(err.value, WorkerCallError) or err.value.worker == ""
        assert len(rt.quarantine) == 0 and engine_b.stats.deviations == 0
        assert engine_a.run_group(rt.groups[0], x)[0].shape == (1, rt.sites[0].d_out)  # the worker still serves
    finally:
        engine_a.close()
        engine_b.close()
        pool.close()
        rt.close()
