"""How the trusted runtime reaches workers: a small ``WorkerLink`` Protocol and its gRPC implementation.

A link carries only public material (public CKKS context, ciphertexts, layer ids). A pool of workers
with dispatch and fail-over is another ``WorkerLink``; the delegation engine does not care which.
"""

from __future__ import annotations

from typing import Protocol, Sequence

import grpc

from ..errors import BifrostError
from ..proto import worker_pb2, worker_pb2_grpc

MAX_MESSAGE_BYTES = 1 << 30


class WorkerCallError(BifrostError):
    """A worker answered with an error status (or could not be reached)."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"worker call failed: {code.name}: {details}")
        self.code, self.details = code, details


class WorkerLink(Protocol):
    def describe(self) -> Sequence[worker_pb2.LayerInfo]: ...

    def open_session(self, backend: str, public_context: bytes, prepare: Sequence[worker_pb2.LayerGroup]) -> float:
        """Register the public context; returns the worker's weight-encoding time (seconds)."""

    def linear(self, group: worker_pb2.LayerGroup, ciphertexts: Sequence[bytes],
               rows: int = 1) -> tuple[list[list[bytes]], float]:
        """Returns (one ciphertext list per group member, worker compute seconds). ``rows`` (how many
        activation rows the ciphertexts hold) is a scheduling hint for batching links."""

    def close(self) -> None: ...


def connect(address: str, timeout_s: float = 30.0) -> grpc.Channel:
    channel = grpc.insecure_channel(address, options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                                                      ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)])
    try:
        grpc.channel_ready_future(channel).result(timeout=timeout_s)
    except grpc.FutureTimeoutError:
        channel.close()
        raise BifrostError(f"no CKKS worker reachable at {address} within {timeout_s:.0f} s") from None
    return channel


class GrpcWorkerLink:
    """One worker over one gRPC channel, one session."""

    def __init__(self, channel: grpc.Channel, timeout_s: float = 600.0, address: str = "") -> None:
        self.channel, self.address, self.timeout = channel, address, timeout_s
        self.stub = worker_pb2_grpc.CKKSWorkerStub(channel)
        self.session_id: str | None = None

    def _call(self, rpc, request):
        try:
            return rpc(request, timeout=self.timeout)
        except grpc.RpcError as exc:
            raise WorkerCallError(exc.code(), exc.details()) from None

    def describe(self):
        return self._call(self.stub.Describe, worker_pb2.DescribeRequest()).layers

    def open_session(self, backend, public_context, prepare) -> float:
        reply = self._call(self.stub.OpenSession, worker_pb2.OpenSessionRequest(
            backend=backend, public_context=public_context, prepare=list(prepare)))
        self.session_id = reply.session_id
        return reply.prepare_seconds

    def linear(self, group, ciphertexts, rows: int = 1):
        reply = self._call(self.stub.Linear, worker_pb2.LinearRequest(
            session_id=self.session_id, group=group, ciphertexts=ciphertexts))
        return [list(o.ciphertexts) for o in reply.outputs], reply.compute_seconds

    def linear_batch(self, group, items: Sequence[tuple[str, Sequence[bytes]]]):
        """One group for several (worker session id, ciphertexts) items -> ([outputs per item], seconds)."""
        reply = self._call(self.stub.LinearBatch, worker_pb2.LinearBatchRequest(
            group=group, items=[worker_pb2.LinearBatchItem(session_id=sid, ciphertexts=cts) for sid, cts in items]))
        return [[list(o.ciphertexts) for o in r.outputs] for r in reply.results], reply.compute_seconds

    def close(self) -> None:
        if self.session_id:
            try:
                self.stub.CloseSession(worker_pb2.CloseSessionRequest(session_id=self.session_id), timeout=10)
            except grpc.RpcError:
                pass
            self.session_id = None
        self.channel.close()
