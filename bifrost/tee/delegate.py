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

import torch

from ..model.delegation import Site, delegated_modules, linear_weight, weight_digest
from .engine import DelegationEngine

# The engine (CKKS keys + worker link) of the session whose forward pass runs in this thread/context: the
# one way a delegated layer finds its engine. Set only by ``TrustedRuntime.forward``/``embed``, which take
# the engine as an explicit argument; sessions thus run forward passes of one shared model concurrently,
# each with its own keys.
_SESSION_ENGINE: contextvars.ContextVar[DelegationEngine | None] = contextvars.ContextVar("bifrost_engine", default=None)


class DelegatedLinear(torch.nn.Module):
    """``y = x @ W.T + b`` with ``x @ W.T`` computed by the worker under CKKS.

    While ``engine.local_linears`` is set (Bifrost+ prefill) the product is computed here, in plaintext.
    """

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


def swap_in_delegates(model: torch.nn.Module, policy) -> list[Site]:
    """Replace every delegated linear module of ``model`` in place; returns the sites in model order."""
    swapped = []
    for name, module in delegated_modules(model, policy):
        w = linear_weight(module)
        site = Site(name, w.shape[1], w.shape[0], weight_digest(w))
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, leaf, DelegatedLinear(site, torch.from_numpy(w), module.bias))
        swapped.append(site)
    return swapped


@contextlib.contextmanager
def using_engine(engine: DelegationEngine):
    """Route this thread's delegated layers through ``engine`` (one session's keys) for the block
    (for :class:`~bifrost.tee.runtime.TrustedRuntime` only)."""
    token = _SESSION_ENGINE.set(engine)
    try:
        yield engine
    finally:
        _SESSION_ENGINE.reset(token)
