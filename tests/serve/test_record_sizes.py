"""Lengths are data too: sealed records are padded to size buckets, so an observer of the wire sees the
same record size for different tokens and for short and long prompts (within a bucket)."""

from __future__ import annotations

import secrets

import grpc

from bifrost.attest.binding import compute_report_data
from bifrost.attest.channel import ClientHandshake, ServerHandshake, answer_aad, record_size
from bifrost.proto import serving_pb2
from bifrost.proto.wire import AAD_CHUNK, AAD_GENERATE


def _pair():
    server = ServerHandshake()
    nonce = secrets.token_bytes(32)
    rd = compute_report_data(server.public_key, nonce, bytes(32), bytes(32))
    client = ClientHandshake(nonce)
    return client.connect(server.public_key, rd), server.accept(client.public_key, nonce, rd)


def test_token_chunks_of_different_tokens_give_equal_records():
    c, s = _pair()
    chunks = [
        serving_pb2.TokenChunk(token_ids=[3139], text=" capital", token_seconds=1.25, prompt_tokens=11),
        serving_pb2.TokenChunk(token_ids=[4881], text=" France", token_seconds=0.0625),
        serving_pb2.TokenChunk(token_ids=[6342], text=" Paris", token_seconds=0.5),
        serving_pb2.TokenChunk(token_ids=[13], text=".", token_seconds=0.5, done=True),
        serving_pb2.TokenChunk(token_ids=[151935], text=" internationalization", token_seconds=3.0),
        serving_pb2.TokenChunk(token_ids=[200], text="", token_seconds=0.1),  # a held-back partial UTF-8 byte
    ]
    records = [s.seal(ch.SerializeToString(), AAD_CHUNK) for ch in chunks]
    assert len({len(r) for r in records}) == 1 and len(records[0]) == record_size(0)
    assert [serving_pb2.TokenChunk.FromString(c.open(r, AAD_CHUNK)) for r in records] == chunks


def test_short_and_long_prompts_give_equal_records():
    c, s = _pair()
    bodies = [serving_pb2.GenerateBody(prompt=p, max_new_tokens=32, has_sample_seed=True, sample_seed=2**63)
              for p in ("abc", "y" * 200)]
    records = [c.seal(b.SerializeToString(), AAD_GENERATE) for b in bodies]
    assert len(records[0]) == len(records[1]) == 280
    assert [serving_pb2.GenerateBody.FromString(s.open(r, AAD_GENERATE)) for r in records] == bodies
    # what stays visible: the bucket (a 1000-character prompt takes the 1 KiB one)
    assert len(c.seal(serving_pb2.GenerateBody(prompt="z" * 1000).SerializeToString(), AAD_GENERATE)) == 8 + 1024 + 16


def test_a_served_stream_has_one_record_size(local_app, client_factory):
    """On the wire (raw gRPC, as a network observer sees it): every record of a real stream, the first
    (with the context length) and the last (done) included, has the same size."""
    c = client_factory()
    sizes = []
    for prompt in ("Hi", "A much longer prompt than the first one, still one bucket"):
        req = serving_pb2.SealedRequest(session_id=c.session_id, request_id=secrets.token_hex(8),
                                        sealed=c.channel.seal(serving_pb2.GenerateBody(
                                            prompt=prompt, max_new_tokens=5).SerializeToString(), AAD_GENERATE))
        sizes.append(len(req.sealed))
        with grpc.insecure_channel(f"127.0.0.1:{local_app.port}") as ch:
            replies = list(ch.unary_stream("/bifrost.serving.v1.BifrostServing/Generate")(
                req.SerializeToString(), metadata=(("authorization", f"Bearer {c.token}"),), timeout=120))
        chunks = [serving_pb2.TokenChunk.FromString(c.channel.open(
            serving_pb2.SealedReply.FromString(r).sealed, answer_aad(AAD_CHUNK, req.sealed, i), i == 0))
            for i, r in enumerate(replies)]
        assert len(chunks) == 5 and chunks[-1].done and chunks[0].prompt_tokens > 0
        sizes += [len(serving_pb2.SealedReply.FromString(r).sealed) for r in replies]
    assert set(sizes) == {record_size(0)}
