"""Bad input always ends as a gRPC status with a message; the server keeps serving other sessions. A
record that does not open (tampered, forged, replayed) changes nothing about its session; refusals
after a record was opened carry their reason sealed and a generic cleartext message."""

from __future__ import annotations

import logging
import secrets
import time

import grpc
import pytest

from bifrost.proto import serving_pb2
from bifrost.attest.channel import answer_aad
from bifrost.proto.wire import AAD_CHUNK, AAD_CLOSE, AAD_EMBED_RESULT, AAD_GENERATE, SEALED_REFUSAL, SEALED_TRAILER
from bifrost.serve.client import ServingError

from .conftest import MODEL as MODEL_NAME, connect

METHOD = "/bifrost.serving.v1.BifrostServing/"


def _raw_full(app, method: str, payload: bytes, metadata=()):
    """(status code, details or reply, streamed replies received before the status, trailing metadata)."""
    with grpc.insecure_channel(f"127.0.0.1:{app.port}") as ch:
        replies = []
        try:
            if method == "Generate":
                for r in ch.unary_stream(METHOD + method)(payload, metadata=metadata, timeout=60):
                    replies.append(r)
                return grpc.StatusCode.OK, replies, replies, {}
            return grpc.StatusCode.OK, ch.unary_unary(METHOD + method)(payload, metadata=metadata, timeout=60), [], {}
        except grpc.RpcError as exc:
            return exc.code(), exc.details(), replies, dict(exc.trailing_metadata() or ())


def _raw(app, method: str, payload: bytes, metadata=()):
    return _raw_full(app, method, payload, metadata)[:2]


def _sealed_refusal(client, method: str, request: bytes, replies, trailers):
    """The refusal a raw call (its SealedRequest: ``request``) got sealed, opened with the client's channel (keeps
    it in step)."""
    sealed = serving_pb2.SealedRequest.FromString(request).sealed
    if method == "Generate":
        assert len(replies) == 1
        msg = serving_pb2.TokenChunk.FromString(client.channel.open(
            serving_pb2.SealedReply.FromString(replies[0]).sealed, answer_aad(AAD_CHUNK, sealed, 0), True))
        assert msg.done and not msg.token_ids
    else:
        msg = serving_pb2.EmbedResult.FromString(
            client.channel.open(trailers[SEALED_TRAILER], answer_aad(AAD_EMBED_RESULT, sealed, 0), True))
        assert not msg.vectors
    return msg.error_code, msg.error


def _sealed_req(client, body: serving_pb2.GenerateBody, request_id="r1"):
    return serving_pb2.SealedRequest(session_id=client.session_id, request_id=request_id,
                                     sealed=client.channel.seal(body.SerializeToString(), AAD_GENERATE))


def _assert_healthy(client_factory):
    c = client_factory()
    assert len(c.chat("ok", 2).tokens) == 2
    c.close()


def test_missing_bad_and_expired_tokens_are_unauthenticated(local_app, client_factory):
    c = client_factory()
    req = _sealed_req(c, serving_pb2.GenerateBody(prompt="hi", max_new_tokens=1)).SerializeToString()
    code, msg = _raw(local_app, "Generate", req)
    assert code == grpc.StatusCode.UNAUTHENTICATED and "attest" in msg
    code, msg = _raw(local_app, "Generate", req, (("authorization", "Bearer not.a-token"),))
    assert code == grpc.StatusCode.UNAUTHENTICATED
    svc = local_app.service
    from bifrost.attest.verdict import Verdict
    from datetime import datetime, timezone

    v = Verdict("simulated", bytes(48), bytes(64), False, "x", {}, {}, datetime.now(timezone.utc), (), simulated=True)
    expired = svc.issuer.issue(v, node_id="n", model_digest=svc.info.model_digest, now=time.time() - 10_000)
    code, msg = _raw(local_app, "Generate", req, (("authorization", f"Bearer {expired}"),))
    assert code == grpc.StatusCode.UNAUTHENTICATED and "expired" in msg
    # the session itself is untouched: the same sealed record (never opened) still works with its token
    code, chunks = _raw(local_app, "Generate", req, (("authorization", f"Bearer {c.token}"),))
    assert code == grpc.StatusCode.OK and len(chunks) == 1


