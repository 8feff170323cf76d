"""TenSEAL (SEAL BSGS) backend: correctness against float64, packing edge cases, bad input."""

import json
import struct

import numpy as np
import pytest

from bifrost.ckks import CiphertextError, CKKSParams, GroupShape, SecretKeyInPublicContextError, WeightStats
from bifrost.ckks.registry import get_backend
from bifrost.ckks.tenseal_backend import CT_MAGIC, PUB_MAGIC, PackingPlan
from tests.key_material import tenseal_secret_words

# Error bound for inputs |x| <= 8 and weights |w| <= 0.2 at scale 2^40: observed ~1e-5, asserted 1e-3.
ABS_ERROR_BOUND = 1e-3


@pytest.fixture(scope="module")
def backend():
    return get_backend("tenseal")


def _roundtrip(backend, params, shape, rows, seed=0, scale=3.0):
    rng = np.random.default_rng(seed)
    keys = backend.keygen(params, [shape])
    ev = backend.evaluator(keys.public_context())
    weights = [rng.uniform(-0.2, 0.2, size=(d, shape.d_in)) for d in shape.d_outs]
    x = np.clip(rng.normal(scale=scale, size=(rows, shape.d_in)), -8, 8)
    enc = keys.encrypt(shape, x)
    out = ev.apply(ev.prepare(shape, weights), enc.ciphertexts)
    ys = keys.decrypt(shape, out, enc, [WeightStats.of(w) for w in weights])
    return x, weights, ys, keys, ev, enc


@pytest.mark.parametrize(
    "shape,rows",
    [
        (GroupShape(768, (768,)), 1),  # GPT-2 attention output projection
        (GroupShape(64, (64, 32, 32)), 7),  # fused q/k/v with GQA-sized k/v, rows packed per ciphertext
        (GroupShape(300, (50,)), 40),  # many rows across several ciphertexts
        (GroupShape(100, (3000,)), 1),  # output split into several chunks
    ],
)
def test_linear_matches_float64_reference(backend, shape, rows):
    x, weights, ys, keys, _, enc = _roundtrip(backend, CKKSParams(), shape, rows)
    assert len(ys) == len(shape.d_outs)
    bounds = keys.error_bound(shape, enc, [WeightStats.of(w) for w in weights])
    for m, (w, y) in enumerate(zip(weights, ys)):
        assert y.shape == (rows, w.shape[0])
        assert np.abs(y - x @ w.T).max() < ABS_ERROR_BOUND
        err = np.abs(y - x @ w.T).max(axis=1)
        assert (err < bounds[:, m] / 4).all()  # the documented bound, with a margin


def test_input_wider_than_half_the_slots_is_chunked(backend):
    params = CKKSParams(poly_modulus_degree=4096, coeff_mod_bit_sizes=(40, 30, 39), scale_bits=30)
    shape = GroupShape(1500, (600,))
    assert PackingPlan.for_shape(params.slots, shape).in_chunks == 2
    x, (w,), (y,), *_ = _roundtrip(backend, params, shape, rows=2, scale=1.0)
    assert np.abs(y - x @ w.T).max() < 1e-2


