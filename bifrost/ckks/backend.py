"""The CKKS backend interface: two small Protocols, one per trust domain (the table of backends is in
:mod:`.registry`).

A delegated linear layer computes ``y = x @ W.T`` for a batch of rows ``x`` (rows × d_in) that only
the trusted runtime can read. Layers that read the same input (e.g. q/k/v projections) form a
:class:`GroupShape` and share one encrypted input.

- :class:`TrustedContext` lives inside the TEE. It owns the secret key, encrypts inputs and decrypts
  outputs, and exports a *public* context (parameters + evaluation keys, never the secret key).
- :class:`Evaluator` runs on the untrusted worker. It is built from public-context bytes only,
  encodes plaintext weights once (``prepare``) and evaluates plaintext-weight × ciphertext products.

Everything that crosses between them is ``bytes``; a backend chooses its own packing, which must be a
deterministic function of public values (parameters and shapes) so both sides agree on it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol, Sequence, runtime_checkable

import numpy as np

from .params import CKKSParams

if TYPE_CHECKING:
    from typing_extensions import Self


class CiphertextError(ValueError):
    """A ciphertext or public context is malformed, truncated, or belongs to another context."""


class SecretKeyInPublicContextError(CiphertextError):
    """Public-context bytes that carry a secret key were offered to the untrusted side."""


@dataclass(frozen=True)
class GroupShape:
    """Shapes of the linear layers that share one input: all have ``d_in`` columns."""

    d_in: int
    d_outs: tuple[int, ...]

    def __post_init__(self) -> None:
        if self.d_in <= 0 or not self.d_outs or any(d <= 0 for d in self.d_outs):
            raise ValueError(f"invalid group shape {self}")


@dataclass(frozen=True)
class WeightStats:
    """What the trusted side knows of one plaintext weight matrix W (d_out × d_in) from its own copy:
    ``peak`` = max|W| and ``row_l1`` = max_k Σ_j |W[k, j]|, and ``matrix``, that copy itself (any float dtype;
    None where only the statistics are known). Decoding scales, error bounds and decryption come from these,
    never from anything a worker sends."""

    peak: float
    row_l1: float
    matrix: np.ndarray | None = field(default=None, compare=False, repr=False)

    @classmethod
    def of(cls, w) -> "WeightStats":
        """The statistics of ``w``, which ``matrix`` then references (not a copy: the caller keeps it alive)."""
        a = np.abs(np.asarray(w, dtype=np.float64))
        if a.ndim != 2 or not a.size:
            raise ValueError("weights must be a non-empty (d_out, d_in) matrix")
        return cls(float(a.max()), float(a.sum(axis=1).max()), np.asarray(w))


@dataclass
class EncryptedBatch:
    """One encrypted input batch. Only ``ciphertexts`` ever leave the trusted runtime; ``state`` is the
    backend's private record of the call (activation scales, the call's identity), kept in trusted memory
    and needed to decrypt and bound the call's outputs."""

    ciphertexts: list[bytes]
    rows: int
    state: Any = None


def row_bucket(rows: int) -> int:
    """Rows a worker call carries for ``rows`` real rows: the next of 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, …
    (powers of two and 1.5 × powers of two). The trusted engine pads with zero rows, so a worker learns a
    prompt's length only to within a factor of 1.5 (and computes at most 50 % more rows)."""
    if rows < 1:
        raise ValueError("rows must be >= 1")
    if rows <= 4:
        return rows
    p = 1 << (rows - 1).bit_length()  # the next power of two
    return p * 3 // 4 if p * 3 // 4 >= rows else p


