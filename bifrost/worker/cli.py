"""``bifrost worker`` / ``bifrost-worker`` / ``python -m bifrost.worker``: run a CKKS worker (untrusted side).

The worker's own entry point (:func:`main`) imports nothing of the trusted runtime (``bifrost/tee``):
tests/test_packaging.py starts a worker process and checks its imported modules."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading


def add_parser(sub: argparse._SubParsersAction) -> None:
    _arguments(sub.add_parser("worker", help="run an untrusted CKKS worker (gRPC)"))


def main(argv: list[str] | None = None) -> int:
    """The worker's entry point: the ``bifrost worker`` arguments, with the CLI's one-line errors and exit codes
    (:func:`bifrost.cli.run_command`: the class's code in ``bifrost.errors.ERROR_TABLE``; a bug exits 70)."""
    from ..cli import run_command

    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # shares the CPU with a local trusted runtime
    parser = argparse.ArgumentParser(prog="bifrost-worker", description="run an untrusted CKKS worker (gRPC)")
    _arguments(parser)
    args = parser.parse_args(argv)
    return run_command(lambda: args.func(args), "bifrost-worker")


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="run config YAML (default: configs/default.yaml)")
    p.add_argument("--model", help="model name or checkpoint directory (overrides the config)")
    p.add_argument("--seed", type=int, help="seed of random-init named models (overrides the config)")
    p.add_argument("--policy", help="placement policy whose delegated layers this worker serves (overrides the config)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=50051, help="0 picks a free port")
    p.add_argument("--port-file", help="write the bound port here once serving")
    p.add_argument("--threads", type=int, default=4)
    p.add_argument("--identity", help="folder of this worker's TLS key + certificate, created on first start "
                                      "(default: worker.identity); trusted runtimes pin <folder>/cert.pem")
    p.add_argument("--trusted-client", action="append", default=[], metavar="CERT",
                   help="certificate (PEM) of a trusted runtime allowed to open worker sessions; repeat for several "
                        "(default: worker.trusted_clients)")
    p.add_argument("--exit-with-parent", action="store_true",
                   help="stop when the process that started this worker exits (used for local workers)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..config_loader import load_config, placement_of
    from .service import build_service, serve

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    from ..attest.mtls import WORKER_TLS_NAME, TLSIdentity, server_credentials
    from ..errors import UserError
    from .service import bound_allocator, client_certificates, limits_from_config

    bound_allocator()  # before the model loads and the gRPC threads start: evicted memory is really freed

    cfg = load_config(args.config)
    if args.policy:
        cfg = cfg.replace(policy=args.policy)
        placement_of(cfg)  # one line for an unknown or malformed policy
    model = args.model or cfg.model
    cfg = cfg.replace(model=model)  # the model's own CKKS parameters (configs/models.yaml) are accepted
    seed = cfg.seed if args.seed is None else args.seed
    identity_dir = args.identity or cfg.worker.identity
    if not identity_dir:
        raise UserError("a worker needs a TLS identity: --identity DIR (or worker.identity in the config)")
    trusted = args.trusted_client or list(cfg.worker.trusted_clients)
    if not trusted:
        raise UserError("a worker serves only authenticated trusted runtimes: give their certificates with "
                           "--trusted-client CERT (or worker.trusted_clients)")
    identity = TLSIdentity.load_or_create(identity_dir, WORKER_TLS_NAME)
    credentials = server_credentials(identity, client_certificates(trusted))
    service = build_service(model, seed, placement_of(cfg), limits_from_config(cfg))
    try:
        server, port = serve(service, credentials, args.host, args.port, args.threads)
    except (OSError, RuntimeError) as exc:
        raise UserError(f"cannot listen on {args.host}:{args.port}: {exc}") from None
    print(f"bifrost worker: model {service.model_name}, {len(service.layers)} delegated layers, "
          f"listening on {args.host}:{port} (mutual TLS, {len(trusted)} trusted runtime(s)); identity "
          f"{identity.fingerprint}, certificate {os.path.join(identity_dir, 'cert.pem')}", file=sys.stderr, flush=True)
    if args.port_file:
        with open(args.port_file + ".tmp", "w") as f:
            f.write(str(port))
        os.replace(args.port_file + ".tmp", args.port_file)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    if args.exit_with_parent:
        parent = os.getppid()

        def watch_parent() -> None:  # an orphaned local worker would otherwise hold GBs forever
            while not stop.wait(1.0):
                if os.getppid() != parent:
                    stop.set()

        threading.Thread(target=watch_parent, daemon=True, name="parent-watch").start()
    stop.wait()
    server.stop(grace=2).wait()
    return 0
