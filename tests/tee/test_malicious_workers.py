"""Malicious workers (tests/adversary.py): each deviation is caught in the TEE, no wrong token is produced,
and the worker's whole view of the trusted side — every request it receives, its worker session, layer group and
byte sizes — is the same as with an honest worker. So a deviation whose detection depends on the
plaintext (the half-space probe of issue 13) answers nothing: its "yes" and "no" runs look alike.

gpt2-mini, native backend unless named: 8 worker calls per token (2 layers × c_attn, attn.c_proj, c_fc,
mlp.c_proj), one session, calls in a fixed order.
"""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from bifrost.tee.runtime import TrustedRuntime
from tests import adversary as adv
from tests.workers import make_service, start_worker

MODEL, C_FC0, SHORT, LONG, DECODE = adv.MODEL, adv.C_FC0, adv.SHORT, adv.LONG, adv.DECODE
NEW_TOKENS = 4


def run(run_config, attack, prompt=SHORT, backend="native", new_tokens=NEW_TOKENS) -> adv.Outcome:
    return adv.run_attack(run_config, MODEL, attack, prompt, backend, new_tokens)


@pytest.fixture(scope="module")
def honest(run_config):
    """The honest worker's view for each (backend, prompt): what every attack's view must equal."""
    cache = {}

    def get(prompt=SHORT, backend="native", new_tokens=NEW_TOKENS):
        key = (str(prompt), backend, new_tokens)
        if key not in cache:
            out = run(run_config, None, prompt, backend, new_tokens)
            assert out.tokens == out.plaintext and not out.quarantined and out.deviations_seen == 0
            cache[key] = out
        return cache[key]

    return get


def view(out: adv.Outcome, sizes: bool = True) -> list:
    """The worker's view. TenSEAL serializes ciphertexts zstd-compressed: their sizes vary from run to run
    (with the uniformly random c_0/c_1, independently of the plaintext), so there only counts are compared."""
    return out.observed if sizes else [(o.method, o.worker_session, o.group, len(o.sizes)) for o in out.observed]


def assert_caught_and_invisible(out: adv.Outcome, baseline: adv.Outcome, reason: str | None = None,
                                sizes: bool = True) -> None:
    assert out.deviated, "the attack never fired"
    assert out.tokens == out.plaintext == baseline.tokens  # no wrong token
    assert len(out.quarantined) == 1 and out.deviations_seen >= 1  # caught, and the worker quarantined
    if reason is not None:
        assert next(iter(out.quarantined.values()))["reason"].startswith(reason), out.quarantined
    # detected on the first deviated reply (one session, one worker: the engine's call index is the worker's)
    assert out.first_detection == out.deviated[0]
    assert out.local_calls >= out.deviations_seen  # its products were recomputed in the TEE
    assert view(out, sizes) == view(baseline, sizes)  # the worker saw exactly what an honest worker sees


# -------------------------------------------------------------------------- the catalog: every deviation
@pytest.mark.parametrize("scenario", adv.CATALOG, ids=[sc.name for sc in adv.CATALOG])
def test_deviation_is_caught_and_unseen(run_config, honest, scenario):
    """Caught in the TEE (by the named check), no wrong token, and the worker's view equals an honest run's.
    Includes issue 13's half-space probe (one output of layer 0's c_fc replaced by 2^24·Enc(⟨w, x⟩); it used
    to overflow the next encryption when ⟨w, x⟩ > 0 and close the session) in short and long prefills and in
    decode, and TenSEAL's worker-chosen scale."""
    out = run(run_config, scenario.make(), scenario.prompt, scenario.backend, scenario.new_tokens)
    assert_caught_and_invisible(out, honest(scenario.prompt, scenario.backend, scenario.new_tokens), scenario.reason,
                                sizes=scenario.backend != "tenseal")


def test_half_space_yes_and_no_answers_look_the_same(run_config, honest):
    """A genuine half-space query: the attacker adds 16·Enc(⟨w, x⟩) to one output of layer 0's c_fc in the
    prefill, "yes" with w along the true hidden state (computed offline from the public weights for the right
    guess), "no" with w orthogonal to every prompt row. The exact check compares the reply with M·c_0 and never
    looks at the plaintext, so both are caught by it whatever ⟨w, x⟩: the verdicts, the two runs and an honest
    one are identical to the worker."""
    yes, no = adv.yes_no_directions(run_config)
    x = adv.layer_input(run_config, MODEL, SHORT, C_FC0)
    assert np.abs(x @ no).max() < 1e-9 and abs(x[0] @ yes) > 1.0
    when = adv.on_layer(C_FC0, 0)
    out_yes = run(run_config, adv.half_space_probe(when, yes, 16))
    out_no = run(run_config, adv.half_space_probe(when, no, 16))
    base = honest(SHORT)
    assert out_yes.deviated and out_no.deviated  # both really sent a modified reply
    verdicts = [next(iter(o.quarantined.values()))["reason"] for o in (out_yes, out_no)]
    assert verdicts == ["product check", "product check"], verdicts  # the same verdict
    assert out_yes.observed == out_no.observed == base.observed   # nothing the worker sees differs
    assert out_yes.tokens == out_no.tokens == base.tokens == base.plaintext