@runtime_checkable
class TrustedContext(Protocol):
    """Key holder; exists only inside the trusted runtime."""

    params: CKKSParams

    def public_context(self) -> bytes:
        """Serialized parameters + evaluation keys. Never contains the secret key."""

    def prepare(self, shape: GroupShape, weights: Sequence[WeightStats]) -> None:
        """Precompute, from the trusted weights (``WeightStats.of(W)`` per member), what decrypting this group
        needs, so that its first call does not pay for it (native: the products of its public masks with the
        weights). Optional: :meth:`decrypt` does it on first use; a no-op where a backend needs nothing."""

    def encrypt(self, shape: GroupShape, x: np.ndarray, weights: Sequence[WeightStats] | None = None) -> EncryptedBatch:
        """Encrypt ``x`` (rows × d_in, float64) in the packing the backend uses for ``shape``. ``weights``: the
        group's, as :meth:`decrypt` will be given them, when the caller knows them: a backend may start
        preparing the call's decryption (native: its mask term, on a background thread while a worker
        computes); decrypt with other weights still works."""

    def prefetch(self, shape: GroupShape, rows: int) -> None:
        """Start preparing, in the background, the input-independent part of the next :meth:`encrypt` of
        ``rows`` rows of ``shape`` (the caller calls this while a worker computes); that encrypt waits for it
        and uses it once. Where a backend has no such part, a no-op. The preparation's cost is a function of
        public values (shape, rows) only."""

    def decrypt(self, shape: GroupShape, outputs: Sequence[Sequence[bytes]], batch: EncryptedBatch,
                weights: Sequence[WeightStats]) -> list[np.ndarray]:
        """Decrypt the worker's outputs for ``batch`` (one ciphertext list per group member) into
        (rows × d_out) float64 arrays. Scales, levels and layout come from ``batch.state`` and ``weights``
        (the trusted side's statistics and copy of each member's weights; the native backend needs the
        copy), never from the ciphertexts.

        Raises :class:`CiphertextError` when the outputs are not well formed for this call (counts,
        lengths, headers, levels, scales, coefficient ranges). Each such check is a function of the bytes
        received and public values only, so its outcome tells the sender nothing it did not know. Whether
        the decoded values are *right* is for the caller to check (:meth:`error_bound`)."""

    def error_bound(self, shape: GroupShape, batch: EncryptedBatch, weights: Sequence[WeightStats],
                    effective: bool = False) -> np.ndarray:
        """(rows × members) worst-case |ŷ_rk − (x @ W_m.T)_rk| of an honest worker, for every output k
        of row r and member m (units of x·W): the backend's documented error bound. ``effective``: the bound
        on |ŷ − effective_input @ effective_weights.T| instead (no larger; smaller where encoding rounds)."""

    def effective_weights(self, w: np.ndarray) -> np.ndarray:
        """The weights an honest worker effectively multiplies by (after the backend's quantisation), (d_out, d_in)."""

    def effective_input(self, batch: EncryptedBatch) -> np.ndarray:
        """The activations of ``batch`` as encoded (after the backend's rounding), rows × d_in."""


@runtime_checkable
class ExactTrustedContext(TrustedContext, Protocol):
    """The trusted context of a backend whose replies are exact functions of public data
    (``CKKSBackend.verification == "exact"``): every reply can be checked exactly, with no tolerance."""

    def verify(self, shape: GroupShape, outputs: Sequence[Sequence[bytes]], batch: EncryptedBatch,
               weights: Sequence[WeightStats]) -> bool:
        """True when ``outputs`` are the honest reply to ``batch`` (a reply differing in any coefficient passes
        with probability ≤ 2^-64, whatever the plaintext); False otherwise. Raises :class:`CiphertextError`
        for a reply that is not well formed. Its outcome depends on the reply and on secret check vectors only,
        never on the plaintext. Use no value :meth:`decrypt` gives for a reply before it passed: decrypt checks
        a reply's form, not its values."""


@runtime_checkable
class Evaluator(Protocol):
    """Untrusted side: holds public context only."""

    params: CKKSParams

    def prepare(self, shape: GroupShape, weights: Sequence[np.ndarray]) -> Any:
        """Encode plaintext weights (each d_out × d_in) for ``shape``. The result's ``nbytes`` is its
        memory in bytes (the worker's cache budgets it).

        The result depends only on public parameters and the weights, so the worker caches it and shares
        it between worker sessions whose ``params`` are equal.
        """

    def apply(self, prepared: Any, ciphertexts: Sequence[bytes]) -> list[list[bytes]]:
        """Evaluate the group on encrypted input; returns one ciphertext list per member.

        Raises :class:`CiphertextError` on malformed/foreign ciphertexts or wrong counts.
        """

    def apply_many(self, prepared: Any, items: Sequence[tuple[Self, Sequence[bytes]]]) -> list[list[list[bytes]]]:
        """``[ev.apply(prepared, cts) for ev, cts in items]`` for the inputs of several worker sessions (different
        keys) whose evaluators share this one's parameters, in one pass where the backend can."""


