"""Worker pool: least-loaded dispatch, fail-over when a worker dies or hangs mid-generation."""

from __future__ import annotations

import time

import grpc
import pytest

from bifrost.attest.mtls import WORKER_TLS_NAME, TLSIdentity, WorkerEndpoint
from bifrost.tee.link import WorkerCallError
from bifrost.tee.pool import WorkerPool, WorkerSessions
from bifrost.tee.runtime import TrustedRuntime
from tests.netfault import Link, Relay

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


def test_a_fast_quarantined_worker_does_not_draw_the_calls():
    """Latency-aware dispatch sends most calls to the fastest worker, but a quarantined one (its answers are
    discarded and recomputed in the TEE) counts as no faster than the fastest honest one: answering garbage at
    once wins it no more than an even share."""
    from bifrost.tee.pool import WorkerQuarantine

    pool = WorkerPool([WorkerEndpoint(f"127.0.0.1:{i}", TLSIdentity.generate(WORKER_TLS_NAME).cert_pem)
                       for i in (1, 2)], quarantine=WorkerQuarantine())
    liar, honest = pool.workers
    for w, seconds in ((liar, 0.001), (honest, 0.05)):
        pool.observe(w, 4, seconds)

    def share_of_liar() -> float:
        picks = []
        for _ in range(200):
            w = pool.pick(set(), 4)
            picks.append(w is liar)
            pool.release(w)
        return sum(picks) / len(picks)

    assert share_of_liar() > 0.9  # honest but 50x faster: it takes the traffic
    pool.quarantine.add(liar.identity, "product check")
    assert share_of_liar() <= 0.5
    pool.close()


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


def test_an_error_status_moves_the_call_and_is_held_against_no_one(make_worker, run_config):
    """An error status (here INVALID_ARGUMENT from both workers) brings back no reply: availability. The call moves
    to the other worker, and when none replies the error names no worker (the engine quarantines no one for it)."""
    (_, a), (_, b) = make_worker(), make_worker()
    worker_sessions = WorkerSessions.from_endpoints([a, b], timeout_s=10)
    rt = TrustedRuntime(run_config.replace(model=MODEL), worker_sessions)
    group = next(iter(rt.engine._refs.values()))
    with pytest.raises(WorkerCallError) as err:
        worker_sessions.linear(group, [b"not a ciphertext"])
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and err.value.worker == ""
    assert worker_sessions.pool.stats.failovers == 2  # tried on both
    assert not any(w["up"] for w in worker_sessions.pool.snapshot())  # both marked down, neither quarantined
    assert len(rt.quarantine) == 0
    rt.close()


def test_all_workers_down_computes_in_the_tee_without_a_hang(make_worker, run_config):
    """With every worker gone, each product is computed in the TEE: the tokens are plaintext's and nothing is
    quarantined (no reply: availability). Once the worker is marked down, calls go straight to the TEE."""
    (server_a, a), = [make_worker()]
    worker_sessions = WorkerSessions.from_endpoints([a], timeout_s=5)
    rt = TrustedRuntime(run_config.replace(model=MODEL), worker_sessions, reference=True)
    server_a.stop(grace=None).wait()
    result = rt.generate("x", 2)
    stats = rt.engine.stats
    rt.close()
    assert result.tokens == result.fidelity.plaintext_tokens
    assert stats.calls > 0 and stats.local_calls == stats.calls and stats.deviations == 0
    assert len(rt.quarantine) == 0


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
    """A worker session lost on a worker that is full cannot be reopened: that is availability, so the product is
    computed in the TEE and nothing is quarantined (an honest full worker stays usable)."""
    import numpy as np

    _, endpoint = make_worker(max_sessions=2)
    rt = TrustedRuntime(run_config.replace(model=MODEL), None)
    pool = rt.worker_pool([endpoint], timeout_s=30)
    a, b = WorkerSessions(pool), WorkerSessions(pool)
    engine_a, engine_b = rt.new_engine(a), rt.new_engine(b)  # the worker now holds 2 of 2 worker sessions
    try:
        b.forget(pool.workers[0])  # as if the worker had lost b's worker session (restart): b must reopen
        x = np.full((1, rt.sites[0].d_in), 0.25)
        y = engine_b.run_group(rt.groups[0], x)[0]  # no reply: computed in the TEE
        assert np.allclose(y, x @ np.asarray(rt.weights[rt.groups[0][0]], dtype=np.float64).T)
        assert len(rt.quarantine) == 0 and engine_b.stats.deviations == 0 and engine_b.stats.local_calls == 1
        assert engine_a.run_group(rt.groups[0], x)[0].shape == (1, rt.sites[0].d_out)  # the worker still serves
    finally:
        engine_a.close()
        engine_b.close()
        pool.close()
        rt.close()


class BitFlipRelay(Relay):
    """A raw TCP relay with no keys: it forwards both directions of the worker's mutual-TLS stream and, once, flips
    one bit of a server→client chunk of at least ``min_chunk`` bytes after ``skip`` such chunks (a layer call's
    reply, well past the handshake): what anyone on the path can do."""

    def __init__(self, target: str, skip: int = 20, min_chunk: int = 512) -> None:
        super().__init__(target)
        self.skip, self.min_chunk = skip, min_chunk
        self.flipped = self._seen = 0

    def forward(self, link: Link, chunk: bytes, from_server: bool) -> bytes | None:
        if not from_server or len(chunk) < self.min_chunk:
            return chunk
        with self._lock:
            self._seen += 1
            flip = self._seen > self.skip and not self.flipped
            if flip:
                self.flipped += 1
        if not flip:
            return chunk
        data = bytearray(chunk)
        data[len(data) // 2] ^= 0x10
        return bytes(data)


def test_a_bit_flipped_on_the_path_quarantines_no_one(make_worker, run_config, tmp_path):
    """Issue 23: an outsider with no keys flips one bit inside the mutual-TLS stream of an honest worker's reply.
    The broken record reaches the runtime as a failed call with no reply (availability): the product is computed
    in the TEE, the honest worker is not quarantined (nor refused at the next start), and the tokens equal
    plaintext; the next calls reach the worker again over a new connection."""
    from bifrost.tee.pool import WorkerQuarantine

    _, endpoint = make_worker()
    relay = BitFlipRelay(endpoint.address)
    path = tmp_path / "quarantine.json"
    via_relay = WorkerEndpoint(relay.address, endpoint.cert_pem)
    try:
        rt = TrustedRuntime(run_config.replace(model=MODEL), via_relay, reference=True, quarantine=WorkerQuarantine(path))
        result = rt.generate("Private LLM", 4)
        stats = rt.engine.stats
        rt.quarantine.flush()
        rt.close()
        assert relay.flipped == 1 and relay.connections >= 2  # the flip broke a connection; the runtime reconnected
        assert result.tokens == result.fidelity.plaintext_tokens
        assert stats.deviations == 0 and len(WorkerQuarantine(path)) == 0
        assert 1 <= stats.local_calls < stats.calls  # the broken call computed here, the later ones by the worker
        TrustedRuntime(run_config.replace(model=MODEL), via_relay, quarantine=WorkerQuarantine(path)).close()
    finally:
        relay.close()
