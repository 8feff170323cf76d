"""The replica's step loop: schedule → execute → update, one token per running turn per step."""

from __future__ import annotations

import pytest

from bifrost.model.tokenizer import ByteTokenizer
from bifrost.tee.batching import DecodeBatcher
from bifrost.tee.pool import WorkerSessions
from bifrost.tee.runtime import TrustedRuntime, plaintext_greedy_tokens
from bifrost.tee.scheduler import StepLoop, TokenEvent, Turn, TurnEnd

MODEL = "gpt2-mini"


@pytest.fixture(scope="module")
def parts(worker_factory, run_config):
    _, _, endpoint = worker_factory(MODEL, 16)
    rt = TrustedRuntime(run_config.replace(model=MODEL), None, reference=True)
    pool = rt.worker_pool([endpoint])
    yield rt, pool
    pool.close()
    rt.close()


def _events(turn):
    out = []
    while not turn.events.empty():
        out.append(turn.events.get())
    return out


def test_prefills_go_one_at_a_time_while_prefilled_turns_decode_in_every_step(parts):
    """Driven by hand (``start=False``): a step starts at most one prompt prefill; a second turn's prefill
    starts only once the first finished, and from then on the first turn decodes one token per step."""
    rt, pool = parts
    batcher = DecodeBatcher(pool, window_s=10.0)  # the barrier rule must send, not the clock
    loop = StepLoop(rt, "bifrost", batcher, start=False)
    prompts = [ByteTokenizer().encode(t) for t in ("first prompt, a long one", "second prompt")]
    engines = [rt.new_engine(batcher.link_for(WorkerSessions(pool))) for _ in prompts]
    turns = [loop.submit(Turn(e, p, 3)) for e, p in zip(engines, prompts)]
    try:
        assert loop._schedule() == []  # nothing prefilled yet: no decodes; the first prefill starts
        assert loop._prefill[0] is turns[0] and list(loop._waiting) == [turns[1]]
        assert loop._update(loop._execute([])) == 1  # nothing to decode: the step waits for the prefill
        first = _events(turns[0])
        assert [type(e) for e in first] == [TokenEvent] and loop._prefill is None
        decodes = loop._schedule()  # turn 0 decodes; turn 1's prefill starts now, not before
        assert decodes == [turns[0]] and loop._prefill[0] is turns[1] and not loop._waiting
        loop._prefill[1].result(timeout=120)  # (deterministic from here: the prefill joins this step)
        assert loop._update(loop._execute(decodes)) == 2
        assert loop._schedule() == [turns[0], turns[1]]  # both decode in every step from now on
        while loop.busy():
            loop.step()
        tokens = []
        for turn, earlier in zip(turns, (first, [])):
            events = earlier + _events(turn)
            assert isinstance(events[-1], TurnEnd) and events[-1].error is None and not events[-1].cancelled
            tokens.append([e.token for e in events if isinstance(e, TokenEvent)])
            assert [e.index for e in events if isinstance(e, TokenEvent)] == list(range(len(tokens[-1])))
        assert tokens[1] == plaintext_greedy_tokens(rt.reference, prompts[1], 3)
        assert tokens[0] == plaintext_greedy_tokens(rt.reference, prompts[0], 3)
        assert batcher.stats.max_items == 2  # the two turns' decode calls were merged at least once
    finally:
        loop.close()
        for e in engines:
            e.close()


def test_a_stopped_turn_ends_at_the_next_step_and_says_so(parts):
    rt, pool = parts
    loop = StepLoop(rt, "bifrost+", None, start=False)
    engine = rt.new_engine(WorkerSessions(pool))
    turn = loop.submit(Turn(engine, ByteTokenizer().encode("stop me"), 10))
    try:
        loop.step()  # the prefill (Bifrost+: inside the TEE) gives the first token
        loop.step()
        turn.cancel()  # the one way a turn is stopped
        loop.step()
        events = _events(turn)
        assert [type(e) for e in events] == [TokenEvent, TokenEvent, TurnEnd] and events[-1].cancelled
        assert not loop.busy()
    finally:
        loop.close()
        engine.close()


def test_a_failing_forward_ends_only_its_own_turn(parts):
    rt, pool = parts
    loop = StepLoop(rt, "bifrost", None, start=False)
    good, bad = rt.new_engine(WorkerSessions(pool)), rt.new_engine(WorkerSessions(pool))
    bad.close()  # its worker sessions are gone and its link refuses: the forward raises
    bad.link = None
    turns = [loop.submit(Turn(e, ByteTokenizer().encode("hi"), 2)) for e in (good, bad)]
    try:
        while loop.busy():
            loop.step()
        ok, failed = _events(turns[0]), _events(turns[1])
        assert [type(e) for e in ok] == [TokenEvent, TokenEvent, TurnEnd] and ok[-1].error is None
        assert [type(e) for e in failed] == [TurnEnd] and failed[-1].error is not None
    finally:
        loop.close()
        good.close()


