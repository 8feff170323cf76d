"""Published GPU CKKS figures and the arithmetic that turns them into ``configs/hardware/gpu-published.yaml``.

The per-operation table is HyPHEN's (N=2^16, every primitive including bootstrapping, one library, one
machine); its *ratios* are kept and its scale is set by the fastest published GPU bootstrapping of a
full N=2^16 ciphertext we could verify (Cheddar, as reported by Theodosian). The N=2^13 contexts (Euston's
matmul context and TenSEAL's [60, 40, 60]) are scaled from N=2^16 by the RNS work N x limbs and then
floored at a GPU kernel-launch latency, which dominates at that size. Every number below is either a
citation or an assumption listed in the profile; ``tests/estimator/test_profile.py`` checks the committed
YAML against :func:`derived_costs`.

    python -m bifrost_estimator.published   # prints the derived costs as YAML fragments
"""

from __future__ import annotations

# HyPHEN (D. Kim, J. Park, J. Kim, S. Kim, J. H. Ahn, "HyPHEN: A Hybrid Packing Method and Its
# Optimizations for Homomorphic Encryption-Based Neural Networks", IEEE Access 2023, Sec. IV.A): RNS-CKKS
# (HEaaN), N=2^16, 64 threads on two 2.35 GHz CPUs; milliseconds per operation.
HYPHEN_N16_MS = {"add_s": 0.202, "mul_plain_s": 0.506, "mul_ct_s": 17.3, "rescale_s": 3.90, "rotate_s": 15.5,
                 "bootstrap_s": 2160.0}
# Cheddar (W. Choi, J. Kim, J. H. Ahn, ASPLOS 2026, arXiv:2407.13055) bootstrapping 2^15 complex slots
# (N=2^16) on an RTX 5090, as the baseline reported by Theodosian (Choi et al., arXiv:2512.18345v2,
# abstract: "from 22.1ms to 15.2ms").
GPU_BOOTSTRAP_N16_MS = 22.1
# Assumptions (stated in the profile):
HYPHEN_LIMBS = 24  # RNS limbs of the ciphertexts HyPHEN timed (bootstrappable N=2^16 parameters)
KEYSWITCH_FLOOR_S = 10e-6  # one rotation / relinearisation at N=2^13: several dependent kernel launches
ELEMENTWISE_FLOOR_S = 2e-6  # one element-wise kernel (add, plaintext product, rescale)
KEYSWITCH_OPS = ("rotate_s", "mul_ct_s")


def gpu_n16_costs() -> dict[str, float]:
    """HyPHEN's per-op table scaled so that bootstrapping takes the published GPU time (seconds)."""
    speedup = HYPHEN_N16_MS["bootstrap_s"] / GPU_BOOTSTRAP_N16_MS
    return {k: v / speedup / 1e3 for k, v in HYPHEN_N16_MS.items()}


def scaled_costs(n: int, limbs: int, floors: bool = True) -> dict[str, float]:
    """Per-op seconds at ring degree ``n`` with ``limbs`` RNS primes: N=2^16 costs x (n·limbs)/(2^16·24),
    floored at the kernel-launch latency unless ``floors`` is False (operations batched into large kernels,
    TensorFHE-style); no bootstrapping at this size."""
    base = gpu_n16_costs()
    work = (n * limbs) / (65536 * HYPHEN_LIMBS)
    out = {}
    for k, v in base.items():
        if k == "bootstrap_s":
            continue
        floor = (KEYSWITCH_FLOOR_S if k in KEYSWITCH_OPS else ELEMENTWISE_FLOOR_S) if floors else 0.0
        out[k] = max(v * work, floor)
    return out


def derived_costs() -> dict[str, dict[str, float]]:
    """The profile's CKKS sections: fhe.deep (N=2^16), fhe.matmul (Euston: N=2^13, 5 primes),
    accelerator.linear (TenSEAL's N=2^13, [60, 40, 60])."""
    deep = gpu_n16_costs()
    return {"fhe.deep": deep, "fhe.matmul": scaled_costs(8192, 5), "accelerator.linear": scaled_costs(8192, 3)}


def main() -> None:
    import yaml

    print(yaml.safe_dump({k: {n: float(f"{v:.4g}") for n, v in d.items()} for k, d in derived_costs().items()},
                         sort_keys=False))


if __name__ == "__main__":
    main()
