"""128-bit security is enforced; parameters the native kernels cannot run are refused."""

import pytest

from bifrost.ckks import CKKSParams, InsecureParametersError, check_128_bit_security
from bifrost.ckks.params import MAX_LOG_Q_128
from bifrost_kernels.backend import DEFAULT_PARAMS, NativeTrustedContext, weight_bits
from bifrost_kernels.rns import ntt_primes


def test_default_params_meet_128_bit_security():
    check_128_bit_security(DEFAULT_PARAMS)
    primes = ntt_primes(DEFAULT_PARAMS.poly_modulus_degree, DEFAULT_PARAMS.coeff_mod_bit_sizes)
    product = 1
    for q in primes:
        product *= q
    assert product.bit_length() <= MAX_LOG_Q_128[DEFAULT_PARAMS.poly_modulus_degree]
    assert weight_bits(DEFAULT_PARAMS, primes) == 14


def test_parameters_above_the_bound_are_refused():
    with pytest.raises(InsecureParametersError):
        CKKSParams(poly_modulus_degree=2048, coeff_mod_bit_sizes=(30, 25), scale_bits=35)
    with pytest.raises(InsecureParametersError):
        CKKSParams(poly_modulus_degree=4096, coeff_mod_bit_sizes=(31, 31, 31, 31), scale_bits=35)


def test_unsupported_parameters_are_refused_clearly():
    with pytest.raises(ValueError, match="31 bits"):
        NativeTrustedContext(CKKSParams(poly_modulus_degree=8192, coeff_mod_bit_sizes=(60, 40, 60), scale_bits=40))
    with pytest.raises(ValueError, match="weight bits"):
        NativeTrustedContext(CKKSParams(poly_modulus_degree=2048, coeff_mod_bit_sizes=(30, 24), scale_bits=45))


def test_larger_ring_works(backend, device):
    import numpy as np

    from bifrost.ckks import GroupShape
    params = CKKSParams(poly_modulus_degree=4096, coeff_mod_bit_sizes=(31, 31), scale_bits=40)
    ctx = backend.keygen(params, [])
    ev = backend.evaluator(ctx.public_context(), device=device)
    shape = GroupShape(100, (50,))
    rng = np.random.default_rng(0)
    w, x = rng.normal(0, 0.05, (50, 100)), rng.normal(0, 1, (2, 100))
    from bifrost.ckks import WeightStats

    batch = ctx.encrypt(shape, x)
    out = ev.apply(ev.prepare(shape, [w]), batch.ciphertexts)
    y = ctx.decrypt(shape, out, batch, [WeightStats.of(w)])[0]
    assert np.abs(y - x @ w.T).max() < 2.0 ** -ev.weight_bits * np.abs(x).sum(1).max() * np.abs(w).max()