def test_a_turn_whose_sampling_fails_ends_alone_and_the_others_continue(parts, monkeypatch):
    import torch

    import bifrost.tee.scheduler as scheduler

    rt, pool = parts
    loop = StepLoop(rt, "bifrost+", None, start=False)
    engines = [rt.new_engine(WorkerSessions(pool)) for _ in range(2)]
    turns = [loop.submit(Turn(e, ByteTokenizer().encode(p), 3)) for e, p in zip(engines, ("ok", "bad"))]
    poisoned = turns[1].gen = torch.Generator()  # only the second turn's sampling fails
    real = scheduler.sample_token

    def sample(logits, cfg, gen):
        if gen is poisoned:
            raise RuntimeError("probability tensor contains either inf, nan or element < 0")
        return real(logits, cfg, gen)

    monkeypatch.setattr(scheduler, "sample_token", sample)
    try:
        while loop.busy():
            loop.step()
        ok, failed = _events(turns[0]), _events(turns[1])
        assert [type(e) for e in ok] == [TokenEvent] * 3 + [TurnEnd] and ok[-1].error is None
        assert [e.token for e in ok[:3]] == plaintext_greedy_tokens(rt.reference, ByteTokenizer().encode("ok"), 3)
        assert [type(e) for e in failed] == [TurnEnd] and isinstance(failed[0].error, RuntimeError)
    finally:
        loop.close()
        for e in engines:
            e.close()


def test_close_waits_for_a_prefill_in_flight_before_ending_its_turn(parts):
    """The turn's engine (keys, worker sessions) must outlive its running forward pass."""
    rt, pool = parts
    loop = StepLoop(rt, "bifrost", None, start=False)
    engine = rt.new_engine(WorkerSessions(pool))
    turn = loop.submit(Turn(engine, ByteTokenizer().encode("a prompt of some length for the prefill"), 4))
    try:
        loop._schedule()  # the prefill starts in the background
        running = loop._prefill[1]
        loop.close()
        assert running.done() and running.result().error is None  # it ran to its end
        assert [type(e) for e in _events(turn)] == [TurnEnd] and not loop.busy()
    finally:
        engine.close()


def test_each_turn_samples_with_its_own_parameters_and_ends_at_its_eos_token(parts):
    """Per-turn sampling (not the config's): top_k=1 equals greedy, seeded sampling reproduces; a turn
    ends right after the model's end-of-sequence token."""
    from bifrost.tee.scheduler import Sampling

    rt, pool = parts
    loop = StepLoop(rt, "bifrost+", None, start=False)
    engine = rt.new_engine(WorkerSessions(pool))
    ids = ByteTokenizer().encode("per turn")
    greedy = plaintext_greedy_tokens(rt.reference, ids, 4)

    def run(**kw) -> list:
        turn = loop.submit(Turn(engine, ids, 4, **kw))
        while loop.busy():
            loop.step()
        return _events(turn)

    try:
        assert [e.token for e in run(sampling=Sampling(True, 1.0, 1, 1.0))[:-1]] == greedy
        hot = Sampling(True, 2.0, 0, 1.0)
        a, b = ([e.token for e in run(sampling=hot, sample_seed=7)[:-1]] for _ in range(2))
        assert a == b and len(a) == 4
        ended = run(eos=greedy[1])
        assert [e.token for e in ended[:-1]] == greedy[:greedy.index(greedy[1]) + 1]
        assert isinstance(ended[-1], TurnEnd) and ended[-1].error is None and not ended[-1].cancelled
    finally:
        loop.close()
        engine.close()


def test_drive_steps_the_loop_in_the_callers_thread_and_a_reader_that_leaves_cancels(parts, monkeypatch):
    """The offline entry points' way in (``TrustedRuntime.generate``): events with each pass's worker calls; the
    prefill of a lone turn runs in the driving thread (an interrupt reaches it); a reader that stops reading
    cancels its turn and the loop lets go of it; a turn never submitted is refused, not waited for."""
    import threading

    rt, pool = parts
    loop = StepLoop(rt, "bifrost", None, start=False)
    engine = rt.new_engine(WorkerSessions(pool))
    ids = ByteTokenizer().encode("driven")
    threads = []
    real = rt.forward

    def forward(*args, **kw):
        threads.append(threading.current_thread())
        return real(*args, **kw)

    monkeypatch.setattr(rt, "forward", forward)
    try:
        events = list(loop.drive(loop.submit(Turn(engine, ids, 3))))
        assert [type(e) for e in events] == [TokenEvent] * 3 + [TurnEnd] and events[-1].error is None
        assert [e.token for e in events[:3]] == plaintext_greedy_tokens(rt.reference, ids, 3)
        assert all(e.stats.calls > 0 and e.logits is None for e in events[:3])
        assert threads == [threading.current_thread()] * 3
        stream = loop.drive(loop.submit(Turn(engine, ids, 10)))
        assert isinstance(next(stream), TokenEvent)
        stream.close()  # the reader leaves after one token
        assert not loop.busy() and len(threads) == 3 + 1  # the prefill only: no pass after the reader left
        with pytest.raises(RuntimeError, match="not in the loop"):
            next(loop.drive(Turn(engine, ids, 2)))
    finally:
        loop.close()
        engine.close()