def test_token_of_another_session_and_replayed_request_are_refused(local_app, client_factory):
    a, b = client_factory(), client_factory()
    req = _sealed_req(a, serving_pb2.GenerateBody(prompt="hi", max_new_tokens=1), "same-id").SerializeToString()
    code, _ = _raw(local_app, "Generate", req, (("authorization", f"Bearer {b.token}"),))
    assert code == grpc.StatusCode.PERMISSION_DENIED
    code, _ = _raw(local_app, "Generate", req, (("authorization", f"Bearer {a.token}"),))
    assert code == grpc.StatusCode.OK
    code, msg = _raw(local_app, "Generate", req, (("authorization", f"Bearer {a.token}"),))
    assert code == grpc.StatusCode.UNAUTHENTICATED and "already seen" in msg


def test_tampered_payload_is_refused_and_changes_nothing(local_app, client_factory):
    victim, bystander = client_factory(), client_factory()
    req = _sealed_req(victim, serving_pb2.GenerateBody(prompt="hi", max_new_tokens=1))
    genuine = req.sealed
    sealed = bytearray(genuine)
    sealed[-1] ^= 1
    req.sealed = bytes(sealed)
    meta = (("authorization", f"Bearer {victim.token}"),)
    entry = local_app.service.sessions.get(victim.session_id)
    replica_session = local_app.replicas[entry.replica].obj._sessions[victim.session_id]
    before = (entry.used, entry.last_used, replica_session.last_used)
    code, msg = _raw(local_app, "Generate", req.SerializeToString(), meta)
    assert code == grpc.StatusCode.PERMISSION_DENIED and "session is unchanged" in msg
    # not even its idle clock moved (garbage keeps no session alive), nor the receive sequence number:
    # the genuine record with that number still opens
    assert (entry.used, entry.last_used, replica_session.last_used) == before and not entry.used
    req.sealed, req.request_id = genuine, "r2"
    code, replies = _raw(local_app, "Generate", req.SerializeToString(), meta)
    assert code == grpc.StatusCode.OK and len(replies) == 1 and entry.used
    victim.channel.open(serving_pb2.SealedReply.FromString(replies[0]).sealed,  # keep the client in step
                        answer_aad(AAD_CHUNK, genuine, 0), True)
    assert len(victim.chat("hi", 1).tokens) == 1
    assert len(bystander.chat("still here", 2).tokens) == 2


def test_limits_and_malformed_fields_are_invalid_argument(local_app, client_factory):
    c = client_factory()
    with pytest.raises(ServingError) as err:
        c.chat("x" * 65, 1)  # 65 byte-level tokens > max_prompt_tokens=64
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and "max_prompt_tokens=64" in err.value.details
    assert err.value.sealed
    with pytest.raises(ServingError) as err:
        c.chat("x", 33)
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and "32" in err.value.details and err.value.sealed
    with pytest.raises(ServingError) as err:
        c.chat("", 1)
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and "empty" in err.value.details and err.value.sealed
    meta = (("authorization", f"Bearer {c.token}"),)
    code, _ = _raw(local_app, "Generate", b"\xff\xff\xff\xff garbage", meta)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    code, msg = _raw(local_app, "Generate", serving_pb2.SealedRequest(session_id=b"short", request_id="x",
                                                                       sealed=b"y").SerializeToString(), meta)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "session_id" in msg
    code, _ = _raw(local_app, "Attest", serving_pb2.AttestRequest(nonce=b"short", client_public_key=bytes(32)).SerializeToString())
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    code, _ = _raw(local_app, "Attest", b"\x0a\xff\xff\xff\xff\x0f")  # truncated length-delimited field
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    code, _ = _raw(local_app, "Attest", serving_pb2.AttestRequest(nonce=bytes(16), client_public_key=bytes(32),
                                                                   suite="ROT13").SerializeToString())
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    # a sealed record that authenticates but is not a GenerateBody: the reason comes back sealed
    bad = serving_pb2.SealedRequest(session_id=c.session_id, request_id="z",
                                    sealed=c.channel.seal(b"\xff\xff\xff", AAD_GENERATE))
    code, msg, replies, _ = _raw_full(local_app, "Generate", bad.SerializeToString(), meta)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and msg == SEALED_REFUSAL
    assert _sealed_refusal(c, "Generate", bad.SerializeToString(), replies, {}) == (
        "INVALID_ARGUMENT", "sealed payload is not a valid GenerateBody")
    assert len(c.chat("fine", 2).tokens) == 2  # the session survives all of that


