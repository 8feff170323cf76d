"""Sealed records of the attested channel: ``SecureChannel.open`` on arbitrary and mutated records, both
roles and both suites. Only ChannelError (and its subclasses) may come out, or the genuine message.

Also the channel rules around a refused record (module docstring of :mod:`bifrost.attest.channel`): a
client channel closes for good; a server channel refuses a record that fails authentication or sequencing
without changing state (the genuine record with that sequence number still opens)."""

from __future__ import annotations

import secrets

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from bifrost.attest.binding import compute_report_data
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from bifrost.attest.channel import (MAX_SEQ, RECORD_BUCKETS, SEQ_SIZE, TAG_SIZE, ChannelKeys, SecureChannel, _Aead,
                                    derive_channel_keys, frame, raw_public)
from bifrost.attest.errors import ChannelClosedError, ChannelError

from .fuzzlib import budget, call, junk, mutated, weighted

SUITES = ("AES-256-GCM", "SM4-GCM")
ALLOWED = (ChannelError,)


@pytest.fixture(scope="module")
def keys():
    """Channel keys of one handshake per suite; fresh SecureChannel objects are built from them per example."""
    out = {}
    for suite in SUITES:
        server, client = X25519PrivateKey.generate(), X25519PrivateKey.generate()
        nonce = secrets.token_bytes(32)
        rd = compute_report_data(raw_public(server), nonce, b"\x03" * 32, b"\x04" * 32)
        out[suite] = derive_channel_keys(client, raw_public(server), server_public_key=raw_public(server),
                                         client_public_key=raw_public(client), client_nonce=nonce, report_data=rd,
                                         suite=suite)
    return out


def forged(keys: ChannelKeys, role: str, seq: int, plaintext: bytes) -> bytes:
    """An *authentic* record for the ``role`` side (made with the peer's key, AAD and nonce as documented)
    whose plaintext need not be a framed message: exercises unframe."""
    key, label = (keys.server_to_client, b"s2c") if role == "client" else (keys.client_to_server, b"c2s")
    aad = label + keys.session_id + seq.to_bytes(SEQ_SIZE, "big")
    return seq.to_bytes(SEQ_SIZE, "big") + _Aead(keys.suite, key).seal(bytes(4) + seq.to_bytes(8, "big"), plaintext, aad)


@given(st.sampled_from(SUITES), st.sampled_from(["server", "client"]), st.data())
@example("AES-256-GCM", "server", None)
@budget("cheap")
def test_open(keys, suite, role, data):
    channel_keys = keys[suite]
    sender = SecureChannel(channel_keys, "client" if role == "server" else "server")
    receiver = SecureChannel(channel_keys, role)
    sent = [sender.seal(m) for m in (b"first", b"second")]
    genuine = {sent[0]: b"first", sent[1]: b"second"}
    kind, ad = "genuine", b""
    if data is None:
        record = sent[0]
    else:
        kind = data.draw(st.sampled_from(["mutated", "mutated", "junk", "seq", "forged", "ad", "replay"]))
        if kind == "mutated":
            record = data.draw(mutated(sent[0], hot=SEQ_SIZE + 8))
        elif kind == "junk":
            record = data.draw(weighted((3, junk(600)), (1, st.binary(min_size=SEQ_SIZE + TAG_SIZE,
                                                                      max_size=SEQ_SIZE + TAG_SIZE + 40))))
        elif kind == "seq":  # any sequence number in front of a genuine body
            seq = data.draw(st.one_of(st.sampled_from([0, 1, 2, MAX_SEQ - 1, MAX_SEQ]), st.integers(0, MAX_SEQ)))
            record = seq.to_bytes(SEQ_SIZE, "big") + sent[data.draw(st.integers(0, 1))][SEQ_SIZE:]
        elif kind == "forged":  # authentic, framed or not, of bucket and other sizes
            size = data.draw(st.one_of(st.sampled_from([0, 1, 3, 4, 5, 255] + list(RECORD_BUCKETS[:3])),
                                       st.integers(0, 5000)))
            head = data.draw(st.one_of(st.integers(0, 2**32 - 1), st.sampled_from([0, 1, size - 4, size - 3, size])))
            body = (head % 2**32).to_bytes(4, "big") + data.draw(st.binary(max_size=64))
            plaintext = (body + bytes(size))[:size]
            record = forged(channel_keys, role, 0, plaintext)
        elif kind == "ad":  # a genuine record under other associated data
            record, ad = sent[0], data.draw(st.binary(min_size=1, max_size=64))
        else:  # a replay of the genuine record that already opened
            assert receiver.open(sent[0]) == b"first"
            record = sent[0]
    result, err = call(f"channel.open[{role}]", lambda: receiver.open(record, ad), ALLOWED)
    if err is None:
        # only authentic records open: ours (forged with the key) or a genuine one, to its own message
        if kind == "forged":  # opens only if the plaintext is exactly the canonical framing of the message
            assert frame(result) == plaintext
        else:
            assert kind not in ("ad", "replay") and genuine.get(record) == result, (kind, record)
        if kind != "forged" and record == sent[1]:
            assert role == "server"  # a gap: allowed only server-side
        return
    assert str(err)
    assert not (record == sent[0] and not ad and kind != "replay"), f"the genuine record was refused: {err}"
    if role == "client":  # fatal: closed for good
        assert receiver.closed
        with pytest.raises(ChannelClosedError):
            receiver.open(sent[0])
    elif kind not in ("forged", "replay"):  # refused before authentication: the channel is as it was
        assert not receiver.closed and receiver.open(sent[0]) == b"first"
