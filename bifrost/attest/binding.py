"""report_data binding and the model / serving-config digests.

``report_data`` (64 bytes) = SHA-512( LABEL || lp(channel_public_key) || lp(client_nonce)
|| lp(model_digest) || lp(serving_config_digest) ), where lp(x) = 4-byte big-endian length || x.
Length prefixes make the encoding injective; the label separates it from every other SHA-512 use.

Model digest (32 bytes) = SHA-256( MODEL_LABEL || for each regular file, in sorted order of its
POSIX path relative to the checkpoint root: lp(path as UTF-8) || 8-byte big-endian size || contents ).
Files are streamed in 1 MiB chunks, so memory use is constant in the checkpoint size.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Mapping

from .errors import BindingError, ModelDigestError

REPORT_DATA_LABEL = b"bifrost/attest/report-data/v1\x00"
MODEL_DIGEST_LABEL = b"bifrost/attest/model-digest/v1\x00"
SERVING_CONFIG_LABEL = b"bifrost/attest/serving-config/v1\x00"
REPORT_DATA_SIZE = 64
CHUNK_SIZE = 1 << 20
MIN_NONCE_SIZE = 16


def _lp(data: bytes) -> bytes:
    return len(data).to_bytes(4, "big") + data


def compute_report_data(
    channel_public_key: bytes, client_nonce: bytes, model_digest: bytes, serving_config_digest: bytes
) -> bytes:
    """The 64-byte report_data binding. Key is the 32-byte raw X25519 key; nonce >= 16 bytes;
    digests are 32 bytes. Raises :class:`BindingError` on wrong sizes."""
    if len(channel_public_key) != 32:
        raise BindingError("binding_input", "channel public key must be 32 bytes (raw X25519)")
    if len(client_nonce) < MIN_NONCE_SIZE:
        raise BindingError("binding_input", f"client nonce must be at least {MIN_NONCE_SIZE} bytes")
    if len(model_digest) != 32 or len(serving_config_digest) != 32:
        raise BindingError("binding_input", "model and serving-config digests must be 32 bytes")
    h = hashlib.sha512(REPORT_DATA_LABEL)
    for part in (channel_public_key, client_nonce, model_digest, serving_config_digest):
        h.update(_lp(part))
    return h.digest()


def compute_model_digest(checkpoint: str | os.PathLike[str]) -> bytes:
    """SHA-256 model digest over a checkpoint directory (or a single file). Symlinked files are
    read through the link (Hugging Face caches use them); directories are not followed via links.
    Raises :class:`ModelDigestError` when the path is missing, unreadable or holds no files."""
    root = Path(checkpoint)
    if root.is_file():
        files = [(root.name, root)]
    elif root.is_dir():
        files = []
        for dirpath, _dirnames, filenames in os.walk(root):
            for name in filenames:
                path = Path(dirpath) / name
                if path.is_file():
                    files.append((path.relative_to(root).as_posix(), path))
    else:
        raise ModelDigestError("model_path", f"{root} is neither a file nor a directory")
    if not files:
        raise ModelDigestError("model_path", f"{root} holds no files")
    files.sort(key=lambda item: item[0].encode("utf-8"))
    h = hashlib.sha256(MODEL_DIGEST_LABEL)
    for rel, path in files:
        try:
            with open(path, "rb") as fh:
                size = os.fstat(fh.fileno()).st_size
                h.update(_lp(rel.encode("utf-8")) + size.to_bytes(8, "big"))
                read = 0
                while chunk := fh.read(CHUNK_SIZE):
                    h.update(chunk)
                    read += len(chunk)
        except OSError as exc:
            raise ModelDigestError("model_read", f"cannot read {path}: {exc}") from None
        if read != size:
            raise ModelDigestError("model_read", f"{path} changed size while being hashed")
    return h.digest()


def compute_serving_config_digest(config: Mapping[str, Any]) -> bytes:
    """SHA-256 over canonical JSON (sorted keys, no whitespace) of the serving configuration."""
    try:
        canonical = json.dumps(config, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    except (TypeError, ValueError) as exc:
        raise BindingError("serving_config", f"serving config is not JSON-serialisable: {exc}") from None
    return hashlib.sha256(SERVING_CONFIG_LABEL + canonical.encode()).digest()


def check_pinned_digests(model_digest: bytes, serving_config_digest: bytes, policy: Any) -> None:
    """The client policy must pin the model digest (mandatory) and, if listed, the serving config."""
    if not policy.model_digests:
        raise BindingError("model_digest", "policy pins no model digest; refusing to send prompts")
    if model_digest not in policy.model_digests:
        raise BindingError("model_digest", f"model digest {model_digest.hex()} is not pinned by the policy")
    if policy.serving_config_digests and serving_config_digest not in policy.serving_config_digests:
        raise BindingError("serving_config", "serving-config digest is not pinned by the policy")
