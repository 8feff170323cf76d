"""Profile loading: every committed profile validates; malformed ones fail with a clear one-line error."""

import copy

import pytest
import yaml

from bifrost.errors import BifrostError
from bifrost_estimator.profile import HARDWARE_DIR, load_profile, profile_from_dict


def _committed():
    return sorted(HARDWARE_DIR.glob("*.yaml"))


def test_committed_profiles_load_and_state_their_source():
    paths = _committed()
    assert {p.stem for p in paths} >= {"local-2core", "gpu-published"}
    for p in paths:
        prof = load_profile(str(p))
        assert prof.source.kind in ("measured", "published", "mixed")
        if prof.source.kind == "measured":
            assert prof.source.date and prof.source.command.startswith("bifrost estimate calibrate")
        else:
            assert prof.source.citations and prof.source.assumptions


@pytest.fixture()
def good():
    return yaml.safe_load((HARDWARE_DIR / "gpu-published.yaml").read_text())


def test_unknown_key_is_refused_with_its_path(good):
    bad = copy.deepcopy(good)
    bad["tee"]["encrypt_s"] = 1.0
    with pytest.raises(BifrostError, match=r"t\.tee: unknown key\(s\) \['encrypt_s'\]"):
        profile_from_dict(bad, "t")


@pytest.mark.parametrize("path,value,msg", [
    (("link", "bandwidth_Bps"), "fast", "expected a number"),
    (("link", "bandwidth_Bps"), -1, "non-negative"),
    (("tee", "gemm_flops"), 0, "must be > 0"),
    (("accelerator", "backend"), "cuda", "must be one of"),
    (("accelerator", "linear", "poly_modulus_degree"), 3000, "power of two"),
    (("accelerator", "linear", "poly_modulus_degree"), 2 ** 18, "power of two in"),
    (("accelerator", "linear", "coeff_mod_bit_sizes"), [], "at least 2 primes"),
    (("accelerator", "linear", "coeff_mod_bit_sizes"), [60], "at least 2 primes"),
    (("accelerator", "linear", "coeff_mod_bit_sizes"), [70, 40], "20..60 bits"),
    (("link", "bandwidth_Bps"), float("inf"), "finite"),
    (("link", "latency_s"), float("nan"), "finite"),
    (("fhe", "deep", "usable_levels"), 0, "usable_levels"),
    (("fhe", "deep", "bootstrap_s"), 0, "bootstrap_s"),
    (("tee", "layer_overhead_s"), {"gpt2": float("inf")}, "non-negative numbers"),
])
def test_bad_values_are_refused(good, path, value, msg):
    bad = copy.deepcopy(good)
    node = bad
    for k in path[:-1]:
        node = node[k]
    node[path[-1]] = value
    with pytest.raises(BifrostError, match=msg):
        profile_from_dict(bad, "t")


def test_native_profile_primes_are_checked_by_the_kernels(good):
    bad = copy.deepcopy(good)
    bad["accelerator"]["backend"] = "native"
    bad["accelerator"]["linear"].update(poly_modulus_degree=2048, coeff_mod_bit_sizes=[58, 58])
    with pytest.raises(BifrostError, match="native backend cannot use"):
        profile_from_dict(bad, "t")


def test_gpu_profile_numbers_are_the_published_derivation():
    """configs/hardware/gpu-published.yaml says where its CKKS costs come from; check it says the truth."""
    from bifrost_estimator.published import derived_costs

    prof = load_profile("gpu-published")
    sections = {"fhe.deep": prof.fhe.deep, "fhe.matmul": prof.fhe.matmul, "accelerator.linear": prof.accelerator.linear}
    for name, costs in derived_costs().items():
        for key, value in costs.items():
            assert getattr(sections[name], key) == pytest.approx(value, rel=2e-3), (name, key)
    assert prof.fhe.matmul.coeff_mod_bit_sizes == (60, 40, 40, 40, 60)  # Euston's matmul context


def test_missing_key_and_unknown_profile(good):
    bad = copy.deepcopy(good)
    del bad["link"]
    with pytest.raises(BifrostError, match=r"missing key\(s\) \['link'\]"):
        profile_from_dict(bad, "t")
    with pytest.raises(BifrostError, match="unknown hardware profile"):
        load_profile("no-such-profile")
