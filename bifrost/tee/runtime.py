"""The trusted runtime: the model and its CKKS keys inside the TEE; decoding is the loop's (:mod:`bifrost.tee.scheduler`).

The Hugging Face model runs here with its delegated linear layers swapped for :class:`DelegatedLinear`
(section "delegated layers" below); the KV cache (the model's ``cache``) is ordinary trusted
memory. Per generated token the runtime records where the time went: non-linear/trusted compute,
encryption, transfer, worker compute and decryption (seconds), and bytes each way.
"""

from __future__ import annotations

import contextlib
import contextvars
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Iterator, Protocol

import numpy as np
import torch

from ..attest.binding import compute_model_digest
from ..attest.mtls import TRUSTED_TLS_NAME, TLSIdentity, WorkerEndpoint, process_identity
from ..ckks import GroupShape
from ..config import RunConfig
from ..config_loader import ckks_params_of, placement_of
from ..errors import InternalError, UnavailableError, UserError
from ..model.catalog import load_model, resolve
from ..model.delegation import Site, delegated_modules, fuse_groups, linear_weight, weight_digest
from ..model.placement import plan
from ..model.tokenizer import load_tokenizer
from .engine import CallStats, DelegationEngine, check_operands
from .link import WorkerLink, reply_limit
from .pool import WorkerPool, WorkerQuarantine, WorkerSessions
from .scheduler import StepLoop, TokenEvent, Turn



@dataclass
class TokenTiming:
    """Cost of producing one token (the first includes the prompt's prefill). Seconds and bytes."""

    index: int
    token: int
    total_s: float
    encrypt_s: float
    transfer_s: float
    worker_s: float
    decrypt_s: float
    bytes_sent: int
    bytes_received: int
    calls: int
    verify_s: float = 0.0   # product checks in the TEE
    local_s: float = 0.0    # products recomputed in the TEE after a deviation (0 with honest workers)
    deviations: int = 0     # worker replies that failed a check

    @property
    def nonlinear_s(self) -> float:
        """Trusted-side model compute: norms, attention, activations, embeddings, LM head, glue."""
        return max(self.total_s - self.encrypt_s - self.transfer_s - self.worker_s - self.decrypt_s
                   - self.verify_s - self.local_s, 0.0)


@dataclass
class Fidelity:
    """Agreement of the encrypted path with plaintext PyTorch inference on the same prefixes."""

    steps: int
    agreeing_steps: int  # steps whose chosen token equals the plaintext argmax (greedy)
    max_abs_logit_error: float
    min_top1_margin: float  # smallest plaintext top-1/top-2 logit gap seen (how close a flip could be)
    plaintext_tokens: list[int] = field(default_factory=list)  # independent plaintext greedy decode


@dataclass
class GenerationResult:
    prompt_ids: list[int]
    tokens: list[int]
    text: str
    timings: list[TokenTiming]
    fidelity: Fidelity | None
    finish_reason: str = "length"  # "stop": the model's end-of-sequence token ended it (not in ``text``)


def token_timing(index: int, token: int, total_s: float, d: CallStats) -> TokenTiming:
    """A token's cost: ``total_s`` its forward pass and sampling, ``d`` the delegated calls in it."""
    return TokenTiming(index, token, total_s, d.encrypt_s, d.transfer_s, d.worker_s, d.decrypt_s,
                       d.bytes_sent, d.bytes_received, d.calls, d.verify_s, d.local_s, d.deviations)


def trusted_identity(cfg: RunConfig) -> TLSIdentity:
    """The TLS identity this trusted runtime presents to workers: ``tee.identity`` (created if missing),
    else this process's ephemeral one."""
    if cfg.tee.identity:
        return TLSIdentity.load_or_create(cfg.tee.identity, TRUSTED_TLS_NAME)
    return process_identity()


def context_tokens(model: torch.nn.Module) -> int:
    mc = model.config
    return int(getattr(mc, "n_positions", None) or getattr(mc, "max_position_embeddings", None) or 0)


