"""``bifrost serve``: the attested serving deployment (trusted replicas, CKKS workers, the gRPC front end)."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import sys
import threading

from ..config import MODES
from ..errors import UserError

SIMULATED_BANNER = (
    "!!! WARNING: evidence provider is SIMULATED: this server is NOT running in an attested TEE and its\n"
    "!!! evidence is signed by a local software key. Prompts get no hardware confidentiality. Clients refuse\n"
    "!!! it unless their policy sets allow_simulated: true. Development and tests only."
)


class RunLogHandler(logging.FileHandler):
    """``serve.log`` in the run folder. A record it cannot write (disk full, folder gone) costs the request that
    logged it nothing: one line on stderr when writing starts to fail (not a traceback per record), and
    stderr, the other handler, still gets every record; writing resumes when the disk does."""

    failing = False

    def emit(self, record: logging.LogRecord) -> None:
        self._failed = False
        super().emit(record)  # (calls handleError on failure)
        if not self._failed:
            self.failing = False

    def handleError(self, record: logging.LogRecord) -> None:
        self._failed = True
        if not self.failing:
            self.failing = True
            exc = sys.exc_info()[1]
            reason = getattr(exc, "strerror", None) or type(exc).__name__
            try:
                print(f"bifrost serve: cannot write {self.baseFilename} ({reason}); log records go to stderr only "
                      "until it can", file=sys.stderr, flush=True)
            except (OSError, ValueError):
                pass


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve a model over the attested gRPC API (Ray replicas + CKKS workers)")
    p.add_argument("--config", help="run config YAML (default: configs/default.yaml)")
    p.add_argument("--serve-config", help="serve config YAML (default: configs/serve.yaml)")
    p.add_argument("--model", help="model name or checkpoint directory (overrides the config)")
    p.add_argument("--seed", type=int, help="seed of random-init named models")
    p.add_argument("--mode", choices=MODES,
                   help="bifrost: prompts through CKKS too; bifrost+: prompts prefilled inside the TEE, only decode "
                        "steps delegated (default from the run config: bifrost; bound into the serving-config digest)")
    p.add_argument("--policy", help="placement policy (configs/policies/ name or YAML path; bound into attestation)")
    p.add_argument("--adapter", help="a LoRA adapter directory (peft), run in the TEE; its digest is bound into "
                                     "the serving-config digest")
    p.add_argument("--host", help="listen address (default from serve config: 127.0.0.1)")
    p.add_argument("--port", type=int, help="listen port; 0 picks a free one")
    p.add_argument("--port-file", help="write the bound port here once serving")
    p.add_argument("--identity", help="folder of the replicas' TLS identity (key + certificate), created if missing "
                                      "(`bifrost identity create`); external workers list <folder>/cert.pem with "
                                      "--trusted-client (default: tee.identity; none: a new one in the run folder)")
    p.add_argument("--workers", help="comma-separated CKKS worker addresses (default: start local ones)")
    p.add_argument("--worker-certs", help="comma-separated certificates (PEM) of those workers, same order: pinned")
    p.add_argument("--local-workers", type=int, help="how many local workers to start when none are given")
    p.add_argument("--replicas", type=int, help="trusted-runtime replicas")
    p.add_argument("--runtime", choices=("ray", "local"), help="ray: replicas as Ray actors; local: in-process")
    p.add_argument("--ray-address", help="join this Ray cluster (auto | GCS host:port; run on a cluster node, "
                                         "with --workers) instead of starting Ray locally; ray:// is not supported")
    p.add_argument("--ray-num-cpus", type=int,
                   help="CPUs of a locally started Ray (default: replicas x replica_cpus)")
    p.add_argument("--max-sessions", type=int)
    p.add_argument("--drain-s", type=float, help="on SIGTERM/SIGINT, how long running turns may go on before they "
                                                 "are stopped (default from serve config: 30)")
    p.add_argument("--evidence", help="evidence provider: auto (tdx/sev-snp from configfs-tsm) | tdx | sev-snp | "
                                      "simulated (development only: not a TEE)")
    p.add_argument("--tls-cert", help="PEM certificate (chain) for TLS on the serving port (with --tls-key)")
    p.add_argument("--tls-key", help="PEM private key (unencrypted) of --tls-cert")
    p.add_argument("--run-dir", help="folder for this run (Ray temp dir, logs); default: a new one under serve.run_dir")
    p.add_argument("--print-digests", action="store_true",
                   help="print the model and serving-config digests a client policy pins, then exit")
    p.add_argument("--policy-out", metavar="FILE",
                   help="with --print-digests: also write a commented client policy YAML pinning them")
    p.add_argument("--force", action="store_true", help="with --policy-out: overwrite an existing file")
    p.set_defaults(func=run_serve)


def _configs(args):
    from ..config_loader import load_config, placement_of
    from ..serve.config import load_serve_config

    cfg = load_config(args.config)
    scfg = load_serve_config(args.serve_config)
    if args.model:
        cfg = cfg.replace(model=args.model)
    if args.seed is not None:
        cfg = cfg.replace(seed=args.seed)
    if args.policy:
        cfg = cfg.replace(policy=args.policy)
    if args.mode:
        cfg = cfg.replace(generation=dataclasses.replace(cfg.generation, mode=args.mode))
    if args.adapter:
        cfg = cfg.replace(adapter=args.adapter)
    if args.identity:
        cfg = cfg.replace(tee=dataclasses.replace(cfg.tee, identity=args.identity))
    placement_of(cfg)  # one line for an unknown or malformed policy
    changes = {k: v for k, v in {
        "host": args.host, "port": args.port, "local_workers": args.local_workers, "replicas": args.replicas,
        "runtime": args.runtime, "ray_address": args.ray_address, "ray_num_cpus": args.ray_num_cpus,
        "max_sessions": args.max_sessions, "drain_s": args.drain_s, "tls_cert_file": args.tls_cert, "tls_key_file": args.tls_key,
        "evidence_provider": args.evidence}.items() if v is not None}
    if args.workers:
        changes["workers"] = tuple(a.strip() for a in args.workers.split(",") if a.strip())
    if args.worker_certs:
        changes["worker_certs"] = tuple(a.strip() for a in args.worker_certs.split(",") if a.strip())
    return cfg, scfg.replace(**changes) if changes else scfg


def run_serve(args: argparse.Namespace) -> int:
    from ..model.digests import model_digest
    from ..serve.config import serving_config_digest
    from .deploy import ServeApp

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    cfg, scfg = _configs(args)
    if args.policy_out and not args.print_digests:
        raise UserError("--policy-out needs --print-digests")
    if args.print_digests:
        from ..model.catalog import resolve

        if args.policy_out and os.path.exists(args.policy_out) and not args.force:
            raise UserError(f"{args.policy_out} exists; pass --force to overwrite it")
        digest, config_digest = model_digest(resolve(cfg.model), cfg.seed), serving_config_digest(cfg, scfg)
        print(f"model_digest: {digest.hex()}")
        print(f"serving_config_digest: {config_digest.hex()}")
        if args.policy_out:
            from ..attest.init_policy import ServedModel, local_source, render_policy, write_policy

            evidence = scfg.evidence_provider if scfg.evidence_provider in ("simulated", "tdx", "sev-snp") else ""
            model = ServedModel(str(cfg.model), digest, config_digest)
            write_policy(args.policy_out, render_policy([model], evidence, local_source()), force=args.force)
            print(f"wrote {args.policy_out}", file=sys.stderr)
        return 0
    from ..attest.evidence import get_provider

    get_provider(scfg.evidence_provider)  # fail fast, in one line, before starting workers and Ray
    app = ServeApp(cfg, scfg, args.run_dir)
    handler = RunLogHandler(app.run_dir / "serve.log")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        handlers=[handler, logging.StreamHandler(sys.stderr)])
    stop = threading.Event()   # the first SIGTERM/SIGINT: drain, then exit
    hurry = threading.Event()  # a second one: end the drain's wait now

    def on_signal(*_) -> None:
        if not stop.is_set():
            stop.set()
            return
        hurry.set()
        for sig in (signal.SIGINT, signal.SIGTERM):  # a third signal ends the process at once (the OS default)
            signal.signal(sig, signal.SIG_DFL)

    def stop_on_signals() -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, on_signal)

    stop_on_signals()
    app.start()
    stop_on_signals()  # again: ray.init replaces the SIGTERM handler with one that dumps a stack and aborts
    try:
        assert app.service is not None  # start() made it
        evidence = app.service.info.evidence_type
        print(f"bifrost serve: {cfg.model} on {scfg.host}:{app.port} ({scfg.transport}, {len(app.replicas)} replica(s), "
              f"runtime {scfg.runtime}, workers {', '.join(app.worker_addresses)}, evidence {evidence}, "
              f"run folder {app.run_dir})", file=sys.stderr, flush=True)
        if evidence == "simulated":
            print(SIMULATED_BANNER, file=sys.stderr, flush=True)
        if args.port_file:
            with open(args.port_file + ".tmp", "w") as f:
                f.write(str(app.port))
            os.replace(args.port_file + ".tmp", args.port_file)
        stop.wait()
        print(f"bifrost serve: draining (up to serve.drain_s={scfg.drain_s:g} s; signal again to stop at once)",
              file=sys.stderr, flush=True)
        stopped = app.drain(hurry)
        if stopped:
            print(f"bifrost serve: {stopped} turn(s) were still running and ended with UNAVAILABLE", file=sys.stderr,
                  flush=True)
    finally:
        app.stop()
    return 0
