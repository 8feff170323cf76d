"""The trusted replica on its own (no gRPC front end): typed requests in, sealed records out.

A client half of the attested channel (the same one :class:`~bifrost.serve.client.BifrostClient` uses)
opens what the replica seals, so each test checks what a real client would read.
"""

from __future__ import annotations

import secrets
import threading

import pytest

from bifrost.attest.channel import ClientHandshake, answer_aad
from bifrost.model.tokenizer import ByteTokenizer
from bifrost.proto import serving_pb2
from bifrost.proto.replica import (AttestRequest, Attested, CancelRequest, CloseIdle, DropSession, GenerateRequest,
                                   Refusal, ReplicaAPI, SealedReply, Status)
from bifrost.proto.wire import AAD_CHUNK, AAD_GENERATE, SEALED_REFUSAL
from bifrost.tee.replica import TrustedReplica
from bifrost.tee.runtime import plaintext_greedy_tokens

MODEL = "gpt2-mini"


@pytest.fixture(scope="module")
def replica(worker_factory, run_config, tmp_path_factory) -> TrustedReplica:
    from bifrost.serve.config import load_serve_config

    _, _, endpoint = worker_factory(MODEL, 16)
    runs = tmp_path_factory.mktemp("replica-runs")
    scfg = load_serve_config().replace(runtime="local", max_sessions=4, max_prompt_tokens=64, max_new_tokens=16,
                                       run_dir=str(runs), quarantine_file=str(runs / "quarantine.json"))
    r = TrustedReplica(run_config.replace(model=MODEL), scfg, [endpoint])
    api: ReplicaAPI = r  # the replica implements the front end's Protocol (checked by the type checker)
    yield api
    r.shutdown()


@pytest.fixture(scope="module")
def plain(run_config):
    from bifrost.model.catalog import load_model, resolve

    return load_model(resolve(MODEL), run_config.seed)


@pytest.fixture(autouse=True)
def _close_sessions(request):
    """Each test's sessions end with it: the replica holds at most max_sessions_per_replica (4) at once."""
    yield
    if "replica" in request.fixturenames:
        r = request.getfixturevalue("replica")
        for sid in list(r._sessions):
            r.drop_session(DropSession(sid))


class _Client:
    """The client's half of one session."""

    def __init__(self, replica: TrustedReplica) -> None:
        nonce = secrets.token_bytes(32)
        hs = ClientHandshake(nonce)
        out = replica.attest(AttestRequest(nonce, hs.public_key, ""))
        assert isinstance(out, Attested), out
        self.replica, self.session_id = replica, out.session_id
        self.channel = hs.connect(out.server_public_key, out.report_data, out.suite)

    def request(self, request_id: str = "", **body) -> GenerateRequest:
        sealed = self.channel.seal(serving_pb2.GenerateBody(**body).SerializeToString(), AAD_GENERATE)
        self.answer, self.index = sealed, 0  # the records that follow answer this request, from index 0
        return GenerateRequest(self.session_id, sealed, request_id)

    def chunks(self, items) -> tuple[list[serving_pb2.TokenChunk], Refusal | None]:
        """Open the (next) records of the answer to the last request."""
        chunks, refusal = [], None
        for item in items:
            if isinstance(item, Refusal):
                refusal = item
            else:
                assert isinstance(item, SealedReply)
                aad = answer_aad(AAD_CHUNK, self.answer, self.index)
                chunks.append(serving_pb2.TokenChunk.FromString(self.channel.open(item.record, aad, self.index == 0)))
                self.index += 1
        return chunks, refusal


