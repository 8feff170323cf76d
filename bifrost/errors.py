"""Bifrost's error taxonomy: four classes a caller can act on, and the one table that maps each to a gRPC
status and a CLI exit code (:data:`ERROR_TABLE`, read through :func:`error_class`).

- :class:`UserError`: the request or the configuration is wrong; fix it and retry (CLI exit 2, gRPC
  INVALID_ARGUMENT). The message is the whole story.
- :class:`UnavailableError`: the CKKS workers (or another service this one needs) cannot serve now; the
  same request may succeed later (CLI exit 3, gRPC UNAVAILABLE, retryable).
- :class:`RefusedError`: authentic input that a policy refuses (an attestation policy, a quarantined
  worker); retrying the same thing fails the same way (CLI exit 1, gRPC PERMISSION_DENIED). The
  attestation errors (:mod:`bifrost.attest.errors`) are its subclasses.
- :class:`InternalError`: a bug (CLI exit 70, gRPC INTERNAL with no details; logged with the code locations
  of its traceback). Any exception that is not a :class:`BifrostError` is treated as one.

Whether a *worker's* failure is availability or a deviation is not decided here: the delegation engine
decides it (:mod:`bifrost.tee.engine`); only its verdict surfaces, as :class:`UnavailableError`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class BifrostError(Exception):
    """Base of every error Bifrost raises on purpose. Raise a subclass; a bare ``BifrostError`` counts as a
    :class:`UserError` (exit 2) for the callers that still catch the base."""

    exit_code = 2


class UserError(BifrostError):
    """Bad input or configuration: a wrong flag, file, name, limit or request field."""

    exit_code = 2


class UnavailableError(BifrostError):
    """A needed service cannot serve now (no CKKS worker left, a replica gone); retryable."""

    exit_code = 3


class RefusedError(BifrostError):
    """Authentic input that a policy refuses; retrying the same request fails the same way."""

    exit_code = 1


class InternalError(BifrostError):
    """A bug: the invariant that broke is in the message (never shown to a remote client)."""

    exit_code = 70


OS_ERROR_EXIT = 1  # the CLI's exit code for an OSError (a file that cannot be read or written)


class ErrorKind(enum.Enum):
    USER = "user"
    UNAVAILABLE = "unavailable"
    REFUSED = "refused"
    INTERNAL = "internal"


@dataclass(frozen=True)
class ErrorClass:
    """What a caller does with an error of one kind: the gRPC status name (``grpc.StatusCode`` member), the
    CLI exit code, whether a retry may succeed, whether its message may be shown to a remote client."""

    kind: ErrorKind
    grpc_status: str
    exit_code: int
    retryable: bool
    public_message: bool


ERROR_TABLE: dict[ErrorKind, ErrorClass] = {
    ErrorKind.USER: ErrorClass(ErrorKind.USER, "INVALID_ARGUMENT", UserError.exit_code, False, True),
    ErrorKind.UNAVAILABLE: ErrorClass(ErrorKind.UNAVAILABLE, "UNAVAILABLE", UnavailableError.exit_code, True, True),
    ErrorKind.REFUSED: ErrorClass(ErrorKind.REFUSED, "PERMISSION_DENIED", RefusedError.exit_code, False, True),
    ErrorKind.INTERNAL: ErrorClass(ErrorKind.INTERNAL, "INTERNAL", InternalError.exit_code, False, False),
}


def error_kind(exc: BaseException) -> ErrorKind:
    """The kind of ``exc``: by class; a bare :class:`BifrostError` is a user error, anything else internal. A
    class that is a :class:`UserError` as well as another kind (a malformed attestation policy *file*:
    :class:`~bifrost.attest.errors.PolicyConfigError`) is a user error."""
    if isinstance(exc, UserError):
        return ErrorKind.USER
    if isinstance(exc, UnavailableError):
        return ErrorKind.UNAVAILABLE
    if isinstance(exc, RefusedError):
        return ErrorKind.REFUSED
    if isinstance(exc, InternalError) or not isinstance(exc, BifrostError):
        return ErrorKind.INTERNAL
    return ErrorKind.USER


def error_class(exc: BaseException) -> ErrorClass:
    """The row of :data:`ERROR_TABLE` for ``exc``."""
    return ERROR_TABLE[error_kind(exc)]
