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
    # Bifrost+ differs only in the prefill, where it does no encrypted work at all
    assert by["bifrost+"]["per_token_s"] == pytest.approx(by["bifrost"]["per_token_s"], rel=1e-9)
    assert by["bifrost+"]["ttft_s"] < by["bifrost"]["ttft_s"]
    assert "bootstrap" in by["fhe"]["prefill"]["by_op"] and "encrypt" in by["fhe"]["prefill"]["by_op"]
    recipe = out["fhe_recipe"]
    assert recipe["fields"]["bootstrapping"] is True and recipe["derived"]["softmax_per_row_ct"]["depth"] == 10


def test_estimate_table_and_plot(tmp_path, capsys):
    png = tmp_path / "b.png"
    assert main(["estimate", "llama3-8b", "--profile", "gpu-published", "--prompt-len", "16", "--new-tokens", "2",
                 "--plot", str(png)]) == 0
    text = capsys.readouterr().out
    assert "speedup bifrost vs fhe" in text and png.stat().st_size > 1000


def test_write_failure_after_the_checks_is_one_line_error(tmp_path, capsys, monkeypatch):
    """A disk that fills up while the plot is written: bifrost/cli.py maps the OSError to one line, exit 1."""
    from bifrost_estimator import report

    def full_disk(*_a, **_k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(report, "plot", full_disk)
    assert main(["estimate", "gpt2", "--profile", "gpu-published", "--plot", str(tmp_path / "b.png")]) == 1
    err = capsys.readouterr().err.strip()
    assert "No space left on device" in err and len(err.splitlines()) == 1


def test_fhe_recipe_override_is_applied_and_reported(capsys):
    base = ["estimate", "gpt2-xl", "--profile", "gpu-published", "--scheme", "fhe", "--prompt-len", "8", "--new-tokens",
            "2", "--layers-only", "--json"]
    a = _json(capsys, base)["estimates"][0]
    out = _json(capsys, base + ["--fhe-recipe", "bootstrapping=false", "--fhe-recipe", "sign_polys=2"])
    b = out["estimates"][0]
    assert out["fhe_recipe"]["fields"]["bootstrapping"] is False and out["fhe_recipe"]["fields"]["sign_polys"] == 2
    assert "bootstrap" not in b["prefill"]["by_op"] and b["ttft_s"] < a["ttft_s"]


def test_layers_only_drops_exactly_the_head_terms_of_every_scheme(capsys):
    base = ["estimate", "gpt2", "--profile", "gpu-published", "--prompt-len", "8", "--new-tokens", "2", "--json"]
    full = {e["scheme"]: e for e in _json(capsys, base)["estimates"]}
    layers = {e["scheme"]: e for e in _json(capsys, base + ["--layers-only"])["estimates"]}
    for scheme, e in layers.items():
        assert set(e["prefill"]["by_scope"]) <= {"layer", "io"}
        assert "lm head" not in e["prefill"]["by_op"] and "sampling" not in e["prefill"]["by_op"]
        assert e["prefill"]["by_scope"]["layer"] == pytest.approx(full[scheme]["prefill"]["by_scope"]["layer"])
    # the fhe client still encrypts its input and decrypts what it gets back (as Bifrost's refreshes stay)
    assert {"encrypt", "decrypt"} <= set(layers["fhe"]["prefill"]["by_op"])
    assert {"encrypt", "decrypt"} <= set(layers["bifrost"]["prefill"]["by_op"])


@pytest.mark.parametrize("argv,msg", [
    (["estimate", "no-such-model", "--profile", "gpu-published"], "unknown model"),
    (["estimate", "gpt2", "--profile", "nope"], "unknown hardware profile"),
    (["estimate", "gpt2", "--profile", "gpu-published", "--scheme", "mpc"], "unknown scheme"),
    (["estimate", "gpt2", "--profile", "gpu-published", "--prompt-len", "2000"], "exceeds"),
    (["estimate", "gpt2", "--profile", "gpu-published", "--fhe-recipe", "nope=1"], "--fhe-recipe"),
    (["estimate", "gpt2", "--profile", "gpu-published", "--fhe-recipe", "sign_polys=x"], "integer"),
    (["estimate", "gpt2", "--profile", "gpu-published", "--fhe-recipe", "bootstrapping=maybe"], "true or false"),
    (["estimate", "gpt2", "--profile", "gpu-published", "--plot", "/nonexistent/dir/x.png"], "does not exist"),
    (["estimate", "gpt2", "--profile", "gpu-published", "--plot", "out.txt"], "unsupported format"),
    (["estimate", "calibrate"], "--out"),
    (["estimate", "calibrate", "--out", "/proc/x.yaml"], "cannot write"),
    (["estimate", "calibrate", "--out", "profile.txt"], ".yaml"),
    (["estimate", "validate", "--profile", "gpu-published", "--modes", "fhe"], "--modes"),
    (["estimate", "validate", "--address", "127.0.0.1:1"], "--worker-cert"),
])
def test_user_errors_exit_non_zero_with_one_line(argv, msg, capsys):
    assert main(argv) != 0
    err = capsys.readouterr().err.strip()
    assert msg in err and len(err.splitlines()) == 1


def test_calibrate_refuses_to_overwrite_a_profile_without_force(tmp_path, capsys):
    target = tmp_path / "mine.yaml"
    target.write_text("keep me")
    assert main(["estimate", "calibrate", "--out", str(target)]) != 0
    assert "--force" in capsys.readouterr().err and target.read_text() == "keep me"


@pytest.mark.parametrize("config,msg", [
    ({"model_type": "gpt2", "n_embd": 0}, "positive integer"),
    ({"model_type": "gpt2", "n_embd": "abc"}, "positive integer"),
    ({"model_type": "gpt2", "n_embd": 100, "n_head": 3}, "divisible"),
    ({"model_type": "llama", "hidden_size": 100, "num_attention_heads": 3, "intermediate_size": 64,
      "num_hidden_layers": 2}, "divisible"),
    ({"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, "intermediate_size": 64,
      "num_hidden_layers": -2}, "positive integer"),
    ([1, 2, 3], "JSON object"),
])
def test_bad_config_json_is_one_line_error(tmp_path, capsys, config, msg):
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert main(["estimate", str(tmp_path), "--profile", "gpu-published"]) != 0
    err = capsys.readouterr().err.strip()
    assert msg in err and len(err.splitlines()) == 1


def test_bad_profile_file_is_one_line_error(tmp_path, capsys):
    import yaml

    from bifrost_estimator.profile import HARDWARE_DIR

    data = yaml.safe_load((HARDWARE_DIR / "gpu-published.yaml").read_text())
    data["accelerator"]["linear"]["coeff_mod_bit_sizes"] = [70]
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(data))
    assert main(["estimate", "gpt2", "--profile", str(tmp_path / "p.yaml")]) != 0
    err = capsys.readouterr().err.strip()
    assert "coeff_mod_bit_sizes" in err and len(err.splitlines()) == 1


