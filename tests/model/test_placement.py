"""Placement policies: validated at load with one-line errors; roles across architectures; digests."""

from __future__ import annotations

import pytest

from bifrost.config_loader import placement_of
from bifrost.errors import BifrostError
from bifrost.model.catalog import load_model, resolve
from bifrost.model.placement import (canonical_name, load_placement_policy, plan, policy_from_mapping,
                                     policy_names, role_of)


@pytest.fixture(scope="module")
def gpt2():
    return load_model(resolve("gpt2-mini"))


def test_the_four_shipped_policies_load():
    assert {"bifrost", "tee-only", "secureinfer", "lora-private"} <= set(policy_names())
    digests = {name: load_placement_policy(name).digest() for name in policy_names()}
    assert len(set(digests.values())) == len(digests)


@pytest.mark.parametrize("data, words", [
    ({"rules": [{"role": "all", "placement": "gpu"}]}, "unknown placement 'gpu'"),
    ({"rules": [{"role": "mlp", "placement": "tee"}]}, "unknown role 'mlp'"),
    ({"rules": [{"role": "head", "placement": "ckks"}]}, "head"),
    ({"rules": [{"role": "all", "match": "*", "placement": "tee"}]}, "exactly one of"),
    ({"rules": []}, "non-empty list"),
    ({"rulez": []}, "unknown key(s) ['rulez']"),
    ({"rules": [{"role": "all", "placement": "tee"}], "requires": ["adapter"]}, "'requires' is a list of roles"),
])
def test_malformed_policies_are_one_line_errors(data, words):
    with pytest.raises(BifrostError) as err:
        policy_from_mapping(data, "bad", "bad.yaml")
    assert words in str(err.value) and "\n" not in str(err.value)


def test_a_pattern_matching_nothing_and_an_unplaced_layer_are_errors(gpt2):
    nothing = policy_from_mapping({"rules": [{"match": "*.q_proj", "placement": "tee"},
                                             {"role": "all", "placement": "ckks"}]}, "p")
    with pytest.raises(BifrostError, match=r"rule 1 \(match \['\*\.q_proj'\]\) matches no linear layer of gpt2-mini"):
        plan(gpt2, nothing, "gpt2-mini")
    partial = policy_from_mapping({"rules": [{"role": "ffn", "placement": "tee"}]}, "p")
    with pytest.raises(BifrostError, match="no rule places transformer.h.0.attn.c_attn"):
        plan(gpt2, partial, "gpt2-mini")
    head = policy_from_mapping({"rules": [{"match": "lm_head", "placement": "ckks"}, {"role": "all", "placement": "tee"}]}, "p")
    with pytest.raises(BifrostError, match="head stays in the TEE"):
        plan(gpt2, head, "gpt2-mini")


def test_unknown_policy_names_list_the_shipped_ones(run_config):
    with pytest.raises(BifrostError, match="unknown placement policy 'nope'.*secureinfer"):
        placement_of(run_config.replace(policy="nope"))


@pytest.mark.parametrize("name, role", [
    ("transformer.h.0.attn.c_attn", "attention_qkv"), ("transformer.h.0.attn.c_proj", "attention_out"),
    ("transformer.h.0.mlp.c_proj", "ffn"), ("lm_head", "head"),
    ("model.layers.3.self_attn.q_proj", "attention_qkv"), ("model.layers.3.self_attn.o_proj", "attention_out"),
    ("model.layers.3.mlp.gate_proj", "ffn"),
    ("bert.encoder.layer.0.attention.self.query", "attention_qkv"),
    ("bert.encoder.layer.0.attention.output.dense", "attention_out"),
    ("bert.encoder.layer.0.intermediate.dense", "ffn"), ("bert.encoder.layer.0.output.dense", "ffn"),
    ("bert.pooler.dense", "head"),
    ("gpt_neox.layers.1.attention.query_key_value", "attention_qkv"), ("gpt_neox.layers.1.attention.dense", "attention_out"),
    ("gpt_neox.layers.1.mlp.dense_h_to_4h", "ffn"), ("model.decoder.layers.0.self_attn.out_proj", "attention_out"),
    ("model.decoder.layers.0.fc1", "ffn"), ("model.layers.0.self_attn.qkv_proj", "attention_qkv"),
    ("model.layers.0.mlp.gate_up_proj", "ffn"), ("model.layers.0.self_attn.q_proj.lora_A.default", "lora"),
])
def test_roles_across_architectures(name, role):
    assert role_of(name) == role


def test_peft_wrappers_take_the_wrapped_layers_name():
    assert canonical_name("base_model.model.model.layers.0.mlp.down_proj.base_layer") == "model.layers.0.mlp.down_proj"
    assert canonical_name("model.layers.0.mlp.down_proj") == "model.layers.0.mlp.down_proj"


@pytest.mark.parametrize("model, expected", [
    ("gpt2-mini", {"bifrost": 8, "secureinfer": 2, "tee-only": 0}),
    ("llama-mini", {"bifrost": 14, "secureinfer": 2, "tee-only": 0}),
    ("minilm", {"bifrost": 36, "secureinfer": 6, "tee-only": 0}),
])
def test_shipped_policies_delegate_what_they_say(model, expected):
    net = load_model(resolve(model))
    for name, count in expected.items():
        layers = plan(net, load_placement_policy(name), model)
        assert sum(layer.placement == "ckks" for layer in layers) == count, name
        assert all(layer.placement == "tee" for layer in layers if layer.role == "head")


def test_the_policy_is_bound_into_the_serving_config_digest(run_config):
    from bifrost.serve.config import load_serve_config, serving_config, serving_config_digest

    scfg = load_serve_config()
    digests = {p: serving_config_digest(run_config.replace(policy=p), scfg) for p in ("bifrost", "secureinfer", "tee-only")}
    assert len(set(digests.values())) == 3
    assert serving_config(run_config, scfg)["policy_digest"] == load_placement_policy("bifrost").digest()


@pytest.mark.parametrize("name", ["distilbert.transformer.layer.0.attention.q_lin",
                                  "deberta.encoder.layer.0.attention.self.query_proj",
                                  "model.layers.0.self_attn.kv_a_proj_with_mqa"])
def test_more_query_key_value_names(name):
    assert role_of(name) == "attention_qkv"


def test_adapter_material_never_goes_to_the_worker(gpt2):
    assert role_of("transformer.h.0.mlp.c_fc.modules_to_save.default") == "lora"
    assert role_of("transformer.h.0.mlp.c_fc.original_module") == "lora"
    with pytest.raises(BifrostError, match="lora stays in the TEE"):
        policy_from_mapping({"rules": [{"role": "lora", "placement": "ckks"}]}, "p")
    everything = policy_from_mapping({"rules": [{"role": "all", "placement": "ckks"}]}, "p")
    assert {layer.placement for layer in plan(gpt2, everything) if layer.role in ("head", "lora")} == {"tee"}
