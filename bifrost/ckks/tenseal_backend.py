"""TenSEAL backend: CKKS through TenSEAL's SEAL bindings (``tenseal.sealapi``).

Packing (slot encoding, baby-step/giant-step diagonal method, one level):

- Slots ``S = N/2``. The input ``x`` (d_in) is split into chunks of ``a`` columns; each chunk is
  written periodically over a *block* of ``B = a + m - 1`` slots, ``R = S // B`` blocks per
  ciphertext, one input row per block. ``m`` is the number of outputs per output chunk.
- Output chunk ``c`` of a member ``W`` is ``Σ_i D_i ⊙ rot(z, i)`` with the generalised diagonals
  ``D_i[k] = W[c·m + k, (k + i) mod a]``. With ``i = g·b + j`` the worker needs ``b-1`` baby rotations
  of the input (shared by every member of a group) and ``G-1`` giant rotations per output chunk, where
  ``b = ceil(sqrt(a))``, ``G = ceil(a / b)``; the pre-rotated diagonals are encoded once per worker.
- Scales: activations at ``2**scale_bits``; weights at exactly the value of the rescaling prime ``q1``,
  so after one ``multiply_plain`` + ``rescale`` the result is back at ``2**scale_bits`` on the last
  prime ``q0``, which must hold ``2**scale_bits · |y|`` (|y| < 2**(bits(q0) - scale_bits - 1)).

Wire format of every ciphertext: ``MAGIC | context id (16 bytes) | layout (d_in, a, B as 3 × uint32 LE) |
SEAL serialization``. The context id is random per key generation, so a ciphertext from another context
is refused before SEAL parses it; the layout tag lets the worker refuse a vector packed for another
input width; SEAL's own loader validates sizes and coefficient ranges. Inputs are symmetric encryptions whose
uniform part SEAL serializes as a seed (about half the bytes).

The public context carries parameters, the context id and Galois (rotation) keys only; its format has
no field for a secret key, and :meth:`TenSEALBackend.evaluator` refuses anything else.
"""

from __future__ import annotations

import atexit
import itertools
import json
import math
import os
import secrets
import shutil
import struct
import tempfile
import threading
from dataclasses import dataclass
from typing import Any, Literal, Sequence

import numpy as np
import tenseal.sealapi as seal

from .backend import CiphertextError, EncryptedBatch, GroupShape, SecretKeyInPublicContextError, WeightStats
from .params import CKKSParams

CT_MAGIC = b"BFTSCT1\0"
PUB_MAGIC = b"BFTSPUB1"
CONTEXT_ID_BYTES = 16
_LAYOUT = struct.Struct("<III")
_HEADER_BYTES = len(CT_MAGIC) + CONTEXT_ID_BYTES + _LAYOUT.size
_PUBLIC_FIELDS = {"params", "context_id", "galois_steps"}
ROWS_PER_CALL = 64
MAX_GALOIS_STEPS = 1 << 14
# error bound (documented, see TenSEALTrustedContext.error_bound), in units of 2^-scale_bits·√N
ERROR_FLOOR, ERROR_PER_WEIGHT, ERROR_PER_INPUT = 2.0 ** 19, 2.0 ** 13, 4.0


# --------------------------------------------------------------------------------------------
# SEAL plumbing: serialization goes through files in a private tmpfs folder (the bindings only
# save/load by path). Nothing secret is ever written there: only ciphertexts and Galois keys.
# --------------------------------------------------------------------------------------------
class _Scratch:
    def __init__(self) -> None:
        base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
        self.dir = tempfile.mkdtemp(prefix="bifrost-seal-", dir=base)
        self._counter = itertools.count()
        atexit.register(shutil.rmtree, self.dir, True)

    def path(self) -> str:
        return os.path.join(self.dir, f"{os.getpid()}-{threading.get_ident()}-{next(self._counter)}")

    def dump(self, obj) -> bytes:
        p = self.path()
        try:
            obj.save(p)
            with open(p, "rb") as f:
                return f.read()
        finally:
            _unlink(p)

    def load(self, obj, context, blob: bytes):
        p = self.path()
        try:
            with open(p, "wb") as f:
                f.write(blob)
            obj.load(context, p)
        finally:
            _unlink(p)
        return obj


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


_SCRATCH: _Scratch | None = None


