"""Placement policies: which linear layers run inside the TEE (``tee``) and which are delegated (``ckks``).

A policy (``configs/policies/<name>.yaml``, or a YAML path) is an ordered list of rules; the first rule
that matches a linear module places it. A rule matches by **role** (architecture-independent, from the
module's path) or by **name** (fnmatch globs on the module path)::

    description: "..."
    requires: [lora]          # optional: roles the model must have (an adapter, here)
    rules:
      - {role: lora, placement: tee}
      - {match: ["*.mlp.*"], placement: ckks}
      - {role: all, placement: ckks}

Roles of a linear module (nn.Linear or GPT-2 Conv1D):

- ``head``: outside every numbered transformer block (LM head, classifier, pooler): **always** ``tee``
  (it maps the hidden state to the output distribution);
- ``lora``: adapter material (peft ``lora_A``/``lora_B``, and full fine-tuned copies ``modules_to_save`` with
  the originals they replace): **always** ``tee``;
- ``attention_qkv``: the query/key/value projections of a block's attention;
- ``attention_out``: the rest of a block's attention (its output projection);
- ``ffn``: every other linear of a block (MLP / feed-forward);
- ``all``: any of them (``head`` and ``lora`` stay in the TEE whatever the rules say).

Validation at load (one-line errors): unknown keys, placements or roles; a ``match`` glob that matches no
linear module of the model; a linear module no rule places; a ``head`` placed ``ckks``; a ``requires`` role
the model does not have. A peft-wrapped layer (``….q_proj.base_layer``) is named and placed as the layer it
wraps (``….q_proj``), so the worker, which holds only the public base model, serves it under that name.

What the accelerator learns, per placement: ``ckks``: the layer's weight (the worker holds it) and
ciphertexts; ``tee``: nothing of the layer (the worker is never asked for it). Activations: never.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import CONFIG_DIR
from ..errors import UserError
from ..yaml_io import load_yaml

POLICY_DIR = CONFIG_DIR / "policies"
PLACEMENTS = ("tee", "ckks")
ROLES = ("head", "lora", "attention_qkv", "attention_out", "ffn", "all")

# leaf names of query/key/value projections (separate or fused) across Hugging Face architectures
_QKV = {"q_proj", "k_proj", "v_proj", "qkv_proj", "c_attn", "query_key_value", "query", "key", "value",
        "Wqkv", "W_pack", "q", "k", "v", "qkv", "q_lin", "k_lin", "v_lin", "query_proj", "key_proj", "value_proj",
        "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj"}
# peft paths that hold adapter material: LoRA matrices, and full fine-tuned copies (``modules_to_save``) with
# the originals they replace: the ``lora`` role, always in the TEE
_ADAPTER_PARTS = ("lora_A", "lora_B", "lora_embedding", "modules_to_save", "original_module")
_PEFT_PREFIX = "base_model.model."
_ALWAYS_TEE = ("head", "lora")  # never delegated, whatever the rules say
_BLOCK = re.compile(r"(^|\.)\d+(\.|$)")


@dataclass(frozen=True)
class Rule:
    placement: str
    role: str | None = None
    match: tuple[str, ...] = ()

    def describe(self) -> str:
        return f"role {self.role}" if self.role else f"match {list(self.match)}"


@dataclass(frozen=True)
class PlacementPolicy:
    name: str
    rules: tuple[Rule, ...]
    description: str = ""
    requires: tuple[str, ...] = ()

    @property
    def delegates_nothing(self) -> bool:
        """Every rule places ``tee``: no layer of any model goes to a worker (none is needed)."""
        return all(r.placement == "tee" for r in self.rules)

    def digest(self) -> str:
        """SHA-256 (hex) of the policy's canonical JSON: bound into the serving-config digest."""
        return hashlib.sha256(json.dumps(self.canonical(), sort_keys=True).encode()).hexdigest()

    def canonical(self) -> dict:
        return {"name": self.name, "requires": list(self.requires),
                "rules": [{"placement": r.placement, "role": r.role, "match": list(r.match)} for r in self.rules]}


@dataclass(frozen=True)
class LayerPlacement:
    """One linear module of a model: its canonical name, role, shape and where it runs."""

    name: str          # canonical: peft wrappers removed (what the worker calls it)
    module_path: str   # where it sits in the loaded model
    role: str
    placement: str
    d_in: int
    d_out: int

    @property
    def accelerator_sees_weights(self) -> bool:
        return self.placement == "ckks"


def policy_names() -> list[str]:
    return sorted(p.stem for p in POLICY_DIR.glob("*.yaml"))


def load_placement_policy(ref: str) -> PlacementPolicy:
    """A shipped policy by name (``configs/policies/<name>.yaml``) or a YAML file path."""
    path = POLICY_DIR / f"{ref}.yaml" if "/" not in ref and not ref.endswith((".yaml", ".yml")) else Path(ref)
    if not path.is_file():
        raise UserError(f"unknown placement policy {ref!r}: not one of {', '.join(policy_names())} nor a YAML file")
    return policy_from_mapping(load_yaml(path), path.stem, str(path))


