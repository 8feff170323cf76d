"""An OpenAI-compatible HTTP API on the client's machine, in front of an attested Bifrost server.

The proxy is client-side code (it never imports the trusted runtime): it attests the server under the
caller's policy *before* it serves anything, keeps a small pool of attested :class:`BifrostClient`
sessions (concurrent HTTP requests do not serialize on one session), and turns each OpenAI request into
one sealed turn with ``reset_history=True`` (OpenAI requests are stateless). Nothing leaves the machine
before attestation succeeded, and prompts leave it only sealed for the attested replica.

Endpoints: ``POST /v1/chat/completions``, ``POST /v1/completions`` (``stream``: SSE ``data: {...}``
chunks ending with ``data: [DONE]``), ``POST /v1/embeddings`` (encoder models), ``GET /v1/models``.

Errors are OpenAI-shaped (``{"error": {"message", "type", "param", "code"}}``): bad parameters 400,
unknown model 404, server refusals by gRPC status (:data:`STATUS_HTTP`; a sealed refusal's reason is
the message), an error after streaming began is a last SSE event holding the error object.

Session tokens expire: a request answered UNAUTHENTICATED (or NOT_FOUND: the server dropped the idle
session) before anything was streamed re-attests that session once and is retried; a failed
re-attestation is 401. A session the server lost (its session-lost marker: replica or node lost, front end
restarted) is handled by the SDK the same way (every proxy turn is ``reset_history=True``, so it is sent
again once if nothing was streamed); a loss after tokens were streamed ends the SSE stream with an error
event (code ``session_lost``, type ``service_unavailable``), a non-streamed request answers 503 with it:
never a silently short answer.

Cross-site use is refused (:class:`ProxyAccess`, checked by :class:`AccessGuard` before any route runs, in
this order), so a web page the user visits can neither drive the private model (CSRF) nor read its answers
(DNS rebinding):

1. ``Host`` must name the listen address (``HOST:PORT``; for a loopback or wildcard bind also
   ``localhost``, ``127.0.0.1``, ``[::1]`` with the port) or an ``--allowed-host`` entry, else 421
   Misdirected Request (RFC 9110: this server does not answer for that authority; a rebound DNS name
   is exactly that).
2. A request carrying ``Origin`` (browsers send it on cross-origin and POST requests) must name an
   ``--allowed-origin`` (none by default), else 403. A CORS preflight (``OPTIONS`` with
   ``Access-Control-Request-Method``) from an allowed origin is answered 204 with the
   ``Access-Control-Allow-*`` headers; answers to an allowed origin carry ``Access-Control-Allow-Origin``.
3. With an API key (``BIFROST_PROXY_API_KEY``, or ``--api-key``; required to listen on a non-loopback
   address) ``Authorization: Bearer KEY`` must match (constant-time), else 401 with
   ``WWW-Authenticate: Bearer``.
4. A request with a body (any method but GET, HEAD, OPTIONS) must be ``Content-Type: application/json``
   (parameters such as ``charset`` allowed), else 415: HTML forms and ``text/plain`` cannot send it
   without a preflight.
"""

from __future__ import annotations

import base64
import hmac
import inspect
import ipaddress
import json
import queue
import re
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Generator
from urllib.parse import urlsplit

import grpc
import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers, MutableHeaders
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import BifrostError, RefusedError, UnavailableError, UserError
from .client import BifrostClient, ServingError, SessionLostError, StreamEvent

# gRPC status of a server refusal -> (HTTP status, OpenAI error type)
STATUS_HTTP: dict[grpc.StatusCode, tuple[int, str]] = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.OUT_OF_RANGE: (400, "invalid_request_error"),
    grpc.StatusCode.FAILED_PRECONDITION: (400, "invalid_request_error"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "permission_error"),
    grpc.StatusCode.NOT_FOUND: (404, "not_found_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout"),
}
REATTEST_CODES = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.NOT_FOUND)


