"""Model shapes and per-layer operation counts, from a named config or a Hugging Face ``config.json``.

Only the architecture matters here (no weights are built). The delegated linear layers and their fusion
mirror the runtime's default delegation policy (``configs/default.yaml``): every ``nn.Linear``/``Conv1D``
of a decoder layer goes to the worker, q/k/v and gate/up share one encrypted input, the LM head stays in
the TEE. ``tests/estimator/test_shapes.py`` checks this against the runtime's own site list.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from bifrost.errors import UserError


@dataclass(frozen=True)
class LinearGroup:
    """Linear layers of one decoder layer that read the same input (one delegated call)."""

    name: str
    d_in: int
    d_outs: tuple[int, ...]

    @property
    def macs(self) -> int:
        return self.d_in * sum(self.d_outs)


@dataclass(frozen=True)
class ModelShape:
    name: str
    family: str  # gpt2 | llama | qwen3
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_ff: int
    vocab: int
    max_positions: int

    @property
    def gated(self) -> bool:
        """SwiGLU MLP (gate/up/down) instead of GELU (fc/proj)."""
        return self.family in ("llama", "qwen3")

    @property
    def norm(self) -> str:
        return "layernorm" if self.family == "gpt2" else "rmsnorm"

    @property
    def rope(self) -> bool:
        return self.family in ("llama", "qwen3")

    @property
    def qk_norm(self) -> bool:
        return self.family == "qwen3"

    def groups(self) -> list[LinearGroup]:
        """Delegated calls of one decoder layer, in execution order."""
        d, q, kv = self.d_model, self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        if self.family == "gpt2":
            return [LinearGroup("attn.c_attn", d, (3 * d,)), LinearGroup("attn.c_proj", d, (d,)),
                    LinearGroup("mlp.c_fc", d, (self.d_ff,)), LinearGroup("mlp.c_proj", self.d_ff, (d,))]
        return [LinearGroup("self_attn.qkv", d, (q, kv, kv)), LinearGroup("self_attn.o_proj", q, (d,)),
                LinearGroup("mlp.gate_up", d, (self.d_ff, self.d_ff)), LinearGroup("mlp.down_proj", self.d_ff, (d,))]

    def linear_macs_per_token(self) -> int:
        """Multiply-accumulates of the delegated linear layers for one token (all layers)."""
        return self.n_layers * sum(g.macs for g in self.groups())

    def lm_head_macs_per_token(self) -> int:
        return self.vocab * self.d_model


def _int(c: dict, key: str, default=None, name: str = "") -> int:
    """A positive integer config value (``default`` when absent or null)."""
    value = c.get(key)
    if value is None:
        if default is None:
            raise UserError(f"model {name!r}: config lacks {key!r}")
        value = default
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise UserError(f"model {name!r}: {key} must be a positive integer, got {value!r}")
    try:
        number = float(value)
    except ValueError:
        raise UserError(f"model {name!r}: {key} must be a positive integer, got {value!r}") from None
    if not number.is_integer() or number < 1:
        raise UserError(f"model {name!r}: {key} must be a positive integer, got {value!r}")
    return int(number)


def _shape_from_config(name: str, family: str, c: dict) -> ModelShape:
    if not isinstance(c, dict):
        raise UserError(f"model {name!r}: config must be a JSON object, got {type(c).__name__}")
    if family == "gpt2":
        d, h = _int(c, "n_embd", 768, name), _int(c, "n_head", 12, name)
        if d % h:
            raise UserError(f"model {name!r}: n_embd ({d}) must be divisible by n_head ({h})")
        shape = ModelShape(name, family, _int(c, "n_layer", 12, name), d, h, h, d // h, _int(c, "n_inner", 4 * d, name),
                           _int(c, "vocab_size", 50257, name), _int(c, "n_positions", 1024, name))
    elif family in ("llama", "qwen3"):
        d, h = _int(c, "hidden_size", name=name), _int(c, "num_attention_heads", name=name)
        kv = _int(c, "num_key_value_heads", h, name)
        if c.get("head_dim") is None and d % h:
            raise UserError(f"model {name!r}: hidden_size ({d}) must be divisible by num_attention_heads ({h})")
        if h % kv:
            raise UserError(f"model {name!r}: num_attention_heads ({h}) must be divisible by num_key_value_heads ({kv})")
        hd = _int(c, "head_dim", d // h, name)
        shape = ModelShape(name, family, _int(c, "num_hidden_layers", name=name), d, h, kv, hd,
                           _int(c, "intermediate_size", name=name), _int(c, "vocab_size", 32000, name),
                           _int(c, "max_position_embeddings", 2048, name))
    else:
        raise UserError(f"model {name!r}: family {family!r} is not a decoder LM the estimator models "
                           f"(supported: gpt2, llama, qwen3)")
    return shape


def load_shape(model: str) -> ModelShape:
    """A catalog name (``configs/models.yaml``), a ``config.json`` file, or a checkpoint directory."""
    from bifrost.model.catalog import catalog

    specs = catalog()
    if model in specs:
        spec = specs[model]
        return _shape_from_config(model, spec.family, spec.config)
    p = Path(model)
    if p.is_dir():
        p = p / "config.json"
    if not p.is_file():
        raise UserError(f"unknown model {model!r}: not a catalog name ({', '.join(sorted(specs))}) "
                           f"nor a config.json / checkpoint directory")
    try:
        cfg = json.loads(p.read_text())
    except (ValueError, OSError) as exc:
        raise UserError(f"{p}: cannot read a JSON config: {exc}") from None
    if not isinstance(cfg, dict):
        raise UserError(f"{p}: top level must be a JSON object, got {type(cfg).__name__}")
    mtype = cfg.get("model_type", "")
    family = {"gpt2": "gpt2", "llama": "llama", "qwen3": "qwen3", "mistral": "llama", "qwen2": "llama"}.get(mtype)
    if family is None:
        raise UserError(f"{p}: model_type {mtype!r} not supported by the estimator (gpt2, llama, qwen3)")
    return _shape_from_config(str(model), family, cfg)


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def log2c(x: int) -> int:
    return max(0, math.ceil(math.log2(max(1, x))))
