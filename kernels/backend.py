"""The ``native`` CKKS backend: RLWE with coefficient encoding, one level, no rotations, no rescale.

Masks and secrets. For input block b the mask polynomial ``a_b`` is fixed and public in the RLWE sense:
uniform mod each q_i, expanded from a seed the process draws once from the OS CSPRNG (:class:`PublicMasks`).
Every encryption call draws a *fresh* uniform ternary secret ``s`` per row block (and fresh errors); a
row block's input ciphertexts are ``(c_0, c_1) = (m_b + e_b − a_b·s, a_b) mod Q``, and only c_0 travels.
Each call is thus a set of RLWE samples under a secret used once, with public uniform a_b: the setting of
LPR public-key encryption (one public polynomial, a fresh small secret per encryption), secure under the
same ring-LWE assumption as a fresh a per ciphertext. There is no long-lived secret key for a worker's
replies to probe.

Worker: out_o = Σ_b c_0,b · W_{b,o} mod Q, exact, returned at the r·n_o wanted coefficients only.
Trusted side: out_o + (Σ_b a_b · W_{b,o})·s = Σ_b (m_b + e_b)·W_{b,o} mod Q. The product of the public masks
with the weights, c_1,o = Σ_b a_b·W_{b,o}, depends on the weights only: the trusted side computes it once per
group from its own copy of the weights (:meth:`NativeTrustedContext.prepare`, cached per process) and per
call multiplies it by the call's secret. Hence the worker never computes nor returns c_1 (half its work
and nearly all its reply bytes), and the trusted side's per-call work is data-independent except one
addition each way (the masks e_b − a_b·s of the next call are prepared while a worker computes).

Scaling (per call, no calibration): row r of x is scaled by Δx_r = (2^A − d_in)/‖x_r‖₁ and rounded, so
Σ_j |x̃_rj| ≤ 2^A (A = ``scale_bits``); weights by Δw = (2^B − 1)/max|W| with
B = ⌊log2 Q⌋ − 4 − A. Hence every encoded result |ỹ| ≤ 2^(A+B) ≤ Q/16 cannot wrap, whatever the
activation magnitude (GPT-2 outliers included), and decodes exactly from its residues mod Q.

Error bound (worst case, :meth:`NativeTrustedContext.error_bound`; every term is a bound, not an estimate):
for output k of row r of member W,

    |ŷ_rk − y_rk| ≤ [ 2^(A−1)                      weight rounding, ½·Σ_j |x̃_rj|
                     + ½·Δw·‖W‖_row              activation rounding, ½·Σ_j |W_kj|·Δw
                     + 32·n_o·(Δw·‖W‖_row + d_in/2)   encryption noise (|e| ≤ 32) through the n_o·n_i weights
                                                   of the output block ] / (Δx_r·Δw)

with ‖W‖_row = max_k Σ_j |W_kj|. The first two terms are deterministic: against the activations and weights
*as encoded* (:meth:`NativeTrustedContext.effective_input`, :meth:`~NativeTrustedContext.effective_weights`)
they vanish, and the product check uses that tighter bound (``effective=True``). The products the worker
returns are decoded with Δx and Δw from the trusted side's own state (its record of the call and its copy of
the weights); nothing in an output's header is used but to refuse a reply that is not for this call.
Exact check (:meth:`NativeTrustedContext.verify`). A worker's reply is an exact, deterministic function of public
data: Y ≡ M·c_0 (mod q_i), where c_0 is what the TEE sent and M the linear map from a row block's B·N input
coefficients to its ΣO·r·n_o wanted output coefficients, fixed by the encoded integer weights and the blocking
(the same integer matrix for every prime). The TEE checks it exactly with Freivalds' test: k secret vectors
r_j with entries uniform in [0, 2^S), 2^S below every prime (k = ⌈64/S⌉: S = 23 and k = 3 for the default
chain), and v_j = r_jᵀ·M mod q_i computed from the TEE's own weights; a reply passes when r_j·Y ≡ v_j·c_0
(mod q_i) for every row block, vector and prime. A reply Y' ≠ Y differs mod some q_i in some coefficient d;
for fixed other entries, r_j·(Y' − Y) ≡ 0 holds for at most one value of r_j,d mod q_i, so each vector passes
it with probability ≤ 2^-S and all k with ≤ 2^-(k·S) ≤ 2^-64, whatever the deviation's size and whatever the
plaintext. Per call: one small integer product over the reply (r·Y) on the critical path; v_j·c_0 is computed on
a background thread while the worker computes. Every sum is exact in int64 (operands split into digits so that
no partial sum reaches 2^62). No tolerance is involved, so an honest reply always passes.

When the vectors are drawn: once per trusted process (a replica, or one ``bifrost generate``) and group, at the
group's first use (:meth:`NativeTrustedContext.prepare`), from the OS CSPRNG; shared by the process's sessions
and never sent. Reuse is safe because an honest reply always passes, so until some deviating reply passes,
every verdict any worker can observe (through a quarantine, its timing, or anything else) is "fail": its view
does not depend on r, so its choice of deviations D_1 … D_T is in effect fixed in advance, and by the union bound
one of them passes with probability ≤ T·2^-(k·S), across all calls, sessions and identities of the process (a
quarantined worker's replies are still verified, and discarded whatever the verdict). Attacks that recover a
reused secret from observed verdicts need verdicts that vary with it; these do not. A forked child draws its own.

Default parameters ``N = 2048, q = (30, 24) bits, scale_bits = 35`` (log2 Q = 54 ≤ 54 allowed for 128-bit
security at N = 2048) give B = 14.
"""

from __future__ import annotations

import math
import os
import threading
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Literal, Sequence

import numpy as np
import torch

from bifrost.ckks import csprng
from bifrost.ckks.backend import CiphertextError, EncryptedBatch, GroupShape, WeightStats
from bifrost.ckks.params import CKKSParams

from . import negacyclic_fft as nfft
from . import wire
from .layout import Blocking, plan
from .linear import EncodedWeights, apply_fft, apply_ntt, compose_centered, encode_weights
from .rns import RNSBasis, ntt_primes

DEFAULT_PARAMS = CKKSParams(poly_modulus_degree=2048, coeff_mod_bit_sizes=(30, 24), scale_bits=35)
GUARD_BITS = 4  # |encoded result| ≤ Q / 2^GUARD_BITS
MIN_WEIGHT_BITS = 8
ERROR_MAX = 32  # |e| of a fresh encryption's error (centered binomial, η = 32)
PREFETCH_MAX_BYTES = 16 << 20  # masks prepared ahead per call at most (decode calls: 0.4–0.8 MB at the defaults)
PREFETCH_NICE = 19  # the preparing thread's nice value (Linux): under contention it yields to a worker and the TEE


