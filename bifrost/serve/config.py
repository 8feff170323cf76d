"""Typed ``serve:`` configuration, validated at load from ``configs/serve.yaml`` (unknown keys refused)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import CONFIG_DIR, build_section, load_yaml
from ..errors import BifrostError

DEFAULT_SERVE_CONFIG = CONFIG_DIR / "serve.yaml"
RUNTIMES = ("ray", "local")


@dataclass(frozen=True)
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 50061
    runtime: str = "ray"
    ray_address: str | None = None
    ray_num_cpus: int = 2
    replica_cpus: float = 1.0
    replicas: int = 1
    workers: tuple[str, ...] = field(default_factory=tuple)
    local_workers: int = 1
    worker_call_timeout_s: float = 60.0
    worker_retry_after_s: float = 30.0
    batch_decode: bool = True
    batch_window_s: float = 0.25
    batch_max_rows: int = 16
    max_sessions: int = 32
    max_prompt_tokens: int = 512
    max_new_tokens: int = 128
    max_request_bytes: int = 1 << 20
    session_idle_s: float = 900.0
    token_lifetime_s: int = 900
    # auto: tdx / sev-snp from configfs-tsm, or a clear failure; simulated only when named explicitly
    evidence_provider: str = "auto"
    run_dir: str = "runs"

    def __post_init__(self) -> None:
        if self.runtime not in RUNTIMES:
            raise BifrostError(f"serve.runtime must be one of {', '.join(RUNTIMES)}, got {self.runtime!r}")
        if not 0 <= self.port <= 65535:
            raise BifrostError(f"serve.port must be 0..65535, got {self.port}")
        for name in ("replicas", "max_sessions", "max_prompt_tokens", "max_new_tokens", "max_request_bytes",
                     "ray_num_cpus"):
            if getattr(self, name) < 1:
                raise BifrostError(f"serve.{name} must be >= 1")
        if not self.workers and self.local_workers < 1:
            raise BifrostError("serve: configure worker addresses or local_workers >= 1")
        if self.batch_window_s < 0 or self.batch_max_rows < 1:
            raise BifrostError("serve: batch_window_s must be >= 0 and batch_max_rows >= 1")
        if self.worker_call_timeout_s <= 0 or self.session_idle_s <= 0 or self.replica_cpus < 0:
            raise BifrostError("serve: timeouts must be > 0 and replica_cpus >= 0")
        if not 1 <= self.token_lifetime_s <= 86400:
            raise BifrostError("serve.token_lifetime_s must be 1..86400")
        from ..attest.evidence import provider_names

        if self.evidence_provider not in provider_names():
            raise BifrostError(f"serve.evidence_provider must be one of {', '.join(provider_names())}, got {self.evidence_provider!r}")
        for a in self.workers:
            host, _, port = a.rpartition(":")
            if not host or not port.isdigit():
                raise BifrostError(f"serve.workers: {a!r} is not host:port")

    def replace(self, **changes: Any) -> "ServeConfig":
        return dataclasses.replace(self, **changes)


def load_serve_config(path: Path | str | None = None) -> ServeConfig:
    p = Path(path) if path else DEFAULT_SERVE_CONFIG
    return build_section(ServeConfig, load_yaml(p), p.name)
