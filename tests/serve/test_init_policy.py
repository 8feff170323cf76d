"""`bifrost attest init-policy` against a real in-process server, and `bifrost serve --print-digests --policy-out`."""

from __future__ import annotations

import socket

import pytest

from bifrost.attest.policy import load_policy
from bifrost.cli import main

from .conftest import MODEL


@pytest.fixture(scope="module")
def tee_only_app(serve_run_config, serve_config):
    from bifrost.tee.deploy import ServeApp

    app = ServeApp(serve_run_config.replace(policy="tee-only"), serve_config.replace(workers=(), worker_certs=())).start()
    yield app
    app.stop()


def test_init_policy_pins_the_served_digests_and_attests(tee_only_app, tmp_path, capsys):
    from bifrost.serve.client import BifrostClient

    app, out = tee_only_app, tmp_path / "policy.yaml"
    address = f"127.0.0.1:{app.port}"
    assert main(["attest", "init-policy", "--address", address, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "SIMULATED" in printed and "--print-digests" in printed
    text = out.read_text()
    assert "DEVELOPMENT ONLY" in text and "UNAUTHENTICATED" in text and "bifrost serve --print-digests" in text
    assert "snp:" in text and "measurements" in text and "min_tcb" in text and "mrtd" in text
    policy = load_policy(out)
    assert policy.allow_simulated and not policy.allow_debug
    assert policy.model_digests == (app.service.info.model_digest,)
    assert policy.serving_config_digests == (app.service.info.serving_config_digest,)
    with BifrostClient(address, policy, timeout_s=120) as client:
        assert client.attest().simulated
        assert len(client.chat("Hi", 2).tokens) == 2

    out.write_text("mine\n")  # an existing file is kept without --force
    assert main(["attest", "init-policy", "--address", address, "--out", str(out)]) != 0
    err = capsys.readouterr().err
    assert "exists" in err and "--force" in err and len(err.strip().splitlines()) == 1
    assert out.read_text() == "mine\n"
    assert main(["attest", "init-policy", "--address", address, "--out", str(out), "--force"]) == 0
    assert load_policy(out) == policy


def test_init_policy_unreachable_server_is_one_line(tmp_path, capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    out = tmp_path / "policy.yaml"
    assert main(["attest", "init-policy", "--address", f"127.0.0.1:{port}", "--out", str(out), "--timeout", "5"]) != 0
    err = capsys.readouterr().err
    assert err.startswith("bifrost: error: cannot list the models") and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_rendered_policy_for_hardware_evidence_refuses_simulated(tmp_path):
    from bifrost.attest.init_policy import ServedModel, remote_source, render_policy, write_policy

    m = ServedModel("m", bytes(range(32)), bytes(32))
    text = render_policy([m], "sev-snp", remote_source("h:1"))
    assert "DEVELOPMENT ONLY" not in text and "allow_simulated: false" in text
    write_policy(tmp_path / "p.yaml", text)
    policy = load_policy(tmp_path / "p.yaml")
    assert not policy.allow_simulated and policy.model_digests == (m.model_digest,)
    assert policy.snp.allowed_vmpls == (0,) and policy.tdx.allowed_tcb_statuses == ("UpToDate",)


def test_serve_print_digests_policy_out(tmp_path, capsys):
    out = tmp_path / "policy.yaml"
    argv = ["serve", "--model", MODEL, "--evidence", "simulated", "--print-digests", "--policy-out", str(out)]
    assert main(argv) == 0
    printed = dict(line.split(": ") for line in capsys.readouterr().out.splitlines())
    policy = load_policy(out)
    assert policy.allow_simulated and "DEVELOPMENT ONLY" in out.read_text()
    assert policy.model_digests == (bytes.fromhex(printed["model_digest"]),)
    assert policy.serving_config_digests == (bytes.fromhex(printed["serving_config_digest"]),)
    assert main(argv) != 0 and "exists" in capsys.readouterr().err
    assert main(argv + ["--force"]) == 0


def test_serve_mode_is_bound_into_the_serving_config_digest(capsys):
    """`bifrost serve --mode bifrost+` (prompts prefilled in the TEE) is a different serving configuration:
    a client pinning the default's digest refuses it."""
    digests = {}
    for mode in ("bifrost", "bifrost+"):
        assert main(["serve", "--model", MODEL, "--evidence", "simulated", "--print-digests", "--mode", mode]) == 0
        printed = dict(line.split(": ") for line in capsys.readouterr().out.splitlines())
        digests[mode] = (printed["model_digest"], printed["serving_config_digest"])
    assert main(["serve", "--model", MODEL, "--evidence", "simulated", "--print-digests"]) == 0
    default = dict(line.split(": ") for line in capsys.readouterr().out.splitlines())
    assert digests["bifrost"] == (default["model_digest"], default["serving_config_digest"])
    assert digests["bifrost"][0] == digests["bifrost+"][0] and digests["bifrost"][1] != digests["bifrost+"][1]
