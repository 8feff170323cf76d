"""The untrusted CKKS worker: a gRPC service evaluating plaintext-weight × ciphertext products.

What it can see: public model weights, public CKKS contexts (parameters + evaluation keys) and
ciphertexts. It never receives a secret key (the API has no field for one and the backends refuse
public contexts that carry one) and never sees a plaintext activation.

A *worker session* is the registration of one CKKS public context (``OpenSession`` → id, used by
``Linear``/``LinearBatch``, ended by ``CloseSession`` or idle expiry); the RPC and field names keep the
short word ``session``. It is not a user's attested session (:mod:`bifrost.tee.replica`): each of those
holds one worker session per worker.

Who may call it: it listens only with mutual TLS and requires the certificate of a configured trusted
runtime (:mod:`bifrost.attest.mtls`); there is no plaintext port.

Hostile callers cannot exhaust it:

- parameters: only the configured parameter sets are accepted (each backend's recommended set, plus
  the run config's ``ckks`` for its backend), so prepared weights have a bounded number of cache keys;
- memory: prepared weights carry their real size (``nbytes``) and the cache evicts least-recently-used
  entries to stay within ``cache_bytes``; public contexts are capped at ``max_public_context_bytes``;
  worker sessions at ``max_sessions``. Budget: cache_bytes + max_sessions × (a worker session's evaluator: about its
  public context, 97 B for the native backend, 12–64 MB for TenSEAL's rotation keys) + the model's weights;
- worker sessions: a slot is reserved atomically before any work, released on failure, and worker sessions
  unused for ``session_idle_s`` are dropped (the trusted side reopens them: NOT_FOUND "... worker session").

Every bad request gets a typed status and a message, and the worker keeps serving:
unknown worker session/layer → NOT_FOUND; request bytes that do not parse as the method's message (e.g. invalid
UTF-8 in a string field), malformed, truncated or foreign ciphertexts or public contexts, wrong counts,
insecure or unconfigured parameters, secret keys → INVALID_ARGUMENT; weight digest mismatch →
FAILED_PRECONDITION; too many worker sessions → RESOURCE_EXHAUSTED; anything unexpected → INTERNAL with a generic
message (logged by exception type and code location only). The mapping is :mod:`bifrost.proto.edge`'s, shared with
the front end; how the trusted side reads a worker's status (unavailable or a deviation) is its engine's decision.
"""

from __future__ import annotations

import logging
import secrets
import threading
from concurrent.futures import ThreadPoolExecutor
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import grpc
import numpy as np

from ..ckks import CiphertextError, Evaluator, GroupShape, InsecureParametersError
from ..ckks.registry import get_backend
from ..config import WorkerConfig
from ..config_loader import ckks_params_of
from ..errors import UserError
from ..model.delegation import Site
from ..proto import worker_pb2, worker_pb2_grpc
from ..proto.edge import Abort, Edge, parse_or_malformed
from ..proto.wire import worker_server_options

log = logging.getLogger("bifrost.worker")

MAX_CIPHERTEXTS_PER_CALL = 8192
MAX_BATCH_ITEMS = 64
MAX_PREPARE_GROUPS = 4096


# Bad input and failures as gRPC statuses (bifrost.proto.edge, shared with the front end): malformed or foreign
# ciphertexts and public contexts, insecure parameters and other ValueErrors are the caller's fault.
EDGE = Edge(log, "internal worker error", invalid=(CiphertextError, InsecureParametersError, ValueError))


@dataclass
class _WorkerSession:
    """One registered public context: its backend's evaluator and parameter fingerprint."""

    backend: str
    evaluator: Evaluator
    params_key: str
    last_used: float


