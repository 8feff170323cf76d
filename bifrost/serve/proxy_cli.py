"""``bifrost proxy``: an OpenAI-compatible HTTP API on this machine, in front of an attested Bifrost server
(client side: :mod:`bifrost.serve.proxy`). The server is attested under the policy before anything is served."""

from __future__ import annotations

import argparse
import sys

from ..errors import BifrostError


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
    p.set_defaults(func=run_proxy)


def run_proxy(args: argparse.Namespace) -> int:
    from ..attest.policy import load_policy
    from .client import BifrostClient
    from .proxy import SessionPool, serve_pool

    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ModuleNotFoundError as exc:
        raise BifrostError(f"bifrost proxy needs {exc.name}: pip install fastapi uvicorn") from None
    policy = load_policy(args.policy)
    if args.sessions < 1:
        raise BifrostError("--sessions must be at least 1")

    def make() -> BifrostClient:
        return BifrostClient(args.address, policy, suite=args.suite, timeout_s=args.timeout, tls_ca_file=args.tls_ca)

    try:
        pool = SessionPool(make, args.sessions, timeout_s=args.timeout)  # attests every session first
    except BifrostError as exc:
        raise BifrostError(f"cannot attest {args.address}, nothing is served: {exc}") from None
    host, port = args.listen
    print(f"attested: {pool.verdict.summary}; model {pool.model.name} (digest {pool.model_digest.hex()[:16]}…); "
          f"{args.sessions} sessions", file=sys.stderr)
    print(f"OpenAI API: http://{host}:{port}/v1 (model {pool.model.name!r})", file=sys.stderr, flush=True)
    serve_pool(pool, host, port)
    return 0
