"""Typed run configuration: the dataclasses of ``configs/*.yaml`` and the pure mapping -> dataclass step.

Unknown keys, wrong types and insecure CKKS parameters are refused with a :class:`~bifrost.errors.UserError`
naming the file and the key. No file I/O here: :mod:`bifrost.config_loader` reads the files and resolves
what a config names (CKKS parameters, placement policy). The ``ckks`` section is a
:class:`~bifrost.ckks.params.CKKSParams` (a pure value type whose construction enforces the 128-bit rule).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .ckks.params import CKKSParams
from .errors import UserError

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
MODES = ("bifrost", "bifrost+")  # generation.mode: the prompt through CKKS too, or prefilled inside the TEE
DEFAULT_CONFIG = CONFIG_DIR / "default.yaml"


NO_WORKER_CHOICES = ("tee", "fail")


@dataclass(frozen=True)
class DelegationConfig:
    """How delegated layers group: siblings named in one ``fuse`` entry read the same input and share one
    encrypted input and one worker call. (Which layers are delegated: the placement policy, ``policy:``.)"""

    fuse: tuple[tuple[str, ...], ...] = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("query", "key", "value"),
                                         ("q_lin", "k_lin", "v_lin"))
    # When no CKKS worker replies to a layer call (all down, partitioned, timing out): ``tee`` computes the product
    # inside the TEE and the turn goes on (a worker that timed out is skipped until ``worker_retry_after_s``); ``fail``
    # ends the turn (UNAVAILABLE) and tries every worker again on the next call. It changes what the accelerator
    # sees, so it is part of the serving-config digest.
    on_no_worker: str = "tee"

    def __post_init__(self) -> None:
        if self.on_no_worker not in NO_WORKER_CHOICES:
            raise UserError(f"delegation.on_no_worker must be one of {', '.join(NO_WORKER_CHOICES)}, "
                            f"got {self.on_no_worker!r}")


@dataclass(frozen=True)
class WorkerConfig:
    """The untrusted CKKS worker. ``address``/``cert``/``timeout_s`` tell the trusted side how to reach one;
    the rest configures ``bifrost worker`` itself."""

    address: str | None = None  # host:port of a running worker; None starts a local one on loopback
    cert: str | None = None     # that worker's certificate (PEM), pinned; required with ``address``
    timeout_s: float = 600.0
    identity: str | None = None  # worker: folder of its TLS key + certificate (created on first start)
    trusted_clients: tuple[str, ...] = ()  # worker: certificates of the trusted runtimes that may call it
    max_sessions: int = 8  # worker: worker sessions (registered public contexts) held at once
    session_idle_s: float = 900.0  # worker: worker sessions unused this long are dropped (the trusted side reopens)
    cache_bytes: int = 12 * 2**30  # worker: encoded-weight cache, bytes (LRU; entries carry their real size)
    max_public_context_bytes: int = 128 << 20  # worker: larger public contexts are refused

    def __post_init__(self) -> None:
        if self.max_sessions < 1 or self.cache_bytes < 1 or self.session_idle_s <= 0 or self.timeout_s <= 0 \
                or self.max_public_context_bytes < 1024:
            raise UserError("worker: need max_sessions >= 1, cache_bytes >= 1, session_idle_s > 0, timeout_s > 0, "
                               "max_public_context_bytes >= 1024")


@dataclass(frozen=True)
class TEEConfig:
    """The trusted runtime's own settings."""

    identity: str | None = None         # folder of its TLS key + certificate; None: a fresh one per process
    quarantine_file: str | None = None  # worker identities caught deviating (JSON, shared by replicas and
                                        # later runs); None: kept in memory for this process


@dataclass(frozen=True)
class VerificationConfig:
    """The tolerance check of backends whose replies are not exact (bifrost.tee.verify; TenSEAL): k secret vectors
    per matrix and session, and the width z of the honest tolerance. Native replies are checked exactly."""

    vectors: int = 8
    z: float = 8.0

    def __post_init__(self) -> None:
        if not 1 <= self.vectors <= 64 or not 4.0 <= self.z <= 40.0:
            raise UserError("verification: need 1 <= vectors <= 64 and 4 <= z <= 40")