@dataclass
class WorkerLimits:
    """What one worker process enforces (see the module docstring): the limits of the ``worker:`` config section
    (:class:`~bifrost.config.WorkerConfig`, whose defaults these are; seconds and bytes; ``max_sessions`` and
    ``session_idle_s`` count worker sessions) plus ``allowed_params``, derived from the backends and the run."""

    max_sessions: int = WorkerConfig.max_sessions
    session_idle_s: float = WorkerConfig.session_idle_s
    cache_bytes: int = WorkerConfig.cache_bytes
    max_public_context_bytes: int = WorkerConfig.max_public_context_bytes
    allowed_params: dict[str, frozenset[str]] = field(default_factory=dict)  # backend -> parameter fingerprints


def allowed_params(cfg) -> dict[str, frozenset[str]]:
    """Each registered backend's recommended parameters, plus the run's parameters for its backend (``ckks``, else
    its model's catalog setting)."""
    from ..ckks.registry import available_backends

    out: dict[str, set[str]] = {}
    for name in available_backends():
        try:
            out.setdefault(name, set()).add(get_backend(name).default_params.fingerprint())
        except ImportError:  # a backend whose library is missing here: not served
            continue
    if cfg is not None:  # the run's own parameters: its ckks, else its model's (configs/models.yaml), else default
        out.setdefault(cfg.backend, set()).add(ckks_params_of(cfg).fingerprint())
    return {k: frozenset(v) for k, v in out.items()}


class PreparedWeightCache:
    """Encoded weights keyed by (backend, parameters, layer names), shared by worker sessions; LRU within
    ``budget`` bytes, each entry counted at its real size (``nbytes``). Thread-safe."""

    def __init__(self, budget_bytes: int) -> None:
        self.budget = budget_bytes
        self._entries: OrderedDict[tuple, tuple[object, int]] = OrderedDict()
        self._lock = threading.Lock()
        self._key_locks: dict[tuple, threading.Lock] = {}
        self.bytes = 0
        self.evictions = 0

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def get_or_prepare(self, key: tuple, prepare: Callable[[], Any]) -> Any:
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return self._entries[key][0]
            key_lock = self._key_locks.setdefault(key, threading.Lock())
        with key_lock:  # one encoder per key; others wait and then hit the cache
            with self._lock:
                if key in self._entries:
                    self._entries.move_to_end(key)
                    return self._entries[key][0]
            prepared = prepare()
            size = int(prepared.nbytes)
            with self._lock:
                self._entries[key] = (prepared, size)
                self.bytes += size
                while self.bytes > self.budget and len(self._entries) > 1:
                    _, (_, old) = self._entries.popitem(last=False)
                    self.bytes -= old
                    self.evictions += 1
                self._key_locks.pop(key, None)
            return prepared


# Every product runs on this one thread, whichever gRPC thread received the call: the kernels use all cores per
# operation, so concurrent calls gain nothing, and each new calling thread would start its own OpenMP team
# (measured: 30 % slower from a pool of gRPC-like threads than from one thread, in one process).
_KERNELS = ThreadPoolExecutor(max_workers=1, thread_name_prefix="worker-kernels")


