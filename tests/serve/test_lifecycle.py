"""Session life cycle under slow workers: the idle sweeper, client hang-ups, replica timeouts, and
dead replicas. Workers are real in-process CKKS workers made slow on purpose (every layer call
sleeps), so a turn is longer than the idle limit or the replica timeout whatever the machine speed."""

from __future__ import annotations

import secrets

import grpc
import pytest

from bifrost.errors import BifrostError
from bifrost.model.tokenizer import ByteTokenizer
from bifrost.proto import serving_pb2
from bifrost.proto.replica import Attested, AttestRequest
from bifrost.proto.wire import AAD_EMBED
from bifrost.serve.client import ServingError, SessionLostError

from .conftest import MODEL, connect, plaintext_greedy, wait_until

LAYER_CALLS_PER_TOKEN = 8  # gpt2-mini: 2 blocks x (c_attn, attn.c_proj, c_fc, mlp.c_proj)


def _expected(prompt: str, n: int, seed: int) -> list[int]:
    return plaintext_greedy(MODEL, seed, ByteTokenizer().encode(prompt), n)


def test_sweeper_skips_a_running_turn_and_closes_idle_pending_and_orphaned_sessions(
        app_factory, controlled_worker, serve_run_config):
    controlled_worker.delay_s = 0.1  # >= 0.8 s per token: every token takes longer than the idle limit
    app = app_factory(worker=controlled_worker.endpoint, session_idle_s=0.5, pending_idle_s=0.5)
    replica = app.replicas[0].obj
    baseline = controlled_worker.worker_sessions()  # the replica runtime's own worker session
    c = connect(app)
    result = c.chat("slow turn", 3)  # ~2.4 s of generation, the sweeper runs every 0.125 s
    # at once (checking the tokens first would itself leave the session idle for longer than 0.5 s on a
    # loaded machine): the session survived its long turn
    assert len(c.chat(" more", 1).tokens) == 1
    assert result.tokens == _expected("slow turn", 3, serve_run_config.seed)
    pending = connect(app)  # attested, never used
    orphan = replica.attest(AttestRequest(secrets.token_bytes(32), secrets.token_bytes(32), ""))  # unknown to the front end
    assert isinstance(orphan, Attested) and replica.stats()["sessions"] == 3
    wait_until(lambda: len(app.service.sessions) == 0 and replica.stats()["sessions"] == 0
               and controlled_worker.worker_sessions() == baseline, what="idle sessions to be closed everywhere")
    with pytest.raises(ServingError) as err:
        c.chat("gone?", 1)
    assert err.value.code == grpc.StatusCode.NOT_FOUND
    pending.close()
    c.close()


def test_client_hang_up_stops_the_turn_and_the_next_turn_runs(app_factory, controlled_worker, serve_run_config):
    controlled_worker.delay_s = 0.1
    app = app_factory(worker=controlled_worker.endpoint)
    c = connect(app)
    stream = c.generate("a long turn", 20)  # ~16 s if nobody stopped it: longer than the 10 s turn wait
    next(stream)
    next(stream)
    stream.close()  # the client hangs up mid-stream
    calls_at_hangup = controlled_worker.calls
    result = c.chat("next turn", 2)  # the same session, at once; the stopped turn is not in its history
    assert result.tokens == _expected("next turn", 2, serve_run_config.seed)
    assert app.replicas[0].stats()["turns_cancelled"] == 1
    # the stopped turn finished at most the token it was computing (the next turn needs 2 tokens' calls)
    assert controlled_worker.calls - calls_at_hangup <= 4 * LAYER_CALLS_PER_TOKEN
    c.close()


