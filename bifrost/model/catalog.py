"""Load models by name (architecture from ``configs/models.yaml`` + fixed seed) or from a local checkpoint.

Model weights are public in Bifrost's threat model (the worker holds them too); only activations,
prompts and the KV cache are secret. This module is therefore shared by both trust domains.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import CONFIG_DIR, load_yaml
from ..errors import BifrostError

FAMILIES = {"gpt2", "qwen3", "llama", "bert"}
TASKS = {"causal-lm", "encoder"}


@dataclass(frozen=True)
class ModelSpec:
    """What to load: a catalog name or a checkpoint directory, plus the seed for random init."""

    name: str
    family: str
    task: str = "causal-lm"
    config: dict = field(default_factory=dict, hash=False, compare=False)
    path: str | None = None  # checkpoint directory (config.json + weights)


def catalog() -> dict[str, ModelSpec]:
    raw = load_yaml(CONFIG_DIR / "models.yaml")
    specs = {}
    for name, entry in raw.items():
        unknown = set(entry) - {"family", "task", "config", "package"}
        if unknown:
            raise BifrostError(f"configs/models.yaml: model {name!r} has unknown keys {sorted(unknown)}")
        family, task = entry.get("family"), entry.get("task", "causal-lm")
        if family not in FAMILIES or task not in TASKS:
            raise BifrostError(f"configs/models.yaml: model {name!r} has bad family/task {family!r}/{task!r}")
        path = _package_path(entry["package"]) if "package" in entry else None
        specs[name] = ModelSpec(name, family, task, dict(entry.get("config", {})), path)
    return specs


def _package_path(ref: str) -> str | None:
    pkg, _, sub = ref.partition("/")
    found = importlib.util.find_spec(pkg)
    if found is None or not found.submodule_search_locations:
        return None
    return str(Path(list(found.submodule_search_locations)[0]) / sub)


def resolve(model: str) -> ModelSpec:
    """A catalog name, or a path to a local Hugging Face checkpoint directory."""
    specs = catalog()
    if model in specs:
        spec = specs[model]
        if spec.path is None and "package" in load_yaml(CONFIG_DIR / "models.yaml")[model]:
            raise BifrostError(f"model {model!r} needs its package installed (see configs/models.yaml)")
        return spec
    looks_like_path = os.sep in model or model.startswith(".") or Path(model).exists()
    if not looks_like_path:
        raise BifrostError(f"unknown model {model!r}: not a catalog name ({', '.join(sorted(specs))}) nor a path")
    p = Path(model)
    if not p.is_dir():
        raise BifrostError(f"checkpoint path does not exist or is not a directory: {model}")
    if not (p / "config.json").is_file():
        raise BifrostError(f"checkpoint directory has no config.json: {model}")
    import json

    cfg = json.loads((p / "config.json").read_text())
    mtype = cfg.get("model_type", "")
    family = {"gpt2": "gpt2", "qwen3": "qwen3", "llama": "llama", "bert": "bert"}.get(mtype)
    if family is None:
        raise BifrostError(f"unsupported model_type {mtype!r} in {model}/config.json (supported: {sorted(FAMILIES)})")
    task = "encoder" if family == "bert" else "causal-lm"
    return ModelSpec(str(p), family, task, {}, str(p))


def _config_class(family: str):
    from transformers import BertConfig, GPT2Config, LlamaConfig, Qwen3Config

    return {"gpt2": GPT2Config, "qwen3": Qwen3Config, "llama": LlamaConfig, "bert": BertConfig}[family]


def load_model(spec: ModelSpec, seed: int = 0, adapter: str | None = None, merged: bool = False) -> torch.nn.Module:
    """Build the model in float32, eval mode. Random-init models are identical for identical seeds.

    ``adapter``: a LoRA adapter directory (peft: ``adapter_config.json`` + weights) applied on top; the layers
    it adapts become peft wrappers whose ``base_layer`` is the original layer. ``merged``: fold the adapter
    into the base weights instead (the plaintext reference a delegated run is held to)."""
    model = _load_base(spec, seed)
    if adapter is None:
        return model
    return load_adapter(model, adapter, merged)


def load_adapter(model: torch.nn.Module, adapter: str, merged: bool = False) -> torch.nn.Module:
    """``model`` with the LoRA adapter in directory ``adapter`` (see :func:`load_model`); one-line errors."""
    from peft import PeftModel

    path = Path(adapter)
    if not (path / "adapter_config.json").is_file():
        raise BifrostError(f"LoRA adapter {adapter}: no adapter_config.json (a peft adapter directory)")
    try:
        peft_model = PeftModel.from_pretrained(model, str(path), is_trainable=False)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise BifrostError(f"cannot load LoRA adapter {adapter}: {str(exc).splitlines()[0][:200]}") from None
    return (peft_model.merge_and_unload() if merged else peft_model).eval()


def _load_base(spec: ModelSpec, seed: int) -> torch.nn.Module:
    from transformers import AutoModel, AutoModelForCausalLM

    auto = AutoModelForCausalLM if spec.task == "causal-lm" else AutoModel
    if spec.path is not None:
        try:
            model = auto.from_pretrained(spec.path, dtype=torch.float32, local_files_only=True)
        except OSError as exc:
            raise BifrostError(f"cannot load checkpoint {spec.path}: {str(exc).splitlines()[0]}") from None
    else:
        cfg = _config_class(spec.family)(**spec.config)
        cfg._attn_implementation = "eager"
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # public weights: reproducibility, not secrecy
            model = auto.from_config(cfg, dtype=torch.float32)
    return model.eval()
