"""Issue 16's done-when test, end to end with real processes: `bifrost serve` (simulated evidence, a tiny
checkpoint with a chat template, placement `tee-only`), a client policy written by `bifrost attest
init-policy`, `bifrost proxy` with that policy, and the official `openai` package streaming a sampled chat
completion (temperature, top_p, seed, stop) that must equal the gRPC SDK's for the same seed."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import openai
import pytest

from bifrost.attest.policy import load_policy

from .test_e2e_serve import _start_serve, _stop_serve
from .test_generation_params import _tiny_chat_checkpoint

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me a secret."}]
SAMPLING = {"temperature": 0.9, "top_p": 0.95}
SEED, MAX_TOKENS = 1234, 24


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_proxy(proc: subprocess.Popen, base: str, log, timeout_s: float = 60) -> str:
    """Poll GET /v1/models until the proxy answers; returns the served model id."""
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"bifrost proxy did not start: {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{base}/models", timeout=5) as r:
                return json.load(r)["data"][0]["id"]
        except OSError:
            time.sleep(0.2)


def _pick_stop(text: str) -> str:
    """A short printable substring from the middle of ``text`` (so the stop sequence really triggers)."""
    for i in range(max(1, len(text) // 3), len(text) - 2):
        cand = text[i:i + 2]
        if cand.isprintable() and cand.strip() == cand and "\ufffd" not in cand and text.index(cand) > 0:
            return cand
    pytest.fail(f"no usable stop sequence in {text!r}")


def test_openai_stream_through_proxy_equals_sdk(tmp_path):
    from bifrost.serve.client import BifrostClient

    model_dir = _tiny_chat_checkpoint(tmp_path / "chat-gpt2")
    serve = proxy = None
    try:
        serve, address = _start_serve(tmp_path, "--model", model_dir, "--policy", "tee-only", "--runtime", "local",
                                      "--evidence", "simulated", "--local-workers", "1")
        policy_file = tmp_path / "policy.yaml"
        made = subprocess.run([sys.executable, "-m", "bifrost.cli", "attest", "init-policy", "--address", address,
                               "--out", str(policy_file)], capture_output=True, text=True, timeout=60)
        assert made.returncode == 0, made.stderr
        policy = load_policy(policy_file)
        assert policy.allow_simulated and len(policy.model_digests) == 1 and len(policy.serving_config_digests) == 1

        with BifrostClient(address, policy, timeout_s=60) as sdk:
            sdk.attest()
            full = sdk.chat(messages=MESSAGES, max_new_tokens=MAX_TOKENS, sample_seed=SEED, **SAMPLING).text
            stop = _pick_stop(full)
            want = sdk.chat(messages=MESSAGES, max_new_tokens=MAX_TOKENS, sample_seed=SEED, stop=[stop], **SAMPLING)
        assert want.finish_reason == "stop" and want.text == full[:full.index(stop)]

        port, log = _free_port(), tmp_path / "proxy.log"
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        proxy = subprocess.Popen([sys.executable, "-m", "bifrost.cli", "proxy", "--address", address, "--policy",
                                  str(policy_file), "--listen", f"127.0.0.1:{port}", "--sessions", "1"],
                                 stdout=subprocess.DEVNULL, stderr=open(log, "wb"), env=env)
        base = f"http://127.0.0.1:{port}/v1"
        model = _wait_for_proxy(proxy, base, log)
        client = openai.OpenAI(base_url=base, api_key="unused", max_retries=0, timeout=60)
        chunks = list(client.chat.completions.create(
            model=model, messages=MESSAGES, max_tokens=MAX_TOKENS, seed=SEED, stop=[stop], stream=True,
            stream_options={"include_usage": True}, **SAMPLING))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        usage = chunks[-1].usage
        assert text == want.text and text != full
        assert finish == ["stop"]
        assert usage is not None and usage.prompt_tokens == want.prompt_tokens > 0
        assert usage.completion_tokens > 0 and usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    finally:
        if proxy is not None:
            proxy.kill()
            proxy.wait()
        if serve is not None:
            _stop_serve(serve)