class TrustedRuntime:
    """The model, loaded once in the TEE, and (given a worker) a default engine: its own CKKS keys and worker
    sessions. A serving replica (:class:`~bifrost.tee.replica.TrustedReplica`) wraps one and gives each session
    its own engine."""

    def __init__(self, cfg: RunConfig, worker: WorkerEndpoint | WorkerLink | None, reference: bool = False,
                 quarantine: WorkerQuarantine | None = None) -> None:
        """``worker``: a worker's endpoint (address + pinned certificate) or a ready :class:`WorkerLink`
        (e.g. :class:`~bifrost.tee.pool.WorkerSessions` over a pool); None: no default engine (a server gives every
        session its own, :meth:`new_engine`).
        ``quarantine``: shared registry of deviating workers (default: ``tee.quarantine_file``)."""
        self.cfg = cfg
        self.spec = resolve(cfg.model)
        # an adapter is read once, into a private copy: what is loaded is exactly what its digest covers
        self.adapter_digest, adapter, self._adapter_copy = None, None, None
        if cfg.adapter:
            self._adapter_copy = tempfile.mkdtemp(prefix="bifrost-adapter-")
            try:
                shutil.copytree(cfg.adapter, self._adapter_copy, dirs_exist_ok=True)
            except OSError as exc:
                raise UserError(f"cannot read LoRA adapter {cfg.adapter}: {exc.strerror or exc}") from None
            self.adapter_digest = compute_model_digest(self._adapter_copy).hex()
            adapter = self._adapter_copy
        self.model = load_model(self.spec, cfg.seed, adapter=adapter)
        self.placement = placement_of(cfg)
        self.layers = plan(self.model, self.placement, cfg.model)  # every linear layer and where it runs
        self.sites = swap_in_delegates(self.model, self.placement, cfg.model)
        bypassed = bypassed_sites(self.model, self.sites, self.spec.task)
        if bypassed:
            raise UserError(
                f"{cfg.model}: the model code never calls {len(bypassed)} layer(s) the policy delegates (it reads "
                f"their weights directly), e.g. {bypassed[0]}: they would run in plaintext in the TEE while counted "
                f"as delegated; place them in the TEE with a policy rule ({{match: [...], placement: tee}}) or "
                f"change the model config")
        self.groups = fuse_groups([s.name for s in self.sites], cfg.delegation)
        # the trusted copy of every delegated weight: products are checked against it (and computed from
        # it when a worker deviates, or in Bifrost+ prefill)
        self.weights = {m.site.name: m.weight.numpy() for m in self.model.modules() if isinstance(m, DelegatedLinear)}
        self.quarantine = quarantine if quarantine is not None else WorkerQuarantine(cfg.tee.quarantine_file)
        t0 = time.perf_counter()
        self.params = ckks_params_of(cfg)
        self._operands: dict | None = None
        self._operands_lock = threading.Lock()
        self._loop: StepLoop | None = None  # generate()'s decode loop, stepped by the caller (made on first use)
        self._loop_lock = threading.Lock()
        if not self.sites:
            worker = None  # nothing is delegated (the tee-only policy): no worker is needed
        elif isinstance(worker, WorkerEndpoint):
            worker = WorkerSessions(self.worker_pool([worker]), owns_pool=True)
        elif isinstance(worker, str):
            raise UserError(f"worker {worker!r}: a worker is reached by its address and its pinned certificate "
                               "(worker.cert / --worker-cert)")
        self.engine = self.new_engine(worker) if worker is not None else None
        self.setup_s = time.perf_counter() - t0
        self.tokenizer = load_tokenizer(self.spec.path)
        # the plaintext reference: the same model with any adapter merged into its weights
        self.reference = load_model(self.spec, cfg.seed, adapter=adapter, merged=True) if reference else None

    def group_shapes(self) -> list[GroupShape]:
        return [GroupShape(self.weights[g[0]].shape[1], tuple(self.weights[n].shape[0] for n in g)) for g in self.groups]

    def worker_pool(self, endpoints: list[WorkerEndpoint], timeout_s: float | None = None,
                    retry_after_s: float = 30.0) -> WorkerPool:
        """A worker pool for this model: mutual TLS with this runtime's identity, replies capped at the
        largest an honest worker sends for this model (:func:`~bifrost.tee.link.reply_limit`)."""
        limit = reply_limit(self.cfg.backend, self.params, self.group_shapes(), context_tokens(self.model) or 512)
        return WorkerPool(endpoints, trusted_identity(self.cfg), timeout_s or self.cfg.worker.timeout_s,
                          retry_after_s, limit, self.quarantine,
                          try_down_workers=self.cfg.delegation.on_no_worker == "fail")

    def operands(self) -> dict:
        """The product check's operands of every site (made on first use, shared by every session)."""
        with self._operands_lock:
            if self._operands is None:
                self._operands = check_operands(self.cfg.backend, self.params, self.weights)
            return self._operands

    def new_engine(self, link: WorkerLink) -> DelegationEngine:
        """A session's engine: fresh CKKS keys and check vectors over ``link``, this runtime's model."""
        return DelegationEngine(link, self.cfg.backend, self.params, self.sites, self.groups, self.weights,
                                verify=self.cfg.verification, quarantine=self.quarantine, operands=self.operands(),
                                on_no_worker=self.cfg.delegation.on_no_worker)

    def generate(self, prompt: str | list[int], max_new_tokens: int | None = None, sample_seed: int | None = None,
                 mode: str | None = None, stop_at_eos: bool = False) -> GenerationResult:
        """One turn with this runtime's own engine, through the decode loop every entry point shares
        (:class:`~bifrost.tee.scheduler.StepLoop`, stepped in this thread); the KV cache is trusted memory.

        ``stop_at_eos``: end at the tokenizer's end-of-sequence token (kept in ``tokens``, left out of
        ``text``; ``finish_reason`` "stop"); otherwise exactly ``max_new_tokens`` are generated.

        ``mode``: ``bifrost`` runs the prompt through the hybrid CKKS path; ``bifrost+`` builds the prompt's
        KV state inside the TEE in plaintext, and only decode steps use ciphertexts. Default: the config's.
        With a plaintext reference (``reference=True``) the result carries the :class:`Fidelity` of every step.
        """
        if self.spec.task != "causal-lm":
            raise UserError(f"{self.cfg.model} is an encoder; use embed()")
        if self.engine is None and self.sites:
            raise UserError("this runtime has no worker link: a server gives each session its own engine")
        n_new = self.cfg.generation.max_new_tokens if max_new_tokens is None else max_new_tokens
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise UserError("the prompt is empty")
        limit = context_tokens(self.model)
        if limit and len(ids) + n_new > limit:
            raise UserError(f"prompt ({len(ids)} tokens) + {n_new} new tokens exceeds the model's context of {limit}")
        eos = self.tokenizer.eos_token_id if stop_at_eos else None
        fid = _FidelityTracker(self.reference) if self.reference is not None else None
        turn = Turn(self.engine, ids, n_new, sample_seed, eos=eos, mode=mode, keep_logits=fid is not None)
        timings: list[TokenTiming] = []
        tokens: list[int] = []
        for event in self.events(turn):
            timings.append(token_timing(event.index, event.token, event.seconds, event.stats))
            tokens.append(event.token)
            if fid is not None and event.logits is not None:
                fid.step(torch.tensor([ids] if event.index == 0 else [[tokens[-2]]]), event.logits, event.token)
        finish = "stop" if eos is not None and tokens and tokens[-1] == eos else "length"
        fidelity = fid.finish(ids, len(tokens)) if fid is not None else None
        text = self.tokenizer.decode(tokens[:-1] if finish == "stop" else tokens)
        return GenerationResult(ids, tokens, text, timings, fidelity, finish)

    def events(self, turn: Turn) -> Iterator[TokenEvent]:
        """``turn``'s token events through this runtime's decode loop, stepped in this thread (made on first
        use; one turn at a time). Raises the error that ended the turn; a consumer that stops reading cancels it."""
        with self._loop_lock:
            if self._loop is None:
                self._loop = StepLoop(self, self.cfg.generation.mode, None, max_concurrent=1, start=False)
            for event in self._loop.drive(self._loop.submit(turn)):
                if isinstance(event, TokenEvent):
                    yield event
                elif event.error is not None:
                    raise event.error
                elif event.cancelled:  # only close() cancels a turn of this loop
                    raise UnavailableError("the runtime was closed during generation")

    def forward(self, engine: DelegationEngine | None, step_input: torch.Tensor, past=None, *, in_tee: bool = False):
        """One forward pass with ``engine``'s keys: ``step_input`` (1, rows) token ids after the KV state
        ``past`` (None: a new sequence). ``in_tee``: the delegated products run here in plaintext (the
        Bifrost+ prefill). Returns (last position's logits (vocab,), new KV state, this pass's CallStats).
        Thread-safe: sessions run passes of this one model concurrently, each with its own engine."""
        if engine is None:  # nothing is delegated (``engine`` may be None only then)
            if self.sites:
                raise InternalError("this model delegates layers: a forward pass needs a session's engine")
            with torch.no_grad():
                out = self.model(input_ids=step_input, cache=past, use_cache=True)
            return out.logits[0, -1], out.cache, CallStats()
        before = engine.stats.snapshot()
        local = engine.in_tee() if in_tee else contextlib.nullcontext()
        with using_engine(engine), local, torch.no_grad():
            out = self.model(input_ids=step_input, cache=past, use_cache=True)
        return out.logits[0, -1], out.cache, engine.stats.minus(before)

    @torch.no_grad()
    def embed(self, texts: list[str], engine: DelegationEngine | None = None) -> np.ndarray:
        """Sentence embeddings (mean pooling over tokens, L2-normalised, as sentence-transformers), with
        ``engine``'s keys (default: this runtime's own engine)."""
        if self.spec.task != "encoder":
            raise UserError(f"{self.cfg.model} is not an encoder model")
        engine = engine or self.engine
        if engine is None and self.sites:
            raise UserError("this runtime has no worker link: pass a session's engine")
        with using_engine(engine) if engine is not None else contextlib.nullcontext():
            return np.stack([_mean_pooled(self.model, self.tokenizer, t) for t in texts])

    def close(self) -> None:
        with self._loop_lock:
            if self._loop is not None:
                self._loop.close()
                self._loop = None
        if self.engine is not None:
            self.engine.close()
        if self._adapter_copy is not None:
            shutil.rmtree(self._adapter_copy, ignore_errors=True)
        self.quarantine.flush()