def _scratch() -> _Scratch:
    global _SCRATCH
    if _SCRATCH is None:
        _SCRATCH = _Scratch()
    return _SCRATCH


def _galois_element(step: int, n: int) -> int:
    """SEAL's Galois element for a left rotation by ``step`` slots (generator 3 modulo 2N)."""
    return pow(3, step, 2 * n)


def _seal_context(params: CKKSParams):
    parms = seal.EncryptionParameters(seal.SCHEME_TYPE.CKKS)
    try:
        parms.set_poly_modulus_degree(params.poly_modulus_degree)
        parms.set_coeff_modulus(seal.CoeffModulus.Create(params.poly_modulus_degree, list(params.coeff_mod_bit_sizes)))
        ctx = seal.SEALContext(parms, True, seal.SEC_LEVEL_TYPE.TC128)
    except Exception as exc:  # SEAL's std::logic_error etc. (e.g. "failed to find enough qualifying primes")
        raise CiphertextError(f"SEAL refused the parameters {params}: {exc}") from None
    if not ctx.parameters_set():
        raise CiphertextError(f"SEAL refused the parameters: {ctx.parameters_error_message()}")
    if len(params.coeff_mod_bit_sizes) != 3:
        raise CiphertextError("the TenSEAL backend needs exactly three primes: [q0, q1 (rescale), special]")
    return parms, ctx


# --------------------------------------------------------------------------------------------
# Packing plan: a pure function of (slots, shape), computed identically on both sides.
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PackingPlan:
    slots: int
    d_in: int
    d_outs: tuple[int, ...]
    a: int  # input columns per input chunk
    m: int  # outputs per output chunk
    baby: int  # b
    giant: int  # G

    @property
    def block(self) -> int:
        return self.a + self.m - 1

    @property
    def rows_per_ct(self) -> int:
        return self.slots // self.block

    @property
    def in_chunks(self) -> int:
        return math.ceil(self.d_in / self.a)

    def out_chunks(self, d_out: int) -> int:
        return math.ceil(d_out / self.m)

    @property
    def layout_tag(self) -> bytes:
        return _LAYOUT.pack(self.d_in, self.a, self.block)

    def galois_steps(self) -> set[int]:
        return set(range(1, self.baby)) | {g * self.baby for g in range(1, self.giant)}

    @classmethod
    def for_shape(cls, slots: int, shape: GroupShape) -> "PackingPlan":
        d_out = max(shape.d_outs)
        if shape.d_in + d_out - 1 <= slots:
            a, m = shape.d_in, d_out
        elif shape.d_in <= slots // 2:
            a, m = shape.d_in, slots - shape.d_in + 1
        else:
            a = slots // 2
            m = slots - a + 1
        b = math.ceil(math.sqrt(a))
        return cls(slots, shape.d_in, tuple(shape.d_outs), a, m, b, math.ceil(a / b))


# --------------------------------------------------------------------------------------------
# Trusted side
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _CallState:
    """The trusted side's private record of one encryption call (``EncryptedBatch.state``)."""

    plan: PackingPlan
    rows: int
    x: np.ndarray     # the activations (slot encoding adds no rounding the bound does not cover)
    x_l1: np.ndarray  # ‖x_r‖₁ per row


