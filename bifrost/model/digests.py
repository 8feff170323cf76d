"""The model digest a client pins (public: computed from public weights and files)."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile

import torch

from ..attest.binding import compute_model_digest
from .catalog import ModelSpec, load_model


def model_digest(spec: ModelSpec, seed: int, model: torch.nn.Module | None = None) -> bytes:
    """A checkpoint directory: :func:`~bifrost.attest.binding.compute_model_digest` over its files. A catalog
    model (architecture + seed, random init): the same digest over a one-file manifest holding the
    architecture, the seed and SHA-256 of every weight tensor (``model``: that model already loaded)."""
    if spec.path is not None:
        return compute_model_digest(spec.path)
    model = model if model is not None else load_model(spec, seed)
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.numpy().tobytes())
    manifest = json.dumps({"name": spec.name, "family": spec.family, "task": spec.task, "config": spec.config,
                           "seed": seed, "weights_sha256": h.hexdigest()}, sort_keys=True).encode()
    with tempfile.TemporaryDirectory() as d:
        with open(os.path.join(d, "manifest.json"), "wb") as f:
            f.write(manifest)
        return compute_model_digest(d)