def _reattest_and_retry(exc: ServingError, client: BifrostClient, losses_before: int) -> bool:
    """Whether a failure before anything was streamed is retried on a re-attested session: an expired or
    dropped session without the session-lost marker, and only when the SDK has not already replaced a lost
    session during this request (one request is sent at most twice, whoever retries it)."""
    return (exc.code in REATTEST_CODES and not isinstance(exc, SessionLostError) and not exc.session_lost
            and getattr(client, "session_losses", 0) == losses_before)

# optional keyword arguments of BifrostClient.generate, by OpenAI parameter (passed only when set)
SDK_PARAMS = ("messages", "temperature", "top_p", "top_k", "stop")


class ApiError(Exception):
    """An OpenAI-shaped error answer."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def api_error(exc: BaseException) -> ApiError:
    """Any failure as an :class:`ApiError` (a refusal by its gRPC status; other client failures 502)."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, ServingError) and getattr(exc, "session_lost", None):
        return ApiError(503, exc.details or str(exc), "service_unavailable", None, "session_lost")
    if isinstance(exc, ServingError):
        status, type_ = STATUS_HTTP.get(exc.code, (502, "api_error"))
        return ApiError(status, exc.details or str(exc), type_, None, exc.code.name.lower())
    if isinstance(exc, BifrostError):
        return ApiError(502, str(exc), "api_error", None, "bad_gateway")
    return ApiError(500, f"internal proxy error ({type(exc).__name__})", "api_error", None, "internal_error")


# -- who may use the HTTP API ------------------------------------------------------------------------
API_KEY_ENV = "BIFROST_PROXY_API_KEY"
MIN_API_KEY_CHARS = 16
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")
_HOST_RE = re.compile(r"(\[[0-9a-f:.]+\]|[a-z0-9_](?:[a-z0-9_.-]*[a-z0-9_])?)(?::([0-9]{1,5}))?")
_TOKEN_LIST_RE = re.compile(r"[!#$%&'*+.^_`|~0-9a-z-]+(?:\s*,\s*[!#$%&'*+.^_`|~0-9a-z-]+)*")


def _split_host(value: str) -> tuple[str, int | None] | None:
    """``NAME[:PORT]`` (IPv6 in brackets, lower-cased) as ``(name, port or None)``; None when malformed."""
    m = _HOST_RE.fullmatch(value.strip().lower())
    if not m or (m.group(2) is not None and int(m.group(2)) > 65535):
        return None
    return m.group(1), None if m.group(2) is None else int(m.group(2))


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


def _origin(value: str) -> str:
    """An ``--allowed-origin`` as browsers serialize ``Origin``: ``scheme://host[:port]``, default port left out."""
    bad = UserError(f"--allowed-origin must be http(s)://HOST[:PORT] (no path), got {value!r}")
    try:
        u = urlsplit(value.strip())
        port = u.port
    except ValueError:
        raise bad from None
    if (u.scheme not in ("http", "https") or u.path not in ("", "/") or u.query or u.fragment or u.username
            or u.password is not None or not u.hostname):
        raise bad
    host = f"[{u.hostname}]" if ":" in u.hostname else u.hostname
    if _split_host(host) is None:
        raise bad
    default = 80 if u.scheme == "http" else 443
    return f"{u.scheme}://{host}" + (f":{port}" if port is not None and port != default else "")


