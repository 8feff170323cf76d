"""Encrypted linear layers match a float64 reference within the documented bound, for every shape."""

import numpy as np
import pytest
import torch

from bifrost.ckks import GroupShape, csprng
from bifrost_kernels.backend import NativeBackend

from .kernels_testlib import error_bound, error_ratio, gpt2_like, run_layer, stats

# (d_in, d_out): GPT-2 124M and Qwen3-0.6B linear layers.
GPT2 = [(768, 768), (768, 2304), (768, 3072), (3072, 768)]
QWEN3 = [(1024, 2048), (1024, 1024), (2048, 1024), (1024, 3072), (3072, 1024)]


@pytest.mark.parametrize("d_in,d_out", GPT2 + QWEN3)
def test_every_model_shape_within_bound(context, evaluator, d_in, d_out):
    rng = np.random.default_rng(d_in * 7 + d_out)
    w = rng.normal(0, rng.uniform(0.02, 0.1), (d_out, d_in))
    x = gpt2_like(rng, 1, d_in)
    shape = GroupShape(d_in, (d_out,))
    (y,), batch, _ = run_layer(context, evaluator, shape, [w], x)
    ref = x @ w.T
    assert error_ratio(context, shape, batch, [w], x, [y]) < 1  # the documented worst case
    assert (np.abs(y - ref) <= error_bound(evaluator.weight_bits, x, w)).all()  # its leading term, even
    assert np.sqrt(np.mean((y - ref) ** 2) / np.mean(ref ** 2)) < 2.0 ** -10


def test_identity_roundtrip_is_encrypt_decrypt(context, evaluator):
    rng = np.random.default_rng(5)
    x = rng.normal(0, 3, (2, 300))
    (y,), _, _ = run_layer(context, evaluator, GroupShape(300, (300,)), [np.eye(300)], x)
    # identity weights quantise exactly: what remains is activation rounding and encryption noise
    assert np.abs(y - x).max() <= 2.0 ** -17 * np.abs(x).sum(1).max()


@pytest.mark.parametrize("rows", [2, 7, 64])
def test_many_rows_share_one_weight_encoding(context, evaluator, rows):
    rng = np.random.default_rng(rows)
    shape = GroupShape(768, (768,))
    w = rng.normal(0, 0.05, (768, 768))
    x = gpt2_like(rng, rows, 768)
    prepared = evaluator.prepare(shape, [w])
    batch = context.encrypt(shape, x)
    (y,) = context.decrypt(shape, evaluator.apply(prepared, batch.ciphertexts), batch, stats([w]))
    evaluator.apply(prepared, context.encrypt(shape, x[:1]).ciphertexts)  # a decode step after the prompt
    assert np.all(np.abs(y - x @ w.T) <= error_bound(evaluator.weight_bits, x, w))
    # One row per ciphertext: prompt and decode reuse the single weight encoding prepared once
    # (row-packed blockings multiplied encoded-weight memory by the rows per ciphertext).
    single = len(context.encrypt(shape, x[:1]).ciphertexts)
    assert len(batch.ciphertexts) == rows * single
    assert len(prepared.cache) == 1


def test_group_shares_one_input(context, evaluator):
    rng = np.random.default_rng(9)
    shape = GroupShape(768, (768, 256, 768))
    ws = [rng.normal(0, 0.05, (d, 768)) for d in shape.d_outs]
    x = gpt2_like(rng, 3, 768)
    ys, batch, out = run_layer(context, evaluator, shape, ws, x)
    assert error_ratio(context, shape, batch, ws, x, ys) < 1
    assert len(out) == 3
    for y, w in zip(ys, ws):
        assert y.shape == (3, w.shape[0])
        assert np.all(np.abs(y - x @ w.T) <= error_bound(evaluator.weight_bits, x, w))


@pytest.mark.parametrize("magnitude", [1e-6, 1.0, 3e4])
def test_scaling_adapts_to_activation_range(context, evaluator, magnitude):
    rng = np.random.default_rng(11)
    w = rng.normal(0, 0.05, (64, 200))
    x = rng.normal(0, magnitude, (3, 200))
    x[1] = 0.0  # an all-zero row decodes to zero
    (y,), _, _ = run_layer(context, evaluator, GroupShape(200, (64,)), [w], x)
    assert np.all(np.abs(y - x @ w.T) <= error_bound(evaluator.weight_bits, x, w))
    assert (y[1] == 0).all()


