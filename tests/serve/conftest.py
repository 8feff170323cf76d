"""Serving fixtures: an in-process server (the replica class without Ray) on the shared test worker."""

from __future__ import annotations

import pytest

MODEL = "gpt2-mini"


@pytest.fixture(scope="session")
def serve_run_config(run_config):
    return run_config.replace(model=MODEL)


@pytest.fixture(scope="session")
def serve_config(tmp_path_factory):
    from bifrost.serve.config import load_serve_config

    return load_serve_config().replace(runtime="local", port=0, max_sessions=6, max_prompt_tokens=64,
                                       max_new_tokens=32, run_dir=str(tmp_path_factory.mktemp("serve-runs")))


@pytest.fixture(scope="session")
def local_app(worker_factory, serve_run_config, serve_config):
    from bifrost.serve.server import ServeApp

    _, _, address = worker_factory(MODEL, 64)
    app = ServeApp(serve_run_config, serve_config.replace(workers=(address,))).start()
    yield app
    app.stop()


def make_policy(model_digest: bytes, allow_simulated: bool = True):
    from bifrost.attest.policy import policy_from_mapping

    return policy_from_mapping({"allow_simulated": allow_simulated, "model_digests": [model_digest.hex()]})


@pytest.fixture(scope="session")
def policy(local_app):
    return make_policy(local_app.service.info["model_digest"])


@pytest.fixture()
def client_factory(local_app, policy):
    from bifrost.serve.client import BifrostClient

    made = []

    def make(attest: bool = True, pol=None):
        c = BifrostClient(f"127.0.0.1:{local_app.port}", pol or policy, timeout_s=120)
        if attest:
            c.attest()
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


def plaintext_greedy(model_name: str, seed: int, ids: list[int], n: int) -> list[int]:
    from bifrost.model.catalog import load_model, resolve
    from bifrost.tee.runtime import plaintext_greedy_tokens

    return plaintext_greedy_tokens(load_model(resolve(model_name), seed), ids, n)