def _lower_priority() -> None:
    """Runs once in the prefetch thread: on Linux, nice applies per thread (an unprivileged thread may lower
    its own priority). Where it cannot (other systems), the thread keeps the process's priority."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), PREFETCH_NICE)
    except (AttributeError, OSError):
        pass


# One thread for every context of the process, preparing masks while workers compute. Nice 19 is a precaution for a
# worker sharing the cores: on 2 cores with a local worker, equal priority and nice 19 measured the same worker time
# (0.98x the previous build's, benchmarks/ab_decode.py); the third slower worker once seen came from numpy's BLAS.
_PREFETCH = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckks-mask-prefetch", initializer=_lower_priority)
# The exact check's side of each call (v·c_0), on a thread of its own so that it never queues behind the next call's
# masks (it is waited for as soon as the reply arrives); niced like them, so a worker sharing the cores comes first.
_CHECK_TERMS = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckks-exact-check", initializer=_lower_priority)
DEVICE_ENV = "BIFROST_KERNELS_DEVICE"
POLYMUL_ENV = "BIFROST_KERNELS_POLYMUL"  # the polynomial-product method, fft | ntt
RENAMED_POLYMUL_ENV = "BIFROST_KERNELS_ENGINE"  # its former name, refused (an "engine" is a session's DelegationEngine)


def weight_bits(params: CKKSParams, primes: tuple[int, ...]) -> int:
    """B: weights are quantised to |w̃| ≤ 2^B − 1 (see module docstring)."""
    log_q = math.prod(primes).bit_length() - 1  # ⌊log2 Q⌋
    b = log_q - GUARD_BITS - params.scale_bits
    if b < MIN_WEIGHT_BITS:
        raise ValueError(f"scale_bits={params.scale_bits} leaves only {b} weight bits for log2(Q)={log_q}; "
                         f"need ≥ {MIN_WEIGHT_BITS}")
    return b


def weight_scale(bits: int, peak: float) -> float:
    """Δw = (2^bits − 1)/max|W| (1 for an all-zero matrix): the same float on both sides for the same weights."""
    return (2 ** bits - 1) / peak if peak > 0 else 1.0


def quantize(bits: int, w: np.ndarray) -> tuple[np.ndarray, float]:
    """(rint(W·Δw), Δw): the integers the worker multiplies by (int16 where they fit) and their scale."""
    t = torch.from_numpy(np.ascontiguousarray(w, dtype=np.float64))
    dw = weight_scale(bits, float(t.abs().max()) if t.numel() else 0.0)
    dtype = np.int16 if bits <= 15 else np.int32 if bits <= 31 else np.int64
    return torch.round(t * dw).numpy().astype(dtype), dw  # (torch: multi-threaded; same values as numpy's rint)


def _chain(params: CKKSParams) -> tuple[int, ...]:
    try:
        primes = ntt_primes(params.poly_modulus_degree, tuple(params.coeff_mod_bit_sizes))
        weight_bits(params, primes)
    except ValueError as exc:
        raise ValueError(f"{exc}; the native backend's recommended parameters are {DEFAULT_PARAMS} "
                         f"(ckks: poly_modulus_degree 2048, coeff_mod_bit_sizes [30, 24], scale_bits 35)") from None
    return primes


def _check_shape(shape: GroupShape) -> None:
    if not isinstance(shape, GroupShape):
        raise TypeError(f"expected GroupShape, got {type(shape).__name__}")


def _check_weights(shape: GroupShape, weights: Sequence[WeightStats]) -> None:
    if len(weights) != len(shape.d_outs) or not all(isinstance(w, WeightStats) for w in weights):
        raise TypeError(f"expected one WeightStats per member ({len(shape.d_outs)})")


class _Codec:
    """What both sides derive from public values: primes, bit sizes, blocking, payload lengths."""

    def __init__(self, params: CKKSParams, primes: tuple[int, ...], context_id: bytes):
        self.params, self.primes, self.context_id = params, primes, context_id
        self.n = params.poly_modulus_degree
        self.basis = RNSBasis(primes)
        self.bits = tuple(q.bit_length() for q in primes)
        self.log_q = self.basis.Q.bit_length()

    def blocking(self, shape: GroupShape, rows: int) -> Blocking:
        return plan(self.n, self.bits, shape.d_in, tuple(shape.d_outs), rows)

    def input_payload_len(self) -> int:
        return sum(wire.packed_len(self.n, b) for b in self.bits)

    def output_payload_len(self, blocking: Blocking) -> int:
        return sum(wire.packed_len(blocking.rows_per_ct * blocking.out_per_ct, b) for b in self.bits)

    def call_bytes(self, shape: GroupShape, rows: int) -> tuple[int, int]:
        """(input, output) bytes of an honest call of ``rows`` rows: every ciphertext, headers included."""
        blk = self.blocking(shape, rows)
        rb = blk.row_blocks(rows)
        n_in = rb * blk.in_blocks(shape.d_in) * (wire.INPUT_HEADER_BYTES + self.input_payload_len())
        n_out = rb * sum(blk.out_blocks(d) for d in shape.d_outs) * (wire.OUTPUT_HEADER_BYTES + self.output_payload_len(blk))
        return n_in, n_out

    def public_context(self) -> bytes:
        return wire.encode_public_context(self.n, self.primes, self.params.scale_bits, self.context_id)


def _centred(res: torch.Tensor, primes: tuple[int, ...]) -> torch.Tensor:
    """Residues [..., L, N] -> centred float64 per limb (|c| ≤ q_i/2), ready for an exact product with s."""
    q = torch.tensor(primes, dtype=torch.int64, device=res.device).reshape(-1, 1)
    return torch.where(res > q // 2, res - q, res).to(torch.float64)


class PublicMasks:
    """The fixed mask polynomials a_b of one prime chain (b = input block index, uniform mod each q_i), and
    their spectra per limb. Expanded from :data:`MASK_SEED` (drawn once per process from the OS CSPRNG):
    public in the RLWE sense, as security rests on each call's fresh secret; they are never sent (a worker
    needs no mask half)."""

    def __init__(self, primes: tuple[int, ...], n: int):
        self.primes, self.n = primes, n
        self._polys = np.zeros((0, len(primes), n), dtype=np.int64)
        self._spectra = torch.zeros((0, len(primes), n // 2), dtype=torch.complex128)
        self._lock = threading.Lock()

    def polys(self, count: int) -> np.ndarray:
        """a_0 … a_{count−1} as residues [count, L, N]."""
        self._grow(count)
        return self._polys[:count]

    def spectra(self, count: int) -> torch.Tensor:
        """Negacyclic spectra of the centred residues of a_0 … a_{count−1}, [count, L, N/2]."""
        self._grow(count)
        return self._spectra[:count]

    def _grow(self, count: int) -> None:
        with self._lock:
            have = len(self._polys)
            if count <= have:
                return
            new = csprng.expand_uniform_many(MASK_SEED, np.arange(have, count), self.primes, self.n)
            spec = nfft.forward(_centred(torch.from_numpy(new), self.primes))
            self._polys = np.concatenate([self._polys, new])
            self._spectra = torch.cat([self._spectra, spec])


MASK_SEED = csprng.fresh_seed()
_CONTEXTS: "weakref.WeakSet[NativeTrustedContext]" = weakref.WeakSet()


def _forget_prepared_masks() -> None:
    """In a forked child: drop every context's masks prepared before the fork (the parent may use them too, and
    a mask set is for one encryption only), and the exact check's vectors (a verdict the parent's quarantine
    saw then tells nothing about the child's); the child draws fresh ones."""
    for ctx in list(_CONTEXTS):
        ctx._masks = {}
        ctx._masks_lock = threading.Lock()
    _CHECKS.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_prepared_masks)