def test_adversarial_worst_case_does_not_wrap(context, evaluator):
    """All mass on aligned signs: |y| reaches ‖x‖₁·max|W| exactly, the encoding's worst case."""
    w = np.full((16, 512), 0.1)
    x = np.full((1, 512), 250.0)
    (y,), _, _ = run_layer(context, evaluator, GroupShape(512, (16,)), [w], x)
    assert np.allclose(y, x @ w.T, rtol=2.0 ** -12)


def test_ntt_product_matches_fft_product_bit_for_bit(backend, context, device):
    shape = GroupShape(256, (96, 40))
    rng = np.random.default_rng(12)
    ws = [rng.normal(0, 0.05, (d, 256)) for d in shape.d_outs]
    batch = context.encrypt(shape, gpt2_like(rng, 2, 256))
    outs = []
    for polymul in ("fft", "ntt"):
        ev = backend.evaluator(context.public_context(), device=device, polymul=polymul)
        outs.append(ev.apply(ev.prepare(shape, ws), batch.ciphertexts))
    assert outs[0] == outs[1]


def test_encryption_known_answer(context, monkeypatch):
    """With s = 1 and s = X, the mask e − a_b·s (c_0 = m + mask) has a closed form; checks the trusted-side
    arithmetic: the public masks a_b (from the process's mask seed), the call's secret and its errors."""
    from bifrost_kernels import backend as native

    n, primes = 2048, context._codec.primes
    a = context._public.polys(2)                                           # [B, L, N]
    assert (a == csprng.expand_uniform_many(native.MASK_SEED, np.arange(2), primes, n)).all()
    err = np.zeros((1, 2, 1, n), dtype=np.int64)
    err[0, 1, 0, 5] = 3
    monkeypatch.setattr(csprng, "centered_binomial", lambda shape: err)
    for secret, a_s in [(np.eye(1, n, 0, dtype=np.int64)[0], a),
                        (np.eye(1, n, 1, dtype=np.int64)[0], np.concatenate([-a[..., -1:], a[..., :-1]], axis=-1))]:
        monkeypatch.setattr(csprng, "ternary_secret", lambda size, s=secret: s)
        secrets, masks = context._fresh_masks(1, 2)
        want = np.mod(err[0, :, :, :] - a_s, np.array(primes)[None, :, None])
        assert (secrets[0] == secret).all() and (masks == want).all()


def test_prefetched_masks_are_used_once_and_decrypt(context):
    """prefetch() prepares the next encryption's secret and masks; encrypt takes them (once: the next call
    draws fresh ones) and the result decrypts as an inline encryption does."""
    from bifrost.ckks.backend import WeightStats
    from bifrost_kernels import wire
    from bifrost_kernels.backend import NativeEvaluator

    shape = GroupShape(64, (48,))
    rng = np.random.default_rng(3)  # test data, not key material
    w, x = rng.standard_normal((48, 64)), rng.standard_normal((1, 64))
    ev = NativeEvaluator(context.public_context(), device="cpu")
    prepared = ev.prepare(shape, [w])
    context.prefetch(shape, 1)
    ((rb_count, b_count), pending), = context._masks.items()
    secrets, _ = pending.result()
    first = context.encrypt(shape, x)
    second = context.encrypt(shape, x)  # nothing prefetched: fresh, inline
    assert not context._masks
    assert first.state.secrets is secrets and len(first.ciphertexts) == rb_count * b_count
    assert not np.array_equal(second.state.secrets, secrets)
    plen = context._codec.input_payload_len()
    calls = {wire.decode_input(ct, context._codec.context_id, plen)[0].call_id for ct in first.ciphertexts}
    assert calls == {first.state.call_id} != {second.state.call_id}
    for batch in (first, second):
        y, = context.decrypt(shape, ev.apply(prepared, batch.ciphertexts), batch, [WeightStats.of(w)])
        assert np.abs(y - x @ w.T).max() <= context.error_bound(shape, batch, [WeightStats.of(w)]).max()


