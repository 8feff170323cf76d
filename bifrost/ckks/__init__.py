"""CKKS backends: interface, parameter security rule, the table of backends (:mod:`.registry`), and the worker
traffic of a layer group (:class:`GroupTraffic`: measured by the engine, predicted by the estimator)."""

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
from .registry import BACKENDS, available_backends, get_backend

__all__ = [
    "BACKENDS", "CKKSBackend", "CKKSParams", "CiphertextError", "EncryptedBatch", "Evaluator", "ExactTrustedContext", "GroupShape",
    "GroupTraffic", "TRAFFIC_FIELDS",
    "InsecureParametersError", "SecretKeyInPublicContextError", "TrustedContext", "available_backends",
    "WeightStats", "check_128_bit_security", "get_backend", "row_bucket",
]
