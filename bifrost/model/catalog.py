"""Load models by name (architecture from ``configs/models.yaml`` + fixed seed) or from a local checkpoint.

A checkpoint directory may hold any architecture the installed transformers can load (no allow-list):
a causal LM when ``AutoModelForCausalLM`` maps its config (and ``architectures`` names a causal LM),
else an encoder through ``AutoModel``. What cannot work is refused with one line: no ``config.json``, a
``model_type`` transformers does not know (custom code is never run), no causal-LM or base-model class,
an encoder-decoder, a base model that takes no token ids, weights that fail to load or are missing.
Whether the delegation policy matches a linear layer is checked where the policy is known (the worker's
``build_service`` and ``TrustedRuntime``).

Model weights are public in Bifrost's threat model (the worker holds them too); only activations,
prompts and the KV cache are secret. This module is therefore shared by both trust domains.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import os
import warnings
from typing import Any
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import CONFIG_DIR
from ..errors import UserError
from ..yaml_io import load_yaml

TASKS = {"causal-lm", "encoder"}
_CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")


@dataclass(frozen=True)
class ModelSpec:
    """What to load: a catalog name or a checkpoint directory, plus the seed for random init."""

    name: str
    family: str  # a transformers model_type (gpt2, llama, mistral, bert, ...)
    task: str = "causal-lm"
    config: dict = field(default_factory=dict, hash=False, compare=False)
    path: str | None = None  # checkpoint directory (config.json + weights)


def catalog() -> dict[str, ModelSpec]:
    raw = load_yaml(CONFIG_DIR / "models.yaml")
    specs = {}
    for name, entry in raw.items():
        unknown = set(entry) - {"family", "task", "config", "package", "gguf", "sha256", "ckks"}
        if unknown:
            raise UserError(f"configs/models.yaml: model {name!r} has unknown keys {sorted(unknown)}")
        family, task = entry.get("family"), entry.get("task", "causal-lm")
        if not _known_model_type(family) or task not in TASKS:
            raise UserError(f"configs/models.yaml: model {name!r} has bad family/task {family!r}/{task!r} "
                               f"(family: a transformers model_type; task: {' | '.join(sorted(TASKS))})")
        if "gguf" in entry and not (isinstance(entry.get("sha256"), str) and len(entry["sha256"]) == 64):
            raise UserError(f"configs/models.yaml: model {name!r}: a gguf source needs its sha256 (64 hex digits)")
        path = _package_path(entry["package"]) if "package" in entry else None  # gguf: converted in resolve()
        specs[name] = ModelSpec(name, family, task, dict(entry.get("config", {})), path)
    return specs


def model_ckks(model: str, backend: str) -> dict | None:
    """The catalog entry's CKKS parameters for ``backend`` (``ckks: {backend: {...}}`` in configs/models.yaml), used
    when the run config sets none; None for models without one (and for checkpoint paths)."""
    entry = load_yaml(CONFIG_DIR / "models.yaml").get(model)
    ckks = entry.get("ckks") if isinstance(entry, dict) else None
    if ckks is None:
        return None
    if not isinstance(ckks, dict) or not all(isinstance(v, dict) for v in ckks.values()):
        raise UserError(f"configs/models.yaml: model {model!r}: ckks maps a backend name to its parameters")
    return ckks.get(backend)


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
        entry = load_yaml(CONFIG_DIR / "models.yaml")[model]
        if spec.path is None and "package" in entry:
            raise UserError(f"model {model!r} needs its package installed (see configs/models.yaml)")
        if "gguf" in entry:
            return dataclasses.replace(spec, path=str(_gguf_checkpoint(model, entry)))
        return spec
    looks_like_path = os.sep in model or model.startswith(".") or Path(model).exists()
    if not looks_like_path:
        raise UserError(f"unknown model {model!r}: not a catalog name ({', '.join(sorted(specs))}) nor a path")
    p = Path(model)
    if not p.is_dir():
        raise UserError(f"checkpoint path does not exist or is not a directory: {model}")
    if not (p / "config.json").is_file():
        raise UserError(f"checkpoint directory has no config.json: {model}")
    family, task = _checkpoint_kind(p)
    return ModelSpec(str(p), family, task, {}, str(p))


def _gguf_checkpoint(name: str, entry: dict) -> Path:
    """The cached float32 checkpoint converted from the entry's package-shipped GGUF (bifrost/model/gguf_checkpoint.py)."""
    from .gguf_checkpoint import cached_checkpoint, package_file

    gguf = package_file(entry["gguf"])
    if gguf is None:
        raise UserError(f"model {name!r} needs {entry['gguf']} (its package installed; see configs/models.yaml)")
    return cached_checkpoint(name, gguf, entry["sha256"])


