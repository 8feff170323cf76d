"""Bad input always ends as a gRPC status with a message; the server keeps serving other sessions."""

from __future__ import annotations

import time

import grpc
import pytest

from bifrost.proto import serving_pb2
from bifrost.serve.actors import AAD_GENERATE
from bifrost.serve.client import ServingError

METHOD = "/bifrost.serving.v1.BifrostServing/"


def _raw(app, method: str, payload: bytes, metadata=()):
    with grpc.insecure_channel(f"127.0.0.1:{app.port}") as ch:
        call = ch.unary_stream(METHOD + method) if method == "Generate" else ch.unary_unary(METHOD + method)
        try:
            out = call(payload, metadata=metadata, timeout=60)
            return grpc.StatusCode.OK, list(out) if method == "Generate" else out
        except grpc.RpcError as exc:
            return exc.code(), exc.details()


def _sealed_req(client, body: serving_pb2.GenerateBody, request_id="r1"):
    return serving_pb2.SealedRequest(session_id=client.session_id, request_id=request_id,
                                     sealed=client.session.seal(body.SerializeToString(), AAD_GENERATE))


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
    expired = svc.issuer.issue(v, node_id="n", model_digest=svc.info["model_digest"], now=time.time() - 10_000)
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


def test_tampered_payload_closes_only_that_session(local_app, client_factory):
    victim, bystander = client_factory(), client_factory()
    req = _sealed_req(victim, serving_pb2.GenerateBody(prompt="hi", max_new_tokens=1))
    sealed = bytearray(req.sealed)
    sealed[-1] ^= 1
    req.sealed = bytes(sealed)
    meta = (("authorization", f"Bearer {victim.token}"),)
    code, msg = _raw(local_app, "Generate", req.SerializeToString(), meta)
    assert code == grpc.StatusCode.PERMISSION_DENIED and "session closed" in msg
    with pytest.raises(ServingError) as err:  # the session is gone for good
        victim.chat("hi", 1)
    assert err.value.code == grpc.StatusCode.NOT_FOUND
    assert len(bystander.chat("still here", 2).tokens) == 2


def test_limits_and_malformed_fields_are_invalid_argument(local_app, client_factory):
    c = client_factory()
    with pytest.raises(ServingError) as err:
        c.chat("x" * 65, 1)  # 65 byte-level tokens > max_prompt_tokens=64
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and "max_prompt_tokens=64" in err.value.details
    with pytest.raises(ServingError) as err:
        c.chat("x", 33)
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and "32" in err.value.details
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
    # a sealed record that authenticates but is not a GenerateBody
    bad = serving_pb2.SealedRequest(session_id=c.session_id, request_id="z",
                                    sealed=c.session.seal(b"\xff\xff\xff", AAD_GENERATE))
    code, msg = _raw(local_app, "Generate", bad.SerializeToString(), meta)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "GenerateBody" in msg
    assert len(c.chat("fine", 2).tokens) == 2  # the session survives all of that


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
