"""The one decode loop: every running turn advances one token per :meth:`StepLoop.step`.

Every entry point drives it, as vLLM's offline ``LLM`` and its API server both drive ``EngineCore``: a
serving replica (:mod:`bifrost.tee.replica`) runs it on a background thread and streams each turn's
events; ``bifrost generate``/``demo``, the benchmarks and the estimator's validation drive it in their own
thread through :meth:`TrustedRuntime.generate <bifrost.tee.runtime.TrustedRuntime.generate>`
(:meth:`StepLoop.drive`). One step reads top to bottom, as ``EngineCore.step()`` does (schedule → execute →
update):

1. **schedule** (:meth:`StepLoop._schedule`): retire cancelled turns; start the prompt prefill of the
   oldest waiting turn when none is running (prefills go one at a time: concurrent ones would only share
   the CPU, all finishing late, and hold all their intermediates at once); every prefilled turn decodes
   its next token in this step. A turn in mode ``bifrost+`` prefills inside the TEE (its delegated
   products in plaintext); in mode ``bifrost`` the prefill goes through the workers like every decode step.
2. **execute** (:meth:`StepLoop._execute`): the decode forward passes, each with its own session's engine
   (:meth:`~bifrost.tee.runtime.TrustedRuntime.forward`). With a :class:`~bifrost.tee.batching.DecodeBatcher`
   they run concurrently and their layer calls merge into one worker call per layer group; without one
   they run one after another. A prefill runs beside the steps in its own thread (a long prompt does not
   stall the others' tokens) and joins the step in which it finishes.
3. **update** (:meth:`StepLoop._update`): sample each turn's token (with the turn's own
   :class:`Sampling`), hand a :class:`TokenEvent` (token, seconds, the pass's
   worker calls) to the turn's consumer, keep the KV state, and end turns that have all their tokens or
   produced the end-of-sequence token (:class:`TurnEnd`).

A turn is stopped through one channel, :meth:`Turn.cancel` (the client left, the session closed, a stop
sequence appeared); the loop retires it at its next step and says so (``TurnEnd(cancelled=True)``).

Everything here is trusted state: token ids, KV caches, logits. Only ciphertexts leave, through each
session's engine.
"""

from __future__ import annotations

import collections
import logging
import queue
import secrets
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Iterator, Protocol

import torch

from ..config import MODES, GenerationConfig, RunConfig
from ..errors import UnavailableError, UserError
from .batching import DecodeBatcher
from .engine import CallStats, DelegationEngine

log = logging.getLogger("bifrost.scheduler")

BARRIER_TIMEOUT_S = 30.0  # decode passes of one step start together (bounded: a late one never hangs the rest)


@dataclass(frozen=True)
class Sampling:
    """How one turn picks its tokens: greedy (``do_sample`` False) or sampled with ``temperature``,
    ``top_k`` (0: off) and ``top_p`` (1: off)."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    @classmethod
    def from_config(cls, gcfg: GenerationConfig) -> "Sampling":
        """The ``generation:`` config's sampling."""
        return cls(bool(gcfg.do_sample), float(gcfg.temperature), int(gcfg.top_k), float(gcfg.top_p))


def sample_token(logits: torch.Tensor, sampling: Sampling, gen: torch.Generator | None) -> int:
    """The next token from ``logits`` (vocab,): the argmax when greedy, else a draw from ``gen``."""
    if not sampling.do_sample:
        return int(torch.argmax(logits))
    logits = logits.double() / max(sampling.temperature, 1e-6)
    if sampling.top_k:
        kth = torch.topk(logits, min(sampling.top_k, logits.numel())).values[-1]
        logits = torch.where(logits < kth, torch.tensor(float("-inf"), dtype=logits.dtype), logits)
    probs = torch.softmax(logits, -1)
    if sampling.top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_p, 0) - sorted_p < sampling.top_p
        mask = torch.zeros_like(probs, dtype=torch.bool)
        mask[order[keep]] = True
        probs = torch.where(mask, probs, torch.zeros_like(probs))
        probs = probs / probs.sum()
    return int(torch.multinomial(probs, 1, generator=gen))


def sampling_generator(sampling: Sampling, sample_seed: int | None) -> torch.Generator | None:
    """The sampling noise source: None for greedy decoding; else seeded with ``sample_seed`` when pinned,
    from the OS CSPRNG otherwise."""
    if not sampling.do_sample:
        return None
    return torch.Generator().manual_seed(sample_seed if sample_seed is not None else secrets.randbits(63))


