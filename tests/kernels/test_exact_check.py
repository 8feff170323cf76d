"""The native backend's exact check (``NativeTrustedContext.verify``): an honest reply always passes, a reply that
differs from it in any single residue never does, and the secret vectors are drawn once per process and group."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from bifrost.ckks import ExactTrustedContext, GroupShape, WeightStats
from bifrost.ckks.registry import get_backend
from bifrost.ckks.params import CKKSParams
from bifrost_kernels import backend as nb
from bifrost_kernels import wire
from bifrost_kernels.rns import ntt_primes

SMOLLM2_PARAMS = CKKSParams(poly_modulus_degree=2048, coeff_mod_bit_sizes=(30, 24), scale_bits=30)


def _setup(params, d_in, d_outs, seed=0):
    rng = np.random.default_rng(seed)
    ws = [rng.normal(0, 0.05, (d, d_in)) for d in d_outs]
    shape, stats = GroupShape(d_in, tuple(d_outs)), [WeightStats.of(w) for w in ws]
    backend = get_backend("native")
    keys = backend.keygen(params)
    ev = backend.evaluator(keys.public_context(), device="cpu")
    return rng, ws, shape, stats, keys, ev, ev.prepare(shape, ws)


def _change_residue(ev, ct: bytes, prime: int, coefficient: int, delta: int) -> bytes:
    """``ct`` with one residue (mod ``primes[prime]``) of one wanted coefficient moved by ``delta`` (mod q)."""
    q = ev._codec.primes
    head, body = ct[:wire.OUTPUT_HEADER_BYTES], np.frombuffer(ct[wire.OUTPUT_HEADER_BYTES:], dtype=np.uint8)[None]
    count = wire._OUT_HEAD.unpack_from(ct)[5] * wire._OUT_HEAD.unpack_from(ct)[7]
    v = wire.unpack_residues(body, count, q)[0]
    v[prime, coefficient] = (v[prime, coefficient] + delta) % q[prime]
    return head + wire.pack_residues(v[None], ev._codec.bits)[0].tobytes()


def test_the_plan_misses_at_most_one_in_2_to_the_64():
    for bits in ((30, 24), (30, 30), (20, 20, 14)):
        k, s = nb.check_vector_plan(ntt_primes(2048, bits))
        assert k * s >= nb.CHECK_MISS_BITS == 64 and 2 ** s < min(ntt_primes(2048, bits))
    assert nb.check_vector_plan(ntt_primes(2048, (30, 24))) == (3, 23)


@pytest.mark.parametrize("params", [nb.DEFAULT_PARAMS, SMOLLM2_PARAMS], ids=["35 scale bits", "30 scale bits"])
@pytest.mark.parametrize("d_in, d_outs, rows", [(768, (2304,), 1), (3072, (768,), 1), (576, (576, 192, 192), 5),
                                                (200, (48, 16), 64)])
def test_honest_replies_pass_and_any_single_residue_change_fails(params, d_in, d_outs, rows):
    rng, ws, shape, stats, keys, ev, prepared = _setup(params, d_in, d_outs)
    assert isinstance(keys, ExactTrustedContext)
    x = rng.normal(0, 1, (rows, d_in))
    batch = keys.encrypt(shape, x, stats)
    out = ev.apply(prepared, batch.ciphertexts)
    assert keys.verify(shape, out, batch, stats)
    members = len(d_outs)
    for trial in range(6):  # a residue of either prime, any member, first or last ciphertext, ±1 or ±q/2
        m, prime = trial % members, trial % 2
        i = 0 if trial < 3 else len(out[m]) - 1
        coef = int(rng.integers(0, wire._OUT_HEAD.unpack_from(out[m][i])[7]))
        delta = (1, -1, ev._codec.primes[prime] // 2)[trial % 3]
        bad = [list(o) for o in out]
        bad[m][i] = _change_residue(ev, bad[m][i], prime, coef, delta)
        assert not keys.verify(shape, bad, batch, stats), (m, i, prime, coef, delta)
    (y,) = keys.decrypt(shape, out, batch, stats)[:1]
    assert np.abs(y - x @ ws[0].T).max() < 1e-2  # and the verified reply decrypts to the product


def test_another_calls_honest_reply_under_this_calls_headers_fails():
    """Exactness, not the headers: the honest reply to another input, relabelled as this call's, is refused."""
    rng, ws, shape, stats, keys, ev, prepared = _setup(nb.DEFAULT_PARAMS, 256, (64,))
    a = keys.encrypt(shape, rng.normal(size=(1, 256)), stats)
    b = keys.encrypt(shape, rng.normal(size=(1, 256)), stats)
    out_b = ev.apply(prepared, b.ciphertexts)
    relabelled = [[ct[:5 + 16] + a.state.call_id + ct[5 + 32:] for ct in member] for member in out_b]
    assert wire.decode_output(relabelled[0][0], ev._codec.context_id, len(relabelled[0][0]) - wire.OUTPUT_HEADER_BYTES)[0].call_id == a.state.call_id
    assert not keys.verify(shape, relabelled, a, stats)
    assert keys.verify(shape, ev.apply(prepared, a.ciphertexts), a, stats)


