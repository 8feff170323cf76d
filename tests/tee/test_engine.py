"""DelegationEngine (bifrost/tee/engine.py) against real in-process workers over mutual TLS: the products it returns,
what its stats count, and how it treats a deviating reply (recomputed here, worker quarantined) and a call that brings
back no reply (availability: computed here, nobody quarantined). gpt2-mini: 2 blocks × 4 single-layer groups."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bifrost.ckks import row_bucket
from bifrost.ckks.registry import get_backend
from bifrost.config_loader import ckks_params_of
from bifrost.tee.engine import DelegationEngine
from bifrost.tee.pool import WorkerSessions
from bifrost.tee.pool import WorkerQuarantine
from bifrost.tee.runtime import TrustedRuntime
from tests import adversary as adv
from tests.workers import make_service, start_worker

MODEL = "gpt2-mini"
C_ATTN0, C_FC0 = "transformer.h.0.attn.c_attn", "transformer.h.0.mlp.c_fc"


@pytest.fixture(scope="module")
def rt(run_config):
    """The model in the trusted runtime (no default engine), with a plaintext reference."""
    runtime = TrustedRuntime(run_config.replace(model=MODEL), None, reference=True)
    yield runtime
    runtime.close()


@pytest.fixture(scope="module")
def observed_worker(run_config):
    """An honest worker that records every request it receives (tests/adversary.py, no attack): (service, endpoint).
    A test may set ``service.attack`` and must reset it."""
    service = adv.AdversarialService(make_service(run_config, MODEL), None)
    _, server, endpoint = start_worker(run_config, MODEL, service=service)
    yield service, endpoint
    server.stop(grace=None)


def make_engine(rt, endpoint, backend="native", quarantine=None, groups=None, timeout_s=30.0) -> DelegationEngine:
    cfg = rt.cfg.replace(backend=backend)
    link = WorkerSessions.from_endpoints([endpoint], timeout_s=timeout_s)
    return DelegationEngine(link, backend, ckks_params_of(cfg), rt.sites, groups or rt.groups, rt.weights,
                            verify=cfg.verification, quarantine=quarantine if quarantine is not None else WorkerQuarantine())


def plaintext(rt, group, x):
    return [x @ np.asarray(rt.weights[n], dtype=np.float64).T for n in group]


def linear_calls(service) -> int:
    return sum(o.method in ("Linear", "LinearBatch") for o in service.observed)


# ------------------------------------------------------------------ products
@pytest.mark.parametrize("backend", ["native", "tenseal"])
def test_every_group_product_equals_plaintext_within_the_ckks_bound(rt, observed_worker, backend):
    """Each group's product, computed by the worker under CKKS, is x·Wᵀ to within the backend's error bound (the
    worst case for native, TenSEAL's documented bound), for a decode row and a 6-row prefill; it did come from the
    worker (no local recomputation, a nonzero CKKS error) and passed verification."""
    _, endpoint = observed_worker
    engine = make_engine(rt, endpoint, backend)
    rng = np.random.default_rng(7)
    try:
        for rows in (1, 6):  # both buckets: the engine pads nothing, so the bound below is for the very call it makes
            for group in rt.groups:
                shape, stats = engine.shapes[group], engine._stats_of[group]
                x = rng.normal(0, 1, (rows, shape.d_in))
                ys = engine.run_group(group, x)
                bound = engine._keys.error_bound(shape, engine._keys.encrypt(shape, x), stats)
                for m, (y, want) in enumerate(zip(ys, plaintext(rt, group, x))):
                    assert y.shape == want.shape == (rows, shape.d_outs[m])
                    err = np.abs(y - want).max(axis=1)
                    assert (err <= bound[:, m]).all(), (group, rows, err, bound[:, m])
                    assert err.max() > 0  # encrypted: CKKS noise, not the TEE's own float64 product
        st = engine.stats
        assert st.calls == 2 * len(rt.groups) and st.local_calls == 0 and st.deviations == 0
        assert len(engine.quarantine) == 0
    finally:
        engine.close()


def test_fused_siblings_share_one_worker_call(rt, observed_worker):
    """A group of two layers with the same input: one worker call for both, the second sibling's output handed out
    from the first call (the same input tensor and version), each within the bound of its own weights."""
    service, endpoint = observed_worker
    fused = [(C_ATTN0, C_FC0)] + [g for g in rt.groups if g[0] not in (C_ATTN0, C_FC0)]
    engine = make_engine(rt, endpoint, groups=fused)
    try:
        x = torch.from_numpy(np.random.default_rng(1).normal(0, 1, (1, 64)))
        before = linear_calls(service)
        a = engine.linear(C_ATTN0, x, x._version)
        b = engine.linear(C_FC0, x, x._version)
        assert linear_calls(service) == before + 1 and engine.stats.calls == 1
        want_a, want_b = plaintext(rt, (C_ATTN0, C_FC0), x.numpy())
        assert a.shape == want_a.shape and b.shape == want_b.shape
        assert np.abs(a - want_a).max() < 1e-3 and np.abs(b - want_b).max() < 1e-3
        engine.linear(C_FC0, x, x._version)  # nothing pending any more: a call of its own
        assert linear_calls(service) == before + 2
    finally:
        engine.close()


# ------------------------------------------------------------------ stats
def test_stats_count_calls_rows_bytes_and_checks(rt, observed_worker):
    """calls, padded rows, bytes each way (exactly what the worker received, and the backend's exact call sizes),
    ciphertext counts and exact checks; a 70-row prompt is padded to 96 and split into 64 + 32 rows."""
    service, endpoint = observed_worker
    engine = make_engine(rt, endpoint)
    group = next(g for g in rt.groups if g[0] == C_FC0)
    shape = engine.shapes[group]
    native = get_backend("native")
    try:
        start = len(service.observed)
        engine.run_group(group, np.ones((5, shape.d_in)))          # padded to 6 rows: one call
        st = engine.stats
        sent, received = native.call_bytes(engine.params, shape, 6)
        assert (st.calls, st.local_calls, st.deviations, st.checks) == (1, 0, 0, 6 * len(group))
        assert (st.bytes_sent, st.bytes_received) == (sent, received)
        g = st.groups[group]
        assert (g.calls, g.rows, g.bytes_sent, g.bytes_received) == (1, 6, sent, received)
        calls = [o for o in service.observed[start:] if o.method == "Linear"]
        assert len(calls) == 1 and g.cts_in == len(calls[0].sizes) and sum(calls[0].sizes) == sent

        before = st.snapshot()
        assert row_bucket(70) == 96 and engine.rows_per_call(group, 96) == 64
        ys = engine.run_group(group, np.full((70, shape.d_in), 0.5))
        assert ys[0].shape == (70, shape.d_outs[0])
        d = engine.stats.minus(before)
        assert (d.calls, d.checks) == (2, 96 * len(group))
        assert d.groups[group].rows == 96
        assert d.bytes_sent == sum(native.call_bytes(engine.params, shape, r)[0] for r in (64, 32))
        assert d.bytes_received == sum(native.call_bytes(engine.params, shape, r)[1] for r in (64, 32))
        assert sum(o.method == "Linear" for o in service.observed[start:]) == 3
        assert engine.stats.calls == 3 and engine.stats.groups[group].rows == 6 + 96
    finally:
        engine.close()


# ------------------------------------------------------------------ failure classes
@pytest.mark.parametrize("attack, reason", [
    (lambda when: adv.flipped_bits(when), "product check"),
    (lambda when: adv.flipped_bits(when, header=True), "malformed reply"),
    (lambda when: adv.oversized(when, 4096), "oversized reply"),
], ids=["flipped-bits", "flipped-header", "oversized"])
def test_a_deviating_reply_is_recomputed_here_and_its_worker_quarantined(rt, observed_worker, attack, reason):
    """The worker deviates on one call: the engine returns the TEE's own product, counts one deviation (the first,
    at call 0) and quarantines the worker for that check; the worker's next, honest reply is still not used."""
    service, endpoint = observed_worker
    quarantine = WorkerQuarantine()
    engine = make_engine(rt, endpoint, quarantine=quarantine)
    identity = engine.link.identities()[0]
    group = rt.groups[0]
    x = np.random.default_rng(2).normal(0, 1, (1, engine.shapes[group].d_in))
    first = len(service.history)
    service.attack = attack(lambda call: call.index == first)
    try:
        y = engine.run_group(group, x)[0]
        assert service.deviated and service.deviated[-1] == first
        assert np.allclose(y, plaintext(rt, group, x)[0], rtol=0, atol=1e-12)  # the TEE's float64 product
        st = engine.stats
        assert (st.calls, st.deviations, st.local_calls, st.first_deviation, st.checks) == (1, 1, 1, 0, 0)
        assert identity in quarantine and quarantine.entries()[identity]["reason"] == reason

        y2 = engine.run_group(group, x)[0]  # honest reply now, but from a quarantined worker
        assert len(service.history) == first + 2  # the worker was still asked (and its reply verified)
        assert np.allclose(y2, y, rtol=0, atol=1e-12)
        assert (engine.stats.deviations, engine.stats.local_calls) == (1, 2)
    finally:
        service.attack = None
        engine.close()


def test_a_transport_failure_is_availability_not_a_deviation(rt, run_config):
    """The worker is gone (stopped): the call brings back no reply; its product is computed here, it is not
    counted as a deviation, and the worker is not quarantined."""
    _, server, endpoint = start_worker(run_config, MODEL)
    quarantine = WorkerQuarantine()
    engine = make_engine(rt, endpoint, quarantine=quarantine, timeout_s=5.0)
    identity = engine.link.identities()[0]
    try:
        server.stop(grace=None).wait()
        group = rt.groups[1]
        x = np.random.default_rng(3).normal(0, 1, (2, engine.shapes[group].d_in))
        y = engine.run_group(group, x)[0]
        assert np.allclose(y, plaintext(rt, group, x)[0], rtol=0, atol=1e-12)
        st = engine.stats
        assert (st.calls, st.local_calls, st.deviations, st.first_deviation) == (1, 1, 0, -1)
        assert st.bytes_received == 0 and st.groups[group].cts_out == 0
        assert len(quarantine) == 0 and identity not in quarantine
    finally:
        engine.close()


# ------------------------------------------------------------------ Bifrost+ and lifetime
def test_in_tee_runs_every_product_in_plaintext_with_no_worker_call(rt, observed_worker):
    """Inside in_tee() a forward pass makes no worker call (the worker sees nothing) and gives the plaintext
    model's logits; the flag is restored afterwards, even after an exception, and the next pass is delegated."""
    service, endpoint = observed_worker
    engine = make_engine(rt, endpoint)
    ids = torch.tensor([[464, 3139, 286, 4881]])
    try:
        with torch.no_grad():
            want = rt.reference(input_ids=ids).logits[0, -1]
        before = linear_calls(service)
        logits, _, d = rt.forward(engine, ids, in_tee=True)
        assert d.calls == 0 and engine.stats.calls == 0 and linear_calls(service) == before
        assert torch.allclose(logits, want, atol=1e-4)
        assert engine.local_linears is False
        with pytest.raises(KeyError):
            with engine.in_tee():
                assert engine.local_linears is True
                raise KeyError("inside")
        assert engine.local_linears is False
        logits2, _, d2 = rt.forward(engine, ids)  # delegated again: one call per group
        assert d2.calls == len(rt.groups) and linear_calls(service) == before + len(rt.groups)
        assert torch.allclose(logits2, want, atol=1e-2)
    finally:
        engine.close()


def test_close_releases_the_worker_sessions(rt, observed_worker):
    """close() closes the engine's worker session on the worker: the worker holds one fewer, and was told so."""
    service, endpoint = observed_worker
    held = len(service._worker_sessions)
    engine = make_engine(rt, endpoint)
    assert len(service._worker_sessions) == held + 1
    session = service.observed[-1].worker_session
    assert service.observed[-1].method == "OpenSession"
    engine.close()
    assert len(service._worker_sessions) == held
    assert service.observed[-1].method == "CloseSession" and service.observed[-1].worker_session == session
    assert engine.link._worker_sessions == {}