@dataclass(frozen=True)
class ProxyAccess:
    """Who may use the proxy's HTTP API (see the module docstring); validated here, one-line errors.

    ``port`` 0: the port each connection arrived on (a proxy started on a free port)."""
    listen_host: str = "127.0.0.1"
    port: int = 0
    allowed_hosts: tuple[str, ...] = ()    # NAME (any port) or NAME:PORT, e.g. behind a reverse proxy
    allowed_origins: tuple[str, ...] = ()  # http(s)://HOST[:PORT]; none: every request with Origin refused
    api_key: str | None = field(default=None, repr=False)
    _names: frozenset[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        host = self.listen_host.strip("[]").lower()
        ip = _ip(host)
        name = f"[{ip.compressed}]" if ip is not None and ip.version == 6 else (ip.compressed if ip else host)
        if not host or _split_host(name) is None:
            raise UserError(f"--listen host {self.listen_host!r} is not a host name or IP address")
        if not 0 <= self.port <= 65535:
            raise UserError(f"--listen port must be 0..65535, got {self.port}")
        hosts = []
        for entry in self.allowed_hosts:
            parsed = _split_host(entry)
            if parsed is None:
                raise UserError(f"--allowed-host must be NAME or NAME:PORT (IPv6 in brackets), got {entry!r}")
            hosts.append(parsed[0] if parsed[1] is None else f"{parsed[0]}:{parsed[1]}")
        object.__setattr__(self, "allowed_hosts", tuple(hosts))
        object.__setattr__(self, "allowed_origins", tuple(_origin(o) for o in self.allowed_origins))
        key = self.api_key
        if key is not None and (len(key) < MIN_API_KEY_CHARS or not key.isascii() or not key.isprintable()
                                or " " in key):
            raise UserError(f"the API key must be at least {MIN_API_KEY_CHARS} printable ASCII characters "
                               "without spaces (e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))')")
        if not self.loopback and key is None:
            raise UserError(f"--listen {name}:{self.port} is not a loopback address: set an API key "
                               f"({API_KEY_ENV}=KEY in the environment, or --api-key) or listen on 127.0.0.1")
        names = {name}
        if self.loopback or (ip is not None and ip.is_unspecified):
            names.update(LOOPBACK_NAMES)  # a wildcard bind listens on loopback too
        if ip is not None and ip.is_unspecified:
            names.discard(name)  # 0.0.0.0 / [::] is no name a client uses (browsers reach 0.0.0.0 as localhost)
        object.__setattr__(self, "_names", frozenset(names))

    @property
    def loopback(self) -> bool:
        host = self.listen_host.strip("[]").lower()
        ip = _ip(host)
        return host == "localhost" if ip is None else ip.is_loopback

    def host_allowed(self, value: str | None, port: int) -> bool:
        parsed = _split_host(value) if value else None
        if parsed is None:
            return False
        name, got = parsed
        if name in self._names and (got == port or (got is None and port == 80)):
            return True
        return name in self.allowed_hosts or f"{name}:{got}" in self.allowed_hosts

    def check(self, headers: Headers, port: int) -> str | None:
        """Host and Origin (raises :class:`ApiError`); returns the allowed Origin, or None without one."""
        hosts = headers.getlist("host")
        if len(hosts) != 1 or not self.host_allowed(hosts[0], port):
            shown = ", ".join(repr(h[:100]) for h in hosts) or "none"
            raise ApiError(421, f"the Host header ({shown}) does not name this proxy's listen address (DNS "
                           "rebinding?); an operator can allow a name with --allowed-host", "invalid_request_error",
                           None, "host_not_allowed")
        origins = headers.getlist("origin")
        if not origins:
            return None
        if len(origins) != 1 or origins[0].lower() not in self.allowed_origins:
            raise ApiError(403, f"cross-origin requests from {origins[0][:100]!r} are not allowed (an operator can "
                           "allow an origin with --allowed-origin)", "permission_error", None, "origin_not_allowed")
        return origins[0]

    def check_request(self, method: str, headers: Headers) -> None:
        """The API key, then the body's media type (raises :class:`ApiError`)."""
        if self.api_key is not None:
            scheme, _, given = headers.get("authorization", "").strip().partition(" ")
            if not hmac.compare_digest(given.strip().encode("latin-1") if scheme.lower() == "bearer" else b"",
                                       self.api_key.encode()):
                raise ApiError(401, "a valid API key is required (Authorization: Bearer KEY)", "authentication_error",
                               None, "invalid_api_key", {"WWW-Authenticate": "Bearer"})
        if method not in ("GET", "HEAD", "OPTIONS"):
            media = headers.get("content-type", "").split(";", 1)[0].strip().lower()
            if media != "application/json":
                raise ApiError(415, "the request body must be Content-Type: application/json", "invalid_request_error",
                               None, "unsupported_media_type")

    def preflight_headers(self, origin: str, headers: Headers) -> dict[str, str]:
        requested = headers.get("access-control-request-headers", "").strip().lower()
        allow = requested if requested and _TOKEN_LIST_RE.fullmatch(requested) else "authorization, content-type"
        return {"Access-Control-Allow-Origin": origin, "Access-Control-Allow-Methods": "GET, POST",
                "Access-Control-Allow-Headers": allow, "Access-Control-Max-Age": "600",
                "Vary": "Origin, Access-Control-Request-Method, Access-Control-Request-Headers"}


class AccessGuard:
    """ASGI middleware: every HTTP request passes :class:`ProxyAccess` before any route (or 404) runs."""

    def __init__(self, app, access: ProxyAccess) -> None:
        self.app, self.access = app, access

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        server = scope.get("server") or (None, None)
        port = self.access.port or server[1] or 0
        origin = None
        try:
            origin = self.access.check(headers, port)
            if origin is not None and scope["method"] == "OPTIONS" and "access-control-request-method" in headers:
                response = Response(status_code=204, headers=self.access.preflight_headers(origin, headers))
                await response(scope, receive, send)
                return
            self.access.check_request(scope["method"], headers)
        except ApiError as err:
            response = JSONResponse(err.body(), status_code=err.status, headers=err.headers)
            await response(scope, receive, _with_origin(send, origin) if origin else send)
            return
        await self.app(scope, receive, _with_origin(send, origin) if origin else send)


def _with_origin(send, origin: str):
    """``send`` adding ``Access-Control-Allow-Origin`` (an allowed origin may read the answer)."""
    async def wrapped(message) -> None:
        if message["type"] == "http.response.start":
            headers = MutableHeaders(scope=message)
            headers["Access-Control-Allow-Origin"] = origin
            headers.add_vary_header("Origin")
        await send(message)
    return wrapped


# -- the session pool -------------------------------------------------------------------------------
class SessionPool:
    """``size`` attested clients of one server. ``acquire`` blocks until one is free (``timeout_s``)."""

    def __init__(self, make_client: Callable[[], BifrostClient], size: int, timeout_s: float = 600.0) -> None:
        if size < 1:
            raise UserError("--sessions must be at least 1")
        self.make_client, self.timeout_s = make_client, timeout_s
        self.clients: list[BifrostClient] = []
        self._free: queue.Queue[BifrostClient] = queue.Queue()
        self._reattested = 0  # by reattest(); the SDK counts the lost sessions it replaced itself
        try:
            for _ in range(size):
                client = make_client()
                self.clients.append(client)
                client.attest()  # raises (policy refusal, unreachable server): nothing is served
                self._free.put(client)
        except BaseException:
            self.close()
            raise
        first = self.clients[0]
        digests = {c.model_digest for c in self.clients}
        if len(digests) != 1:
            raise RefusedError("the server's sessions attested different model digests")
        self.verdict, self.model_digest = first.verdict, first.model_digest
        listing = first.list_models()
        # ListModels is not attested: take the entry whose digest the attestation bound
        models = [m for m in listing.models if m.model_digest == self.model_digest]
        if not models:
            self.close()
            raise RefusedError("the server lists no model with the attested model digest")
        self.model = models[0]

    def acquire(self) -> BifrostClient:
        try:
            return self._free.get(timeout=self.timeout_s)
        except queue.Empty:
            raise ApiError(503, f"all {len(self.clients)} attested sessions stayed busy for {self.timeout_s:g} s",
                           "service_unavailable", None, "sessions_busy") from None

    def release(self, client: BifrostClient) -> None:
        self._free.put(client)

    def reattest(self, client: BifrostClient) -> None:
        """A fresh attested session for ``client`` (its token expired or the server dropped it)."""
        try:
            client.attest()
        except BifrostError as exc:
            raise ApiError(401, f"re-attestation failed: {exc}", "authentication_error", None,
                           "attestation_failed") from None
        self._reattested += 1

    @property
    def reattestations(self) -> int:
        """Sessions re-attested so far: expired or dropped ones (here) and lost ones (by the SDK)."""
        return self._reattested + sum(getattr(c, "session_losses", 0) for c in self.clients)

    def close(self) -> None:
        for c in self.clients:
            try:
                c.close()
            except BifrostError:
                pass
        self.clients = []


# -- request parsing --------------------------------------------------------------------------------
@dataclass
class CompletionRequest:
    """One OpenAI generation request as SDK arguments."""
    prompt: str
    max_new_tokens: int
    sample_seed: int | None
    stream: bool
    include_usage: bool
    extra: dict[str, Any]  # optional SDK keywords, only those the request set


def _bad(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, "invalid_request_error", param, code)


def _number(body: dict, name: str, kind: type, lo: float | None = None, hi: float | None = None):
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
        raise _bad(f"'{name}' must be {'a number' if kind is float else 'an integer'}", name)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise _bad(f"'{name}' must be in [{lo}, {hi}]" if hi is not None else f"'{name}' must be >= {lo}", name)
    return kind(value)


def parse_completion_request(body: Any, chat: bool, sdk_params: frozenset[str]) -> CompletionRequest:
    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object")
    n = body.get("n")
    if n is not None and (isinstance(n, bool) or n != 1):
        raise _bad("only n=1 is supported", "n")
    extra: dict[str, Any] = {}
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise _bad("'messages' must be a non-empty list", "messages")
        out = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise _bad(f"messages[{i}] must be an object with a 'role'", "messages")
            content = m.get("content")
            if isinstance(content, list):  # content parts: text only
                if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
                    raise _bad(f"messages[{i}]: only text content is supported", "messages")
                content = "".join(str(p.get("text", "")) for p in content)
            if not isinstance(content, str):
                raise _bad(f"messages[{i}].content must be a string", "messages")
            out.append({"role": m["role"], "content": content})
        extra["messages"] = out
        prompt = ""
    else:
        raw = body.get("prompt")
        if isinstance(raw, list) and len(raw) == 1 and isinstance(raw[0], str):
            raw = raw[0]
        if not isinstance(raw, str):
            raise _bad("'prompt' must be a string (one prompt per request)", "prompt")
        prompt = raw
    max_tokens = body.get("max_completion_tokens") if chat and body.get("max_completion_tokens") is not None \
        else body.get("max_tokens")
    param = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1):
        raise _bad(f"'{param}' must be a positive integer", param)
    for name, lo, hi in (("temperature", 0.0, 2.0), ("top_p", 0.0, 1.0)):
        v = _number(body, name, float, lo, hi)
        if v is not None:
            extra[name] = v
    top_k = _number(body, "top_k", int, 0)
    if top_k is not None:
        extra["top_k"] = top_k
    stop = body.get("stop")
    if stop is not None:
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > 4:
            raise _bad("'stop' must be a string or a list of up to 4 non-empty strings", "stop")
        if stop:
            extra["stop"] = stop
    seed = _number(body, "seed", int)
    stream = body.get("stream", False)
    if not isinstance(stream, bool) and stream is not None:
        raise _bad("'stream' must be a boolean", "stream")
    opts = body.get("stream_options") or {}
    include_usage = bool(isinstance(opts, dict) and opts.get("include_usage"))
    missing = sorted(set(extra) - sdk_params)
    if missing:
        raise _bad(f"'{missing[0]}' is not supported by this proxy's Bifrost client SDK", missing[0], "unsupported_parameter")
    return CompletionRequest(prompt, max_tokens or 0, seed, bool(stream), include_usage, extra)


