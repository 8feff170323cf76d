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
