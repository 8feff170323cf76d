"""`bifrost proxy`: the official `openai` client talks to an attested server through the local proxy."""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
import time

import openai
import pytest
import yaml

from .conftest import MODEL, make_policy


def _pool(app, sessions: int = 2, policy=None):
    from bifrost.serve.client import BifrostClient
    from bifrost.serve.proxy import SessionPool

    pol = policy or make_policy(app.service.info.model_digest)
    return SessionPool(lambda: BifrostClient(f"127.0.0.1:{app.port}", pol, timeout_s=120), sessions, timeout_s=120)


API_KEY = "test-key-" + "k" * 24


@contextlib.contextmanager
def running_proxy(app, sessions: int = 2, api_key: str | None = None):
    """(OpenAI client, pool) for a proxy in front of ``app`` on a free port, stopped afterwards."""
    from bifrost.serve.proxy import ProxyAccess, create_app, start_in_thread

    pool = _pool(app, sessions)
    server, port, thread = start_in_thread(create_app(pool, ProxyAccess(api_key=api_key)))
    try:
        yield openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=api_key or "unused", max_retries=0,
                            timeout=120), pool
    finally:
        server.should_exit = True
        thread.join(30)
        pool.close()


@pytest.fixture(scope="module")
def proxy(local_app):
    """The real OpenAI client with an API key set: every test using this fixture also checks that the key works."""
    with running_proxy(local_app, api_key=API_KEY) as (client, pool):
        yield client, pool


def sdk_text(app, prompt: str, n: int, seed: int | None) -> str:
    from bifrost.serve.client import BifrostClient

    with BifrostClient(f"127.0.0.1:{app.port}", make_policy(app.service.info.model_digest), timeout_s=120) as c:
        c.attest()
        return c.chat(prompt, n, reset_history=True, sample_seed=seed).text


def test_completions_match_the_grpc_sdk_streaming_and_not(local_app, proxy):
    client, _ = proxy
    prompt, n, seed = "The attested proxy says", 6, 7
    want = sdk_text(local_app, prompt, n, seed)
    assert want
    got = client.completions.create(model=MODEL, prompt=prompt, max_tokens=n, seed=seed)
    assert got.choices[0].text == want
    assert got.object == "text_completion" and got.model == MODEL
    assert got.usage.completion_tokens == n and got.usage.total_tokens >= n
    assert got.choices[0].finish_reason == "length"
    chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=n, seed=seed, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == want
    assert chunks[-1].choices[0].finish_reason == "length"


def test_models_list_and_unknown_model_and_n(proxy):
    client, pool = proxy
    assert [m.id for m in client.models.list().data] == [MODEL] == [pool.model.name]
    with pytest.raises(openai.NotFoundError) as info:
        client.completions.create(model="gpt-4o", prompt="hi", max_tokens=2)
    assert info.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt="hi", max_tokens=2, n=2)
    assert info.value.body["param"] == "n" and info.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt="hi", max_tokens=-1)
    with pytest.raises(openai.BadRequestError, match="encoder"):  # embeddings need an encoder model
        client.embeddings.create(model=MODEL, input="hi")


def test_a_server_refusal_keeps_its_status_and_sealed_reason(proxy, serve_config):
    client, _ = proxy
    with pytest.raises(openai.BadRequestError) as info:  # max_new_tokens over the server's limit: INVALID_ARGUMENT
        client.completions.create(model=MODEL, prompt="hi", max_tokens=serve_config.max_new_tokens + 1)
    assert info.value.body["code"] == "invalid_argument" and "max_new_tokens" in info.value.body["message"]
    with pytest.raises(openai.BadRequestError):  # the same error before the stream's first chunk: an HTTP status
        list(client.completions.create(model=MODEL, prompt="hi", max_tokens=serve_config.max_new_tokens + 1,
                                       stream=True))


def test_concurrent_requests_use_the_pool(local_app, proxy):
    from concurrent.futures import ThreadPoolExecutor

    client, pool = proxy
    want = sdk_text(local_app, "one two three", 3, 1)
    with ThreadPoolExecutor(4) as ex:
        texts = list(ex.map(lambda _: client.completions.create(model=MODEL, prompt="one two three", max_tokens=3,
                                                                seed=1).choices[0].text, range(4)))
    assert texts == [want] * 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _policy_file(tmp_path, digest_hex: str) -> str:
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump({"allow_simulated": True, "model_digests": [digest_hex]}))
    return str(path)


