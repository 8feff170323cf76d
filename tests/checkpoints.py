"""Tiny random Hugging Face checkpoints of many decoder (and a few encoder) architectures, for the tests and
``benchmarks/architectures.py``.

Each is 2 blocks, hidden size 64, a 512-token vocabulary (the byte-level fallback tokenizer's ids are < 256),
float32, weights drawn with a fixed seed, written with ``save_pretrained``: what a user's local checkpoint
directory looks like, minus the tokenizer.
"""

from __future__ import annotations

from pathlib import Path

import torch

VOCAB, HIDDEN, LAYERS, HEADS, FFN, CONTEXT = 512, 64, 2, 4, 128, 256
_IDS = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
_LLAMA_LIKE = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                   num_key_value_heads=2, intermediate_size=FFN, max_position_embeddings=CONTEXT, **_IDS)

# name -> (transformers model_type, config keyword arguments)
ARCHITECTURES: dict[str, tuple[str, dict]] = {
    "mistral": ("mistral", dict(_LLAMA_LIKE)),
    "phi": ("phi", dict(_LLAMA_LIKE, num_key_value_heads=HEADS)),
    "phi3": ("phi3", dict(_LLAMA_LIKE)),
    "gpt_neox": ("gpt_neox", dict(_LLAMA_LIKE, num_key_value_heads=None)),
    "gemma": ("gemma", dict(_LLAMA_LIKE, head_dim=16)),
    "gemma2": ("gemma2", dict(_LLAMA_LIKE, head_dim=16, sliding_window=16)),
    "gemma3_text": ("gemma3_text", dict(_LLAMA_LIKE, head_dim=16, sliding_window=16)),
    "falcon": ("falcon", dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                              max_position_embeddings=CONTEXT, **_IDS)),
    "opt": ("opt", dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                        ffn_dim=FFN, word_embed_proj_dim=HIDDEN, max_position_embeddings=CONTEXT, **_IDS)),
    "gptj": ("gptj", dict(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_inner=FFN, rotary_dim=8,
                          n_positions=CONTEXT, **_IDS)),
    "bloom": ("bloom", dict(vocab_size=VOCAB, hidden_size=HIDDEN, n_layer=LAYERS, n_head=HEADS, **_IDS)),
    # BLOOM as pretrained with tensor parallelism 2: the model multiplies by self_attention.dense.weight and
    # mlp.dense_4h_to_h.weight itself (in slices), so those layers never call their module
    "bloom_tp2": ("bloom", dict(vocab_size=VOCAB, hidden_size=HIDDEN, n_layer=LAYERS, n_head=HEADS,
                                pretraining_tp=2, slow_but_exact=True, **_IDS)),
    "stablelm": ("stablelm", dict(_LLAMA_LIKE)),
    "olmo": ("olmo", dict(_LLAMA_LIKE)),
    "gpt2": ("gpt2", dict(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_positions=CONTEXT, **_IDS)),
    "llama": ("llama", dict(_LLAMA_LIKE)),
    "qwen3": ("qwen3", dict(_LLAMA_LIKE, head_dim=16)),
}

# encoders, saved as their base model (loaded with AutoModel)
ENCODERS: dict[str, tuple[str, dict]] = {
    "distilbert": ("distilbert", dict(vocab_size=VOCAB, dim=HIDDEN, n_layers=LAYERS, n_heads=HEADS, hidden_dim=FFN,
                                      max_position_embeddings=CONTEXT, pad_token_id=0)),
    "roberta": ("roberta", dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                                intermediate_size=FFN, max_position_embeddings=CONTEXT, **_IDS)),
}


def supported(name: str) -> bool:
    """Whether the installed transformers has this architecture."""
    from transformers import CONFIG_MAPPING

    return {**ARCHITECTURES, **ENCODERS}[name][0] in CONFIG_MAPPING


def build_checkpoint(name: str, root: Path, seed: int = 0) -> Path:
    """Write the tiny random checkpoint ``name`` under ``root`` (``root/name``); returns its directory."""
    from transformers import CONFIG_MAPPING, AutoModel, AutoModelForCausalLM

    auto = AutoModel if name in ENCODERS else AutoModelForCausalLM
    model_type, kwargs = {**ARCHITECTURES, **ENCODERS}[name]
    config = CONFIG_MAPPING[model_type](**kwargs)
    config._attn_implementation = "eager"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = auto.from_config(config, dtype=torch.float32)
    path = Path(root) / name
    model.save_pretrained(path)
    return path


def block_linears(model: torch.nn.Module) -> list[str]:
    """Names of the linear modules (``nn.Linear``, GPT-2 ``Conv1D``) inside the model's transformer blocks:
    the ``ModuleList`` with one entry per hidden layer. Found from the model's structure, not from the
    delegation policy, so a test can hold the policy to it."""
    from transformers.pytorch_utils import Conv1D

    n_layers = model.config.num_hidden_layers
    for list_name, blocks in model.named_modules():
        if isinstance(blocks, torch.nn.ModuleList) and len(blocks) == n_layers:
            return [f"{list_name}.{name}" for name, m in blocks.named_modules()
                    if isinstance(m, (torch.nn.Linear, Conv1D))]
    raise AssertionError(f"{type(model).__name__}: no ModuleList of {n_layers} blocks")
