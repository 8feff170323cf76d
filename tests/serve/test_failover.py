"""Killing a CKKS worker *process* in the middle of a streamed generation loses nothing: the layer
call is retried on another worker and the stream continues with the plaintext-equal tokens."""

from __future__ import annotations

from bifrost.model.tokenizer import ByteTokenizer

from .conftest import MODEL, make_policy, plaintext_greedy


def test_kill_worker_process_mid_stream(serve_run_config, serve_config):
    from bifrost.serve.client import BifrostClient
    from bifrost.tee.deploy import ServeApp

    app = ServeApp(serve_run_config, serve_config.replace(workers=(), local_workers=2, worker_retry_after_s=600)).start()
    try:
        assert len(app.local_workers) == 2
        victim = app.local_workers[0].proc
        policy = make_policy(app.service.info.model_digest)
        tokens = []
        with BifrostClient(f"127.0.0.1:{app.port}", policy, timeout_s=120) as c:
            c.attest()
            for i, ev in enumerate(c.generate("Fail over, please", 8)):
                tokens += ev.token_ids
                if i == 1:
                    victim.kill()  # SIGKILL the worker process mid-stream
                    victim.wait()
        assert victim.returncode is not None
        expected = plaintext_greedy(MODEL, serve_run_config.seed, ByteTokenizer().encode("Fail over, please"), 8)
        assert tokens == expected
        stats = app.replicas[0].stats()
        assert stats["failovers"] >= 1
        assert [w["up"] for w in stats["workers"]] == [False, True]
    finally:
        app.stop()
