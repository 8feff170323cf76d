"""Building blocks: primes, NTT, exact FFT convolution, CRT/rescale, digits, bit packing, the CSPRNG samplers (seed expansion, secrets, errors)."""

import hashlib

import numpy as np
import pytest
import torch

from bifrost.ckks import csprng
from bifrost_kernels import linear, negacyclic_fft, ntt, rns, wire


def naive_negacyclic(a, b, q=None):
    n = len(a)
    c = [0] * n
    for i in range(n):
        for j in range(n):
            k = i + j
            if k < n:
                c[k] += int(a[i]) * int(b[j])
            else:
                c[k - n] -= int(a[i]) * int(b[j])
    return np.array([v % q for v in c] if q else c, dtype=np.int64)


def test_prime_chain_is_ntt_friendly_and_sized():
    primes = rns.ntt_primes(2048, (30, 24))
    assert [q.bit_length() for q in primes] == [30, 24]
    assert all(rns.is_prime(q) and q % 4096 == 1 for q in primes)
    with pytest.raises(ValueError):
        rns.ntt_primes(2048, (40, 14))  # primes above 31 bits are not supported by the int64 kernels


@pytest.mark.parametrize("n", [8, 64])
def test_ntt_roundtrip_and_negacyclic_product(n, device):
    q = rns.ntt_primes(n, (20,))[0]
    rng = np.random.default_rng(1)
    a, b = rng.integers(0, q, n), rng.integers(0, q, n)
    fa, fb = ntt.forward(torch.tensor(a, device=device), q), ntt.forward(torch.tensor(b, device=device), q)
    assert (ntt.inverse(fa, q).cpu().numpy() == a).all()
    assert (ntt.inverse(fa * fb % q, q).cpu().numpy() == naive_negacyclic(a, b, q)).all()


@pytest.mark.parametrize("n", [8, 128])
def test_fft_negacyclic_product_is_exact(n, device):
    rng = np.random.default_rng(2)
    a, b = rng.integers(-2**20, 2**20, n), rng.integers(-2**10, 2**10, n)
    got = negacyclic_fft.negacyclic_multiply(torch.tensor(a, dtype=torch.float64, device=device),
                                             torch.tensor(b, dtype=torch.float64, device=device))
    assert (got.cpu().numpy() == naive_negacyclic(a, b)).all()


def test_fft_rounding_guard_fires(device):
    with pytest.raises(negacyclic_fft.FFTPrecisionError):
        negacyclic_fft.round_exact(torch.tensor([0.5, 1.0], dtype=torch.float64, device=device))


