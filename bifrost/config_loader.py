"""Loading a run config and resolving what it names: the YAML file, the CKKS parameters (the run's
``ckks``, else its model's catalogue entry, else the backend's default) and the placement policy file.

:mod:`bifrost.config` holds the typed dataclasses only (no file I/O); everything that reads a file or
asks a backend is here.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from .ckks.registry import available_backends, get_backend
from .ckks.params import CKKSParams, InsecureParametersError
from .config import DEFAULT_CONFIG, RunConfig, build_section
from .errors import UserError
from .yaml_io import load_yaml

if TYPE_CHECKING:
    from .model.placement import PlacementPolicy

__all__ = ["ckks_params_of", "load_config", "placement_of"]


def ckks_params_of(cfg: RunConfig) -> CKKSParams:
    """The CKKS parameters of run ``cfg`` (validated: 128-bit security, its backend accepts them)."""
    if cfg.backend not in available_backends():
        raise UserError(f"unknown CKKS backend {cfg.backend!r}; known: {available_backends()}")
    backend = get_backend(cfg.backend)
    params = cfg.ckks
    if params is None:
        from .model.catalog import model_ckks  # imports torch: only when the catalogue is read

        raw = model_ckks(cfg.model, cfg.backend)  # a catalog model's own setting (configs/models.yaml)
        if raw is None:
            return backend.default_params
        raw = {**raw, "coeff_mod_bit_sizes": tuple(raw.get("coeff_mod_bit_sizes", ()))}
        try:
            params = CKKSParams(**raw)
        except (InsecureParametersError, TypeError) as exc:
            raise UserError(f"ckks: {exc}") from None
    try:
        backend.check_params(params)
    except ValueError as exc:
        raise UserError(f"ckks ({cfg.backend} backend): {exc}") from None
    return params


def placement_of(cfg: RunConfig) -> PlacementPolicy:
    """The placement policy of run ``cfg`` (validated; :mod:`bifrost.model.placement`)."""
    from .model.placement import load_placement_policy  # imports torch

    return load_placement_policy(cfg.policy)


def load_config(path: Path | str | None = None) -> RunConfig:
    """Load and validate a run config (``configs/default.yaml`` when ``path`` is None)."""
    p = Path(path) if path else DEFAULT_CONFIG
    cfg = build_section(RunConfig, load_yaml(p), p.name)
    ckks_params_of(cfg)  # refuse insecure parameters at load
    placement_of(cfg)  # and an unknown or malformed placement policy
    return cfg