def test_a_product_with_other_weights_fails():
    rng, ws, shape, stats, keys, ev, prepared = _setup(nb.DEFAULT_PARAMS, 256, (64,))
    batch = keys.encrypt(shape, rng.normal(size=(2, 256)), stats)
    w = ws[0].copy()
    w[3, 5] += 0.01  # one weight, one output: the other 16,383 integers are unchanged
    other = ev.prepare(shape, [w])
    assert not keys.verify(shape, ev.apply(other, batch.ciphertexts), batch, stats)


def test_vectors_are_drawn_once_per_process_and_group_and_never_sent():
    rng, ws, shape, stats, keys, ev, prepared = _setup(nb.DEFAULT_PARAMS, 256, (64,))
    other_keys = get_backend("native").keygen(nb.DEFAULT_PARAMS)
    blk = keys._codec.blocking(shape, 1)
    first = keys._check_vectors(shape, blk, keys._matrices(shape, stats))
    assert other_keys._check_vectors(shape, blk, other_keys._matrices(shape, stats)) is first  # shared by sessions
    k, s = nb.check_vector_plan(keys._codec.primes)
    assert first.r.shape[1] == k and int(first.r.max()) < 2 ** s and first.nbytes == nb.check_table_bytes(
        nb.DEFAULT_PARAMS, shape)
    fresh = [WeightStats.of(w.copy()) for w in ws]  # other weight objects (e.g. another model): other vectors
    assert not np.array_equal(keys._check_vectors(shape, blk, keys._matrices(shape, fresh)).r, first.r)
    batch = keys.encrypt(shape, rng.normal(size=(1, 256)), stats)
    sent = b"".join(batch.ciphertexts) + keys.public_context()
    words = first.r.astype("<u4")[:64].tobytes()  # no run of the vectors appears in what is sent
    assert words not in sent


def test_concurrent_first_use_agrees_on_one_set_of_vectors():
    """Sessions created at once: whoever stores first wins, so a call's two halves never use different vectors."""
    rng, ws, shape, stats, keys, ev, prepared = _setup(nb.DEFAULT_PARAMS, 512, (256,))
    blk = keys._codec.blocking(shape, 1)
    got, barrier = [], threading.Barrier(4)

    def first_use():
        ctx = get_backend("native").keygen(nb.DEFAULT_PARAMS)
        barrier.wait()
        got.append(ctx._check_vectors(shape, blk, ctx._matrices(shape, stats)))

    threads = [threading.Thread(target=first_use) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == 4 and all(t is got[0] for t in got)
    batch = keys.encrypt(shape, rng.normal(size=(1, 512)), stats)
    assert keys.verify(shape, ev.apply(prepared, batch.ciphertexts), batch, stats)
