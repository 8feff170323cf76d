"""Wire format of the native backend (all integers little-endian).

Public context (fixed length, structurally unable to hold a key)::

    b"BFKPUB01" | N:u32 | L:u8 | q_0..q_{L-1}:u64 | scale_bits:u8 | context_id:16B

Input ciphertext (the c_0 half of a fresh symmetric RLWE ciphertext; its mask half is the trusted side's
fixed public polynomial for that input block, never sent, see ``backend.py``)::

    b"BFKI" | ver:u8 | context_id:16B | call:16B | rows:u32 | r:u16 n_i:u16 n_o:u16 | index:u32 count:u32
    | c_0 mod q_i, N coefficients of bitlen(q_i) bits per limb

Output (Σ_b c_0,b · W_{b,o} mod Q, exact, not rescaled; only the r·n_o wanted coefficients travel)::

    b"BFKO" | ver:u8 | context_id:16B | call:16B | rows:u32 | r:u16 n_i:u16 n_o:u16 | member:u16 index:u32 count:u32
    | per limb q_i: the r·n_o coefficients mod q_i, bitlen(q_i) bits each

``call`` is a fresh random 16-byte identifier per encryption call, echoed so that a reply names the call it
answers. No field of an output steers decoding: activation and weight scales, the blocking and the row
count are the trusted side's own (``EncryptedBatch.state`` and its copy of the weights); headers are only
compared with them. (Version 3 sent a 32-byte seed of each call's fresh mask polynomials and returned c_1
in full, rescaled to q_0; version 2 carried scales in the headers.)

Default parameters (N = 2048, q = 30 + 24 bits): input ciphertext 13,824 B of coefficients + 55 B of
header; output r·n_o × 54 bits + 57 B of header.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

from bifrost.ckks.backend import CiphertextError, SecretKeyInPublicContextError

VERSION = 4  # 4: fixed masks, exact outputs at the wanted coefficients (3: seeded fresh masks, c_1 returned;
             # 2: weight scale + sealed activation scales; 1: SHAKE-256 per ciphertext)
PUBLIC_MAGIC = b"BFKPUB01"
SECRET_MAGIC = b"BFKSEC01"  # reserved: a serialized secret key starts with this; never accepted as public
INPUT_MAGIC = b"BFKI"
OUTPUT_MAGIC = b"BFKO"
CONTEXT_ID_BYTES = 16

_IN_HEAD = struct.Struct("<4sB16s16sIHHHII")
_OUT_HEAD = struct.Struct("<4sB16s16sIHHHHII")
CALL_ID_BYTES = 16


def _group_words(bits: int) -> int:
    """uint64 words that hold one group of 8 values of ``bits`` bits (exactly ``bits`` bytes)."""
    return -(-bits // 8)


def pack_bits(values: np.ndarray, bits: int) -> np.ndarray:
    """[M, n] non-negative ints < 2^bits (bits ≤ 64) -> [M, ceil(n·bits/8)] uint8, little-endian bit order.

    Values go in groups of 8 (``bits`` bytes per group), shifted into uint64 words: a handful of vector
    operations per group slot instead of one byte per bit.
    """
    m, n = values.shape
    groups, words = -(-n // 8), _group_words(bits)
    v = np.zeros((m, groups * 8), dtype=np.uint64)
    v[:, :n] = values
    v = v.reshape(m, groups, 8)
    out = np.zeros((m, groups, words), dtype=np.uint64)
    for i in range(8):
        w, off = divmod(i * bits, 64)
        out[:, :, w] |= v[:, :, i] << np.uint64(off)
        if off + bits > 64:
            out[:, :, w + 1] |= v[:, :, i] >> np.uint64(64 - off)
    as_bytes = out.view(np.uint8).reshape(m, groups, 8 * words)[:, :, :bits].reshape(m, groups * bits)
    return np.ascontiguousarray(as_bytes[:, : packed_len(n, bits)])


def unpack_bits(packed: np.ndarray, n: int, bits: int) -> np.ndarray:
    """Inverse of :func:`pack_bits`: [M, bytes] uint8 -> [M, n] int64."""
    m = packed.shape[0]
    groups, words = -(-n // 8), _group_words(bits)
    flat = np.zeros((m, groups * bits), dtype=np.uint8)
    flat[:, : packed.shape[1]] = packed
    buf = np.zeros((m, groups, 8 * words), dtype=np.uint8)
    buf[:, :, :bits] = flat.reshape(m, groups, bits)
    w64 = buf.view(np.uint64)  # [M, groups, words]
    mask = np.uint64((1 << bits) - 1) if bits < 64 else np.uint64(0xFFFFFFFFFFFFFFFF)
    vals = np.empty((m, groups, 8), dtype=np.uint64)
    for i in range(8):
        w, off = divmod(i * bits, 64)
        x = w64[:, :, w] >> np.uint64(off)
        if off + bits > 64:
            x |= w64[:, :, w + 1] << np.uint64(64 - off)
        vals[:, :, i] = x & mask
    return vals.reshape(m, groups * 8)[:, :n].astype(np.int64)


def packed_len(n: int, bits: int) -> int:
    return (n * bits + 7) // 8


def pack_residues(values: np.ndarray, bits: tuple[int, ...]) -> np.ndarray:
    """[M, L, n] residues (limb i < 2^bits[i]) -> [M, Σ_i packed_len(n, bits[i])] uint8: limb after limb."""
    return np.concatenate([pack_bits(values[:, i, :], b) for i, b in enumerate(bits)], axis=1)


def unpack_residues(packed: np.ndarray, n: int, primes: tuple[int, ...], what: str = "ciphertext") -> np.ndarray:
    """Inverse of :func:`pack_residues` for limbs mod ``primes`` (bitlen(q_i) bits each) -> [M, L, n] int64;
    :class:`CiphertextError` if any value is not below its prime (a function of the bytes only)."""
    limbs, offset = [], 0
    for q in primes:
        length = packed_len(n, q.bit_length())
        limb = unpack_bits(packed[:, offset:offset + length], n, q.bit_length())
        if (limb >= q).any():
            raise CiphertextError(f"{what} coefficient out of range")
        limbs.append(limb)
        offset += length
    return np.stack(limbs, axis=1)


# ---------------------------------------------------------------- public context
def encode_public_context(n: int, primes: tuple[int, ...], scale_bits: int, context_id: bytes) -> bytes:
    return (PUBLIC_MAGIC + struct.pack("<IB", n, len(primes)) + struct.pack(f"<{len(primes)}Q", *primes)
            + struct.pack("<B", scale_bits) + context_id)


def decode_public_context(blob: bytes) -> tuple[int, tuple[int, ...], int, bytes]:
    if not isinstance(blob, (bytes, bytearray, memoryview)):
        raise CiphertextError("public context must be bytes")
    blob = bytes(blob)
    if SECRET_MAGIC in blob:
        raise SecretKeyInPublicContextError("refusing a public context that carries secret-key material")
    if len(blob) < 13 or blob[:8] != PUBLIC_MAGIC:
        raise CiphertextError("not a native-backend public context (bad magic or truncated)")
    n, L = struct.unpack_from("<IB", blob, 8)
    expected = 8 + 5 + 8 * L + 1 + CONTEXT_ID_BYTES
    if len(blob) > expected:
        raise SecretKeyInPublicContextError(
            f"public context has {len(blob) - expected} unexpected trailing bytes (possible key material); refusing")
    if len(blob) < expected or L < 1:
        raise CiphertextError("truncated native-backend public context")
    primes = struct.unpack_from(f"<{L}Q", blob, 13)
    scale_bits = blob[13 + 8 * L]
    context_id = blob[14 + 8 * L:]
    return n, tuple(primes), scale_bits, context_id


# ---------------------------------------------------------------- ciphertext headers
@dataclass(frozen=True)
class InputHeader:
    context_id: bytes
    call_id: bytes
    rows: int
    rows_per_ct: int
    in_per_ct: int
    out_per_ct: int
    index: int
    count: int


@dataclass(frozen=True)
class OutputHeader:
    context_id: bytes
    call_id: bytes
    rows: int
    rows_per_ct: int
    in_per_ct: int
    out_per_ct: int
    member: int
    index: int
    count: int


INPUT_HEADER_BYTES = _IN_HEAD.size
OUTPUT_HEADER_BYTES = _OUT_HEAD.size


def encode_input(h: InputHeader, payload: bytes) -> bytes:
    return _IN_HEAD.pack(INPUT_MAGIC, VERSION, h.context_id, h.call_id, h.rows, h.rows_per_ct, h.in_per_ct,
                         h.out_per_ct, h.index, h.count) + payload


def encode_output(h: OutputHeader, payload: bytes) -> bytes:
    return _OUT_HEAD.pack(OUTPUT_MAGIC, VERSION, h.context_id, h.call_id, h.rows, h.rows_per_ct, h.in_per_ct,
                          h.out_per_ct, h.member, h.index, h.count) + payload


def _check_bytes(ct: object, what: str) -> bytes:
    if not isinstance(ct, (bytes, bytearray, memoryview)):
        raise CiphertextError(f"{what} must be bytes, got {type(ct).__name__}")
    return bytes(ct)


def decode_input(ct: object, context_id: bytes, payload_len: int) -> tuple[InputHeader, bytes]:
    ct = _check_bytes(ct, "input ciphertext")
    if len(ct) != _IN_HEAD.size + payload_len:
        raise CiphertextError(f"input ciphertext has {len(ct)} bytes, expected {_IN_HEAD.size + payload_len}")
    magic, ver, cid, call, rows, r, n_i, n_o, index, count = _IN_HEAD.unpack_from(ct)
    if magic != INPUT_MAGIC or ver != VERSION:
        raise CiphertextError("not a native-backend input ciphertext (bad magic/version)")
    if cid != context_id:
        raise CiphertextError("input ciphertext belongs to another context (context id mismatch)")
    return InputHeader(cid, call, rows, r, n_i, n_o, index, count), ct[_IN_HEAD.size:]


_OUT_INDEX_OFFSET = struct.calcsize("<4sB16s16sIHHHH")  # where an output header's ``index`` (u32) starts


def output_headers(h: OutputHeader) -> np.ndarray:
    """The headers of ciphertexts 0 … h.count − 1 of one member's honest output (``h.index`` ignored), as bytes
    [count, OUTPUT_HEADER_BYTES]: what the trusted side expects, compared in one pass."""
    base = np.frombuffer(encode_output(h, b""), dtype=np.uint8)
    out = np.tile(base, (h.count, 1))
    out[:, _OUT_INDEX_OFFSET:_OUT_INDEX_OFFSET + 4] = np.arange(h.count, dtype="<u4").view(np.uint8).reshape(-1, 4)
    return out


def decode_output(ct: object, context_id: bytes, payload_len: int) -> tuple[OutputHeader, bytes]:
    ct = _check_bytes(ct, "output ciphertext")
    if len(ct) != _OUT_HEAD.size + payload_len:
        raise CiphertextError(f"output ciphertext has {len(ct)} bytes, expected {_OUT_HEAD.size + payload_len}")
    magic, ver, cid, call, rows, r, n_i, n_o, member, index, count = _OUT_HEAD.unpack_from(ct)
    if magic != OUTPUT_MAGIC or ver != VERSION:
        raise CiphertextError("not a native-backend output ciphertext (bad magic/version)")
    if cid != context_id:
        raise CiphertextError("output ciphertext belongs to another context (context id mismatch)")
    return OutputHeader(cid, call, rows, r, n_i, n_o, member, index, count), ct[_OUT_HEAD.size:]