class TenSEALTrustedContext:
    """Key holder (inside the TEE). Encrypts with the secret key (symmetric, seeded ciphertexts)."""

    def __init__(self, params: CKKSParams, shapes: Sequence[GroupShape]) -> None:
        self.params = params
        self._parms, self._ctx = _seal_context(params)
        self._encoder = seal.CKKSEncoder(self._ctx)
        keygen = seal.KeyGenerator(self._ctx)
        self._secret_key = keygen.secret_key()
        self._encryptor = seal.Encryptor(self._ctx, self._secret_key)
        self._decryptor = seal.Decryptor(self._ctx, self._secret_key)
        self.context_id = secrets.token_bytes(CONTEXT_ID_BYTES)
        self._plans: dict[GroupShape, PackingPlan] = {}
        steps: set[int] = set()
        for s in shapes:
            steps |= self.plan(s).galois_steps()
        self.galois_steps = sorted(steps)
        elements = [_galois_element(s, params.poly_modulus_degree) for s in self.galois_steps]
        # The Serializable form stores each key's uniform part as a seed: about half the bytes.
        self._galois_blob = _scratch().dump(keygen.create_galois_keys(elements)) if elements else b""
        self._scale = 2.0 ** params.scale_bits
        self._output_parms_id = self._ctx.first_context_data().next_context_data().parms_id()

    def plan(self, shape: GroupShape) -> PackingPlan:
        p = self._plans.get(shape)
        if p is None:
            p = self._plans[shape] = PackingPlan.for_shape(self.params.slots, shape)
        return p

    def public_context(self) -> bytes:
        meta = json.dumps(
            {
                "params": {
                    "poly_modulus_degree": self.params.poly_modulus_degree,
                    "coeff_mod_bit_sizes": list(self.params.coeff_mod_bit_sizes),
                    "scale_bits": self.params.scale_bits,
                },
                "context_id": self.context_id.hex(),
                "galois_steps": self.galois_steps,
            },
            sort_keys=True,
        ).encode()
        return PUB_MAGIC + struct.pack("<I", len(meta)) + meta + self._galois_blob

    def prefetch(self, shape: GroupShape, rows: int) -> None:
        """No-op: SEAL's encryption has no input-independent part exposed to prepare ahead."""

    def prepare(self, shape: GroupShape, weights: Sequence[WeightStats]) -> None:
        """No-op: decryption needs only the secret key and the statistics passed to :meth:`decrypt`."""

    def encrypt(self, shape: GroupShape, x: np.ndarray, weights: Sequence[WeightStats] | None = None) -> EncryptedBatch:
        """Encrypt ``x``; ``state`` records the plan, the row count and ‖x_r‖₁ (trusted memory). ``weights``
        are not needed here (decryption needs only the secret key)."""
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != shape.d_in:
            raise ValueError(f"expected (rows, {shape.d_in}) input, got {x.shape}")
        if not np.isfinite(x).all():
            raise ValueError("input contains NaN or infinity")
        plan = self.plan(shape)
        rows, R, B, a = x.shape[0], plan.rows_per_ct, plan.block, plan.a
        padded = np.zeros((rows, plan.in_chunks * a))
        padded[:, : shape.d_in] = x
        periodic = np.resize(np.arange(a), B)  # block slot t holds column t mod a
        cts: list[bytes] = []
        for start in range(0, rows, R):
            group = padded[start : start + R]
            for p in range(plan.in_chunks):
                z = np.zeros(plan.slots)
                chunk = group[:, p * a : (p + 1) * a]
                for r in range(chunk.shape[0]):
                    z[r * B : (r + 1) * B] = chunk[r, periodic]
                pt = seal.Plaintext()
                self._encoder.encode(z.tolist(), self._scale, pt)
                body = _scratch().dump(self._encryptor.encrypt_symmetric(pt))
                cts.append(CT_MAGIC + self.context_id + plan.layout_tag + body)
        return EncryptedBatch(cts, rows, _CallState(plan, rows, x, np.abs(x).sum(axis=1)))

    def _state(self, shape: GroupShape, batch: EncryptedBatch, weights: Sequence[WeightStats]) -> "_CallState":
        state = getattr(batch, "state", None)
        if not isinstance(state, _CallState) or state.plan != self.plan(shape):
            raise TypeError("batch must come from this context's encrypt() for this shape")
        if len(weights) != len(shape.d_outs) or not all(isinstance(w, WeightStats) for w in weights):
            raise TypeError(f"expected one WeightStats per member ({len(shape.d_outs)})")
        return state

    def decrypt(self, shape: GroupShape, outputs: Sequence[Sequence[bytes]], batch: EncryptedBatch,
                weights: Sequence[WeightStats]) -> list[np.ndarray]:
        """Refuses (CiphertextError) any output not at the level and scale one multiplication + rescale of
        a fresh input gives (``parms_id`` of the next level, scale exactly 2^scale_bits): the decoding
        scale comes from here, not from the ciphertext."""
        state = self._state(shape, batch, weights)
        plan, rows = state.plan, state.rows
        n_groups = math.ceil(rows / plan.rows_per_ct)
        if not isinstance(outputs, (list, tuple)) or len(outputs) != len(shape.d_outs):
            raise CiphertextError(f"expected outputs for {len(shape.d_outs)} layers")
        results = []
        for d_out, cts in zip(shape.d_outs, outputs):
            n_out = plan.out_chunks(d_out)
            if not isinstance(cts, (list, tuple)) or len(cts) != n_groups * n_out:
                raise CiphertextError(f"expected {n_groups * n_out} output ciphertexts")
            y = np.zeros((n_groups * plan.rows_per_ct, n_out * plan.m))
            for gi in range(n_groups):
                for c in range(n_out):
                    ct = _load_ciphertext(self._ctx, self.context_id, plan, cts[gi * n_out + c])
                    if ct.parms_id() != self._output_parms_id or not ct.is_ntt_form() or ct.scale != self._scale:
                        raise CiphertextError("output ciphertext is not at the level and scale of one product "
                                              "and rescale")
                    pt = seal.Plaintext()
                    self._decryptor.decrypt(ct, pt)
                    slots = np.asarray(self._encoder.decode_double(pt))
                    blocks = slots[: plan.rows_per_ct * plan.block].reshape(plan.rows_per_ct, plan.block)
                    y[gi * plan.rows_per_ct : (gi + 1) * plan.rows_per_ct, c * plan.m : (c + 1) * plan.m] = blocks[:, : plan.m]
            results.append(y[:rows, :d_out])
        return results

    def effective_weights(self, w: np.ndarray) -> np.ndarray:
        """The weights themselves (their encoding error is inside :meth:`error_bound`)."""
        return np.asarray(w, dtype=np.float64)

    def effective_input(self, batch: EncryptedBatch) -> np.ndarray:
        if not isinstance(getattr(batch, "state", None), _CallState):
            raise TypeError("batch must come from this backend's encrypt()")
        return batch.state.x

    def error_bound(self, shape: GroupShape, batch: EncryptedBatch, weights: Sequence[WeightStats],
                    effective: bool = False) -> np.ndarray:
        """(rows × members) error bound of an honest worker:
        ε = 2^(−scale_bits)·√N·(2^19 + 2^13·‖W‖_row + 4·‖x_r‖₁), ‖W‖_row = max_k Σ_j |W_kj|.

        CKKS noise in SEAL is additive and random: encoding rounding (≤ ½ per coefficient, at scale 2^scale_bits
        for x and q_1 ≈ 2^scale_bits for the weights), fresh encryption noise (σ = 3.2), the rescale and the
        key switches of the rotations; in the slots it grows like √N, not like the worst-case ℓ1 bound N. In those
        units the measured error (every GPT-2 / Qwen3 / MiniLM / LLaMA-mini shape; Gaussian, heavy-tailed,
        outlier, tiny, large and all-zero rows: ``benchmarks/verify_fpr.py``) stayed below 4·10^4 (a floor from
        the rescale and the key switches after it) + 800·‖W‖_row (noise through the weights) + 0.15·‖x_r‖₁ (the
        weights' encoding): the bound leaves ≥ 10× on each term. It is a documented high-probability bound
        validated by measurement, not a worst case (the native backend's is). ``effective`` changes nothing:
        the effective input and weights are the plain ones."""
        state = self._state(shape, batch, weights)
        unit = 2.0 ** -self.params.scale_bits * math.sqrt(self.params.poly_modulus_degree)
        return np.stack([unit * (ERROR_FLOOR + ERROR_PER_WEIGHT * w.row_l1 + ERROR_PER_INPUT * state.x_l1)
                         for w in weights], axis=1)