def policy_from_mapping(data: dict, name: str, where: str = "policy") -> PlacementPolicy:
    unknown = set(data) - {"description", "requires", "rules"}
    if unknown:
        raise UserError(f"{where}: unknown key(s) {sorted(unknown)}; allowed: description, requires, rules")
    rules_data = data.get("rules")
    if not isinstance(rules_data, list) or not rules_data:
        raise UserError(f"{where}: 'rules' must be a non-empty list of {{role|match, placement}}")
    rules = []
    for i, r in enumerate(rules_data):
        at = f"{where}: rule {i + 1}"
        if not isinstance(r, dict) or set(r) - {"role", "match", "placement"}:
            raise UserError(f"{at}: a rule is a mapping with 'placement' and one of 'role' or 'match'")
        placement = r.get("placement")
        if placement not in PLACEMENTS:
            raise UserError(f"{at}: unknown placement {placement!r}; choose {' or '.join(PLACEMENTS)}")
        if ("role" in r) == ("match" in r):
            raise UserError(f"{at}: give exactly one of 'role' or 'match'")
        if "role" in r:
            if r["role"] not in ROLES:
                raise UserError(f"{at}: unknown role {r['role']!r}; roles: {', '.join(ROLES)}")
            if r["role"] in ("head", "lora") and placement == "ckks":
                raise UserError(f"{at}: the {r['role']} stays in the TEE (the LM head, classifier and pooler; "
                                   "adapter matrices and fine-tuned copies)")
            rules.append(Rule(placement, role=r["role"]))
        else:
            globs = r["match"] if isinstance(r["match"], list) else [r["match"]]
            if not globs or not all(isinstance(g, str) and g for g in globs):
                raise UserError(f"{at}: 'match' is a glob or a list of globs on module names")
            rules.append(Rule(placement, match=tuple(globs)))
    requires = data.get("requires", [])
    if not isinstance(requires, list) or not all(x in ROLES for x in requires):
        raise UserError(f"{where}: 'requires' is a list of roles ({', '.join(ROLES)})")
    description = data.get("description", "")
    if not isinstance(description, str):
        raise UserError(f"{where}: 'description' must be a string")
    return PlacementPolicy(name, tuple(rules), description, tuple(requires))


# --------------------------------------------------------------------------- roles


def canonical_name(module_path: str) -> str:
    """The name a linear module has in the plain base model: peft's ``base_model.model.`` prefix and
    ``.base_layer`` suffix removed."""
    name = module_path[len(_PEFT_PREFIX):] if module_path.startswith(_PEFT_PREFIX) else module_path
    return name[: -len(".base_layer")] if name.endswith(".base_layer") else name


def role_of(name: str) -> str:
    """The role of the linear module at canonical path ``name`` (see the module docstring)."""
    parts = name.split(".")
    if any(p.startswith(_ADAPTER_PARTS) for p in parts):
        return "lora"
    if not _BLOCK.search(name):
        return "head"
    block_at = max(i for i, p in enumerate(parts) if p.isdigit())
    inner = parts[block_at + 1:]
    if any("attn" in p.lower() or "attention" in p.lower() for p in inner[:-1]):
        return "attention_qkv" if inner[-1] in _QKV else "attention_out"
    return "ffn"


def _is_linear(module: torch.nn.Module) -> bool:
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, (torch.nn.Linear, Conv1D))


def plan(model: torch.nn.Module, policy: PlacementPolicy, model_name: str = "the model",
         check_requires: bool = True) -> list[LayerPlacement]:
    """Where each linear module of ``model`` runs under ``policy``, in module order; one-line errors as
    the module docstring lists. ``check_requires=False``: the worker's view (the base model: it never holds
    an adapter)."""
    layers, used = [], [False] * len(policy.rules)
    for path, module in model.named_modules():
        if not path or not _is_linear(module):
            continue
        name = canonical_name(path)
        role = role_of(name)
        for i, rule in enumerate(policy.rules):
            hit = (rule.role in (role, "all") and not (rule.role == "all" and role in _ALWAYS_TEE)) if rule.role \
                else any(fnmatch.fnmatchcase(name, g) for g in rule.match)
            if hit:
                used[i] = True
                if role in _ALWAYS_TEE and rule.placement == "ckks":
                    raise UserError(f"policy {policy.name}: rule {i + 1} ({rule.describe()}) would delegate "
                                       f"{name}, but the {role} stays in the TEE")
                placement = rule.placement
                break
        else:
            if role not in _ALWAYS_TEE:
                raise UserError(f"policy {policy.name}: no rule places {name} (role {role}) of {model_name}")
            placement = "tee"
        w = module.weight
        d_out, d_in = (w.shape[1], w.shape[0]) if not isinstance(module, torch.nn.Linear) else tuple(w.shape)
        layers.append(LayerPlacement(name, path, role, placement, int(d_in), int(d_out)))
    for i, rule in enumerate(policy.rules):
        if rule.match and not used[i]:
            raise UserError(f"policy {policy.name}: rule {i + 1} ({rule.describe()}) matches no linear layer "
                               f"of {model_name}")
    roles = {layer.role for layer in layers}
    for role in policy.requires if check_requires else ():
        if role not in roles:
            what = "a LoRA adapter (--adapter DIR)" if role == "lora" else f"layers of role {role}"
            raise UserError(f"policy {policy.name} requires {what}; {model_name} has none")
    return layers