def test_bifrost_estimate_script_is_registered():
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "pyproject.toml").read_text()
    target = re.search(r'^bifrost-estimate = "([\w.]+):(\w+)"', text, re.M)
    assert target, "bifrost-estimate is not in [project.scripts]"
    import importlib

    assert callable(getattr(importlib.import_module(target.group(1)), target.group(2)))


def test_validation_table_fits_80_columns():
    from rich.console import Console

    from bifrost_estimator.report import validation_table
    from bifrost_estimator.validate import Comparison

    console = Console(width=80, record=True)
    rows = [Comparison("bifrost+", 16, 3, 0.0123, 0.011, 1.234, 1.2, 0.5, 0.013, 1.3)]
    validation_table(rows, "validation: gpt2 on profile local-2core", console)
    text = console.export_text()
    assert "bifrost+" in text and "…" not in text and max(len(line) for line in text.splitlines()) <= 80
    assert "traffic" not in text  # nothing was compared


def test_validation_table_reports_the_traffic_check():
    from rich.console import Console

    from bifrost_estimator.report import validation_table
    from bifrost_estimator.validate import Comparison

    ok = Comparison("bifrost", 5, 3, 1.0, 1.0, 0.3, 0.3, 1.0, traffic_checked=144)
    bad = Comparison("bifrost+", 5, 3, 1.0, 1.0, 0.3, 0.3, 1.0, traffic_checked=144,
                     traffic_mismatches=["bifrost+ L=5 forward 1 transformer.h.0.attn.c_attn: cts_out predicted 3, "
                                         "measured 4"])
    console = Console(width=80, record=True)
    validation_table([ok], "v", console)
    assert "all 144 fields as predicted" in " ".join(console.export_text().split())
    validation_table([ok, bad], "v", console)
    text = " ".join(console.export_text().split())
    assert "1 of 288 fields differ" in text and "cts_out predicted 3, measured 4" in text


def test_linear_cost_scales_with_prompt_rows_in_bifrost_not_bifrost_plus(capsys):
    a = _json(capsys, ["estimate", "gpt2", "--profile", "gpu-published", "--scheme", "all", "--prompt-len", "2",
                       "--new-tokens", "2", "--json"])
    b = _json(capsys, ["estimate", "gpt2", "--profile", "gpu-published", "--scheme", "all", "--prompt-len", "64",
                       "--new-tokens", "2", "--json"])
    ea = {e["scheme"]: e for e in a["estimates"]}
    eb = {e["scheme"]: e for e in b["estimates"]}
    assert eb["bifrost"]["prefill"]["by_op"]["linear (CKKS)"] > 10 * ea["bifrost"]["prefill"]["by_op"]["linear (CKKS)"]
    assert "linear (CKKS)" not in eb["bifrost+"]["prefill"]["by_op"]


def test_model_is_taken_as_a_flag_too_and_conflicts_are_refused(capsys):
    """``--model`` (as every other command takes it) picks the model; it was read as validate's and ignored."""
    import json

    assert main(["estimate", "--model", "llama3-8b", "--json", "--scheme", "bifrost"]) == 0
    flag = json.loads(capsys.readouterr().out)
    assert {e["model"] for e in flag["estimates"]} == {"llama3-8b"}
    assert main(["estimate", "llama3-8b", "--json", "--scheme", "bifrost"]) == 0
    assert json.loads(capsys.readouterr().out) == flag
    assert main(["estimate", "--model", "no-such-model"]) != 0
    assert "unknown model 'no-such-model'" in capsys.readouterr().err
    assert main(["estimate", "gpt2", "--model", "llama3-8b"]) != 0
    err = capsys.readouterr().err.strip()
    assert "two models given" in err and "\n" not in err
