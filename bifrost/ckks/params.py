"""CKKS parameter sets and the 128-bit security rule.

The bound is the HomomorphicEncryption.org security standard (Albrecht et al., 2018), table for
classical 128-bit security with a ternary (uniform {-1,0,1}) secret: for ring dimension N the total
modulus Q (all primes, the key-switching special prime included) may have at most
``MAX_LOG_Q_128[N]`` bits. Anything larger is refused.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

# N -> max log2(Q) for 128-bit classical security, ternary secret (HE standard, Table 1).
MAX_LOG_Q_128: dict[int, int] = {
    1024: 27,
    2048: 54,
    4096: 109,
    8192: 218,
    16384: 438,
    32768: 881,
}


class InsecureParametersError(ValueError):
    """The parameters do not reach 128-bit security (or are malformed)."""


@dataclass(frozen=True)
class CKKSParams:
    """One CKKS parameter set.

    ``coeff_mod_bit_sizes`` lists the primes' sizes in bits, first to last; by convention (SEAL/TenSEAL)
    the last one is the key-switching special prime. ``scale_bits`` is log2 of the encoding scale
    used for activations.
    """

    poly_modulus_degree: int = 8192
    coeff_mod_bit_sizes: tuple[int, ...] = (60, 40, 60)
    scale_bits: int = 40

    def __post_init__(self) -> None:
        object.__setattr__(self, "coeff_mod_bit_sizes", tuple(int(b) for b in self.coeff_mod_bit_sizes))
        check_128_bit_security(self)

    @property
    def log_q(self) -> int:
        """Total modulus size in bits (special prime included)."""
        return sum(self.coeff_mod_bit_sizes)

    @property
    def slots(self) -> int:
        return self.poly_modulus_degree // 2

    def fingerprint(self) -> str:
        """Stable hex digest of the parameters (no key material)."""
        blob = json.dumps(
            {"N": self.poly_modulus_degree, "q": list(self.coeff_mod_bit_sizes), "scale": self.scale_bits},
            sort_keys=True,
        ).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def check_128_bit_security(p: CKKSParams) -> None:
    """Raise InsecureParametersError unless ``p`` meets 128-bit security (HE standard)."""
    n = p.poly_modulus_degree
    if n not in MAX_LOG_Q_128:
        raise InsecureParametersError(
            f"poly_modulus_degree={n} is not a supported power of two in {sorted(MAX_LOG_Q_128)}"
        )
    if len(p.coeff_mod_bit_sizes) < 2:
        raise InsecureParametersError("need at least two primes (data + special)")
    if any(b < 17 or b > 60 for b in p.coeff_mod_bit_sizes):
        raise InsecureParametersError(f"prime sizes must lie in [17, 60] bits, got {p.coeff_mod_bit_sizes}")
    if p.log_q > MAX_LOG_Q_128[n]:
        raise InsecureParametersError(
            f"log2(Q)={p.log_q} bits exceeds the 128-bit security bound of {MAX_LOG_Q_128[n]} bits "
            f"for N={n} (HomomorphicEncryption.org standard); use a larger N or fewer/smaller primes"
        )
    if not 10 <= p.scale_bits <= 60:
        raise InsecureParametersError(f"scale_bits={p.scale_bits} out of range [10, 60]")
