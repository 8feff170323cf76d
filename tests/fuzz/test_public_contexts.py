"""Public contexts of every backend through ``get_backend(name).evaluator(blob)``: a worker builds its
evaluator from bytes its caller chose, so whatever the bytes, only CiphertextError (SecretKeyInPublicContextError
included) may come out, or a working evaluator."""

from __future__ import annotations

import json
import struct

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from bifrost.ckks import CiphertextError, CKKSParams, GroupShape
from bifrost.ckks.registry import available_backends, get_backend
from bifrost.ckks.params import MAX_LOG_Q_128
from bifrost.ckks.tenseal_backend import PUB_MAGIC
from bifrost_kernels import wire

from .fuzzlib import Ref, budget, call, junk, mutated

ALLOWED = (CiphertextError,)


@pytest.fixture(scope="module")
def blobs():
    """Genuine public contexts: native; TenSEAL (default parameters) without and with two rotation keys."""
    tenseal = get_backend("tenseal")
    return Ref(native=get_backend("native").keygen(None, []).public_context(),
               tenseal=tenseal.keygen(CKKSParams(), []).public_context(),
               tenseal_keyed=tenseal.keygen(CKKSParams(), [GroupShape(4, (4,))]).public_context())


def test_every_backend_is_fuzzed():
    assert set(available_backends()) == {"native", "tenseal"}  # a new backend needs its public contexts fuzzed


def _evaluate(backend: str, blob: bytes):
    ev, err = call(f"evaluator[{backend}]", lambda: get_backend(backend).evaluator(blob), ALLOWED)
    if err is None:
        assert ev.params.fingerprint()  # a working evaluator with well-formed parameters
    else:
        assert str(err)


# ------------------------------------------------------------------------------ native
def native_fields():
    n = st.one_of(st.sampled_from(sorted(MAX_LOG_Q_128) + [0, 1, 3, 4096 + 1]), st.integers(0, (1 << 32) - 1))
    prime = st.one_of(st.integers(0, (1 << 64) - 1), st.integers(1 << 16, 1 << 32), st.sampled_from([0, 1, 2, 3]))
    return st.builds(lambda n, primes, scale, cid: wire.encode_public_context(n, tuple(primes), scale, cid),
                     n, st.lists(prime, min_size=0, max_size=6), st.integers(0, 255), st.binary(min_size=16, max_size=16))


@given(st.data())
@example(None)
@budget("cheap")
def test_native_public_context(blobs, data):
    native_blob = blobs.native
    if data is None:  # the genuine context builds an evaluator
        blob = native_blob
    else:
        blob = data.draw(st.one_of(
            mutated(native_blob, hot=32),
            native_fields(),
            junk(),
            st.builds(lambda a, b: a + wire.SECRET_MAGIC + b, junk(64), junk(64)),
            st.builds(lambda n, l, rest: wire.PUBLIC_MAGIC + struct.pack("<IB", n, l) + rest,
                      st.integers(0, (1 << 32) - 1), st.integers(0, 255), junk(64)),
        ))
    _evaluate("native", blob)


# ------------------------------------------------------------------------------ TenSEAL
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(1 << 70), 1 << 70) | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)


@st.composite
def secure_params(draw):
    """Parameters that pass the 128-bit rule (so SEAL itself gets to judge them)."""
    n = draw(st.sampled_from(sorted(MAX_LOG_Q_128)[1:]))
    k = draw(st.integers(2, min(16, MAX_LOG_Q_128[n] // 17)))
    sizes = draw(st.lists(st.integers(17, min(60, MAX_LOG_Q_128[n] // k)), min_size=k, max_size=k))
    return {"poly_modulus_degree": n, "coeff_mod_bit_sizes": sizes, "scale_bits": draw(st.integers(10, 60))}


def tenseal_params():
    return st.one_of(secure_params(), st.fixed_dictionaries({
        "poly_modulus_degree": st.one_of(st.sampled_from(sorted(MAX_LOG_Q_128)), st.integers(-5, 1 << 40), json_values),
        "coeff_mod_bit_sizes": st.one_of(st.lists(st.integers(0, 70), max_size=17),
                                         st.lists(st.integers(17, 60), min_size=1, max_size=16), json_values),
        "scale_bits": st.one_of(st.integers(0, 70), json_values),
    }))


def tenseal_meta():
    steps = st.one_of(st.lists(st.integers(1, 64), max_size=20), st.lists(st.integers(-(1 << 21), 1 << 21), max_size=20),
                      st.lists(st.booleans(), max_size=3), json_values)
    context_id = st.one_of(st.binary(min_size=16, max_size=16).map(bytes.hex), st.text(max_size=40), json_values)
    meta = st.fixed_dictionaries({"params": st.one_of(tenseal_params(), json_values), "context_id": context_id,
                                  "galois_steps": steps},
                                 optional={"secret_key": st.text(max_size=8), "extra": json_values})
    return st.one_of(meta, json_values, st.dictionaries(st.text(max_size=12), json_values, max_size=4))


def _framed(meta: bytes, galois: bytes) -> bytes:
    return PUB_MAGIC + struct.pack("<I", len(meta)) + meta + galois


@given(st.data())
@example(None)
@budget("native")
def test_tenseal_public_context(blobs, data):
    small, keyed = blobs.tenseal, blobs.tenseal_keyed
    if data is None:
        blob = keyed
    else:
        (n,) = struct.unpack_from("<I", keyed, len(PUB_MAGIC))
        galois = keyed[len(PUB_MAGIC) + 4 + n:]
        blob = data.draw(st.one_of(
            mutated(small),
            mutated(keyed, hot=len(PUB_MAGIC) + 4 + n + 64),  # header, JSON and the SEAL header of the keys
            st.builds(lambda m, g: _framed(json.dumps(m).encode(), g), tenseal_meta(),
                      st.sampled_from([b"", galois, galois[: len(galois) // 2]])),
            st.builds(lambda depth: _framed(b"[" * depth + b"]" * depth, b""), st.integers(1, 100_000)),
            st.builds(lambda n, rest: PUB_MAGIC + struct.pack("<I", n) + rest, st.integers(0, (1 << 32) - 1), junk(64)),
            junk(),
        ))
    _evaluate("tenseal", blob)
