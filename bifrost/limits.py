"""Every limit of serving in one table: what it bounds, where its value is set, who enforces it, and what a
request just past it gets.

This module states the limits; it holds no values. A limit's value lives in one place only: a typed config
field (``serve.*``: :class:`~bifrost.serve.config.ServeConfig` and ``configs/serve.yaml``; ``worker.*``:
:class:`~bifrost.config.WorkerConfig` and the ``worker:`` section of ``configs/default.yaml``), validated at
load, or a module constant (``module:NAME``) for limits that are not configurable. :meth:`Limit.default`
reads it from there, the enforcing code reads the typed config, and the README's "Limits" table is
:func:`markdown_table` (``tests/test_limits.py`` checks both, so they cannot drift).

Where a refusal's reason travels: a limit checked after the replica opened the sealed record (prompt,
new and context tokens, stop sequences, Embed texts) is refused *sealed* (the reason inside the channel, a
generic cleartext message: counts and sizes of the plaintext never leave it); every other refusal is
cleartext and names only the configured limit, never a plaintext-derived count.
"""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass
from typing import Any

_SECTIONS = {"serve": ("bifrost.serve.config", "ServeConfig"), "worker": ("bifrost.config", "WorkerConfig")}


@dataclass(frozen=True)
class Limit:
    """One limit. ``source``: a config key ``section.field`` or a constant ``module:NAME``; ``unit``: what it
    counts; ``past_it``: the status (and where its reason travels) of a request just past it; ``digest``: bound
    into the serving-config digest (a client may pin it); ``test``: ``path::function`` of the test of what happens
    just past it."""

    name: str
    source: str
    unit: str
    enforced_by: str
    past_it: str
    digest: bool
    test: str

    @property
    def is_config_key(self) -> bool:
        return ":" not in self.source

    def default(self) -> Any:
        """The shipped value, read from where it is stated (a config field's default, or the constant)."""
        if self.is_config_key:
            section, name = self.source.split(".", 1)
            module, cls_name = _SECTIONS[section]
            cls = getattr(importlib.import_module(module), cls_name)
            f = {f.name: f for f in dataclasses.fields(cls)}[name]
            assert f.default is not dataclasses.MISSING, self.source  # limits are plain values, not factories
            return f.default
        module, name = self.source.split(":")
        return getattr(importlib.import_module(module), name)


_SEALED = "sealed: the code in cleartext, the reason only inside the channel"

