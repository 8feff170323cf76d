"""CKKS backends: interface, parameter security rule, registry."""

from .backend import (
    CiphertextError,
    CKKSBackend,
    EncryptedBatch,
    Evaluator,
    GroupShape,
    SecretKeyInPublicContextError,
    TrustedContext,
    apply_many,
    available_backends,
    get_backend,
    register_backend,
)
from .params import CKKSParams, InsecureParametersError, check_128_bit_security

__all__ = [
    "CKKSBackend", "CKKSParams", "CiphertextError", "EncryptedBatch", "Evaluator", "GroupShape",
    "InsecureParametersError", "SecretKeyInPublicContextError", "TrustedContext", "apply_many", "available_backends",
    "check_128_bit_security", "get_backend", "register_backend",
]
