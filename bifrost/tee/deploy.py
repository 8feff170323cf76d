"""The deployment ``bifrost serve`` runs: local CKKS workers (unless addresses are given), Ray (or not),
the trusted replicas (:class:`~bifrost.tee.replica.TrustedReplica`) and the gRPC front end
(:mod:`bifrost.serve.server`) they are handed to.

This module lives with the trusted runtime because it builds the replicas, which hold channel and CKKS
keys: with ``runtime: local`` they run in this very process (which must then be the TEE); with
``runtime: ray`` they are Ray actors on the cluster's nodes and this process holds only the front end.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import secrets
import threading
import time
from pathlib import Path
from typing import Any

import yaml

from ..attest.mtls import TRUSTED_TLS_NAME, TLSIdentity, WorkerEndpoint
from ..config import RunConfig
from ..config_loader import placement_of
from ..errors import UserError
from ..serve.config import ServeConfig
from ..serve.replicas import LocalReplica, RayReplica, ReplicaHandle, check_replicas_agree, wait_for_ray_replicas
from ..serve.server import SERVICE_NAME, ServingService, start_grpc
from ..worker.launcher import LocalWorker
from .replica import TrustedReplica

log = logging.getLogger("bifrost.tee.deploy")

LOOPBACK_RAY_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # "0": Ray's node address (and every port it binds) is 127.0.0.1


def new_run_dir(root: str | os.PathLike) -> Path:
    # short on purpose: Ray puts AF_UNIX sockets (<= 107 bytes) under <run>/ray/session_<time>_<pid>/
    d = Path(root).resolve() / f"serve-{time.strftime('%m%d%H%M')}-{secrets.token_hex(2)}"
    d.mkdir(parents=True, exist_ok=False)
    return d


def run_config_yaml(cfg: RunConfig, **worker_overrides) -> str:
    """``cfg`` as a config YAML (for a local worker process), with ``worker:`` fields overridden."""
    data = dataclasses.asdict(cfg)
    data["worker"].update(worker_overrides)

    def plain(x):
        if isinstance(x, (list, tuple)):
            return [plain(v) for v in x]
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        return x

    return yaml.safe_dump(plain(data), sort_keys=False)


class ServeApp:
    """Everything ``bifrost serve`` runs: local workers (unless addresses given), Ray (or not),
    the replicas and the gRPC front end. ``start()`` returns once it serves; ``stop()`` undoes it."""

    def __init__(self, cfg: RunConfig, scfg: ServeConfig, run_dir: Path | None = None) -> None:
        self.cfg, self.scfg = cfg, scfg
        self.run_dir = Path(run_dir) if run_dir else new_run_dir(scfg.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.local_workers: list = []
        self.replicas: list[ReplicaHandle] = []
        self.ray_started = False
        self._saved_env: dict[str, str | None] = {}
        self._saved_cluster_flag: bool | None = None
        self.server: Any = None
        self.service: ServingService | None = None
        self.health: Any = None
        self.port: int | None = None

    def start(self) -> "ServeApp":
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        if not self.cfg.tee.identity:  # the replicas' TLS identity (one for the deployment), kept in the run folder
            TLSIdentity.generate(TRUSTED_TLS_NAME).save(self.run_dir / "identity")
            self.cfg = self.cfg.replace(tee=dataclasses.replace(self.cfg.tee, identity=str(self.run_dir / "identity")))
        assert self.cfg.tee.identity is not None  # set just above when the config has none
        identity = TLSIdentity.load_or_create(self.cfg.tee.identity, TRUSTED_TLS_NAME)
        endpoints = [WorkerEndpoint.from_files(a, c) for a, c in zip(self.scfg.workers, self.scfg.worker_certs)]
        if not endpoints and not placement_of(self.cfg).delegates_nothing:  # tee-only: no worker at all
            wcfg = self.run_dir / "worker.yaml"  # room for a worker session of every session on every worker
            wcfg.write_text(run_config_yaml(self.cfg, max_sessions=self.scfg.max_sessions + self.scfg.replicas + 4))
            for i in range(self.scfg.local_workers):
                w = LocalWorker(self.cfg.model, self.cfg.seed, [identity.cert_pem], config=str(wcfg),
                                log_path=str(self.run_dir / f"worker-{i}.log"))
                self.local_workers.append(w)
                w.start()
                endpoints.append(w.endpoint)
        self.worker_addresses = [e.address for e in endpoints]
        args = (self.cfg, self.scfg, endpoints)
        if self.scfg.runtime == "ray":
            self._start_ray()
            import ray

            # SPREAD: replicas on different nodes where the cluster has room, so losing a node loses only its share
            # enable_task_events=False: the GCS keeps no record of each replica call (it would grow with every
            # request, up to Ray's cap, and nothing here reads it)
            cls = ray.remote(num_cpus=self.scfg.replica_cpus,  # type: ignore[call-overload]  # ray's stubs lack actor options
                             max_concurrency=self.scfg.max_sessions + 8, max_restarts=0,
                             scheduling_strategy="SPREAD", enable_task_events=False)(TrustedReplica)
            actors = [cls.remote(*args, i) for i in range(self.scfg.replicas)]
            ray_replicas = [RayReplica(a, timeout_s=self.scfg.replica_timeout_s) for a in actors]
            self.replicas = list(ray_replicas)
            hint = ("Ray logs: " + str(self.run_dir / "ray")) if not self.scfg.ray_address else "see the cluster's Ray logs"
            infos = wait_for_ray_replicas(ray_replicas, self.scfg, hint)
        else:
            self.replicas = [LocalReplica(TrustedReplica(*args, i), timeout_s=self.scfg.replica_timeout_s)
                             for i in range(self.scfg.replicas)]
            infos = [r.info() for r in self.replicas]
        self.service = ServingService(self.cfg, self.scfg, self.replicas, check_replicas_agree(infos))
        self.server, self.port, self.health = start_grpc(self.service, self.scfg.host, self.scfg.port,
                                                         threads=self.scfg.max_sessions + 8,
                                                         tls=self.scfg.tls_credentials())
        log.info("serving %s on %s:%d (%s; %d replicas, runtime %s, workers %s)", self.cfg.model, self.scfg.host,
                 self.port, self.scfg.transport, len(self.replicas),
                 self.scfg.runtime, ", ".join(self.worker_addresses))

    def _start_ray(self) -> None:
        if self.scfg.ray_address:  # a real cluster: it has its own temp dir and auth settings
            import ray

            if not ray.is_initialized():
                ray.init(address=self.scfg.ray_address, include_dashboard=False, log_to_driver=False)
                self.ray_started = True
            return
        ray_dir = self.run_dir.resolve() / "ray"
        if len(str(ray_dir)) > 107 - 62:  # + "/session_YYYY-MM-DD_HH-MM-SS_micros_pid/sockets/plasma_store"
            raise UserError(f"run folder path too long for Ray's unix sockets ({ray_dir}); use a shorter --run-dir")
        ray_dir.mkdir(exist_ok=True)
        # Keep Ray's session files and its auth token inside the run folder (not ~/.ray, /tmp/ray):
        # the token is ours (from secrets), handed to Ray by path; Ray otherwise writes ~/.ray/auth_token.
        token_path = self.run_dir / "ray-auth-token"
        token_path.touch(mode=0o600)
        token_path.write_text(secrets.token_hex(32))
        # RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0: a single-node Ray whose node address is the loopback one; Ray then
        # binds every port (GCS, raylet, object manager, core workers, agents) to 127.0.0.1 instead of all
        # interfaces, which it does for any other node address.
        env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_path), "RAY_TMPDIR": str(ray_dir),
               "RAY_USAGE_STATS_ENABLED": os.environ.get("RAY_USAGE_STATS_ENABLED", "0"),
               LOOPBACK_RAY_ENV: "0"}
        self._saved_env = {k: os.environ.get(k) for k in env}  # restored by stop()
        os.environ.update(env)
        import ray
        from ray._private import ray_constants
        from ray._raylet import AuthenticationTokenLoader, Config  # type: ignore[attr-defined]  # not in ray's stubs

        Config.initialize("")  # Ray caches its config at import: make it see the auth settings above
        AuthenticationTokenLoader.instance().reset_cache()  # and its token, per process (an earlier Ray's)
        if not ray.is_initialized():
            # (read at import too: the same setting for a Ray imported before the environment was set)
            self._saved_cluster_flag = ray_constants.ENABLE_RAY_CLUSTER
            ray_constants.ENABLE_RAY_CLUSTER = False
            ray.init(_temp_dir=str(ray_dir), include_dashboard=False, num_cpus=self.scfg.local_ray_cpus,
                     log_to_driver=False)
            self.ray_started = True

    def drain(self, abort: threading.Event | None = None) -> int:
        """Health NOT_SERVING, then :meth:`ServingService.drain` for ``serve.drain_s`` (``abort``: end the wait
        early). Returns the number of turns the deadline stopped. :meth:`stop` comes next."""
        if self.service is None:
            return 0
        self._not_serving()
        return self.service.drain(self.scfg.drain_s, abort)

    def _not_serving(self) -> None:
        if self.health is not None:
            from grpc_health.v1 import health_pb2

            for name in ("", SERVICE_NAME):
                self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)

    def stop(self) -> None:
        self._not_serving()
        if self.service is not None:
            self.service.stop()
        if self.server is not None:
            self.server.stop(grace=2).wait()
            self.server = None
        for r in self.replicas:
            try:
                r.kill()
            except Exception:  # noqa: BLE001 - best effort
                pass
        self.replicas = []
        try:
            if self.ray_started:
                import ray

                self.ray_started = False
                ray.shutdown()
        finally:  # this process's settings back as they were, whatever Ray's shutdown did
            if self._saved_cluster_flag is not None:
                from ray._private import ray_constants

                ray_constants.ENABLE_RAY_CLUSTER = self._saved_cluster_flag
                self._saved_cluster_flag = None
            for k, v in self._saved_env.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
            self._saved_env = {}
        for w in self.local_workers:
            w.stop()
        self.local_workers = []