def test_crt_compose_and_recombine(device):
    primes = rns.ntt_primes(2048, (30, 24))
    basis = rns.RNSBasis(primes)
    rng = np.random.default_rng(3)
    x = rng.integers(-(basis.Q // 2), basis.Q // 2, (5, 64), dtype=np.int64)
    res = torch.from_numpy(np.moveaxis(basis.decompose(x), -1, -2).copy()).to(device)  # [5, L, 64]
    assert (linear.compose_centered(res, primes).cpu().numpy() == x).all()
    assert (basis.compose_centered(basis.decompose(x)) == x).all()
    d, beta = linear.digit_plan(54)
    digits = linear.signed_digits(torch.from_numpy(x).to(device), d, beta).to(torch.int64)  # [5, D, 64]
    back = linear.recombine(digits, primes, beta, beta + 1).cpu().numpy()                 # [5, L, 64]
    assert (back == np.moveaxis(basis.decompose(x), -1, -2)).all()


def test_signed_digits_reconstruct(device):
    x = torch.tensor([2**53 - 1, -(2**53), 0, 12345, -1], dtype=torch.int64, device=device)
    d, beta = linear.digit_plan(54)
    digits = linear.signed_digits(x, d, beta).to(torch.int64)  # [D, 5]
    back = sum(digits[k] * (1 << (beta * k)) for k in range(d))
    assert (back == x).all() and digits[:-1].abs().max() <= 2 ** (beta - 1)


@pytest.mark.parametrize("bits", [1, 17, 24, 30, 31, 40])
def test_bit_packing_roundtrip(bits):
    v = np.random.default_rng(4).integers(0, 2**bits, (3, 77))
    p = wire.pack_bits(v, bits)
    assert p.shape[1] == wire.packed_len(77, bits)
    assert (wire.unpack_bits(p, 77, bits) == v).all()


def _reference_expansion(seed: bytes, index: int, q: int, limb: int, n: int, words_per_limb: int) -> list[int]:
    """Independent reading of the spec: AES-256 in ECB on counter blocks (index ‖ j), plain Python."""
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    enc = Cipher(algorithms.AES(seed), modes.ECB()).encryptor()
    first_word = limb * words_per_limb
    stream = b"".join(enc.update(((index << 64) | k).to_bytes(16, "big"))
                      for k in range(first_word // 4, (first_word + 2 * n) // 4 + 1))
    out, mask = [], (1 << q.bit_length()) - 1
    for j in range(first_word % 4, len(stream) // 4):
        w = int.from_bytes(stream[4 * j: 4 * j + 4], "little") & mask
        if w < q:
            out.append(w)
        if len(out) == n:
            return out
    raise AssertionError("reference stream too short")


def test_seed_expansion_known_answer_and_range():
    primes = rns.ntt_primes(2048, (30, 24))
    seed = bytes(range(32))
    u = csprng.expand_uniform(seed, primes, 2048)
    # Pinned: worker and trusted side (and any other implementation) must expand identically.
    assert u[:, :4].tolist() == [[906006770, 278874410, 714797993, 7810781], [6114704, 2985765, 12907857, 52219]]
    assert hashlib.sha256(u.astype("<i8").tobytes()).hexdigest() == \
        "91915c3e8bd006b30b46eea3a23459030ac6669f33c3190151f29cf25eb7805c"
    words_per_limb = 2048 + 2048 // 4 + 64
    for index in (0, 1, 4095):
        v = csprng.expand_uniform(seed, primes, 2048, index)
        for i, q in enumerate(primes):
            assert v[i, :64].tolist() == _reference_expansion(seed, index, q, i, 64, words_per_limb)
    assert (u >= 0).all() and (u < np.array(primes)[:, None]).all()
    assert not (csprng.expand_uniform(bytes(32), primes, 2048) == u).all()
    assert not (csprng.expand_uniform(seed, primes, 2048, 1) == u).all()


def test_batched_expansion_equals_one_index_at_a_time_including_retries():
    """Ciphertexts that need a second, longer stream expand exactly as they do alone (both sides agree)."""
    seed = bytes(range(32))
    q, n = 1048609, 64  # 2^20 + 33: about half of the 21-bit words are accepted
    words = n + n // 4 + 64
    first_region = [np.frombuffer(csprng._indexed_keystreams(seed, [k], 4 * words), "<u4") & ((1 << 21) - 1)
                    for k in range(300)]
    assert any((w < q).sum() < n for w in first_region)  # the retry path really runs
    for primes, count, length in (((q,), 300, n), (rns.ntt_primes(2048, (30, 24)), 3, 2048)):
        indices = np.arange(count) * 7 + 5
        many = csprng.expand_uniform_many(seed, indices, primes, length)
        for k, index in enumerate(indices):
            assert (many[k] == csprng.expand_uniform(seed, primes, length, int(index))).all()
        assert (many >= 0).all() and (many < np.array(primes)[:, None]).all()


def test_expansion_refuses_a_bad_seed():
    with pytest.raises(ValueError):
        csprng.expand_uniform(bytes(16), (1048609,), 64)


def test_secret_and_error_distributions():
    s = csprng.ternary_secret(30000)
    counts = np.bincount(s + 1)
    assert set(np.unique(s)) == {-1, 0, 1} and counts.min() > 9000
    e = csprng.centered_binomial((4, 4096))
    assert np.abs(e).max() <= csprng.ERROR_ETA and 3.7 < e.std() < 4.3
