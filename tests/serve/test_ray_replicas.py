"""Replicas as Ray actors in this process's own local Ray (temp dir inside the run folder): two
replicas serve plaintext-equal tokens, a replica killed with ``ray.kill`` gets no new sessions, and a
replica Ray cannot schedule is a startup error instead of a hang."""

from __future__ import annotations

import os

import grpc
import pytest

from bifrost.errors import BifrostError
from bifrost.model.tokenizer import ByteTokenizer

from .conftest import MODEL, ControlledWorker, connect, plaintext_greedy, ray_default_dirs_listing, wait_until

import ray  # noqa: E402 - a hard dependency


@pytest.fixture(scope="module")
def ray_app(tmp_path_factory, run_config, serve_run_config, serve_config):
    from bifrost.tee.deploy import ServeApp

    from .conftest import worker_config

    before = ray_default_dirs_listing()
    worker = ControlledWorker(run_config)
    run_dir = tmp_path_factory.mktemp("ray") / "r"  # short: Ray's unix sockets live below it
    app = None
    try:
        app = ServeApp(serve_run_config, serve_config.replace(
            runtime="ray", replicas=2, session_idle_s=2.0, **worker_config(worker.endpoint, tmp_path_factory.mktemp("c"))),
            run_dir=run_dir).start()
        yield app, before, run_dir, worker
    finally:
        if app is not None:
            app.stop()
        worker.stop()
    assert not ray.is_initialized() and "RAY_TMPDIR" not in os.environ


def test_two_ray_replicas_serve_plaintext_equal_tokens(ray_app, serve_run_config):
    app, before, run_dir, _ = ray_app
    clients = [connect(app), connect(app)]
    assert {app.service.sessions.get(c.session_id).replica for c in clients} == {0, 1}
    for i, c in enumerate(clients):
        prompt = f"Replica test {i}"
        assert c.chat(prompt, 4).tokens == plaintext_greedy(MODEL, serve_run_config.seed,
                                                            ByteTokenizer().encode(prompt), 4)
        c.close()
    pids = {r.info().pid for r in app.replicas}
    assert len(pids) == 2 and os.getpid() not in pids  # two actor processes
    assert {r.stats()["node_id"] for r in app.replicas} == {ray.get_runtime_context().get_node_id()}  # one node
    assert any((run_dir / "ray").glob("session_*"))  # Ray's temp dir is inside the run folder
    assert ray_default_dirs_listing() == before  # nothing new in ~/.ray (auth_token) or /tmp/ray


def test_unschedulable_replica_is_a_startup_error_not_a_hang(ray_app, serve_run_config, serve_config, tmp_path):
    from bifrost.tee.deploy import ServeApp

    from .conftest import worker_config

    worker = ray_app[3]
    scfg = serve_config.replace(runtime="ray", ray_address="auto", replica_cpus=64, startup_timeout_s=3,
                                **worker_config(worker.endpoint, tmp_path))  # joins the running Ray: 2 CPUs
    with pytest.raises(BifrostError) as err:
        ServeApp(serve_run_config, scfg, run_dir=tmp_path / "b").start()
    assert "did not start within startup_timeout_s=3" in str(err.value) and "replica_cpus=64" in str(err.value)
    assert ray.is_initialized()  # the other app's Ray is left alone


def test_ray_client_hang_up_stops_the_turn_and_keeps_the_session(ray_app, serve_run_config):
    app, worker = ray_app[0], ray_app[3]
    c = connect(app)
    worker.delay_s = 0.05  # >= 0.4 s per token: the turn is still running when the client leaves
    try:
        stream = c.generate("a long turn", 20)
        next(stream)
        stream.close()
        wait_until(lambda: sum(r.stats()["turns_cancelled"] for r in app.replicas) == 1,
                   what="the turn to stop on its Ray replica")
    finally:
        worker.delay_s = 0.0
    result = c.chat("next turn", 2)  # the same session: not closed, not blocked
    assert result.tokens == plaintext_greedy(MODEL, serve_run_config.seed, ByteTokenizer().encode("next turn"), 2)
    c.close()


def test_ray_replica_actor_killed_mid_stream(ray_app, serve_run_config, fault_report):
    """``ray.kill`` of a replica actor while one of its sessions streams: that stream ends with SessionLostError (a
    correct prefix, said to be partial), the other replica's stream goes on plaintext-equal, a session of the dead
    replica that had not run a turn is re-attested and answered, new sessions go to the live replica only, and
    health stays SERVING."""
    import time

    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from bifrost.serve.client import SessionLostError

    from .conftest import report

    app, worker = ray_app[0], ray_app[3]

    def greedy(text: str, n: int) -> list[int]:
        return plaintext_greedy(MODEL, serve_run_config.seed, ByteTokenizer().encode(text), n)

    clients: list = []
    by_replica: dict[int, list] = {0: [], 1: []}
    while len(by_replica[0]) < 1 or len(by_replica[1]) < 2:  # one session on replica 0, two on replica 1
        assert len(clients) < 8
        clients.append(connect(app))
        by_replica[app.service.sessions.get(clients[-1].session_id).replica].append(clients[-1])
    kept_c, (doomed, spare) = by_replica[0][0], by_replica[1][:2]
    worker.delay_s = 0.05  # >= 0.4 s per token: both turns are running when the actor goes
    try:
        lost_stream, kept_stream = doomed.generate("a doomed turn", 12), kept_c.generate("a kept turn", 12)
        lost, kept = list(next(lost_stream).token_ids), list(next(kept_stream).token_ids)
        t_kill = time.monotonic()
        ray.kill(app.replicas[1].actor)
        with pytest.raises(SessionLostError) as err:
            for ev in lost_stream:
                lost += ev.token_ids
        t_error = time.monotonic()
        after = doomed.chat("answered anew", 2, reset_history=True).tokens  # (while the other stream goes on)
        t_back = time.monotonic()
        moved_to = app.service.sessions.get(doomed.session_id).replica  # (before the 2 s idle limit drops it)
        kept += [t for ev in kept_stream for t in ev.token_ids]
    finally:
        worker.delay_s = 0.0
    assert err.value.session_lost == "replica-lost" and err.value.partial and err.value.reattested
    assert lost == greedy("a doomed turn", 12)[:len(lost)] and len(lost) < 12
    assert kept == greedy("a kept turn", 12)
    assert after == greedy("answered anew", 2) and moved_to == 0
    lost_id = spare.session_id  # lost before its first turn: re-attested and sent again
    assert spare.chat("hello", 1).tokens == greedy("hello", 1)
    assert spare.session_losses == 1 and spare.session_id != lost_id
    fresh = [connect(app), connect(app)]
    assert {app.service.sessions.get(c.session_id).replica for c in fresh + [spare]} == {0}
    assert all(len(c.chat("ok", 1).tokens) == 1 for c in fresh + [kept_c])
    with grpc.insecure_channel(f"127.0.0.1:{app.port}") as ch:
        status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=10).status
    assert status == health_pb2.HealthCheckResponse.SERVING
    report(fault_report, "replica actor killed mid-stream (ray.kill)", "that stream: SessionLostError(replica-lost, "
           f"partial) {t_error - t_kill:.1f} s after the kill; the other replica's stream: no error", True,
           t_back - t_kill, "kill -> the lost session's client answered again (re-attested on the other replica)")
    for c in clients + fresh:
        c.close()
