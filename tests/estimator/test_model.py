"""The cost model's counts: Euston's recipes, level bookkeeping, the native plan, call splitting."""

import dataclasses

import pytest

import numpy as np

from bifrost.ckks import GroupShape
from bifrost.ckks.registry import get_backend
from bifrost_estimator.model import (FHEAlgorithms, accelerator_seconds, call_rows, coeff_counts, column_counts,
                                     delegated_calls, estimate, exact_call_bytes, forward_bifrost, forward_fhe,
                                     rows_per_call)
from bifrost_estimator.profile import CKKSOps, load_profile
from bifrost_estimator.shapes import LinearGroup, load_shape


@pytest.fixture(scope="module")
def gpu():
    return load_profile("gpu-published")


def test_euston_recipe_depths():
    alg = FHEAlgorithms()
    assert alg.exp().depth == 4  # cipher_exp_5: r + 3 levels, r = 1
    assert alg.softmax()[1].depth == 10  # Euston's softmax context has 10 levels
    assert alg.norm(768, True)[1].depth == 9  # ... its LayerNorm context 9
    assert alg.norm(768, True)[0].adds == 768 + 1  # sum_j (x_i - x_j): d subtractions per column
    assert alg.activation(False).depth == 37 and alg.activation(False).mults == 57


def test_fewer_levels_after_bootstrapping_means_more_bootstraps(gpu):
    shape = load_shape("gpt2")
    fewer = dataclasses.replace(gpu, fhe=dataclasses.replace(gpu.fhe, deep=dataclasses.replace(gpu.fhe.deep,
                                                                                                 usable_levels=4)))
    a = forward_fhe(gpu, shape, 128, 128, 32, FHEAlgorithms()).counts()["bootstrap"]
    b = forward_fhe(fewer, shape, 128, 128, 32, FHEAlgorithms()).counts()["bootstrap"]
    assert b > a > 0
    none = forward_fhe(gpu, shape, 128, 128, 32, FHEAlgorithms(bootstrapping=False)).counts()
    assert "bootstrap" not in none and "context switch" not in none


def test_fhe_linear_is_euston_column_packing(gpu):
    """d_in x d_out constant products per slots tokens, no rotation; amortised over the filled slots."""
    shape = load_shape("gpt2")
    cost = forward_fhe(gpu, shape, 128, 128, 32, FHEAlgorithms())
    mm = gpu.fhe.matmul
    per_layer_macs = sum(g.macs for g in shape.groups())
    tokens = 128 * 32
    expected = shape.n_layers * per_layer_macs * tokens / mm.slots * (mm.mul_plain_s + mm.add_s)
    assert cost.by("op")["linear (ct×pt)"] == pytest.approx(expected, rel=0.01)
    c = column_counts(mm.slots, LinearGroup("x", 768, (2304,)), tokens)
    assert (c.rotations, c.mul_plain, c.cts_in, c.cts_out) == (0, 768 * 2304, 768, 2304)


def test_native_counts_follow_the_kernel_planner(monkeypatch):
    """The estimator asks bifrost_kernels.layout.plan for the blocking instead of re-implementing it."""
    from bifrost_kernels import layout

    from bifrost_estimator.profile import CKKSOps

    ops = CKKSOps(2048, (30, 24), 0.0, 1.0, 0.0, 0.0)
    group = LinearGroup("x", 768, (768,))
    before = coeff_counts(ops, group, 8)
    assert before.cts_in == 8 * layout.plan(2048, (30, 24), 768, (768,), 8).in_blocks(768)
    monkeypatch.setattr(layout, "plan", lambda n, bits, d_in, d_outs, rows: layout.Blocking(n, 4, 16, 32))
    after = coeff_counts(ops, group, 8)
    assert (after.row_blocks, after.cts_in, after.cts_out) == (2, 2 * 48, 2 * 24)


def test_native_counts_calls_and_bytes_match_the_real_backend():
    """Rows per call, the one-row-per-ciphertext blocking, ciphertext counts and exact wire bytes agree with
    what the native backend does for short and long prompts (its own rows_per_call, encrypt and apply)."""
    from bifrost_kernels.backend import ROWS_PER_FFT_CALL
    from bifrost_kernels.layout import plan

    backend = get_backend("native")
    prm = backend.default_params
    ctx = backend.keygen(prm, [])
    ev = backend.evaluator(ctx.public_context())
    ops = CKKSOps(prm.poly_modulus_degree, tuple(prm.coeff_mod_bit_sizes), 0.0, 1.0, 0.0, 0.0)
    rng = np.random.default_rng(3)
    for d_in, d_outs, rows in [(64, (192,), 1), (64, (192,), 16), (64, (192,), 200), (64, (64, 64, 64), 150),
                               (768, (768,), 32), (768, (768,), 48), (768, (768,), 70), (768, (768,), 300), (3072, (768,), 5000)]:
        shape, g = GroupShape(d_in, d_outs), LinearGroup("x", d_in, d_outs)
        per_call = rows_per_call("native", ops, g, rows)
        assert per_call == backend.rows_per_call(prm, shape, rows) == ROWS_PER_FFT_CALL == 64
        r = min(rows, per_call)
        c = coeff_counts(ops, g, r)
        blk = plan(2048, (30, 24), d_in, d_outs, r)
        assert blk.rows_per_ct == 1 and c.row_blocks == r  # one row per ciphertext, whatever the prompt length
        assert (c.cts_in, c.cts_out) == (r * blk.in_blocks(d_in), r * sum(blk.out_blocks(d) for d in d_outs))
        # the ciphertexts the context and an evaluator really produce for one call
        batch = ctx.encrypt(shape, rng.normal(0, 1, (r, d_in)))
        sent, received = exact_call_bytes("native", ops, g, r)
        assert c.cts_in == len(batch.ciphertexts) and sent == sum(len(b) for b in batch.ciphertexts)
        if d_in * sum(d_outs) <= 64 * 192:
            outs = ev.apply(ev.prepare(shape, [rng.normal(0, 0.05, (d, d_in)) for d in d_outs]), batch.ciphertexts)
            assert c.cts_out == sum(len(o) for o in outs)
            assert received == sum(len(b) for o in outs for b in o)


