"""A replica's decode loop: every running turn advances one token per :meth:`StepLoop.step`.

One step reads top to bottom, as vLLM's ``EngineCore.step()`` does (schedule → execute → update):

1. **schedule** (:meth:`StepLoop._schedule`): retire turns that were stopped (client gone, session
   closed); start the prompt prefill of the oldest waiting turn when none is running (prefills go one at
   a time: concurrent ones would only share the CPU, all finishing late, and hold all their
   intermediates at once); every prefilled turn decodes its next token in this step.
2. **execute** (:meth:`StepLoop._execute`): the decode forward passes, each with its own session's engine
   (:meth:`~bifrost.tee.runtime.TrustedRuntime.forward`). With a :class:`~bifrost.tee.batching.DecodeBatcher`
   they run concurrently and their layer calls merge into one worker call per layer group; without one
   they run one after another. A prefill runs beside the steps in its own thread (a long prompt does not
   stall the others' tokens) and joins the step in which it finishes.
3. **update** (:meth:`StepLoop._update`): sample each turn's token (with the turn's own
   :class:`~bifrost.tee.runtime.Sampling`), hand a :class:`TokenEvent` to the
   turn's consumer, keep the KV state, and end turns that have all their tokens or
   produced the end-of-sequence token (:class:`TurnEnd`). A consumer that saw a stop sequence cancels its
   turn (:meth:`Turn.cancel`); the loop retires it at the next step.

Everything here is trusted state: token ids, KV caches, logits. Only ciphertexts leave, through each
session's engine.
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..errors import BifrostError
from .batching import DecodeBatcher
from .engine import CallStats, DelegationEngine
from .runtime import Sampling, TrustedRuntime, sample_token, sampling_generator

log = logging.getLogger("bifrost.scheduler")

BARRIER_TIMEOUT_S = 30.0  # decode passes of one step start together (bounded: a late one never hangs the rest)


@dataclass(frozen=True)
class TokenEvent:
    """Token ``index`` of a turn; ``seconds``: its forward pass and sampling (the first: the prefill)."""

    index: int
    token: int
    seconds: float


@dataclass(frozen=True)
class TurnEnd:
    """The loop is done with the turn (its engine is free): all tokens (or the end-of-sequence token),
    stopped, or ``error``."""

    error: BaseException | None = None
    stopped: bool = False


@dataclass
class Turn:
    """One request's generation: its session's engine, the sequence so far and its KV state.

    The consumer reads ``events`` (``TokenEvent``... then one ``TurnEnd``); ``stopped`` is polled
    between tokens (the client left or the session closed)."""

    engine: DelegationEngine | None  # None: nothing is delegated (tee-only)
    ids: list[int]                 # the conversation fed at the prefill (history + prompt)
    n_new: int                     # tokens to produce
    stopped: Callable[[], bool]
    sample_seed: int | None = None
    sampling: Sampling | None = None  # None: the ``generation:`` config's
    eos: int | None = None         # the model's end-of-sequence token: the turn ends after it
    events: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    produced: int = 0
    past: Any = None               # KV state after the last forward pass
    step_input: torch.Tensor | None = None  # (1, rows) ids of the next forward pass
    gen: torch.Generator | None = None
    cancelled: bool = False

    def cancel(self) -> None:
        """Stop at the next step (the consumer stopped reading)."""
        self.cancelled = True

    def wants_stop(self) -> bool:
        return self.cancelled or self.stopped()


@dataclass
class _Pass:
    """The outcome of one forward pass of ``turn``."""

    turn: Turn
    logits: torch.Tensor | None = None
    past: Any = None
    stats: CallStats | None = None
    t0: float = 0.0
    error: BaseException | None = None


class StepLoop:
    """The decode loop of one replica. ``submit`` a :class:`Turn`; a background thread runs :meth:`step`
    while turns exist (tests may call :meth:`step` themselves with ``start=False``). Thread-safe."""

    def __init__(self, runtime: TrustedRuntime, mode: str, batcher: DecodeBatcher | None = None,
                 max_concurrent: int = 16, start: bool = True) -> None:
        self.runtime, self.mode, self.batcher = runtime, mode, batcher
        self._cv = threading.Condition()
        self._waiting: collections.deque[Turn] = collections.deque()
        self._decoding: list[Turn] = []
        self._prefill: tuple[Turn, Future] | None = None
        self._threads = ThreadPoolExecutor(max_workers=max_concurrent + 1, thread_name_prefix="tee-forward")
        self._closed = False
        self._thread = threading.Thread(target=self._run, daemon=True, name="tee-step-loop") if start else None
        if self._thread is not None:
            self._thread.start()

    # ------------------------------------------------------------------ the API
    def submit(self, turn: Turn) -> Turn:
        if turn.sampling is None:
            turn.sampling = Sampling.from_config(self.runtime.cfg.generation)
        turn.gen = sampling_generator(turn.sampling, turn.sample_seed)
        turn.step_input = torch.tensor([turn.ids])
        with self._cv:
            if self._closed:
                raise BifrostError("the replica is shutting down")
            self._waiting.append(turn)
            self._cv.notify_all()
        return turn

    def busy(self) -> bool:
        with self._cv:
            return bool(self._waiting or self._decoding or self._prefill)

    def step(self) -> int:
        """One round: schedule → execute → update. Returns the number of tokens produced."""
        decodes = self._schedule()
        try:
            passes = self._execute(decodes)
        except BaseException as exc:  # a bug: this step's turns end (their KV state may be half-updated)
            with self._cv:
                prefill, self._prefill = self._prefill, None
            for t in decodes + ([prefill[0]] if prefill else []):
                self._end(t, TurnEnd(error=exc))
            raise
        return self._update(passes)

    def close(self) -> None:
        """End every turn (consumers get ``TurnEnd(stopped=True)``) and stop the loop."""
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=600)  # the step in progress finishes (worker calls are bounded by their timeout)
        with self._cv:
            prefill = self._prefill
        if prefill is not None:  # a forward pass still running: its engine must outlive it
            try:
                prefill[1].result(timeout=600)
            except BaseException:  # noqa: BLE001 - the turn ends below either way
                pass
        with self._cv:
            turns = list(self._waiting) + self._decoding + ([self._prefill[0]] if self._prefill else [])
            self._prefill = None
            self._waiting.clear()
            self._decoding.clear()
        for t in turns:
            t.events.put(TurnEnd(stopped=True))
        self._threads.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------ 1. schedule
    def _schedule(self) -> list[Turn]:
        """Retire stopped turns, start the next prefill if none runs; the turns that decode this step."""
        with self._cv:
            for turns in (self._waiting, self._decoding):
                for t in [t for t in turns if t.wants_stop()]:
                    turns.remove(t)
                    t.events.put(TurnEnd(stopped=True))
            if self._prefill is None and self._waiting:
                turn = self._waiting.popleft()
                self._prefill = (turn, self._threads.submit(self._forward, turn, self.mode == "bifrost+"))
            return list(self._decoding)

    # ------------------------------------------------------------------ 2. execute
    def _execute(self, decodes: list[Turn]) -> list[_Pass]:
        """The decode passes of this step, and the prefill if it finished meanwhile (or, with nothing to
        decode, once it finishes)."""
        if not decodes:
            passes: list[_Pass] = []
        elif self.batcher is None:
            passes = [self._forward(t, False) for t in decodes]
        else:
            barrier = threading.Barrier(len(decodes))
            futures = [self._threads.submit(self._batched_forward, t, barrier) for t in decodes]
            passes = [f.result() for f in futures]
        with self._cv:
            prefill = self._prefill
        if prefill is not None and (prefill[1].done() or not decodes):
            passes.append(prefill[1].result())
            with self._cv:
                self._prefill = None
        return passes

    def _batched_forward(self, turn: Turn, barrier: threading.Barrier) -> _Pass:
        with self.batcher.participant():
            try:
                barrier.wait(timeout=BARRIER_TIMEOUT_S)  # every pass of the step counts before any call is sent
            except threading.BrokenBarrierError:
                pass
            return self._forward(turn, False)

    def _forward(self, turn: Turn, in_tee: bool) -> _Pass:
        p = _Pass(turn, t0=time.perf_counter())
        try:
            p.logits, p.past, p.stats = self.runtime.forward(turn.engine, turn.step_input, turn.past, in_tee=in_tee)
        except BaseException as exc:  # noqa: BLE001 - ends this turn only (update hands it to the consumer)
            p.error = exc
        return p

    # ------------------------------------------------------------------ 3. update
    def _update(self, passes: list[_Pass]) -> int:
        """Sample, emit, keep the KV state; end turns that are done or failed."""
        produced = 0
        for p in passes:
            t = p.turn
            if p.error is not None:
                self._end(t, TurnEnd(error=p.error))
                continue
            try:  # each turn on its own: a failure here ends this turn only
                token = sample_token(p.logits, t.sampling, t.gen)
            except Exception as exc:  # noqa: BLE001 - e.g. non-finite logits while sampling
                self._end(t, TurnEnd(error=exc))
                continue
            t.events.put(TokenEvent(t.produced, token, time.perf_counter() - p.t0))
            t.produced += 1
            produced += 1
            t.past, t.step_input = p.past, torch.tensor([[token]])
            if t.produced >= t.n_new or token == t.eos:
                self._end(t, TurnEnd())
            else:
                with self._cv:
                    if t not in self._decoding:
                        self._decoding.append(t)  # prefilled: decodes from the next step on
        return produced

    def _end(self, turn: Turn, end: TurnEnd) -> None:
        with self._cv:
            if turn in self._decoding:
                self._decoding.remove(turn)
        turn.past = None  # the KV state goes with the turn
        turn.events.put(end)

    # ------------------------------------------------------------------ the thread
    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._closed and not (self._waiting or self._decoding or self._prefill):
                    self._cv.wait()
                if self._closed:
                    return
            try:
                self.step()
            except Exception:  # noqa: BLE001 - a bug here must not end every session's loop
                log.exception("step failed")
                time.sleep(0.1)