def _load_ciphertext(ctx, context_id: bytes, plan: PackingPlan, blob: bytes):
    if not isinstance(blob, (bytes, bytearray)) or len(blob) < _HEADER_BYTES + 16:
        raise CiphertextError("ciphertext is truncated or empty")
    if blob[: len(CT_MAGIC)] != CT_MAGIC:
        raise CiphertextError("not a Bifrost/TenSEAL ciphertext (bad magic)")
    cid = blob[len(CT_MAGIC) : len(CT_MAGIC) + CONTEXT_ID_BYTES]
    if cid != context_id:
        raise CiphertextError("ciphertext belongs to another CKKS context")
    tag = blob[len(CT_MAGIC) + CONTEXT_ID_BYTES : _HEADER_BYTES]
    if tag != plan.layout_tag:
        d_in, a, block = _LAYOUT.unpack(tag)
        raise CiphertextError(f"ciphertext packs a vector of length {d_in} (chunk {a}, block {block}); this layer "
                              f"expects length {plan.d_in} (chunk {plan.a}, block {plan.block})")
    ct = seal.Ciphertext()
    try:
        _scratch().load(ct, ctx, bytes(blob[_HEADER_BYTES:]))
    except Exception as exc:  # SEAL raises std::logic_error/invalid_argument subclasses
        raise CiphertextError(f"malformed ciphertext: {exc}") from None
    if ct.size() != 2:
        raise CiphertextError(f"ciphertext has {ct.size()} polynomials, expected 2")
    return ct


