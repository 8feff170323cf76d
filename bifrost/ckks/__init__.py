"""CKKS backends: interface, parameter security rule, registry."""

from .backend import (
    CiphertextError,
    CKKSBackend,
    EncryptedBatch,
    Evaluator,
    ExactTrustedContext,
    GroupShape,
    SecretKeyInPublicContextError,
    TrustedContext,
    WeightStats,
    available_backends,
    get_backend,
    register_backend,
    row_bucket,
)
from .params import CKKSParams, InsecureParametersError, check_128_bit_security

__all__ = [
    "CKKSBackend", "CKKSParams", "CiphertextError", "EncryptedBatch", "Evaluator", "ExactTrustedContext", "GroupShape",
    "InsecureParametersError", "SecretKeyInPublicContextError", "TrustedContext", "available_backends",
    "WeightStats", "check_128_bit_security", "get_backend", "register_backend", "row_bucket",
]