def test_the_proxy_refuses_to_start_without_a_server(tmp_path, capsys):
    from bifrost.cli import main

    rc = main(["proxy", "--address", f"127.0.0.1:{_free_port()}", "--policy", _policy_file(tmp_path, "00" * 32),
               "--listen", f"127.0.0.1:{_free_port()}", "--timeout", "10"])
    err = capsys.readouterr().err.strip()
    assert rc != 0 and len(err.splitlines()) == 1 and "nothing is served" in err and "UNAVAILABLE" in err


def test_the_proxy_refuses_a_server_whose_model_digest_is_not_pinned(local_app, tmp_path, capsys):
    from bifrost.cli import main

    listen = _free_port()
    rc = main(["proxy", "--address", f"127.0.0.1:{local_app.port}", "--policy", _policy_file(tmp_path, "ab" * 32),
               "--listen", f"127.0.0.1:{listen}"])
    err = capsys.readouterr().err.strip()
    assert rc != 0 and len(err.splitlines()) == 1 and "nothing is served" in err and "digest" in err
    with socket.socket() as s:  # and nothing listens
        assert s.connect_ex(("127.0.0.1", listen)) != 0


def test_an_expired_token_is_re_attested_transparently(app_factory, worker_factory):
    _, _, endpoint = worker_factory(MODEL, 64)
    app = app_factory(worker=endpoint, token_lifetime_s=1)
    with running_proxy(app, sessions=1) as (client, pool):
        first = client.completions.create(model=MODEL, prompt="again and", max_tokens=3, seed=3).choices[0].text
        session, before = pool.clients[0].session_id, pool.reattestations  # a slow first turn may re-attest already
        time.sleep(2.2)
        chunks = list(client.completions.create(model=MODEL, prompt="again and", max_tokens=3, seed=3, stream=True))
        assert "".join(c.choices[0].text for c in chunks) == first
        assert pool.reattestations == before + 1 and pool.clients[0].session_id != session
        time.sleep(2.2)
        assert client.completions.create(model=MODEL, prompt="again and", max_tokens=3, seed=3).choices[0].text == first
        assert pool.reattestations == before + 2


def test_embeddings_from_an_encoder_server(worker_factory, serve_run_config, serve_config, tmp_path):
    import numpy as np

    from bifrost.tee.deploy import ServeApp
    from bifrost.tee.runtime import plaintext_embeddings

    from .conftest import worker_config

    _, _, endpoint = worker_factory("minilm", 64)
    cfg = serve_run_config.replace(model="minilm")
    app = ServeApp(cfg, serve_config.replace(**worker_config(endpoint, tmp_path))).start()
    try:
        with running_proxy(app, sessions=1) as (client, _):
            texts = ["a private sentence", "another one"]
            got = np.array([d.embedding for d in client.embeddings.create(model="minilm", input=texts).data])
            floats = client.embeddings.create(model="minilm", input=texts[0], encoding_format="float").data[0]
            with pytest.raises(openai.BadRequestError, match="encoder"):
                client.completions.create(model="minilm", prompt="no generation", max_tokens=1)
        want = plaintext_embeddings("minilm", cfg.seed, texts)
        cos = np.sum(got * want, axis=1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1))
        assert got.shape == want.shape and np.all(cos > 0.999)
        f = np.array(floats.embedding)  # CKKS noise differs per call: compare to plaintext, not to the first call
        assert f.shape == want[0].shape and f @ want[0] / (np.linalg.norm(f) * np.linalg.norm(want[0])) > 0.999
    finally:
        app.stop()


def test_chat_completions_streaming_and_not(serve_run_config, serve_config, tmp_path):
    """Chat completions through the model's chat template (a tiny checkpoint with one: gpt2-mini has none),
    equal to the gRPC SDK's messages turn; streaming equals non-streaming."""
    from bifrost.serve.client import BifrostClient
    from bifrost.tee.deploy import ServeApp

    from .test_generation_params import _tiny_chat_checkpoint

    path = _tiny_chat_checkpoint(tmp_path / "chat-gpt2")
    app = ServeApp(serve_run_config.replace(model=path, policy="tee-only"),
                   serve_config.replace(workers=(), worker_certs=())).start()
    try:
        messages = [{"role": "user", "content": "Say something private."}]
        with BifrostClient(f"127.0.0.1:{app.port}", make_policy(app.service.info.model_digest), timeout_s=120) as c:
            c.attest()
            want = c.chat(messages=messages, max_new_tokens=5, sample_seed=2)
        with running_proxy(app) as (client, _):
            model = client.models.list().data[0].id
            got = client.chat.completions.create(model=model, messages=messages, max_tokens=5, seed=2)
            text = got.choices[0].message.content
            assert got.object == "chat.completion" and got.choices[0].message.role == "assistant"
            assert text == want.text and got.usage.prompt_tokens == want.prompt_tokens > 0
            assert got.usage.completion_tokens == len(want.tokens)
            assert got.choices[0].finish_reason == want.finish_reason
            chunks = list(client.chat.completions.create(model=model, messages=messages, max_completion_tokens=5,
                                                         seed=2, stream=True, stream_options={"include_usage": True}))
            assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
            assert chunks[-1].usage.prompt_tokens == got.usage.prompt_tokens
    finally:
        app.stop()


