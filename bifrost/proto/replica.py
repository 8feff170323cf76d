"""Typed messages between the gRPC front end (``bifrost/serve``) and a trusted replica (``bifrost/tee``).

They cross a process boundary (Ray pickles them) and carry only public or *sealed* data: a sealed record
is opaque to the front end. Every refusal has a :class:`Status`; :data:`GRPC_CODES` is the one table that
maps it to the gRPC status the client sees.

A refusal made *before* the replica opened the request's record (unknown session, a record that does not
authenticate) has ``sealed=None`` and its message is the reason, in cleartext. One made *after* has the
generic :data:`~bifrost.proto.wire.SEALED_REFUSAL` as message and the reason in ``sealed`` (a
TokenChunk or EmbedResult record), so counts and sizes never leave the channel.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Iterator, Protocol, runtime_checkable

import grpc


class Status(enum.Enum):
    """Why a replica refused a request (each maps to one gRPC status code)."""

    INVALID_ARGUMENT = "INVALID_ARGUMENT"          # bad field or body, limits exceeded
    NOT_FOUND = "NOT_FOUND"                        # unknown or closed session (the front end drops it)
    FAILED_PRECONDITION = "FAILED_PRECONDITION"    # a turn already running; wrong model task
    PERMISSION_DENIED = "PERMISSION_DENIED"        # a sealed record that does not open (session unchanged)
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"      # the CKKS workers are full
    UNAVAILABLE = "UNAVAILABLE"                    # CKKS workers or evidence unavailable
    ABORTED = "ABORTED"                            # the session was closed during the turn (dropped too)

    @property
    def ends_session(self) -> bool:
        """The session no longer exists on the replica: the front end forgets it too."""
        return self in (Status.NOT_FOUND, Status.ABORTED)


GRPC_CODES: dict[Status, grpc.StatusCode] = {
    Status.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
    Status.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    Status.FAILED_PRECONDITION: grpc.StatusCode.FAILED_PRECONDITION,
    Status.PERMISSION_DENIED: grpc.StatusCode.PERMISSION_DENIED,
    Status.RESOURCE_EXHAUSTED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Status.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    Status.ABORTED: grpc.StatusCode.ABORTED,
}


@dataclass(frozen=True)
class Refusal:
    """The request was refused. ``sealed``: the sealed reply carrying the exact reason, when the replica
    had opened the request's record (it then also counts as a use of the session)."""

    status: Status
    message: str
    sealed: bytes | None = None

    @property
    def opened(self) -> bool:
        return self.sealed is not None


@dataclass(frozen=True)
class SealedReply:
    """One sealed record for the client: a TokenChunk (Generate streams several), or an EmbedResult."""

    record: bytes


@dataclass(frozen=True)
class Closed:
    """CloseSession: the sealed CloseBody opened and the session is closed (or closes after its turn)."""


@dataclass(frozen=True)
class Attested:
    """A new session: the replica's channel key, the evidence binding it, and the public digests."""

    session_id: bytes
    server_public_key: bytes
    report_data: bytes
    evidence_type: str
    evidence: bytes
    model_digest: bytes
    serving_config_digest: bytes
    suite: str
    endorsements: dict[str, bytes] = field(default_factory=dict)


@dataclass(frozen=True)
class ReplicaInfo:
    """What a replica serves (public): the front end checks every replica reports the same digests."""

    name: str
    task: str
    model_digest: bytes
    serving_config_digest: bytes
    context_tokens: int
    evidence_type: str
    mode: str
    pid: int


# --------------------------------------------------------------------------- requests (front end -> replica)

@dataclass(frozen=True)
class AttestRequest:
    """Open a session: the client's nonce (16..1024 bytes), raw X25519 key (32 bytes) and cipher suite."""

    nonce: bytes
    client_public_key: bytes
    suite: str = ""


@dataclass(frozen=True)
class GenerateRequest:
    """One turn: the sealed GenerateBody of ``session_id``; ``request_id`` names it for :class:`CancelRequest`."""

    session_id: bytes
    sealed: bytes
    request_id: str = ""


@dataclass(frozen=True)
class EmbedRequest:
    """The sealed EmbedBody of ``session_id``."""

    session_id: bytes
    sealed: bytes


@dataclass(frozen=True)
class CloseRequest:
    """The client's CloseSession: the sealed CloseBody of ``session_id`` (must open before anything changes)."""

    session_id: bytes
    sealed: bytes


@dataclass(frozen=True)
class CancelRequest:
    """Stop the turn ``request_id`` of ``session_id`` at its next token (the client hung up)."""

    session_id: bytes
    request_id: str


@dataclass(frozen=True)
class DropSession:
    """The front end forgets ``session_id`` (client gone, replica refused it): the replica closes it too."""

    session_id: bytes


@dataclass(frozen=True)
class CloseIdle:
    """Backstop: close the sessions idle for ``idle_s`` seconds."""

    idle_s: float


@runtime_checkable
class ReplicaAPI(Protocol):
    """Everything the front end asks of a trusted replica. :class:`~bifrost.tee.replica.TrustedReplica`
    implements it, and so do the front end's handles (:mod:`bifrost.serve.replicas`), in-process or Ray.

    Timeouts are the handles' business (each handle bounds every wait by its own ``timeout_s``), not part of
    this API. ``cancel`` answers whether the session exists (the cancel is kept for its turn, running or to
    come), ``drop_session`` whether it existed; a handle sends them without waiting and returns ``None``. A
    handle's ``generate`` returns an iterator whose every item is bounded by that timeout."""

    def info(self) -> ReplicaInfo: ...

    def stats(self) -> dict: ...

    def attest(self, req: AttestRequest) -> Attested | Refusal: ...

    def generate(self, req: GenerateRequest) -> Iterator[SealedReply | Refusal]: ...

    def embed(self, req: EmbedRequest) -> SealedReply | Refusal: ...

    def close_sealed(self, req: CloseRequest) -> Closed | Refusal: ...

    def cancel(self, req: CancelRequest) -> bool | None: ...

    def drop_session(self, req: DropSession) -> bool | None: ...

    def close_idle(self, req: CloseIdle) -> list[bytes]: ...

    def shutdown(self) -> None: ...
