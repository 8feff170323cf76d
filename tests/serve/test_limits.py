"""Serving limits (bifrost/limits.py), each tested just past it: a clear status (sealed where the check runs on
the opened record), and nothing else disturbed: the refused session, where the limit is per request, and
another session go on giving the plaintext model's tokens."""

from __future__ import annotations

import threading

import grpc
import pytest

from bifrost.model.tokenizer import ByteTokenizer
from bifrost.proto import serving_pb2
from bifrost.proto.wire import SEALED_REFUSAL
from bifrost.serve.client import ServingError

from .conftest import MODEL, connect, plaintext_greedy, wait_until
from .test_bad_input import _raw, _raw_full, _sealed_refusal, _sealed_req

PROBE = "Limits hold"  # a turn whose tokens are compared with the plaintext model's


def _expected(serve_run_config, prompt: str = PROBE, n: int = 3) -> list[int]:
    return plaintext_greedy(MODEL, serve_run_config.seed, ByteTokenizer().encode(prompt), n)


def _probe(client) -> list[int]:
    return client.chat(PROBE, 3, reset_history=True).tokens


def _meta(client):
    return (("authorization", f"Bearer {client.token}"),)


def test_per_turn_limits_refuse_sealed_and_disturb_nothing(app_factory, worker_factory, serve_run_config):
    """max_prompt_tokens=64, max_new_tokens=32 (the fixture's), max_context_tokens=24, stop sequences: a turn at
    each limit runs, one just past it is refused with the code in cleartext, the reason sealed and no digit in
    the cleartext; the session's history is unchanged and another session is unaffected."""
    _, _, endpoint = worker_factory(MODEL, 64)
    app = app_factory(worker=endpoint, max_context_tokens=24)
    assert app.service.ListModels(serving_pb2.ListModelsRequest(), None).models[0].context_tokens == 24
    c, bystander = connect(app), connect(app)
    want = _expected(serve_run_config)
    try:
        assert len(c.chat("x" * 20, 4, reset_history=True).tokens) == 4  # 20 + 4 = 24 tokens: at the context limit
        history = list(app.replicas[0].obj._sessions[c.session_id].history)
        assert len(history) == 24
        cases = [  # (body, words of the sealed reason)
            (serving_pb2.GenerateBody(prompt="x" * 65, max_new_tokens=1, reset_history=True),
             "prompt has 65 tokens; the limit is max_prompt_tokens=64"),
            (serving_pb2.GenerateBody(prompt="hi", max_new_tokens=33, reset_history=True),
             "max_new_tokens 33 is over the limit of 32"),
            (serving_pb2.GenerateBody(prompt="x" * 20, max_new_tokens=5, reset_history=True),
             "conversation (20 tokens) + 5 new tokens exceeds the context of 24 tokens"),
            (serving_pb2.GenerateBody(prompt="y", max_new_tokens=1),  # after the 24-token history
             "conversation (25 tokens) + 1 new tokens exceeds the context of 24 tokens"),
            (serving_pb2.GenerateBody(prompt="hi", max_new_tokens=1, stop=["a", "b", "c", "d", "e"]),
             "up to 4 stop sequences"),
            (serving_pb2.GenerateBody(prompt="hi", max_new_tokens=1, stop=["s" * 65]), "1..64 characters each"),
        ]
        for i, (body, words) in enumerate(cases):
            req = _sealed_req(c, body, f"past-{i}").SerializeToString()
            code, msg, replies, _ = _raw_full(app, "Generate", req, _meta(c))
            assert code == grpc.StatusCode.INVALID_ARGUMENT and msg == SEALED_REFUSAL, (words, msg)
            assert not any(ch.isdigit() for ch in msg)
            sealed_code, reason = _sealed_refusal(c, "Generate", req, replies, {})
            assert sealed_code == "INVALID_ARGUMENT" and words in reason, reason
            assert app.replicas[0].obj._sessions[c.session_id].history == history  # refused: history unchanged
        # at the stop-sequence limits: accepted
        ok = c.chat("hi", 1, reset_history=True, stop=["a", "b", "c", "d"])
        assert ok.finish_reason in ("length", "stop")
        assert c.chat("hi", 1, reset_history=True, stop=["s" * 64]).finish_reason in ("length", "stop")
        assert _probe(c) == want and _probe(bystander) == want
    finally:
        c.close()
        bystander.close()


def test_sessions_past_max_sessions_per_replica_are_resource_exhausted(app_factory, worker_factory, serve_run_config):
    """One replica, max_sessions_per_replica=2 under max_sessions=6: the third Attest is RESOURCE_EXHAUSTED naming
    the limit, the two sessions go on; a closed session frees its slot. The replica refuses a session past the
    limit by itself too (sessions the front end lost track of)."""
    from bifrost.proto.replica import AttestRequest, Refusal, Status

    _, _, endpoint = worker_factory(MODEL, 64)
    app = app_factory(worker=endpoint, max_sessions_per_replica=2)
    a, b, extra = connect(app), connect(app), connect(app, attest=False)
    want = _expected(serve_run_config)
    try:
        with pytest.raises(ServingError) as err:
            extra.attest()
        assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and not err.value.sealed
        assert "max_sessions_per_replica=2" in err.value.details
        assert len(app.service.sessions) == 2 and app.replicas[0].obj.session_count() == 2
        assert _probe(a) == want and _probe(b) == want
        out = app.replicas[0].obj.attest(AttestRequest(bytes(16), bytes(32), ""))
        assert isinstance(out, Refusal) and out.status is Status.RESOURCE_EXHAUSTED
        assert "max_sessions_per_replica=2" in out.message and app.replicas[0].obj.session_count() == 2
        b.close()
        extra.attest()  # b's slot
        assert _probe(extra) == want and _probe(a) == want
    finally:
        for c in (a, b, extra):
            c.close()


