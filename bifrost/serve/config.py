"""Typed ``serve:`` configuration, validated at load from ``configs/serve.yaml`` (unknown keys refused).

Deployment rules enforced here (each a one-line error naming the fix):

* ``ray_address`` joins an existing cluster with a driver on a cluster node (``auto`` or ``host:port``).
  Ray Client addresses (``ray://``) are refused: replicas stream tokens through Ray streaming
  generators, which Ray Client does not support.
* With ``ray_address`` the replicas may run on other nodes, so CKKS ``workers`` must be given (local
  workers listen on 127.0.0.1 of the serving node only). Every node needs the same bifrost installed.
* A locally started Ray must have room for every replica: ``replicas * replica_cpus <= ray_num_cpus``
  (``ray_num_cpus: null`` sizes it to exactly that).
* TLS on the serving port: ``tls_cert_file`` and ``tls_key_file`` (PEM) together or not at all; the
  certificate must parse, the key must be an unencrypted PEM key and belong to the first certificate.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import CONFIG_DIR, build_section
from ..config_loader import placement_of
from ..errors import UserError
from ..yaml_io import load_yaml

DEFAULT_SERVE_CONFIG = CONFIG_DIR / "serve.yaml"
RUNTIMES = ("ray", "local")
_NULL_MEANS = {"max_sessions_per_replica": "max_sessions", "max_context_tokens": "the model's context"}


@dataclass(frozen=True)
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 50061
    runtime: str = "ray"
    ray_address: str | None = None
    ray_num_cpus: int | None = None  # locally started Ray; None: replicas * replica_cpus (rounded up)
    replica_cpus: float = 1.0
    replicas: int = 1
    workers: tuple[str, ...] = field(default_factory=tuple)
    worker_certs: tuple[str, ...] = field(default_factory=tuple)  # pinned certificate of each worker, same order
    local_workers: int = 1
    worker_call_timeout_s: float = 60.0
    worker_retry_after_s: float = 30.0
    batch_decode: bool = True
    batch_window_s: float = 0.25
    batch_max_rows: int = 16
    # Limits (counts, tokens, bytes): what each bounds and what happens just past it is bifrost/limits.py's table.
    max_sessions: int = 32
    max_sessions_per_replica: int | None = None  # sessions one replica holds; None: max_sessions
    max_pending_sessions: int = 8    # attested sessions that never sent a request (+ handshakes in progress)
    max_concurrent_rpcs: int = 40    # RPCs the serving port runs at once (streams included); more: RESOURCE_EXHAUSTED
    max_turns_per_session: int = 4096  # Generate turns one session may have (its CKKS keys' lifetime in turns)
    max_prompt_tokens: int = 512
    max_new_tokens: int = 128
    max_context_tokens: int | None = None  # history + prompt + new tokens of one turn; None: the model's context
    max_request_bytes: int = 1 << 20
    session_idle_s: float = 900.0
    pending_idle_s: float = 60.0     # idle limit of sessions that never sent a request
    token_lifetime_s: int = 900
    replica_timeout_s: float = 300.0  # longest wait for one replica answer (a call, or one streamed token)
    startup_timeout_s: float = 600.0  # replicas must have loaded their model within this
    # SIGTERM/SIGINT: stop accepting, let running turns finish for up to this long, then stop them (UNAVAILABLE)
    drain_s: float = 30.0
    # auto: tdx / sev-snp from configfs-tsm, or a clear failure; simulated only when named explicitly
    evidence_provider: str = "auto"
    # The policy the front end (the token issuer) verifies each replica's evidence against before it issues
    # a token; null: the default policy (simulated evidence accepted only when evidence_provider: simulated).
    issuer_policy: str | None = None
    run_dir: str = "runs"
    # worker identities caught deviating: shared by every replica and every later run naming the same file
    quarantine_file: str = "runs/worker-quarantine.json"
    # TLS on the serving port (PEM files; both or neither). Hides bearer tokens and metadata from the
    # network; prompts are sealed by the attested channel with or without it.
    tls_cert_file: str | None = None
    tls_key_file: str | None = None

    def __post_init__(self) -> None:
        if self.runtime not in RUNTIMES:
            raise UserError(f"serve.runtime must be one of {', '.join(RUNTIMES)}, got {self.runtime!r}")
        if not 0 <= self.port <= 65535:
            raise UserError(f"serve.port must be 0..65535, got {self.port}")
        for name in ("replicas", "max_sessions", "max_pending_sessions", "max_concurrent_rpcs", "max_turns_per_session",
                     "max_prompt_tokens", "max_new_tokens", "max_request_bytes"):
            if getattr(self, name) < 1:
                raise UserError(f"serve.{name} must be >= 1")
        for name in ("max_sessions_per_replica", "max_context_tokens"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise UserError(f"serve.{name} must be >= 1 (or null: {_NULL_MEANS[name]})")
        if self.ray_num_cpus is not None and self.ray_num_cpus < 1:
            raise UserError("serve.ray_num_cpus must be >= 1 (or null: sized to the replicas)")
        if not self.workers and self.local_workers < 1:
            raise UserError("serve: configure worker addresses or local_workers >= 1")
        if self.batch_window_s < 0 or self.batch_max_rows < 1:
            raise UserError("serve: batch_window_s must be >= 0 and batch_max_rows >= 1")
        for name in ("worker_call_timeout_s", "session_idle_s", "pending_idle_s", "replica_timeout_s",
                     "startup_timeout_s"):
            if not getattr(self, name) > 0:
                raise UserError(f"serve.{name} must be > 0")
        if not 0 <= self.drain_s <= 3600:
            raise UserError("serve.drain_s must be 0..3600 (seconds)")
        if self.replica_cpus < 0:
            raise UserError("serve.replica_cpus must be >= 0")
        if not 1 <= self.token_lifetime_s <= 86400:
            raise UserError("serve.token_lifetime_s must be 1..86400")
        from ..attest.evidence import provider_names

        if self.evidence_provider not in provider_names():
            raise UserError(f"serve.evidence_provider must be one of {', '.join(provider_names())}, got {self.evidence_provider!r}")
        if self.issuer_policy is not None:
            from ..attest.errors import AttestationError
            from ..attest.policy import load_policy

            try:
                load_policy(self.issuer_policy)
            except AttestationError as exc:
                raise UserError(f"serve.issuer_policy: {exc}") from None
        for a in self.workers:
            if not _is_host_port(a):
                raise UserError(f"serve.workers: {a!r} is not host:port")
        self._check_ray()
        if len(self.worker_certs) != len(self.workers):
            raise UserError(f"serve: {len(self.workers)} worker address(es) but {len(self.worker_certs)} "
                               "worker_certs: every worker's certificate is pinned (same order)")
        self.tls_credentials()  # validated at load

    def tls_credentials(self) -> tuple[bytes, bytes] | None:
        """``(private key PEM, certificate chain PEM)`` for ``grpc.ssl_server_credentials``, or None
        without TLS. Raises :class:`BifrostError` (one line) for half a pair, an unreadable or non-PEM
        file, an encrypted key, or a key that is not the first certificate's."""
        cert_file, key_file = self.tls_cert_file, self.tls_key_file
        if cert_file is None or key_file is None:
            if cert_file is not None or key_file is not None:
                raise UserError("serve: set both tls_cert_file and tls_key_file (--tls-cert/--tls-key), or neither")
            return None
        from cryptography import x509
        from cryptography.exceptions import UnsupportedAlgorithm
        from cryptography.hazmat.primitives import serialization

        cert_pem, key_pem = _read("tls_cert_file", cert_file), _read("tls_key_file", key_file)
        try:
            cert = x509.load_pem_x509_certificates(cert_pem)[0]
        except ValueError:
            raise UserError(f"serve.tls_cert_file: {self.tls_cert_file} holds no PEM certificate") from None
        try:
            key = serialization.load_pem_private_key(key_pem, password=None)
        except TypeError:
            raise UserError(f"serve.tls_key_file: {self.tls_key_file} is encrypted; give an unencrypted PEM key") from None
        except (ValueError, UnsupportedAlgorithm):
            raise UserError(f"serve.tls_key_file: {self.tls_key_file} holds no PEM private key") from None
        spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        if key.public_key().public_bytes(*spki) != cert.public_key().public_bytes(*spki):
            raise UserError(f"serve.tls_key_file: {self.tls_key_file} is not the key of the certificate in "
                               f"{self.tls_cert_file}")
        return key_pem, cert_pem

    def _check_ray(self) -> None:
        addr = self.ray_address
        if addr is not None:
            if addr.startswith("ray://"):
                raise UserError(
                    f"serve.ray_address {addr!r}: Ray Client (ray://) is not supported (token streaming needs "
                    "Ray streaming generators); run `bifrost serve` on a cluster node with ray_address: auto|host:port")
            if addr != "auto" and (not _is_host_port(addr) or "://" in addr):
                raise UserError(f"serve.ray_address must be 'auto' or host:port (the GCS address), got {addr!r}")
            if self.runtime != "ray":
                raise UserError("serve.ray_address needs runtime: ray")
            if not self.workers:
                raise UserError(
                    "serve.ray_address: replicas may run on other nodes, which cannot reach workers started on "
                    "127.0.0.1 here; give CKKS worker addresses (serve.workers / --workers host:port,...)")
        elif self.runtime == "ray" and self.replicas * self.replica_cpus > self.local_ray_cpus:
            raise UserError(
                f"serve: {self.replicas} replicas x replica_cpus {self.replica_cpus:g} need "
                f"{self.replicas * self.replica_cpus:g} Ray CPUs but ray_num_cpus is {self.ray_num_cpus}; "
                "raise ray_num_cpus (--ray-num-cpus, or null to size it to the replicas) or lower replica_cpus")

    @property
    def transport(self) -> str:
        """What the serving port speaks: ``"TLS"`` or ``"plaintext gRPC"``."""
        return "TLS" if self.tls_cert_file else "plaintext gRPC"

    @property
    def replica_sessions(self) -> int:
        """Sessions one replica holds at most: ``max_sessions_per_replica``, never more than ``max_sessions``."""
        return min(self.max_sessions_per_replica or self.max_sessions, self.max_sessions)

    @property
    def local_ray_cpus(self) -> int:
        """CPUs given to a locally started Ray."""
        if self.ray_num_cpus is not None:
            return self.ray_num_cpus
        return max(1, math.ceil(self.replicas * self.replica_cpus))

    def replace(self, **changes: Any) -> "ServeConfig":
        return dataclasses.replace(self, **changes)


