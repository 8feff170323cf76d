"""Attested channel: key agreement, AEAD suites (AES-256-GCM, SM4-GCM), replay/reorder/tamper, record
padding to size buckets, thread safety; a bad record closes a client channel but leaves a server channel
exactly as it was."""

from __future__ import annotations

import secrets
import threading

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from bifrost.attest.binding import compute_report_data
from bifrost.attest.channel import (MIB, RECORD_BUCKETS, ClientHandshake, ServerHandshake, _Aead, answer_aad, frame,
                                    padded_size, record_size)
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
def test_tampered_request_is_refused_and_the_server_channel_is_unchanged(suite: str, offset: int) -> None:
    c, s = pair(suite)
    genuine = c.seal(b"secret prompt")
    record = bytearray(genuine)
    record[offset] ^= 1
    with pytest.raises(ChannelError) as exc:
        s.open(bytes(record))
    assert exc.value.check == "record_authentication" and "session unchanged" in str(exc.value)
    assert not s.closed
    assert s.open(genuine) == b"secret prompt"  # the receive sequence number did not move
    assert s.open(c.seal(b"next")) == b"next"


@pytest.mark.parametrize("suite", SUITES)
def test_tampered_answer_closes_the_client_channel(suite: str) -> None:
    c, s = pair(suite)
    record = bytearray(s.seal(b"token"))
    record[-1] ^= 1
    with pytest.raises(ChannelError) as exc:
        c.open(bytes(record))
    assert exc.value.check == "record_authentication" and "session closed" in str(exc.value)
    assert c.closed
    with pytest.raises(ChannelClosedError):
        c.open(s.seal(b"next"))


def test_forged_record_with_a_high_sequence_number_does_not_advance_the_server() -> None:
    c, s = pair()
    forged = (1000).to_bytes(8, "big") + secrets.token_bytes(64)
    with pytest.raises(ChannelError) as exc:
        s.open(forged)
    assert exc.value.check == "record_authentication" and not s.closed
    assert s.open(c.seal(b"seq 0")) == b"seq 0"  # were the forged seq accepted, seq 0 would be a replay
    with pytest.raises(ChannelError) as exc:
        s.open(b"short")
    assert exc.value.check == "record_format" and not s.closed
    assert s.open(c.seal(b"seq 1")) == b"seq 1"


@pytest.mark.parametrize("direction", ["request", "answer"])
def test_replay_is_refused_and_closes_only_a_client_channel(direction: str) -> None:
    c, s = pair()
    sender, receiver = (c, s) if direction == "request" else (s, c)
    record = sender.seal(b"once")
    assert receiver.open(record) == b"once"
    with pytest.raises(ReplayError):
        receiver.open(record)
    assert receiver.closed == (receiver is c)
    if receiver is s:
        assert s.open(c.seal(b"twice")) == b"twice"


def test_reordering_rejected() -> None:
    c, s = pair()
    first, second = c.seal(b"1"), c.seal(b"2")
    assert s.open(second) == b"2"  # requests may skip (a refused request is never opened) ...
    with pytest.raises(ReplayError) as exc:
        s.open(first)  # ... but never go back
    assert exc.value.check == "sequence" and not s.closed
    assert s.open(c.seal(b"3")) == b"3"


def test_a_dropped_answer_chunk_is_detected_by_the_client() -> None:
    c, s = pair()
    s.seal(b"chunk 0")  # lost on the way
    with pytest.raises(ReplayError, match="missing"):
        c.open(s.seal(b"chunk 1"))
    assert c.closed


def test_the_next_answer_may_skip_an_unread_one_and_only_its_own_first_record_opens() -> None:
    """A client stops reading answer A after its first record (a cancelled turn) while the server sealed two more.
    A second answer, A2, is never read at all. The first record of the next answer, B, skips them: it opens as B's
    record 0. Nothing else opens in its place (each on a fresh client channel, since a bad record closes it): A2's
    record 0 (the same index: only the request binding tells them apart), B's second record (B's first dropped),
    or B's first under another request's binding; and within an answer gaps are still refused."""
    for attack in (None, "old answer", "first dropped", "other request", "gap inside"):
        c, s = pair()
        a = c.seal(b"turn A", b"req")
        s.open(a, b"req")
        a_records = [s.seal(b"a%d" % i, answer_aad(b"chunk", a, i)) for i in range(3)]
        assert c.open(a_records[0], answer_aad(b"chunk", a, 0), first_of_answer=True) == b"a0"
        skipped = c.seal(b"turn A2, cancelled before any record was read", b"req")
        s.open(skipped, b"req")
        unread0 = s.seal(b"a2-0", answer_aad(b"chunk", skipped, 0))  # index 0 too: only the request differs
        b = c.seal(b"turn B", b"req")
        s.open(b, b"req")
        b0, b1, b2 = (s.seal(b"b%d" % i, answer_aad(b"chunk", b, i)) for i in range(3))
        if attack is None:
            assert c.open(b0, answer_aad(b"chunk", b, 0), first_of_answer=True) == b"b0"
            assert c.open(b1, answer_aad(b"chunk", b, 1)) == b"b1"
            continue
        with pytest.raises(ChannelError):
            if attack == "old answer":
                c.open(unread0, answer_aad(b"chunk", b, 0), first_of_answer=True)
            elif attack == "first dropped":
                c.open(b1, answer_aad(b"chunk", b, 0), first_of_answer=True)
            elif attack == "other request":
                c.open(b0, answer_aad(b"chunk", a, 0), first_of_answer=True)
            else:
                c.open(b0, answer_aad(b"chunk", b, 0), first_of_answer=True)
                c.open(b2, answer_aad(b"chunk", b, 2))
        assert c.closed