def _known_model_type(model_type) -> bool:
    from transformers import CONFIG_MAPPING

    return isinstance(model_type, str) and model_type in CONFIG_MAPPING


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _checkpoint_kind(p: Path) -> tuple[str, str]:
    """(model_type, task) of a checkpoint directory, or a one-line refusal of what cannot work."""
    import transformers
    from transformers import AutoConfig
    from transformers.models.auto import modeling_auto

    where = f"{p}/config.json"
    try:
        raw = json.loads((p / "config.json").read_text())
    except (ValueError, OSError) as exc:
        raise UserError(f"{where}: not a readable JSON file ({_first_line(exc)})") from None
    mtype = raw.get("model_type") if isinstance(raw, dict) else None
    if not isinstance(mtype, str) or not mtype:
        raise UserError(f"{where} has no model_type")
    if not _known_model_type(mtype):
        raise UserError(f"model_type {mtype!r} in {where} is not known to transformers {transformers.__version__} "
                           "(custom code is never run)")
    try:
        config = AutoConfig.from_pretrained(str(p), local_files_only=True)
    except Exception as exc:  # any config error: one line for the user
        raise UserError(f"{where}: transformers cannot read it: {_first_line(exc)}") from None
    if getattr(config, "is_encoder_decoder", False):
        raise UserError(f"{p}: {mtype} is an encoder-decoder model; Bifrost runs decoder LMs and encoders")
    causal_name = modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(mtype)
    architectures = list(getattr(config, "architectures", None) or [])
    if causal_name is not None:
        if architectures:
            if any(a.endswith(_CAUSAL_SUFFIXES) or a == causal_name for a in architectures):
                return mtype, "causal-lm"
        elif mtype not in modeling_auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES:
            return mtype, "causal-lm"
    if mtype in modeling_auto.MODEL_MAPPING_NAMES:
        import inspect

        base: Any = modeling_auto.MODEL_MAPPING[type(config)]
        if "input_ids" not in inspect.signature(base.forward).parameters:
            raise UserError(f"{p}: {base.__name__} takes no token ids (not a text model)")
        return mtype, "encoder"
    raise UserError(f"{p}: transformers {transformers.__version__} has neither a causal-LM nor a base-model "
                       f"class for model_type {mtype!r} (architectures: {', '.join(architectures) or 'none'})")


def _config_class(family: str):
    """The transformers config class of a model_type."""
    from transformers import CONFIG_MAPPING

    return CONFIG_MAPPING[family]


def _load_checkpoint(auto, path: str) -> torch.nn.Module:
    """``auto.from_pretrained`` with every weight required: a weight missing from the checkpoint or of the
    wrong shape would be initialised at random, differently in the worker and in the TEE. The one exception
    is an encoder's pooler (``embed`` mean-pools the last hidden state and never runs it)."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its load report would precede our one-line refusal
    try:
        model, info = auto.from_pretrained(path, dtype=torch.float32, local_files_only=True, attn_implementation="eager",
                                           ignore_mismatched_sizes=True, output_loading_info=True)
    except Exception as exc:  # OSError, safetensors or config errors, ...: one line
        raise UserError(f"cannot load checkpoint {path}: {_first_line(exc)}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    bad = sorted(k for k in info.get("missing_keys") or [] if "pooler" not in k)
    bad += sorted(str(k[0] if isinstance(k, tuple) else k) for k in info.get("mismatched_keys") or [])
    if bad:
        more = f" (+{len(bad) - 3} more)" if len(bad) > 3 else ""
        raise UserError(f"cannot load checkpoint {path}: weights missing or of the wrong shape: {', '.join(bad[:3])}{more}")
    return model


def load_model(spec: ModelSpec, seed: int = 0, adapter: str | None = None, merged: bool = False) -> torch.nn.Module:
    """Build the model in float32, eval mode, eager attention (the one implementation every architecture
    has). Random-init models are identical for identical seeds; a checkpoint must hold every weight.

    ``adapter``: a LoRA adapter directory (peft: ``adapter_config.json`` + weights) applied on top; the layers
    it adapts become peft wrappers whose ``base_layer`` is the original layer. ``merged``: fold the adapter
    into the base weights instead (the plaintext reference a delegated run is held to)."""
    model = _load_base(spec, seed)
    if adapter is None:
        return model
    return load_adapter(model, adapter, merged)


@contextlib.contextmanager
def peft_wrapping():
    """peft 0.21 reads transformers' deprecated ``is_gradient_checkpointing`` whenever it wraps a model, a
    FutureWarning on every adapter load that no caller can act on; this silences exactly that message."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


def load_adapter(model: torch.nn.Module, adapter: str, merged: bool = False) -> torch.nn.Module:
    """``model`` with the LoRA adapter in directory ``adapter`` (see :func:`load_model`); one-line errors."""
    from peft import PeftModel

    path = Path(adapter)
    if not (path / "adapter_config.json").is_file():
        raise UserError(f"LoRA adapter {adapter}: no adapter_config.json (a peft adapter directory)")
    try:
        with peft_wrapping():
            peft_model = PeftModel.from_pretrained(model, str(path), is_trainable=False)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise UserError(f"cannot load LoRA adapter {adapter}: {str(exc).splitlines()[0][:200]}") from None
    return (peft_model.merge_and_unload() if merged else peft_model).eval()


def _load_base(spec: ModelSpec, seed: int) -> torch.nn.Module:
    from transformers import AutoModel, AutoModelForCausalLM

    auto = AutoModelForCausalLM if spec.task == "causal-lm" else AutoModel
    if spec.path is not None:
        model = _load_checkpoint(auto, spec.path)
    else:
        cfg = _config_class(spec.family)(**spec.config)
        cfg._attn_implementation = "eager"
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # public weights: reproducibility, not secrecy
            model = auto.from_config(cfg, dtype=torch.float32)
    return model.eval()
