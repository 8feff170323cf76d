"""Cross-session batched decode: concurrent sessions' layer calls share worker calls, results unchanged."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from bifrost.tee.batching import MAX_ITEM_ROWS, DecodeBatcher
from bifrost.attest.mtls import WORKER_TLS_NAME, TLSIdentity, WorkerEndpoint
from bifrost.tee.pool import WorkerSessions
from bifrost.tee.runtime import TrustedRuntime

MODEL = "gpt2-mini"


@pytest.fixture(scope="module")
def model_parts(worker_factory, run_config):
    _, _, address = worker_factory(MODEL, 64)
    cfg = run_config.replace(model=MODEL)
    rt = TrustedRuntime(cfg, address)
    weights = {name: m.weight.double().numpy() for name, m in rt.model.named_modules() if hasattr(m, "site")}
    yield cfg, rt, address, weights
    rt.close()


def _engines(batcher, pool, cfg, rt, n):
    return [rt.new_engine(batcher.link_for(WorkerSessions(pool))) for _ in range(n)]


def _run_sessions(batcher, engines, groups, xs, start_together=True):
    barrier = threading.Barrier(len(engines))
    results, errors = {}, []

    def session(i):
        try:
            with batcher.participant():
                if start_together:
                    barrier.wait(timeout=30)
                results[i] = [engines[i].run_group(g, xs[i]) for g in groups]
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(repr(exc))

    threads = [threading.Thread(target=session, args=(i,)) for i in range(len(engines))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    return results


def _check(results, groups, xs, weights):
    for i, per_group in results.items():
        for g, ys in zip(groups, per_group):
            for name, y in zip(g, ys):
                w = weights[name]
                bound = 2.0 ** -14 * np.abs(xs[i]).sum(1, keepdims=True) * np.abs(w).max()
                assert np.all(np.abs(y - xs[i] @ w.T) <= bound)


def test_concurrent_sessions_share_one_worker_call_per_group(model_parts):
    cfg, rt, address, weights = model_parts
    pool = rt.worker_pool([address])
    batcher = DecodeBatcher(pool, window_s=10.0, max_batch_rows=16)  # the barrier rule must send, not the clock
    engines = _engines(batcher, pool, cfg, rt, 4)
    d_in = rt.engine.sites[rt.groups[0][0]].d_in
    same_din = [g for g in rt.groups if rt.engine.sites[g[0]].d_in == d_in][:3]  # e.g. qkv, fc, next qkv
    rng = np.random.default_rng(1)
    xs = [rng.normal(size=(1, d_in)) for _ in engines]
    results = _run_sessions(batcher, engines, same_din, xs)
    _check(results, same_din, xs, weights)
    assert batcher.stats.worker_calls == len(same_din)  # 4 sessions, one call per group
    assert batcher.stats.max_items == 4
    assert all(e.stats.calls == len(same_din) for e in engines)
    # each session checked its own rows exactly: one row x one member per group
    assert all(e.stats.checks == len(same_din) and e.stats.deviations == 0 for e in engines)
    for e in engines:
        e.close()


def test_one_session_deviating_in_a_batch_is_caught_by_that_session_only(model_parts, run_config):
    """A batched call whose reply for one item is changed by +1 in a single residue of one coefficient: that
    session's exact check fails on that reply (its product is recomputed in the TEE, the worker quarantined); the
    other sessions' rows pass their own checks."""
    from tests import adversary as adv
    from tests.workers import make_service, start_worker

    cfg, rt, _, weights = model_parts
    tampered = []

    def attack(call):  # the second item of the first batched call
        if call.index == 1 and not tampered:
            tampered.append(call.index)
            return adv.one_residue(lambda c: True)(call)
        return None

    service = adv.AdversarialService(make_service(run_config, MODEL), attack)
    _, server, endpoint = start_worker(run_config, MODEL, service=service)
    try:
        pool = rt.worker_pool([endpoint])
        batcher = DecodeBatcher(pool, window_s=10.0, max_batch_rows=16)
        engines = _engines(batcher, pool, cfg, rt, 3)
        group = rt.groups[0]
        rng = np.random.default_rng(5)
        xs = [rng.normal(size=(1, rt.engine.sites[group[0]].d_in)) for _ in engines]
        results = _run_sessions(batcher, engines, [group], xs)
        _check(results, [group], xs, weights)  # every session got the right product
        assert batcher.stats.max_items == 3 and tampered == [1]
        assert sorted(e.stats.deviations for e in engines) == [0, 0, 1]
        assert sorted(e.stats.first_deviation for e in engines) == [-1, -1, 0]  # on its first (and only) call
        assert endpoint.identity in rt.quarantine
        for e in engines:
            e.close()
    finally:
        server.stop(grace=None)


def test_batches_respect_max_rows_and_prefill_goes_alone(model_parts):
    cfg, rt, address, weights = model_parts
    pool = rt.worker_pool([address])
    batcher = DecodeBatcher(pool, window_s=10.0, max_batch_rows=2)
    engines = _engines(batcher, pool, cfg, rt, 4)
    group = rt.groups[0]
    d_in = rt.engine.sites[group[0]].d_in
    rng = np.random.default_rng(2)
    xs = [rng.normal(size=(1, d_in)) for _ in range(3)] + [rng.normal(size=(MAX_ITEM_ROWS + 3, d_in))]
    results = _run_sessions(batcher, engines, [group], xs)
    _check(results, [group], xs, weights)
    assert batcher.stats.max_items <= 2  # three 1-row items under a 2-row cap: two batched calls
    assert batcher.stats.items == 3  # the 7-row prefill bypassed the batcher
    for e in engines:
        e.close()


def test_calls_outside_a_decode_step_are_not_held_back(model_parts):
    cfg, rt, address, weights = model_parts
    pool = rt.worker_pool([address])
    batcher = DecodeBatcher(pool, window_s=60.0)
    (engine,) = _engines(batcher, pool, cfg, rt, 1)
    group = rt.groups[0]
    x = np.ones((1, rt.engine.sites[group[0]].d_in))
    _check({0: [engine.run_group(group, x)]}, [group], [x], weights)  # not a participant: straight through
    assert batcher.stats.worker_calls == 0
    with batcher.participant():  # the only participant: the barrier rule sends at once, not after 60 s
        _check({0: [engine.run_group(group, x)]}, [group], [x], weights)
    assert batcher.stats.worker_calls == 1
    engine.close()


def test_a_batch_fails_over_from_a_dead_worker(model_parts):
    cfg, rt, address, weights = model_parts
    dead = WorkerEndpoint("127.0.0.1:1", TLSIdentity.generate(WORKER_TLS_NAME).cert_pem)  # port 1: nothing listens
    pool = rt.worker_pool([dead, address], timeout_s=10)
    batcher = DecodeBatcher(pool, window_s=10.0)
    engines = _engines(batcher, pool, cfg, rt, 3)
    group = rt.groups[0]
    rng = np.random.default_rng(3)
    xs = [rng.normal(size=(1, rt.engine.sites[group[0]].d_in)) for _ in engines]
    for w in pool.workers:  # make the dead worker look least loaded so that the batch goes there first
        w.calls = 0 if w.address == "127.0.0.1:1" else 10
        w.down_until = 0.0
    failovers = pool.stats.failovers
    results = _run_sessions(batcher, engines, [group], xs)
    _check(results, [group], xs, weights)
    assert batcher.stats.max_items == 3
    assert pool.stats.failovers == failovers + 1  # tried the dead worker, then moved the whole batch
    for e in engines:
        e.close()
