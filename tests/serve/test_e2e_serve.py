"""End to end: `bifrost serve` as a subprocess (Ray actors + a local CKKS worker process), a client
attests with an explicit test policy that allows simulated evidence, chats, and gets exactly the
tokens of plaintext inference. Also runs `bifrost chat` against it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from bifrost.model.tokenizer import ByteTokenizer

from .conftest import MODEL, make_policy, plaintext_greedy

PROMPT = "Attested hello"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e")
    port_file, run_dir = tmp / "port", tmp / "run"
    home_ray_existed = (Path.home() / ".ray").exists()
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "bifrost.cli", "serve", "--model", MODEL, "--port", "0", "--port-file", str(port_file),
         "--run-dir", str(run_dir), "--runtime", "ray", "--max-sessions", "4"],
        stdout=subprocess.DEVNULL, stderr=open(tmp / "serve.stderr", "wb"), env=env)
    deadline = time.monotonic() + 240
    while not port_file.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"bifrost serve did not start: {(tmp / 'serve.stderr').read_text()[-2000:]}")
        time.sleep(0.2)
    yield proc, f"127.0.0.1:{port_file.read_text().strip()}", run_dir, tmp, home_ray_existed
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_serve_subprocess_chat_equals_plaintext(served, run_config):
    from bifrost.serve.actors import model_digest
    from bifrost.model.catalog import resolve
    from bifrost.serve.client import BifrostClient

    proc, address, run_dir, tmp, home_ray_existed = served
    digest = model_digest(resolve(MODEL), run_config.seed)  # computed by the client from public weights
    with BifrostClient(address, make_policy(digest), timeout_s=120) as client:
        verdict = client.attest()
        assert verdict.simulated and client.model_digest == digest
        result = client.chat(PROMPT, 8)
    expected = plaintext_greedy(MODEL, run_config.seed, ByteTokenizer().encode(PROMPT), 8)
    assert result.tokens == expected
    assert result.ttft_s > 0 and result.tpot_s > 0
    # Ray's temp dir and auth token live in the run folder, not in ~/.ray or /tmp/ray
    assert any((run_dir / "ray").iterdir())
    assert (run_dir / "ray-auth-token").exists()
    assert home_ray_existed or not (Path.home() / ".ray").exists()
    assert proc.poll() is None
    banner = (tmp / "serve.stderr").read_text()  # printed before the port file is written
    assert "evidence simulated" in banner and "evidence provider is SIMULATED" in banner


def test_chat_cli_refuses_simulated_by_default_and_streams_with_explicit_policy(served, run_config):
    from bifrost.serve.actors import model_digest
    from bifrost.model.catalog import resolve

    proc, address, run_dir, tmp, _ = served
    digest = model_digest(resolve(MODEL), run_config.seed).hex()
    strict, dev = tmp / "strict.yaml", tmp / "dev.yaml"
    strict.write_text(yaml.safe_dump({"model_digests": [digest]}))
    dev.write_text(yaml.safe_dump({"allow_simulated": True, "model_digests": [digest]}))
    cmd = [sys.executable, "-m", "bifrost.cli", "chat", "--address", address, "--prompt", PROMPT, "--max-new-tokens", "3"]
    refused = subprocess.run(cmd + ["--policy", str(strict)], capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0 and "simulated" in refused.stderr
    ok = subprocess.run(cmd + ["--policy", str(dev)], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert "time to first token" in ok.stderr and "time per output token" in ok.stderr
    # the server's log never contains the prompt
    log = (run_dir / "serve.log").read_text()
    assert "session" in log and PROMPT not in log