def test_replica_timeout_closes_the_session_on_the_replica_and_its_workers(app_factory, controlled_worker):
    app = app_factory(worker=controlled_worker.endpoint, replica_timeout_s=1.0)  # (in-process calls: untimed)
    c = connect(app)
    c.chat("first", 1)  # (a turn relying on this history is not sent again on a new session)
    before, lost = controlled_worker.worker_sessions(), c.session_id
    controlled_worker.next_delay_s = 3.0  # the prefill's first layer call hangs past replica_timeout_s
    with pytest.raises(SessionLostError) as err:
        c.chat("stuck", 4)
    assert err.value.code == grpc.StatusCode.UNAVAILABLE and "replica_timeout_s" in err.value.details
    assert err.value.session_lost == "replica-lost" and err.value.reattested
    assert app.service.sessions.get(lost) is None and len(app.service.sessions) == 1  # (the client's new one)
    c.close()
    # the replica closes it too: the turn stops at its next token and releases the CKKS worker session
    wait_until(lambda: app.replicas[0].stats()["sessions"] == 0 and controlled_worker.worker_sessions() == before - 1,
               what="the replica and worker sessions to be released")


def test_dead_replica_gets_no_new_sessions_and_health_follows(app_factory, worker_factory):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    _, _, address = worker_factory(MODEL, 64)
    app = app_factory(worker=address, replicas=2, session_idle_s=2.0)  # sweeper/probe every 0.5 s

    def health():
        with grpc.insecure_channel(f"127.0.0.1:{app.port}") as ch:
            return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=10).status

    clients = [connect(app), connect(app)]
    on = {app.service.sessions.get(c.session_id).replica: c for c in clients}
    assert set(on) == {0, 1}  # least-loaded: one session per replica
    app.replicas[1].kill()
    assert len(on[1].chat("hello", 1).tokens) == 1  # its session was lost before its first turn: sent again
    assert on[1].session_losses == 1 and app.service.sessions.get(on[1].session_id).replica == 0
    assert app.service.sessions.live_replicas() == [0]
    fresh = [connect(app) for _ in range(3)]  # all on the live replica, none lost to the dead one
    assert {app.service.sessions.get(c.session_id).replica for c in fresh} == {0}
    assert all(len(c.chat("ok", 1).tokens) == 1 for c in fresh)
    assert health() == health_pb2.HealthCheckResponse.SERVING
    assert fresh[0].list_models().models[0].replicas == 1
    app.replicas[0].kill()  # no traffic: the sweeper's probe finds it
    wait_until(lambda: health() == health_pb2.HealthCheckResponse.NOT_SERVING, what="health NOT_SERVING")
    late = connect(app, attest=False)
    with pytest.raises(ServingError) as err:
        late.attest()
    assert err.value.code == grpc.StatusCode.UNAVAILABLE and "no live replica" in err.value.details
    for c in clients + fresh + [late]:
        c.close()


def test_a_request_on_a_busy_session_waits_a_bounded_time(app_factory, controlled_worker, monkeypatch):
    monkeypatch.setattr("bifrost.tee.replica.TURN_WAIT_S", 0.3)  # (10 s in production)
    controlled_worker.delay_s = 0.1
    app = app_factory(worker=controlled_worker.endpoint)
    c = connect(app)
    stream = c.generate("busy session", 4)  # ~3 s
    first = next(stream)
    with pytest.raises(BifrostError, match="already has a request in progress"):
        c.embed(["while the turn runs"])  # the SDK serializes one client's requests, and never waits on itself
    # a request that does reach the busy session (sent around the SDK) used to wait on its lock without a limit
    req = serving_pb2.SealedRequest(session_id=c.session_id, request_id=secrets.token_hex(8), sealed=c.channel.seal(
        serving_pb2.EmbedBody(texts=["while the turn runs"]).SerializeToString(), AAD_EMBED))
    with grpc.insecure_channel(f"127.0.0.1:{app.port}") as ch, pytest.raises(grpc.RpcError) as err:
        ch.unary_unary("/bifrost.serving.v1.BifrostServing/Embed")(
            req.SerializeToString(), metadata=(("authorization", f"Bearer {c.token}"),), timeout=60)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "in progress" in err.value.details()
    assert len(first.token_ids) + sum(len(ev.token_ids) for ev in stream) == 4  # the running turn is unaffected
    # the refused request was never opened; the channel tolerates that gap, so the session goes on
    assert sum(len(ev.token_ids) for ev in c.generate("after the refusal", 2)) == 2
    c.close()
