"""The estimator's worker traffic equals the trusted engine's, exactly, for a real TrustedRuntime and worker.

Wall time depends on the machine's load, so measured-vs-predicted latency is a benchmark
(``benchmarks/estimator_validation.py``, ``bifrost estimate validate``), not a test. What the model must get
exactly right whatever the load is what it counts: per forward and per layer group, the worker calls, the rows
they carry (padded to ``row_bucket``), the input and output ciphertexts and, for the native backend, the bytes
each way (its exact ``call_bytes``). The engine records the same quantities in ``stats.groups``.

Configurations (native backend): gpt2-mini (d=64) in both modes at prompt lengths 3 (no padding), 5 (padded
to 6) and 65 (padded to 96: native calls of 64 and 32 rows), 3 tokens each; gpt2-2l (GPT-2 124M
widths: several input and output blocks per call) at prompt length 5 in bifrost mode. TenSEAL (gpt2-mini,
bifrost, 5 -> 6 rows): calls, rows and ciphertext counts only — SEAL's compressed ciphertexts have no
exact size, so the model's bytes there are the profile's median sizes.
"""

import dataclasses

import pytest

from bifrost.ckks import TRAFFIC_FIELDS
from bifrost.config_loader import ckks_params_of
from bifrost_estimator.model import delegated_calls, forward_traffic
from bifrost_estimator.profile import load_profile
from bifrost_estimator.shapes import load_shape
from bifrost_estimator.validate import measured_traffic, predicted_traffic, traffic_mismatches

NEW_TOKENS = 3
PROFILES = {"native": "local-2core", "tenseal": "local-2core-tenseal"}  # their CKKS parameters are the defaults


def _config(run_config, backend: str):
    """The run config on ``backend``: its own CKKS parameters for its own backend, else the other's defaults."""
    return run_config if backend == run_config.backend else run_config.replace(backend=backend, ckks=None)


@pytest.fixture(scope="module")
def runtimes(run_config, worker_factory):
    from bifrost.tee.runtime import TrustedRuntime

    made = {}

    def get(model: str, backend: str):
        if (model, backend) not in made:
            _, _, endpoint = worker_factory(model)
            made[(model, backend)] = TrustedRuntime(_config(run_config, backend).replace(model=model), endpoint)
        return made[(model, backend)]

    yield get
    for rt in made.values():
        rt.close()


@pytest.fixture(scope="module")
def profiles(run_config):
    def get(backend: str):
        prof = load_profile(PROFILES[backend])
        params, ops = ckks_params_of(_config(run_config, backend)), prof.accelerator.linear
        assert (ops.poly_modulus_degree, ops.coeff_mod_bit_sizes) == (params.poly_modulus_degree,
                                                                      params.coeff_mod_bit_sizes)
        return prof

    return get


def _prompt(n: int) -> list[int]:
    return [(17 * i + 11) % 5000 + 1 for i in range(n)]


@pytest.mark.parametrize("model,mode,prompt_len,backend", [
    ("gpt2-mini", mode, L, "native") for mode in ("bifrost", "bifrost+") for L in (3, 5, 65)]
    + [("gpt2-2l", "bifrost", 5, "native"), ("gpt2-mini", "bifrost", 5, "tenseal")])
def test_predicted_worker_traffic_equals_the_engines(runtimes, profiles, model, mode, prompt_len, backend):
    rt, shape, profile = runtimes(model, backend), load_shape(model), profiles(backend)
    timings, measured = measured_traffic(rt, _prompt(prompt_len), NEW_TOKENS, mode)
    assert len(measured) == NEW_TOKENS and timings[0].deviations == 0
    checked, wrong = traffic_mismatches(profile, shape, rt.engine.shapes, measured, prompt_len, mode)
    assert not wrong, "\n".join(wrong)
    groups = shape.n_layers * len(shape.groups())
    assert checked == NEW_TOKENS * groups * (6 if backend == "native" else 4)  # tenseal: bytes not exact
    # what was compared is what the engine really did: prefill and decode steps, padding included
    prefill = forward_traffic(profile, shape, prompt_len, local_linears=mode == "bifrost+")
    if mode == "bifrost+":
        assert all(s.calls == 0 for s in measured[0].values()) and all(t.calls == 0 for t in prefill.values())
    else:
        assert sum(s.rows for s in measured[0].values()) == groups * sum(
            c.rows for c in delegated_calls(profile, shape.groups()[0], prompt_len))
    assert all(s.calls == 1 and s.rows == 1 for step in measured[1:] for s in step.values())
    assert sum(s.bytes_sent for s in measured[1].values()) > 0


def test_padding_and_call_splitting_are_what_was_measured(profiles):
    """The configurations above cover a padded prompt and a native prompt split into several calls (or the
    test would compare less than it claims)."""
    shape = load_shape("gpt2-mini")
    native, tenseal = profiles("native"), profiles("tenseal")
    for g in shape.groups():
        assert [c.rows for c in delegated_calls(native, g, 5)] == [c.rows for c in delegated_calls(tenseal, g, 5)] == [6]
        assert [c.rows for c in delegated_calls(native, g, 3)] == [3]
        long = delegated_calls(native, g, 65)
        assert [c.rows for c in long] == [64, 32] and all(c.counts.row_blocks == c.rows and c.exact_bytes for c in long)
        assert not any(c.exact_bytes for c in delegated_calls(tenseal, g, 5))


def test_a_wrong_prediction_is_reported(runtimes, profiles):
    """The comparison can fail: one ciphertext more in the measured traffic is named."""
    rt, shape, profile = runtimes("gpt2-mini", "native"), load_shape("gpt2-mini"), profiles("native")
    _, measured = measured_traffic(rt, _prompt(5), 2, "bifrost")
    group = next(iter(rt.engine.shapes))
    measured[1][group] = dataclasses.replace(measured[1][group], cts_out=measured[1][group].cts_out + 1)
    checked, wrong = traffic_mismatches(profile, shape, rt.engine.shapes, measured, 5, "bifrost")
    assert len(wrong) == 1 and "forward 1" in wrong[0] and "cts_out" in wrong[0] and group[0] in wrong[0]
    assert predicted_traffic(profile, shape, 5, 2, "bifrost")[1] == forward_traffic(profile, shape, 1)
    assert set(TRAFFIC_FIELDS) <= {f.name for f in dataclasses.fields(measured[1][group])}
