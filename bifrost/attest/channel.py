"""Attested channel: X25519 + HKDF-SHA256 -> per-direction AEAD keys, sequence-numbered, padded records.

Handshake: the server's ephemeral X25519 public key is bound into report_data (see
:mod:`.binding`), so after verifying the evidence the client knows only the attested VM holds the
private key. The client sends its own ephemeral public key; both sides derive

    okm = HKDF-SHA256(ikm = X25519(shared), salt = client_nonce,
                      info = LABEL || suite || server_pub || client_pub || report_data)

split into client->server key, server->client key and a 16-byte session ID. Suites:
``AES-256-GCM`` (32-byte keys) and ``SM4-GCM`` (16-byte keys, GB/T 32907, RFC 8998), both from
``cryptography``.

Record = seq (8 bytes, big-endian) || AEAD ciphertext+tag (16 bytes). Nonce = 4 zero bytes || seq.
AAD = direction label || session ID || seq || caller's associated data. The AEAD plaintext is the
*framed* message: ``u32 big-endian length || message || zero padding`` up to the smallest size bucket
that holds ``4 + length`` bytes: 256 B, 1 KiB, 4 KiB, 16 KiB, 64 KiB, 256 KiB, 1 MiB, then the next
multiple of 1 MiB (:data:`RECORD_BUCKETS`, :func:`padded_size`). A record on the wire is therefore
``8 + bucket + 16`` bytes, whatever the message inside the bucket. ``open`` refuses a record whose
length field points past its end, whose padded size is not the bucket of its length, or whose padding
is not all zero (``ChannelError(check="record_format")``).

What padding does not hide: the bucket of each record (a 300-byte prompt and a 1000-byte prompt both
take the 1 KiB bucket, a 5000-byte one does not); the number of records (the serving API sends one
TokenChunk per generated token, so an observer counts the tokens of every answer); and timing (when
each record is sent, so time to first token and time per token).

Sequence numbers strictly increase, so a replayed or reordered record (one at or below the last
accepted) fails. Server→client records (the streamed answer) must also arrive without gaps within an
answer: dropping a chunk is detected. The first record of an answer may skip sequence numbers: the client may
stop reading an answer (a cancelled turn) while the server has already sealed more of it. That record is
accepted only with ``first_of_answer``, and the serving API seals every answer record with
:func:`answer_aad`, which binds the request it answers and its index in the answer; so the skipped records
can only be ones the client stopped reading, never part of the answer now opened. Client→server records
(requests) may leave gaps: a request the serving front end refuses before it reaches the replica (busy, over a
limit, unauthenticated) is never opened, and the channel must survive that.

Failures: on the client side (``fatal_errors``, default for the client role) any failure closes the
channel for good: a bad server→client record means the answer can no longer be trusted. On the server
side a record that fails authentication, is a replay, is reordered or truncated is refused *without
changing the channel*: it is not closed and its receive sequence number does not move, so the genuine
record with that sequence number still opens. Anyone who can reach the server (e.g. with a sniffed
bearer token) can send garbage; that must not end a victim's session. An authentic record whose
framing is bad uses up its sequence number but does not close a server channel either.

Thread safety: a :class:`SecureChannel` serializes ``seal``/``open``/``close`` with a lock, so
concurrent callers never reuse a sequence number (hence never a GCM nonce).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Literal

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .errors import ChannelClosedError, ChannelError, ReplayError

HANDSHAKE_LABEL = b"bifrost/attest/channel/v1\x00"
SUITES = {"AES-256-GCM": 32, "SM4-GCM": 16}
TAG_SIZE = 16
SEQ_SIZE = 8
SESSION_ID_SIZE = 16
MAX_SEQ = (1 << 64) - 1
LENGTH_SIZE = 4
MIB = 1 << 20
# Padded AEAD plaintext sizes (bytes); above the last one, the next multiple of 1 MiB.
RECORD_BUCKETS = (256, 1 << 10, 4 << 10, 16 << 10, 64 << 10, 256 << 10, MIB)
MAX_MESSAGE = (1 << 32) - 1 - LENGTH_SIZE
Role = Literal["client", "server"]


def padded_size(framed_len: int) -> int:
    """The bucket (bytes) for ``framed_len`` = 4 + message length: the smallest of
    :data:`RECORD_BUCKETS` that holds it, else the next multiple of 1 MiB."""
    for bucket in RECORD_BUCKETS:
        if framed_len <= bucket:
            return bucket
    return -(-framed_len // MIB) * MIB


def record_size(message_len: int) -> int:
    """Bytes on the wire of a record carrying ``message_len`` bytes: seq + padded plaintext + tag."""
    return SEQ_SIZE + padded_size(LENGTH_SIZE + message_len) + TAG_SIZE


def frame(message: bytes) -> bytes:
    """``u32 big-endian length || message || zero padding`` up to :func:`padded_size`."""
    n = len(message)
    if n > MAX_MESSAGE:
        raise ChannelError("record_format", f"message of {n} bytes does not fit a record's 32-bit length field")
    return n.to_bytes(LENGTH_SIZE, "big") + message + bytes(padded_size(LENGTH_SIZE + n) - LENGTH_SIZE - n)


def unframe(padded: bytes) -> bytes:
    """The message inside a framed plaintext; raises ``ChannelError(check="record_format")`` when the
    length points past the end, the size is not that length's bucket, or the padding is not all zero."""
    if len(padded) < LENGTH_SIZE:
        raise ChannelError("record_format", "record plaintext is shorter than its length field")
    n = int.from_bytes(padded[:LENGTH_SIZE], "big")
    end = LENGTH_SIZE + n
    if end > len(padded):
        raise ChannelError("record_format", "record length field points past the end of the record")
    if len(padded) != padded_size(end):
        raise ChannelError("record_format", "record is not padded to the size bucket of its length")
    if padded.count(0, end) != len(padded) - end:
        raise ChannelError("record_format", "record padding is not all zero")
    return padded[LENGTH_SIZE:end]


