"""Every shipped placement policy serves tokens equal to plaintext, every delegated layer is verified, and the
worker holds exactly the delegated weights; LoRA adapters run in the TEE on a delegated base model."""

from __future__ import annotations

import pytest
import torch

from bifrost.config_loader import placement_of
from bifrost.errors import BifrostError
from bifrost.tee.runtime import TrustedRuntime

from tests.lora_adapters import make_adapter

STEPS = 12


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    return {m: str(make_adapter(m, 7, root / m)) for m in ("gpt2-mini", "llama-mini")}


def _worker(run_config, model, policy):
    """A real worker serving what ``policy`` delegates (no more: the TEE layers' weights are not on it)."""
    from tests.workers import start_worker

    service, server, endpoint = start_worker(run_config.replace(policy=policy), model)
    return service, server, endpoint


def _run(run_config, model, policy, adapter=None, mode="bifrost"):
    import dataclasses

    cfg = run_config.replace(model=model, policy=policy, adapter=adapter,
                             generation=dataclasses.replace(run_config.generation, mode=mode))
    server = None
    endpoint = None
    served = set()
    if not placement_of(cfg).delegates_nothing:
        service, server, endpoint = _worker(run_config, model, policy)
        served = set(service.layers)  # what the worker serves: name -> (site, weight)
    rt = TrustedRuntime(cfg, endpoint, reference=True)
    try:
        result = rt.generate("Placement", STEPS)
    finally:
        rt.close()
        if server is not None:
            server.stop(grace=None)
    return rt, result, served


def _check_verified_and_exact(rt, result, served):
    f = result.fidelity
    assert result.tokens == f.plaintext_tokens and f.agreeing_steps == STEPS
    assert f.max_abs_logit_error < 1e-3
    sites = {s.name for s in rt.sites}
    assert served == sites  # the worker holds exactly the delegated layers' weights
    if not sites:
        assert rt.engine is None and all(t.calls == 0 for t in result.timings)
        return
    stats = rt.engine.stats
    assert set(stats.groups) == set(rt.groups)  # every delegated layer group was called...
    assert all(g.calls == STEPS for g in stats.groups.values())  # once per token (prompt batched)
    # ... and every product checked: every row sent (padding included) x members (x vectors: tolerance), no deviation
    k = 1 if rt.engine.exact else rt.cfg.verification.vectors
    assert stats.checks == sum(len(g) * k * stats.groups[g].rows for g in rt.groups)
    assert sum(stats.groups[g].rows for g in rt.groups) >= len(rt.groups) * (len(result.prompt_ids) + STEPS - 1)
    assert stats.deviations == 0 and stats.local_calls == 0


@pytest.mark.parametrize("policy, delegated", [("bifrost", 8), ("secureinfer", 2), ("tee-only", 0)])
def test_shipped_policies_on_gpt2_equal_plaintext_and_verify_every_delegated_layer(run_config, policy, delegated):
    rt, result, served = _run(run_config, "gpt2-mini", policy)
    assert len(rt.sites) == delegated
    assert [t.calls for t in result.timings] == [len(rt.groups)] * STEPS
    _check_verified_and_exact(rt, result, served)


@pytest.mark.parametrize("model", ["gpt2-mini", "llama-mini"])
def test_lora_private_runs_the_adapter_in_the_tee_and_equals_the_merged_model(run_config, adapters, model):
    rt, result, served = _run(run_config, model, "lora-private", adapters[model])
    lora = [layer for layer in rt.layers if layer.role == "lora"]
    assert lora and all(layer.placement == "tee" for layer in lora)
    assert not any("lora" in s.name or "base_layer" in s.name for s in rt.sites)  # base names, as the worker has them
    _check_verified_and_exact(rt, result, served)  # greedy tokens = the plaintext *merged* model's


def test_the_adapter_changes_the_tokens(run_config, adapters):
    """(So that the equality above says something: the merged model differs from the base model.)"""
    from bifrost.model.catalog import load_model, resolve
    from bifrost.tee.runtime import plaintext_greedy_tokens

    spec = resolve("llama-mini")
    ids = list(range(300, 310))
    base = plaintext_greedy_tokens(load_model(spec, run_config.seed), ids, STEPS)
    merged = plaintext_greedy_tokens(load_model(spec, run_config.seed, adapters["llama-mini"], merged=True), ids, STEPS)
    assert base != merged


