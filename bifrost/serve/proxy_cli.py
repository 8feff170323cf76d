"""``bifrost proxy``: an OpenAI-compatible HTTP API on this machine, in front of an attested Bifrost server
(client side: :mod:`bifrost.serve.proxy`). The server is attested under the policy before anything is served.
Cross-site use is refused (Host, Origin, Content-Type, optional API key: see :class:`~bifrost.serve.proxy.ProxyAccess`);
the access options are validated before anything connects."""

from __future__ import annotations

import argparse
import os
import sys

from ..errors import BifrostError, UnavailableError, UserError


def _host_port(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}")
    return host.strip("[]"), int(port)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("proxy", help="attest a Bifrost server and serve an OpenAI-compatible API for it on localhost")
    p.add_argument("--address", default="127.0.0.1:50061", help="host:port of `bifrost serve`")
    p.add_argument("--policy", required=True, help="attestation policy YAML (must pin the model digest)")
    p.add_argument("--listen", type=_host_port, default=("127.0.0.1", 8080),
                   help="HOST:PORT of the OpenAI API (default 127.0.0.1:8080)")
    p.add_argument("--tls-ca", help="connect with TLS, verifying the server certificate against this PEM CA file")
    p.add_argument("--sessions", type=int, default=4,
                   help="attested server sessions kept open; concurrent requests beyond this wait (default 4)")
    p.add_argument("--suite", default="AES-256-GCM", choices=("AES-256-GCM", "SM4-GCM"))
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per server call (default 600)")
    p.add_argument("--allowed-host", action="append", default=[], metavar="NAME[:PORT]",
                   help="also accept this Host header (e.g. behind a reverse proxy; NAME alone: any port); "
                        "repeatable. Default: the listen address, and localhost/127.0.0.1/[::1] on loopback")
    p.add_argument("--allowed-origin", action="append", default=[], metavar="URL",
                   help="accept browser requests (and CORS preflights) from this origin, e.g. https://app.example; "
                        "repeatable. Default: any request with an Origin header is refused")
    p.add_argument("--api-key", metavar="KEY",
                   help="require Authorization: Bearer KEY (required on a non-loopback --listen). Prefer the "
                        "BIFROST_PROXY_API_KEY environment variable: the command line is visible to other users")
    p.set_defaults(func=run_proxy)


def run_proxy(args: argparse.Namespace) -> int:
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ModuleNotFoundError as exc:
        raise UserError(f"bifrost proxy needs {exc.name}: pip install fastapi uvicorn") from None
    from ..attest.policy import load_policy
    from .client import BifrostClient
    from .proxy import API_KEY_ENV, ProxyAccess, SessionPool, serve_pool

    host, port = args.listen
    api_key = args.api_key if args.api_key is not None else (os.environ.get(API_KEY_ENV) or None)
    access = ProxyAccess(host, port, tuple(args.allowed_host), tuple(args.allowed_origin), api_key)
    policy = load_policy(args.policy)
    if args.sessions < 1:
        raise UserError("--sessions must be at least 1")

    def make() -> BifrostClient:
        return BifrostClient(args.address, policy, suite=args.suite, timeout_s=args.timeout, tls_ca_file=args.tls_ca)

    try:
        pool = SessionPool(make, args.sessions, timeout_s=args.timeout)  # attests every session first
    except BifrostError as exc:
        raise UnavailableError(f"cannot attest {args.address}, nothing is served: {exc}") from None
    assert pool.verdict is not None and pool.model_digest is not None  # every session attested
    print(f"attested: {pool.verdict.summary}; model {pool.model.name} (digest {pool.model_digest.hex()[:16]}…); "
          f"{args.sessions} sessions", file=sys.stderr)
    shown = f"[{host}]" if ":" in host else host
    print(f"OpenAI API: http://{shown}:{port}/v1 (model {pool.model.name!r}; API key "
          f"{'required' if api_key else 'off'}; origins allowed: {', '.join(access.allowed_origins) or 'none'})",
          file=sys.stderr, flush=True)
    serve_pool(pool, access)
    return 0
