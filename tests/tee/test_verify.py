"""The product check (bifrost.tee.verify), the quarantine registry and the row buckets, on their own."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from bifrost.ckks import GroupShape, WeightStats, row_bucket
from bifrost.ckks.registry import get_backend
from bifrost.config import VerificationConfig
from bifrost.tee.pool import WorkerQuarantine
from bifrost.tee.verify import ProductVerifier, false_positive_bound, miss_probability

GROUP = ("g",)


@pytest.fixture(scope="module")
def layer():
    """A native 256 -> 96+32 group, its honest outputs for 6 rows, and the backend's bounds."""
    backend = get_backend("native")
    keys = backend.keygen(None, [])
    ev = backend.evaluator(keys.public_context(), device="cpu")
    rng = np.random.default_rng(0)
    ws = [rng.normal(0, 0.05, (96, 256)), rng.normal(0, 0.05, (32, 256))]
    shape = GroupShape(256, (96, 32))
    x = rng.normal(0, 1, (6, 256))
    x[2] = 0.0
    x[3, 7] = 300.0
    batch = keys.encrypt(shape, x)
    stats = [WeightStats.of(w) for w in ws]
    ys = keys.decrypt(shape, ev.apply(ev.prepare(shape, ws), batch.ciphertexts), batch, stats)
    return ws, x, ys, keys.error_bound(shape, batch, stats)


def test_honest_products_pass(layer):
    ws, x, ys, bounds = layer
    result = ProductVerifier({GROUP: ws}).check(GROUP, x, ys, bounds)
    assert result.ok and result.reason == "" and result.worst < 0.3  # 0.145 at most over 60 fresh key sets
    assert result.comparisons == 6 * 2 * 8  # rows x members x vectors


def test_deviations_of_ten_tolerances_are_always_caught(layer):
    """‖Δ‖₂ = 10·τ on one row escapes with probability ≤ (0.80/10)^8 ≈ 1.7e-9: 200 fresh sessions all catch it."""
    ws, x, ys, bounds = layer
    cfg = VerificationConfig()
    tau = cfg.z * math.sqrt(96) * bounds[0, 0]
    rng = np.random.default_rng(1)
    for _ in range(200):
        delta = rng.normal(size=96)
        bent = [ys[0].copy(), ys[1]]
        bent[0][0] += delta / np.linalg.norm(delta) * 10 * tau
        result = ProductVerifier({GROUP: ws}, cfg).check(GROUP, x, bent, bounds)
        assert not result.ok and result.reason == "product"


def test_a_deviation_within_the_honest_error_passes(layer):
    ws, x, ys, bounds = layer
    bent = [ys[0] + 0.5 * bounds[:, :1], ys[1]]  # half the per-output worst case on every output
    assert ProductVerifier({GROUP: ws}).check(GROUP, x, bent, bounds).ok


def test_range_and_finiteness(layer):
    ws, x, ys, bounds = layer
    verifier = ProductVerifier({GROUP: ws})
    huge = [ys[0].copy(), ys[1]]
    huge[0][1, 5] = (np.abs(x[1]).sum() * np.abs(ws[0]).max() + bounds[1, 0]) * 1.001  # beyond |y| ≤ ‖x‖₁·max|W| + ε
    assert verifier.check(GROUP, x, huge, bounds).reason == "range"
    nan = [ys[0].copy(), ys[1]]
    nan[0][4, 0] = np.nan
    assert verifier.check(GROUP, x, nan, bounds).reason == "not finite"
    nonzero = [ys[0].copy(), ys[1]]
    nonzero[0][2, 0] = 1e-9  # an all-zero input row must decode to exactly 0 (its bound is 0)
    assert not verifier.check(GROUP, x, nonzero, bounds).ok


def test_stated_probabilities():
    cfg = VerificationConfig()
    assert false_positive_bound(cfg) == pytest.approx(8 * math.erfc(8 / math.sqrt(2)))
    assert false_positive_bound(cfg) < 1e-14
    assert miss_probability(cfg, 2) == pytest.approx((math.sqrt(2 / math.pi) / 2) ** 8)
    assert miss_probability(cfg, 2) < 7e-4 and miss_probability(cfg, 4) < 3e-6 and miss_probability(cfg, 0.5) == 1.0


def test_check_vectors_come_from_the_os_csprng_only(monkeypatch):
    """Fresh per session, and never from numpy's or torch's generators."""
    import torch

    def forbidden(*a, **k):
        raise AssertionError("non-cryptographic RNG used")

    for name in ("rand", "randn", "normal", "randint"):
        monkeypatch.setattr(torch, name, forbidden)
    for name in ("default_rng", "rand", "randn", "normal", "standard_normal", "seed"):
        monkeypatch.setattr(np.random, name, forbidden)
    w = np.ones((4, 3))
    a, b = ProductVerifier({GROUP: [w]}), ProductVerifier({GROUP: [w]})
    assert a._members[GROUP][0].S.shape == (8, 4)
    assert not np.array_equal(a._members[GROUP][0].S, b._members[GROUP][0].S)


def test_verification_config_is_validated():
    from bifrost.errors import BifrostError

    with pytest.raises(BifrostError):
        VerificationConfig(vectors=0)
    with pytest.raises(BifrostError):
        VerificationConfig(z=2.0)


def test_row_buckets():
    assert [row_bucket(n) for n in range(1, 13)] == [1, 2, 3, 4, 6, 6, 8, 8, 12, 12, 12, 12]
    assert row_bucket(75) == 96 and row_bucket(96) == 96 and row_bucket(97) == 128 and row_bucket(513) == 768
    for n in range(1, 5000):
        assert n <= row_bucket(n) <= max(4, math.ceil(1.5 * n)) and row_bucket(row_bucket(n)) == row_bucket(n)
    with pytest.raises(ValueError):
        row_bucket(0)


def test_quarantine_is_shared_through_its_file_and_survives_a_restart(tmp_path):
    path = tmp_path / "q.json"
    a, b = WorkerQuarantine(path), WorkerQuarantine(path)
    assert "sha256:aa" not in a and len(b) == 0
    assert a.add("sha256:aa", "product check") is True
    assert "sha256:aa" in a  # effective at once here; the file follows on a background thread
    a.flush()
    assert "sha256:aa" in b and b.entries()["sha256:aa"]["reason"] == "product check"  # another replica sees it
    assert b.add("sha256:bb", "range check") and a.add("sha256:aa", "again") is False
    b.flush()
    assert set(WorkerQuarantine(path).entries()) == {"sha256:aa", "sha256:bb"}  # a later run reads both
    assert json.loads(path.read_text())["format"] == "bifrost-worker-quarantine/v1"


def test_a_damaged_quarantine_file_keeps_what_is_known(tmp_path, caplog):
    path = tmp_path / "q.json"
    q = WorkerQuarantine(path)
    q.add("sha256:aa", "product check")
    q.flush()
    path.write_text("{not json")
    assert "sha256:aa" in q  # nothing forgotten
    assert "unreadable" in caplog.text
    assert len(WorkerQuarantine(tmp_path / "fresh.json")) == 0
