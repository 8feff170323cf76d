"""Predicted vs. measured end-to-end latency on this machine, within +-25 %.

The profile is calibrated inside the test (``--quick``, ~15 s) rather than read from the committed
``configs/hardware/local-2core.yaml``: the machine is shared, and a profile measured minutes ago under the
same load predicts far better than one measured at another time; it also exercises the calibrate path.
The run uses the run config's backend and a real TrustedRuntime + gRPC worker on gpt2-2l (GPT-2 124M
widths, 2 layers); the committed full-size comparison is in benchmarks/estimator_validation.py.
"""

import pytest


@pytest.fixture(scope="module")
def quick_profile(run_config):
    from bifrost_estimator.calibrate import calibrate

    profile, report = calibrate("test-quick", quick=True, fhe=False, command="bifrost estimate calibrate --quick",
                                backend=run_config.backend)
    return profile


def test_bifrost_and_bifrost_plus_within_25_percent(quick_profile, worker_factory, run_config):
    from bifrost_estimator.validate import run_validation

    _, _, address = worker_factory("gpt2-2l")
    rows = run_validation(quick_profile, "gpt2-2l", [4], 4, ("bifrost", "bifrost+"), address=address, repeats=3)
    for r in rows:
        print(f"{r.mode}: TTFT {r.measured_ttft_s:.3f}/{r.predicted_ttft_s:.3f} s ({r.ttft_error:+.1%}), per token "
              f"{r.measured_per_token_s:.3f}/{r.predicted_per_token_s:.3f} s ({r.per_token_error:+.1%}), "
              f"total {r.total_error:+.1%}")
    for r in rows:
        assert abs(r.total_error) < 0.25, r.to_dict()
        assert abs(r.per_token_error) < 0.25, r.to_dict()