def test_a_turn_streams_the_plaintext_tokens_and_their_text(replica, plain):
    c = _Client(replica)
    chunks, refusal = c.chunks(replica.generate(c.request(prompt="The replica alone", max_new_tokens=6)))
    tokens = [t for ch in chunks for t in ch.token_ids]
    assert refusal is None and len(chunks) == 6
    assert tokens == plaintext_greedy_tokens(plain, ByteTokenizer().encode("The replica alone"), 6)
    assert "".join(ch.text for ch in chunks) == replica.runtime.tokenizer.decode(tokens)
    assert [ch.done for ch in chunks] == [False] * 5 + [True] and chunks[-1].finish_reason == "length"
    assert chunks[0].prompt_tokens == len("The replica alone") and all(ch.prompt_tokens == 0 for ch in chunks[1:])
    # the conversation continues from the turn's tokens: the second turn prefills history + prompt
    more, _ = c.chunks(replica.generate(c.request(prompt=" and more", max_new_tokens=2)))
    want = plaintext_greedy_tokens(plain,
                                   ByteTokenizer().encode("The replica alone") + tokens + ByteTokenizer().encode(" and more"), 2)
    assert [t for ch in more for t in ch.token_ids] == want


def test_a_stop_sequence_ends_the_turn_before_it(replica):
    c = _Client(replica)
    free, _ = c.chunks(replica.generate(c.request(prompt="stop here", max_new_tokens=8, reset_history=True)))
    text = "".join(ch.text for ch in free)
    stop = text[3:5]  # two characters the greedy continuation is known to contain (maybe earlier too)
    assert len(stop) == 2
    chunks, refusal = c.chunks(replica.generate(c.request(prompt="stop here", max_new_tokens=8, reset_history=True,
                                                          stop=[stop])))
    released = "".join(ch.text for ch in chunks)
    assert refusal is None and released == text[:text.index(stop)]
    assert chunks[-1].done and chunks[-1].finish_reason == "stop" and len(chunks) < 8


def test_the_next_turn_opens_after_a_turn_the_client_stopped_reading(replica, plain):
    """A client that stops reading a turn whose next records the replica already sealed (a cancel racing the
    stream): its next turn's answer skips them and opens, with the plaintext-equal tokens."""
    c = _Client(replica)
    stream = replica.generate(c.request("left", prompt="left unread", max_new_tokens=8))
    first, unread = next(stream), next(stream)  # both sealed; the client opens only the first
    assert isinstance(unread, SealedReply) and len(c.chunks([first])[0]) == 1
    assert replica.cancel(CancelRequest(c.session_id, "left"))
    list(stream)  # the rest of that answer, never opened
    chunks, refusal = c.chunks(replica.generate(c.request("next", prompt="read this", max_new_tokens=3,
                                                          reset_history=True)))
    want = plaintext_greedy_tokens(plain, ByteTokenizer().encode("read this"), 3)
    assert refusal is None and [t for ch in chunks for t in ch.token_ids] == want


def test_the_replica_itself_holds_max_turns_per_session(worker_factory, run_config, tmp_path):
    """max_turns_per_session is bound into the serving-config digest, so the replica enforces it (not only the
    untrusted front end): the turn past it is refused sealed, RESOURCE_EXHAUSTED."""
    from bifrost.serve.config import load_serve_config

    _, _, endpoint = worker_factory(MODEL, 16)
    scfg = load_serve_config().replace(runtime="local", max_sessions=2, max_turns_per_session=2, max_new_tokens=4,
                                       run_dir=str(tmp_path), quarantine_file=str(tmp_path / "quarantine.json"))
    r = TrustedReplica(run_config.replace(model=MODEL), scfg, [endpoint])
    try:
        c = _Client(r)
        for i in range(2):
            chunks, refusal = c.chunks(r.generate(c.request(f"t{i}", prompt="count me", max_new_tokens=1)))
            assert refusal is None and len(chunks) == 1
        chunks, refusal = c.chunks(r.generate(c.request("t2", prompt="one too many", max_new_tokens=1)))
        assert refusal is not None and refusal.status.value == "RESOURCE_EXHAUSTED" and refusal.message == SEALED_REFUSAL
        assert chunks[-1].error_code == "RESOURCE_EXHAUSTED" and "max_turns_per_session=2" in chunks[-1].error
    finally:
        r.shutdown()