def test_refusals_after_opening_say_nothing_in_cleartext(local_app, client_factory, monkeypatch):
    """Counts and limits travel only sealed: the cleartext status is the code and a generic message."""
    c = client_factory()
    meta = (("authorization", f"Bearer {c.token}"),)
    replica = local_app.replicas[local_app.service.sessions.get(c.session_id).replica].obj
    monkeypatch.setattr(replica, "context", 12)  # (gpt2-mini: 256) a short context to run over
    cases = [  # (body, code, words of the sealed reason)
        (serving_pb2.GenerateBody(prompt="x" * 65, max_new_tokens=1), "INVALID_ARGUMENT", "prompt has 65 tokens"),
        (serving_pb2.GenerateBody(prompt="hi", max_new_tokens=33), "INVALID_ARGUMENT", "max_new_tokens 33"),
        (serving_pb2.GenerateBody(prompt="", max_new_tokens=1), "INVALID_ARGUMENT", "the prompt is empty"),
        (serving_pb2.GenerateBody(prompt="x" * 10, max_new_tokens=3), "INVALID_ARGUMENT",
         "conversation (10 tokens) + 3 new tokens exceeds the context of 12"),
        # generation parameters (issue 16): every bad one is refused sealed
        (serving_pb2.GenerateBody(prompt="hi", temperature=2.5), "INVALID_ARGUMENT", "temperature must be 0..2"),
        (serving_pb2.GenerateBody(prompt="hi", temperature=-0.1), "INVALID_ARGUMENT", "temperature must be 0..2"),
        (serving_pb2.GenerateBody(prompt="hi", temperature=float("nan")), "INVALID_ARGUMENT", "temperature"),
        (serving_pb2.GenerateBody(prompt="hi", top_p=0.0), "INVALID_ARGUMENT", "top_p must be in (0, 1]"),
        (serving_pb2.GenerateBody(prompt="hi", top_p=1.5), "INVALID_ARGUMENT", "top_p must be in (0, 1]"),
        (serving_pb2.GenerateBody(prompt="hi", top_k=10**6), "INVALID_ARGUMENT", "the vocabulary size"),
        (serving_pb2.GenerateBody(prompt="hi", stop=["a", "b", "c", "d", "e"]), "INVALID_ARGUMENT",
         "up to 4 stop sequences"),
        (serving_pb2.GenerateBody(prompt="hi", stop=[""]), "INVALID_ARGUMENT", "characters each"),
        (serving_pb2.GenerateBody(prompt="hi", stop=["s" * 65]), "INVALID_ARGUMENT", "characters each"),
        (serving_pb2.GenerateBody(prompt="hi", messages=[serving_pb2.ChatMessage(role="user", content="hi")]),
         "INVALID_ARGUMENT", "a prompt or messages, not both"),
        (serving_pb2.GenerateBody(messages=[serving_pb2.ChatMessage(role="tool", content="hi")]), "INVALID_ARGUMENT",
         "message role 'tool'"),
    ]
    for i, (body, code_name, words) in enumerate(cases):
        req = _sealed_req(c, body, f"case-{i}").SerializeToString()
        code, msg, replies, _ = _raw_full(local_app, "Generate", req, meta)
        assert code == getattr(grpc.StatusCode, code_name) and msg == SEALED_REFUSAL, (words, msg)
        sealed_code, reason = _sealed_refusal(c, "Generate", req, replies, {})
        assert sealed_code == code_name and words in reason
        assert not any(ch.isdigit() for ch in msg)
    assert len(c.chat("fine", 1).tokens) == 1


def test_too_many_sessions_is_resource_exhausted(local_app, client_factory):
    free = local_app.scfg.max_sessions - len(local_app.service.sessions)
    held = [client_factory() for _ in range(free)]
    extra = client_factory(attest=False)
    with pytest.raises(ServingError) as err:
        extra.attest()
    assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_sessions" in err.value.details
    held[0].close()
    extra.attest()  # a slot freed up
    assert len(extra.chat("ok", 1).tokens) == 1
    for h in held[1:]:
        h.close()
    extra.close()
    _assert_healthy(client_factory)