@runtime_checkable
class CKKSBackend(Protocol):
    """A CKKS implementation. ``name`` is its key in :data:`.registry.BACKENDS`; ``default_params`` its recommended
    128-bit parameter set (used when a run config does not name parameters)."""

    name: str
    default_params: CKKSParams
    # How the TEE checks this backend's replies, declared here and read by the engine: "exact" (the reply is an
    # exact function of public data; keygen returns an ExactTrustedContext and no tolerance is used) or
    # "tolerance" (decoded products are checked against the backend's error bound, bifrost.tee.verify).
    verification: Literal["exact", "tolerance"]

    def check_params(self, params: CKKSParams) -> None:
        """Raise ValueError unless this backend can run ``params`` (beyond the 128-bit rule)."""

    def keygen(self, params: CKKSParams, shapes: Sequence[GroupShape]) -> TrustedContext:
        """Generate keys inside the TEE for evaluating ``shapes`` (e.g. the rotation keys they need)."""

    def evaluator(self, public_context: bytes) -> Evaluator:
        """Build the worker-side evaluator; raises SecretKeyInPublicContextError if a secret key is present."""

    def rows_per_call(self, params: CKKSParams, shape: GroupShape, rows: int) -> int:
        """How many of ``rows`` rows one worker call carries (bounds a request's size and worker memory);
        the trusted engine splits by it and the estimator predicts with it."""

    def max_output_bytes(self, params: CKKSParams, shape: GroupShape, rows: int) -> int:
        """Upper bound on the bytes of all output ciphertexts of an honest reply to a call of ``rows`` rows
        (a pure function of public values): the trusted side refuses larger replies unread."""

    def call_bytes(self, params: CKKSParams, shape: GroupShape, rows: int) -> tuple[int, int] | None:
        """(request, reply) wire bytes of one honest call of ``rows`` rows, exactly (headers included), or None
        when the backend's sizes vary with the data (the estimator predicts with it)."""

    def quantized_weights(self, params: CKKSParams, w: np.ndarray) -> tuple[np.ndarray, float]:
        """The weights an honest worker multiplies by, as (m, c) with effective W = m / c exactly in float64
        and m in a compact dtype (the trusted side keeps it once per replica for the product check)."""


# --------------------------------------------------------------------------- worker traffic
# One type for what the trusted engine measures (``DelegationEngine.stats.groups``) and what the estimator
# predicts (``bifrost_estimator.model.forward_traffic``); here, beside GroupShape, because the estimator must
# never import ``bifrost.tee``.

@dataclass
class GroupTraffic:
    """Calls, rows sent (padding included), ciphertexts and wire bytes each way of one layer group.

    Mutable: the engine keeps one per group and increments it in place; :meth:`copy` and :meth:`minus` give
    a period's share. ``exact_bytes`` is False only where the bytes are an estimate (the estimator, for a
    backend without exact ciphertext sizes); measured traffic is always exact.
    """

    calls: int = 0
    rows: int = 0  # rows sent, padding included
    cts_in: int = 0
    cts_out: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    exact_bytes: bool = True

    def copy(self) -> GroupTraffic:
        return dataclasses.replace(self)

    def minus(self, other: GroupTraffic) -> GroupTraffic:
        """The counts since ``other`` (an earlier copy of the same accumulator); exact iff both are."""
        return GroupTraffic(**{f: getattr(self, f) - getattr(other, f) for f in TRAFFIC_FIELDS},
                            exact_bytes=self.exact_bytes and other.exact_bytes)


# the counts (everything but ``exact_bytes``): what predicted and measured traffic are compared on
TRAFFIC_FIELDS = tuple(f.name for f in dataclasses.fields(GroupTraffic) if f.name != "exact_bytes")
