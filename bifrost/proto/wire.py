"""Wire constants shared by both ends of the two gRPC APIs (one definition each).

Serving API (``serving.proto``): the associated data that binds each sealed record to its message type,
the cleartext text of a sealed refusal, the trailing-metadata keys that carry a sealed Embed refusal and the
session-lost marker, and the largest message either side of the serving port accepts.

Worker API (``worker.proto``): the largest request a worker reads (the trusted side never sends more)
and the largest reply a worker sends (the trusted side caps replies far lower, per model:
``bifrost.tee.link.reply_limit``).
"""

from __future__ import annotations

# -- serving API: sealed records (bifrost.attest.channel) ---------------------------------------------
AAD_GENERATE = b"bifrost.serving.v1.GenerateBody"
AAD_CHUNK = b"bifrost.serving.v1.TokenChunk"
AAD_EMBED = b"bifrost.serving.v1.EmbedBody"
AAD_EMBED_RESULT = b"bifrost.serving.v1.EmbedResult"
AAD_CLOSE = b"bifrost.serving.v1.CloseBody"
SEALED_REFUSAL = "request refused; the reason is in the sealed reply"  # cleartext message of a sealed refusal
SEALED_TRAILER = "bifrost-sealed-bin"  # Embed: trailing metadata key carrying the sealed refusal
# Trailing metadata on every answer after which the front end holds no session for the request's session id
# (cleartext, not authenticated: a client re-attests on it and retries only what is safe to run twice).
SESSION_LOST_TRAILER = "bifrost-session-lost"
SESSION_LOST_REASONS = ("unknown-session", "replica-lost", "session-closed", "token-expired", "server-draining")

# -- message-size limits (bytes) -----------------------------------------------------------------------
SERVING_MAX_MESSAGE_BYTES = 64 << 20   # either direction on the serving port
WORKER_MAX_REQUEST_BYTES = 512 << 20   # a worker refuses larger requests unread; the trusted side sends no more
WORKER_MAX_REPLY_BYTES = 1 << 30       # a worker sends no more (the trusted side's own cap is per model, lower)


def serving_options() -> list[tuple[str, int]]:
    """gRPC channel/server options of the serving port (client and front end alike)."""
    return [("grpc.max_receive_message_length", SERVING_MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", SERVING_MAX_MESSAGE_BYTES)]


def worker_server_options() -> list[tuple[str, int]]:
    """gRPC server options of a CKKS worker."""
    return [("grpc.max_receive_message_length", WORKER_MAX_REQUEST_BYTES),
            ("grpc.max_send_message_length", WORKER_MAX_REPLY_BYTES)]


def worker_client_options(max_reply_bytes: int) -> list[tuple[str, int]]:
    """gRPC channel options of the trusted side towards a worker: replies capped at ``max_reply_bytes``."""
    return [("grpc.max_receive_message_length", int(min(max_reply_bytes, WORKER_MAX_REPLY_BYTES))),
            ("grpc.max_send_message_length", WORKER_MAX_REQUEST_BYTES)]
