import pytest
import torch

from bifrost.errors import BifrostError
from bifrost.model.catalog import catalog, load_model, resolve


def test_named_models_are_deterministic_for_a_seed():
    spec = resolve("gpt2-mini")
    a, b, c = load_model(spec, 0), load_model(spec, 0), load_model(spec, 1)
    wa, wb, wc = (m.transformer.h[0].attn.c_attn.weight for m in (a, b, c))
    assert torch.equal(wa, wb)
    assert not torch.equal(wa, wc)


def test_catalog_covers_the_required_families():
    families = {s.family for s in catalog().values()}
    assert {"gpt2", "qwen3", "llama", "bert"} <= families


def test_missing_checkpoint_path_is_a_clear_error(tmp_path):
    with pytest.raises(BifrostError, match="does not exist"):
        resolve(str(tmp_path / "nope"))
    with pytest.raises(BifrostError, match="no config.json"):
        resolve(str(tmp_path))
    with pytest.raises(BifrostError, match="unknown model"):
        resolve("gpt7-ultra")


def test_local_checkpoint_directory_loads(tmp_path):
    model = load_model(resolve("gpt2-mini"), 0)
    model.save_pretrained(tmp_path)
    spec = resolve(str(tmp_path))
    assert spec.family == "gpt2" and spec.path == str(tmp_path)
    again = load_model(spec)
    assert torch.equal(again.transformer.h[1].mlp.c_fc.weight, model.transformer.h[1].mlp.c_fc.weight)


def test_real_minilm_checkpoint_is_found():
    spec = resolve("minilm")
    assert spec.task == "encoder" and spec.path and spec.path.endswith("model")


# --- local checkpoints of any architecture transformers has (no allow-list), and what cannot work ---

@pytest.fixture(scope="module")
def mistral_checkpoint(tmp_path_factory):
    from tests.checkpoints import build_checkpoint

    return build_checkpoint("mistral", tmp_path_factory.mktemp("ckpt"))


def _copy_with_config(src, dst, **changes):
    import json
    import shutil

    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(changes)
    cfg = {k: v for k, v in cfg.items() if v is not None}
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def _refusal(path) -> str:
    with pytest.raises(BifrostError) as err:
        load_model(resolve(str(path)))
    message = str(err.value)
    assert "\n" not in message and str(path) in message
    return message


def test_checkpoint_of_an_architecture_without_bifrost_code_loads(mistral_checkpoint):
    spec = resolve(str(mistral_checkpoint))
    assert (spec.family, spec.task, spec.path) == ("mistral", "causal-lm", str(mistral_checkpoint))
    assert type(load_model(spec)).__name__ == "MistralForCausalLM"


def test_masked_lm_checkpoint_is_an_encoder(tmp_path):
    from transformers import BertConfig, BertForMaskedLM

    BertForMaskedLM(BertConfig(vocab_size=300, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=64)).save_pretrained(tmp_path)
    spec = resolve(str(tmp_path))
    assert (spec.family, spec.task) == ("bert", "encoder")
    assert type(load_model(spec)).__name__ == "BertModel"  # its pooler is not in the checkpoint: never used


def test_unknown_model_type_is_one_line(mistral_checkpoint, tmp_path):
    path = _copy_with_config(mistral_checkpoint, tmp_path / "c", model_type="frobnicator-9000")
    assert "model_type 'frobnicator-9000'" in _refusal(path) and "not known to transformers" in _refusal(path)
    path = _copy_with_config(mistral_checkpoint, tmp_path / "d", model_type=None)
    assert "has no model_type" in _refusal(path)
    (path / "config.json").write_text("{not json")
    assert "not a readable JSON file" in _refusal(path)


@pytest.mark.parametrize("model_type,needle", [
    ("t5", "encoder-decoder"),
    ("vit", "takes no token ids"),
    ("superpoint", "neither a causal-LM nor a base-model class"),
])
def test_models_bifrost_cannot_run_are_refused_from_their_config(tmp_path, model_type, needle):
    (tmp_path / "config.json").write_text(f'{{"model_type": "{model_type}"}}')
    assert needle in _refusal(tmp_path)


def test_weights_that_are_missing_misshapen_or_unreadable_are_refused(mistral_checkpoint, tmp_path):
    from safetensors.torch import load_file, save_file

    path = _copy_with_config(mistral_checkpoint, tmp_path / "c")
    weights = load_file(path / "model.safetensors")
    name = "model.layers.1.mlp.up_proj.weight"
    save_file({k: v for k, v in weights.items() if k != name}, path / "model.safetensors", metadata={"format": "pt"})
    assert f"weights missing or of the wrong shape: {name}" in _refusal(path)
    save_file({**weights, name: weights[name][:5]}, path / "model.safetensors", metadata={"format": "pt"})
    assert f"weights missing or of the wrong shape: {name}" in _refusal(path)
    (path / "model.safetensors").write_bytes(b"\0" * 64)
    assert "cannot load checkpoint" in _refusal(path)
    (path / "model.safetensors").unlink()
    assert "cannot load checkpoint" in _refusal(path)