def test_a_cancel_request_stops_the_running_turn_and_nothing_more_is_streamed(replica):
    c = _Client(replica)
    before = replica.stats()["turns_cancelled"]
    stream = replica.generate(c.request("turn-1", prompt="cancel me", max_new_tokens=16))
    first = next(stream)
    assert isinstance(first, SealedReply) and len(c.chunks([first])[0]) == 1
    assert replica.cancel(CancelRequest(c.session_id, "turn-1"))
    rest, refusal = c.chunks(stream)
    assert refusal is None and len(rest) < 15 and not any(ch.done for ch in rest)
    assert replica.stats()["turns_cancelled"] == before + 1
    # a cancel that arrives before its turn starts stops it before any token
    assert replica.cancel(CancelRequest(c.session_id, "turn-2"))
    assert c.chunks(replica.generate(c.request("turn-2", prompt="never", max_new_tokens=4))) == ([], None)


def test_refusals_before_the_record_opens_are_cleartext_and_change_nothing(replica):
    c = _Client(replica)
    forged = GenerateRequest(c.session_id, b"\x00" * 64, "")
    [refusal] = list(replica.generate(forged))
    assert isinstance(refusal, Refusal) and refusal.status is Status.PERMISSION_DENIED and not refusal.opened
    chunks, refusal = c.chunks(replica.generate(c.request(prompt="still open", max_new_tokens=2)))
    assert refusal is None and len(chunks) == 2  # the session and its sequence numbers were unchanged
    [unknown] = list(replica.generate(GenerateRequest(b"\x01" * len(c.session_id), b"x", "")))
    assert isinstance(unknown, Refusal) and unknown.status is Status.NOT_FOUND


def test_a_refusal_after_the_record_opened_is_sealed(replica):
    c = _Client(replica)
    chunks, refusal = c.chunks(replica.generate(c.request(prompt="too many", max_new_tokens=17)))
    assert refusal is not None and refusal.status is Status.INVALID_ARGUMENT and refusal.message == SEALED_REFUSAL
    [chunk] = chunks
    assert chunk.done and chunk.error_code == "INVALID_ARGUMENT" and "over the limit of 16" in chunk.error


def test_drop_session_closes_it_even_during_a_turn(replica):
    c = _Client(replica)
    stream = replica.generate(c.request(prompt="a long turn", max_new_tokens=16))
    assert isinstance(next(stream), SealedReply)
    done = threading.Event()
    threading.Thread(target=lambda: (replica.drop_session(DropSession(c.session_id)), done.set())).start()
    assert done.wait(30)
    items = list(stream)
    assert isinstance(items[-1], Refusal) and items[-1].status is Status.ABORTED
    [gone] = list(replica.generate(c.request(prompt="after", max_new_tokens=1)))
    assert isinstance(gone, Refusal) and gone.status is Status.NOT_FOUND
    assert c.session_id not in replica.close_idle(CloseIdle(0.0))


def test_a_refused_request_leaves_the_conversation_as_it_was(replica, plain):
    """reset_history takes effect only with a request that is accepted."""
    c = _Client(replica)
    first, _ = c.chunks(replica.generate(c.request(prompt="keep this", max_new_tokens=2)))
    refused, refusal = c.chunks(replica.generate(c.request(prompt="x", max_new_tokens=2, reset_history=True,
                                                           temperature=9.0)))
    assert refusal is not None and refused[0].error_code == "INVALID_ARGUMENT" and "temperature" in refused[0].error
    more, _ = c.chunks(replica.generate(c.request(prompt=" then", max_new_tokens=2)))
    history = ByteTokenizer().encode("keep this") + [t for ch in first for t in ch.token_ids]
    want = plaintext_greedy_tokens(plain, history + ByteTokenizer().encode(" then"), 2)
    assert [t for ch in more for t in ch.token_ids] == want