def test_server_survives_a_request_it_never_opened() -> None:
    c, s = pair()
    assert s.open(c.seal(b"turn 1")) == b"turn 1"
    c.seal(b"turn 2, refused by the front end before reaching the replica")
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
    assert exc.value.check == "record_format" and not s.closed
    with pytest.raises(ChannelError) as exc:
        c.open(s.seal(b"y")[:10])
    assert exc.value.check == "record_format" and c.closed


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


def test_channels_are_isolated() -> None:
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


# --------------------------------------------------------------------------- padding

def test_bucket_boundaries() -> None:
    assert RECORD_BUCKETS == (256, 1024, 4096, 16384, 65536, 262144, MIB)
    assert padded_size(1) == padded_size(256) == 256
    for smaller, bucket in zip(RECORD_BUCKETS, RECORD_BUCKETS[1:]):
        assert padded_size(smaller) == smaller and padded_size(smaller + 1) == bucket
    assert padded_size(MIB + 1) == 2 * MIB and padded_size(2 * MIB) == 2 * MIB
    assert padded_size(5 * MIB + 1) == 6 * MIB
    assert record_size(0) == record_size(252) == 8 + 256 + 16 and record_size(253) == 8 + 1024 + 16


@pytest.mark.parametrize("suite", SUITES)
@pytest.mark.parametrize("n, bucket", [(0, 256), (252, 256), (253, 1024), (1020, 1024), (1021, 4096),
                                       (MIB - 4, MIB), (MIB - 3, 2 * MIB)])
def test_sealed_record_sizes_follow_the_buckets(suite: str, n: int, bucket: int) -> None:
    c, s = pair(suite)
    message = secrets.token_bytes(n)
    record = c.seal(message)
    assert len(record) == 8 + bucket + 16 == record_size(n)
    assert s.open(record) == message


def test_messages_of_different_lengths_in_one_bucket_give_equal_records() -> None:
    c, _ = pair()
    sizes = {len(c.seal(b"x" * n)) for n in (0, 1, 3, 17, 200, 252)}
    assert sizes == {280}


def _seal_unframed(sender, plaintext: bytes, associated_data: bytes = b"") -> bytes:
    """An authentic record whose AEAD plaintext is ``plaintext`` as given (no framing): only a key holder
    can make one, so these exercise the framing checks behind authentication."""
    seq = sender._send_seq
    sender._send_seq += 1
    aad = sender._aad(sender._send_label, seq) + associated_data
    return seq.to_bytes(8, "big") + sender._send.seal(sender._nonce(seq), plaintext, aad)


@pytest.mark.parametrize("plaintext, what", [
    ((300).to_bytes(4, "big") + b"x" * 252, "past the end"),           # length beyond the record
    (frame(b"hi")[:-1] + b"\x01", "padding"),                          # non-zero padding byte
    (frame(b"hi")[:100], "bucket"),                                    # not padded to its bucket
    ((2).to_bytes(4, "big") + b"hi" + bytes(1018), "bucket"),           # padded to a larger bucket
    (b"\x00\x00", "shorter than its length field"),
])
def test_bad_framing_is_refused(plaintext: bytes, what: str) -> None:
    c, s = pair()
    record = _seal_unframed(c, plaintext)
    with pytest.raises(ChannelError) as exc:
        s.open(record)
    assert exc.value.check == "record_format" and what in str(exc.value)
    assert not s.closed
    with pytest.raises(ReplayError):  # authentic: its sequence number is used up
        s.open(record)
    assert s.open(c.seal(b"fine")) == b"fine"
    with pytest.raises(ChannelError) as exc:  # the client is strict
        c.open(_seal_unframed(s, plaintext))
    assert exc.value.check == "record_format" and c.closed


# --------------------------------------------------------------------------- threads

def test_concurrent_seals_never_reuse_a_sequence_number() -> None:
    c, s = pair()
    per_thread, threads = 40, 8
    records: list[bytes] = []
    lock = threading.Lock()
    start = threading.Barrier(threads)

    def run(t: int) -> None:
        start.wait()
        for i in range(per_thread):
            r = c.seal(f"{t}:{i}".encode())
            with lock:
                records.append(r)

    workers = [threading.Thread(target=run, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=60)
    seqs = sorted(int.from_bytes(r[:8], "big") for r in records)
    assert seqs == list(range(per_thread * threads))  # unique, no gaps: every nonce used once
    opened = {s.open(r) for r in sorted(records, key=lambda r: r[:8])}
    assert opened == {f"{t}:{i}".encode() for t in range(threads) for i in range(per_thread)}
