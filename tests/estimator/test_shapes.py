"""Operation counts from model configs, against hand-computed MACs and the runtime's own site list."""

import pytest

from bifrost.config_loader import placement_of
from bifrost_estimator.model import bsgs_counts
from bifrost_estimator.shapes import LinearGroup, load_shape


def test_gpt2_124m_macs_per_token_by_hand():
    s = load_shape("gpt2")
    assert s.linear_macs_per_token() == 12 * (768 * 2304 + 768 * 768 + 768 * 3072 + 3072 * 768)
    assert s.linear_macs_per_token() == pytest.approx(85e6, rel=0.01)
    assert s.lm_head_macs_per_token() == 50257 * 768


def test_qwen3_and_llama_macs_by_hand():
    q = load_shape("qwen3-0.6b")  # q 1024->2048, k,v 1024->1024, o 2048->1024, gate/up 1024->3072, down 3072->1024
    per_layer = 1024 * (2048 + 1024 + 1024) + 2048 * 1024 + 1024 * 3072 * 2 + 3072 * 1024
    assert q.linear_macs_per_token() == 28 * per_layer
    assert q.linear_macs_per_token() == pytest.approx(440e6, rel=0.01)
    ll = load_shape("llama3-8b")
    per_layer = 4096 * (4096 + 1024 + 1024) + 4096 * 4096 + 4096 * 14336 * 3
    assert ll.linear_macs_per_token() == 32 * per_layer
    x = load_shape("gpt2-xl")
    assert (x.d_model, x.n_heads, x.d_ff, x.n_layers) == (1600, 25, 6400, 48)


@pytest.mark.parametrize("model", ["gpt2-mini", "qwen3-mini", "llama-mini"])
def test_groups_match_the_runtime_delegation(model, run_config):
    from bifrost.model.catalog import load_model, resolve
    from bifrost.model.delegation import fuse_groups, sites

    net = load_model(resolve(model), 0)
    found = sites(net, placement_of(run_config))
    by_name = {s.name: s for s, _ in found}
    groups = fuse_groups([s.name for s, _ in found], run_config.delegation)
    runtime = sorted((by_name[g[0]].d_in, tuple(by_name[n].d_out for n in g)) for g in groups)
    shape = load_shape(model)
    ours = sorted((g.d_in, g.d_outs) for g in shape.groups() for _ in range(shape.n_layers))
    assert ours == runtime


def test_bsgs_counts_match_the_tenseal_plan_by_hand():
    # 768 -> 768 at 4096 slots: one input chunk, a = 768, b = 28, G = 28, 2 rows per ciphertext
    c = bsgs_counts(4096, LinearGroup("x", 768, (768,)), 1)
    assert (c.rotations, c.mul_plain, c.cts_in, c.cts_out) == (27 + 27, 768, 1, 1)
    c = bsgs_counts(4096, LinearGroup("x", 768, (768,)), 3)  # 2 ciphertext groups
    assert (c.rotations, c.cts_in, c.cts_out) == (2 * 54, 2, 2)
    c = bsgs_counts(4096, LinearGroup("x", 3072, (768,)), 1)  # b = 56, G = 55
    assert c.rotations == 55 + 54 and c.mul_plain == 3072


def test_config_json_and_unknown_model(tmp_path):
    from bifrost.errors import BifrostError

    (tmp_path / "config.json").write_text('{"model_type": "llama", "hidden_size": 256, "intermediate_size": 512, '
                                          '"num_hidden_layers": 3, "num_attention_heads": 4, "vocab_size": 1000}')
    s = load_shape(str(tmp_path))
    assert (s.n_layers, s.n_kv_heads, s.head_dim) == (3, 4, 64)
    with pytest.raises(BifrostError, match="unknown model"):
        load_shape("no-such-model")
    (tmp_path / "config.json").write_text('{"model_type": "t5"}')
    with pytest.raises(BifrostError, match="not supported"):
        load_shape(str(tmp_path / "config.json"))