# -- generation --------------------------------------------------------------------------------------
class CompletionStream:
    """One turn on a pooled session: ``first()`` waits for the first event (re-attesting once on an expired
    token), then iteration yields every event; ``close()`` ends the turn and returns the session."""

    def __init__(self, pool: SessionPool, turn: CompletionRequest) -> None:
        self.pool, self.turn = pool, turn
        self.client: BifrostClient | None = pool.acquire()
        self.gen: Generator[StreamEvent, None, None] | None = None
        self.pending: list = []
        self.completion_tokens = 0
        self.prompt_tokens = 0
        self.finish_reason = ""

    def _start(self, client: BifrostClient) -> StreamEvent | None:
        t = self.turn
        self.gen = gen = client.generate(t.prompt, t.max_new_tokens, reset_history=True, sample_seed=t.sample_seed,
                                         **t.extra)
        return next(gen, None)

    def open(self) -> "CompletionStream":
        client = self.client
        assert client is not None  # open() runs once, on the session acquired in __init__
        losses = getattr(client, "session_losses", 0)
        try:
            try:
                ev = self._start(client)
            except ServingError as exc:
                if not _reattest_and_retry(exc, client, losses):
                    raise
                if self.gen is not None:
                    self.gen.close()
                self.pool.reattest(client)
                ev = self._start(client)
        except BaseException:
            self.close()
            raise
        if ev is not None:
            self.pending.append(ev)
        return self

    def __iter__(self):
        gen = self.gen
        assert gen is not None  # open() started the turn
        try:
            while True:
                ev = self.pending.pop() if self.pending else next(gen, None)
                if ev is None:
                    break
                self.completion_tokens += len(ev.token_ids)
                self.prompt_tokens = getattr(ev, "prompt_tokens", 0) or self.prompt_tokens
                self.finish_reason = getattr(ev, "finish_reason", "") or self.finish_reason
                yield ev
        finally:
            self.close()
        if not self.finish_reason:  # an SDK without finish_reason: infer it from the token budget
            limit = self.turn.max_new_tokens or self.pool.model.max_new_tokens
            self.finish_reason = "length" if limit and self.completion_tokens >= limit else "stop"

    def close(self) -> None:
        if self.gen is not None:
            self.gen.close()
        if self.client is not None:
            client, self.client = self.client, None
            self.pool.release(client)

    def usage(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def create_app(pool: SessionPool, access: ProxyAccess | None = None):
    """The FastAPI app serving ``pool``'s attested server to the requests ``access`` admits (default:
    loopback names only, no Origin, no API key)."""
    app = FastAPI(title="Bifrost attested OpenAI proxy", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(AccessGuard, access=access or ProxyAccess())
    info = pool.model
    name = info.name
    created = int(time.time())
    sdk_params = frozenset(p for p in SDK_PARAMS if p in inspect.signature(BifrostClient.generate).parameters)

    def error_response(exc: BaseException) -> JSONResponse:
        err = api_error(exc)
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(ApiError)
    async def _api_error(request, exc: ApiError):
        return error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc):
        return JSONResponse(ApiError(exc.status_code, str(exc.detail), "invalid_request_error").body(),
                            status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, exc):
        return error_response(_bad(f"invalid request: {exc.errors()[:1]}"))

    async def read_json(request: Request) -> dict:
        try:
            body = json.loads(await request.body() or b"null")
        except ValueError:
            raise _bad("the request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise _bad("the request body must be a JSON object")
        model = body.get("model")
        if not isinstance(model, str):
            raise _bad("'model' is required", "model")
        if model != name:
            raise ApiError(404, f"The model '{model}' does not exist (this server serves '{name}')",
                           "invalid_request_error", "model", "model_not_found")
        return body

    def model_card() -> dict:
        return {"id": name, "object": "model", "created": created, "owned_by": "bifrost"}

    @app.get("/v1/models")
    def list_models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model}")
    def get_model(model: str):
        if model != name:
            raise ApiError(404, f"The model '{model}' does not exist", "invalid_request_error", "model",
                           "model_not_found")
        return model_card()

    def generation(turn: CompletionRequest, chat: bool):
        if info.task == "encoder":
            raise _bad(f"'{name}' is an encoder model: use /v1/embeddings", "model", "unsupported_model_task")
        rid = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)
        obj = "chat.completion" if chat else "text_completion"
        try:  # errors before the first token: an HTTP error status
            stream = CompletionStream(pool, turn).open()
        except Exception as exc:  # noqa: BLE001 - every failure becomes an OpenAI error
            return error_response(exc)
        if not turn.stream:
            try:
                text = "".join(ev.text for ev in stream)
            except BaseException as exc:
                return error_response(exc)
            choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                       "finish_reason": stream.finish_reason} if chat else
                      {"index": 0, "text": text, "logprobs": None, "finish_reason": stream.finish_reason})
            return {"id": rid, "object": obj, "created": int(time.time()), "model": name, "choices": [choice],
                    "usage": stream.usage()}

        chunk_obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(delta: dict | str | None, finish: str | None) -> dict:
            c: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": finish}
            if chat:
                c["delta"] = delta or {}
            else:
                c["text"] = delta or ""
            out: dict[str, Any] = {"id": rid, "object": chunk_obj, "created": int(time.time()), "model": name,
                                   "choices": [c]}
            if turn.include_usage:
                out["usage"] = None
            return out

        def events():
            try:
                if chat:
                    yield _sse(chunk({"role": "assistant", "content": ""}, None))
                for ev in stream:
                    if ev.text:
                        yield _sse(chunk({"content": ev.text} if chat else ev.text, None))
                yield _sse(chunk({} if chat else "", stream.finish_reason))
                if turn.include_usage:
                    yield _sse({"id": rid, "object": chunk_obj, "created": int(time.time()), "model": name,
                                "choices": [], "usage": stream.usage()})
            except Exception as exc:  # noqa: BLE001 - mid-stream: the error is the last event
                yield _sse(api_error(exc).body())
            finally:
                stream.close()
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/completions")
    async def completions(request: Request):
        turn = parse_completion_request(await read_json(request), False, sdk_params)
        return await _in_thread(generation, turn, False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        turn = parse_completion_request(await read_json(request), True, sdk_params)
        return await _in_thread(generation, turn, True)

    @app.post("/v1/embeddings")
    async def embeddings(request: Request):
        body = await read_json(request)
        if info.task != "encoder":
            raise _bad(f"'{name}' is not an encoder model (task {info.task!r}); embeddings need one", "model",
                       "unsupported_model_task")
        texts = body.get("input")
        texts = [texts] if isinstance(texts, str) else texts
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
            raise _bad("'input' must be a string or a non-empty list of strings (token arrays are not supported)",
                       "input")
        fmt = body.get("encoding_format") or "float"
        if fmt not in ("float", "base64"):
            raise _bad("'encoding_format' must be 'float' or 'base64'", "encoding_format")
        vectors = await _in_thread(_embed, pool, texts)
        data = []
        for i, v in enumerate(vectors):
            emb = (base64.b64encode(np.asarray(v, dtype="<f4").tobytes()).decode() if fmt == "base64"
                   else [float(x) for x in v])
            data.append({"object": "embedding", "index": i, "embedding": emb})
        return {"object": "list", "data": data, "model": name, "usage": {"prompt_tokens": 0, "total_tokens": 0}}

    return app


def _embed(pool: SessionPool, texts: list[str]) -> np.ndarray:
    client = pool.acquire()
    losses = getattr(client, "session_losses", 0)
    try:
        try:
            return client.embed(texts)
        except ServingError as exc:
            if not _reattest_and_retry(exc, client, losses):
                raise
            pool.reattest(client)
            return client.embed(texts)
    except BifrostError as exc:
        raise api_error(exc) from None
    finally:
        pool.release(client)


async def _in_thread(fn, *args):
    return await run_in_threadpool(fn, *args)


def serve_pool(pool: SessionPool, access: ProxyAccess, log_level: str = "warning") -> None:
    """Serve the OpenAI API on ``access``'s listen address with uvicorn until interrupted (the pool is closed
    afterwards)."""
    import uvicorn

    try:
        uvicorn.run(create_app(pool, access), host=access.listen_host.strip("[]"), port=access.port,
                    log_level=log_level)
    finally:
        pool.close()


def start_in_thread(app, host: str = "127.0.0.1", port: int = 0):
    """Run ``app`` under uvicorn in a daemon thread; returns ``(server, port, thread)``; stop with
    ``server.should_exit = True``."""
    import uvicorn

    config = uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True, name="bifrost-proxy")
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise UnavailableError(f"the proxy did not start on {host}:{port}")
        time.sleep(0.02)
    bound = server.servers[0].sockets[0].getsockname()[1] if port == 0 else port
    return server, bound, thread