class WorkerService(worker_pb2_grpc.CKKSWorkerServicer):
    def __init__(self, model_name: str, layers: list[tuple[Site, np.ndarray]], limits: WorkerLimits | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.model_name = model_name
        self.layers = {site.name: (site, w) for site, w in layers}
        self.limits = limits or WorkerLimits(allowed_params=allowed_params(None))
        self.clock = clock
        self.cache = PreparedWeightCache(self.limits.cache_bytes)
        self._worker_sessions: dict[str, _WorkerSession] = {}
        self._reserved = 0
        self._lock = threading.Lock()
        self.stop_sweeper: threading.Event | None = None  # set by serve()

    # -- helpers ---------------------------------------------------------------------------
    def _resolve_group(self, group: worker_pb2.LayerGroup) -> tuple[GroupShape, list[str], list[np.ndarray]]:
        if not group.layers:
            raise Abort(grpc.StatusCode.INVALID_ARGUMENT, "layer group is empty")
        if len(group.layers) > 16:
            raise Abort(grpc.StatusCode.INVALID_ARGUMENT, "a layer group has at most 16 layers")
        names, weights, d_in = [], [], None
        for ref in group.layers:
            entry = self.layers.get(ref.name)
            if entry is None:
                raise Abort(grpc.StatusCode.NOT_FOUND, f"unknown layer {ref.name[:200]!r} (model {self.model_name})")
            site, w = entry
            if ref.digest != site.digest:
                raise Abort(grpc.StatusCode.FAILED_PRECONDITION,
                            f"weight digest mismatch for layer {ref.name!r}: worker serves {site.digest[:16]}…, "
                            f"caller expects {ref.digest[:16]}…")
            if d_in is not None and site.d_in != d_in:
                raise Abort(grpc.StatusCode.INVALID_ARGUMENT, "layers of one group must share d_in")
            d_in = site.d_in
            names.append(ref.name)
            weights.append(w)
        if len(set(names)) != len(names):
            raise Abort(grpc.StatusCode.INVALID_ARGUMENT, "a layer appears twice in one group")
        assert d_in is not None  # the group is not empty (checked above)
        return GroupShape(d_in, tuple(self.layers[n][0].d_out for n in names)), names, weights

    def expire_idle(self) -> int:
        """Drop worker sessions unused for ``session_idle_s``; returns how many."""
        now = self.clock()
        with self._lock:
            idle = [sid for sid, ws in self._worker_sessions.items() if now - ws.last_used > self.limits.session_idle_s]
            for sid in idle:
                del self._worker_sessions[sid]
        if idle:
            log.info("%d idle worker session(s) expired", len(idle))
        return len(idle)

    def _worker_session(self, session_id: str) -> _WorkerSession:
        with self._lock:
            ws = self._worker_sessions.get(session_id)
            if ws is not None and self.clock() - ws.last_used > self.limits.session_idle_s:
                del self._worker_sessions[session_id]
                ws = None
            if ws is not None:
                ws.last_used = self.clock()
        if ws is None:
            raise Abort(grpc.StatusCode.NOT_FOUND, "unknown, expired or closed worker session")
        return ws

    def _prepared(self, ws: _WorkerSession, shape: GroupShape, names: list[str], weights: list[np.ndarray]):
        key = (ws.backend, ws.params_key, tuple(names))
        return self.cache.get_or_prepare(key, lambda: ws.evaluator.prepare(shape, weights))

    # -- RPCs ------------------------------------------------------------------------------
    def Describe(self, request, context):
        from ..ckks.registry import available_backends

        return worker_pb2.DescribeReply(
            model=self.model_name,
            layers=[worker_pb2.LayerInfo(name=s.name, d_in=s.d_in, d_out=s.d_out, digest=s.digest)
                    for s, _ in self.layers.values()],
            backends=[b for b in available_backends() if b in self.limits.allowed_params],
        )

    def _evaluator(self, request) -> tuple[str, Evaluator, str]:
        allowed = self.limits.allowed_params.get(request.backend)
        if allowed is None:
            raise Abort(grpc.StatusCode.INVALID_ARGUMENT,
                        f"backend {request.backend[:64]!r} is not served here; served: {sorted(self.limits.allowed_params)}")
        if len(request.public_context) > self.limits.max_public_context_bytes:
            raise Abort(grpc.StatusCode.INVALID_ARGUMENT, f"public context over max_public_context_bytes="
                                                           f"{self.limits.max_public_context_bytes}")
        backend = get_backend(request.backend)
        evaluator = backend.evaluator(bytes(request.public_context))
        key = evaluator.params.fingerprint()
        if key not in allowed:
            raise Abort(grpc.StatusCode.INVALID_ARGUMENT,
                        f"CKKS parameters {evaluator.params} are not configured on this worker")
        return backend.name, evaluator, key

    def OpenSession(self, request, context):
        if len(request.prepare) > MAX_PREPARE_GROUPS:
            raise Abort(grpc.StatusCode.INVALID_ARGUMENT, f"at most {MAX_PREPARE_GROUPS} groups to prepare")
        self.expire_idle()
        with self._lock:  # reserve the slot before any work: the check and the insert are one step
            if len(self._worker_sessions) + self._reserved >= self.limits.max_sessions:
                raise Abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                            f"worker already holds {self.limits.max_sessions} worker sessions (max_sessions)")
            self._reserved += 1
        try:
            backend, evaluator, params_key = self._evaluator(request)
            ws = _WorkerSession(backend, evaluator, params_key, self.clock())
            groups = [self._resolve_group(g) for g in request.prepare]
            t0 = time.perf_counter()
            for shape, names, weights in _progress(groups, "encoding weights"):
                self._prepared(ws, shape, names, weights)
            session_id = secrets.token_hex(16)
            with self._lock:
                self._worker_sessions[session_id] = ws
                self._reserved -= 1
        except BaseException:
            with self._lock:
                self._reserved -= 1
            raise
        log.info("worker session %s… opened (%s, %d groups prepared)", session_id[:8], backend, len(groups))
        return worker_pb2.OpenSessionReply(session_id=session_id, prepare_seconds=time.perf_counter() - t0)

    def Linear(self, request, context):
        t0 = time.perf_counter()
        ws = self._worker_session(request.session_id)
        shape, names, weights = self._resolve_group(request.group)
        n = len(request.ciphertexts)
        if n == 0 or n > MAX_CIPHERTEXTS_PER_CALL:
            raise Abort(grpc.StatusCode.INVALID_ARGUMENT,
                        f"expected 1..{MAX_CIPHERTEXTS_PER_CALL} ciphertexts, got {n}")
        prepared = self._prepared(ws, shape, names, weights)
        outputs = _KERNELS.submit(ws.evaluator.apply, prepared, list(request.ciphertexts)).result()
        return worker_pb2.LinearReply(
            outputs=[worker_pb2.CiphertextList(ciphertexts=o) for o in outputs],
            compute_seconds=time.perf_counter() - t0,
        )

    def LinearBatch(self, request, context):
        """Items that share parameters go through the backend's ``apply_many`` together (one kernel
        pass for the native backend); items of other parameter sets form their own pass."""
        t0 = time.perf_counter()
        shape, names, weights = self._resolve_group(request.group)
        n_items = len(request.items)
        if not 1 <= n_items <= MAX_BATCH_ITEMS:
            raise Abort(grpc.StatusCode.INVALID_ARGUMENT, f"expected 1..{MAX_BATCH_ITEMS} items, got {n_items}")
        total = sum(len(item.ciphertexts) for item in request.items)
        if total > MAX_CIPHERTEXTS_PER_CALL or any(not item.ciphertexts for item in request.items):
            raise Abort(grpc.StatusCode.INVALID_ARGUMENT,
                        f"every item needs ciphertexts and all items together at most "
                        f"{MAX_CIPHERTEXTS_PER_CALL}, got {total}")
        worker_sessions = [self._worker_session(item.session_id) for item in request.items]
        by_params: dict[tuple[str, str], list[int]] = {}
        for i, ws in enumerate(worker_sessions):
            by_params.setdefault((ws.backend, ws.params_key), []).append(i)
        results: list = [None] * n_items
        for indices in by_params.values():
            first = worker_sessions[indices[0]].evaluator
            prepared = self._prepared(worker_sessions[indices[0]], shape, names, weights)
            outs = _KERNELS.submit(first.apply_many, prepared,
                                   [(worker_sessions[i].evaluator, list(request.items[i].ciphertexts))
                                    for i in indices]).result()
            for i, out in zip(indices, outs):
                results[i] = worker_pb2.LinearBatchResult(
                    outputs=[worker_pb2.CiphertextList(ciphertexts=o) for o in out])
        return worker_pb2.LinearBatchReply(results=results, compute_seconds=time.perf_counter() - t0)

    def CloseSession(self, request, context):
        with self._lock:
            self._worker_sessions.pop(request.session_id, None)
        return worker_pb2.CloseSessionReply()


