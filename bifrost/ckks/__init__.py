"""CKKS backends: interface, parameter security rule, and the worker traffic of a layer group
(:class:`GroupTraffic`: measured by the engine, predicted by the estimator).

The table of backends is :mod:`bifrost.ckks.registry` (``get_backend``, ``available_backends``), imported on
its own: the native backend (``bifrost_kernels``) imports this package, and the table imports it back."""

from .backend import (
    CiphertextError,
    CKKSBackend,
    EncryptedBatch,
    Evaluator,
    ExactTrustedContext,
    GroupShape,
    GroupTraffic,
    TRAFFIC_FIELDS,
    SecretKeyInPublicContextError,
    TrustedContext,
    WeightStats,
    row_bucket,
)
from .params import CKKSParams, InsecureParametersError, check_128_bit_security

__all__ = [
    "CKKSBackend", "CKKSParams", "CiphertextError", "EncryptedBatch", "Evaluator", "ExactTrustedContext", "GroupShape",
    "GroupTraffic", "TRAFFIC_FIELDS",
    "InsecureParametersError", "SecretKeyInPublicContextError", "TrustedContext",
    "WeightStats", "check_128_bit_security", "row_bucket",
]