def raw_public(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


class _Aead:
    """AEAD wrapper over ``cryptography``. SM4-GCM uses ``Cipher(algorithms.SM4, modes.GCM)``."""

    def __init__(self, suite: str, key: bytes) -> None:
        self.suite, self.key = suite, key
        self._aes = AESGCM(key) if suite == "AES-256-GCM" else None

    def seal(self, nonce: bytes, plaintext: bytes, aad: bytes) -> bytes:
        if self._aes is not None:
            return self._aes.encrypt(nonce, plaintext, aad)
        enc = Cipher(algorithms.SM4(self.key), modes.GCM(nonce)).encryptor()
        enc.authenticate_additional_data(aad)
        ct = enc.update(plaintext) + enc.finalize()
        return ct + enc.tag

    def open(self, nonce: bytes, ciphertext: bytes, aad: bytes) -> bytes:
        if len(ciphertext) < TAG_SIZE:
            raise InvalidTag()
        if self._aes is not None:
            return self._aes.decrypt(nonce, ciphertext, aad)
        dec = Cipher(algorithms.SM4(self.key), modes.GCM(nonce, ciphertext[-TAG_SIZE:])).decryptor()
        dec.authenticate_additional_data(aad)
        return dec.update(ciphertext[:-TAG_SIZE]) + dec.finalize()


@dataclass(frozen=True)
class ChannelKeys:
    """Derived keys. ``client_to_server``/``server_to_client`` are AEAD keys (bytes)."""

    suite: str
    client_to_server: bytes
    server_to_client: bytes
    session_id: bytes


def derive_channel_keys(
    private_key: X25519PrivateKey,
    peer_public_key: bytes,
    *,
    server_public_key: bytes,
    client_public_key: bytes,
    client_nonce: bytes,
    report_data: bytes,
    suite: str = "AES-256-GCM",
) -> ChannelKeys:
    """Both sides call this with the same transcript; raises :class:`ChannelError` on bad input."""
    if suite not in SUITES:
        raise ChannelError("suite", f"unknown cipher suite {suite!r}; choose {', '.join(SUITES)}")
    try:
        shared = private_key.exchange(X25519PublicKey.from_public_bytes(peer_public_key))
    except ValueError:
        raise ChannelError("handshake", "peer X25519 public key is invalid (wrong size or low order)") from None
    key_size = SUITES[suite]
    info = HANDSHAKE_LABEL + suite.encode() + b"\x00" + server_public_key + client_public_key + report_data
    okm = HKDF(hashes.SHA256(), 2 * key_size + SESSION_ID_SIZE, salt=client_nonce, info=info).derive(shared)
    return ChannelKeys(suite, okm[:key_size], okm[key_size : 2 * key_size], okm[2 * key_size :])


def answer_aad(kind: bytes, request_record: bytes, index: int) -> bytes:
    """Associated data of the ``index``-th record (from 0) of the answer to the request sealed as
    ``request_record``: the answer's ``kind`` (a message label), the request's sequence number (its record's
    first bytes, public) and the index. Such a record opens only as that record of that answer."""
    return kind + request_record[:SEQ_SIZE] + index.to_bytes(4, "big")


class SecureChannel:
    """One side of an established attested channel; thread-safe (one lock around seal/open/close)."""

    def __init__(self, keys: ChannelKeys, role: Role, allow_gaps: bool | None = None,
                 fatal_errors: bool | None = None) -> None:
        """``allow_gaps`` (default: True for the server, False for the client) lets the receiver skip
        sequence numbers; replays and reordering are refused either way. ``fatal_errors`` (default: True
        for the client, False for the server): a record that fails to open closes the channel; when
        False it is refused and the channel is left exactly as it was (see the module docstring)."""
        send_key, recv_key = (
            (keys.client_to_server, keys.server_to_client) if role == "client" else (keys.server_to_client, keys.client_to_server)
        )
        self.role = role
        self.suite = keys.suite
        self.session_id = keys.session_id
        self._send = _Aead(keys.suite, send_key)
        self._recv = _Aead(keys.suite, recv_key)
        self._send_label = b"c2s" if role == "client" else b"s2c"
        self._recv_label = b"s2c" if role == "client" else b"c2s"
        self._send_seq = 0
        self._recv_seq = 0
        self.allow_gaps = role == "server" if allow_gaps is None else allow_gaps
        self.fatal_errors = role == "client" if fatal_errors is None else fatal_errors
        self._lock = threading.Lock()
        self.closed = False
        self.close_reason: str | None = None

    def _aad(self, label: bytes, seq: int) -> bytes:
        return label + self.session_id + seq.to_bytes(SEQ_SIZE, "big")

    @staticmethod
    def _nonce(seq: int) -> bytes:
        return bytes(4) + seq.to_bytes(SEQ_SIZE, "big")

    def close(self, reason: str = "closed by caller") -> None:
        with self._lock:
            self._close(reason)

    def _close(self, reason: str) -> None:
        self.closed = True
        self.close_reason = reason

    def _ensure_open(self) -> None:
        if self.closed:
            raise ChannelClosedError("channel_closed", f"channel is closed ({self.close_reason})")

    def _refuse(self, reason: str, cls: type[ChannelError], check: str, detail: str) -> ChannelError:
        """The error for a record that failed to open; closes the channel only if errors are fatal."""
        if self.fatal_errors:
            self._close(reason)
        return cls(check, detail + ("; session closed" if self.fatal_errors else "; record refused, session unchanged"))

    def seal(self, plaintext: bytes, associated_data: bytes = b"") -> bytes:
        """Frame and pad (:func:`frame`), then encrypt as the next outgoing record (a fresh sequence number)."""
        framed = frame(plaintext)
        with self._lock:
            self._ensure_open()
            if self._send_seq >= MAX_SEQ:
                self._close("sequence numbers exhausted")
                self._ensure_open()
            seq = self._send_seq
            self._send_seq += 1
            aad = self._aad(self._send_label, seq) + associated_data
            return seq.to_bytes(SEQ_SIZE, "big") + self._send.seal(self._nonce(seq), framed, aad)

    def open(self, record: bytes, associated_data: bytes = b"", first_of_answer: bool = False) -> bytes:
        """Decrypt and unframe the next incoming record; raises :class:`ChannelError` (see ``fatal_errors``).
        ``first_of_answer``: the record may skip sequence numbers (module docstring); its ``associated_data``
        must then bind what it answers (:func:`answer_aad` with index 0)."""
        with self._lock:
            self._ensure_open()
            if len(record) < SEQ_SIZE + TAG_SIZE:
                raise self._refuse("truncated record", ChannelError, "record_format",
                                   "record shorter than sequence number + tag")
            seq = int.from_bytes(record[:SEQ_SIZE], "big")
            gaps = self.allow_gaps or first_of_answer
            if seq < self._recv_seq or (seq > self._recv_seq and not gaps) or seq >= MAX_SEQ:
                what = "replay or reordering" if seq < self._recv_seq else "a record is missing"
                raise self._refuse(f"sequence {seq}, expected {'at least ' if gaps else ''}{self._recv_seq}",
                                   ReplayError, "sequence", f"record sequence {seq}, expected {self._recv_seq} ({what})")
            aad = self._aad(self._recv_label, seq) + associated_data
            try:
                padded = self._recv.open(self._nonce(seq), record[SEQ_SIZE:], aad)
            except InvalidTag:
                raise self._refuse("authentication failed", ChannelError, "record_authentication",
                                   "record failed authentication (tampered or forged)") from None
            self._recv_seq = seq + 1  # authentic: its sequence number is used up, whatever its framing
            try:
                return unframe(padded)
            except ChannelError as exc:
                raise self._refuse("bad record framing", ChannelError, exc.check, exc.detail) from None


class ServerHandshake:
    """Server side: holds the ephemeral key whose public half goes into report_data."""

    def __init__(self) -> None:
        self._key = X25519PrivateKey.generate()
        self.public_key = raw_public(self._key)

    def accept(self, client_public_key: bytes, client_nonce: bytes, report_data: bytes, suite: str = "AES-256-GCM") -> SecureChannel:
        keys = derive_channel_keys(
            self._key,
            client_public_key,
            server_public_key=self.public_key,
            client_public_key=client_public_key,
            client_nonce=client_nonce,
            report_data=report_data,
            suite=suite,
        )
        return SecureChannel(keys, "server")


class ClientHandshake:
    """Client side. Call only after the server's evidence verified with report_data binding
    ``server_public_key`` (the caller checks ``report_data`` against :func:`compute_report_data`)."""

    def __init__(self, client_nonce: bytes) -> None:
        self._key = X25519PrivateKey.generate()
        self.public_key = raw_public(self._key)
        self.client_nonce = client_nonce

    def connect(self, server_public_key: bytes, verified_report_data: bytes, suite: str = "AES-256-GCM") -> SecureChannel:
        keys = derive_channel_keys(
            self._key,
            server_public_key,
            server_public_key=server_public_key,
            client_public_key=self.public_key,
            client_nonce=self.client_nonce,
            report_data=verified_report_data,
            suite=suite,
        )
        return SecureChannel(keys, "client")
