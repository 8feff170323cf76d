"""Which linear layers are delegated, their public weights and digests, and how they group.

Shared by both sides: the worker uses it to find the weights it serves, the trusted runtime to know
which modules to swap. Which layers are delegated is the placement policy's call
(:mod:`bifrost.model.placement`: the layers it places ``ckks``). A *site* is one delegated linear layer,
named by its canonical module path (peft wrappers removed); its weight is always presented as
``(d_out, d_in)`` float64 (GPT-2's ``Conv1D`` stores the transpose).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch

from ..config import DelegationConfig
from .placement import PlacementPolicy, plan


def _conv1d_class():
    from transformers.pytorch_utils import Conv1D

    return Conv1D


def is_linear(module: torch.nn.Module) -> bool:
    return isinstance(module, (torch.nn.Linear, _conv1d_class()))


def linear_weight(module: torch.nn.Module) -> np.ndarray:
    """The weight as (d_out, d_in) float64."""
    weight = module.weight
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{type(module).__name__}.weight is not a tensor")
    w = weight.detach().to(torch.float64)
    if isinstance(module, _conv1d_class()):
        w = w.t()
    return np.ascontiguousarray(w.numpy())


def weight_digest(weight: np.ndarray) -> str:
    """SHA-256 over the shape and the float32 little-endian bytes of a (d_out, d_in) weight."""
    w32 = np.ascontiguousarray(weight, dtype="<f4")
    h = hashlib.sha256(f"bifrost-linear-v1:{w32.shape[0]}x{w32.shape[1]}:".encode())
    h.update(w32.tobytes())
    return h.hexdigest()


@dataclass(frozen=True)
class Site:
    name: str
    d_in: int
    d_out: int
    digest: str


def delegated_modules(model: torch.nn.Module, policy: PlacementPolicy, model_name: str = "the model",
                      check_requires: bool = True) -> list[tuple[str, str, torch.nn.Module]]:
    """(canonical name, module path, module) of every linear module ``policy`` places ``ckks``, in module order."""
    return [(layer.name, layer.module_path, model.get_submodule(layer.module_path))
            for layer in plan(model, policy, model_name, check_requires) if layer.placement == "ckks"]


def sites(model: torch.nn.Module, policy: PlacementPolicy, model_name: str = "the model",
          check_requires: bool = True) -> list[tuple[Site, np.ndarray]]:
    """The delegated layers (canonical names) and their public weights (``check_requires=False``: a worker's
    view of the base model, which never holds an adapter)."""
    result = []
    for name, _, module in delegated_modules(model, policy, model_name, check_requires):
        w = linear_weight(module)
        result.append((Site(name, w.shape[1], w.shape[0], weight_digest(w)), w))
    return result


def fuse_groups(names: list[str], policy: DelegationConfig) -> list[tuple[str, ...]]:
    """Partition site names into groups that read the same input (siblings named in ``policy.fuse``).

    Every name is in exactly one group; a group keeps the order given in ``policy.fuse``.
    """
    remaining = list(names)
    taken: set[str] = set()
    groups: list[tuple[str, ...]] = []
    by_name = set(names)
    for name in names:
        if name in taken:
            continue
        parent, _, leaf = name.rpartition(".")
        group: tuple[str, ...] = (name,)
        for fuse in policy.fuse:
            if leaf in fuse:
                members = tuple(f"{parent}.{m}" if parent else m for m in fuse)
                present = tuple(m for m in members if m in by_name and m not in taken)
                if len(present) > 1:
                    group = present
                break
        taken.update(group)
        groups.append(group)
    assert sorted(taken) == sorted(remaining)
    return groups
