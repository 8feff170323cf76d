import os

import pytest
import torch

from bifrost.ckks.registry import get_backend
from bifrost_kernels.backend import DEVICE_ENV


@pytest.fixture(scope="session")
def device() -> str:
    """Where the tests run the worker's kernels: ``$BIFROST_KERNELS_DEVICE`` (benchmarks/gpu_check.py sets
    ``cuda``), else ``cpu``. The trusted side always runs on the CPU."""
    name = os.environ.get(DEVICE_ENV) or "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        pytest.fail(f"{DEVICE_ENV}={name} but torch {torch.__version__} sees no CUDA device")
    return name


@pytest.fixture(scope="session")
def backend():
    return get_backend("native")


@pytest.fixture(scope="session")
def context(backend):
    return backend.keygen(backend.default_params, [])


@pytest.fixture(scope="session")
def evaluator(backend, context, device):
    return backend.evaluator(context.public_context(), device=device)
