"""The delegated layers of bifrost/tee/runtime.py: which modules swap_in_delegates replaces, what a DelegatedLinear does with and without a
session's engine, and bypassed_sites on a model that reads a delegated layer's weight directly."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bifrost.model.catalog import load_model, resolve
from bifrost.model.delegation import is_linear, linear_weight, weight_digest
from bifrost.model.placement import load_placement_policy, plan
from bifrost.tee.runtime import DelegatedLinear, bypassed_sites, swap_in_delegates, using_engine
from bifrost.tee.pool import WorkerSessions
from bifrost.tee.runtime import TrustedRuntime

MODEL = "gpt2-mini"


def gpt2_mini(seed=0):
    return load_model(resolve(MODEL), seed)


@pytest.mark.parametrize("policy_name", ["bifrost", "secureinfer", "tee-only"])
def test_swap_replaces_exactly_the_policys_delegated_linears(policy_name):
    """Every linear the policy places ``ckks`` becomes a DelegatedLinear holding the same (d_out, d_in) weight, bias
    and digest; every other linear (the LM head included) is the original module, untouched."""
    model, original = gpt2_mini(), gpt2_mini()
    policy = load_placement_policy(policy_name)
    placements = {layer.module_path: layer for layer in plan(original, policy, MODEL)}
    sites = swap_in_delegates(model, policy, MODEL)

    delegated = [p for p, layer in placements.items() if layer.placement == "ckks"]
    assert [s.name for s in sites] == [placements[p].name for p in delegated]  # model order, canonical names
    swapped = {path for path, m in model.named_modules() if isinstance(m, DelegatedLinear)}
    assert swapped == set(delegated)
    expected = {"bifrost": 8, "secureinfer": 2, "tee-only": 0}[policy_name]  # 2 blocks × (4 | attn.c_proj | none)
    assert len(sites) == expected
    for path, layer in placements.items():
        new, old = model.get_submodule(path), original.get_submodule(path)
        if layer.placement == "ckks":
            site = new.site
            w = linear_weight(old)
            assert (site.d_in, site.d_out) == (w.shape[1], w.shape[0]) == (new.in_features, new.out_features)
            assert site.digest == weight_digest(w)
            assert torch.equal(new.weight, torch.from_numpy(w).float())
            assert torch.equal(new.bias, old.bias)
        else:
            assert is_linear(new) and not isinstance(new, DelegatedLinear)
            assert torch.equal(new.weight, old.weight)
    assert not isinstance(model.lm_head, DelegatedLinear)


def test_a_delegated_layer_outside_a_session_raises():
    """Without a session's engine (outside using_engine / TrustedRuntime.forward) a delegated layer refuses to run,
    naming itself, rather than compute anything; inside a plaintext engine it runs; afterwards it refuses again."""
    model = gpt2_mini()
    swap_in_delegates(model, load_placement_policy("bifrost"), MODEL)
    layer = model.transformer.h[0].mlp.c_fc
    x = torch.randn(1, 2, 64)
    with pytest.raises(RuntimeError, match=r"transformer\.h\.0\.mlp\.c_fc ran outside TrustedRuntime\.forward"):
        layer(x)
    with pytest.raises(RuntimeError, match="no engine"):
        model(input_ids=torch.tensor([[1, 2]]))

    class Plaintext:
        local_linears = True

    with using_engine(Plaintext()):
        y = layer(x)
    assert torch.allclose(y, torch.nn.functional.linear(x, layer.weight, layer.bias))
    with pytest.raises(RuntimeError, match="no engine"):
        layer(x)


def test_a_delegated_layer_inside_a_session_goes_through_its_engine(run_config, worker_factory):
    """Inside using_engine(engine) a DelegatedLinear sends its product to the worker (one engine call), keeps the
    input's leading shape and dtype, and adds its bias after decryption: y ≈ x·Wᵀ + b."""
    _, _, endpoint = worker_factory(MODEL)
    rt = TrustedRuntime(run_config.replace(model=MODEL), None)
    engine = rt.new_engine(WorkerSessions.from_endpoints([endpoint], timeout_s=30))
    try:
        layer = rt.model.transformer.h[1].attn.c_proj
        assert isinstance(layer, DelegatedLinear) and layer.bias is not None
        layer.bias.copy_(torch.linspace(-1, 1, 64))  # public, added here after decryption (random init has zeros)
        x = torch.randn(2, 3, 64)
        with using_engine(engine):
            y = layer(x)
        assert y.shape == (2, 3, 64) and y.dtype == x.dtype
        assert engine.stats.calls == 1 and engine.stats.groups[("transformer.h.1.attn.c_proj",)].rows == 6
        want = torch.nn.functional.linear(x, layer.weight, layer.bias)
        assert torch.allclose(y, want, atol=1e-3)
        assert not torch.allclose(y, torch.nn.functional.linear(x, layer.weight), atol=1e-3)  # the bias is in
    finally:
        engine.close()
        rt.close()


