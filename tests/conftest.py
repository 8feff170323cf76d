"""Shared fixtures: an in-process CKKS worker for small models, and fast CKKS parameters."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as bifrost.cli: runtime and worker share the CPU


@pytest.fixture(scope="session")
def run_config():
    from bifrost.config_loader import load_config

    return load_config()


@pytest.fixture(scope="session")
def worker_factory(run_config):
    """Start in-process workers (one per model name, reused for the session): (service, server, endpoint)."""
    from tests.workers import start_worker

    started = {}

    def get(model: str, max_sessions: int = 8):
        key = (model, max_sessions)
        if key not in started:
            started[key] = start_worker(run_config, model, max_sessions)
        return started[key]

    yield get
    for _, server, _ in started.values():
        server.stop(grace=None)
