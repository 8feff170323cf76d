"""Attested channel: X25519 + HKDF-SHA256 -> per-direction AEAD keys, sequence-numbered records.

Handshake: the server's ephemeral X25519 public key is bound into report_data (see
:mod:`.binding`), so after verifying the evidence the client knows only the attested VM holds the
private key. The client sends its own ephemeral public key; both sides derive

    okm = HKDF-SHA256(ikm = X25519(shared), salt = client_nonce,
                      info = LABEL || suite || server_pub || client_pub || report_data)

split into client->server key, server->client key and a 16-byte session ID. Suites:
``AES-256-GCM`` (32-byte keys) and ``SM4-GCM`` (16-byte keys, GB/T 32907, RFC 8998), both from
``cryptography``.

Record = seq (8 bytes, big-endian) || AEAD ciphertext+tag (16 bytes). Nonce = 4 zero bytes || seq.
AAD = direction label || session ID || seq. Sequence numbers strictly increase, so a replayed or
reordered record (one at or below the last accepted) fails. Server→client records (the streamed
answer) must also arrive without gaps: dropping a chunk is detected. Client→server records (requests)
may leave gaps: a request the serving front end refuses before it reaches the session (busy, over a
limit, unauthenticated) is never opened, and the session must survive that. Any failure closes the
session for good.
"""

from __future__ import annotations

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
Role = Literal["client", "server"]


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
class SessionKeys:
    """Derived keys. ``client_to_server``/``server_to_client`` are AEAD keys (bytes)."""

    suite: str
    client_to_server: bytes
    server_to_client: bytes
    session_id: bytes


def derive_session_keys(
    private_key: X25519PrivateKey,
    peer_public_key: bytes,
    *,
    server_public_key: bytes,
    client_public_key: bytes,
    client_nonce: bytes,
    report_data: bytes,
    suite: str = "AES-256-GCM",
) -> SessionKeys:
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
    return SessionKeys(suite, okm[:key_size], okm[key_size : 2 * key_size], okm[2 * key_size :])


class SecureSession:
    """One side of an established session. Not thread-safe; one instance per user session."""

    def __init__(self, keys: SessionKeys, role: Role, allow_gaps: bool | None = None) -> None:
        """``allow_gaps`` (default: True for the server, False for the client) lets the receiver skip
        sequence numbers; replays and reordering are refused either way."""
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
        self.closed = False
        self.close_reason: str | None = None

    def _aad(self, label: bytes, seq: int) -> bytes:
        return label + self.session_id + seq.to_bytes(SEQ_SIZE, "big")

    @staticmethod
    def _nonce(seq: int) -> bytes:
        return bytes(4) + seq.to_bytes(SEQ_SIZE, "big")

    def close(self, reason: str = "closed by caller") -> None:
        self.closed = True
        self.close_reason = reason

    def _ensure_open(self) -> None:
        if self.closed:
            raise ChannelClosedError("session_closed", f"session is closed ({self.close_reason})")

    def seal(self, plaintext: bytes, associated_data: bytes = b"") -> bytes:
        """Encrypt the next outgoing record."""
        self._ensure_open()
        if self._send_seq >= MAX_SEQ:
            self.close("sequence numbers exhausted")
            self._ensure_open()
        seq = self._send_seq
        self._send_seq += 1
        aad = self._aad(self._send_label, seq) + associated_data
        return seq.to_bytes(SEQ_SIZE, "big") + self._send.seal(self._nonce(seq), plaintext, aad)

    def open(self, record: bytes, associated_data: bytes = b"") -> bytes:
        """Decrypt the next incoming record. Any failure closes the session and raises."""
        self._ensure_open()
        if len(record) < SEQ_SIZE + TAG_SIZE:
            self.close("truncated record")
            raise ChannelError("record_format", "record shorter than sequence number + tag")
        seq = int.from_bytes(record[:SEQ_SIZE], "big")
        if seq < self._recv_seq or (seq > self._recv_seq and not self.allow_gaps) or seq >= MAX_SEQ:
            self.close(f"sequence {seq}, expected {'at least ' if self.allow_gaps else ''}{self._recv_seq}")
            what = "replay or reordering" if seq < self._recv_seq else "a record is missing"
            raise ReplayError("sequence", f"record sequence {seq}, expected {self._recv_seq} ({what})")
        aad = self._aad(self._recv_label, seq) + associated_data
        try:
            plaintext = self._recv.open(self._nonce(seq), record[SEQ_SIZE:], aad)
        except InvalidTag:
            self.close("authentication failed")
            raise ChannelError("record_authentication", "record failed authentication (tampered); session closed") from None
        self._recv_seq = seq + 1
        return plaintext


class ServerHandshake:
    """Server side: holds the ephemeral key whose public half goes into report_data."""

    def __init__(self) -> None:
        self._key = X25519PrivateKey.generate()
        self.public_key = raw_public(self._key)

    def accept(self, client_public_key: bytes, client_nonce: bytes, report_data: bytes, suite: str = "AES-256-GCM") -> SecureSession:
        keys = derive_session_keys(
            self._key,
            client_public_key,
            server_public_key=self.public_key,
            client_public_key=client_public_key,
            client_nonce=client_nonce,
            report_data=report_data,
            suite=suite,
        )
        return SecureSession(keys, "server")


class ClientHandshake:
    """Client side. Call only after the server's evidence verified with report_data binding
    ``server_public_key`` (the caller checks ``report_data`` against :func:`compute_report_data`)."""

    def __init__(self, client_nonce: bytes) -> None:
        self._key = X25519PrivateKey.generate()
        self.public_key = raw_public(self._key)
        self.client_nonce = client_nonce

    def connect(self, server_public_key: bytes, verified_report_data: bytes, suite: str = "AES-256-GCM") -> SecureSession:
        keys = derive_session_keys(
            self._key,
            server_public_key,
            server_public_key=server_public_key,
            client_public_key=self.public_key,
            client_nonce=self.client_nonce,
            report_data=verified_report_data,
            suite=suite,
        )
        return SecureSession(keys, "client")