class _Mlp(torch.nn.Module):
    def __init__(self, bypass: bool) -> None:
        super().__init__()
        self.bypass = bypass
        self.fc = torch.nn.Linear(8, 16)
        self.proj = torch.nn.Linear(16, 8)

    def forward(self, x):
        h = torch.relu(self.fc(x))
        if self.bypass:  # reads the layer's weight itself, as BLOOM's slow_but_exact path does: the module never runs
            return torch.nn.functional.linear(h, self.proj.weight, self.proj.bias)
        return self.proj(h)


class _Tiny(torch.nn.Module):
    """Embedding, two blocks (h.0, h.1: an MLP each), LM head; block ``bypassed_block`` reads its proj's weight."""

    def __init__(self, bypassed_block: int | None) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(10, 8)
        self.h = torch.nn.ModuleList([_Mlp(i == bypassed_block) for i in range(2)])
        self.lm_head = torch.nn.Linear(8, 10)

    def forward(self, input_ids, use_cache=False, attention_mask=None):
        x = self.embed(input_ids)
        for block in self.h:
            x = x + block(x)
        return self.lm_head(x)


@pytest.mark.parametrize("task", ["causal-lm", "encoder"])
def test_bypassed_sites_finds_a_layer_whose_weight_the_model_reads_directly(task):
    torch.manual_seed(0)
    model = _Tiny(bypassed_block=1)
    sites = swap_in_delegates(model, load_placement_policy("bifrost"), "tiny")
    assert [s.name for s in sites] == ["h.0.fc", "h.0.proj", "h.1.fc", "h.1.proj"]  # the head stays in the TEE
    assert bypassed_sites(model, sites, task) == ["h.1.proj"]
    honest = _Tiny(bypassed_block=None)
    honest_sites = swap_in_delegates(honest, load_placement_policy("bifrost"), "tiny")
    assert bypassed_sites(honest, honest_sites, task) == []
    assert bypassed_sites(model, [], task) == []
    # the probe leaves no hook behind: a later forward outside a session still refuses
    with pytest.raises(RuntimeError, match="no engine"):
        model(input_ids=torch.tensor([[1, 2, 3]]))


def test_weights_are_kept_as_float32_copies():
    """The trusted copy is float32 (d_out, d_in) and not the original parameter: editing the original model's
    weight afterwards changes nothing in the delegated layer."""
    model = gpt2_mini()
    conv = model.transformer.h[0].mlp.c_fc
    w_before = np.array(linear_weight(conv))
    swap_in_delegates(model, load_placement_policy("bifrost"), MODEL)
    layer = model.transformer.h[0].mlp.c_fc
    assert layer.weight.dtype == torch.float32 and tuple(layer.weight.shape) == (256, 64)
    with torch.no_grad():
        conv.weight.add_(1.0)
    assert np.array_equal(layer.weight.numpy(), w_before.astype(np.float32))
