"""Registry, public-context hygiene, wire sizes, and clean errors on bad input (never a crash)."""

import os

import numpy as np
import pytest

from bifrost.ckks import (CiphertextError, CKKSBackend, Evaluator, GroupShape, SecretKeyInPublicContextError,
                          TrustedContext)
from bifrost.ckks.registry import available_backends, get_backend
from bifrost_kernels import wire

from .kernels_testlib import stats

SHAPE = GroupShape(128, (40,))
W = np.random.default_rng(0).normal(0, 0.05, (40, 128))


@pytest.fixture(scope="module")
def layer(context, evaluator):
    rng = np.random.default_rng(0)
    prepared = evaluator.prepare(SHAPE, [W])
    batch = context.encrypt(SHAPE, rng.normal(0, 1, (1, 128)))
    return prepared, batch, evaluator.apply(prepared, batch.ciphertexts)


def test_registered_and_protocols(backend, context, evaluator):
    assert "native" in available_backends() and get_backend("native").name == "native"
    assert isinstance(backend, CKKSBackend) and isinstance(context, TrustedContext)
    assert isinstance(evaluator, Evaluator)


def test_device_selection(backend, context, monkeypatch):
    monkeypatch.setenv("BIFROST_KERNELS_DEVICE", "cpu")
    assert backend.evaluator(context.public_context()).device.type == "cpu"


def test_public_context_cannot_carry_the_secret(context, backend):
    blob = context.public_context()
    assert len(blob) == 8 + 5 + 8 * 2 + 1 + 16  # fixed-length format: no room for key material
    batch = context.encrypt(SHAPE, np.ones((1, 128)))
    secret_bytes = batch.state.secrets[0].astype("<i8").tobytes()  # the call's secret (its trusted record)
    assert secret_bytes[:64] not in blob
    for bad in (blob + secret_bytes, blob + b"\x00", wire.SECRET_MAGIC + secret_bytes, blob + wire.SECRET_MAGIC):
        with pytest.raises(SecretKeyInPublicContextError):
            backend.evaluator(bad)
    for bad in (b"", blob[:20], b"garbage" * 10, b"\x00" * len(blob)):
        with pytest.raises(CiphertextError):
            backend.evaluator(bad)


def test_public_context_with_refused_parameters_is_a_ciphertext_error(context, backend):
    """Found by tests/fuzz: well-formed public contexts whose parameters CKKSParams or the prime chain refuse
    raised InsecureParametersError / ValueError instead of CiphertextError."""
    primes, cid = context._codec.primes, bytes(16)
    for n, chain, scale_bits, what in ((2049, primes, 35, "power of two"),     # a flipped bit in N
                                       (2048, (0, 5), 35, "prime sizes"),      # zeroed primes
                                       (2048, primes, 0, "scale_bits"),
                                       (2048, primes, 50, "weight bits")):     # insecure / unusable scale
        with pytest.raises(CiphertextError, match=what):
            backend.evaluator(wire.encode_public_context(n, chain, scale_bits, cid))


def test_wire_sizes(layer, context, backend):
    _, batch, out = layer
    assert all(len(ct) < 14000 for ct in batch.ciphertexts)   # 2048 × 54 bits + header: c_0 only
    blk = context._codec.blocking(SHAPE, 1)
    assert all(len(ct) == wire.OUTPUT_HEADER_BYTES + 30 * blk.out_per_ct // 8 + 24 * blk.out_per_ct // 8
               for ct in out[0])                              # the wanted coefficients only, no c_1
    sent, received = sum(map(len, batch.ciphertexts)), sum(len(c) for o in out for c in o)
    assert backend.call_bytes(context.params, SHAPE, 1) == (sent, received)  # exact, from public values
    assert backend.max_output_bytes(context.params, SHAPE, 1) == received