@pytest.mark.parametrize("d_in,d_outs", [(64, (48,)), (300, (128, 40))])
def test_mask_products_equal_the_ntt_reference(context, d_in, d_outs):
    """The trusted side's per-group constant Σ_b a_b·W_{b,o} (kept as centred residues) equals the exact product
    of the public masks with the worker's integer weights, computed by the NTT reference."""
    from bifrost_kernels import linear
    from bifrost_kernels.backend import _centred, integer_weights

    shape = GroupShape(d_in, d_outs)
    rng = np.random.default_rng(5)  # test data
    ws = [rng.normal(0, 0.1, (d, d_in)) for d in d_outs]
    blk = context._codec.blocking(shape, 1)
    c1 = context._mask_products(shape, blk, [w for w in ws])
    ints = [torch.from_numpy(integer_weights(context.weight_bits, w)) for w in ws]
    primes = context._codec.primes
    enc = linear.encode_weights(blk, ints, d_in, primes, "ntt")
    a = torch.from_numpy(context._public.polys(blk.in_blocks(d_in)))[None]
    want = _centred(linear.apply_ntt(enc, a, primes, None)[0], primes)               # [ΣO, L, N]
    assert torch.equal(c1, want.reshape(-1, 2048))
    assert context._mask_products(shape, blk, ws) is c1  # cached while the matrices live


def test_every_row_block_of_a_call_has_its_own_secret(context, evaluator):
    """Row blocks share the public masks a_b, so two of them under one secret would reveal m − m' from c_0 − c_0':
    each row block (and each call) draws a fresh secret."""
    shape = GroupShape(96, (32,))
    rng = np.random.default_rng(6)
    w = rng.normal(0, 0.1, (32, 96))
    x = rng.normal(0, 1, (5, 96))
    (y,), batch, _ = run_layer(context, evaluator, shape, [w], x)
    secrets = batch.state.secrets
    assert secrets.shape == (5, 2048) and len({s.tobytes() for s in secrets}) == 5
    assert set(np.unique(secrets)) <= {-1, 0, 1}
    again = context.encrypt(shape, x)
    assert not any(np.array_equal(s, t) for s in secrets for t in again.state.secrets)
    assert error_ratio(context, shape, batch, [w], x, [y]) < 1


def test_masks_are_prepared_at_the_lowest_priority():
    """The preparing thread only takes idle cores (Linux: per-thread nice 19), so a worker on the same
    machine keeps its share."""
    import os
    import threading

    from bifrost_kernels import backend as native

    nice = native._PREFETCH.submit(lambda: os.getpriority(os.PRIO_PROCESS, threading.get_native_id())).result()
    assert nice == native.PREFETCH_NICE == 19  # (whatever the process's own nice value: it is never raised)


def test_prefetch_skips_calls_over_its_memory_cap(context, monkeypatch):
    from bifrost_kernels import backend as native

    monkeypatch.setattr(native, "PREFETCH_MAX_BYTES", 1)
    context.prefetch(GroupShape(64, (48,)), 1)
    assert not context._masks


def test_no_weak_rng_is_used(monkeypatch):
    """Keys, errors and seeds come from os.urandom and AES-256-CTR (cryptography) only."""
    def forbidden(*a, **k):
        raise AssertionError("non-cryptographic RNG used")
    for name in ("rand", "randn", "randint", "randperm", "normal", "bernoulli", "multinomial"):
        monkeypatch.setattr(torch, name, forbidden)
    for name in ("default_rng", "rand", "randn", "randint", "random", "choice", "normal", "uniform", "seed"):
        monkeypatch.setattr(np.random, name, forbidden)
    ctx = NativeBackend().keygen(None, [])
    ctx.encrypt(GroupShape(16, (4,)), np.ones((1, 16)))
    assert csprng.ternary_secret(8).shape == (8,)


def test_long_prompts_go_one_row_per_ciphertext_within_bound(backend, context, evaluator):
    """Any number of rows uses the decode blocking (one weight encoding, one mask product per group); the
    engine splits long prompts into calls of ``rows_per_call`` rows."""
    rng = np.random.default_rng(21)
    shape = GroupShape(768, (768, 256))
    ws = [rng.normal(0, 0.05, (d, 768)) for d in shape.d_outs]
    x = gpt2_like(rng, 70, 768)
    prepared = evaluator.prepare(shape, ws)
    batch = context.encrypt(shape, x)
    out = evaluator.apply(prepared, batch.ciphertexts)
    ys = context.decrypt(shape, out, batch, stats(ws))
    assert context._codec.blocking(shape, 70) == context._codec.blocking(shape, 1)
    assert error_ratio(context, shape, batch, ws, x, ys) < 1
    assert len(prepared.cache) == 1
    for y, w in zip(ys, ws):
        assert np.all(np.abs(y - x @ w.T) <= error_bound(evaluator.weight_bits, x, w))
    params = context.params
    assert backend.rows_per_call(params, shape, 300) == backend.rows_per_call(params, shape, 5000) == 64


