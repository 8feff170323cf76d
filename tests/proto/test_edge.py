"""The gRPC edge (bifrost.proto.edge) shared by the front end and the worker: error classes become the statuses of
bifrost.errors.ERROR_TABLE; a bug is INTERNAL without details, logged by type and code location only; a request
that does not parse is INVALID_ARGUMENT."""

from __future__ import annotations

import logging
from concurrent import futures

import grpc
import pytest

from bifrost.errors import InternalError, RefusedError, UnavailableError, UserError
from bifrost.proto import serving_pb2
from bifrost.proto.edge import MALFORMED, Abort, Edge, code_locations, malformed_message, parse_or_malformed

log = logging.getLogger("tests.edge")
SERVICE = "tests.edge.Edge"
SECRET = "secret-looking internal state 0xfeed"


def _raise(exc):
    def fn(request, context):
        raise exc

    return fn


def _stream_then(exc):
    def fn(request, context):
        yield serving_pb2.SealedReply(sealed=b"first")
        raise exc

    return fn


@pytest.fixture(scope="module")
def edge_server():
    edge = Edge(log, "internal test error", invalid=(ValueError,), sealed_trailer="test-sealed-bin")
    parse = parse_or_malformed(serving_pb2.SealedRequest)
    ser = serving_pb2.SealedReply.SerializeToString

    def unary(name, fn):
        return grpc.unary_unary_rpc_method_handler(edge.unary(name, fn, "SealedRequest"), parse, ser)

    handlers = {
        "Echo": unary("Echo", lambda req, ctx: serving_pb2.SealedReply(sealed=req.sealed)),
        "User": unary("User", _raise(UserError("request_id must be 1..64 characters"))),
        "Unavailable": unary("Unavailable", _raise(UnavailableError("no CKKS worker available"))),
        "Refused": unary("Refused", _raise(RefusedError("quarantined"))),
        "Internal": unary("Internal", _raise(InternalError(SECRET))),
        "Bug": unary("Bug", _raise(RuntimeError(SECRET))),
        "Invalid": unary("Invalid", _raise(ValueError("bad ciphertext"))),
        "Abort": unary("Abort", _raise(Abort(grpc.StatusCode.FAILED_PRECONDITION, "busy", sealed=b"sealed-reason"))),
        "Stream": grpc.unary_stream_rpc_method_handler(
            edge.streaming("Stream", _stream_then(RuntimeError(SECRET)), "SealedRequest"), parse, ser),
    }
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    yield channel
    channel.close()
    server.stop(0)


GOOD = serving_pb2.SealedRequest(session_id=b"s" * 16, request_id="r", sealed=b"x").SerializeToString()


def _call(channel, method, body=GOOD):
    call = channel.unary_unary(f"/{SERVICE}/{method}")
    try:
        reply, rpc = call.with_call(body, timeout=10)
        return grpc.StatusCode.OK, serving_pb2.SealedReply.FromString(reply).sealed, dict(rpc.trailing_metadata() or ())
    except grpc.RpcError as exc:
        return exc.code(), exc.details(), dict(exc.trailing_metadata() or ())


@pytest.mark.parametrize("method, code, details", [
    ("User", grpc.StatusCode.INVALID_ARGUMENT, "request_id must be 1..64 characters"),
    ("Unavailable", grpc.StatusCode.UNAVAILABLE, "no CKKS worker available"),
    ("Refused", grpc.StatusCode.PERMISSION_DENIED, "quarantined"),
    ("Invalid", grpc.StatusCode.INVALID_ARGUMENT, "bad ciphertext"),
    ("Internal", grpc.StatusCode.INTERNAL, "internal test error"),
    ("Bug", grpc.StatusCode.INTERNAL, "internal test error"),
])
def test_errors_become_the_table_status(edge_server, caplog, method, code, details):
    caplog.set_level(logging.DEBUG)
    got = _call(edge_server, method)
    assert got[:2] == (code, details)
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert SECRET not in logged and "Traceback" not in logged
    if code == grpc.StatusCode.INTERNAL:  # logged by type and code location only
        assert f"{method}: internal error" in logged and "test_edge.py" in logged


def test_an_abort_keeps_its_code_and_sends_its_sealed_record_as_trailer(edge_server):
    code, details, trailers = _call(edge_server, "Abort")
    assert (code, details) == (grpc.StatusCode.FAILED_PRECONDITION, "busy")
    assert trailers.get("test-sealed-bin") == b"sealed-reason"


@pytest.mark.parametrize("body", [b"\x12\xff\xff\xff", b"\x12\x02\xff\xfe", b"\xff\xff\xff"])
def test_a_request_that_does_not_parse_is_invalid_argument_and_the_server_keeps_serving(edge_server, body):
    code, details, _ = _call(edge_server, "Echo", body)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details == malformed_message("SealedRequest")
    assert "not a valid protobuf message" in details
    assert _call(edge_server, "Echo")[:2] == (grpc.StatusCode.OK, b"x")


def test_a_stream_that_fails_midway_ends_internal_without_details(edge_server):
    call = edge_server.unary_stream(f"/{SERVICE}/Stream")
    got = []
    with pytest.raises(grpc.RpcError) as err:
        for reply in call(GOOD, timeout=10):
            got.append(serving_pb2.SealedReply.FromString(reply).sealed)
    assert got == [b"first"]
    assert err.value.code() == grpc.StatusCode.INTERNAL and err.value.details() == "internal test error"


def test_the_parser_never_raises():
    parse = parse_or_malformed(serving_pb2.SealedRequest)
    assert parse(b"\x12\xff\xff\xff") is MALFORMED
    assert parse(GOOD).request_id == "r"


def test_code_locations_carry_no_message():
    try:
        raise RuntimeError(SECRET)
    except RuntimeError as exc:
        where = code_locations(exc)
    assert SECRET not in where and "test_edge.py" in where and "test_code_locations_carry_no_message" in where
