"""Reading a YAML mapping file, with one-line errors naming the file. Imports nothing else of Bifrost but
:mod:`bifrost.errors`, so the model catalogue, placement policies and config loaders can all use it."""

from __future__ import annotations

from pathlib import Path

import yaml

from .errors import UserError


def load_yaml(path: Path | str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"{p}: invalid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise UserError(f"{p}: top level must be a mapping")
    return data