def test_correct_49_calls_in_50_deviates_rarely_and_is_caught_each_time(run_config):
    out = run(run_config, adv.one_call_in(50, lambda when: adv.constant_on_one_output(when, 2 ** 46)), new_tokens=8)
    assert 1 <= len(out.deviated) < 3 and out.deviations_seen == len(out.deviated)


def test_a_quarantined_worker_keeps_its_traffic_and_is_never_trusted_again(run_config, honest):
    """After one detected deviation the worker turns honest: its later (correct) results are still discarded
    and recomputed in the TEE, and it still receives every call, as before."""
    out = run(run_config, adv.constant_on_one_output(adv.on_layer(C_FC0, 1), 2 ** 46))
    linear_calls = sum(o.method == "Linear" for o in out.observed)
    assert out.deviated == [10]  # decode step 1's c_fc of layer 0: the 11th call
    assert out.deviations_seen == 1 and out.local_calls == linear_calls - 10  # that call and every later one
    assert out.observed == honest().observed


def test_a_worker_quarantined_by_one_replica_is_refused_at_the_next_start(run_config, tmp_path):
    """The quarantine file is shared: a later runtime (another replica, or the next run) naming it never
    connects to that worker identity again."""
    from bifrost.errors import BifrostError
    from bifrost.tee.pool import WorkerQuarantine

    path = tmp_path / "quarantine.json"
    service = adv.AdversarialService(make_service(run_config, MODEL), adv.scaled_output(DECODE, 2 ** 20))
    _, server, endpoint = start_worker(run_config, MODEL, service=service)
    try:
        rt = TrustedRuntime(run_config.replace(model=MODEL), endpoint, quarantine=WorkerQuarantine(path))
        rt.generate(SHORT, 3)
        rt.close()
        assert endpoint.identity in WorkerQuarantine(path)
        with pytest.raises(BifrostError, match="quarantined"):
            TrustedRuntime(run_config.replace(model=MODEL), endpoint, quarantine=WorkerQuarantine(path))
    finally:
        server.stop(grace=None)


def test_an_honest_worker_beside_a_quarantined_one_serves_as_before(run_config):
    """Two workers, one malicious: tokens equal plaintext, only the malicious identity is quarantined, and
    the honest one's results keep being used (no recomputation for its calls)."""
    from bifrost.tee.pool import WorkerSessions

    bad = adv.AdversarialService(make_service(run_config, MODEL), adv.scaled_output(lambda call: call.index >= 2, 2 ** 20))
    good = adv.AdversarialService(make_service(run_config, MODEL), None)
    servers, endpoints = [], []
    for svc in (bad, good):
        _, server, endpoint = start_worker(run_config, MODEL, service=svc)
        servers.append(server)
        endpoints.append(endpoint)
    try:
        worker_sessions = WorkerSessions.from_endpoints(endpoints, timeout_s=60)
        rt = TrustedRuntime(run_config.replace(model=MODEL), worker_sessions, reference=True)
        result = rt.generate(SHORT, 4)
        stats, quarantined = rt.engine.stats, rt.quarantine.entries()
        rt.close()
    finally:
        for s in servers:
            s.stop(grace=None)
    assert result.tokens == result.fidelity.plaintext_tokens
    assert set(quarantined) == {endpoints[0].identity}
    bad_calls = sum(o.method == "Linear" for o in bad.observed)
    assert bad_calls >= 10 and len(good.history) >= 10  # both kept their share of the traffic
    assert stats.local_calls == bad_calls - 2  # everything the bad worker answered after call 2, nothing else