def _mean_pooled(model, tokenizer, text: str) -> np.ndarray:
    enc = tokenizer.batch([text])
    out = model(**enc).last_hidden_state[0]
    mask = enc["attention_mask"][0].unsqueeze(-1).to(out.dtype)
    v = (out * mask).sum(0) / mask.sum()
    return torch.nn.functional.normalize(v, dim=-1).double().numpy()


def plaintext_embeddings(model_name: str, seed: int, texts: list[str]) -> np.ndarray:
    spec = resolve(model_name)
    model, tok = load_model(spec, seed), load_tokenizer(spec.path)
    with torch.no_grad():
        return np.stack([_mean_pooled(model, tok, t) for t in texts])


class _FidelityTracker:
    """Runs the plaintext model in lock-step on the same inputs (teacher forcing) and compares logits."""

    def __init__(self, reference: torch.nn.Module) -> None:
        self.model, self.past = reference, None
        self.agree, self.max_err, self.min_margin = 0, 0.0, float("inf")

    @torch.no_grad()
    def step(self, step_input: torch.Tensor, logits: torch.Tensor, chosen: int) -> None:
        out = self.model(input_ids=step_input, cache=self.past, use_cache=True)
        self.past = out.cache
        ref = out.logits[0, -1]
        self.max_err = max(self.max_err, float((ref - logits).abs().max()))
        top2 = torch.topk(ref, 2).values
        self.min_margin = min(self.min_margin, float(top2[0] - top2[1]))
        self.agree += int(int(torch.argmax(ref)) == chosen)

    @torch.no_grad()
    def finish(self, prompt_ids: list[int], n_new: int) -> Fidelity:
        tokens = plaintext_greedy_tokens(self.model, prompt_ids, n_new)  # independent plaintext greedy decode
        return Fidelity(n_new, self.agree, self.max_err, self.min_margin, tokens)


