"""What the leak tests look for: a trusted context's secret-key material, read from outside the production class.

The production key holders keep no test-only path to their secrets. The native backend draws a fresh secret per
call and keeps it only in that call's private record (``EncryptedBatch.state.secrets``, which decryption needs);
:func:`record_secrets` wraps one context's ``encrypt`` (on the instance, in the test) to collect those records.
TenSEAL's long-lived secret key is the SEAL key the context decrypts with (``_secret_key``).
"""

from __future__ import annotations

import numpy as np


def record_secrets(context) -> list[np.ndarray]:
    """Record the secrets of every later ``context.encrypt`` call: a list that grows by one [row blocks, N] array
    per native call (a TenSEAL call has no per-call secret: nothing is recorded). Wraps ``encrypt`` on this
    instance only."""
    log: list[np.ndarray] = []
    encrypt = context.encrypt

    def recording(*args, **kwargs):
        batch = encrypt(*args, **kwargs)
        secrets = getattr(batch.state, "secrets", None)
        if secrets is not None:
            log.append(secrets)
        return batch

    context.encrypt = recording
    return log


def native_secret_words(primes, secrets: list[np.ndarray]) -> bytes:
    """The secrets in every encoding a leak could take: int8, int64 and residues mod each prime."""
    if not secrets:
        return b""
    s = np.concatenate(secrets).astype(np.int64)
    residues = [np.mod(s, q).astype("<u8").tobytes() for q in primes]
    return s.astype("i1").tobytes() + s.astype("<i8").tobytes() + b"".join(residues)


def tenseal_secret_words(context) -> bytes:
    """The raw words of a TenSEAL trusted context's secret key."""
    sk = context._secret_key.data()
    return np.array([sk.data(i) for i in range(sk.coeff_count())], dtype="<u8").tobytes()


def secret_key_words(context, recorded: list[np.ndarray] | None = None) -> bytes:
    """``context``'s secret-key words: TenSEAL's key, or (native) the secrets ``recorded`` by :func:`record_secrets`."""
    if hasattr(context, "_secret_key"):
        return tenseal_secret_words(context)
    return native_secret_words(context._codec.primes, recorded or [])
