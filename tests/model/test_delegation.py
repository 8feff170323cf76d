import numpy as np
import torch

from bifrost.config import DelegationConfig
from bifrost.model.catalog import load_model, resolve
from bifrost.model.delegation import fuse_groups, linear_weight, sites, weight_digest
from bifrost.model.placement import load_placement_policy, policy_from_mapping

DEFAULT_POLICY = load_placement_policy("bifrost")


def _names(model_name, policy=DEFAULT_POLICY):
    return [s.name for s, _ in sites(load_model(resolve(model_name)), policy)]


def test_gpt2_delegates_attention_and_mlp_but_not_embeddings_or_head():
    names = _names("gpt2-mini")
    assert len(names) == 2 * 4
    assert {n.rsplit(".", 1)[-1] for n in names} == {"c_attn", "c_proj", "c_fc"}
    assert not any("wte" in n or "lm_head" in n for n in names)


def test_qwen3_and_llama_delegate_all_seven_projections_and_fuse_siblings():
    for model in ("qwen3-mini", "llama-mini"):
        names = _names(model)
        assert len(names) == 2 * 7
        groups = fuse_groups(names, DelegationConfig())
        leaves = [tuple(n.rsplit(".", 1)[-1] for n in g) for g in groups]
        assert ("q_proj", "k_proj", "v_proj") in leaves and ("gate_proj", "up_proj") in leaves
        assert sorted(n for g in groups for n in g) == sorted(names)


def test_policy_globs_select_layers():
    only_mlp = policy_from_mapping({"rules": [{"match": "*.mlp.*", "placement": "ckks"},
                                              {"role": "all", "placement": "tee"}]}, "only-mlp")
    names = _names("qwen3-mini", only_mlp)
    assert names and all(".mlp." in n for n in names)


def test_conv1d_weight_is_presented_as_out_by_in():
    model = load_model(resolve("gpt2-mini"))
    conv = model.transformer.h[0].attn.c_attn  # Conv1D stores (d_in, d_out)
    w = linear_weight(conv)
    assert w.shape == (192, 64)
    x = torch.randn(3, 64)
    assert np.allclose(x.double().numpy() @ w.T + conv.bias.detach().double().numpy(), conv(x).detach().double().numpy(), atol=1e-5)


def test_digest_pins_every_bit_of_the_weight():
    w = np.random.default_rng(0).normal(size=(8, 4))
    d = weight_digest(w)
    w2 = w.copy()
    w2[3, 2] = np.nextafter(np.float32(w2[3, 2]), np.float32(1e9))
    assert weight_digest(w2) != d
    assert weight_digest(w.T.copy()) != d  # shape is part of the digest
    assert weight_digest(w.copy()) == d