def _meta(client):
    return (("authorization", f"Bearer {client.token}"),)


def _embed_req(client, body: bytes, aad=None, request_id=None):
    from bifrost.proto.wire import AAD_EMBED

    return serving_pb2.SealedRequest(session_id=client.session_id, request_id=request_id or secrets.token_hex(8),
                                     sealed=client.channel.seal(body, aad or AAD_EMBED)).SerializeToString()


def test_oversized_sealed_payload_is_invalid_argument_naming_the_limit(local_app, client_factory):
    c = client_factory()
    limit = local_app.scfg.max_request_bytes
    big = serving_pb2.SealedRequest(session_id=c.session_id, request_id="big", sealed=bytes(limit + 1))
    for method in ("Generate", "Embed", "CloseSession"):
        code, msg = _raw(local_app, method, big.SerializeToString(), _meta(c))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and f"max_request_bytes={limit}" in msg, (method, msg)
    assert len(c.chat("still fine", 1).tokens) == 1


def test_bad_embed_requests(local_app, client_factory):
    from bifrost.proto.wire import AAD_GENERATE as GEN

    c = client_factory()
    meta = _meta(c)
    assert _raw(local_app, "Embed", b"\xff\xff\xff\xff garbage", meta)[0] == grpc.StatusCode.INVALID_ARGUMENT
    unsealed = serving_pb2.SealedRequest(session_id=c.session_id, request_id="u", sealed=b"x").SerializeToString()
    assert _raw(local_app, "Embed", unsealed)[0] == grpc.StatusCode.UNAUTHENTICATED
    empty = serving_pb2.SealedRequest(session_id=c.session_id, request_id="e").SerializeToString()
    code, msg = _raw(local_app, "Embed", empty, meta)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "empty" in msg
    # authentic, not an EmbedBody: refused with the reason sealed in the trailing metadata
    req = _embed_req(c, b"\xff\xff\xff")
    code, msg, _, trailers = _raw_full(local_app, "Embed", req, meta)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and msg == SEALED_REFUSAL
    assert _sealed_refusal(c, "Embed", req, [], trailers) == ("INVALID_ARGUMENT", "sealed payload is not a valid EmbedBody")
    req = _embed_req(c, serving_pb2.EmbedBody(texts=["hi"]).SerializeToString())
    code, msg, _, trailers = _raw_full(local_app, "Embed", req, meta)
    assert code == grpc.StatusCode.FAILED_PRECONDITION and msg == SEALED_REFUSAL
    assert "not an encoder" in _sealed_refusal(c, "Embed", req, [], trailers)[1]  # gpt2-mini generates
    with pytest.raises(ServingError) as err:  # the SDK raises the sealed reason
        c.embed(["hi"])
    assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION and "not an encoder" in err.value.details
    assert err.value.sealed
    # a record sealed for Generate replayed into Embed: the associated data differs -> refused, nothing changes
    code, msg = _raw(local_app, "Embed", _embed_req(c, b"hi", aad=GEN), meta)
    assert code == grpc.StatusCode.PERMISSION_DENIED and "session is unchanged" in msg
    assert len(c.chat("still open", 1).tokens) == 1


def _close_req(client, sealed: bytes | None = None, request_id=None) -> bytes:
    if sealed is None:
        sealed = client.channel.seal(serving_pb2.CloseBody().SerializeToString(), AAD_CLOSE)
    return serving_pb2.SealedRequest(session_id=client.session_id, request_id=request_id or secrets.token_hex(8),
                                     sealed=sealed).SerializeToString()


