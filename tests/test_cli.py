"""The command line: one-line errors with non-zero exit codes, and the demo's JSON report."""

import json
import subprocess
import sys

import pytest


def _bifrost(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "bifrost.cli", *args], capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


@pytest.mark.parametrize("args,needle", [
    (["demo", "--model", "/no/such/checkpoint"], "checkpoint path does not exist"),
    (["generate", "--model", "gpt7-ultra"], "unknown model"),
    (["demo", "--backend", "rot13", "--model", "gpt2-mini"], "unknown CKKS backend"),
    (["demo", "--model", "gpt2-mini", "--max-new-tokens", "0"], "at least 1"),
    (["embed", "--model", "gpt2-mini", "hi"], "not an encoder"),
    (["worker", "--config", "/no/such.yaml"], "config file not found"),
])
def test_bad_input_is_one_line_and_nonzero(args, needle):
    r = _bifrost(*args, timeout=120)
    assert r.returncode != 0
    assert needle in r.stderr
    assert "Traceback" not in r.stderr
    assert len([l for l in r.stderr.strip().splitlines() if l.startswith("bifrost: error")]) == 1


def test_insecure_config_is_refused_at_load(tmp_path):
    cfg = tmp_path / "weak.yaml"
    cfg.write_text("ckks:\n  poly_modulus_degree: 4096\n  coeff_mod_bit_sizes: [60, 40, 60]\n  scale_bits: 40\n")
    r = _bifrost("demo", "--config", str(cfg), timeout=120)
    assert r.returncode != 0 and "128-bit" in r.stderr and "Traceback" not in r.stderr


def test_unknown_config_key_is_refused(tmp_path):
    cfg = tmp_path / "typo.yaml"
    cfg.write_text("modle: gpt2\n")
    r = _bifrost("demo", "--config", str(cfg), timeout=120)
    assert r.returncode != 0 and "unknown key" in r.stderr


def test_demo_json_report_on_a_small_model():
    r = _bifrost("demo", "--model", "gpt2-mini", "--max-new-tokens", "4", "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    rep = json.loads(r.stdout)
    assert rep["fidelity"]["identical_to_plaintext_greedy"] is True
    assert rep["fidelity"]["max_abs_logit_error"] < 1e-3
    assert len(rep["per_token"]) == 4 and rep["delegated_layers"] == 8
    assert rep["decode_breakdown_mean_s"]["worker_s"] > 0
    assert rep["decode_bytes_per_token"]["sent"] > 0


@pytest.mark.parametrize("command", ["demo", "generate", "serve"])
def test_an_unknown_mode_is_refused_naming_the_flag(command):
    r = _bifrost(command, "--mode", "bifrost++", timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "argument --mode: invalid choice: 'bifrost++' (choose from 'bifrost', 'bifrost+')" in r.stderr


def test_mode_bifrost_plus_prefills_in_the_tee():
    r = _bifrost("generate", "--model", "gpt2-mini", "--prompt", "Private LLM", "--max-new-tokens", "3", "--mode",
                 "bifrost+", "--compare", "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    rep = json.loads(r.stdout)
    assert rep["mode"] == "bifrost+" and rep["fidelity"]["identical_to_plaintext_greedy"] is True
    prefill, decode = rep["per_token"][0], rep["per_token"][1:]
    assert prefill["calls"] == 0 and prefill["bytes_sent"] == 0  # the prompt never reached the worker
    assert all(t["calls"] > 0 and t["bytes_sent"] > 0 for t in decode)


def test_the_default_demo_answers_with_smollm2_identical_to_plaintext():
    """`make demo`'s job: the real SmolLM2-135M-Instruct answers in its chat template through the hybrid path,
    stops at its end-of-turn token, equals plaintext PyTorch, and nothing prints a FutureWarning."""
    r = _bifrost("demo", "--json", timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "FutureWarning" not in r.stderr
    rep = json.loads(r.stdout)
    assert rep["model"] == "smollm2-135m-instruct" and rep["chat_template"] is True
    assert rep["delegated_layers"] == 210
    assert rep["finish_reason"] == "stop" and "Paris" in rep["text"]
    assert rep["fidelity"]["identical_to_plaintext_greedy"] is True
    assert rep["fidelity"]["agreeing_steps"] == rep["fidelity"]["steps"] == len(rep["tokens"])
    assert rep["verification"]["deviations"] == 0


def test_generate_on_a_checkpoint_directory_of_an_architecture_without_bifrost_code(tmp_path):
    from tests.checkpoints import build_checkpoint

    path = build_checkpoint("gemma2", tmp_path)
    r = _bifrost("generate", "--model", str(path), "--prompt", "Private LLM", "--max-new-tokens", "4",
                 "--compare", "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    rep = json.loads(r.stdout)
    assert rep["model"] == str(path) and rep["delegated_layers"] == 14
    assert rep["tokenizer"].startswith("byte-level fallback")
    assert rep["fidelity"]["identical_to_plaintext_greedy"] is True
    assert rep["fidelity"]["max_abs_logit_error"] < 1e-3


def test_checkpoint_of_an_unknown_model_type_is_one_line(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "frobnicator-9000"}')
    r = _bifrost("generate", "--model", str(tmp_path), timeout=120)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    errors = [line for line in r.stderr.strip().splitlines() if line.startswith("bifrost: error")]
    assert len(errors) == 1 and "model_type 'frobnicator-9000'" in errors[0] and "not known to transformers" in errors[0]
