"""The public gRPC front end (``bifrost.serving.v1.BifrostServing``) and the serving app around it.

The front end authenticates requests (session tokens), enforces limits and routes *sealed* records
to the replica that owns the session; it never holds channel keys, so it cannot read prompts or
tokens. Every bad input ends as a gRPC status with a message; nothing here lets one request crash
the server or touch another session.

Status mapping: missing/bad/expired token -> UNAUTHENTICATED; token of another session ->
PERMISSION_DENIED; tampered/replayed sealed record -> PERMISSION_DENIED and the session is closed;
prompt over ``max_prompt_tokens`` and malformed fields -> INVALID_ARGUMENT; session limit ->
RESOURCE_EXHAUSTED; unknown session -> NOT_FOUND; workers unavailable -> UNAVAILABLE.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import secrets
import threading
import time
from concurrent import futures
from datetime import datetime, timezone
from pathlib import Path

import grpc
import yaml
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from google.protobuf.message import DecodeError

from ..attest.errors import TokenError, TokenReplayError
from ..attest.tokens import TokenGate, TokenIssuer
from ..attest.verdict import Verdict
from ..config import RunConfig
from ..errors import BifrostError
from ..proto import serving_pb2
from .actors import ReplicaActor
from .config import ServeConfig
from .sessions import SessionLimitError, SessionTable

log = logging.getLogger("bifrost.serve")

SERVICE_NAME = "bifrost.serving.v1.BifrostServing"
SESSION_ID_SIZE = 16
MAX_MESSAGE_BYTES = 64 << 20


# --------------------------------------------------------------------------- replica handles

class LocalReplica:
    """The replica class run in this process (``runtime: local``, tests)."""

    def __init__(self, *args) -> None:
        self.obj = ReplicaActor(*args)

    def call(self, method: str, *args):
        return getattr(self.obj, method)(*args)

    def stream(self, method: str, *args):
        yield from getattr(self.obj, method)(*args)

    def kill(self) -> None:
        self.obj.shutdown()


class RayReplica:
    """The same class as a Ray actor: one actor call per request or per streamed chunk."""

    def __init__(self, actor) -> None:
        self.actor = actor

    def call(self, method: str, *args):
        import ray

        return ray.get(getattr(self.actor, method).remote(*args))

    def stream(self, method: str, *args):
        import ray

        for ref in getattr(self.actor, method).options(num_returns="streaming").remote(*args):
            yield ray.get(ref)

    def kill(self) -> None:
        import ray

        try:
            ray.get(self.actor.shutdown.remote(), timeout=30)
        except Exception:  # noqa: BLE001 - best effort at shutdown
            pass
        ray.kill(self.actor)


# --------------------------------------------------------------------------- the servicer

class _Malformed:
    pass


MALFORMED = _Malformed()


def _safe(cls):
    def parse(data: bytes):
        try:
            return cls.FromString(data)
        except (DecodeError, ValueError):
            return MALFORMED

    return parse


class _Abort(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


class ServingService:
    def __init__(self, cfg: RunConfig, scfg: ServeConfig, replicas: list, issuer_key: Ed25519PrivateKey | None = None) -> None:
        self.cfg, self.scfg, self.replicas = cfg, scfg, replicas
        self.info = replicas[0].call("info")
        self.issuer = TokenIssuer(issuer_key or Ed25519PrivateKey.generate(), issuer="bifrost-serve",
                                  lifetime_s=scfg.token_lifetime_s)
        self.gate = TokenGate([self.issuer.public_key], model_digest=self.info["model_digest"],
                              allow_simulated=self.info["evidence_type"] == "simulated")
        self.sessions = SessionTable(scfg.max_sessions, len(replicas))
        self.node_id = f"bifrost-serve-{secrets.token_hex(4)}"
        self._stop = threading.Event()
        self._sweeper = threading.Thread(target=self._sweep, daemon=True, name="session-sweeper")
        self._sweeper.start()

    # -- helpers ---------------------------------------------------------------------------
    @staticmethod
    def _guard(context, fn):
        try:
            return fn()
        except _Abort as exc:
            context.abort(exc.code, exc.message)

    def _check_sealed_request(self, req, context, need_sealed: bool = True):
        if req is MALFORMED:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, "request is not a valid SealedRequest protobuf")
        if len(req.session_id) != SESSION_ID_SIZE:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, f"session_id must be {SESSION_ID_SIZE} bytes")
        if not 1 <= len(req.request_id) <= 64:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, "request_id must be 1..64 characters")
        if need_sealed and not req.sealed:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, "sealed payload is empty")
        if len(req.sealed) > self.scfg.max_request_bytes:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT,
                         f"sealed payload is {len(req.sealed)} bytes; the limit is max_request_bytes={self.scfg.max_request_bytes}")
        token = None
        for key, value in context.invocation_metadata() or ():
            if key == "authorization" and isinstance(value, str) and value.startswith("Bearer "):
                token = value[len("Bearer "):]
        if not token:
            raise _Abort(grpc.StatusCode.UNAUTHENTICATED, "missing 'authorization: Bearer <token>' metadata; attest first")
        entry = self.sessions.get(bytes(req.session_id))
        try:
            self.gate.authorize(token, req.request_id, session_report_data=entry.report_data if entry else None)
        except TokenReplayError as exc:
            code = grpc.StatusCode.PERMISSION_DENIED if exc.check == "token_binding" else grpc.StatusCode.UNAUTHENTICATED
            raise _Abort(code, str(exc)) from None
        except TokenError as exc:
            raise _Abort(grpc.StatusCode.UNAUTHENTICATED, str(exc)) from None
        if entry is None:
            raise _Abort(grpc.StatusCode.NOT_FOUND, "unknown or closed session; attest again")
        return entry

    def _replica_error(self, entry, item) -> _Abort:
        _, code, message = item
        if code in ("PERMISSION_DENIED", "NOT_FOUND"):
            self.sessions.remove(entry.session_id)
        return _Abort(getattr(grpc.StatusCode, code), message)

    # -- RPCs ------------------------------------------------------------------------------
    def Attest(self, req, context):
        def run():
            if req is MALFORMED:
                raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, "request is not a valid AttestRequest protobuf")
            if not 16 <= len(req.nonce) <= 1024:
                raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, "nonce must be 16..1024 bytes")
            if len(req.client_public_key) != 32:
                raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, "client_public_key must be a 32-byte raw X25519 key")
            try:
                r = self.sessions.reserve()
            except SessionLimitError as exc:
                raise _Abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)) from None
            try:
                out = self.replicas[r].call("attest", bytes(req.nonce), bytes(req.client_public_key), req.suite)
            except Exception as exc:  # noqa: BLE001 - a dead actor must not take the server down
                self.sessions.cancel(r)
                log.error("replica %d attest failed: %s", r, type(exc).__name__)
                raise _Abort(grpc.StatusCode.UNAVAILABLE, "replica unavailable") from None
            if isinstance(out, tuple):
                self.sessions.cancel(r)
                raise _Abort(getattr(grpc.StatusCode, out[1]), out[2])
            self.sessions.commit(r, out["session_id"], out["report_data"])
            verdict = Verdict(evidence_type=out["evidence_type"], measurement=out["measurement"],
                              report_data=out["report_data"], debug=False, tcb_status="self-reported", tcb={},
                              fields={}, verified_at=datetime.now(timezone.utc), checks_passed=(),
                              simulated=out["evidence_type"] == "simulated")
            now = time.time()
            token = self.issuer.issue(verdict, node_id=self.node_id, model_digest=out["model_digest"], now=now)
            log.info("session %s… attested on replica %d (%d sessions)", out["session_id"].hex()[:8], r, len(self.sessions))
            return serving_pb2.AttestReply(
                evidence_type=out["evidence_type"], evidence=out["evidence"], endorsements=out["endorsements"],
                server_public_key=out["server_public_key"], model_digest=out["model_digest"],
                serving_config_digest=out["serving_config_digest"], session_id=out["session_id"], token=token,
                token_expires_at=int(now) + self.scfg.token_lifetime_s, suite=out["suite"])

        return self._guard(context, run)

    def Generate(self, req, context):
        try:
            entry = self._check_sealed_request(req, context)
            replica = self.replicas[entry.replica]
            stream = replica.stream("generate", entry.session_id, bytes(req.sealed))
            while True:
                try:
                    item = next(stream)
                except StopIteration:
                    break
                except Exception as exc:  # noqa: BLE001 - replica (actor) died mid-stream
                    log.error("replica %d failed during a stream: %s", entry.replica, type(exc).__name__)
                    self.sessions.remove(entry.session_id)
                    raise _Abort(grpc.StatusCode.UNAVAILABLE, "replica failed; attest again") from None
                if item[0] == "error":
                    raise self._replica_error(entry, item)
                if not context.is_active():
                    stream.close()
                    return
                yield serving_pb2.SealedReply(sealed=item[1])
        except _Abort as exc:
            context.abort(exc.code, exc.message)

    def Embed(self, req, context):
        def run():
            entry = self._check_sealed_request(req, context)
            try:
                item = self.replicas[entry.replica].call("embed", entry.session_id, bytes(req.sealed))
            except Exception as exc:  # noqa: BLE001
                log.error("replica %d embed failed: %s", entry.replica, type(exc).__name__)
                raise _Abort(grpc.StatusCode.UNAVAILABLE, "replica unavailable") from None
            if item[0] == "error":
                raise self._replica_error(entry, item)
            return serving_pb2.SealedReply(sealed=item[1])

        return self._guard(context, run)

    def CloseSession(self, req, context):
        def run():
            entry = self._check_sealed_request(req, context, need_sealed=False)
            self.sessions.remove(entry.session_id)
            try:
                self.replicas[entry.replica].call("close_session", entry.session_id)
            except Exception:  # noqa: BLE001
                pass
            return serving_pb2.CloseSessionReply()

        return self._guard(context, run)

    def ListModels(self, req, context):
        if req is MALFORMED:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "request is not a valid ListModelsRequest protobuf")
        i = self.info
        return serving_pb2.ListModelsReply(
            models=[serving_pb2.ModelInfo(
                name=i["name"], task=i["task"], model_digest=i["model_digest"],
                serving_config_digest=i["serving_config_digest"], max_prompt_tokens=self.scfg.max_prompt_tokens,
                max_new_tokens=self.scfg.max_new_tokens, context_tokens=i["context_tokens"],
                replicas=len(self.replicas), mode=i["mode"])],
            evidence_type=i["evidence_type"], max_sessions=self.scfg.max_sessions)

    # -- housekeeping ------------------------------------------------------------------------
    def _sweep(self) -> None:
        period = max(1.0, min(30.0, self.scfg.session_idle_s / 4))
        while not self._stop.wait(period):
            for e in self.sessions.idle(self.scfg.session_idle_s):
                self.sessions.remove(e.session_id)
                try:
                    self.replicas[e.replica].call("close_session", e.session_id)
                except Exception:  # noqa: BLE001
                    pass

    def stop(self) -> None:
        self._stop.set()

    def handler(self) -> grpc.GenericRpcHandler:
        P = serving_pb2
        ser = lambda m: m.SerializeToString()  # noqa: E731
        return grpc.method_handlers_generic_handler(SERVICE_NAME, {
            "Attest": grpc.unary_unary_rpc_method_handler(self.Attest, _safe(P.AttestRequest), ser),
            "Generate": grpc.unary_stream_rpc_method_handler(self.Generate, _safe(P.SealedRequest), ser),
            "Embed": grpc.unary_unary_rpc_method_handler(self.Embed, _safe(P.SealedRequest), ser),
            "CloseSession": grpc.unary_unary_rpc_method_handler(self.CloseSession, _safe(P.SealedRequest), ser),
            "ListModels": grpc.unary_unary_rpc_method_handler(self.ListModels, _safe(P.ListModelsRequest), ser),
        })


def start_grpc(service: ServingService, host: str, port: int, threads: int):
    """Serve with health checking and reflection; returns (server, port, health servicer)."""
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=threads, thread_name_prefix="serve"),
                         options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                                  ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)])
    server.add_generic_rpc_handlers((service.handler(),))
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (serving_pb2.DESCRIPTOR.services_by_name["BifrostServing"].full_name, health.SERVICE_NAME,
         reflection.SERVICE_NAME), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise BifrostError(f"cannot listen on {host}:{port}")
    server.start()
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return server, bound, health_servicer


# --------------------------------------------------------------------------- the app

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
        self.replicas: list = []
        self.ray_started = False
        self.server = self.service = self.health = None
        self.port = None

    def start(self) -> "ServeApp":
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        addresses = list(self.scfg.workers)
        if not addresses:
            from ..worker.launcher import LocalWorker

            wcfg = self.run_dir / "worker.yaml"  # room for every session on every worker
            wcfg.write_text(run_config_yaml(self.cfg, max_sessions=self.scfg.max_sessions + self.scfg.replicas + 4))
            for i in range(self.scfg.local_workers):
                w = LocalWorker(self.cfg.model, self.cfg.seed, config=str(wcfg),
                                log_path=str(self.run_dir / f"worker-{i}.log"))
                self.local_workers.append(w)
                w.start()
                addresses.append(w.address)
        self.worker_addresses = addresses
        args = (self.cfg, self.scfg, addresses)
        if self.scfg.runtime == "ray":
            self._start_ray()
            import ray

            cls = ray.remote(num_cpus=self.scfg.replica_cpus, max_concurrency=self.scfg.max_sessions + 8,
                             max_restarts=0)(ReplicaActor)
            actors = [cls.remote(*args, i) for i in range(self.scfg.replicas)]
            self.replicas = [RayReplica(a) for a in actors]
            for r in self.replicas:
                r.call("info")  # wait until every replica has loaded its model
        else:
            self.replicas = [LocalReplica(*args, i) for i in range(self.scfg.replicas)]
        self.service = ServingService(self.cfg, self.scfg, self.replicas)
        self.server, self.port, self.health = start_grpc(self.service, self.scfg.host, self.scfg.port,
                                                         threads=self.scfg.max_sessions + 8)
        log.info("serving %s on %s:%d (%d replicas, runtime %s, workers %s)", self.cfg.model, self.scfg.host,
                 self.port, len(self.replicas), self.scfg.runtime, ", ".join(addresses))

    def _start_ray(self) -> None:
        if self.scfg.ray_address:  # a real cluster: it has its own temp dir and auth settings
            import ray

            if not ray.is_initialized():
                ray.init(address=self.scfg.ray_address, include_dashboard=False, log_to_driver=False)
                self.ray_started = True
            return
        ray_dir = self.run_dir.resolve() / "ray"
        if len(str(ray_dir)) > 107 - 62:  # + "/session_YYYY-MM-DD_HH-MM-SS_micros_pid/sockets/plasma_store"
            raise BifrostError(f"run folder path too long for Ray's unix sockets ({ray_dir}); use a shorter --run-dir")
        ray_dir.mkdir(exist_ok=True)
        # Keep Ray's session files and its auth token inside the run folder (not ~/.ray, /tmp/ray):
        # the token is ours (from secrets), handed to Ray by path; Ray otherwise writes ~/.ray/auth_token.
        token_path = self.run_dir / "ray-auth-token"
        token_path.touch(mode=0o600)
        token_path.write_text(secrets.token_hex(32))
        os.environ["RAY_AUTH_MODE"] = "token"
        os.environ["RAY_AUTH_TOKEN_PATH"] = str(token_path)
        os.environ["RAY_TMPDIR"] = str(ray_dir)
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        import ray
        from ray._raylet import Config

        Config.initialize("")  # Ray caches its config at import: make it see the auth settings above
        if not ray.is_initialized():
            ray.init(_temp_dir=str(ray_dir), include_dashboard=False, num_cpus=self.scfg.ray_num_cpus,
                     log_to_driver=False)
            self.ray_started = True

    def stop(self) -> None:
        if self.health is not None:
            from grpc_health.v1 import health_pb2

            for name in ("", SERVICE_NAME):
                self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
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
        if self.ray_started:
            import ray

            ray.shutdown()
            self.ray_started = False
        for w in self.local_workers:
            w.stop()
        self.local_workers = []
