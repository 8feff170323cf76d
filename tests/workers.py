"""Start real in-process CKKS workers for tests: mutual TLS, trusting this process's trusted-runtime identity."""

from __future__ import annotations

import dataclasses

from bifrost.config_loader import placement_of
from bifrost.attest.mtls import WORKER_TLS_NAME, TLSIdentity, WorkerEndpoint, process_identity, server_credentials
from bifrost.worker.service import WorkerService, build_service, limits_from_config, serve


def make_service(run_config, model: str, max_sessions: int = 8, cache_bytes: int = 2 * 2**30,
                 **limit_changes) -> WorkerService:
    limits = dataclasses.replace(limits_from_config(run_config), max_sessions=max_sessions,
                                 cache_bytes=cache_bytes, **limit_changes)
    return build_service(model, run_config.seed, placement_of(run_config), limits)


def start_worker(run_config, model: str, max_sessions: int = 8, cache_bytes: int = 2 * 2**30,
                 service: WorkerService | None = None, **limit_changes):
    """(service, gRPC server, endpoint) of a worker for ``model`` on 127.0.0.1 (free port). ``service``:
    a ready (e.g. instrumented: RPC methods are bound when serving starts) service to serve instead."""
    if service is None:
        service = make_service(run_config, model, max_sessions, cache_bytes, **limit_changes)
    identity = TLSIdentity.generate(WORKER_TLS_NAME)
    server, port = serve(service, server_credentials(identity, [process_identity().cert_pem]), "127.0.0.1", 0)
    return service, server, WorkerEndpoint(f"127.0.0.1:{port}", identity.cert_pem)
