"""Minimal DER reader for the few certificate extensions X.509 libraries leave opaque
(AMD VCEK TCB/hwID values, the Intel SGX PCK extension). Parsing only; no cryptography here.
Raises ``ValueError`` on malformed input; callers convert it into a typed error.
"""

from __future__ import annotations

from typing import Iterator

TAG_INTEGER = 0x02
TAG_OCTET_STRING = 0x04
TAG_OID = 0x06
TAG_IA5STRING = 0x16
TAG_SEQUENCE = 0x30


def read_tlv(data: bytes, pos: int = 0) -> tuple[int, bytes, int]:
    """Return (tag, value, next_pos) of the TLV at ``pos``."""
    if pos + 2 > len(data):
        raise ValueError("truncated DER header")
    tag, first = data[pos], data[pos + 1]
    pos += 2
    if first < 0x80:
        length = first
    else:
        n = first & 0x7F
        if n == 0 or n > 4 or pos + n > len(data):
            raise ValueError("bad DER length")
        length = int.from_bytes(data[pos : pos + n], "big")
        pos += n
    if pos + length > len(data):
        raise ValueError("truncated DER value")
    return tag, data[pos : pos + length], pos + length


def iter_tlvs(data: bytes) -> Iterator[tuple[int, bytes]]:
    pos = 0
    while pos < len(data):
        tag, value, pos = read_tlv(data, pos)
        yield tag, value


def decode_oid(value: bytes) -> str:
    if not value:
        raise ValueError("empty OID")
    parts = [value[0] // 40, value[0] % 40]
    acc = 0
    for byte in value[1:]:
        acc = (acc << 7) | (byte & 0x7F)
        if not byte & 0x80:
            parts.append(acc)
            acc = 0
    return ".".join(str(p) for p in parts)


def decode_integer(value: bytes) -> int:
    if not value:
        raise ValueError("empty INTEGER")
    return int.from_bytes(value, "big", signed=True)


def parse_integer(data: bytes) -> int:
    tag, value, end = read_tlv(data)
    if tag != TAG_INTEGER or end != len(data):
        raise ValueError("expected a DER INTEGER")
    return decode_integer(value)