def test_sampling_parameters_and_stop_reach_the_server(local_app, proxy):
    client, _ = proxy
    prompt = "The attested proxy says"
    want = sdk_text(local_app, prompt, 8, 5)
    got = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, seed=5, temperature=0.7, top_p=0.9,
                                    extra_body={"top_k": 20})
    assert got.choices[0].finish_reason in ("stop", "length") and got.usage.prompt_tokens > 0
    cut = want.strip().split()[0] if want.strip() else "x"
    stopped = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, seed=5, stop=[cut])
    assert cut not in stopped.choices[0].text and stopped.choices[0].finish_reason == "stop"


# -- error paths against a scripted client (no server): mid-stream errors, failed re-attestation -----------
class ScriptedClient:
    """Stands in for BifrostClient: ``script`` says what each generate() call does."""

    def __init__(self, script) -> None:
        from bifrost.proto import serving_pb2

        self.script, self.attests, self.attest_error = list(script), 0, None
        self.verdict, self.model_digest, self.session_id = None, b"\x01" * 32, b""
        self.listing = serving_pb2.ListModelsReply(models=[serving_pb2.ModelInfo(
            name=MODEL, task="causal-lm", model_digest=self.model_digest, max_new_tokens=8)])

    def attest(self):
        self.attests += 1
        if self.attest_error and self.attests > 1:
            raise self.attest_error

    def list_models(self):
        return self.listing

    def generate(self, prompt, max_new_tokens=0, reset_history=False, sample_seed=None):
        from bifrost.serve.client import StreamEvent

        for step in self.script.pop(0):
            if isinstance(step, Exception):
                raise step
            yield StreamEvent([1], step, time.perf_counter(), 0.0)

    def close(self):
        pass


@contextlib.contextmanager
def scripted_proxy(client, access=None):
    from bifrost.serve.proxy import SessionPool, create_app, start_in_thread

    pool = SessionPool(lambda: client, 1, timeout_s=30)
    server, port, thread = start_in_thread(create_app(pool, access))
    try:
        yield openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=30)
    finally:
        server.should_exit = True
        thread.join(30)


def test_an_error_mid_stream_is_the_last_event_and_before_it_an_http_status():
    import grpc

    from bifrost.serve.client import ServingError

    down = ServingError(grpc.StatusCode.UNAVAILABLE, "worker lost mid-turn", sealed=True)
    busy = ServingError(grpc.StatusCode.RESOURCE_EXHAUSTED, "too many sessions")
    with scripted_proxy(ScriptedClient([["a", "b", down], [busy], [down]])) as client:
        stream = client.completions.create(model=MODEL, prompt="x", stream=True)
        texts = []
        with pytest.raises(openai.APIError, match="worker lost mid-turn"):
            for c in stream:
                texts.append(c.choices[0].text)
        assert texts == ["a", "b"]
        with pytest.raises(openai.RateLimitError, match="too many sessions"):
            client.completions.create(model=MODEL, prompt="x")
        with pytest.raises(openai.InternalServerError) as info:  # 503
            client.completions.create(model=MODEL, prompt="x", stream=True)
        assert info.value.status_code == 503 and info.value.body["code"] == "unavailable"


def test_an_expired_token_whose_re_attestation_fails_is_401():
    import grpc

    from bifrost.errors import BifrostError
    from bifrost.serve.client import ServingError

    expired = ServingError(grpc.StatusCode.UNAUTHENTICATED, "token expired")
    scripted = ScriptedClient([[expired], ["ok"], [expired], [expired]])
    with scripted_proxy(scripted) as client:
        assert client.completions.create(model=MODEL, prompt="x").choices[0].text == "ok"  # re-attested, retried
        assert scripted.attests == 2
        scripted.attest_error = BifrostError("evidence refused by the policy")
        with pytest.raises(openai.AuthenticationError, match="re-attestation failed: evidence refused"):
            client.completions.create(model=MODEL, prompt="x")