@dataclass(frozen=True)
class GenerationConfig:
    prompt: str = "Private LLM"
    max_new_tokens: int = 8
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    mode: str = "bifrost"  # "bifrost": prompt through CKKS too; "bifrost+": prompt prefilled inside the TEE

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise UserError(f"generation.mode must be 'bifrost' or 'bifrost+', got {self.mode!r}")
        if self.max_new_tokens < 1 or self.temperature <= 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise UserError("generation: need max_new_tokens >= 1, temperature > 0, 0 < top_p <= 1, top_k >= 0")


@dataclass(frozen=True)
class RunConfig:
    model: str = "gpt2"
    seed: int = 0
    backend: str = "native"
    ckks: CKKSParams | None = None  # None: the model's catalogue setting, else the backend's recommended parameters
    # (resolved by bifrost.config_loader.ckks_params_of)
    policy: str = "bifrost"  # placement policy: configs/policies/<name>.yaml or a YAML path
    adapter: str | None = None  # a LoRA adapter directory (peft) on top of the model: runs in the TEE
    delegation: DelegationConfig = field(default_factory=DelegationConfig)
    worker: WorkerConfig = field(default_factory=WorkerConfig)
    tee: TEEConfig = field(default_factory=TEEConfig)
    verification: VerificationConfig = field(default_factory=VerificationConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)

    def replace(self, **changes: Any) -> "RunConfig":
        return dataclasses.replace(self, **changes)


def build_section(cls, data: Any, where: str):
    """Build dataclass ``cls`` from a YAML mapping, refusing unknown keys and wrong types (``where`` names it)."""
    if not dataclasses.is_dataclass(cls):
        return data
    if not isinstance(data, dict):
        raise UserError(f"{where}: expected a mapping")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(data) - set(fields)
    if unknown:
        raise UserError(f"{where}: unknown key(s) {sorted(unknown)}; allowed: {sorted(fields)}")
    kwargs = {}
    hints = {f.name: f.type for f in dataclasses.fields(cls)}
    for name, value in data.items():
        sub = {"ckks": CKKSParams, "delegation": DelegationConfig, "worker": WorkerConfig, "tee": TEEConfig,
               "verification": VerificationConfig, "generation": GenerationConfig}
        if cls is RunConfig and name in sub:
            kwargs[name] = None if (value is None and name == "ckks") else build_section(sub[name], value, f"{where}.{name}")
            continue
        kwargs[name] = _coerce(value, str(hints[name]), f"{where}.{name}")
    try:
        return cls(**kwargs)
    except ValueError as exc:  # CKKSParams: below 128-bit security or malformed
        raise UserError(f"{where}: {exc}") from None


def _coerce(value: Any, hint: str, where: str) -> Any:
    if value is None:
        if "None" in hint:
            return None
        raise UserError(f"{where}: must not be null")
    if hint.startswith("tuple[tuple"):
        if not isinstance(value, list) or not all(isinstance(v, list) for v in value):
            raise UserError(f"{where}: expected a list of lists")
        return tuple(tuple(str(x) for x in v) for v in value)
    if hint.startswith("tuple"):
        if not isinstance(value, list):
            raise UserError(f"{where}: expected a list")
        item: type = int if "int" in hint else str
        try:
            return tuple(item(x) for x in value)
        except (TypeError, ValueError):
            raise UserError(f"{where}: expected a list of {item.__name__}") from None
    for name, kind in (("bool", bool), ("int", int), ("float", float), ("str", str)):
        if hint.startswith(name) or hint.startswith(f"{name} |"):
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                return float(value)
            if kind is not bool and isinstance(value, bool) or not isinstance(value, kind):
                raise UserError(f"{where}: expected {name}, got {type(value).__name__}")
            return value
    return value
