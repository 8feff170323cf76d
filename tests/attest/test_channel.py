"""Attested channel: key agreement, AEAD suites (AES-256-GCM, SM4-GCM), replay/reorder/tamper."""

from __future__ import annotations

import secrets

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from bifrost.attest.binding import compute_report_data
from bifrost.attest.channel import ClientHandshake, ServerHandshake, _Aead
from bifrost.attest.errors import ChannelClosedError, ChannelError, ReplayError

SUITES = ["AES-256-GCM", "SM4-GCM"]


def pair(suite: str = "AES-256-GCM"):
    server = ServerHandshake()
    nonce = secrets.token_bytes(32)
    rd = compute_report_data(server.public_key, nonce, b"\x03" * 32, b"\x04" * 32)
    client = ClientHandshake(nonce)
    c = client.connect(server.public_key, rd, suite)
    s = server.accept(client.public_key, nonce, rd, suite)
    return c, s


def test_sm4_gcm_rfc8998_vector() -> None:
    """RFC 8998 appendix A.1 SM4-GCM test vector through cryptography's SM4 + GCM."""
    key = bytes.fromhex("0123456789ABCDEFFEDCBA9876543210")
    iv = bytes.fromhex("00001234567800000000ABCD")
    aad = bytes.fromhex("FEEDFACEDEADBEEFFEEDFACEDEADBEEFABADDAD2")
    pt = bytes.fromhex(
        "AAAAAAAAAAAAAAAABBBBBBBBBBBBBBBBCCCCCCCCCCCCCCCCDDDDDDDDDDDDDDDD"
        "EEEEEEEEEEEEEEEEFFFFFFFFFFFFFFFFEEEEEEEEEEEEEEEEAAAAAAAAAAAAAAAA"
    )
    ct = bytes.fromhex(
        "17F399F08C67D5EE19D0DC9969C4BB7D5FD46FD3756489069157B282BB200735"
        "D82710CA5C22F0CCFA7CBF93D496AC15A56834CBCF98C397B4024A2691233B8D"
    )
    tag = bytes.fromhex("83DE3541E4C2B58177E065A9BF7B62EC")
    aead = _Aead("SM4-GCM", key)
    assert aead.seal(iv, pt, aad) == ct + tag
    assert aead.open(iv, ct + tag, aad) == pt
    dec = Cipher(algorithms.SM4(key), modes.GCM(iv, tag)).decryptor()
    dec.authenticate_additional_data(aad)
    assert dec.update(ct) + dec.finalize() == pt


@pytest.mark.parametrize("suite", SUITES)
def test_round_trip_both_directions(suite: str) -> None:
    c, s = pair(suite)
    assert c.session_id == s.session_id and c.suite == suite
    for i in range(3):
        assert s.open(c.seal(f"prompt {i}".encode())) == f"prompt {i}".encode()
        assert c.open(s.seal(f"reply {i}".encode())) == f"reply {i}".encode()


def test_directions_use_different_keys() -> None:
    c, s = pair()
    record = c.seal(b"hello")
    # A client->server record reflected back to the client must not decrypt.
    with pytest.raises(ChannelError) as exc:
        c.open(record)
    assert exc.value.check == "record_authentication"


@pytest.mark.parametrize("suite", SUITES)
@pytest.mark.parametrize("offset", [8, 12, -1, -16])
def test_tampered_ciphertext_closes_session(suite: str, offset: int) -> None:
    c, s = pair(suite)
    record = bytearray(c.seal(b"secret prompt"))
    record[offset] ^= 1
    with pytest.raises(ChannelError) as exc:
        s.open(bytes(record))
    assert exc.value.check == "record_authentication"
    assert s.closed
    with pytest.raises(ChannelClosedError):
        s.open(c.seal(b"next"))


def test_replay_rejected_and_closes() -> None:
    c, s = pair()
    record = c.seal(b"once")
    assert s.open(record) == b"once"
    with pytest.raises(ReplayError):
        s.open(record)
    assert s.closed


def test_reordering_rejected() -> None:
    c, s = pair()
    first, second = c.seal(b"1"), c.seal(b"2")
    assert s.open(second) == b"2"  # requests may skip (a refused request is never opened) ...
    with pytest.raises(ReplayError) as exc:
        s.open(first)  # ... but never go back
    assert exc.value.check == "sequence" and s.closed
    with pytest.raises(ChannelClosedError):
        s.open(c.seal(b"3"))


def test_a_dropped_answer_chunk_is_detected_by_the_client() -> None:
    c, s = pair()
    s.seal(b"chunk 0")  # lost on the way
    with pytest.raises(ReplayError, match="missing"):
        c.open(s.seal(b"chunk 1"))
    assert c.closed


def test_server_survives_a_request_it_never_opened() -> None:
    c, s = pair()
    assert s.open(c.seal(b"turn 1")) == b"turn 1"
    c.seal(b"turn 2, refused by the front end before reaching the session")
    assert s.open(c.seal(b"turn 3")) == b"turn 3"
    assert c.open(s.seal(b"answer")) == b"answer" and not s.closed


def test_sequence_number_is_authenticated() -> None:
    """Rewriting the cleartext sequence number makes the record fail as a replay or as tampering."""
    c, s = pair()
    s.open(c.seal(b"a"))
    record = bytearray(c.seal(b"b"))
    record[7] = 0  # claim seq 0 again
    with pytest.raises(ReplayError):
        s.open(bytes(record))


def test_truncated_record() -> None:
    c, s = pair()
    with pytest.raises(ChannelError) as exc:
        s.open(c.seal(b"x")[:10])
    assert exc.value.check == "record_format"


def test_report_data_mismatch_yields_different_keys() -> None:
    """Keys are bound to the attested report_data: a client that verified other evidence cannot talk."""
    server = ServerHandshake()
    nonce = secrets.token_bytes(32)
    rd = compute_report_data(server.public_key, nonce, b"\x03" * 32, b"\x04" * 32)
    client = ClientHandshake(nonce)
    c = client.connect(server.public_key, bytes(64))
    s = server.accept(client.public_key, nonce, rd)
    with pytest.raises(ChannelError):
        s.open(c.seal(b"hi"))


def test_sessions_are_isolated() -> None:
    c1, s1 = pair()
    c2, s2 = pair()
    assert c1.session_id != c2.session_id
    with pytest.raises(ChannelError):
        s2.open(c1.seal(b"user 1 prompt"))


def test_bad_peer_key_and_suite() -> None:
    server = ServerHandshake()
    with pytest.raises(ChannelError) as exc:
        server.accept(b"\x00" * 32, b"n" * 32, bytes(64))  # low-order point -> all-zero shared secret
    assert exc.value.check == "handshake"
    with pytest.raises(ChannelError):
        server.accept(b"\x01" * 31, b"n" * 32, bytes(64))
    client = ClientHandshake(b"n" * 32)
    with pytest.raises(ChannelError) as exc:
        client.connect(server.public_key, bytes(64), suite="CHACHA")
    assert exc.value.check == "suite"
