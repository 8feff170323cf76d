"""The gRPC edge of a Bifrost service: how bad input and failures become gRPC statuses, written once for the
public front end (:mod:`bifrost.serve.server`) and the untrusted CKKS worker (:mod:`bifrost.worker.service`).

- :func:`parse_or_malformed`: a request deserializer that never raises. Bytes that are not the method's
  message (bad wire format, invalid UTF-8 in a string field) become :data:`MALFORMED`, which the wrappers
  answer INVALID_ARGUMENT ``"malformed <Type>: not a valid protobuf message"``, instead of gRPC's own
  INTERNAL "Exception deserializing request!".
- :class:`Abort`: raised by a handler to answer with an explicit code and message (and, for the front end,
  a sealed refusal record in the trailing metadata).
- :class:`Edge`: the wrappers (:meth:`Edge.unary`, :meth:`Edge.streaming`) around a handler, and the one
  mapping (:meth:`Edge.status`) from an exception to a status: :class:`Abort` as it says; a
  :class:`~bifrost.errors.BifrostError` by its class in :data:`bifrost.errors.ERROR_TABLE` (its message
  when the table lets it be shown); an exception type the service names as bad input (``invalid``)
  INVALID_ARGUMENT; anything else (a bug) INTERNAL with a generic message, logged by exception type and
  code locations only (:func:`code_locations`), never a message or a value.

Which of a *worker's* statuses mean "unavailable" and which a deviation is decided by the trusted side's
delegation engine (:mod:`bifrost.tee.engine`, :mod:`bifrost.tee.pool`), not here. Nothing in this module
imports the trusted runtime: the worker uses it too.
"""

from __future__ import annotations

import logging
import os
import traceback
from typing import Callable

import grpc
from google.protobuf.message import DecodeError

from ..errors import BifrostError, error_class


class _Malformed:
    """The marker a never-raising deserializer returns for bytes that do not parse."""

    def __repr__(self) -> str:
        return "MALFORMED"


MALFORMED = _Malformed()


def parse_or_malformed(cls) -> Callable[[bytes], object]:
    """A request deserializer for the protobuf message class ``cls`` that never raises (:data:`MALFORMED`)."""

    def parse(data: bytes):
        try:
            return cls.FromString(data)
        except (DecodeError, ValueError):
            return MALFORMED

    return parse


def malformed_message(request_type: str) -> str:
    return f"malformed {request_type}: not a valid protobuf message"


class Abort(Exception):
    """Answer with ``code``/``message``; ``sealed`` (a sealed refusal record) goes in the trailing metadata
    under the edge's ``sealed_trailer`` key, ``trailers`` (cleartext ``(key, value)`` pairs) beside it."""

    def __init__(self, code: grpc.StatusCode, message: str, sealed: bytes | None = None,
                 trailers: tuple[tuple[str, str], ...] = ()) -> None:
        super().__init__(message)
        self.code, self.message, self.sealed, self.trailers = code, message, sealed, trailers


def code_locations(exc: BaseException, depth: int = 4) -> str:
    """The code locations of ``exc``'s traceback, innermost first (``file:line:function``): no message, no
    values, nothing secret."""
    frames = traceback.extract_tb(exc.__traceback__)[-depth:]
    return " < ".join(f"{os.path.basename(f.filename)}:{f.lineno}:{f.name}" for f in reversed(frames))


MAX_MESSAGE_CHARS = 1000


class Edge:
    """One service's edge. ``internal_message``: the whole answer to a bug (``"internal server error"``);
    ``invalid``: exception types (besides the :class:`~bifrost.errors.UserError` family) that mean bad
    input here (the worker: malformed ciphertexts, insecure parameters, ``ValueError``); ``sealed_trailer``:
    the trailing-metadata key for an :class:`Abort`'s sealed record."""

    def __init__(self, log: logging.Logger, internal_message: str, invalid: tuple[type[BaseException], ...] = (),
                 sealed_trailer: str | None = None) -> None:
        self.log, self.internal_message, self.invalid = log, internal_message, tuple(invalid)
        self.sealed_trailer = sealed_trailer

    def internal(self, rpc: str, exc: BaseException) -> tuple[grpc.StatusCode, str]:
        """An unexpected exception: logged by type and code locations only; the client gets no detail."""
        self.log.error("%s: internal error %s at %s", rpc, type(exc).__name__, code_locations(exc))
        return grpc.StatusCode.INTERNAL, self.internal_message

    def status(self, rpc: str, exc: BaseException) -> tuple[grpc.StatusCode, str, bytes | None]:
        """The status ``exc`` is answered with: (code, message, sealed record or None)."""
        if isinstance(exc, Abort):
            return exc.code, exc.message, exc.sealed
        if isinstance(exc, BifrostError):
            row = error_class(exc)
            if row.public_message:
                return getattr(grpc.StatusCode, row.grpc_status), str(exc)[:MAX_MESSAGE_CHARS], None
        elif self.invalid and isinstance(exc, self.invalid):
            return grpc.StatusCode.INVALID_ARGUMENT, str(exc)[:MAX_MESSAGE_CHARS], None
        code, message = self.internal(rpc, exc)
        return code, message, None

    def _answer(self, rpc: str, context, exc: BaseException) -> tuple[grpc.StatusCode, str]:
        code, message, sealed = self.status(rpc, exc)
        trailers: list[tuple[str, str | bytes]] = list(exc.trailers) if isinstance(exc, Abort) else []
        if sealed is not None and self.sealed_trailer is not None:
            trailers.append((self.sealed_trailer, sealed))
        if trailers:
            context.set_trailing_metadata(tuple(trailers))
        return code, message

    def unary(self, rpc: str, fn, request_type: str | None = None):
        """``fn(request, context)`` as a unary handler: a :data:`MALFORMED` request is refused
        INVALID_ARGUMENT (when ``request_type`` names it), and every exception becomes a status."""

        def handle(request, context):
            try:
                if request is MALFORMED and request_type is not None:
                    raise Abort(grpc.StatusCode.INVALID_ARGUMENT, malformed_message(request_type))
                return fn(request, context)
            except Exception as exc:  # noqa: BLE001 - a status, never a traceback to the client
                code, message = self._answer(rpc, context, exc)
            context.abort(code, message)  # (outside the except: the exception is not chained to the abort)

        return handle

    def streaming(self, rpc: str, fn, request_type: str | None = None):
        """The same for a server-streaming handler (``fn`` returns an iterator of replies)."""

        def handle(request, context):
            try:
                if request is MALFORMED and request_type is not None:
                    raise Abort(grpc.StatusCode.INVALID_ARGUMENT, malformed_message(request_type))
                yield from fn(request, context)
                return
            except Exception as exc:  # noqa: BLE001
                code, message = self._answer(rpc, context, exc)
            context.abort(code, message)

        return handle
