"""The tee-only policy (confidential-VM inference): no CKKS worker at all, the attested channel, sessions and
their isolation unchanged, tokens equal to plaintext."""

from __future__ import annotations

from bifrost.model.tokenizer import ByteTokenizer

from .conftest import MODEL, connect, plaintext_greedy


def test_tee_only_serves_attested_sessions_without_any_worker(serve_run_config, serve_config):
    from bifrost.serve.config import serving_config_digest
    from bifrost.tee.deploy import ServeApp

    cfg = serve_run_config.replace(policy="tee-only")
    app = ServeApp(cfg, serve_config.replace(workers=(), worker_certs=())).start()
    try:
        assert app.local_workers == [] and app.worker_addresses == []  # no worker process was started
        a, b = connect(app), connect(app)
        assert a.session_id != b.session_id
        first = a.chat("The enclave", 6)
        assert first.tokens == plaintext_greedy(MODEL, cfg.seed, ByteTokenizer().encode("The enclave"), 6)
        assert b.chat("Another user", 3).tokens == plaintext_greedy(MODEL, cfg.seed, ByteTokenizer().encode("Another user"), 3)
        stats = app.replicas[0].stats()
        assert stats["workers"] == [] and stats["sessions"] == 2
        # the policy is what the client's attestation pins: tee-only has its own serving-config digest
        assert app.service.info.serving_config_digest == serving_config_digest(cfg, app.scfg)
        assert app.service.info.serving_config_digest != serving_config_digest(serve_run_config, app.scfg)
    finally:
        app.stop()
