"""Swap a Hugging Face model's delegated linear layers for :class:`DelegatedLinear` modules, by name.

Everything else in the model (embeddings, norms, attention softmax, activations, RoPE, residuals,
KV cache, LM head) runs unchanged in the trusted runtime; the architecture code stays Hugging Face's.
The bias of a delegated layer is public and is added here after decryption. The weight (public too) is
kept in trusted memory for Bifrost+ mode, where the prompt is prefilled inside the TEE in plaintext; in
``bifrost`` mode the worker's copy is used, pinned by its digest.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Protocol

import numpy as np
import torch

from ..model.delegation import Site, delegated_modules, linear_weight, weight_digest

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