def test_secureinfer_with_an_adapter_keeps_lora_qkv_and_ffn_in_the_tee(run_config, adapters):
    rt, result, served = _run(run_config, "llama-mini", "secureinfer", adapters["llama-mini"], mode="bifrost+")
    assert {layer.role for layer in rt.layers if layer.placement == "ckks"} == {"attention_out"}
    assert len(rt.sites) == 2  # o_proj of each of the 2 blocks
    f = result.fidelity
    assert result.tokens == f.plaintext_tokens and f.max_abs_logit_error < 1e-3
    assert served == {s.name for s in rt.sites}


def test_a_layer_the_model_code_bypasses_is_refused_at_load():
    """BLOOM with pretraining_tp > 1 and slow_but_exact multiplies by ``self_attention.dense.weight`` and
    ``mlp.dense_4h_to_h.weight`` directly (half its layers): a probe forward finds them never called."""
    from transformers import BloomConfig, BloomForCausalLM

    from bifrost.model.placement import load_placement_policy
    from bifrost.tee.runtime import bypassed_sites, swap_in_delegates

    torch.manual_seed(0)
    cfg = BloomConfig(vocab_size=300, hidden_size=32, n_layer=2, n_head=4, pretraining_tp=2, slow_but_exact=True)
    model = BloomForCausalLM(cfg).eval()
    sites = swap_in_delegates(model, load_placement_policy("bifrost"), "tiny-bloom")
    bypassed = bypassed_sites(model, sites, "causal-lm")
    expected = [s.name for s in sites if s.name.endswith(("self_attention.dense", "mlp.dense_4h_to_h"))]
    assert bypassed == expected and len(bypassed) == 4 and len(sites) == 8
    honest = BloomForCausalLM(BloomConfig(vocab_size=300, hidden_size=32, n_layer=2, n_head=4)).eval()
    assert bypassed_sites(honest, swap_in_delegates(honest, load_placement_policy("bifrost")), "causal-lm") == []


def test_lora_private_without_an_adapter_is_a_one_line_error(run_config):
    with pytest.raises(BifrostError, match="requires a LoRA adapter"):
        TrustedRuntime(run_config.replace(model="gpt2-mini", policy="lora-private"), None)


def test_the_adapter_digest_is_bound_into_the_serving_config_digest(run_config, adapters):
    from bifrost.attest.binding import compute_model_digest
    from bifrost.serve.config import load_serve_config, serving_config, serving_config_digest

    scfg = load_serve_config()
    with_adapter = run_config.replace(model="llama-mini", policy="lora-private", adapter=adapters["llama-mini"])
    assert serving_config(with_adapter, scfg)["adapter_digest"] == compute_model_digest(adapters["llama-mini"]).hex()
    other = with_adapter.replace(adapter=adapters["gpt2-mini"])
    assert serving_config_digest(with_adapter, scfg) != serving_config_digest(other, scfg)
    assert serving_config(run_config, scfg)["adapter_digest"] is None


def test_a_checkpoint_whose_code_bypasses_delegated_layers_is_refused_by_the_runtime(run_config, tmp_path):
    from tests.checkpoints import build_checkpoint

    path = build_checkpoint("bloom_tp2", tmp_path)
    with pytest.raises(BifrostError, match=r"never calls 4 layer\(s\) the policy delegates") as err:
        TrustedRuntime(run_config.replace(model=str(path)), None)
    assert "\n" not in str(err.value)
    # placing the bypassed layers in the TEE, as the message says, loads it with true counts
    keep = tmp_path / "keep.yaml"
    keep.write_text("rules:\n  - {match: ['*.self_attention.dense', '*.mlp.dense_4h_to_h'], placement: tee}\n"
                    "  - {role: all, placement: ckks}\n")
    rt = TrustedRuntime(run_config.replace(model=str(path), policy=str(keep)), None)
    assert len(rt.sites) == 4 and not any(s.name.endswith(("self_attention.dense", "dense_4h_to_h")) for s in rt.sites)
    rt.close()
