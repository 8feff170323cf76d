"""A network partition between a replica and every CKKS worker, mid-stream (a relay that stops moving bytes).
``delegation.on_no_worker`` decides: ``tee`` finishes the turn inside the TEE with the plaintext-equal tokens,
``fail`` ends it with UNAVAILABLE after a correct prefix. Either way nobody is quarantined, the session stays
usable once the link heals, and the choice is bound into the serving-config digest."""

from __future__ import annotations

import dataclasses
import time

import grpc
import pytest

from bifrost.model.tokenizer import ByteTokenizer
from bifrost.serve.client import ServingError
from tests.netfault import TcpRelay

from .conftest import MODEL, ControlledWorker, connect, plaintext_greedy, report, wait_until

PROMPT = "Partitioned"


@pytest.fixture()
def partitioned(run_config, serve_run_config, serve_config, tmp_path):
    """Start an app whose one worker is reached through a relay; ``make(on_no_worker)`` -> (app, relay, worker)."""
    from bifrost.tee.deploy import ServeApp

    made = []

    def make(on_no_worker: str):
        worker = ControlledWorker(run_config)
        relay = TcpRelay(worker.address)
        cert = tmp_path / f"worker-{on_no_worker}.pem"
        cert.write_bytes(worker.endpoint.cert_pem)
        cfg = serve_run_config.replace(delegation=dataclasses.replace(serve_run_config.delegation,
                                                                      on_no_worker=on_no_worker))
        scfg = serve_config.replace(workers=(relay.address,), worker_certs=(str(cert),), worker_call_timeout_s=2.0,
                                    worker_retry_after_s=1.0)
        made.append((ServeApp(cfg, scfg).start(), relay, worker))
        return made[-1]

    yield make
    for app, relay, worker in made:
        app.stop()
        relay.stop()
        worker.stop()


def _heal_and_check(app, relay, worker, client, seed: int) -> float:
    """After the partition heals, the worker is used again (within worker_retry_after_s and a reconnect) and the
    same session's next turns are plaintext-equal. Returns the seconds from the heal to the worker serving."""
    relay.set_mode("pass")
    t_heal = time.monotonic()
    before = worker.calls
    expected = plaintext_greedy(MODEL, seed, ByteTokenizer().encode("healed"), 2)

    def served_by_worker() -> bool:
        assert client.chat("healed", 2, reset_history=True).tokens == expected
        return worker.calls > before

    wait_until(served_by_worker, timeout_s=60, what="the healed worker to serve layer calls again")
    healed = time.monotonic() - t_heal
    assert app.replicas[0].stats()["quarantined_workers"] == []  # a partition is availability, never a deviation
    return healed


def test_partition_with_on_no_worker_tee_finishes_the_turn_in_the_tee(partitioned, serve_run_config, fault_report):
    app, relay, worker = partitioned("tee")
    c = connect(app)
    tokens, arrivals = [], []
    for i, ev in enumerate(c.generate(PROMPT, 6)):
        tokens += ev.token_ids
        arrivals.append(time.monotonic())
        if i == 1:
            relay.set_mode("blackhole")
    assert tokens == plaintext_greedy(MODEL, serve_run_config.seed, ByteTokenizer().encode(PROMPT), 6)
    stats = app.replicas[0].stats()
    assert stats["failovers"] >= 1 and not stats["workers"][0]["up"]  # the call timed out: worker marked down
    healed = _heal_and_check(app, relay, worker, c, serve_run_config.seed)
    report(fault_report, "partition replica <-> every worker, on_no_worker: tee (worker_call_timeout_s 2)",
           f"no error (the token after the cut came {arrivals[2] - arrivals[1]:.1f} s after the one before)", True,
           healed, "heal -> the worker serves again (worker_retry_after_s 1)")
    c.close()


def test_partition_with_on_no_worker_fail_ends_the_turn_with_unavailable(partitioned, serve_run_config, fault_report):
    app, relay, worker = partitioned("fail")
    c = connect(app)
    tokens = []
    with pytest.raises(ServingError) as err:
        for i, ev in enumerate(c.generate(PROMPT, 6)):
            tokens += ev.token_ids
            if i == 1:
                relay.set_mode("blackhole")
                t_cut = time.monotonic()
    t_error = time.monotonic()
    assert err.value.code == grpc.StatusCode.UNAVAILABLE and "workers unavailable" in err.value.details
    expected = plaintext_greedy(MODEL, serve_run_config.seed, ByteTokenizer().encode(PROMPT), 6)
    assert 2 <= len(tokens) < 6 and tokens == expected[:len(tokens)]
    healed = _heal_and_check(app, relay, worker, c, serve_run_config.seed)
    report(fault_report, "partition replica <-> every worker, on_no_worker: fail (worker_call_timeout_s 2)",
           f"UNAVAILABLE (sealed: CKKS workers unavailable) {t_error - t_cut:.1f} s after the cut, after a correct "
           "prefix", True, healed, "heal -> the worker serves again; the same session answers")
    c.close()


def test_on_no_worker_is_bound_into_the_serving_config_digest(serve_run_config, serve_config):
    from bifrost.errors import UserError
    from bifrost.serve.config import serving_config_digest

    def digest(choice: str) -> bytes:
        cfg = serve_run_config.replace(delegation=dataclasses.replace(serve_run_config.delegation, on_no_worker=choice))
        return serving_config_digest(cfg, serve_config)

    assert digest("tee") != digest("fail")
    with pytest.raises(UserError, match="on_no_worker must be one of tee, fail"):
        dataclasses.replace(serve_run_config.delegation, on_no_worker="retry")