@torch.no_grad()
def plaintext_greedy_tokens(model: torch.nn.Module, prompt_ids: list[int], n_new: int) -> list[int]:
    """Greedy decoding with a plain (undelegated) model: the reference every encrypted path is held to."""
    past, step_input, tokens = None, torch.tensor([prompt_ids]), []
    for _ in range(n_new):
        out = model(input_ids=step_input, cache=past, use_cache=True)
        tokens.append(int(torch.argmax(out.logits[0, -1])))
        past, step_input = out.cache, torch.tensor([[tokens[-1]]])
    return tokens


# --------------------------------------------------------------------------- delegated layers
# Swap a Hugging Face model's delegated linear layers for :class:`DelegatedLinear` modules, by name.
#
# Everything else in the model (embeddings, norms, attention softmax, activations, RoPE, residuals,
# KV cache, LM head) runs unchanged in the trusted runtime; the architecture code stays Hugging Face's.
# The bias of a delegated layer is public and is added here after decryption. The weight (public too) is
# kept in trusted memory for Bifrost+ mode, where the prompt is prefilled inside the TEE in plaintext; in
# ``bifrost`` mode the worker's copy is used, pinned by its digest.
#
# The engine (CKKS keys + worker link) of the session whose forward pass runs in this thread/context: the
# one way a delegated layer finds its engine. Set only by ``TrustedRuntime.forward``/``embed``, which take
# the engine as an explicit argument; sessions thus run forward passes of one shared model concurrently,
# each with its own keys.
class SessionEngine(Protocol):
    """What a delegated layer uses of its session's engine: a :class:`DelegationEngine`, or a stand-in that
    computes every product here (``local_linears`` always set: the probe forward of :func:`bypassed_sites`)."""

    local_linears: bool

    def linear(self, name: str, x: torch.Tensor, version: int) -> np.ndarray: ...


