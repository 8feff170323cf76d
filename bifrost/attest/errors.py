"""Typed attestation errors. Every parse or verify path raises one of these, never a bare exception.

Each error carries ``check``: a short stable identifier of the check that failed (for example
``"report_signature"``, ``"pck_chain"``, ``"no_matching_tcb_level"``), so callers and tests can tell
*which* check refused the evidence without parsing the message.

In the error taxonomy (:mod:`bifrost.errors`) they are subclasses of :class:`~bifrost.errors.RefusedError`
(authentic or not, the evidence is refused by policy: CLI exit 1, gRPC PERMISSION_DENIED), except a malformed policy
*file* (:class:`PolicyConfigError`), which is a :class:`~bifrost.errors.UserError` too (exit 2).
"""

from __future__ import annotations

from ..errors import RefusedError, UserError


class AttestationError(RefusedError):
    """Base class. ``check`` names the failed check; the message says what was expected."""

    exit_code = 1

    def __init__(self, check: str, detail: str = "") -> None:
        self.check = check
        self.detail = detail
        super().__init__(f"{check}: {detail}" if detail else check)


class EvidenceFormatError(AttestationError):
    """Evidence bytes are malformed: wrong length, truncated, unknown version or field value."""


class UnsupportedEvidenceError(AttestationError):
    """Well-formed evidence of a kind this verifier does not support (key type, TEE type...)."""


class CertificateChainError(AttestationError):
    """A certificate is unparsable, outside its validity window, revoked, not issued by its
    parent, or the chain does not end at a pinned trust anchor."""


class SignatureError(AttestationError):
    """A signature over the evidence (report, quote, QE report) or a key binding does not verify."""


class EndorsementMismatchError(AttestationError):
    """The endorsement key does not belong to this evidence (chip ID, product, signer kind)."""


class CollateralError(AttestationError):
    """TDX collateral (TCB info, QE identity, CRLs) is malformed, badly signed, stale, or for another platform."""


class TcbError(AttestationError):
    """The TCB is not acceptable: no matching TCB level, TCB fields disagree with the endorsement
    key, below the policy minimum, or a TCB status the policy does not allow."""


class PolicyViolationError(AttestationError):
    """Authentic evidence that the policy refuses: debug, VMPL, measurement, host data, simulated."""


class BindingError(PolicyViolationError):
    """report_data does not equal the expected binding (channel key, nonce, model, serving config)."""


class PolicyConfigError(AttestationError, UserError):
    """A policy file is malformed: unknown key, wrong type, bad hex length (bad input: a user error)."""

    exit_code = 2


class ProviderError(AttestationError):
    """An evidence provider is unavailable or its interface misbehaved (configfs-tsm protocol)."""


class ModelDigestError(AttestationError):
    """The model checkpoint cannot be digested (missing path, unreadable file, no files)."""


class ChannelError(AttestationError):
    """Attested channel failure: bad handshake, bad record, tampered ciphertext. A bad record closes a
    client channel; a server channel refuses it and stays as it was (see :mod:`.channel`)."""


class ReplayError(ChannelError):
    """A record or request arrived out of order or twice."""


class ChannelClosedError(ChannelError):
    """The channel was closed (after a failure or explicitly); no further records are processed."""


class TokenError(AttestationError):
    """An attestation token is malformed, badly signed, expired, replayed or bound elsewhere."""


class TokenExpiredError(TokenError):
    """The token is outside its validity window: the client must re-attest."""


class TokenSignatureError(TokenError):
    """The token is not signed by a trusted attestation service key."""


class TokenReplayError(TokenError):
    """A request ID was already used with this token, or the token is bound to another session."""
