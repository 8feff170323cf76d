"""Serving fixtures: an in-process server (the replica class without Ray) on the shared test worker."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

MODEL = "gpt2-mini"


@pytest.fixture(scope="session")
def serve_run_config(run_config, tmp_path_factory):
    """The replicas present this process's TLS identity (saved to a folder), which the test workers trust."""
    import dataclasses

    from bifrost.attest.mtls import process_identity

    folder = tmp_path_factory.mktemp("tee-identity")
    process_identity().save(folder)
    return run_config.replace(model=MODEL, tee=dataclasses.replace(run_config.tee, identity=str(folder)))


@pytest.fixture(scope="session")
def serve_config(tmp_path_factory):
    from bifrost.serve.config import load_serve_config

    runs = tmp_path_factory.mktemp("serve-runs")
    return load_serve_config().replace(runtime="local", port=0, max_sessions=6, max_prompt_tokens=64,
                                       max_new_tokens=32, run_dir=str(runs),
                                       quarantine_file=str(runs / "worker-quarantine.json"))


def worker_config(endpoint, folder) -> dict:
    """serve-config overrides for one running worker: its address and its certificate file (pinned)."""
    from pathlib import Path

    cert = Path(folder) / f"worker-{endpoint.address.replace(':', '_')}.pem"
    cert.write_bytes(endpoint.cert_pem)
    return {"workers": (endpoint.address,), "worker_certs": (str(cert),)}


@pytest.fixture(scope="session")
def local_app(worker_factory, serve_run_config, serve_config, tmp_path_factory):
    from bifrost.tee.deploy import ServeApp

    _, _, endpoint = worker_factory(MODEL, 64)
    app = ServeApp(serve_run_config, serve_config.replace(**worker_config(endpoint, tmp_path_factory.mktemp("certs"))))
    app.start()
    yield app
    app.stop()


def make_policy(model_digest: bytes, allow_simulated: bool = True):
    from bifrost.attest.policy import policy_from_mapping

    return policy_from_mapping({"allow_simulated": allow_simulated, "model_digests": [model_digest.hex()]})


@pytest.fixture(scope="session")
def policy(local_app):
    return make_policy(local_app.service.info.model_digest)


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


class ControlledWorker:
    """A real in-process CKKS worker whose layer calls a test can slow down (a busy or hung worker);
    counts its layer calls and exposes its open worker session count. ``gate``: layer calls wait while it is
    clear (a hung worker a test releases)."""

    def __init__(self, run_config, max_sessions: int = 64) -> None:
        import threading
        import time

        from tests.workers import make_service, start_worker

        self.service = make_service(run_config, MODEL, max_sessions, 2**30)
        self.delay_s = 0.0       # added to every layer call
        self.next_delay_s = 0.0  # added to the next layer call only
        self.calls = 0
        self.gate = threading.Event()
        self.gate.set()
        lock = threading.Lock()

        def slowed(inner):
            def call(request, context):
                with lock:
                    self.calls += 1
                    extra, self.next_delay_s = self.next_delay_s, 0.0
                time.sleep(self.delay_s + extra)
                self.gate.wait()
                return inner(request, context)
            return call

        for name in ("Linear", "LinearBatch"):
            setattr(self.service, name, slowed(getattr(self.service, name)))
        _, self.server, self.endpoint = start_worker(run_config, MODEL, service=self.service)
        self.address = self.endpoint.address

    def worker_sessions(self) -> int:
        return len(self.service._worker_sessions)

    def stop(self) -> None:
        self.server.stop(grace=None)


@pytest.fixture()
def controlled_worker(run_config):
    w = ControlledWorker(run_config)
    yield w
    w.stop()


@pytest.fixture()
def app_factory(serve_run_config, serve_config, tmp_path):
    """Start in-process apps (runtime local) with config overrides (``worker=endpoint``: that one worker,
    its certificate pinned); stopped after the test."""
    from bifrost.tee.deploy import ServeApp

    apps = []

    def make(worker=None, **changes):
        if worker is not None:
            changes.update(worker_config(worker, tmp_path))
        app = ServeApp(serve_run_config, serve_config.replace(**changes)).start()
        apps.append(app)
        return app

    yield make
    for app in apps:
        app.stop()


def wait_until(predicate, timeout_s: float = 30.0, what: str = "condition") -> None:
    """Poll ``predicate`` (background work: sweeper, closes) until true; fail after ``timeout_s``."""
    import time

    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


def connect(app, pol=None, attest: bool = True):
    from bifrost.serve.client import BifrostClient

    c = BifrostClient(f"127.0.0.1:{app.port}", pol or make_policy(app.service.info.model_digest), timeout_s=120)
    if attest:
        c.attest()
    return c


def ray_default_dirs_listing() -> dict[str, list[str] | None]:
    """What exists in Ray's default places (~/.ray, where Ray writes auth_token, and /tmp/ray): a
    serve run must leave both untouched (its Ray lives in the run folder)."""
    from pathlib import Path

    out: dict[str, list[str] | None] = {}
    for root in (Path.home() / ".ray", Path("/tmp/ray")):
        out[str(root)] = sorted(str(p) for p in root.iterdir()) if root.exists() else None
    return out


# --------------------------------------------------------------------------- the fault report
@pytest.fixture(scope="session")
def fault_report():
    """Rows (fault, what the client saw, tokens correct, recovery seconds); written as JSON to
    ``$BIFROST_FAULT_REPORT`` at the end of the session when that is set."""
    rows: list[dict] = []
    yield rows
    path = os.environ.get("BIFROST_FAULT_REPORT")
    if path:
        Path(path).write_text(json.dumps(rows, indent=1))


def report(rows: list[dict], fault: str, client_saw: str, tokens_correct: bool | None, recovery_s: float | None,
           recovery: str) -> None:
    rows.append({"fault": fault, "client_saw": client_saw, "tokens_correct": tokens_correct,
                 "recovery_s": None if recovery_s is None else round(recovery_s, 3), "recovery": recovery})