def test_bad_close_session_requests(local_app, client_factory):
    """Only a sealed CloseBody from the session's key holder closes it: someone who sniffed the bearer
    token cannot end the session with an empty, forged, misdirected or replayed record."""
    a, b = client_factory(), client_factory()
    sessions = local_app.service.sessions
    assert _raw(local_app, "CloseSession", b"\x12\xff", _meta(a))[0] == grpc.StatusCode.INVALID_ARGUMENT
    assert _raw(local_app, "CloseSession", _close_req(a))[0] == grpc.StatusCode.UNAUTHENTICATED
    assert _raw(local_app, "CloseSession", _close_req(a), _meta(b))[0] == grpc.StatusCode.PERMISSION_DENIED  # b's token
    unknown = serving_pb2.SealedRequest(session_id=secrets.token_bytes(16), request_id="c2", sealed=b"x").SerializeToString()
    assert _raw(local_app, "CloseSession", unknown, _meta(a))[0] == grpc.StatusCode.NOT_FOUND
    empty = serving_pb2.SealedRequest(session_id=a.session_id, request_id="c1").SerializeToString()
    code, msg = _raw(local_app, "CloseSession", empty, _meta(a))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "empty" in msg
    stale = a.channel.seal(serving_pb2.CloseBody().SerializeToString(), AAD_CLOSE)  # held back, used later
    assert len(a.chat("a talks", 1).tokens) == 1
    bad = [
        (secrets.token_bytes(8 + 256 + 16), "record_authentication"),  # forged
        (a.channel.seal(serving_pb2.GenerateBody(prompt="hi").SerializeToString(), AAD_GENERATE),
         "record_authentication"),  # a Generate record
        (stale, "sequence"),  # an older record of this session (replayed / reordered)
        (b"short", "record_format"),
    ]
    for sealed, check in bad:
        code, msg = _raw(local_app, "CloseSession", _close_req(a, sealed), _meta(a))
        assert code == grpc.StatusCode.PERMISSION_DENIED and check in msg and "unchanged" in msg, (check, msg)
        assert sessions.get(a.session_id) is not None
    assert len(a.chat("a survives", 1).tokens) == 1
    good = _close_req(a)
    assert _raw(local_app, "CloseSession", good, _meta(a))[0] == grpc.StatusCode.OK
    assert sessions.get(a.session_id) is None
    assert _raw(local_app, "CloseSession", _close_req(a), _meta(a))[0] == grpc.StatusCode.NOT_FOUND
    with pytest.raises(ServingError) as err:
        a.chat("closed now", 1)
    assert err.value.code == grpc.StatusCode.NOT_FOUND
    assert len(b.chat("b survives", 1).tokens) == 1


def test_sdk_close_sends_a_sealed_close(local_app, client_factory):
    c = client_factory()
    sid = c.session_id
    replica = local_app.replicas[local_app.service.sessions.get(sid).replica].obj
    assert sid in replica._sessions
    c.close()
    assert local_app.service.sessions.get(sid) is None and sid not in replica._sessions


def test_bad_input_while_another_session_streams(local_app, client_factory, serve_run_config):
    """Every kind of bad input from other callers, sent while a session is mid-stream: it completes unaffected."""
    import threading

    from bifrost.model.tokenizer import ByteTokenizer

    from .conftest import MODEL, plaintext_greedy

    streaming, attacker = client_factory(), client_factory()
    started, done, got, failures = threading.Event(), threading.Event(), [], []

    def run():
        try:
            for ev in streaming.generate("Streaming along", 24):
                got.extend(ev.token_ids)
                started.set()
        except Exception as exc:  # noqa: BLE001 - asserted below
            failures.append(repr(exc))
        finally:
            started.set()
            done.set()

    t = threading.Thread(target=run)
    t.start()
    assert started.wait(120)
    meta = _meta(attacker)
    limit = local_app.scfg.max_request_bytes
    bad = [
        ("Generate", b"\xff\xff\xff\xff garbage", meta),
        ("Generate", serving_pb2.SealedRequest(session_id=attacker.session_id, request_id="o",
                                               sealed=bytes(limit + 1)).SerializeToString(), meta),
        # the streaming session's id with the attacker's token
        ("Generate", serving_pb2.SealedRequest(session_id=streaming.session_id, request_id="x",
                                               sealed=b"forged").SerializeToString(), meta),
        ("Embed", b"\x0a\xff\xff\xff\xff\x0f", meta),
        ("CloseSession", serving_pb2.SealedRequest(session_id=streaming.session_id,
                                                   request_id="y").SerializeToString(), meta),
        # the streaming session's own (sniffed) token with a forged close record
        ("CloseSession", serving_pb2.SealedRequest(session_id=streaming.session_id, request_id="k",
                                                   sealed=secrets.token_bytes(280)).SerializeToString(),
         _meta(streaming)),
        ("Attest", serving_pb2.AttestRequest(nonce=b"short", client_public_key=bytes(32)).SerializeToString(), ()),
        ("Generate", _sealed_req(attacker, serving_pb2.GenerateBody(prompt="x" * 65, max_new_tokens=1), "big")
         .SerializeToString(), meta),
    ]
    for method, payload, md in bad:
        code, _ = _raw(local_app, method, payload, md)
        assert code != grpc.StatusCode.OK, method
    tampered = _sealed_req(attacker, serving_pb2.GenerateBody(prompt="hi", max_new_tokens=1), "t")
    tampered.sealed = tampered.sealed[:-1] + bytes([tampered.sealed[-1] ^ 1])
    assert _raw(local_app, "Generate", tampered.SerializeToString(), meta)[0] == grpc.StatusCode.PERMISSION_DENIED
    assert done.wait(300)
    t.join()
    assert not failures, failures
    assert got == plaintext_greedy(MODEL, serve_run_config.seed, ByteTokenizer().encode("Streaming along"), 24)