def test_call_rows_pad_to_the_row_bucket_then_split_by_the_backend():
    """As DelegationEngine.run_group: zero rows up to row_bucket, then the backend's rows_per_call, each part
    planned again."""
    from bifrost.ckks import row_bucket

    prm = get_backend("native").default_params
    ops = CKKSOps(prm.poly_modulus_degree, tuple(prm.coeff_mod_bit_sizes), 0.0, 1.0, 0.0, 0.0)
    g, g_down = LinearGroup("x", 768, (768,)), LinearGroup("x", 3072, (768,))
    assert [row_bucket(r) for r in (1, 4, 5, 7, 33, 65, 80, 300, 5000)] == [1, 4, 6, 8, 48, 96, 96, 384, 6144]
    assert call_rows("native", ops, g, 32) == [32] and coeff_counts(ops, g, 32).row_blocks == 32  # one row per ct
    assert call_rows("native", ops, g, 5) == [6]
    assert call_rows("native", ops, g, 64) == [64]
    assert call_rows("native", ops, g_down, 80) == [64, 32]  # padded to 96, then calls of ROWS_PER_FFT_CALL
    assert call_rows("native", ops, g, 300) == [64] * 6  # 384 rows
    assert call_rows("native", ops, g, 5000) == [64] * 96  # 6144 rows
    assert call_rows("native", ops, g, 2049) == [64] * 48  # 3072 rows
    ts = CKKSOps(8192, (60, 40, 60), 1.0, 1.0, 0.0, 0.0)
    assert call_rows("tenseal", ts, g, 64) == [64]
    assert call_rows("tenseal", ts, g, 65) == [64, 32]  # 96 rows in calls of ROWS_PER_CALL = 64
    assert exact_call_bytes("tenseal", ts, g, 1) is None  # no exact sizes: the profile's medians


def test_long_prompt_calls_cost_as_many_one_row_blocks():
    """A long prompt's native calls are the one-row blocking at 64 rows: 64x a row's ciphertexts and block
    products, the same encoded weight blocks, and worker time growing with the rows."""
    prof = load_profile("local-2core")
    ops, g = prof.accelerator.linear, LinearGroup("x", 768, (768,))
    one, c = coeff_counts(ops, g, 1), coeff_counts(ops, g, 64)
    assert (c.row_blocks, c.cts_in, c.cts_out, c.mul_plain) == (64, 64 * one.cts_in, 64 * one.cts_out, 64 * one.mul_plain)
    assert c.weight_blocks == one.weight_blocks and c.rotations == c.rescales == 0
    assert 0 < accelerator_seconds(prof, one) < accelerator_seconds(prof, c)
    calls = delegated_calls(prof, g, 300)
    assert [k.rows for k in calls] == [64] * 6 and all(k.counts == c and k.exact_bytes for k in calls)


def test_long_prompts_go_in_several_calls(gpu):
    shape = load_shape("gpt2")
    cap = rows_per_call(gpu.accelerator.backend, gpu.accelerator.linear, shape.groups()[0], 10_000)
    one = forward_bifrost(gpu, shape, cap, cap, local_linears=False).counts()["transfer"]
    two = forward_bifrost(gpu, shape, cap + 1, cap + 1, local_linears=False)
    calls = sum(1 for t in two.terms if t.op == "transfer")
    assert calls == 2 * len(shape.groups())
    assert two.counts()["transfer"] > one


def test_column_packing_what_if_matches_fhe_linear_counts(gpu):
    shape = load_shape("gpt2-xl")
    b = estimate(gpu, shape, "bifrost", 128, 2, batch=32, layers_only=True, linear_packing="column")
    f = estimate(gpu, shape, "fhe", 128, 2, batch=32, layers_only=True)
    # same products per token in both; Bifrost adds only per-ciphertext load/dump and call overheads
    assert b.prefill.counts()["linear (CKKS)"] == pytest.approx(f.prefill.counts()["linear (ct×pt)"], rel=1e-6)