class ForwardModel(Protocol):
    """What the loop needs of the model (:class:`~bifrost.tee.runtime.TrustedRuntime`)."""

    cfg: RunConfig

    def forward(self, engine: DelegationEngine | None, step_input: torch.Tensor, past: Any = None, *,
                in_tee: bool = False) -> tuple[torch.Tensor, Any, CallStats]: ...


@dataclass(frozen=True)
class TokenEvent:
    """Token ``index`` of a turn. ``seconds``: its forward pass and sampling (the first: the prefill);
    ``stats``: that pass's delegated calls; ``logits``: its next-token logits (vocab,), kept only for a
    turn that asked (``Turn.keep_logits``: a plaintext comparison), else None."""

    index: int
    token: int
    seconds: float
    stats: CallStats = field(default_factory=CallStats)
    logits: torch.Tensor | None = None


@dataclass(frozen=True)
class TurnEnd:
    """The loop is done with the turn (its engine is free): all tokens (or the end-of-sequence token),
    cancelled, or ``error``."""

    error: BaseException | None = None
    cancelled: bool = False


@dataclass(eq=False)
class Turn:
    """One request's generation: its session's engine, the sequence so far and its KV state.

    The consumer reads ``events`` (``TokenEvent``... then one ``TurnEnd``) and stops the turn only with
    :meth:`cancel`."""

    engine: DelegationEngine | None  # None: nothing is delegated (tee-only)
    ids: list[int]                 # the conversation fed at the prefill (history + prompt)
    n_new: int                     # tokens to produce
    sample_seed: int | None = None
    sampling: Sampling | None = None  # None: the ``generation:`` config's
    eos: int | None = None         # the model's end-of-sequence token: the turn ends after it
    mode: str | None = None        # bifrost | bifrost+; None: the loop's
    keep_logits: bool = False      # hand each step's logits to the consumer (TokenEvent.logits)
    events: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    produced: int = 0
    past: Any = None               # KV state after the last forward pass
    step_input: torch.Tensor | None = None  # (1, rows) ids of the next forward pass
    gen: torch.Generator | None = None
    cancelled: bool = False

    def cancel(self) -> None:
        """Stop at the next step (the client left, the session closed, a stop sequence appeared)."""
        self.cancelled = True


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
    """The decode loop. ``submit`` a :class:`Turn`; a background thread runs :meth:`step` while turns exist
    (a replica), or the caller steps it (``start=False``: :meth:`drive`, or tests calling :meth:`step`).
    Thread-safe: one step at a time, whoever calls it."""

    def __init__(self, runtime: ForwardModel, mode: str, batcher: DecodeBatcher | None = None,
                 max_concurrent: int = 16, start: bool = True) -> None:
        self.runtime, self.mode, self.batcher = runtime, mode, batcher
        self._cv = threading.Condition()
        self._waiting: collections.deque[Turn] = collections.deque()
        self._decoding: list[Turn] = []
        self._prefill: tuple[Turn, Future | None] | None = None  # future None: runs inline (driven, nothing decoding)
        self._step_lock = threading.Lock()
        self._driven = False  # drive() steps this loop: a prefill with nothing else to decode runs in its thread
        self._threads = ThreadPoolExecutor(max_workers=max_concurrent + 1, thread_name_prefix="tee-forward")
        self._closed = False
        self._thread = threading.Thread(target=self._run, daemon=True, name="tee-step-loop") if start else None
        if self._thread is not None:
            self._thread.start()

    # ------------------------------------------------------------------ the API
    def submit(self, turn: Turn) -> Turn:
        """Queue ``turn``; its events arrive on ``turn.events``. :class:`UserError` for a bad mode or an empty
        prompt; :class:`UnavailableError` once the loop is closing."""
        turn.mode = turn.mode or self.mode
        if turn.mode not in MODES:
            raise UserError(f"unknown serving mode {turn.mode!r}; choose one of {', '.join(MODES)}")
        if not turn.ids or turn.n_new < 1:
            raise UserError("a turn needs a non-empty prompt and at least one new token")
        if turn.sampling is None:
            turn.sampling = Sampling.from_config(self.runtime.cfg.generation)
        turn.gen = sampling_generator(turn.sampling, turn.sample_seed)
        turn.step_input = torch.tensor([turn.ids])
        with self._cv:
            if self._closed:
                raise UnavailableError("the decode loop is shutting down")
            self._waiting.append(turn)
            self._cv.notify_all()
        return turn

    def busy(self) -> bool:
        with self._cv:
            return bool(self._waiting or self._decoding or self._prefill)

    def step(self) -> int:
        """One round: schedule → execute → update. Returns the number of tokens produced."""
        with self._step_lock:
            decodes = self._schedule()
            try:
                passes = self._execute(decodes)
            except BaseException as exc:  # a bug or an interrupt: this step's turns end (their KV state may be
                with self._cv:             # half-updated); a prefill still running finishes first (its engine
                    prefill, self._prefill = self._prefill, None  # must outlive it)
                if prefill is not None and prefill[1] is not None:
                    _settle(prefill[1])
                for t in decodes + ([prefill[0]] if prefill else []):
                    self._end(t, TurnEnd(error=exc))
                raise
            return self._update(passes)

    def drive(self, turn: Turn) -> Iterator[TokenEvent | TurnEnd]:
        """``turn``'s events, stepping the loop in this thread until it ends (a loop made with
        ``start=False``: the offline entry points). A consumer that stops reading cancels the turn; the loop
        is stepped until it has let go of it."""
        if self._thread is not None:
            raise RuntimeError("drive() steps the loop itself: make it with start=False")
        self._driven = True
        ended = False
        try:
            while not ended:
                while not turn.events.empty():
                    event = turn.events.get()
                    ended = isinstance(event, TurnEnd)
                    yield event
                    if ended:
                        break
                else:
                    if not self.busy() and turn.events.empty():
                        raise RuntimeError("drive(): this turn is not in the loop (submit it first)")
                    self.step()
        finally:
            if not ended:
                turn.cancel()
                while self.busy():
                    self.step()

    def close(self) -> None:
        """End every turn (consumers get ``TurnEnd(cancelled=True)``) and stop the loop."""
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=600)  # the step in progress finishes (worker calls are bounded by their timeout)
        with self._cv:
            prefill = self._prefill
        if prefill is not None and prefill[1] is not None:  # a forward pass still running: its engine must outlive it
            _settle(prefill[1])
        with self._cv:
            turns = list(self._waiting) + self._decoding + ([self._prefill[0]] if self._prefill else [])
            self._prefill = None
            self._waiting.clear()
            self._decoding.clear()
        for t in turns:
            t.events.put(TurnEnd(cancelled=True))
        self._threads.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------ 1. schedule
    def _schedule(self) -> list[Turn]:
        """Retire cancelled turns, start the next prefill if none runs; the turns that decode this step."""
        with self._cv:
            for turns in (self._waiting, self._decoding):
                for t in [t for t in turns if t.cancelled]:
                    turns.remove(t)
                    t.events.put(TurnEnd(cancelled=True))
            if self._prefill is None and self._waiting:
                turn = self._waiting.popleft()
                inline = self._driven and not self._decoding  # alone: in the driving thread (Ctrl-C reaches it)
                self._prefill = (turn, None if inline else
                                 self._threads.submit(self._forward, turn, turn.mode == "bifrost+"))
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
        if prefill is not None and prefill[1] is None:
            passes.append(self._forward(prefill[0], prefill[0].mode == "bifrost+"))
            with self._cv:
                self._prefill = None
        elif prefill is not None and prefill[1] is not None and (prefill[1].done() or not decodes):
            passes.append(prefill[1].result())
            with self._cv:
                self._prefill = None
        return passes

    def _batched_forward(self, turn: Turn, barrier: threading.Barrier) -> _Pass:
        assert self.batcher is not None
        with self.batcher.participant():
            try:
                barrier.wait(timeout=BARRIER_TIMEOUT_S)  # every pass of the step counts before any call is sent
            except threading.BrokenBarrierError:
                pass
            return self._forward(turn, False)

    def _forward(self, turn: Turn, in_tee: bool) -> _Pass:
        p = _Pass(turn, t0=time.perf_counter())
        try:
            assert turn.step_input is not None  # set at submit, then after every token
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
                assert p.logits is not None and t.sampling is not None  # a pass without error; set at submit
                token = sample_token(p.logits, t.sampling, t.gen)
            except Exception as exc:  # noqa: BLE001 - e.g. non-finite logits while sampling
                self._end(t, TurnEnd(error=exc))
                continue
            t.events.put(TokenEvent(t.produced, token, time.perf_counter() - p.t0, p.stats or CallStats(),
                                    p.logits if t.keep_logits else None))
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


def _settle(future: Future) -> None:
    """Wait for a forward pass to finish (bounded), whatever its outcome."""
    try:
        future.result(timeout=600)
    except BaseException:  # noqa: BLE001 - its turn is ended by the caller either way
        pass
