"""One BifrostClient shared by threads: requests on its session are serialized, so records reach the
server in sequence order and every answer opens; a thread never waits on its own open stream."""

from __future__ import annotations

import threading
import time

import pytest

from bifrost.errors import BifrostError
from bifrost.model.tokenizer import ByteTokenizer

from .conftest import MODEL, plaintext_greedy

TURNS = 3


def test_two_threads_share_one_client(client_factory, serve_run_config):
    c = client_factory()
    prompts = {0: "First thread", 1: "Second thread says"}
    results: dict[int, list[list[int]]] = {0: [], 1: []}
    errors: list[str] = []
    start = threading.Barrier(2)
    seal = c.channel.seal

    def slow_seal(*args, **kwargs):  # a pause between sealing an even-numbered record and sending it: without
        record = seal(*args, **kwargs)  # the client's lock the other thread's later record would overtake it
        if int.from_bytes(record[:8], "big") % 2 == 0:
            time.sleep(0.3)
        return record

    c.channel.seal = slow_seal

    def run(i: int) -> None:
        try:
            start.wait()
            for _ in range(TURNS):  # reset_history: each turn's tokens depend on its own prompt only
                results[i].append(c.chat(prompts[i], 2, reset_history=True).tokens)
        except Exception as exc:  # noqa: BLE001 - asserted below
            errors.append(repr(exc))

    threads = [threading.Thread(target=run, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    for i, prompt in prompts.items():
        expected = plaintext_greedy(MODEL, serve_run_config.seed, ByteTokenizer().encode(prompt), 2)
        assert results[i] == [expected] * TURNS
    assert len(c.chat("after both", 1).tokens) == 1


def test_a_thread_gets_an_error_not_a_deadlock_inside_its_own_stream(client_factory):
    c = client_factory()
    stream = c.generate("an open stream", 3)
    next(stream)
    with pytest.raises(BifrostError, match="already has a request in progress"):
        c.chat("nested", 1)
    rest = list(stream)
    assert len(rest) == 2
    assert len(c.chat("after the stream", 1).tokens) == 1  # the lock was released when the stream ended
    stream = c.generate("closed early", 3)
    next(stream)
    stream.close()  # closing the generator releases it too
    assert len(c.chat("after close", 1).tokens) == 1


def test_another_thread_waits_for_the_stream_to_end(client_factory):
    c = client_factory()
    stream = c.generate("holder", 3)
    first = next(stream)
    order: list[str] = []

    def other() -> None:
        c.chat("waiter", 1)
        order.append("waiter done")

    t = threading.Thread(target=other)
    t.start()
    t.join(timeout=1.0)  # hang guard only: it cannot finish while the stream holds the client
    assert t.is_alive() and not order
    rest = list(stream)
    order.append("stream done")
    t.join(timeout=120)
    assert not t.is_alive() and order == ["stream done", "waiter done"]
    assert len(first.token_ids) + sum(len(ev.token_ids) for ev in rest) == 3
