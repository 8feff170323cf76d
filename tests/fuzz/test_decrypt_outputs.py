"""What the trusted side reads back from a worker: output ciphertexts through each backend's ``decrypt``.

A worker chooses every byte of its reply, so whatever it returns (mutations of genuine outputs, outputs of
another call or context, reordered, dropped or duplicated ciphertexts, junk, wrong containers), decrypt
either returns well-formed arrays (rows × d_out, finite) or raises CiphertextError; nothing else."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from bifrost.ckks import CiphertextError, CKKSParams, GroupShape, WeightStats
from bifrost.ckks.registry import get_backend
from bifrost_kernels import wire

from .fuzzlib import LIST_EDITS, Ref, budget, call, edit, junk, weighted

ALLOWED = (CiphertextError,)


def _setup(backend_name: str, shape: GroupShape, rows: int, params=None) -> Ref:
    backend = get_backend(backend_name)
    keys = backend.keygen(params, [shape])
    ev = backend.evaluator(keys.public_context())
    rng = np.random.default_rng(1)
    weights = [rng.normal(0, 0.05, (d, shape.d_in)) for d in shape.d_outs]
    prepared = ev.prepare(shape, weights)
    batch = keys.encrypt(shape, rng.normal(0, 1, (rows, shape.d_in)))
    other_batch = keys.encrypt(shape, rng.normal(0, 1, (rows, shape.d_in)))  # same context, another call
    other_keys = backend.keygen(params, [shape])  # another context
    other_ev = backend.evaluator(other_keys.public_context())
    return Ref(shape=shape, keys=keys, batch=batch, stats=[WeightStats.of(w) for w in weights], rows=rows,
               outputs=ev.apply(prepared, batch.ciphertexts),
               other_call=ev.apply(prepared, other_batch.ciphertexts),
               other_context=other_ev.apply(other_ev.prepare(shape, weights), other_keys.encrypt(
                   shape, rng.normal(0, 1, (rows, shape.d_in))).ciphertexts))


@pytest.fixture(scope="module")
def native():
    # two members, three rows: several output ciphertexts per member
    return _setup("native", GroupShape(64, (40, 24)), rows=3)


@pytest.fixture(scope="module")
def tenseal():
    return _setup("tenseal", GroupShape(16, (8, 12)), rows=2, params=CKKSParams())


@st.composite
def outputs(draw, ref: Ref, hot: int):
    """A genuine reply (or another call's / context's), then 0-4 edits."""
    out = [list(cts) for cts in draw(weighted((6, st.just(ref.outputs)), (1, st.just(ref.other_call)),
                                              (1, st.just(ref.other_context))))]
    pool = [ct for source in (ref.outputs, ref.other_call, ref.other_context) for cts in source for ct in cts]
    for op in draw(st.lists(st.sampled_from(LIST_EDITS + ("mutate", "move", "resize", "member")), max_size=4)):
        m = draw(st.integers(0, max(0, len(out) - 1)))
        cts = out[m] if out else []
        if op in LIST_EDITS:
            edit(draw, cts, op, pool, hot)
        elif op == "move" and len(out) > 1 and cts:  # a ciphertext of one member under another
            out[(m + 1) % len(out)].insert(0, cts.pop(draw(st.integers(0, len(cts) - 1))))
        elif op == "resize" and cts:  # a ciphertext cut or padded to another genuine one's length
            i = draw(st.integers(0, len(cts) - 1))
            cts[i] = (cts[i] + bytes(len(pool[0])))[: len(draw(st.sampled_from(pool)))]
        elif op == "member":  # a member's list dropped, or one more
            if draw(st.booleans()) and out:
                out.pop(m)
            else:
                out.append(list(draw(st.sampled_from(list(ref.outputs)))))
    container = draw(weighted((8, st.just("list")), (1, st.just("tuple")), (1, st.just("odd"))))
    if container == "tuple":
        return tuple(tuple(cts) for cts in out)
    if container == "odd":  # not a list of lists of bytes
        return draw(st.sampled_from([None, b"", [b""], [[None]], [["str"]], [[1, 2]], [{"a": b""}], "ab"]))
    return out


def _decrypt(target: str, ref: Ref, out) -> None:
    ys, err = call(target, lambda: ref.keys.decrypt(ref.shape, out, ref.batch, ref.stats), ALLOWED)
    if err is None:
        assert [y.shape for y in ys] == [(ref.rows, d) for d in ref.shape.d_outs]
        assert all(np.isfinite(y).all() for y in ys)
    else:
        assert str(err)


@given(st.data())
@example(None)
@budget("native")
def test_native_outputs(native, data):
    if data is None:  # a genuine reply decrypts
        out = native.outputs
    else:
        out = data.draw(weighted(
            (8, outputs(native, hot=wire.OUTPUT_HEADER_BYTES)),
            (1, st.lists(st.lists(junk(8000), max_size=4), max_size=3)),  # arbitrary bytes, any counts
            (1, st.lists(st.binary(min_size=len(native.outputs[0][0]), max_size=len(native.outputs[0][0])),
                         min_size=1, max_size=3).map(lambda cts: [cts, cts])),  # right length, random content
        ))
    _decrypt("decrypt[native]", native, out)


@given(st.data())
@example(None)
@budget("tenseal")
def test_tenseal_outputs(tenseal, data):
    out = tenseal.outputs if data is None else data.draw(weighted(
        (8, outputs(tenseal, hot=36 + 64)),  # Bifrost header, SEAL header and the first parameters
        (1, st.lists(st.lists(junk(512), max_size=3), max_size=3)),
    ))
    _decrypt("decrypt[tenseal]", tenseal, out)