_SESSION_ENGINE: contextvars.ContextVar[SessionEngine | None] = contextvars.ContextVar("bifrost_engine", default=None)


class DelegatedLinear(torch.nn.Module):
    """``y = x @ W.T + b`` with ``x @ W.T`` computed by the worker under CKKS.

    While ``engine.local_linears`` is set (Bifrost+ prefill) the product is computed here, in plaintext.
    """

    weight: torch.Tensor  # buffers (register_buffer below)
    bias: torch.Tensor | None

    def __init__(self, site: Site, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.site = site
        self.register_buffer("weight", weight.detach().to(torch.float32).contiguous())  # (d_out, d_in)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    @property
    def in_features(self) -> int:
        return self.site.d_in

    @property
    def out_features(self) -> int:
        return self.site.d_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        engine = _SESSION_ENGINE.get()
        if engine is None:
            raise RuntimeError(f"delegated layer {self.site.name} ran outside TrustedRuntime.forward (no engine)")
        if engine.local_linears:
            return torch.nn.functional.linear(x, self.weight, self.bias)
        y = engine.linear(self.site.name, x, x._version)
        out = torch.from_numpy(y).reshape(*x.shape[:-1], self.site.d_out)
        if self.bias is not None:
            out = out + self.bias.to(torch.float64)
        return out.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.site.name}: {self.site.d_in} -> {self.site.d_out}, digest {self.site.digest[:12]}…"


def swap_in_delegates(model: torch.nn.Module, policy, model_name: str = "the model") -> list[Site]:
    """Replace every linear module ``policy`` places ``ckks`` by a :class:`DelegatedLinear`, in place (a
    peft-wrapped layer: its ``base_layer``; the adapter stays a plain module in the TEE). Returns the sites
    (canonical names) in model order."""
    swapped = []
    for name, path, module in delegated_modules(model, policy, model_name):
        w = linear_weight(module)
        site = Site(name, w.shape[1], w.shape[0], weight_digest(w))
        parent_path, _, leaf = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        bias = module.bias  # a tensor or None (Linear(bias=False))
        setattr(parent, leaf, DelegatedLinear(site, torch.from_numpy(w), bias if isinstance(bias, torch.Tensor) else None))
        swapped.append(site)
    return swapped


class _ProbeEngine:
    """Computes every delegated product here, in plaintext (a probe forward on a public input)."""

    local_linears = True

    def linear(self, name: str, x: torch.Tensor, version: int) -> np.ndarray:
        raise RuntimeError("the probe engine computes every product in the TEE (local_linears)")


@torch.no_grad()
def bypassed_sites(model: torch.nn.Module, sites: list[Site], task: str) -> list[str]:
    """Delegated layers a forward pass never calls (the model code reads their weight directly, e.g. BLOOM
    with ``pretraining_tp > 1`` and ``slow_but_exact``): found by one probe forward on a public 3-token
    input, every product computed here. Such a layer would silently run in plaintext in the TEE."""
    if not sites:
        return []
    called: set[str] = set()
    hooks = [m.register_forward_hook(lambda mod, args, out: called.add(mod.site.name))
             for m in model.modules() if isinstance(m, DelegatedLinear)]
    try:
        with using_engine(_ProbeEngine()):
            ids = torch.tensor([[1, 2, 3]])
            if task == "causal-lm":
                model(input_ids=ids, use_cache=False)
            else:
                model(input_ids=ids, attention_mask=torch.ones_like(ids))
    finally:
        for h in hooks:
            h.remove()
    return [s.name for s in sites if s.name not in called]


@contextlib.contextmanager
def using_engine(engine: SessionEngine):
    """Route this thread's delegated layers through ``engine`` (one session's keys) for the block
    (for :class:`~bifrost.tee.runtime.TrustedRuntime` only)."""
    token = _SESSION_ENGINE.set(engine)
    try:
        yield engine
    finally:
        _SESSION_ENGINE.reset(token)