LIMITS: tuple[Limit, ...] = (
    # -- the serving port ---------------------------------------------------------------------------------
    Limit("message size on the serving port", "bifrost.proto.wire:SERVING_MAX_MESSAGE_BYTES", "bytes",
          "gRPC (`serving_options`), either direction", "RESOURCE_EXHAUSTED, unread (gRPC's message)", False,
          "tests/serve/test_limits.py::test_message_over_the_serving_port_limit_is_refused_unread"),
    Limit("sealed payload of one request", "serve.max_request_bytes", "bytes (padded record)",
          "front end (`_check_sealed_request`)", "INVALID_ARGUMENT naming the limit (the record's size is on the wire)",
          False, "tests/serve/test_bad_input.py::test_oversized_sealed_payload_is_invalid_argument_naming_the_limit"),
    Limit("RPCs in progress (pending requests)", "serve.max_concurrent_rpcs", "RPCs (streams included)",
          "gRPC server (`maximum_concurrent_rpcs`)", "RESOURCE_EXHAUSTED, unread (gRPC's message)", False,
          "tests/serve/test_limits.py::test_rpcs_past_max_concurrent_rpcs_are_resource_exhausted"),
    # -- sessions -----------------------------------------------------------------------------------------
    Limit("sessions per front end", "serve.max_sessions", "sessions (handshakes included)",
          "front end (`SessionTable.reserve`)", "Attest: RESOURCE_EXHAUSTED naming the limit", True,
          "tests/serve/test_bad_input.py::test_too_many_sessions_is_resource_exhausted"),
    Limit("sessions per replica", "serve.max_sessions_per_replica", "sessions (null: max_sessions)",
          "front end (`SessionTable.reserve`); the replica refuses too (`TrustedReplica.attest`)",
          "Attest: RESOURCE_EXHAUSTED naming the limit", False,
          "tests/serve/test_limits.py::test_sessions_past_max_sessions_per_replica_are_resource_exhausted"),
    Limit("sessions that sent no request yet", "serve.max_pending_sessions", "sessions (handshakes included)",
          "front end (`SessionTable.reserve`)", "Attest: RESOURCE_EXHAUSTED naming the limit", False,
          "tests/serve/test_bad_input.py::test_pending_sessions_are_capped"),
    Limit("turns per session", "serve.max_turns_per_session", "Generate turns whose record was opened",
          "front end (`SessionTable.begin`)",
          "Generate: RESOURCE_EXHAUSTED naming the limit (turns are countable on the wire); attest a new session",
          True, "tests/serve/test_limits.py::test_a_turn_past_max_turns_per_session_is_resource_exhausted"),
    # -- one turn (checked inside the replica, after the record was opened) ----------------------------
    Limit("prompt tokens of a turn (or of each Embed text)", "serve.max_prompt_tokens", "tokens",
          "replica (`validation.check_generate`, `check_embed`)", f"INVALID_ARGUMENT, {_SEALED}", True,
          "tests/serve/test_limits.py::test_per_turn_limits_refuse_sealed_and_disturb_nothing"),
    Limit("new tokens of a turn", "serve.max_new_tokens", "tokens", "replica (`validation.check_generate`)",
          f"INVALID_ARGUMENT, {_SEALED}", True,
          "tests/serve/test_limits.py::test_per_turn_limits_refuse_sealed_and_disturb_nothing"),
    Limit("context of a turn (history + prompt + new tokens)", "serve.max_context_tokens",
          "tokens (null: the model's context)", "replica (`validation.check_generate`)",
          f"INVALID_ARGUMENT, {_SEALED}; reset the history", True,
          "tests/serve/test_limits.py::test_per_turn_limits_refuse_sealed_and_disturb_nothing"),
    Limit("stop sequences of a turn", "bifrost.tee.validation:MAX_STOP_SEQUENCES", "sequences",
          "replica (`validation.check_generate`)", f"INVALID_ARGUMENT, {_SEALED}", False,
          "tests/serve/test_limits.py::test_per_turn_limits_refuse_sealed_and_disturb_nothing"),
    Limit("characters of a stop sequence", "bifrost.tee.validation:MAX_STOP_CHARS", "characters",
          "replica (`validation.check_generate`)", f"INVALID_ARGUMENT, {_SEALED}", False,
          "tests/serve/test_limits.py::test_per_turn_limits_refuse_sealed_and_disturb_nothing"),
    Limit("texts of an Embed request", "bifrost.tee.validation:MAX_EMBED_TEXTS", "texts",
          "replica (`validation.check_embed`)", f"INVALID_ARGUMENT, {_SEALED}", False,
          "tests/test_limits.py::test_embed_past_max_embed_texts_is_rejected"),
    # -- CKKS workers ---------------------------------------------------------------------------------
    Limit("worker sessions per worker", "worker.max_sessions", "worker sessions",
          "worker (`WorkerService.OpenSession`)",
          "OpenSession: RESOURCE_EXHAUSTED; a session's Attest then: RESOURCE_EXHAUSTED", False,
          "tests/worker/test_service.py::test_too_many_worker_sessions_is_resource_exhausted"),
    Limit("encoded-weight cache", "worker.cache_bytes", "bytes (entries at their real size)",
          "worker (`PreparedWeightCache`)", "nothing refused: least-recently-used entries are evicted "
          "(re-encoded on their next use)", False,
          "tests/worker/test_service.py::test_prepared_weights_carry_their_size_and_stay_within_the_cache_budget"),
    Limit("public context of a worker session", "worker.max_public_context_bytes", "bytes",
          "worker (`WorkerService.OpenSession`)", "INVALID_ARGUMENT naming the limit", False,
          "tests/worker/test_service.py::test_oversized_public_context_is_refused"),
    Limit("request to a worker", "bifrost.proto.wire:WORKER_MAX_REQUEST_BYTES", "bytes",
          "gRPC (`worker_server_options`)", "RESOURCE_EXHAUSTED, unread (gRPC's message)", False,
          "tests/worker/test_limits.py::test_worker_request_over_its_message_limit_is_refused_unread"),
    Limit("ciphertexts per worker call", "bifrost.worker.service:MAX_CIPHERTEXTS_PER_CALL", "ciphertexts",
          "worker (`Linear`, `LinearBatch`)", "INVALID_ARGUMENT naming the limit", False,
          "tests/fuzz/test_worker_rpcs.py::test_linear"),
    Limit("items per LinearBatch call", "bifrost.worker.service:MAX_BATCH_ITEMS", "items",
          "worker (`LinearBatch`)", "INVALID_ARGUMENT naming the limit", False,
          "tests/fuzz/test_worker_rpcs.py::test_linear_batch"),
    Limit("layer groups prepared at OpenSession", "bifrost.worker.service:MAX_PREPARE_GROUPS", "groups",
          "worker (`OpenSession`)", "INVALID_ARGUMENT naming the limit", False,
          "tests/fuzz/test_worker_rpcs.py::test_open_session"),
)


def by_source(source: str) -> Limit:
    """The limit stated at ``source`` (a config key or ``module:NAME``); KeyError if none."""
    for limit in LIMITS:
        if limit.source == source:
            return limit
    raise KeyError(source)


def format_value(value: Any) -> str:
    """A default as the README shows it: ``null``, an integer, or bytes as ``N (x MiB)``."""
    if value is None:
        return "null"
    if isinstance(value, int) and value >= 1 << 20 and value % (1 << 20) == 0:
        return f"{value} ({value >> 30} GiB)" if value % (1 << 30) == 0 else f"{value} ({value >> 20} MiB)"
    return str(value)


def markdown_table() -> str:
    """The README's "Limits" table: one row per limit, in :data:`LIMITS` order."""
    rows = ["| limit | set by | default | unit | enforced by | just past it | in digest |",
            "|---|---|---|---|---|---|---|"]
    for limit in LIMITS:
        rows.append(f"| {limit.name} | `{limit.source}` | {format_value(limit.default())} | {limit.unit} | "
                    f"{limit.enforced_by} | {limit.past_it} | {'yes' if limit.digest else 'no'} |")
    return "\n".join(rows)