# --------------------------------------------------------------------------------------------
# Worker side
# --------------------------------------------------------------------------------------------
@dataclass
class PreparedGroup:
    """Pre-rotated, encoded diagonals: ``diagonals[member][out_chunk][in_chunk][i]``."""

    shape: GroupShape
    plan: PackingPlan
    diagonals: list
    nbytes: int


class TenSEALEvaluator:
    """Worker-side evaluator built from public context bytes only."""

    def __init__(self, public_context: bytes) -> None:
        meta, galois_blob = _parse_public_context(public_context)
        self.params = meta["params"]
        self.context_id = meta["context_id"]
        self._parms, self._ctx = _seal_context(self.params)
        self._encoder = seal.CKKSEncoder(self._ctx)
        self._evaluator = seal.Evaluator(self._ctx)
        self.galois_steps = set(meta["galois_steps"])
        self._galois = seal.GaloisKeys()
        if galois_blob:
            try:
                _scratch().load(self._galois, self._ctx, galois_blob)
            except Exception as exc:
                raise CiphertextError(f"malformed Galois keys in public context: {exc}") from None
        self._weight_scale = float(self._parms.coeff_modulus()[1].value())
        self._first_parms_id = self._ctx.first_parms_id()

    def prepare(self, shape: GroupShape, weights: Sequence[np.ndarray]) -> PreparedGroup:
        if len(weights) != len(shape.d_outs):
            raise ValueError("one weight matrix per group member expected")
        plan = PackingPlan.for_shape(self.params.slots, shape)
        missing = plan.galois_steps() - self.galois_steps
        if missing:
            raise CiphertextError(f"public context lacks rotation keys for steps {sorted(missing)[:5]}...")
        S, a, m, b, B, R = plan.slots, plan.a, plan.m, plan.baby, plan.block, plan.rows_per_ct
        i = np.arange(a)
        k = np.arange(m)
        shift = (i // b) * b  # giant-step pre-rotation per diagonal
        src = (np.arange(S)[None, :] - shift[:, None]) % S  # right-rotate row i by shift[i]
        diagonals, nbytes = [], 0
        for w, d_out in zip(weights, shape.d_outs):
            w = np.asarray(w, dtype=np.float64)
            if w.shape != (d_out, shape.d_in):
                raise ValueError(f"weight shape {w.shape} does not match ({d_out}, {shape.d_in})")
            wp = np.zeros((plan.out_chunks(d_out) * m, plan.in_chunks * a))
            wp[:d_out, : shape.d_in] = w
            per_member = []
            for c in range(plan.out_chunks(d_out)):
                per_out = []
                for p in range(plan.in_chunks):
                    block = wp[c * m : (c + 1) * m, p * a : (p + 1) * a]
                    diag = block[k[:, None], (k[:, None] + i[None, :]) % a].T  # (a, m): diag_i[k]
                    full = np.zeros((a, S))
                    for r in range(R):
                        full[:, r * B : r * B + m] = diag
                    full = np.take_along_axis(full, src, axis=1)
                    pts: list[Any] = []
                    for row in full:
                        if not row.any():  # zero padding (last input chunk): nothing to multiply
                            pts.append(None)
                            continue
                        pt = seal.Plaintext()
                        self._encoder.encode(row.tolist(), self._weight_scale, pt)
                        pts.append(pt)
                        nbytes += S * 8 * 2 * 2  # two RNS limbs of N = 2S words
                    per_out.append(pts)
                per_member.append(per_out)
            diagonals.append(per_member)
        return PreparedGroup(shape, plan, diagonals, nbytes)

    def apply_many(self, prepared: PreparedGroup,
                   items: Sequence[tuple["TenSEALEvaluator", Sequence[bytes]]]) -> list[list[list[bytes]]]:
        """Each item with its own evaluator (context id, rotation keys); no shared kernel pass."""
        for ev, _ in items:
            if not isinstance(ev, TenSEALEvaluator) or ev.params != self.params:
                raise CiphertextError("batched inputs must all use this evaluator's CKKS parameters")
        return [ev.apply(prepared, cts) for ev, cts in items]

    def apply(self, prepared: PreparedGroup, ciphertexts: Sequence[bytes]) -> list[list[bytes]]:
        if not isinstance(prepared, PreparedGroup) or prepared.plan.slots != self.params.slots:
            raise CiphertextError("prepared weights were encoded for other parameters")
        plan = prepared.plan
        if not ciphertexts or len(ciphertexts) % plan.in_chunks:
            raise CiphertextError(
                f"expected a positive multiple of {plan.in_chunks} input ciphertexts, got {len(ciphertexts)}"
            )
        ev, gk, b = self._evaluator, self._galois, plan.baby
        outputs: list[list[bytes]] = [[] for _ in prepared.shape.d_outs]
        for start in range(0, len(ciphertexts), plan.in_chunks):
            inputs = [_load_ciphertext(self._ctx, self.context_id, plan, c)
                      for c in ciphertexts[start : start + plan.in_chunks]]
            for ct in inputs:
                if ct.parms_id() != self._first_parms_id:
                    raise CiphertextError("input ciphertext is not at the fresh encryption level")
            baby = []  # baby[p][j] = rot(input_p, j)
            for ct in inputs:
                rots = [ct]
                for j in range(1, b):
                    r = seal.Ciphertext()
                    ev.rotate_vector(ct, j, gk, r)
                    rots.append(r)
                baby.append(rots)
            for member, per_member in enumerate(prepared.diagonals):
                for per_out in per_member:
                    acc = None
                    for g in range(plan.giant):
                        u = None
                        for p, pts in enumerate(per_out):
                            for j in range(b):
                                idx = g * b + j
                                if idx >= plan.a:
                                    break
                                if pts[idx] is None:
                                    continue
                                prod = seal.Ciphertext()
                                ev.multiply_plain(baby[p][j], pts[idx], prod)
                                if u is None:
                                    u = prod
                                else:
                                    ev.add_inplace(u, prod)
                        if u is None:  # every diagonal of this giant step is zero padding
                            continue
                        ev.rescale_to_next_inplace(u)
                        if g:
                            ev.rotate_vector_inplace(u, g * b, gk)
                        if acc is None:
                            acc = u
                        else:
                            ev.add_inplace(acc, u)
                    outputs[member].append(CT_MAGIC + self.context_id + plan.layout_tag + _scratch().dump(acc))
        return outputs


def _parse_public_context(blob: bytes) -> tuple[dict, bytes]:
    """Public-context bytes -> ({params: CKKSParams, context_id: bytes, galois_steps: list[int]}, Galois keys).
    Every malformed input (wrong JSON types, deep nesting, huge numbers, unknown or missing fields) raises
    :class:`CiphertextError` (or SecretKeyInPublicContextError)."""
    if not isinstance(blob, (bytes, bytearray)) or len(blob) < len(PUB_MAGIC) + 4:
        raise CiphertextError("public context is truncated or empty")
    if blob[: len(PUB_MAGIC)] != PUB_MAGIC:
        raise CiphertextError("not a Bifrost/TenSEAL public context (bad magic)")
    (n,) = struct.unpack("<I", blob[len(PUB_MAGIC) : len(PUB_MAGIC) + 4])
    start = len(PUB_MAGIC) + 4
    if n > len(blob) - start or n > 1 << 20:
        raise CiphertextError("public context metadata is truncated or too large")
    try:
        meta = json.loads(bytes(blob[start : start + n]))
    except (ValueError, RecursionError):
        raise CiphertextError("public context metadata is not valid JSON") from None
    if not isinstance(meta, dict):
        raise CiphertextError("public context metadata must be an object")
    extra = set(meta) - _PUBLIC_FIELDS
    if any("secret" in str(k).lower() for k in extra):
        raise SecretKeyInPublicContextError("public context carries a secret key; refused")
    if extra or set(meta) != _PUBLIC_FIELDS:
        raise CiphertextError(f"public context has unexpected fields {sorted(map(str, extra)) or sorted(_PUBLIC_FIELDS - set(meta))}")
    return {"params": _params_field(meta["params"]), "context_id": _context_id_field(meta["context_id"]),
            "galois_steps": _steps_field(meta["galois_steps"])}, bytes(blob[start + n :])


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _params_field(p) -> CKKSParams:
    keys = {"poly_modulus_degree", "coeff_mod_bit_sizes", "scale_bits"}
    if not isinstance(p, dict) or set(p) != keys:
        raise CiphertextError(f"public context params must be an object with exactly {sorted(keys)}")
    sizes = p["coeff_mod_bit_sizes"]
    if not _is_int(p["poly_modulus_degree"]) or not _is_int(p["scale_bits"]) or not isinstance(sizes, list) \
            or not 1 <= len(sizes) <= 16 or not all(_is_int(b) for b in sizes):
        raise CiphertextError("public context params have the wrong types")
    try:
        return CKKSParams(poly_modulus_degree=p["poly_modulus_degree"], coeff_mod_bit_sizes=tuple(sizes),
                          scale_bits=p["scale_bits"])
    except ValueError as exc:  # InsecureParametersError included
        raise CiphertextError(f"public context params refused: {exc}") from None


def _context_id_field(v) -> bytes:
    if not isinstance(v, str) or len(v) != 2 * CONTEXT_ID_BYTES:
        raise CiphertextError("public context id must be 32 hex digits")
    try:
        return bytes.fromhex(v)
    except ValueError:
        raise CiphertextError("public context id must be 32 hex digits") from None


def _steps_field(v) -> list[int]:
    if not isinstance(v, list) or len(v) > MAX_GALOIS_STEPS or not all(_is_int(s) and 0 < s < 1 << 20 for s in v):
        raise CiphertextError("public context galois_steps must be a list of positive rotation steps")
    return v


class TenSEALBackend:
    """Registry entry ``tenseal``. Its replies carry the worker's rescale and SEAL's noise, so they are not an
    exact function of public data: the TEE checks the decoded products against the backend's error bound."""

    name = "tenseal"
    default_params = CKKSParams(poly_modulus_degree=8192, coeff_mod_bit_sizes=(60, 40, 60), scale_bits=40)
    verification: Literal["exact", "tolerance"] = "tolerance"

    def check_params(self, params: CKKSParams) -> None:
        """Raise ValueError unless ``params`` has the [q0, q1 (rescale), special] prime layout this backend uses."""
        _seal_context(params)

    def keygen(self, params: CKKSParams, shapes: Sequence[GroupShape]) -> TenSEALTrustedContext:
        return TenSEALTrustedContext(params, shapes)

    def evaluator(self, public_context: bytes) -> TenSEALEvaluator:
        _reject_tenseal_private_context(public_context)
        return TenSEALEvaluator(public_context)

    def rows_per_call(self, params: CKKSParams, shape: GroupShape, rows: int) -> int:
        return ROWS_PER_CALL

    def call_bytes(self, params: CKKSParams, shape: GroupShape, rows: int) -> None:
        """None: SEAL's compressed serialisation varies with the data (no exact sizes)."""
        return None

    def quantized_weights(self, params: CKKSParams, w: np.ndarray) -> tuple[np.ndarray, float]:
        """The weights themselves (float32 where that is exact, as for every model's weights), scale 1."""
        w = np.asarray(w, dtype=np.float64)
        w32 = w.astype(np.float32)
        return (w32 if np.array_equal(w32, w) else w), 1.0

    def max_output_bytes(self, params: CKKSParams, shape: GroupShape, rows: int) -> int:
        """Uncompressed SEAL serialization at the output level (one data prime), plus headers, per output
        ciphertext (zstd-compressed ones are smaller)."""
        plan = PackingPlan.for_shape(params.slots, shape)
        count = math.ceil(rows / plan.rows_per_ct) * sum(plan.out_chunks(d) for d in shape.d_outs)
        per_ct = _HEADER_BYTES + 2 * params.poly_modulus_degree * 8 + 4096
        return count * per_ct


def _reject_tenseal_private_context(blob: bytes) -> None:
    """A serialized ``tenseal.Context`` holding a secret key is refused outright (defence in depth)."""
    if isinstance(blob, (bytes, bytearray)) and blob[: len(PUB_MAGIC)] != PUB_MAGIC:
        try:
            import tenseal as ts

            ctx = ts.context_from(bytes(blob))
        except Exception:
            return
        if ctx.has_secret_key():
            raise SecretKeyInPublicContextError("public context carries a secret key; refused")
