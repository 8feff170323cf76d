"""Multi-user isolation with canaries: concurrent sessions each hold a secret string. No other
session's output, no log line and no byte of worker traffic may contain it; every session's tokens
equal plaintext inference over its *own* history only; every session has its own CKKS keys."""

from __future__ import annotations

import hashlib
import logging
import secrets
import threading

import pytest

from bifrost.model.tokenizer import ByteTokenizer

from .conftest import MODEL, make_policy, plaintext_greedy

N_SESSIONS = 4


@pytest.fixture(scope="module")
def recorded_app(serve_run_config, serve_config, tmp_path_factory):
    """A server (2 replicas, in-process) whose CKKS worker records every byte it receives and sends."""
    from bifrost.tee.deploy import ServeApp

    from tests.workers import make_service, start_worker

    from .conftest import worker_config

    svc = make_service(serve_run_config, MODEL, 64, 2**30)
    traffic: list[bytes] = []
    contexts: list[str] = []
    lock = threading.Lock()

    def recording(name, fn):
        def wrapped(request, context):
            reply = fn(request, context)
            with lock:
                traffic.append(request.SerializeToString())
                if reply is not None:
                    traffic.append(reply.SerializeToString())
                if name == "OpenSession":
                    contexts.append(hashlib.sha256(request.public_context).hexdigest())
            return reply
        return wrapped

    for name in ("OpenSession", "Linear", "LinearBatch", "Describe", "CloseSession"):
        setattr(svc, name, recording(name, getattr(svc, name)))
    _, server, endpoint = start_worker(serve_run_config, MODEL, service=svc)
    app = ServeApp(serve_run_config, serve_config.replace(replicas=2, max_sessions=N_SESSIONS + 2,
                                                           **worker_config(endpoint, tmp_path_factory.mktemp("c")))).start()
    yield app, traffic, contexts
    app.stop()
    server.stop(grace=None)


def test_canaries_stay_in_their_own_session(recorded_app, serve_run_config, caplog):
    from bifrost.serve.client import BifrostClient

    app, traffic, contexts = recorded_app
    caplog.set_level(logging.DEBUG)
    policy = make_policy(app.service.info.model_digest)
    canaries = [f"CANARY-{secrets.token_hex(6)}" for _ in range(N_SESSIONS)]
    results, errors = {}, []

    def session(i: int) -> None:
        try:
            with BifrostClient(f"127.0.0.1:{app.port}", policy, timeout_s=120) as c:
                c.attest()
                first = c.chat(f"My secret is {canaries[i]}.", 4)
                second = c.chat(" Repeat it:", 4)
                results[i] = (first, second)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(repr(exc))

    threads = [threading.Thread(target=session, args=(i,)) for i in range(N_SESSIONS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    tok = ByteTokenizer()
    for i, (first, second) in results.items():
        ids = tok.encode(f"My secret is {canaries[i]}.")
        assert first.tokens == plaintext_greedy(MODEL, serve_run_config.seed, ids, 4)
        ids2 = ids + first.tokens + tok.encode(" Repeat it:")
        assert second.tokens == plaintext_greedy(MODEL, serve_run_config.seed, ids2, 4)
        for j, canary in enumerate(canaries):
            if j != i:
                assert canary not in first.text + second.text
    blob = b"".join(traffic)
    assert len(traffic) > 0
    log_text = "\n".join(r.getMessage() for r in caplog.records)
    for canary in canaries:
        assert canary.encode() not in blob
        assert canary not in log_text
        assert canary.encode("utf-16-le") not in blob
    # each session registered a different public CKKS context (replicas hold no worker session of their own)
    assert len(set(contexts)) == len(contexts) == N_SESSIONS
    assert "on replica 0" in log_text and "on replica 1" in log_text  # sessions spread over both replicas
    assert all(r.stats()["sessions"] == 0 for r in app.replicas)  # and all closed again
