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