def test_decoding_takes_nothing_from_the_worker_headers(context, evaluator):
    """Output headers carry no scale (version 3), and a reply is tied to its call: outputs of another call
    (same shape, same session) or with a rewritten row count are refused before anything is decoded."""
    from bifrost.ckks import CiphertextError
    from bifrost_kernels import wire

    assert "d" not in wire._OUT_HEAD.format and "d" not in wire._IN_HEAD.format  # no float field at all
    rng = np.random.default_rng(23)
    shape = GroupShape(256, (64,))
    w = rng.normal(0, 0.05, (64, 256))
    prepared = evaluator.prepare(shape, [w])
    first = context.encrypt(shape, gpt2_like(rng, 2, 256))
    second = context.encrypt(shape, gpt2_like(rng, 2, 256))
    out_second = evaluator.apply(prepared, second.ciphertexts)
    with pytest.raises(CiphertextError, match="does not match this call"):
        context.decrypt(shape, out_second, first, stats([w]))
    member = list(out_second[0])
    rows_at = wire._OUT_HEAD.size - 2 * 4 - 2 - 3 * 2 - 4  # rows:u32 precedes r, n_i, n_o, member, index, count
    tampered = bytearray(member[0]); tampered[rows_at] ^= 0x01
    with pytest.raises(CiphertextError, match="does not match this call"):
        context.decrypt(shape, [[bytes(tampered)] + member[1:]], second, stats([w]))
    (y,) = context.decrypt(shape, out_second, second, stats([w]))
    assert y.shape == (2, 64)


def test_error_bound_is_the_documented_formula(context):
    """ε = [2^(A−1) + ½Δw‖W‖_row + 32·n_o·(Δw‖W‖_row + d_in/2) + rounding] / (Δx·Δw); against the encoded
    operands (effective=True) the two rounding terms drop out."""
    from bifrost.ckks import WeightStats
    from bifrost_kernels.backend import weight_scale

    shape = GroupShape(768, (2304,))
    x = np.zeros((2, 768))
    x[0, :] = 1.0
    batch = context.encrypt(shape, x)
    ws = WeightStats(peak=0.5, row_l1=100.0)
    (eps0,), (eps1,) = context.error_bound(shape, batch, [ws])
    (eff0,), (eff1,) = context.error_bound(shape, batch, [ws], effective=True)
    A, B = context.params.scale_bits, context.weight_bits
    dw, dx = weight_scale(B, 0.5), (2 ** A - 768) / 768
    n_o = batch.state.blocking.out_per_ct
    noise = 32 * n_o * (100 * dw + 384) + 2.0 ** -45 * 2 ** A * (100 * dw + 768)
    assert eps0 == pytest.approx((2 ** (A - 1) + 0.5 * 100 * dw + noise) / (dw * dx), rel=1e-12)
    assert eff0 == pytest.approx(noise / (dw * dx), rel=1e-12)
    assert eps1 == eff1 == 0.0  # an all-zero row decodes to exactly 0
    assert 0.5 < eps0 / (2.0 ** -B * 768 * 0.5) < 1.3  # ≈ the leading term 2^-B·‖x‖₁·max|W|
    assert eff0 < 0.6 * eps0  # the weight rounding was the largest term


