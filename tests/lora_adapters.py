"""Seeded random LoRA adapters (peft) for tests: real adapter directories, as a fine-tune would ship them."""

from __future__ import annotations

from pathlib import Path

import torch

TARGETS = {"gpt2": ["c_attn", "c_proj", "c_fc"],
           "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}


def make_adapter(model_name: str, seed: int, out: Path, rank: int = 4, scale: float = 0.5) -> Path:
    """Save a LoRA adapter for catalog model ``model_name`` to ``out``: every block linear adapted, A and B
    random (seeded; B not zero, so the adapter changes the outputs), ``lora_alpha = rank``."""
    from peft import LoraConfig, get_peft_model

    from bifrost.model.catalog import load_model, peft_wrapping, resolve

    spec = resolve(model_name)
    base = load_model(spec, 0)
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=TARGETS[spec.family], lora_dropout=0.0,
                        init_lora_weights=False, fan_in_fan_out=spec.family == "gpt2")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with peft_wrapping():
            peft_model = get_peft_model(base, config)
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_" in name:
                    p.mul_(scale)
    peft_model.save_pretrained(str(out))
    return out
