"""How the trusted runtime reaches workers: the ``WorkerLink`` Protocol (what an engine calls) and the
stateless gRPC :class:`WorkerStub` of one worker.

A link carries only public material (public CKKS context, ciphertexts, layer ids). Every gRPC channel to
a worker is mutual TLS under the worker's pinned certificate (:mod:`bifrost.attest.mtls`), and every reply
names the worker identity that produced it, so the engine can hold that identity to account. A session's link
is :class:`~bifrost.tee.pool.WorkerSessions` (dispatch and fail-over over a pool), or the
:class:`~bifrost.tee.batching.BatchedLink` that merges concurrent sessions' decode calls.

Reply sizes: a gRPC channel refuses (unread) any message larger than ``max_reply_bytes``, the largest reply
an honest worker can send for this model and backend (:func:`reply_limit`); the engine then checks
each reply against the exact size of its call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Protocol, Sequence

import grpc

from ..attest.mtls import TLSIdentity, WorkerEndpoint, process_identity, worker_channel
from ..ckks import CKKSParams, GroupShape, row_bucket
from ..ckks.registry import get_backend
from ..errors import UnavailableError
from ..proto import worker_pb2, worker_pb2_grpc
from ..proto.wire import WORKER_MAX_REPLY_BYTES, worker_client_options

REPLY_OVERHEAD_BYTES = 1 << 16  # protobuf framing of a reply beyond its ciphertexts, with room to spare


class WorkerCallError(UnavailableError):
    """A worker call brought back no reply: an error status, a transport failure, or no worker reachable.
    ``worker``: the identity of the worker called, if one was (an availability matter, never a deviation:
    see :mod:`bifrost.tee.pool`)."""

    def __init__(self, code: grpc.StatusCode, details: str, worker: str = "") -> None:
        super().__init__(f"worker call failed: {code.name}: {details}")
        self.code, self.details, self.worker = code, details, worker


@dataclass(frozen=True)
class WorkerReply:
    outputs: list[list[bytes]]  # one ciphertext list per group member
    compute_s: float            # worker-reported compute time (seconds; informational, not trusted)
    worker: str                 # identity of the worker that answered (pinned certificate fingerprint)


class WorkerLink(Protocol):
    def describe(self) -> Sequence[worker_pb2.LayerInfo]: ...

    def identities(self) -> Sequence[str]:
        """Identities (pinned certificate fingerprints) of the workers this link may send calls to."""

    def open_worker_sessions(self, backend: str, public_context: bytes,
                             prepare: Sequence[worker_pb2.LayerGroup]) -> float:
        """Register the public context (a worker session on each worker); returns the worker's weight-encoding
        time (seconds)."""

    def linear(self, group: worker_pb2.LayerGroup, ciphertexts: Sequence[bytes], rows: int = 1) -> WorkerReply:
        """Evaluate one layer group. ``rows`` (how many activation rows the ciphertexts hold) is a
        scheduling hint for batching links. Raises :class:`WorkerCallError`."""

    def close(self) -> None: ...


def reply_limit(backend: str, params: CKKSParams, shapes: Iterable[GroupShape], max_rows: int,
                batch_rows: int = 16) -> int:
    """Largest message an honest worker sends to this model's trusted side: the biggest call of at most
    ``max_rows`` rows (padded to its bucket, split as the engine splits it), or a batched decode call of
    ``batch_rows`` one-row items; plus protobuf framing."""
    impl = get_backend(backend)
    biggest = 0
    for shape in set(shapes):
        rows = row_bucket(max(1, max_rows))
        per_call = impl.rows_per_call(params, shape, rows)
        biggest = max(biggest, impl.max_output_bytes(params, shape, min(rows, per_call)),
                      batch_rows * impl.max_output_bytes(params, shape, 1))
    return biggest + REPLY_OVERHEAD_BYTES + 64 * batch_rows


def connect(endpoint: WorkerEndpoint, identity: TLSIdentity | None = None, max_reply_bytes: int = WORKER_MAX_REPLY_BYTES,
            timeout_s: float = 30.0) -> grpc.Channel:
    """A ready mutual-TLS gRPC channel to ``endpoint`` (presenting ``identity``, default: this process's)."""
    channel = worker_channel(endpoint, identity or process_identity(), worker_client_options(max_reply_bytes))
    try:
        grpc.channel_ready_future(channel).result(timeout=timeout_s)
    except grpc.FutureTimeoutError:
        channel.close()
        raise UnavailableError(f"no CKKS worker reachable at {endpoint.address} within {timeout_s:.0f} s "
                           "(is it running, and does it trust this runtime's certificate and present the pinned one?)"
                           ) from None
    return channel


class WorkerStub:
    """The worker RPCs over one gRPC channel, stateless (worker session ids are arguments): made once per worker
    and shared by every session that calls it. Errors become :class:`WorkerCallError` naming the worker."""

    def __init__(self, channel: grpc.Channel, identity: str, timeout_s: float = 600.0, address: str = "") -> None:
        self.identity, self.address, self.timeout = identity, address, timeout_s
        self._stub = worker_pb2_grpc.CKKSWorkerStub(channel)

    def _call(self, rpc, request):
        try:
            return rpc(request, timeout=self.timeout)
        except grpc.RpcError as exc:
            raise WorkerCallError(exc.code(), exc.details() or "", self.identity) from None

    def describe(self) -> Sequence[worker_pb2.LayerInfo]:
        return self._call(self._stub.Describe, worker_pb2.DescribeRequest()).layers

    def open_worker_session(self, backend: str, public_context: bytes,
                            prepare: Sequence[worker_pb2.LayerGroup]) -> tuple[str, float]:
        """(worker session id, the worker's weight-encoding seconds)."""
        reply = self._call(self._stub.OpenSession, worker_pb2.OpenSessionRequest(
            backend=backend, public_context=public_context, prepare=list(prepare)))
        return reply.session_id, reply.prepare_seconds

    def linear(self, session_id: str, group: worker_pb2.LayerGroup, ciphertexts: Sequence[bytes]) -> WorkerReply:
        reply = self._call(self._stub.Linear, worker_pb2.LinearRequest(
            session_id=session_id, group=group, ciphertexts=ciphertexts))
        return WorkerReply([list(o.ciphertexts) for o in reply.outputs], reply.compute_seconds, self.identity)

    def linear_batch(self, group, items: Sequence[tuple[str, Sequence[bytes]]]) -> tuple[list[list[list[bytes]]], float]:
        """One group for several (worker session id, ciphertexts) items -> ([outputs per item], seconds)."""
        reply = self._call(self._stub.LinearBatch, worker_pb2.LinearBatchRequest(
            group=group, items=[worker_pb2.LinearBatchItem(session_id=sid, ciphertexts=cts) for sid, cts in items]))
        if len(reply.results) != len(items):  # an intact reply that is not well formed: each item gets an empty one,
            return [[] for _ in items], reply.compute_seconds  # which its engine refuses (a deviation of this worker)
        return [[list(o.ciphertexts) for o in r.outputs] for r in reply.results], reply.compute_seconds

    def close_worker_session(self, session_id: str) -> None:
        """Best effort (the worker also expires idle worker sessions)."""
        try:
            self._stub.CloseSession(worker_pb2.CloseSessionRequest(session_id=session_id), timeout=10)
        except (grpc.RpcError, ValueError):  # ValueError: the gRPC channel is closed already (shutdown)
            pass
