"""``benchmarks/gpu_check.py``, the GPU check: a CPU smoke run (``--device cpu --quick``: the kernel tests, one
shape, the tiny gpt2-mini / qwen3-mini decode) gives one sane JSON document, and every third-party package it or
its test process imports is on the GPU machine's list or carried as a wheel. No timings are asserted.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(*args: str, tmp: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("OUT", "BIFROST_KERNELS_DEVICE")}
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=tmp, env=env, capture_output=True, text=True,
                          timeout=240)


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gpu_check")
    out = tmp / "sub" / "gpu_check.json"
    proc = _run("--device", "cpu", "--quick", "--out", str(out), tmp=tmp)
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    report = json.loads(proc.stdout)
    assert json.loads(out.read_text()) == report  # stdout and --out hold the same document
    return report


def test_quick_cpu_run_reports_every_step(quick_report):
    r = quick_report
    assert r["ok"] and r["problems"] == [] and r["quick"]
    assert r["machine"]["requested_device"] == "cpu" and r["machine"]["torch"] == torch.__version__
    tests = r["steps"]["tests"]
    assert tests["device"] == "cpu" and tests["exit_code"] == 0 and tests["deselected"] == {}
    assert tests["passed"] > 50 and tests["failed"] == tests["errors"] == 0 and tests["failing"] == []
    (row,) = r["steps"]["shapes"]["shapes"]
    assert row["shape"] == "768x768" and row["worker_apply_s"] > 0 and row["bytes_sent"] > 0 and row["bytes_received"] > 0
    assert row["verify_passed"] and row["error_over_error_bound"] < 1
    decode = r["steps"]["decode"]
    for name in ("gpt2-mini", "qwen3-mini"):
        d = decode[name]
        assert d["device"] == "cpu" and d["tokens_timed"] == 2 and d["groups_per_token"] == 8
        assert 0 < d["best_worker_s_per_token"] <= d["worker_s_per_token"]
        assert set(d["worker_stage_s_per_token"]) == {"unpack_s", "kernel_s", "pack_s"}
        assert 0 < sum(d["worker_stage_s_per_token"].values()) <= d["worker_s_per_token"] * 1.5
        assert d["bytes_up_per_token"] > 0 and d["bytes_down_per_token"] > 0 and d["prepared_bytes"] > 0
        assert 0 < d["max_error_over_error_bound"] < 1
    assert decode["qwen3-mini"]["delegated_layers"] == 14  # q/k/v and gate/up go as one call each


def test_imports_are_on_the_gpu_machine_or_carried(quick_report, gpu_check):
    imports = quick_report["imports"]
    assert imports["not_on_device"] == []
    allowed = gpu_check.listed(gpu_check.DEVICE_PACKAGES) | gpu_check.listed(gpu_check.WHEELS)
    for dist, entry in imports["third_party"].items():
        assert dist in allowed or dist in imports["dependencies_of_installed"], (dist, entry)
    for needed in ("torch", "numpy", "transformers", "pyyaml", "pytest"):
        assert needed in imports["third_party"]
    assert {"cryptography", "cffi"} <= set(imports["wheels"])  # the kernels' AES and its backend travel as wheels


def test_import_check_flags_what_the_repo_imports(gpu_check):
    loaded = {"torch": {"modules": ["torch"], "imported_by": ["repo"]},
              "fastapi": {"modules": ["fastapi"], "imported_by": ["repo"]},                # ours, absent there
              "cffi": {"modules": ["_cffi_backend"], "imported_by": ["cryptography"]},     # a wheel's, carried
              "pycparser-x": {"modules": ["pycparser_x"], "imported_by": ["cryptography"]},  # a wheel's, absent
              "httpx9": {"modules": ["httpx9"], "imported_by": ["huggingface-hub"]}}       # the machine's own
    result = gpu_check.check_imports(loaded)
    assert result["not_on_device"] == ["fastapi", "pycparser-x"]
    assert result["dependencies_of_installed"] == {"httpx9": ["huggingface-hub"]}


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_requested_without_cuda_fails_in_one_line(tmp_path):
    proc = _run("--device", "cuda", "--steps", "shapes", tmp=tmp_path)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith("gpu_check: error: --device cuda requested but CUDA is unavailable")
    assert proc.stderr.count("\n") == 1