def _add_servicer(service: WorkerService, server: grpc.Server) -> None:
    """``worker_pb2_grpc.add_CKKSWorkerServicer_to_server`` with deserializers that never raise."""
    desc = worker_pb2.DESCRIPTOR.services_by_name["CKKSWorker"]
    handlers = {}
    for m in desc.methods:
        request_cls, reply_cls = getattr(worker_pb2, m.input_type.name), getattr(worker_pb2, m.output_type.name)
        handlers[m.name] = grpc.unary_unary_rpc_method_handler(
            EDGE.unary(m.name, getattr(service, m.name), m.input_type.name),
            request_deserializer=parse_or_malformed(request_cls), response_serializer=reply_cls.SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(desc.full_name, handlers),))
    server.add_registered_method_handlers(desc.full_name, handlers)


def _progress(items, desc):
    import sys

    if len(items) < 2 or not sys.stderr.isatty():
        return items
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit="group")


def serve(service: WorkerService, credentials, host: str = "127.0.0.1", port: int = 0,
          threads: int = 4) -> tuple[grpc.Server, int]:
    """Start the gRPC server with mutual-TLS ``credentials`` (:func:`bifrost.attest.mtls.server_credentials`);
    returns (server, bound port). Idle worker sessions are swept every minute."""
    from concurrent import futures

    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    if credentials is None:
        raise ValueError("a worker serves only with mutual TLS credentials")
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=threads),
        options=worker_server_options(),
    )
    _add_servicer(service, server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    bound = server.add_secure_port(f"{host}:{port}", credentials)
    if bound == 0:
        raise OSError(f"cannot bind {host}:{port}")
    server.start()
    health_servicer.set("bifrost.worker.v1.CKKSWorker", health_pb2.HealthCheckResponse.SERVING)
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    stop = threading.Event()
    period = min(60.0, service.limits.session_idle_s / 2)

    def sweep() -> None:
        while not stop.wait(period):
            service.expire_idle()

    threading.Thread(target=sweep, daemon=True, name="worker-session-sweeper").start()
    service.stop_sweeper = stop
    return server, bound


def bound_allocator(mmap_threshold: int = 1 << 20, arenas: int = 2) -> bool:
    """glibc only: serve allocations of ``mmap_threshold`` bytes or more with their own mappings (returned to the
    system when freed: evicted prepared weights really leave) and cap malloc arenas at ``arenas`` (per-thread
    arenas otherwise keep freed memory). Without it, a flood of OpenSession requests measured 3.4 GiB of
    resident memory for a 0.5 GiB cache (GPT-2 124M; with it 1.6 GiB). Call before the first threads start.
    Returns False where glibc is not the allocator."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    M_MMAP_THRESHOLD, M_ARENA_MAX = -3, -8
    return bool(mallopt(M_MMAP_THRESHOLD, mmap_threshold)) and bool(mallopt(M_ARENA_MAX, arenas))


def limits_from_config(cfg) -> WorkerLimits:
    w = cfg.worker
    return WorkerLimits(w.max_sessions, w.session_idle_s, w.cache_bytes, w.max_public_context_bytes, allowed_params(cfg))


def build_service(model: str, seed: int, placement, limits: WorkerLimits | None = None) -> WorkerService:
    """Load the model's public weights and keep only the layers ``placement`` (a placement policy) delegates."""
    from ..model.catalog import load_model, resolve
    from ..model.delegation import sites

    spec = resolve(model)
    torch_model = load_model(spec, seed)
    layers = sites(torch_model, placement, model, check_requires=False)  # (an adapter stays in the TEE)
    del torch_model
    if not layers:
        raise UserError(f"placement policy {placement.name} delegates no layer of {model}: no worker is needed")
    return WorkerService(spec.name, layers, limits)


def client_certificates(paths: Iterable[str]) -> list[bytes]:
    from ..attest.mtls import read_certificate

    return [read_certificate(p) for p in paths]
