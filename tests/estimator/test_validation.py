"""Predicted vs. measured end-to-end latency on this machine: TTFT and time per output token, for Bifrost and
Bifrost+, at two prompt lengths, each within +-25 %.

The profile is calibrated inside the test (``--quick``, ~15 s) rather than read from the committed
``configs/hardware/local-2core.yaml``: the machine is shared, and a profile measured seconds ago under the
same load predicts far better than one measured at another time; it also exercises the calibrate path
(its in-situ step uses llama-mini layers, not the model validated here). The run uses the run config's
backend and a real TrustedRuntime + gRPC worker on gpt2-2l: GPT-2 124M's widths with 2 of its 12 layers,
so every delegated shape is the full model's and a Bifrost+ prefill takes tens of milliseconds rather
than the ~4 ms of gpt2-mini, where 1 ms of interference was 25 %. The full-size comparison (all 12
layers) is ``bifrost estimate validate --model gpt2`` and ``benchmarks/estimator_validation.py``.
"""

import pytest

TOLERANCE = 0.25


@pytest.fixture(scope="module")
def quick_profile(run_config):
    from bifrost_estimator.calibrate import calibrate

    profile, _ = calibrate("test-quick", quick=True, fhe=False, command="bifrost estimate calibrate --quick",
                           backend=run_config.backend)
    return profile


def test_ttft_and_per_token_within_25_percent_for_both_modes(quick_profile, worker_factory):
    from bifrost_estimator.validate import run_validation

    _, _, address = worker_factory("gpt2-2l")
    rows = run_validation(quick_profile, "gpt2-2l", [4, 16], 3, ("bifrost", "bifrost+"), address=address, repeats=4)
    assert {(r.mode, r.prompt_len) for r in rows} == {(m, L) for m in ("bifrost", "bifrost+") for L in (4, 16)}
    report = "\n".join(f"{r.mode} L={r.prompt_len}: TTFT {r.measured_ttft_s * 1e3:.1f}/{r.predicted_ttft_s * 1e3:.1f} ms "
                       f"({r.ttft_error:+.1%}), per token {r.measured_per_token_s * 1e3:.1f}/"
                       f"{r.predicted_per_token_s * 1e3:.1f} ms ({r.per_token_error:+.1%}); split "
                       + " ".join(f"{k}.{c}: {r.components[k]['measured'][c] * 1e3:.1f}/{r.components[k]['predicted'][c] * 1e3:.1f}"
                                  for k in ("ttft", "per_token") for c in r.components[k]['measured'])
                       for r in rows)
    print(report)
    for r in rows:
        assert abs(r.ttft_error) < TOLERANCE, report
        assert abs(r.per_token_error) < TOLERANCE, report
