"""The CKKS backend interface: two small Protocols, one per trust domain, and a registry.

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

from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence, runtime_checkable

import numpy as np

from .params import CKKSParams


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


@dataclass
class EncryptedBatch:
    """Ciphertexts of one encrypted input batch plus what decryption needs to know."""

    ciphertexts: list[bytes]
    rows: int


@runtime_checkable
class TrustedContext(Protocol):
    """Key holder; exists only inside the trusted runtime."""

    params: CKKSParams

    def public_context(self) -> bytes:
        """Serialized parameters + evaluation keys. Never contains the secret key."""

    def encrypt(self, shape: GroupShape, x: np.ndarray) -> EncryptedBatch:
        """Encrypt ``x`` (rows × d_in, float64) in the packing the backend uses for ``shape``."""

    def decrypt(self, shape: GroupShape, outputs: Sequence[Sequence[bytes]], rows: int) -> list[np.ndarray]:
        """Decrypt one ciphertext list per group member into (rows × d_out) float64 arrays."""


@runtime_checkable
class Evaluator(Protocol):
    """Untrusted side: holds public context only."""

    params: CKKSParams

    def prepare(self, shape: GroupShape, weights: Sequence[np.ndarray]) -> Any:
        """Encode plaintext weights (each d_out × d_in) for ``shape``.

        The result depends only on public parameters and the weights, so the worker caches it and shares
        it between sessions whose ``params`` are equal.
        """

    def apply(self, prepared: Any, ciphertexts: Sequence[bytes]) -> list[list[bytes]]:
        """Evaluate the group on encrypted input; returns one ciphertext list per member.

        Raises :class:`CiphertextError` on malformed/foreign ciphertexts or wrong counts.

        Optional extension ``apply_many(prepared, [(evaluator, ciphertexts), ...])``: the same group for
        several inputs (of sessions with equal ``params``) in one pass; see :func:`apply_many`.
        """


def apply_many(prepared: Any, items: Sequence[tuple[Evaluator, Sequence[bytes]]]) -> list[list[list[bytes]]]:
    """``[ev.apply(prepared, cts) for ev, cts in items]``, in one pass when the backend can batch.

    All evaluators must share parameters (``prepared`` was encoded for them).
    """
    first = items[0][0]
    batched = getattr(first, "apply_many", None)
    if batched is not None:
        return batched(prepared, items)
    return [ev.apply(prepared, cts) for ev, cts in items]


@runtime_checkable
class CKKSBackend(Protocol):
    """A CKKS implementation. ``name`` is its registry key; ``default_params`` its recommended
    128-bit parameter set (used when a run config does not name parameters)."""

    name: str
    default_params: CKKSParams

    def check_params(self, params: CKKSParams) -> None:
        """Raise ValueError unless this backend can run ``params`` (beyond the 128-bit rule)."""

    def keygen(self, params: CKKSParams, shapes: Sequence[GroupShape]) -> TrustedContext:
        """Generate keys inside the TEE for evaluating ``shapes`` (e.g. the rotation keys they need)."""

    def evaluator(self, public_context: bytes) -> Evaluator:
        """Build the worker-side evaluator; raises SecretKeyInPublicContextError if a secret key is present."""


_REGISTRY: dict[str, Callable[[], CKKSBackend]] = {}


def register_backend(name: str, factory: Callable[[], CKKSBackend]) -> None:
    """Register ``factory`` under ``name`` (lazy: the factory imports its heavy dependencies)."""
    _REGISTRY[name] = factory


def get_backend(name: str) -> CKKSBackend:
    """Return the backend registered as ``name``; ValueError lists the known names otherwise."""
    _register_builtin()
    try:
        factory = _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown CKKS backend {name!r}; known: {sorted(_REGISTRY)}") from None
    return factory()


def available_backends() -> list[str]:
    _register_builtin()
    return sorted(_REGISTRY)


def _register_builtin() -> None:
    if "tenseal" not in _REGISTRY:
        def _tenseal() -> CKKSBackend:
            from .tenseal_backend import TenSEALBackend

            return TenSEALBackend()

        register_backend("tenseal", _tenseal)
    try:  # native tensor kernels (kernels/ -> bifrost_kernels) register themselves when present
        import bifrost_kernels  # noqa: F401
    except ImportError:
        pass