def load_serve_config(path: Path | str | None = None) -> ServeConfig:
    p = Path(path) if path else DEFAULT_SERVE_CONFIG
    return build_section(ServeConfig, load_yaml(p), p.name)


def _read(name: str, path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise UserError(f"serve.{name}: cannot read {path}: {exc.strerror or exc}") from None


def _is_host_port(address: str) -> bool:
    """``host:port`` with a non-empty host and a decimal port."""
    host, _, port = address.rpartition(":")
    return bool(host) and port.isdigit()


def serving_config(cfg, scfg: ServeConfig, *, placement=None, adapter_digest: str | None = None) -> dict:
    """The public serving configuration bound into report_data (what a client may pin). ``cfg``: the
    :class:`~bifrost.config.RunConfig` the replicas run; ``placement``/``adapter_digest``: the policy object
    and the adapter digest a replica actually loaded (default: read from ``cfg`` now)."""
    placement = placement or placement_of(cfg)
    return {
        "model": cfg.model, "seed": cfg.seed, "backend": cfg.backend,
        "ckks": dataclasses.asdict(cfg.ckks) if cfg.ckks is not None else None,
        "delegation": json.loads(json.dumps(dataclasses.asdict(cfg.delegation))),
        "policy": placement.canonical(), "policy_digest": placement.digest(),
        "adapter_digest": adapter_digest or _adapter_digest(cfg.adapter),
        "generation": {k: v for k, v in dataclasses.asdict(cfg.generation).items() if k != "prompt"},
        "max_prompt_tokens": scfg.max_prompt_tokens, "max_new_tokens": scfg.max_new_tokens,
        "max_sessions": scfg.max_sessions, "token_lifetime_s": scfg.token_lifetime_s,
        "max_turns_per_session": scfg.max_turns_per_session, "max_context_tokens": scfg.max_context_tokens,
    }


def _adapter_digest(adapter: str | None) -> str | None:
    """SHA-256 (hex) over a LoRA adapter directory's files, or None without one."""
    if adapter is None:
        return None
    from ..attest.binding import compute_model_digest

    return compute_model_digest(adapter).hex()


def serving_config_digest(cfg, scfg: ServeConfig, **loaded) -> bytes:
    """Digest of :func:`serving_config` (``loaded``: its ``placement``/``adapter_digest`` keywords)."""
    from ..attest.binding import compute_serving_config_digest

    return compute_serving_config_digest(serving_config(cfg, scfg, **loaded))