def test_bad_inputs_raise_ciphertext_error(layer, evaluator, backend):
    prepared, batch, _ = layer
    cts = batch.ciphertexts
    other = backend.keygen(None, []).encrypt(SHAPE, np.ones((1, 128))).ciphertexts
    bad_lists = [
        [cts[0][:-1]] + cts[1:],                 # truncated
        [cts[0] + b"\x00"] + cts[1:],            # extended
        [b"\x00" * len(cts[0])] + cts[1:],       # garbage
        [b""] + cts[1:],
        other,                                   # another context
        cts + cts[:1],                           # wrong count
        cts[:-1] if len(cts) > 1 else [],
        ["not bytes"] + cts[1:],
    ]
    flipped = bytearray(cts[0]); flipped[37] ^= 0xFF  # rows field
    bad_lists.append([bytes(flipped)] + cts[1:])
    for bad in bad_lists:
        with pytest.raises(CiphertextError):
            evaluator.apply(prepared, bad)


def test_ciphertexts_of_one_call_must_share_its_call_id(layer, context, evaluator):
    prepared, _, _ = layer
    cts = context.encrypt(SHAPE, np.ones((2, 128))).ciphertexts  # two rows: two ciphertexts
    call_at = 4 + 1 + wire.CONTEXT_ID_BYTES  # the call id follows magic, version and context id
    other = bytearray(cts[1]); other[call_at] ^= 0x01  # claims another call
    with pytest.raises(CiphertextError, match="share one call id"):
        evaluator.apply(prepared, [cts[0], bytes(other)])
    batch = context.encrypt(SHAPE, np.ones((2, 128)))
    assert len(context.decrypt(SHAPE, evaluator.apply(prepared, batch.ciphertexts), batch, stats([W]))[0]) == 2


def test_wrong_layer_shape_is_rejected(context, evaluator):
    batch = context.encrypt(GroupShape(768, (768,)), np.ones((1, 768)))
    prepared = evaluator.prepare(GroupShape(768, (2304,)), [np.ones((2304, 768)) * 0.01])
    with pytest.raises(CiphertextError):
        evaluator.apply(prepared, batch.ciphertexts)


def test_bad_outputs_raise_ciphertext_error(layer, context, backend):
    _, batch, out = layer
    o = out[0]
    tampered = bytearray(o[0]); tampered[-5] ^= 0x01  # payload bit: still decodes (the product check's job)
    context.decrypt(SHAPE, [[bytes(tampered)] + o[1:]], batch, stats([W]))
    call = bytearray(o[0]); call[25] ^= 0xFF          # inside the echoed call id
    other_ctx = backend.keygen(None, [])
    bad = [
        [[o[0][:-3]] + o[1:]],
        [o[:-1]],
        [o, o],
        [[bytes(call)] + o[1:]],
        [[b"\xff" * len(o[0])] + o[1:]],
        [["not bytes"] + o[1:]],
        "not a list",
    ]
    for outputs in bad:
        with pytest.raises(CiphertextError):
            context.decrypt(SHAPE, outputs, batch, stats([W]))
    two_rows = context.encrypt(SHAPE, np.ones((2, 128)))
    with pytest.raises(CiphertextError):
        context.decrypt(SHAPE, out, two_rows, stats([W]))   # another call (and row count)
    with pytest.raises(TypeError):
        other_ctx.decrypt(SHAPE, out, object(), stats([W]))  # not a batch of this backend
    with pytest.raises(CiphertextError):
        other_ctx.decrypt(SHAPE, out, other_ctx.encrypt(SHAPE, np.ones((1, 128))), stats([W]))  # foreign context


def test_random_bytes_fuzz(layer, evaluator, context):
    prepared, batch, out = layer
    for i in range(40):
        junk = os.urandom(np.random.default_rng(i).integers(0, 20000))
        with pytest.raises(CiphertextError):
            evaluator.apply(prepared, [junk] * len(batch.ciphertexts))
        with pytest.raises(CiphertextError):
            context.decrypt(SHAPE, [[junk] * len(out[0])], batch, stats([W]))


def test_encrypt_validates_input(context):
    with pytest.raises(ValueError):
        context.encrypt(SHAPE, np.ones((1, 127)))
    with pytest.raises(ValueError):
        context.encrypt(SHAPE, np.full((1, 128), np.nan))
