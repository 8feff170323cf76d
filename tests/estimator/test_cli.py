"""CLI: exit codes, JSON output, plot, and the model's basic invariants."""

import json

import pytest

from bifrost.cli import main


def _json(capsys, argv):
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_estimate_json_all_schemes(capsys):
    out = _json(capsys, ["estimate", "gpt2", "--profile", "gpu-published", "--scheme", "all", "--prompt-len", "8",
                         "--new-tokens", "4", "--json"])
    by = {e["scheme"]: e for e in out["estimates"]}
    assert set(by) == {"fhe", "bifrost", "bifrost+"}
    assert out["linear_macs_per_token"] == 12 * (768 * 2304 + 768 * 768 + 768 * 3072 + 3072 * 768)
    for e in by.values():
        assert e["total_s"] == pytest.approx(e["ttft_s"] + 3 * e["per_token_s"], rel=1e-9)
        assert set(e["decode_mean"]["by_device"]) <= {"accelerator", "tee", "link"}
    # Bifrost+ differs only in the prefill; fhe is slower than both
    assert by["bifrost+"]["per_token_s"] == pytest.approx(by["bifrost"]["per_token_s"], rel=1e-9)
    assert by["bifrost+"]["ttft_s"] < by["bifrost"]["ttft_s"] < by["fhe"]["ttft_s"]
    assert by["bifrost"]["per_token_s"] < by["fhe"]["per_token_s"]


def test_estimate_table_and_plot(tmp_path, capsys):
    png = tmp_path / "b.png"
    assert main(["estimate", "llama3-8b", "--profile", "gpu-published", "--prompt-len", "16", "--new-tokens", "2",
                 "--plot", str(png)]) == 0
    text = capsys.readouterr().out
    assert "speedup bifrost vs fhe" in text and png.stat().st_size > 1000


@pytest.mark.parametrize("argv,msg", [
    (["estimate", "no-such-model", "--profile", "gpu-published"], "unknown model"),
    (["estimate", "gpt2", "--profile", "nope"], "unknown hardware profile"),
    (["estimate", "gpt2", "--profile", "gpu-published", "--scheme", "mpc"], "unknown scheme"),
    (["estimate", "gpt2", "--profile", "gpu-published", "--prompt-len", "2000"], "exceeds"),
    (["estimate", "calibrate"], "--out"),
])
def test_user_errors_exit_2_with_one_line(argv, msg, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert msg in err and len(err.splitlines()) == 1


def test_linear_cost_scales_with_prompt_rows_in_bifrost_not_bifrost_plus(capsys):
    a = _json(capsys, ["estimate", "gpt2", "--profile", "gpu-published", "--scheme", "all", "--prompt-len", "2",
                       "--new-tokens", "2", "--json"])
    b = _json(capsys, ["estimate", "gpt2", "--profile", "gpu-published", "--scheme", "all", "--prompt-len", "64",
                       "--new-tokens", "2", "--json"])
    ea = {e["scheme"]: e for e in a["estimates"]}
    eb = {e["scheme"]: e for e in b["estimates"]}
    assert eb["bifrost"]["prefill"]["by_op"]["linear (CKKS)"] > 10 * ea["bifrost"]["prefill"]["by_op"]["linear (CKKS)"]
    assert "linear (CKKS)" not in eb["bifrost+"]["prefill"]["by_op"]
