"""The untrusted CKKS worker: a gRPC service evaluating plaintext-weight × ciphertext products.

What it can see: public model weights, public CKKS contexts (parameters + evaluation keys) and
ciphertexts. It never receives a secret key (the API has no field for one and the backends refuse
public contexts that carry one) and never sees a plaintext activation.

Bad requests get a gRPC status and a message and leave the worker serving:
unknown session/layer → NOT_FOUND; malformed, truncated or foreign ciphertexts, wrong counts,
insecure parameters, secret keys → INVALID_ARGUMENT; weight digest mismatch → FAILED_PRECONDITION;
too many sessions → RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import grpc
import numpy as np

from ..ckks import CiphertextError, GroupShape, InsecureParametersError, apply_many, get_backend
from ..model.delegation import Site
from ..proto import worker_pb2, worker_pb2_grpc

log = logging.getLogger("bifrost.worker")

MAX_MESSAGE_BYTES = 1 << 30
MAX_CIPHERTEXTS_PER_CALL = 4096
MAX_BATCH_ITEMS = 64


class _Abort(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


@dataclass
class _Session:
    backend: str
    evaluator: object
    params_key: str
    last_used: float = field(default_factory=time.monotonic)


class PreparedWeightCache:
    """Encoded weights keyed by (backend, parameters, layer names), shared by sessions; LRU by bytes."""

    def __init__(self, budget_bytes: int) -> None:
        self.budget = budget_bytes
        self._entries: OrderedDict[tuple, tuple[object, int]] = OrderedDict()
        self._lock = threading.Lock()
        self._key_locks: dict[tuple, threading.Lock] = {}
        self.bytes = 0

    def get_or_prepare(self, key: tuple, prepare) -> object:
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return self._entries[key][0]
            key_lock = self._key_locks.setdefault(key, threading.Lock())
        with key_lock:  # one encoder per key; others wait and then hit the cache
            with self._lock:
                if key in self._entries:
                    return self._entries[key][0]
            prepared = prepare()
            size = int(getattr(prepared, "nbytes", 0))
            with self._lock:
                self._entries[key] = (prepared, size)
                self.bytes += size
                while self.bytes > self.budget and len(self._entries) > 1:
                    _, (_, old) = self._entries.popitem(last=False)
                    self.bytes -= old
            return prepared


class WorkerService(worker_pb2_grpc.CKKSWorkerServicer):
    def __init__(self, model_name: str, layers: list[tuple[Site, np.ndarray]], max_sessions: int = 8,
                 cache_bytes: int = 12 * 2**30) -> None:
        self.model_name = model_name
        self.layers = {site.name: (site, w) for site, w in layers}
        self.max_sessions = max_sessions
        self.cache = PreparedWeightCache(cache_bytes)
        self._sessions: dict[str, _Session] = {}
        self._lock = threading.Lock()

    # -- helpers ---------------------------------------------------------------------------
    def _resolve_group(self, group: worker_pb2.LayerGroup) -> tuple[GroupShape, list[str], list[np.ndarray]]:
        if not group.layers:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, "layer group is empty")
        names, weights, d_in = [], [], None
        for ref in group.layers:
            entry = self.layers.get(ref.name)
            if entry is None:
                raise _Abort(grpc.StatusCode.NOT_FOUND, f"unknown layer {ref.name!r} (model {self.model_name})")
            site, w = entry
            if ref.digest != site.digest:
                raise _Abort(grpc.StatusCode.FAILED_PRECONDITION,
                             f"weight digest mismatch for layer {ref.name!r}: worker serves {site.digest[:16]}…, "
                             f"caller expects {ref.digest[:16]}…")
            if d_in is not None and site.d_in != d_in:
                raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, "layers of one group must share d_in")
            d_in = site.d_in
            names.append(ref.name)
            weights.append(w)
        if len(set(names)) != len(names):
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, "a layer appears twice in one group")
        return GroupShape(d_in, tuple(self.layers[n][0].d_out for n in names)), names, weights

    def _session(self, session_id: str) -> _Session:
        with self._lock:
            s = self._sessions.get(session_id)
        if s is None:
            raise _Abort(grpc.StatusCode.NOT_FOUND, "unknown or closed session")
        s.last_used = time.monotonic()
        return s

    def _prepared(self, session: _Session, shape: GroupShape, names: list[str], weights: list[np.ndarray]):
        key = (session.backend, session.params_key, tuple(names))
        return self.cache.get_or_prepare(key, lambda: session.evaluator.prepare(shape, weights))

    @staticmethod
    def _guard(context, fn):
        try:
            return fn()
        except _Abort as exc:
            context.abort(exc.code, exc.message)
        except (CiphertextError, InsecureParametersError) as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except ValueError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))

    # -- RPCs ------------------------------------------------------------------------------
    def Describe(self, request, context):
        from ..ckks import available_backends

        return worker_pb2.DescribeReply(
            model=self.model_name,
            layers=[worker_pb2.LayerInfo(name=s.name, d_in=s.d_in, d_out=s.d_out, digest=s.digest)
                    for s, _ in self.layers.values()],
            backends=available_backends(),
        )

    def OpenSession(self, request, context):
        def run():
            try:
                backend = get_backend(request.backend)
            except ValueError as exc:
                raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
            with self._lock:
                if len(self._sessions) >= self.max_sessions:
                    raise _Abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                 f"worker already holds {self.max_sessions} sessions (max_sessions)")
            evaluator = backend.evaluator(bytes(request.public_context))
            session = _Session(backend.name, evaluator, evaluator.params.fingerprint())
            groups = [self._resolve_group(g) for g in request.prepare]
            t0 = time.perf_counter()
            for shape, names, weights in _progress(groups, "encoding weights"):
                self._prepared(session, shape, names, weights)
            session_id = secrets.token_hex(16)
            with self._lock:
                self._sessions[session_id] = session
            log.info("session %s… opened (%s, %d groups prepared)", session_id[:8], backend.name, len(groups))
            return worker_pb2.OpenSessionReply(session_id=session_id, prepare_seconds=time.perf_counter() - t0)

        return self._guard(context, run)

    def Linear(self, request, context):
        def run():
            t0 = time.perf_counter()
            session = self._session(request.session_id)
            shape, names, weights = self._resolve_group(request.group)
            n = len(request.ciphertexts)
            if n == 0 or n > MAX_CIPHERTEXTS_PER_CALL:
                raise _Abort(grpc.StatusCode.INVALID_ARGUMENT,
                             f"expected 1..{MAX_CIPHERTEXTS_PER_CALL} ciphertexts, got {n}")
            prepared = self._prepared(session, shape, names, weights)
            outputs = session.evaluator.apply(prepared, list(request.ciphertexts))
            return worker_pb2.LinearReply(
                outputs=[worker_pb2.CiphertextList(ciphertexts=o) for o in outputs],
                compute_seconds=time.perf_counter() - t0,
            )

        return self._guard(context, run)

    def LinearBatch(self, request, context):
        """Items that share parameters go through the backend's ``apply_many`` together (one kernel
        pass for the native backend); items of other parameter sets form their own pass."""
        def run():
            t0 = time.perf_counter()
            shape, names, weights = self._resolve_group(request.group)
            n_items = len(request.items)
            if not 1 <= n_items <= MAX_BATCH_ITEMS:
                raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, f"expected 1..{MAX_BATCH_ITEMS} items, got {n_items}")
            total = sum(len(item.ciphertexts) for item in request.items)
            if total > MAX_CIPHERTEXTS_PER_CALL or any(not item.ciphertexts for item in request.items):
                raise _Abort(grpc.StatusCode.INVALID_ARGUMENT,
                             f"every item needs ciphertexts and all items together at most "
                             f"{MAX_CIPHERTEXTS_PER_CALL}, got {total}")
            sessions = [self._session(item.session_id) for item in request.items]
            by_params: dict[tuple[str, str], list[int]] = {}
            for i, s in enumerate(sessions):
                by_params.setdefault((s.backend, s.params_key), []).append(i)
            results: list = [None] * n_items
            for indices in by_params.values():
                prepared = self._prepared(sessions[indices[0]], shape, names, weights)
                outs = apply_many(prepared, [(sessions[i].evaluator, list(request.items[i].ciphertexts))
                                             for i in indices])
                for i, out in zip(indices, outs):
                    results[i] = worker_pb2.LinearBatchResult(
                        outputs=[worker_pb2.CiphertextList(ciphertexts=o) for o in out])
            return worker_pb2.LinearBatchReply(results=results, compute_seconds=time.perf_counter() - t0)

        return self._guard(context, run)

    def CloseSession(self, request, context):
        with self._lock:
            self._sessions.pop(request.session_id, None)
        return worker_pb2.CloseSessionReply()


def _progress(items, desc):
    import sys

    if len(items) < 2 or not sys.stderr.isatty():
        return items
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit="group")


def serve(service: WorkerService, host: str = "127.0.0.1", port: int = 0, threads: int = 4) -> tuple[grpc.Server, int]:
    """Start the gRPC server; returns (server, bound port)."""
    from concurrent import futures

    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=threads),
        options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                 ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)],
    )
    worker_pb2_grpc.add_CKKSWorkerServicer_to_server(service, server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot bind {host}:{port}")
    server.start()
    health_servicer.set("bifrost.worker.v1.CKKSWorker", health_pb2.HealthCheckResponse.SERVING)
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    return server, bound


def build_service(model: str, seed: int, delegation, max_sessions: int, cache_bytes: int) -> WorkerService:
    """Load the model's public weights and keep only the delegated layers."""
    from ..model.catalog import load_model, resolve
    from ..model.delegation import sites

    spec = resolve(model)
    torch_model = load_model(spec, seed)
    layers = sites(torch_model, delegation)
    del torch_model
    return WorkerService(spec.name, layers, max_sessions=max_sessions, cache_bytes=cache_bytes)
