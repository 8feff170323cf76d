"""The OpenFHE baseline of ``benchmarks/kernels_bench.py`` (``benchmarks/openfhe_bsgs.py``).

openfhe-python has no CPython 3.11 wheel, so the baseline runs in its own venv
(``benchmarks/.venv-openfhe``, made by ``make bench-kernels``). With that venv the script runs for real on
small shapes; without it, kernels_bench must say why the baseline was skipped. The slot layout is checked
on plain numpy vectors (rotations as ``np.roll``) either way. No timings are asserted.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
SCRIPT = BENCH / "openfhe_bsgs.py"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bsgs():
    return _load("openfhe_bsgs")


@pytest.fixture(scope="module")
def kernels_bench():
    return _load("kernels_bench")


def _simulate(plan, w, x) -> np.ndarray:
    """The product of ``openfhe_bsgs.bsgs_product`` on plain slot vectors (left rotation by r = roll by -r)."""
    pts = plan.diagonals(w)
    xs = plan.input_slots(x)
    baby = [np.roll(xs, -b) for b in range(plan.n1)]
    acc = np.zeros(plan.slots)
    for g in range(plan.n2):
        inner = sum((pts[(g, b)] * baby[b] for b in range(plan.n1) if (g, b) in pts), np.zeros(plan.slots))
        acc += np.roll(inner, -g * plan.n1)
    for shift in plan.block_shifts:
        acc = acc + np.roll(acc, -shift)
    return acc[: plan.d_out]


@pytest.mark.parametrize("shape", [(768, 768), (64, 64), (100, 37), (37, 100), (1024, 1024), (5, 3)])
@pytest.mark.parametrize("layout", ["packed", "plain"])
def test_slot_layout_computes_w_times_x(bsgs, shape, layout):
    d_in, d_out = shape
    rng = np.random.default_rng(d_in * 7 + d_out)
    w, x = rng.normal(0, 1, (d_out, d_in)), rng.normal(0, 1, d_in)
    plan = bsgs.Plan(d_in, d_out, 4096, layout, None)
    assert plan.n1 * plan.n2 >= plan.c and plan.p * (plan.d + plan.c) <= plan.slots + 1
    assert plan.p == 1 or layout == "packed"
    np.testing.assert_allclose(_simulate(plan, w, x), w @ x, rtol=1e-9, atol=1e-9)


def test_768_packs_four_diagonals_per_multiply(bsgs):
    plan = bsgs.Plan(768, 768, 4096, "packed", None)
    assert (plan.p, plan.c) == (4, 192)
    assert len(plan.diagonals(np.ones((768, 768)))) == 192
    assert plan.rotation_indices() == sorted(set(range(1, plan.n1)) | {g * plan.n1 for g in range(1, plan.n2)}
                                             | {960, 1920})


def test_shape_too_large_for_ring_is_refused(bsgs):
    with pytest.raises(ValueError, match="--ring-dim 16384"):
        bsgs.Plan(768, 3072, 4096, "packed", None)


@pytest.mark.parametrize("argv, message", [
    (["--shapes", "64"], "INxOUT"), (["--shapes", "0x5"], "INxOUT"), (["--repeats", "0"], "positive integer"),
    (["--ring-dim", "3000"], "power of two"), (["--layouts", "diagonal"], "invalid choice"),
])
def test_bad_arguments_get_one_line_errors(argv, message):
    proc = subprocess.run([sys.executable, str(SCRIPT), *argv], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and message in proc.stderr.splitlines()[-1]
    assert "Traceback" not in proc.stderr and proc.stdout == ""


def test_without_openfhe_the_script_says_what_to_install():
    # -S: no site-packages, so neither openfhe nor numpy is importable whatever this venv holds.
    proc = subprocess.run([sys.executable, "-S", str(SCRIPT), "--shapes", "64x64"], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "cannot import openfhe" in proc.stderr and "openfhe-requirements.txt" in proc.stderr


def test_kernels_bench_openfhe_baseline(kernels_bench):
    python = kernels_bench.OPENFHE_PYTHON
    if python.exists():  # the venv `make bench-kernels` creates: a real OpenFHE run on small shapes
        report = kernels_bench.openfhe_baseline(str(python), repeats=1, shapes=("64x64", "100x37"))
        assert "skipped" not in report, report.get("skipped")
        assert report["params"]["security"] == "HEStd_128_classic" and report["params"]["ring_dim"] >= 8192
        assert [(r["shape"], r["layout"]) for r in report["results"]] == [
            ("64x64", "packed"), ("64x64", "plain"), ("100x37", "packed"), ("100x37", "plain")]
        for r in report["results"]:
            assert r["within_bound"] and 0 <= r["max_abs_error"] <= r["error_bound"] < 1e-3
            assert r["product_s"] > 0 and r["encrypt_s"] > 0 and r["decrypt_s"] > 0
            assert r["bytes_sent"] > r["bytes_received"] > 0  # the result is returned rescaled (one prime)
    else:  # no venv: kernels_bench skips the baseline and says why
        assert ".venv-openfhe" in kernels_bench.openfhe_baseline(None, repeats=1)["skipped"]
        no_openfhe = kernels_bench.openfhe_baseline(sys.executable, repeats=1, shapes=("64x64",))
        assert no_openfhe.keys() == {"skipped"}
        assert "exited 2" in no_openfhe["skipped"] and "cannot import openfhe" in no_openfhe["skipped"]
    missing = kernels_bench.openfhe_baseline("/nonexistent/python3.10", repeats=1)
    assert missing.keys() == {"skipped"} and "cannot run /nonexistent/python3.10" in missing["skipped"]
