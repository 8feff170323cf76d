import pytest

from bifrost.ckks import get_backend


@pytest.fixture(scope="session")
def backend():
    return get_backend("native")


@pytest.fixture(scope="session")
def context(backend):
    return backend.keygen(backend.default_params, [])


@pytest.fixture(scope="session")
def evaluator(backend, context):
    return backend.evaluator(context.public_context(), device="cpu")
