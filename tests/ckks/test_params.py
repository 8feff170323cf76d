import pytest

from bifrost.ckks import CKKSParams, InsecureParametersError
from bifrost.ckks.params import MAX_LOG_Q_128


def test_default_parameters_meet_128_bit_bound():
    p = CKKSParams()
    assert p.log_q <= MAX_LOG_Q_128[p.poly_modulus_degree]


@pytest.mark.parametrize("n,bits", [(8192, (60, 60, 60, 40)), (4096, (40, 40, 30)), (2048, (30, 30)), (16384, (60,) * 8)])
def test_modulus_above_the_he_standard_bound_is_refused(n, bits):
    with pytest.raises(InsecureParametersError, match="128-bit"):
        CKKSParams(poly_modulus_degree=n, coeff_mod_bit_sizes=bits)


@pytest.mark.parametrize("n,bits", [(8192, (60, 40, 60)), (4096, (36, 36, 37)), (16384, (60,) * 7 + (18,))])
def test_modulus_at_or_below_the_bound_is_accepted(n, bits):
    assert CKKSParams(poly_modulus_degree=n, coeff_mod_bit_sizes=bits).log_q <= MAX_LOG_Q_128[n]


def test_non_power_of_two_degree_and_bad_primes_are_refused():
    with pytest.raises(InsecureParametersError):
        CKKSParams(poly_modulus_degree=6000)
    with pytest.raises(InsecureParametersError):
        CKKSParams(coeff_mod_bit_sizes=(61, 40, 60))
    with pytest.raises(InsecureParametersError):
        CKKSParams(coeff_mod_bit_sizes=(60,))


def test_fingerprint_depends_on_parameters():
    assert CKKSParams().fingerprint() != CKKSParams(scale_bits=39).fingerprint()
    assert CKKSParams().fingerprint() == CKKSParams().fingerprint()