def test_unexpected_exception_is_internal_without_details(local_app, client_factory, caplog):
    c = client_factory()
    secret_detail = f"detail-{secrets.token_hex(6)}"

    def broken(*args, **kwargs):
        raise RuntimeError(secret_detail)

    caplog.set_level(logging.DEBUG)
    gate = local_app.service.gate
    original = gate.authorize
    gate.authorize = broken  # a fault inside the handler (e.g. a bug in a dependency)
    try:
        req = serving_pb2.SealedRequest(session_id=c.session_id, request_id="i", sealed=b"opaque")
        for method in ("Generate", "Embed", "CloseSession"):
            code, msg = _raw(local_app, method, req.SerializeToString(), _meta(c))
            assert code == grpc.StatusCode.INTERNAL and msg == "internal server error", (method, msg)
    finally:
        gate.authorize = original
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "RuntimeError" in logged and secret_detail not in logged and "Traceback" not in logged
    assert len(c.chat("still serving", 1).tokens) == 1


def test_pending_sessions_are_capped(app_factory, worker_factory):
    _, _, address = worker_factory(MODEL_NAME, 64)
    app = app_factory(worker=address, max_pending_sessions=2)
    a, b = connect(app), connect(app)  # attested, nothing sent yet
    extra = connect(app, attest=False)
    with pytest.raises(ServingError) as err:
        extra.attest()
    assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_pending_sessions=2" in err.value.details
    assert len(a.chat("now in use", 1).tokens) == 1  # a is no longer pending
    extra.attest()
    for c in (a, b, extra):
        c.close()


def test_full_workers_during_attest_is_resource_exhausted(app_factory, worker_factory):
    _, _, address = worker_factory(MODEL_NAME, 1)  # room for one session (replicas hold none of their own)
    app = app_factory(worker=address)
    a = connect(app)
    b = connect(app, attest=False)
    with pytest.raises(ServingError) as err:
        b.attest()
    assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "CKKS workers" in err.value.details
    assert len(app.service.sessions) == 1
    assert len(a.chat("unaffected", 1).tokens) == 1
    a.close()
    b.attest()  # its worker slot is free again
    assert len(b.chat("now", 1).tokens) == 1
    b.close()


def test_tokens_name_what_the_issuer_verified_and_a_refusing_issuer_policy_issues_none(app_factory, worker_factory,
                                                                                       tmp_path):
    """The front end verifies each replica's fresh evidence before it signs a token: the token's measurement
    is the evidence's, and an issuer policy the evidence fails means UNAVAILABLE and no session."""
    from bifrost.attest.tokens import verify_token

    _, _, address = worker_factory(MODEL_NAME, 64)
    app = app_factory(worker=address)
    c = connect(app)
    claims = verify_token(c.token, [app.service.issuer.public_key])
    assert claims.simulated and bytes.fromhex(claims.measurement) == c.verdict.measurement
    assert bytes.fromhex(claims.report_data) == c.verdict.report_data and claims.tcb_status == c.verdict.tcb_status
    assert len(c.chat("ok", 1).tokens) == 1
    c.close()
    strict = tmp_path / "issuer.yaml"
    strict.write_text("allow_simulated: false\n")
    refusing = app_factory(worker=address, issuer_policy=str(strict))
    with pytest.raises(ServingError) as err:
        connect(refusing)
    assert err.value.code == grpc.StatusCode.UNAVAILABLE and "issuer policy (simulated)" in err.value.details
    assert len(refusing.service.sessions) == 0
