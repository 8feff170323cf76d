"""Serve configuration: evidence provider names are validated; simulated only when named."""

from __future__ import annotations

import pytest
import yaml

from bifrost.config import CONFIG_DIR
from bifrost.errors import BifrostError
from bifrost.serve.config import ServeConfig, load_serve_config


def test_default_evidence_provider_is_auto_not_simulated() -> None:
    assert ServeConfig().evidence_provider == "auto"


def test_shipped_config_names_simulated_explicitly() -> None:
    raw = yaml.safe_load((CONFIG_DIR / "serve.yaml").read_text())
    assert raw["evidence_provider"] == "simulated"
    assert load_serve_config().evidence_provider == "simulated"


def test_unknown_evidence_provider_is_refused() -> None:
    with pytest.raises(BifrostError) as exc:
        ServeConfig(evidence_provider="sgx")
    assert "evidence_provider" in str(exc.value) and "auto" in str(exc.value)