# -------------------------------------------------------------------------- failures that are not deviations
@pytest.mark.parametrize("make", [
    lambda: adv.error_status(DECODE, grpc.StatusCode.INVALID_ARGUMENT),
    lambda: adv.error_status(DECODE, grpc.StatusCode.INTERNAL),
    lambda: adv.error_status(DECODE, grpc.StatusCode.UNKNOWN),
    lambda: adv.oversized(DECODE, 64 << 20),  # over the channel's cap: refused unread (RESOURCE_EXHAUSTED here)
], ids=["INVALID_ARGUMENT", "INTERNAL", "UNKNOWN", "reply over the channel cap"])
def test_an_error_status_is_availability_not_a_deviation(run_config, honest, make):
    """A worker that answers a valid request with an error status (or a reply the channel refuses unread) sends no
    result: the worker is marked down, the call is computed in the TEE, and nobody is quarantined (an outsider who
    breaks the stream causes the same statuses). Every layer call an honest run makes still reaches the worker,
    with the same sizes; the only addition is the worker session reopened after the failure (a reaction to the
    worker's own status, the same whatever the plaintext)."""
    out = run(run_config, make())
    assert out.deviated and not out.quarantined and out.deviations_seen == 0
    assert out.local_calls == len(out.deviated) == 1
    assert out.tokens == out.plaintext == honest().tokens

    def layer_calls(o):
        return [(x.group, x.sizes) for x in o.observed if x.method == "Linear"]

    assert layer_calls(out) == layer_calls(honest())
    assert [x.method for x in out.observed].count("OpenSession") == 2


# -------------------------------------------------------------------------- issue 23's steering attack
SMOLLM2 = "smollm2-135m-instruct"
QUESTION = "What is the capital of France?"


def _smollm2_direction(run_config):
    """The steering direction, chosen offline from public weights: the final norm's gain times the embedding of
    the token " France" (pushes the residual stream towards "…Paris, France.")."""
    from bifrost.model.catalog import load_model, resolve
    from bifrost.model.tokenizer import load_tokenizer

    spec = resolve(SMOLLM2)
    net = load_model(spec, run_config.seed)
    target = load_tokenizer(spec.path).encode(" France")[0]
    d = (net.model.norm.weight * net.get_input_embeddings().weight[target]).detach().double().numpy()
    return lambda layer, d_out: d


def test_steering_smollm2_below_the_old_tolerance_is_caught_on_its_first_reply(run_config):
    """The attack that changed SmolLM2's answer undetected: a fixed δ with ‖δ‖ = 0.1·τ of the old tolerance added to
    every o_proj and down_proj decode output (bifrost+, the demo's chat prompt). The exact check catches its first
    deviated reply, the worker is quarantined, the answer is plaintext's, and the worker's view equals an honest
    run's."""
    layers = {f"model.layers.{i}.{m}" for i in range(30) for m in ("self_attn.o_proj", "mlp.down_proj")}
    attack = adv.steering(layers, 0.1, _smollm2_direction(run_config))
    cfg = run_config.replace(ckks=None)
    out = adv.run_attack(cfg, SMOLLM2, attack, QUESTION, new_tokens=12, mode="bifrost+", chat=True)
    base = adv.run_attack(cfg, SMOLLM2, None, QUESTION, new_tokens=12, mode="bifrost+", chat=True)
    assert out.text == base.text == "The capital of France is Paris."
    assert out.tokens == out.plaintext
    assert out.deviated and out.first_detection == out.deviated[0]
    assert len(out.quarantined) == 1 and next(iter(out.quarantined.values()))["reason"] == "product check"
    assert out.observed == base.observed


@pytest.mark.parametrize("fraction", [0.1, 1.0])
def test_steering_tenseal_at_its_tolerance(run_config, honest, fraction):
    """TenSEAL's replies carry SEAL's noise, so it keeps a tolerance check, and a deviation under the tolerance is
    not detectable by design. Measured here (gpt2-mini, δ on row 0 of every decode output of 4 layers, ‖δ‖ a
    fraction of τ as the worker computes it): at 0.1·τ nothing is detected and, τ being ~0.05 % of ‖y‖, no token
    changes; at 1·τ a reply escapes all 8 vectors with probability ≤ 0.68^8 ≈ 0.045, so the worker is caught
    within the run (here: 12 deviated replies) and no token changes either."""
    attack = adv.tenseal_steering(set(adv.ATTN_OUT + adv.MLP_OUT), fraction, adv._steer_direction)
    out = run(run_config, attack, backend="tenseal")
    assert len(out.deviated) == 4 * (NEW_TOKENS - 1)
    assert out.tokens == out.plaintext == honest(backend="tenseal").tokens
    if fraction < 1:
        assert not out.quarantined and out.deviations_seen == 0
    else:
        assert len(out.quarantined) == 1 and out.deviations_seen >= 1
        assert view(out, sizes=False) == view(honest(backend="tenseal"), sizes=False)