# (primes, N, weight bits, blocking, ids of the member matrices) -> Σ_b a_b·W_{b,o}, centred, [ΣO·L, N] float64:
# the trusted side's per-group constant, shared by every context of the process; an entry is dropped when
# one of its matrices is garbage-collected (so an id is never reused while its entry exists). The trusted
# weights must not change in place while referenced (the product check's operands assume the same).
_MASK_PRODUCTS: dict[tuple, torch.Tensor] = {}
# The same, keyed alike: the exact check's secret vectors and their images under the group's map (_CheckVectors).
_CHECKS: dict[tuple, "_CheckVectors"] = {}
CHECK_MISS_BITS = 64  # a reply that differs from the honest one passes the exact check with probability ≤ 2^-64
DIRECT_TERM_MAX_POSITIONS = 256  # mask term by one GEMM with rows of s up to this many wanted coefficients, else FFT
_TABLES_LOCK = threading.Lock()


def check_vector_plan(primes: tuple[int, ...]) -> tuple[int, int]:
    """(k, S) of the exact check: k secret vectors with entries uniform in [0, 2^S), 2^S below every prime, so
    that a reply wrong in any residue mod any q_i passes all k with probability ≤ 2^-(k·S) ≤ 2^-CHECK_MISS_BITS."""
    bits = min(primes).bit_length() - 1
    return -(-CHECK_MISS_BITS // bits), bits


@dataclass(frozen=True)
class _CheckVectors:
    """One group's exact-check tables (trusted side; secret): ``r`` [ΣO·P, k] int64, the k vectors over the wanted
    coefficients of every output block (o major; integers in [0, 2^S)); ``v`` [L, B·N, k] int64, v_j = r_jᵀ·M mod q_i
    over the c_0 coefficients of every input block (b major)."""

    r: np.ndarray = field(repr=False)
    v: np.ndarray = field(repr=False)
    out_blocks: int = 0

    @property
    def nbytes(self) -> int:
        return self.r.nbytes + self.v.nbytes


def check_table_bytes(params: CKKSParams, shape: GroupShape) -> int:
    """Trusted memory of one group's exact-check tables (bytes): a function of public values."""
    primes = _chain(params)
    blk = plan(params.poly_modulus_degree, tuple(q.bit_length() for q in primes), shape.d_in, tuple(shape.d_outs), 1)
    k, _ = check_vector_plan(primes)
    o_total = sum(blk.out_blocks(d) for d in shape.d_outs)
    return 8 * k * (o_total * blk.rows_per_ct * blk.out_per_ct
                    + len(primes) * blk.in_blocks(shape.d_in) * params.poly_modulus_degree)


def _exact_dot_mod(x: np.ndarray, v: np.ndarray, primes: tuple[int, ...], x_bits: int, v_bits: int) -> np.ndarray:
    """(x @ v) mod q_i exactly, in int64: x [..., L, M] non-negative below 2^x_bits, v [M, k] (one for every prime)
    or [L, M, k] (per prime) non-negative below 2^v_bits. x is split into digits narrow enough that every partial
    sum of digit × v stays below 2^62. Returns [..., L, k]."""
    m = x.shape[-1]
    digit = max(1, min(x_bits, 62 - v_bits - m.bit_length()))
    q = np.asarray(primes, dtype=np.int64).reshape(-1, 1)
    out = np.zeros(x.shape[:-1] + (v.shape[-1],), dtype=np.int64)
    for shift in range(0, x_bits, digit):
        part = (x >> shift) & ((1 << digit) - 1)
        prod = np.matmul(part[..., None, :], v)[..., 0, :] if v.ndim == 3 else part @ v      # [..., L, k]
        scale = np.asarray([pow(2, shift, p) for p in primes], dtype=np.int64).reshape(-1, 1)
        out = (out + (prod % q) * scale) % q
    return out


@lru_cache(maxsize=1024)
def _reply_layout(o_counts: tuple[int, ...], rb_count: int) -> tuple[tuple[tuple[int, int], ...], np.ndarray]:
    """Where each ciphertext of an honest reply (member, row block, output block order) belongs: its (row block,
    group output block), and the permutation that puts the reply in (row block, group output block) order."""
    starts = np.concatenate([[0], np.cumsum(o_counts)[:-1]])
    columns = tuple((i // o_count, int(starts[m]) + i % o_count)
                    for m, o_count in enumerate(o_counts) for i in range(rb_count * o_count))
    return columns, np.asarray(sorted(range(len(columns)), key=columns.__getitem__))


def _precomputed_term(term: Future | None, state: "CallState", matrices: Sequence[np.ndarray]):
    """The result of ``term`` (one of the call's terms started at encrypt), if it was made for these very matrices;
    else None (the caller computes it now)."""
    if term is None or len(state.term_matrices) != len(matrices) or \
            not all(a is b for a, b in zip(state.term_matrices, matrices)):
        return None
    return term.result()


@lru_cache(maxsize=None)
def public_masks(primes: tuple[int, ...], n: int) -> PublicMasks:
    """The process's masks for one prime chain (one object per chain; they all expand from :data:`MASK_SEED`)."""
    return PublicMasks(primes, n)


@lru_cache(maxsize=256)
def _secret_rows_index(n: int, positions: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """(index, sign) [N, P] such that s[index]·sign is column p of the negacyclic matrix of s at each position:
    (c ⊛ s)[p] = Σ_i c[i]·s[p − i], with s[p − i] = −s[N + p − i] where p − i < 0."""
    lag = np.asarray(positions)[None, :] - np.arange(n)[:, None]
    return torch.from_numpy(np.mod(lag, n)), torch.from_numpy(np.where(lag >= 0, 1.0, -1.0))


def integer_weights(bits: int, w: np.ndarray) -> np.ndarray:
    """rint(W·Δw) as float64: the integers an honest worker multiplies by (both sides use this function)."""
    w = np.asarray(w, dtype=np.float64)
    return np.rint(w * weight_scale(bits, float(np.abs(w).max()) if w.size else 0.0))


@dataclass(frozen=True)
class CallState:
    """The trusted side's private record of one encryption call (``EncryptedBatch.state``): never sent, and kept
    out of its repr (a logged batch shows no activation and no secret)."""

    blocking: Blocking
    rows: int
    call_id: bytes
    x_scales: np.ndarray = field(repr=False)  # Δx per row, [row blocks · r]; ∞ for an all-zero (or padding) row
    x_encoded: np.ndarray = field(repr=False)  # x̃/Δx [rows, d_in]: the activations exactly as encrypted (rounded)
    secrets: np.ndarray = field(repr=False)  # the call's secret per row block, [RB, N] (ternary)
    c0: np.ndarray = field(repr=False)  # what was sent: c_0 residues [RB·B, L, N] (the exact check's input)
    mask_term: Future | None = field(default=None, repr=False)  # (Σ_b a_b·W_{b,o})·s at the wanted coefficients
    term_matrices: tuple[np.ndarray, ...] = field(default=(), repr=False)  # the matrices the two terms are for
    check_term: Future | None = field(default=None, repr=False)  # v_j·c_0 mod q_i, [RB, L, k]: the exact check's side
    parsed: dict = field(default_factory=dict, repr=False)  # the last reply read for this call: (its id, residues)


class NativeTrustedContext:
    """Key holder (trusted runtime only): draws a fresh secret per call and row block, keeps it in the call's
    state, and decrypts with the per-group products of the public masks and the weights."""

    def __init__(self, params: CKKSParams):
        self.params = params
        self._codec = _Codec(params, _chain(params), os.urandom(wire.CONTEXT_ID_BYTES))
        self.weight_bits = weight_bits(params, self._codec.primes)
        self._public = public_masks(self._codec.primes, self._codec.n)
        self._masks: dict[tuple[int, int], Future] = {}  # (row blocks, input blocks) -> the next call's masks
        self._masks_lock = threading.Lock()
        _CONTEXTS.add(self)

    def public_context(self) -> bytes:
        return self._codec.public_context()

    # -------------------------------------------------------------- helpers
    def _fresh_masks(self, rb_count: int, b_count: int) -> tuple[np.ndarray, np.ndarray]:
        """Fresh secrets of a call's ``rb_count`` row blocks ([RB, N]) and the masks
        e − a_b·s mod q_i of its ciphertexts [RB·B, L, N]: everything of an encryption but the message (fresh
        secrets and errors from the CSPRNG; used once)."""
        c = self._codec
        secrets = np.stack([csprng.ternary_secret(c.n) for _ in range(rb_count)])      # [RB, N]
        s_spec = nfft.forward(torch.from_numpy(secrets).to(torch.float64))               # [RB, F]
        a_spec = self._public.spectra(b_count)                                           # [B, L, F]
        # exact: |a_b| ≤ q_i/2 < 2^30 and ‖s‖₁ ≤ N, so |a_b·s| < 2^41
        a_s = nfft.round_exact(nfft.inverse(a_spec[None] * s_spec[:, None, None]))      # [RB, B, L, N]
        e = torch.from_numpy(csprng.centered_binomial((rb_count, b_count, 1, c.n)))
        q = torch.from_numpy(c.basis.q_col).reshape(1, 1, -1, 1)
        masks = torch.remainder(e - a_s, q).numpy().reshape(rb_count * b_count, len(c.primes), c.n)
        return secrets, masks

    def prefetch(self, shape: GroupShape, rows: int) -> None:
        """Prepare the masks of the next encryption of ``rows`` rows of ``shape`` on a background thread (at
        most one set per (row blocks, input blocks), and only for calls of at most ``PREFETCH_MAX_BYTES`` of
        masks); :meth:`encrypt` takes them and waits for them if they are not ready yet."""
        _check_shape(shape)
        blk = self._codec.blocking(shape, rows)
        key = (blk.row_blocks(rows), blk.in_blocks(shape.d_in))
        if key[0] * key[1] * len(self._codec.primes) * self._codec.n * 8 > PREFETCH_MAX_BYTES:
            return
        with self._masks_lock:
            if key not in self._masks:
                self._masks[key] = _PREFETCH.submit(self._fresh_masks, *key)

    def _take_masks(self, rb_count: int, b_count: int) -> tuple[np.ndarray, np.ndarray]:
        with self._masks_lock:
            ready = self._masks.pop((rb_count, b_count), None)
        return ready.result() if ready is not None else self._fresh_masks(rb_count, b_count)

    def prepare(self, shape: GroupShape, weights: Sequence[WeightStats]) -> None:
        """Compute the group's tables from its weights (the trusted copies carried by ``weights``) now rather
        than at its first call: the products of the public masks Σ_b a_b·W_{b,o} per output block, and the
        exact check's vectors; both cached for the process while the weight matrices live."""
        blk, matrices = self._codec.blocking(shape, 1), self._matrices(shape, weights)
        self._mask_products(shape, blk, matrices)
        self._check_vectors(shape, blk, matrices)

    # -------------------------------------------------------------- encrypt
    def encrypt(self, shape: GroupShape, x: np.ndarray, weights: Sequence[WeightStats] | None = None) -> EncryptedBatch:
        _check_shape(shape)
        x = np.asarray(x, dtype=np.float64)
        if x.ndim == 1:
            x = x[None, :]
        if x.ndim != 2 or x.shape[1] != shape.d_in or x.shape[0] < 1:
            raise ValueError(f"expected x of shape (rows, {shape.d_in}), got {x.shape}")
        if not np.isfinite(x).all():
            raise ValueError("x contains NaN or infinity")
        c = self._codec
        rows, n = x.shape[0], c.n
        blk = c.blocking(shape, rows)
        r, n_i = blk.rows_per_ct, blk.in_per_ct
        rb_count, b_count = blk.row_blocks(rows), blk.in_blocks(shape.d_in)

        l1 = np.abs(x).sum(axis=1)
        budget = float(2 ** self.params.scale_bits - shape.d_in)
        scales = budget / np.where(l1 > 0, l1, 1.0)
        x_scales = np.full(rb_count * r, np.inf)  # ∞: an all-zero (or padding) row decodes to exactly 0
        x_scales[:rows] = np.where(l1 > 0, scales, np.inf)
        padded = np.zeros((rb_count * r, b_count * n_i), dtype=np.int64)
        padded[:rows, : shape.d_in] = np.rint(x * scales[:, None]).astype(np.int64)
        x_encoded = padded[:rows, : shape.d_in] / scales[:, None]
        blocks = padded.reshape(rb_count, r, b_count, n_i).transpose(0, 2, 1, 3)  # [RB, B, r, n_i]
        msg = np.zeros((rb_count, b_count, n), dtype=np.int64)
        msg[:, :, blk.input_positions().reshape(-1)] = blocks.reshape(rb_count, b_count, r * n_i)

        count = rb_count * b_count
        secrets, masks = self._take_masks(rb_count, b_count)
        q = torch.from_numpy(c.basis.q_col).reshape(1, -1, 1)
        c0 = torch.remainder(torch.from_numpy(msg).reshape(count, 1, n) + torch.from_numpy(masks), q).numpy()  # [C, L, N]
        payload = wire.pack_residues(c0, c.bits)
        call_id = os.urandom(wire.CALL_ID_BYTES)
        cts = [wire.encode_input(wire.InputHeader(c.context_id, call_id, rows, r, n_i, blk.out_per_ct, i, count),
                                 payload[i].tobytes())
               for i in range(count)]
        term, check = None, None
        matrices: tuple[np.ndarray, ...] = ()
        if weights is not None:  # the call's decryption term and the check's side of what was sent, prepared on
            matrices = tuple(self._matrices(shape, weights))  # background threads while the worker computes
            term = _PREFETCH.submit(self._mask_term, shape, blk, matrices, secrets)
            check = _CHECK_TERMS.submit(self._check_term, shape, blk, matrices, c0)
        state = CallState(blk, rows, call_id, x_scales, x_encoded, secrets, c0, term, matrices, check)
        return EncryptedBatch(ciphertexts=cts, rows=rows, state=state)

    def _mask_term(self, shape: GroupShape, blk: Blocking, matrices: Sequence[np.ndarray],
                   secrets: np.ndarray) -> torch.Tensor:
        """(Σ_b a_b·W_{b,o})·s_rb mod q_i at the wanted coefficients, [RB, ΣO, L, r·n_o]. Exact: |c_1| < 2^30 and
        ‖s‖₁ ≤ N, so every partial sum is an integer below 2^41. Up to ``DIRECT_TERM_MAX_POSITIONS`` positions:
        one float64 GEMM of c_1 with the rows of each secret's negacyclic matrix at those positions (2× faster
        than the FFT route at 12 rows, measured); otherwise by FFT."""
        c = self._codec
        c1 = self._mask_products(shape, blk, matrices)                                    # [ΣO·L, N]
        o_l, rb = c1.shape[0], len(secrets)
        pos = blk.output_positions().reshape(-1)
        s = torch.from_numpy(secrets).to(torch.float64)
        if len(pos) <= DIRECT_TERM_MAX_POSITIONS:
            idx, sign = _secret_rows_index(c.n, tuple(pos.tolist()))                     # [N, P]
            rows = (s[:, idx] * sign).permute(1, 0, 2).reshape(c.n, rb * len(pos))       # [N, RB·P]
            term = torch.round(c1 @ rows).to(torch.int64).reshape(o_l, rb, len(pos)).permute(1, 0, 2)
        else:
            spec = nfft.forward(c1)[None] * nfft.forward(s)[:, None, :]                   # [RB, ΣO·L, F]
            term = nfft.round_exact(nfft.inverse(spec))[..., torch.from_numpy(pos)]
        term = term.reshape(rb, -1, len(c.primes), len(pos))                               # [RB, ΣO, L, P]
        return torch.remainder(term, torch.tensor(c.primes, dtype=torch.int64).reshape(-1, 1))

    def _state(self, shape: GroupShape, batch: EncryptedBatch, weights: Sequence[WeightStats]) -> CallState:
        _check_shape(shape)
        state = getattr(batch, "state", None)
        if not isinstance(state, CallState):
            raise TypeError("batch must come from this backend's encrypt()")
        _check_weights(shape, weights)
        return state

    @staticmethod
    def _matrices(shape: GroupShape, weights: Sequence[WeightStats]) -> list[np.ndarray]:
        _check_weights(shape, weights)
        out = []
        for w, d_out in zip(weights, shape.d_outs):
            if w.matrix is None or w.matrix.shape != (d_out, shape.d_in):
                raise TypeError(f"the native backend decrypts with the trusted weight matrix: pass WeightStats.of(W) "
                                f"with W of shape ({d_out}, {shape.d_in})")
            out.append(w.matrix)
        return out

    def _mask_products(self, shape: GroupShape, blk: Blocking, matrices: Sequence[np.ndarray]) -> torch.Tensor:
        """c_1,o = Σ_b a_b·W_{b,o} mod q_i, centred, for the group's members: [ΣO·L, N] float64 (o major)."""
        c = self._codec

        def make() -> torch.Tensor:
            ints = [torch.from_numpy(integer_weights(self.weight_bits, m)) for m in matrices]
            enc = encode_weights(blk, ints, shape.d_in, c.primes, "fft")
            a = torch.from_numpy(self._public.polys(blk.in_blocks(shape.d_in)))[None]   # [1, B, L, N]
            c1 = apply_fft(enc, a, c.primes, c.log_q, None, self.weight_bits)[0]         # [ΣO, L, N]
            return _centred(c1, c.primes).reshape(-1, c.n).contiguous()
        return self._group_table(_MASK_PRODUCTS, blk, matrices, make)

    def _group_table(self, table: dict, blk: Blocking, matrices: Sequence[np.ndarray], make):
        """``table``'s entry for this group (``make()`` on first use). The first entry stored wins, so every caller
        of the process gets the same one; it is dropped when one of the matrices is garbage-collected (an id is
        never reused while its entry exists)."""
        c = self._codec
        key = (c.primes, c.n, self.weight_bits, blk, tuple(id(m) for m in matrices))
        with _TABLES_LOCK:
            hit = table.get(key)
        if hit is not None:
            return hit
        made = make()
        with _TABLES_LOCK:
            stored = table.setdefault(key, made)
        if stored is made:
            for m in matrices:
                weakref.finalize(m, table.pop, key, None)
        return stored

    def _check_vectors(self, shape: GroupShape, blk: Blocking, matrices: Sequence[np.ndarray]) -> _CheckVectors:
        """The group's exact-check tables (drawn once per process; module docstring, "Exact check").

        v_j = r_jᵀ·M is one transposed layer product: ⟨R_o, c ⊛ W⟩ = ⟨c, R_o ⊛ W*⟩ with W*(X) = W(X⁻¹) the
        adjoint of multiplication by W, whose negacyclic spectrum is the conjugate of W's; so v_j,b =
        Σ_o R_j,o ⊛ W*_{b,o} for R_j,o the polynomial holding r_j at output block o's wanted coefficients,
        computed exactly by the worker's own FFT product with the roles of inputs and outputs swapped."""
        c = self._codec

        def make() -> _CheckVectors:
            k, bits = check_vector_plan(c.primes)
            ints = [torch.from_numpy(integer_weights(self.weight_bits, m)) for m in matrices]
            enc = encode_weights(blk, ints, shape.d_in, c.primes, "fft")                 # spectra [F, B, ΣO]
            spectra = enc.spectra()
            _, b_count, o_total = spectra.shape
            adjoint = EncodedWeights(blk, (b_count,), fft_spectra=spectra.conj().transpose(1, 2).contiguous())
            pos = blk.output_positions().reshape(-1)                                      # P
            r = torch.from_numpy(csprng.uniform_bits(k * o_total * len(pos), bits)).reshape(k, o_total, len(pos))
            polys = torch.zeros(k, o_total, len(c.primes), c.n, dtype=torch.int64)
            polys[..., torch.from_numpy(pos)] = r[:, :, None, :]                           # r < 2^S < every q_i
            v = apply_fft(adjoint, polys, c.primes, bits + 2, None, self.weight_bits)    # [k, B, L, N] mod q_i
            v = v.permute(2, 1, 3, 0).reshape(len(c.primes), b_count * c.n, k)           # [L, B·N, k]
            return _CheckVectors(np.ascontiguousarray(r.permute(1, 2, 0).reshape(-1, k).numpy()),
                                 np.ascontiguousarray(v.numpy()), o_total)
        return self._group_table(_CHECKS, blk, matrices, make)

    # -------------------------------------------------------------- decrypt
    def _read_outputs(self, shape: GroupShape, outputs: Sequence[Sequence[bytes]],
                      state: CallState) -> tuple[torch.Tensor, tuple[tuple[int, int], ...]]:
        """Parse a reply for the call ``state``: (residues [C, L, r·n_o] int64, (row block, output block) of
        each). Raises :class:`CiphertextError` unless every count, length, header and residue range is that of
        an honest reply to this call (functions of the bytes and public values only)."""
        if not isinstance(outputs, (list, tuple)) or not all(isinstance(o, (list, tuple)) for o in outputs):
            raise CiphertextError(f"expected {len(shape.d_outs)} output lists (one per member)")
        frozen = tuple(tuple(o) for o in outputs)  # bytes are immutable: equal tuples are the same reply
        hit = state.parsed.get("reply")
        if hit is not None and hit[0] == frozen:  # decrypt read it already: verify does not parse it twice
            return hit[1], hit[2]
        c, blk = self._codec, state.blocking
        rb_count = blk.row_blocks(state.rows)
        if len(outputs) != len(shape.d_outs):
            raise CiphertextError(f"expected {len(shape.d_outs)} output lists (one per member)")
        o_counts = [blk.out_blocks(d) for d in shape.d_outs]
        plen = c.output_payload_len(blk)
        columns = _reply_layout(tuple(o_counts), rb_count)[0]
        payloads = self._read_honest_shaped(outputs, state, o_counts, plen, rb_count)  # one pass when well formed
        if payloads is None:
            payloads = self._read_with_diagnosis(outputs, state, o_counts, plen, rb_count)
        p_count = blk.rows_per_ct * blk.out_per_ct
        vals = torch.from_numpy(wire.unpack_residues(payloads, p_count, c.primes, "output ciphertext"))  # [C, L, P]
        state.parsed["reply"] = (frozen, vals, columns)
        return vals, columns

    def _read_with_diagnosis(self, outputs: Sequence[Sequence[bytes]], state: CallState, o_counts: list[int],
                             plen: int, rb_count: int) -> np.ndarray:
        """The payloads [C, plen] of a reply that is not byte-for-byte honest-shaped, ciphertext by ciphertext: the
        first fault raises :class:`CiphertextError` naming it."""
        c, blk, rows = self._codec, state.blocking, state.rows
        payloads = []
        for m, (o_count, cts) in enumerate(zip(o_counts, outputs)):
            if not isinstance(cts, (list, tuple)) or len(cts) != rb_count * o_count:
                raise CiphertextError(f"member {m}: expected {rb_count * o_count} ciphertexts")
            for i, ct in enumerate(cts):
                h, body = wire.decode_output(ct, c.context_id, plen)
                if (h.call_id, h.rows, h.rows_per_ct, h.in_per_ct, h.out_per_ct, h.member, h.index, h.count) != \
                        (state.call_id, rows, blk.rows_per_ct, blk.in_per_ct, blk.out_per_ct, m, i, len(cts)):
                    raise CiphertextError(f"member {m} ciphertext {i}: header does not match this call "
                                          f"(rows={rows}, blocking={blk})")
                payloads.append(np.frombuffer(body, dtype=np.uint8))
        return np.stack(payloads)

    def _read_honest_shaped(self, outputs: Sequence[Sequence[bytes]], state: CallState, o_counts: list[int],
                            plen: int, rb_count: int) -> np.ndarray | None:
        """The payloads [C, plen] of a reply whose every count, length and header is exactly an honest reply's to
        this call (headers compared byte for byte with the expected ones), else None."""
        c, blk, size = self._codec, state.blocking, wire.OUTPUT_HEADER_BYTES + plen
        flat: list[bytes] = []
        for o_count, cts in zip(o_counts, outputs):
            if len(cts) != rb_count * o_count or not all(type(ct) is bytes and len(ct) == size for ct in cts):
                return None
            flat.extend(cts)
        got = np.frombuffer(b"".join(flat), dtype=np.uint8).reshape(len(flat), size)
        expected = np.concatenate([wire.output_headers(wire.OutputHeader(
            c.context_id, state.call_id, state.rows, blk.rows_per_ct, blk.in_per_ct, blk.out_per_ct, m, 0,
            rb_count * o_count)) for m, o_count in enumerate(o_counts)])
        if not np.array_equal(got[:, :wire.OUTPUT_HEADER_BYTES], expected):
            return None
        return got[:, wire.OUTPUT_HEADER_BYTES:]

    def verify(self, shape: GroupShape, outputs: Sequence[Sequence[bytes]], batch: EncryptedBatch,
               weights: Sequence[WeightStats]) -> bool:
        """Whether ``outputs`` are exactly the honest reply to ``batch``: Y ≡ M·c_0 (mod q_i) for every row block
        and prime, M being the public linear map of the group's encoded weights (module docstring, "Exact
        check"). A reply that differs from the honest one in any residue passes with probability
        ≤ 2^-:data:`CHECK_MISS_BITS`, whatever its values and whatever the plaintext. Raises
        :class:`CiphertextError` for a reply that is not even well formed."""
        state = self._state(shape, batch, weights)
        c, blk = self._codec, state.blocking
        vals, _ = self._read_outputs(shape, outputs, state)                                 # [C, L, P]
        matrices = self._matrices(shape, weights)
        checks = self._check_vectors(shape, blk, matrices)
        expected = _precomputed_term(state.check_term, state, matrices)
        if expected is None:
            expected = self._check_term(shape, blk, matrices, state.c0)                       # [RB, L, k]
        rb_count, L = blk.row_blocks(state.rows), len(c.primes)
        order = _reply_layout(tuple(blk.out_blocks(d) for d in shape.d_outs), rb_count)[1]
        y = vals.numpy()[order]                                                              # [RB·ΣO, L, P]
        y = y.reshape(rb_count, checks.out_blocks, L, -1).transpose(0, 2, 1, 3).reshape(rb_count, L, -1)
        got = _exact_dot_mod(y, checks.r, c.primes, max(c.bits), check_vector_plan(c.primes)[1])  # r_j < 2^S
        return bool(np.array_equal(got, expected))                                          # r_j·Y ≡ v_j·c_0

    def _check_term(self, shape: GroupShape, blk: Blocking, matrices: Sequence[np.ndarray],
                    c0: np.ndarray) -> np.ndarray:
        """v_j·c_0 mod q_i per row block [RB, L, k]: the exact check's side of what was sent."""
        c = self._codec
        checks = self._check_vectors(shape, blk, matrices)
        L = len(c.primes)
        rb_count = len(c0) // blk.in_blocks(shape.d_in)
        x = c0.reshape(rb_count, -1, L, c.n).transpose(0, 2, 1, 3).reshape(rb_count, L, -1)   # [RB, L, B·N]
        return _exact_dot_mod(x, checks.v, c.primes, max(c.bits), max(c.bits))  # c_0 and v are residues

    def decrypt(self, shape: GroupShape, outputs: Sequence[Sequence[bytes]], batch: EncryptedBatch,
                weights: Sequence[WeightStats]) -> list[np.ndarray]:
        state = self._state(shape, batch, weights)
        c, blk, rows = self._codec, state.blocking, state.rows
        r, n_o = blk.rows_per_ct, blk.out_per_ct
        rb_count = blk.row_blocks(rows)
        vals, columns = self._read_outputs(shape, outputs, state)
        o_counts = [blk.out_blocks(d) for d in shape.d_outs]
        starts = np.concatenate([[0], np.cumsum(o_counts)[:-1]])

        matrices = self._matrices(shape, weights)
        term = _precomputed_term(state.mask_term, state, matrices)
        if term is None:
            term = self._mask_term(shape, blk, matrices, state.secrets)                       # [RB, ΣO, L, P]
        rb_idx = torch.tensor([rb for rb, _ in columns])
        col_idx = torch.tensor([o for _, o in columns])
        q_col = torch.tensor(c.primes, dtype=torch.int64).reshape(1, -1, 1)
        centred = compose_centered(torch.remainder(vals + term[rb_idx, col_idx], q_col), c.primes)
        decoded = centred.to(torch.float64).numpy()                                           # [C, P]

        w_scales = [weight_scale(self.weight_bits, w.peak) for w in weights]
        member_of = np.repeat(np.arange(len(o_counts)), o_counts)
        results = [np.zeros((rb_count * r, o * n_o)) for o in o_counts]
        for k, (rb, col) in enumerate(columns):
            m = member_of[col]
            ob = col - starts[m]
            x_scales = state.x_scales[rb * r:(rb + 1) * r]
            results[m][rb * r:(rb + 1) * r, ob * n_o:(ob + 1) * n_o] = \
                decoded[k].reshape(r, n_o) / w_scales[m] / x_scales[:, None]
        return [res[:rows, :d] for res, d in zip(results, shape.d_outs)]

    def error_bound(self, shape: GroupShape, batch: EncryptedBatch, weights: Sequence[WeightStats],
                    effective: bool = False) -> np.ndarray:
        """(rows × members) worst-case error of an honest worker (module docstring), units of x·W. With
        ``effective``, against :meth:`effective_input` × :meth:`effective_weights`ᵀ: the two rounding terms
        are then exact and drop out, leaving the encryption noise."""
        state = self._state(shape, batch, weights)
        blk = state.blocking
        n_o = blk.out_per_ct
        x_scales = state.x_scales[:state.rows]
        out = np.zeros((state.rows, len(weights)))
        for m, w in enumerate(weights):
            dw = weight_scale(self.weight_bits, w.peak)
            w_row = w.row_l1 * dw  # ≥ Σ_j |W_kj|·Δw for every output k
            rounding = 0.0 if effective else 2.0 ** (self.params.scale_bits - 1) + 0.5 * w_row
            total = rounding + ERROR_MAX * n_o * (w_row + shape.d_in / 2)
            total += 2.0 ** -45 * 2.0 ** self.params.scale_bits * (w_row + shape.d_in)  # float64 decode rounding
            out[:, m] = total / (dw * x_scales)  # 0 for ∞ scales (all-zero rows decode to exactly 0)
        return out

    def effective_weights(self, w: np.ndarray) -> np.ndarray:
        """The matrix an honest worker multiplies by, in real units: rint(W·Δw)/Δw."""
        m, c = quantize(self.weight_bits, w)
        return m / c

    def effective_input(self, batch: EncryptedBatch) -> np.ndarray:
        """The activations exactly as encrypted (x̃/Δx, rows × d_in)."""
        if not isinstance(getattr(batch, "state", None), CallState):
            raise TypeError("batch must come from this backend's encrypt()")
        return batch.state.x_encoded


class NativeEvaluator:
    """Untrusted worker: built from public-context bytes only. Runs on CUDA when available."""

    def __init__(self, public_context: bytes, device: str | None = None, polymul: str | None = None):
        n, primes, scale_bits, context_id = wire.decode_public_context(public_context)
        bits = tuple(q.bit_length() for q in primes)
        try:
            self.params = CKKSParams(poly_modulus_degree=n, coeff_mod_bit_sizes=bits, scale_bits=scale_bits)
            chain = _chain(self.params)
        except ValueError as exc:  # InsecureParametersError included: the caller chose these bytes
            raise CiphertextError(f"public context parameters refused: {exc}") from None
        if chain != primes:
            raise CiphertextError("public context primes do not match the native backend's prime chain")
        self._codec = _Codec(self.params, primes, context_id)
        self.weight_bits = weight_bits(self.params, primes)
        self.device = torch.device(device or os.environ.get(DEVICE_ENV) or
                                   ("cuda" if torch.cuda.is_available() else "cpu"))
        if RENAMED_POLYMUL_ENV in os.environ:
            raise ValueError(f"{RENAMED_POLYMUL_ENV} was renamed {POLYMUL_ENV} (fft | ntt)")
        self.polymul = polymul or os.environ.get(POLYMUL_ENV, "fft")  # how weight × ciphertext polynomials multiply
        if self.polymul not in ("fft", "ntt"):
            raise ValueError(f"unknown polynomial-product method {self.polymul!r} (fft|ntt)")

    def prepare(self, shape: GroupShape, weights: Sequence[np.ndarray]) -> "PreparedGroup":
        _check_shape(shape)
        if len(weights) != len(shape.d_outs):
            raise ValueError(f"expected {len(shape.d_outs)} weight matrices, got {len(weights)}")
        ints = []  # integer-valued float64 (exact: |w̃| < 2^weight_bits ≤ 2^53)
        for w, d_out in zip(weights, shape.d_outs):
            w = np.asarray(w, dtype=np.float64)
            if w.shape != (d_out, shape.d_in):
                raise ValueError(f"weight shape {w.shape} != ({d_out}, {shape.d_in})")
            if not np.isfinite(w).all():
                raise ValueError("weights contain NaN or infinity")
            ints.append(integer_weights(self.weight_bits, w))
        prepared = PreparedGroup(shape, torch.from_numpy(np.concatenate(ints)).to(self.device))
        prepared.encoded(self, self._codec.blocking(shape, 1))  # decode blocking encoded eagerly
        return prepared

    def apply(self, prepared: "PreparedGroup", ciphertexts: Sequence[bytes]) -> list[list[bytes]]:
        return self.apply_many(prepared, [(self, ciphertexts)])[0]

    def apply_many(self, prepared: "PreparedGroup",
                   items: Sequence[tuple["NativeEvaluator", Sequence[bytes]]]) -> list[list[list[bytes]]]:
        """One layer group for several inputs, possibly of different worker sessions (different keys), in one
        kernel pass: ``[item_evaluator.apply(prepared, cts) for item_evaluator, cts in items]``.

        A plaintext-weight × ciphertext product needs no key material, so the inputs of several key sets
        stack along the row-block axis; each item is decoded and re-encoded with its own evaluator's
        context (context id, header checks). All items must share this evaluator's parameters (the
        prepared weights are encoded for them). Any bad item raises :class:`CiphertextError`.
        """
        if not isinstance(prepared, PreparedGroup):
            raise TypeError("prepared must come from NativeEvaluator.prepare")
        if not items:
            raise CiphertextError("expected at least one input")
        for ev, _ in items:
            if not isinstance(ev, NativeEvaluator) or ev._codec.primes != self._codec.primes or \
                    ev.params.scale_bits != self.params.scale_bits:
                raise CiphertextError("batched inputs must all use this evaluator's CKKS parameters")
        decoded = [ev._decode_inputs(prepared, cts) for ev, cts in items]
        blk = decoded[0][1]
        if any(d[1] != blk for d in decoded):
            raise CiphertextError("batched inputs use different blockings")
        sent = self._kernel(prepared, blk, torch.cat([d[0] for d in decoded]))       # [ΣRB, ΣO, L, r·n_o]
        results, start = [], 0
        for (ev, _), (cts, _, first) in zip(items, decoded):
            rb_count = cts.shape[0]
            results.append(ev._encode_outputs(prepared, blk, first, sent[start:start + rb_count]))
            start += rb_count
        return results

    def _decode_inputs(self, prepared: "PreparedGroup", ciphertexts: Sequence[bytes]):
        """Check and unpack one input's ciphertexts -> (c_0 residues [RB, B, L, N] on the device, blocking,
        the first ciphertext's header)."""
        c, shape = self._codec, prepared.shape
        if not isinstance(ciphertexts, (list, tuple)) or not ciphertexts:
            raise CiphertextError("expected a non-empty list of input ciphertexts")
        plen = c.input_payload_len()
        first, _ = wire.decode_input(ciphertexts[0], c.context_id, plen)
        if not 1 <= first.rows <= 1 << 20:
            raise CiphertextError(f"invalid row count {first.rows}")
        blk = c.blocking(shape, first.rows)
        rb_count, b_count = blk.row_blocks(first.rows), blk.in_blocks(shape.d_in)
        expected = rb_count * b_count
        if len(ciphertexts) != expected:
            raise CiphertextError(f"expected {expected} input ciphertexts for rows={first.rows}, "
                                  f"got {len(ciphertexts)}")
        bodies = []
        for i, ct in enumerate(ciphertexts):
            h, body = wire.decode_input(ct, c.context_id, plen)
            if (h.rows, h.rows_per_ct, h.in_per_ct, h.out_per_ct, h.index, h.count) != \
                    (first.rows, blk.rows_per_ct, blk.in_per_ct, blk.out_per_ct, i, expected):
                raise CiphertextError(f"input ciphertext {i}: layout/index header does not match this layer "
                                      f"(d_in={shape.d_in}, blocking={blk})")
            if h.call_id != first.call_id:
                raise CiphertextError(f"input ciphertext {i}: the ciphertexts of one call share one call id")
            bodies.append(np.frombuffer(body, dtype=np.uint8))
        residues = wire.unpack_residues(np.stack(bodies), c.n, c.primes, "input ciphertext")    # [C, L, N]
        cts = torch.from_numpy(residues).to(self.device)
        return cts.reshape(rb_count, b_count, len(c.primes), c.n), blk, first

    def _kernel(self, prepared: "PreparedGroup", blk: Blocking, cts: torch.Tensor) -> np.ndarray:
        """c_0 residues [RB, B, L, N] -> Σ_b c_0,b·W_{b,o} mod q_i at the wanted coefficients [RB, ΣO, L, r·n_o]."""
        c = self._codec
        enc = prepared.encoded(self, blk)
        pos = torch.from_numpy(blk.output_positions().reshape(-1)).to(self.device)
        # Row blocks go through the kernel a few at a time: its intermediates grow with the row count
        # (measured: 256 rows of 768x2304 at once peaked near 8 GB and ran 4x slower per row).
        step = ROW_BLOCKS_PER_KERNEL_CALL
        if self.polymul == "fft":
            parts = [apply_fft(enc, cts[i:i + step], c.primes, c.log_q, pos, self.weight_bits)
                     for i in range(0, cts.shape[0], step)]
        else:
            parts = [apply_ntt(enc, cts[i:i + step], c.primes, pos) for i in range(0, cts.shape[0], step)]
        return torch.cat(parts).cpu().numpy()

    def _encode_outputs(self, prepared: "PreparedGroup", blk: Blocking, first: wire.InputHeader,
                        sent: np.ndarray) -> list[list[bytes]]:
        c = self._codec
        rb_count, o_total = sent.shape[:2]
        packed_out = wire.pack_residues(sent.reshape(rb_count * o_total, len(c.primes), -1), c.bits)
        packed_out = packed_out.reshape(rb_count, o_total, c.output_payload_len(blk))
        results, start = [], 0
        for m, o_count in enumerate(prepared.encoded(self, blk).out_blocks):
            member = []
            for rb in range(rb_count):
                for ob in range(o_count):
                    h = wire.OutputHeader(c.context_id, first.call_id, first.rows, blk.rows_per_ct, blk.in_per_ct,
                                          blk.out_per_ct, m, rb * o_count + ob, rb_count * o_count)
                    member.append(wire.encode_output(h, packed_out[rb, start + ob].tobytes()))
            results.append(member)
            start += o_count
        return results


class PreparedGroup:
    """Quantised weights of one group, [ΣO, d_in] integer-valued float64 (members stacked in order), plus
    their encodings per blocking (see layout.plan; cached)."""

    def __init__(self, shape: GroupShape, weights: torch.Tensor):
        self.shape, self.weights = shape, weights
        self.cache: dict[Blocking, EncodedWeights] = {}

    @property
    def nbytes(self) -> int:
        """Memory held: the quantised weights and every cached encoding (bytes)."""
        total = self.weights.element_size() * self.weights.nelement()
        for enc in self.cache.values():
            for t in (enc.fft_spectra, enc.ntt_transforms):
                if t is not None:
                    total += t.element_size() * t.nelement()
        return total

    @property
    def weight_ints(self) -> list[torch.Tensor]:
        """Per-member views [d_out, d_in] of :attr:`weights`."""
        return list(torch.split(self.weights, list(self.shape.d_outs)))

    def encoded(self, ev: NativeEvaluator, blk: Blocking) -> EncodedWeights:
        if blk not in self.cache:
            self.cache[blk] = encode_weights(blk, self.weight_ints, self.shape.d_in, ev._codec.primes, ev.polymul)
        return self.cache[blk]


ROW_BLOCKS_PER_KERNEL_CALL = 4
ROWS_PER_FFT_CALL = 64  # a 512-token prompt on a 3072-wide layer would be ~19k one-row ciphertexts in one call


class NativeBackend:
    """Registry entry ``"native"``: tensor-kernel CKKS (PyTorch; CPU or CUDA). Its replies are exact functions of
    public data, verified exactly in the TEE (:meth:`NativeTrustedContext.verify`)."""

    name = "native"
    default_params = DEFAULT_PARAMS
    verification: Literal["exact", "tolerance"] = "exact"

    def check_params(self, params: CKKSParams) -> None:
        """Raise ValueError unless this backend can run ``params`` (NTT-friendly primes of <= 31 bits)."""
        _chain(params)

    def keygen(self, params: CKKSParams | None, shapes: Sequence[GroupShape] = ()) -> NativeTrustedContext:
        return NativeTrustedContext(params or DEFAULT_PARAMS)

    def evaluator(self, public_context: bytes, device: str | None = None, polymul: str | None = None) -> NativeEvaluator:
        return NativeEvaluator(public_context, device=device, polymul=polymul)

    def rows_per_call(self, params: CKKSParams, shape: GroupShape, rows: int) -> int:
        """``ROWS_PER_FFT_CALL`` whatever the shape and rows (bounds one request's size and the worker's working
        memory); the trusted engine splits prompts by it, the estimator predicts with it."""
        _chain(params)
        return ROWS_PER_FFT_CALL

    def max_output_bytes(self, params: CKKSParams, shape: GroupShape, rows: int) -> int:
        return _Codec(params, _chain(params), bytes(wire.CONTEXT_ID_BYTES)).call_bytes(shape, rows)[1]

    def quantized_weights(self, params: CKKSParams, w: np.ndarray) -> tuple[np.ndarray, float]:
        return quantize(weight_bits(params, _chain(params)), w)

    def call_bytes(self, params: CKKSParams, shape: GroupShape, rows: int) -> tuple[int, int]:
        """Exact (input, output) wire bytes of an honest call of ``rows`` rows (the estimator predicts with it)."""
        return _Codec(params, _chain(params), bytes(wire.CONTEXT_ID_BYTES)).call_bytes(shape, rows)