def test_public_context_has_no_secret_key(backend):
    keys = backend.keygen(CKKSParams(), [GroupShape(16, (16,))])
    public = keys.public_context()
    words = tenseal_secret_words(keys)
    assert len(words) >= 8192 * 8
    for off in range(0, len(words) - 32, len(words) // 64):
        assert words[off : off + 32] not in public


def test_evaluator_refuses_a_context_with_a_secret_key(backend):
    import tenseal as ts

    private = ts.context(ts.SCHEME_TYPE.CKKS, 8192, coeff_mod_bit_sizes=[60, 40, 60]).serialize(save_secret_key=True)
    with pytest.raises(SecretKeyInPublicContextError):
        backend.evaluator(private)
    meta = json.dumps({"params": {}, "context_id": "00", "galois_steps": [], "secret_key": "AAAA"}).encode()
    with pytest.raises(SecretKeyInPublicContextError):
        backend.evaluator(PUB_MAGIC + struct.pack("<I", len(meta)) + meta)


@pytest.mark.parametrize("blob", [b"", b"garbage", PUB_MAGIC + b"\xff\xff\xff\x7f{}"])
def test_malformed_public_context_is_a_ciphertext_error(backend, blob):
    with pytest.raises(CiphertextError):
        backend.evaluator(blob)


def test_insecure_parameters_in_public_context_are_refused(backend):
    meta = json.dumps({"params": {"poly_modulus_degree": 8192, "coeff_mod_bit_sizes": [60, 60, 60, 60], "scale_bits": 40},
                       "context_id": "00" * 16, "galois_steps": []}).encode()
    with pytest.raises(CiphertextError, match="refused"):
        backend.evaluator(PUB_MAGIC + struct.pack("<I", len(meta)) + meta)


@pytest.mark.parametrize("sizes", [[17, 19], [18] * 6])
def test_parameters_seal_cannot_build_are_ciphertext_errors(backend, sizes):
    """Found by tests/fuzz: secure parameters for which SEAL finds too few NTT primes (17-19 bits at
    N = 8192: primes must be 1 mod 2N) escaped as RuntimeError (the worker answered INTERNAL)."""
    meta = json.dumps({"params": {"poly_modulus_degree": 8192 if len(sizes) == 2 else 4096,
                                  "coeff_mod_bit_sizes": sizes, "scale_bits": 10},
                       "context_id": "00" * 16, "galois_steps": []}).encode()
    with pytest.raises(CiphertextError, match="qualifying primes"):
        backend.evaluator(PUB_MAGIC + struct.pack("<I", len(meta)) + meta)


@pytest.mark.parametrize("meta", [
    {"params": [], "context_id": "00" * 16, "galois_steps": []},
    {"params": {"poly_modulus_degree": "8192", "coeff_mod_bit_sizes": [60, 40, 60], "scale_bits": 40},
     "context_id": "00" * 16, "galois_steps": []},
    {"params": {"poly_modulus_degree": 8192, "coeff_mod_bit_sizes": [60, 40, 60], "scale_bits": True},
     "context_id": "00" * 16, "galois_steps": []},
    {"params": {"poly_modulus_degree": 10 ** 400, "coeff_mod_bit_sizes": [60, 40, 60], "scale_bits": 40},
     "context_id": "00" * 16, "galois_steps": []},
    {"params": {"poly_modulus_degree": 8192, "coeff_mod_bit_sizes": [60, 40, 60], "scale_bits": 40},
     "context_id": "zz" * 16, "galois_steps": []},
    {"params": {"poly_modulus_degree": 8192, "coeff_mod_bit_sizes": [60, 40, 60], "scale_bits": 40},
     "context_id": 7, "galois_steps": {"a": 1}},
    {"params": {"poly_modulus_degree": 8192, "coeff_mod_bit_sizes": [60, 40, 60], "scale_bits": 40},
     "context_id": "00" * 16, "galois_steps": [1.5, -2]},
])
def test_public_context_fields_of_the_wrong_type_are_ciphertext_errors(backend, meta):
    """Wrong JSON types never escape as TypeError / OverflowError (the worker maps them to INVALID_ARGUMENT)."""
    blob = json.dumps(meta).encode()
    with pytest.raises(CiphertextError):
        backend.evaluator(PUB_MAGIC + struct.pack("<I", len(blob)) + blob)


def test_deeply_nested_public_context_metadata_is_a_ciphertext_error(backend):
    blob = b"[" * 100000 + b"]" * 100000
    with pytest.raises(CiphertextError):
        backend.evaluator(PUB_MAGIC + struct.pack("<I", len(blob)) + blob)


@pytest.fixture(scope="module")
def small_setup(backend):
    shape = GroupShape(32, (16,))
    keys = backend.keygen(CKKSParams(), [shape])
    ev = backend.evaluator(keys.public_context())
    prepared = ev.prepare(shape, [np.full((16, 32), 0.01)])
    batch = keys.encrypt(shape, np.ones((1, 32)))
    return shape, keys, ev, prepared, batch


STATS = [WeightStats(0.01, 0.32)]


def test_truncated_and_corrupted_ciphertexts_are_refused(small_setup):
    shape, keys, ev, prepared, batch = small_setup
    good = batch.ciphertexts
    ct = good[0]
    cases = [ct[:10], ct[: len(ct) // 2], b"X" + ct[1:], ct[:40] + bytes(len(ct) - 40), b""]
    for bad in cases:
        with pytest.raises(CiphertextError):
            ev.apply(prepared, [bad])
    assert np.allclose(keys.decrypt(shape, ev.apply(prepared, good), batch, STATS)[0], 0.32, atol=1e-4)


def test_outputs_at_another_level_or_scale_are_refused(small_setup):
    """The decoding scale and level are the trusted side's: an input returned as the output (fresh level)
    and an output whose scale was changed are refused before decoding."""
    from bifrost.ckks.tenseal_backend import _HEADER_BYTES, _load_ciphertext, _scratch

    shape, keys, ev, prepared, batch = small_setup
    with pytest.raises(CiphertextError, match="level and scale"):
        keys.decrypt(shape, [list(batch.ciphertexts)], batch, STATS)
    out = ev.apply(prepared, batch.ciphertexts)[0][0]
    for factor in (1e-9, 2.0, 1e24):
        bent = _load_ciphertext(ev._ctx, ev.context_id, prepared.plan, out)
        bent.scale = bent.scale * factor
        with pytest.raises(CiphertextError, match="level and scale"):
            keys.decrypt(shape, [[out[:_HEADER_BYTES] + _scratch().dump(bent)]], batch, STATS)


def test_ciphertext_from_another_context_is_refused(backend, small_setup):
    shape, keys, ev, prepared, batch = small_setup
    other = backend.keygen(CKKSParams(), [shape])
    foreign = other.encrypt(shape, np.ones((1, 32))).ciphertexts
    with pytest.raises(CiphertextError, match="another CKKS context"):
        ev.apply(prepared, foreign)
    with pytest.raises(CiphertextError, match="another CKKS context"):
        keys.decrypt(shape, [foreign], batch, STATS)


def test_wrong_ciphertext_counts_and_shapes_are_refused(small_setup):
    shape, keys, ev, prepared, batch = small_setup
    good = batch.ciphertexts
    with pytest.raises(CiphertextError):
        ev.apply(prepared, [])
    with pytest.raises(CiphertextError):
        keys.decrypt(shape, [good, good], batch, STATS)  # two member lists for a one-member group
    with pytest.raises(ValueError):
        keys.encrypt(shape, np.ones((1, 31)))
    with pytest.raises(ValueError):
        keys.encrypt(shape, np.full((1, 32), np.nan))
    with pytest.raises(ValueError):
        ev.prepare(shape, [np.ones((16, 31))])


def test_ciphertexts_are_fresh_each_time(small_setup):
    shape, keys, *_ = small_setup
    a = keys.encrypt(shape, np.ones((1, 32))).ciphertexts[0]
    b = keys.encrypt(shape, np.ones((1, 32))).ciphertexts[0]
    assert a[: len(CT_MAGIC)] == CT_MAGIC and a != b