# -- cross-site use refused: Host (DNS rebinding), Origin, Content-Type (CSRF), API key ---------------------
def _raw(port: int, method: str, path: str = "/v1/completions", headers: dict | None = None, body: bytes | None = None,
         host: str | None = None):
    """(status, headers, JSON body or None) of one hand-made request; ``host`` replaces the Host header."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        hdrs = {"Host": host or f"127.0.0.1:{port}", **(headers or {})}
        conn.request(method, path, body=body, headers=hdrs)
        r = conn.getresponse()
        data = r.read()
        return r.status, r.headers, json.loads(data) if data else None
    finally:
        conn.close()


JSON = {"Content-Type": "application/json"}
BODY = json.dumps({"model": MODEL, "prompt": "x"}).encode()


def _refused(answer, status: int, code: str) -> dict:
    got, _, body = answer
    assert got == status and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["code"] == code and body["error"]["param"] is None
    return body["error"]


def test_the_issue_s_cross_site_request_and_dns_rebinding_are_refused_before_the_model_runs():
    from bifrost.serve.proxy import ProxyAccess

    scripted = ScriptedClient([["never"]])
    with scripted_proxy(scripted, ProxyAccess(allowed_origins=("https://app.example",))) as client:
        port = client.base_url.port
        # the report: text/plain from a page on attacker.example whose name was rebound to 127.0.0.1
        evil = {"Content-Type": "text/plain", "Origin": "https://attacker.example"}
        err = _refused(_raw(port, "POST", headers=evil, body=BODY, host="attacker.example"), 421, "host_not_allowed")
        assert "attacker.example" in err["message"]
        _refused(_raw(port, "POST", headers=JSON, body=BODY, host=f"attacker.example:{port}"), 421, "host_not_allowed")
        _refused(_raw(port, "GET", "/v1/models", host=f"attacker.example:{port}"), 421, "host_not_allowed")
        _refused(_raw(port, "GET", "/nothing-here", host=f"attacker.example:{port}"), 421, "host_not_allowed")
        _refused(_raw(port, "GET", "/v1/models", host=f"127.0.0.1:{port + 1}"), 421, "host_not_allowed")
        _refused(_raw(port, "GET", "/v1/models", host=f"0.0.0.0:{port}"), 421, "host_not_allowed")
        # the right Host but a foreign Origin (plain CSRF): 403, even as CORS preflight
        err = _refused(_raw(port, "POST", headers={**evil, "Content-Type": "application/json"}, body=BODY), 403,
                       "origin_not_allowed")
        assert err["type"] == "permission_error"
        _refused(_raw(port, "GET", "/v1/models", headers={"Origin": "null"}), 403, "origin_not_allowed")
        status, headers, _ = _raw(port, "OPTIONS", headers={"Origin": "https://attacker.example",
                                                            "Access-Control-Request-Method": "POST"})
        assert status == 403 and "access-control-allow-origin" not in headers
        # a body that is not JSON (what forms and text/plain fetches send without a preflight): 415
        for ctype in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None):
            _refused(_raw(port, "POST", headers={"Content-Type": ctype} if ctype else {}, body=BODY), 415,
                     "unsupported_media_type")
        assert scripted.script == [["never"]]  # nothing above reached the model
        # loopback names with the port, JSON with a charset, and the allowed origin pass
        for host in (f"localhost:{port}", f"LOCALHOST:{port}", f"[::1]:{port}"):
            assert _raw(port, "GET", "/v1/models", host=host)[0] == 200
        status, headers, body = _raw(port, "POST", headers={"Content-Type": "application/json; charset=utf-8",
                                                            "Origin": "https://app.example"}, body=BODY)
        assert status == 200 and body["choices"][0]["text"] == "never" and scripted.script == []
        assert headers["access-control-allow-origin"] == "https://app.example" and "Origin" in headers["vary"]
        status, headers, _ = _raw(port, "OPTIONS", headers={
            "Origin": "https://app.example", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type, x-stainless-lang"})
        assert status == 204 and headers["access-control-allow-origin"] == "https://app.example"
        assert "POST" in headers["access-control-allow-methods"]
        assert headers["access-control-allow-headers"] == "authorization, content-type, x-stainless-lang"


def test_allowed_hosts_admit_a_reverse_proxy_s_name():
    from bifrost.serve.proxy import ProxyAccess

    access = ProxyAccess(allowed_hosts=("llm.internal", "Exact.Example:8443"))
    with scripted_proxy(ScriptedClient([]), access) as client:
        port = client.base_url.port
        for host in ("llm.internal", "llm.internal:443", "exact.example:8443"):
            assert _raw(port, "GET", "/v1/models", host=host)[0] == 200, host
        for host in ("exact.example", "exact.example:443", "evil.llm.internal", "llm.internal.evil"):
            _refused(_raw(port, "GET", "/v1/models", host=host), 421, "host_not_allowed")


def test_the_api_key_is_required_and_compared(proxy):
    client, _ = proxy
    port = client.base_url.port
    for auth in (None, "Bearer wrong-key-" + "w" * 20, f"Basic {API_KEY}", f"Bearer {API_KEY}x", API_KEY):
        status, headers, body = _raw(port, "POST", headers={**JSON, **({"Authorization": auth} if auth else {})},
                                     body=BODY)
        assert status == 401 and headers["www-authenticate"] == "Bearer", auth
        assert body["error"]["code"] == "invalid_api_key" and body["error"]["type"] == "authentication_error"
        assert _raw(port, "GET", "/v1/models", headers={"Authorization": auth} if auth else {})[0] == 401
    assert _raw(port, "GET", "/v1/models", headers={"Authorization": f"bearer {API_KEY}"})[0] == 200
    # the key is checked before the media type: an unauthenticated caller learns nothing else
    assert _raw(port, "POST", headers={"Content-Type": "text/plain"}, body=BODY)[0] == 401
    _refused(_raw(port, "POST", headers={"Content-Type": "text/plain", "Authorization": f"Bearer {API_KEY}"},
                  body=BODY), 415, "unsupported_media_type")
    with pytest.raises(openai.AuthenticationError):  # the official client with a wrong key
        client.with_options(api_key="wrong-key-" + "w" * 20).models.list()
    assert [m.id for m in client.models.list().data] == [MODEL]  # and with the right one


def test_access_options_are_validated_with_one_line_errors():
    from bifrost.errors import BifrostError
    from bifrost.serve.proxy import ProxyAccess

    assert ProxyAccess("0.0.0.0", 8080, api_key=API_KEY).loopback is False
    assert ProxyAccess("::1", 8080).loopback and ProxyAccess("localhost", 8080).loopback
    assert ProxyAccess(allowed_origins=("HTTPS://App.Example:443/",)).allowed_origins == ("https://app.example",)
    assert API_KEY not in repr(ProxyAccess(api_key=API_KEY))
    for kwargs, words in [({"listen_host": "10.0.0.5"}, "API key"), ({"listen_host": "::"}, "API key"),
                          ({"listen_host": "proxy.lan"}, "API key"), ({"api_key": "short"}, "at least"),
                          ({"allowed_origins": ("app.example",)}, "--allowed-origin"),
                          ({"allowed_origins": ("https://app.example/path",)}, "--allowed-origin"),
                          ({"allowed_origins": ("null",)}, "--allowed-origin"),
                          ({"allowed_hosts": ("http://x",)}, "--allowed-host"),
                          ({"allowed_hosts": ("::1",)}, "--allowed-host")]:
        with pytest.raises(BifrostError, match=words) as info:
            ProxyAccess(**kwargs)
        assert "\n" not in str(info.value)


def test_a_non_loopback_proxy_without_an_api_key_refuses_to_start(tmp_path, capsys, monkeypatch):
    from bifrost.cli import main

    monkeypatch.delenv("BIFROST_PROXY_API_KEY", raising=False)
    base = ["proxy", "--address", f"127.0.0.1:{_free_port()}", "--policy", _policy_file(tmp_path, "00" * 32),
            "--timeout", "5"]
    rc = main([*base, "--listen", f"0.0.0.0:{_free_port()}"])
    err = capsys.readouterr().err.strip()
    # refused before anything connects: not the unreachable server's error
    assert rc != 0 and len(err.splitlines()) == 1 and "BIFROST_PROXY_API_KEY" in err and "nothing is served" not in err
    rc = main([*base, "--listen", f"127.0.0.1:{_free_port()}", "--allowed-origin", "attacker.example"])
    err = capsys.readouterr().err.strip()
    assert rc != 0 and len(err.splitlines()) == 1 and "--allowed-origin" in err
    monkeypatch.setenv("BIFROST_PROXY_API_KEY", API_KEY)  # with the key, startup proceeds to attestation
    rc = main([*base, "--listen", f"0.0.0.0:{_free_port()}"])
    err = capsys.readouterr().err.strip()
    assert rc != 0 and "nothing is served" in err
