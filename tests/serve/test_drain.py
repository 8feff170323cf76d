"""Graceful drain: `bifrost serve` as a real process gets a real SIGTERM mid-stream. It stops accepting (new
sessions and new turns: UNAVAILABLE, CloseSession still works), lets the running turn finish within
``serve.drain_s`` or, past it, ends the stream with UNAVAILABLE (never silently short), then exits 0.
The worker is a real in-process CKKS worker slowed per layer call, so a turn outlasts the signal."""

from __future__ import annotations

import signal
import subprocess
import time

import grpc
import pytest
import yaml

from bifrost.model.tokenizer import ByteTokenizer
from bifrost.serve.client import BifrostClient, ServingError

from .conftest import MODEL, ControlledWorker, make_policy, plaintext_greedy, report
from .test_e2e_serve import _start_serve

PROMPT = "Drain me"


@pytest.fixture()
def slow_worker(run_config):
    w = ControlledWorker(run_config)
    w.delay_s = 0.05  # >= 0.4 s per token (8 layer calls): a turn outlasts the signal
    yield w
    w.stop()


def _serve(tmp_path, worker, drain_s: float) -> tuple[subprocess.Popen, str]:
    from bifrost.attest.mtls import process_identity

    process_identity().save(tmp_path / "tee-identity")  # the identity the worker trusts
    (tmp_path / "run.yaml").write_text(yaml.safe_dump({"tee": {"identity": str(tmp_path / "tee-identity")}}))
    (tmp_path / "worker.pem").write_bytes(worker.endpoint.cert_pem)
    return _start_serve(tmp_path, "--runtime", "local", "--config", str(tmp_path / "run.yaml"), "--workers",
                        worker.address, "--worker-certs", str(tmp_path / "worker.pem"), "--drain-s", str(drain_s))


def _wait_for(path, text: str, proc: subprocess.Popen, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while text not in path.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"no {text!r} in the server's stderr: {path.read_text()[-2000:]}")
        time.sleep(0.05)


def _policy(run_config):
    from bifrost.model.catalog import resolve
    from bifrost.model.digests import model_digest

    return make_policy(model_digest(resolve(MODEL), run_config.seed))


def test_sigterm_lets_the_running_turn_finish_and_refuses_new_work(tmp_path, slow_worker, run_config, fault_report):
    proc, address = _serve(tmp_path, slow_worker, drain_s=300)
    policy = _policy(run_config)
    try:
        with BifrostClient(address, policy, timeout_s=120) as running, \
                BifrostClient(address, policy, timeout_s=120) as idle:
            running.attest()
            idle.attest()
            tokens = []
            for i, ev in enumerate(running.generate(PROMPT, 12)):
                tokens += ev.token_ids
                if i == 1:
                    proc.send_signal(signal.SIGTERM)  # a real signal, mid-stream
                    t_signal = time.monotonic()
                    _wait_for(tmp_path / "serve.stderr", "draining: ", proc)  # logged once no longer accepting
                    with pytest.raises(ServingError) as new_turn:  # an attested session: no new turn
                        idle.chat("one more", 1)
                    with pytest.raises(ServingError) as new_session:
                        BifrostClient(address, policy, timeout_s=30).attest()
            assert tokens == plaintext_greedy(MODEL, run_config.seed, ByteTokenizer().encode(PROMPT), 12)
            for err in (new_turn, new_session):
                assert err.value.code == grpc.StatusCode.UNAVAILABLE and "draining" in err.value.details
        assert proc.wait(timeout=120) == 0  # CloseSession (the clients' exit) still worked; then a clean exit
        report(fault_report, "bifrost serve SIGTERMed mid-stream (drain_s 300)", "the running turn: no error; a new "
               "session or turn: UNAVAILABLE (draining)", True, time.monotonic() - t_signal, "signal -> exit 0")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_turn_longer_than_drain_s_ends_with_unavailable_not_short(tmp_path, slow_worker, run_config, fault_report):
    proc, address = _serve(tmp_path, slow_worker, drain_s=1)
    try:
        tokens = []
        with BifrostClient(address, _policy(run_config), timeout_s=120) as c:
            c.attest()
            with pytest.raises(ServingError) as err:
                for i, ev in enumerate(c.generate(PROMPT, 60)):  # >= 24 s of tokens: far past drain_s
                    tokens += ev.token_ids
                    if i == 1:
                        proc.send_signal(signal.SIGTERM)
                        t_signal = time.monotonic()
        assert err.value.code == grpc.StatusCode.UNAVAILABLE and "drain_s=1" in err.value.details
        expected = plaintext_greedy(MODEL, run_config.seed, ByteTokenizer().encode(PROMPT), 60)
        assert 2 <= len(tokens) < 60 and tokens == expected[:len(tokens)]  # a correct prefix, and said to be one
        assert proc.wait(timeout=120) == 0
        assert "1 turn(s) were still running" in (tmp_path / "serve.stderr").read_text()
        report(fault_report, "bifrost serve SIGTERMed mid-stream, turn longer than drain_s 1",
               "SessionLostError(server-draining, partial) after a correct prefix", True, time.monotonic() - t_signal,
               "signal -> exit 0")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
