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

from .conftest import MODEL, ControlledWorker, make_policy, plaintext_greedy, ray_default_dirs_listing

PROMPT = "Attested hello"


def _start_serve(tmp: Path, *flags: str) -> tuple[subprocess.Popen, str]:
    """`bifrost serve ... --port 0` as a subprocess; returns it and its address once it serves."""
    port_file = tmp / "port"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "bifrost.cli", "serve", "--model", MODEL, "--port", "0", "--port-file", str(port_file),
         "--run-dir", str(tmp / "run"), *flags],
        stdout=subprocess.DEVNULL, stderr=open(tmp / "serve.stderr", "wb"), env=env)
    deadline = time.monotonic() + 240
    while not port_file.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            pytest.fail(f"bifrost serve did not start: {(tmp / 'serve.stderr').read_text()[-2000:]}")
        time.sleep(0.2)
    return proc, f"127.0.0.1:{port_file.read_text().strip()}"


def _stop_serve(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e")
    ray_dirs_before = ray_default_dirs_listing()
    proc, address = _start_serve(tmp, "--runtime", "ray", "--max-sessions", "4")
    yield proc, address, tmp / "run", tmp, ray_dirs_before
    _stop_serve(proc)
    # SIGTERM is a clean stop (Ray's own handler would dump a stack and abort)
    assert proc.returncode == 0 and "SIGTERM received" not in (tmp / "serve.stderr").read_text()
    assert ray_default_dirs_listing() == ray_dirs_before  # also after Ray shut down


def test_serve_subprocess_chat_equals_plaintext(served, run_config):
    from bifrost.model.digests import model_digest
    from bifrost.model.catalog import resolve
    from bifrost.serve.client import BifrostClient

    proc, address, run_dir, tmp, ray_dirs_before = served
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
    assert ray_default_dirs_listing() == ray_dirs_before  # nothing new in ~/.ray (auth_token) or /tmp/ray
    assert proc.poll() is None
    banner = (tmp / "serve.stderr").read_text()  # printed before the port file is written
    assert "evidence simulated" in banner and "evidence provider is SIMULATED" in banner


def test_serve_and_its_ray_listen_on_loopback_only(served):
    """`bifrost serve` binds 127.0.0.1, and so does every port of the Ray it starts (GCS, raylet, object manager,
    core workers, agents), which binds all interfaces unless its node address is the loopback one."""
    import psutil

    root = psutil.Process(served[0].pid)
    listening = []
    for p in [root, *root.children(recursive=True)]:
        try:
            listening += [(p.name(), c.laddr.ip) for c in p.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
        except psutil.NoSuchProcess:
            continue
    names = {name for name, _ in listening}
    assert {"gcs_server", "raylet"} <= names  # Ray's own servers were found among the serve process's children
    assert all(ip in ("127.0.0.1", "::ffff:127.0.0.1", "::1") for _, ip in listening), listening


def test_chat_cli_refuses_simulated_by_default_and_streams_with_explicit_policy(served, run_config):
    from bifrost.model.digests import model_digest
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


def test_serve_with_external_workers_flag(tmp_path, run_config):
    """`bifrost serve --workers a,b` (workers started by the test, local runtime): the server starts none
    of its own, opens every session's worker sessions on both, and spreads layer calls over both."""
    from bifrost.model.digests import model_digest
    from bifrost.model.catalog import resolve
    from bifrost.serve.client import BifrostClient

    from bifrost.attest.mtls import process_identity

    workers = [ControlledWorker(run_config), ControlledWorker(run_config)]
    process_identity().save(tmp_path / "tee-identity")  # the identity these workers trust
    (tmp_path / "run.yaml").write_text(yaml.safe_dump({"tee": {"identity": str(tmp_path / "tee-identity")}}))
    certs = []
    for i, w in enumerate(workers):
        certs.append(tmp_path / f"worker-{i}.pem")
        certs[-1].write_bytes(w.endpoint.cert_pem)
    proc = None
    try:
        proc, address = _start_serve(tmp_path, "--runtime", "local", "--config", str(tmp_path / "run.yaml"),
                                     "--workers", ",".join(w.address for w in workers),
                                     "--worker-certs", ",".join(map(str, certs)))
        with BifrostClient(address, make_policy(model_digest(resolve(MODEL), run_config.seed)), timeout_s=120) as c:
            c.attest()
            assert [w.worker_sessions() for w in workers] == [1, 1]  # this session's, on both
            result = c.chat(PROMPT, 4)
        assert result.tokens == plaintext_greedy(MODEL, run_config.seed, ByteTokenizer().encode(PROMPT), 4)
        assert all(w.calls > 0 for w in workers)
        assert not list((tmp_path / "run").glob("worker-*.log"))  # no local worker was started
        assert not (tmp_path / "run" / "ray").exists()  # local runtime: no Ray at all
    finally:
        if proc is not None:
            _stop_serve(proc)
        for w in workers:
            w.stop()