def test_encoded_operands_predict_the_honest_product_far_more_tightly(context, evaluator):
    """Against x̂ = effective_input and Ŵ = effective_weights(W) only the encryption noise is left:
    the honest error is within the effective bound, which is far below the plain one."""
    rng = np.random.default_rng(31)
    shape = GroupShape(768, (768,))
    w = rng.normal(0, 0.05, (768, 768))
    x = gpt2_like(rng, 3, 768)
    (y,), batch, _ = run_layer(context, evaluator, shape, [w], x)
    bound = context.error_bound(shape, batch, stats([w]), effective=True)[:, 0]
    err = np.abs(y - context.effective_input(batch) @ context.effective_weights(w).T).max(axis=1)
    assert (err <= bound).all()
    assert (err < np.abs(y - x @ w.T).max(axis=1) / 10).all()  # rounding dominated the plain error
    scaled = context.effective_weights(w) * weight_scale_of(context, w)
    assert np.abs(scaled - np.rint(scaled)).max() < 1e-6  # integers × 1/Δw


def weight_scale_of(context, w):
    from bifrost_kernels.backend import weight_scale

    return weight_scale(context.weight_bits, float(np.abs(w).max()))


def test_the_mask_term_prepared_at_encrypt_is_the_one_decrypt_computes(context, evaluator):
    """encrypt(..., weights) starts the call's decryption term on the mask thread; decrypt uses it for those
    weights (same values as computing it inline) and computes it for any other weights it is given."""
    rng = np.random.default_rng(41)
    shape = GroupShape(200, (64, 32))
    ws = [rng.normal(0, 0.1, (d, 200)) for d in shape.d_outs]
    x = gpt2_like(rng, 3, 200)
    prepared = evaluator.prepare(shape, ws)
    batch = context.encrypt(shape, x, stats(ws))
    assert batch.state.mask_term is not None
    out = evaluator.apply(prepared, batch.ciphertexts)
    inline = context._mask_term(shape, batch.state.blocking, [s.matrix for s in stats(ws)], batch.state.secrets)
    assert torch.equal(batch.state.mask_term.result(), inline)
    context._mask_term = lambda *a: pytest.fail("decrypt recomputed the prepared term")  # it must take it
    try:
        ahead = context.decrypt(shape, out, batch, stats(ws))
    finally:
        del context._mask_term  # the method again
    assert error_ratio(context, shape, batch, ws, x, ahead) < 1
    assert "secrets" not in repr(batch.state) and "x_encoded" not in repr(batch.state)
    other = [w * 1.5 for w in ws]  # decrypting with other weights: their own term, not the prepared one
    ys = context.decrypt(shape, evaluator.apply(evaluator.prepare(shape, other), batch.ciphertexts), batch, stats(other))
    assert error_ratio(context, shape, batch, other, x, ys) < 1


@pytest.mark.parametrize("rows", [1, 5])
def test_direct_and_fft_routes_agree_bit_for_bit(context, evaluator, monkeypatch, rows):
    """The worker's inverse at the wanted coefficients (one GEMM, few positions) and the trusted mask term (one GEMM
    with rows of s) give exactly what their FFT routes give, wrap-around signs included."""
    from bifrost_kernels import backend as native
    from bifrost_kernels import linear

    rng = np.random.default_rng(43)
    shape = GroupShape(300, (100, 28))
    ws = [rng.normal(0, 0.1, (d, 300)) for d in shape.d_outs]
    prepared = evaluator.prepare(shape, ws)
    batch = context.encrypt(shape, gpt2_like(rng, rows, 300))
    blk, matrices = batch.state.blocking, [s.matrix for s in stats(ws)]
    direct = evaluator.apply(prepared, batch.ciphertexts), context._mask_term(shape, blk, matrices, batch.state.secrets)
    monkeypatch.setattr(linear, "DIRECT_INVERSE_MAX_POSITIONS", 0)
    monkeypatch.setattr(native, "DIRECT_TERM_MAX_POSITIONS", 0)
    via_fft = evaluator.apply(prepared, batch.ciphertexts), context._mask_term(shape, blk, matrices, batch.state.secrets)
    assert direct[0] == via_fft[0] and torch.equal(direct[1], via_fft[1])


def test_a_forked_child_never_reuses_the_parents_prepared_masks(context):
    """A mask set is for one encryption: after fork() the child drops the sets its parent prepared (the parent
    may still use them), so parent and child never encrypt under the same secret and errors."""
    import os

    context.prefetch(GroupShape(64, (48,)), 1)
    assert context._masks
    pid = os.fork()
    if pid == 0:  # child: report through the exit status only
        os._exit(0 if not context._masks else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert context._masks  # the parent keeps its own
    context._masks.clear()