def test_a_turn_past_max_turns_per_session_is_resource_exhausted(app_factory, worker_factory, serve_run_config):
    """max_turns_per_session=2: a record that never opened (tampered) is not a turn; the third opened turn is
    refused RESOURCE_EXHAUSTED naming the limit (cleartext: turns are countable on the wire) and changes nothing;
    another session's turns go on, and the refused session still closes."""
    _, _, endpoint = worker_factory(MODEL, 64)
    app = app_factory(worker=endpoint, max_turns_per_session=2)
    a, b = connect(app), connect(app)
    want = _expected(serve_run_config)
    try:
        assert _probe(a) == want
        tampered = _sealed_req(a, serving_pb2.GenerateBody(prompt="hi", max_new_tokens=1), "tampered")
        tampered.sealed = tampered.sealed[:-1] + bytes([tampered.sealed[-1] ^ 1])
        assert _raw(app, "Generate", tampered.SerializeToString(), _meta(a))[0] == grpc.StatusCode.PERMISSION_DENIED
        assert _probe(a) == want  # the second turn: the tampered record did not count
        history = list(app.replicas[0].obj._sessions[a.session_id].history)
        with pytest.raises(ServingError) as err:
            a.chat("one too many", 1)
        assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and not err.value.sealed
        assert "max_turns_per_session=2" in err.value.details
        assert app.replicas[0].obj._sessions[a.session_id].history == history
        assert app.service.sessions.get(a.session_id).turns == 2
        assert _probe(b) == want and _probe(b) == want  # b's own two turns
        a.close()
        assert app.service.sessions.get(a.session_id) is None
        assert a.session_id not in app.replicas[0].obj._sessions
    finally:
        a.close()
        b.close()


def test_rpcs_past_max_concurrent_rpcs_are_resource_exhausted(app_factory, controlled_worker, serve_run_config):
    """max_concurrent_rpcs=2 with two Generate streams held on a hung worker: a third RPC (ListModels, Attest) is
    RESOURCE_EXHAUSTED without being read; once the worker answers, both streams finish with the plaintext model's
    tokens and the port serves again."""
    app = app_factory(worker=controlled_worker.endpoint, max_concurrent_rpcs=2)
    a, b, extra = connect(app), connect(app), connect(app, attest=False)
    results: dict[str, list[int]] = {}
    failures: list[str] = []

    def stream(name, client):
        try:
            results[name] = client.chat(PROBE, 3, reset_history=True).tokens
        except Exception as exc:  # noqa: BLE001 - asserted below
            failures.append(repr(exc))

    controlled_worker.gate.clear()  # every layer call waits: both streams stay in progress
    threads = [threading.Thread(target=stream, args=(n, c)) for n, c in (("a", a), ("b", b))]
    try:
        for t in threads:
            t.start()
        entries = [app.service.sessions.get(c.session_id) for c in (a, b)]
        wait_until(lambda: all(e.busy for e in entries), 120, "both Generate streams in progress")
        code, msg = _raw(app, "ListModels", serving_pb2.ListModelsRequest().SerializeToString())
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, msg
        with pytest.raises(ServingError) as err:
            extra.attest()
        assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        controlled_worker.gate.set()
        for t in threads:
            t.join(300)
    assert not failures, failures
    want = _expected(serve_run_config)
    assert results == {"a": want, "b": want}
    code, reply = _raw(app, "ListModels", serving_pb2.ListModelsRequest().SerializeToString())
    assert code == grpc.StatusCode.OK
    extra.attest()
    assert _probe(extra) == want
    for c in (a, b, extra):
        c.close()


def test_message_over_the_serving_port_limit_is_refused_unread(app_factory, worker_factory, serve_run_config,
                                                               monkeypatch):
    """The serving port's gRPC message limit (here lowered to 2 MiB, over max_request_bytes=1 MiB): a larger
    message is RESOURCE_EXHAUSTED unread; one between the two limits is INVALID_ARGUMENT naming
    max_request_bytes; the session they named is unchanged."""
    from bifrost.proto import wire

    monkeypatch.setattr(wire, "SERVING_MAX_MESSAGE_BYTES", 2 << 20)
    _, _, endpoint = worker_factory(MODEL, 64)
    app = app_factory(worker=endpoint)
    c = connect(app)
    try:
        for size, code_want in (((2 << 20) + 1, grpc.StatusCode.RESOURCE_EXHAUSTED),
                                ((1 << 20) + 1, grpc.StatusCode.INVALID_ARGUMENT)):
            big = serving_pb2.SealedRequest(session_id=c.session_id, request_id="big", sealed=bytes(size))
            code, msg = _raw(app, "Generate", big.SerializeToString(), _meta(c))
            assert code == code_want, (size, msg)
        assert "max_request_bytes=1048576" in msg
        assert not app.service.sessions.get(c.session_id).used  # nothing of it reached the session
        assert _probe(c) == _expected(serve_run_config)
    finally:
        c.close()
