"""Evidence providers (registry: ``auto``, ``tdx``, ``sev-snp``, ``simulated``) and the simulated verifier.

Real providers use Linux configfs-tsm (``/sys/kernel/config/tsm/report``): create an entry
directory, write the 64-byte report_data to ``inblob``, read ``outblob`` (the report/quote),
``auxblob`` (SEV-SNP certificate table, optional) and ``provider`` (``tdx_guest``/``sev_guest``).
``generation`` is read after the write and again after reading ``outblob``; a difference means
another writer raced us and the evidence is discarded.

``auto`` (:func:`auto_provider`) asks configfs-tsm which TEE this guest is (the ``provider``
attribute of a report entry) and returns the ``tdx`` or ``sev-snp`` provider; without configfs-tsm
it fails with :class:`ProviderError`. It never falls back to ``simulated``: simulated evidence is
produced only when ``simulated`` is configured by name.

The simulated provider signs with a process-local Ed25519 key. Its evidence is refused by the
default policy and accepted only with ``allow_simulated: true``; its verdict says SIMULATED.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import struct
import time
from datetime import datetime
from pathlib import Path
from typing import Callable, Iterator, Protocol

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from .checks import CheckLog, check_allow_list, check_debug, check_report_data
from .errors import EvidenceFormatError, PolicyViolationError, ProviderError, SignatureError
from .options import DEFAULT_OPTIONS, VerifyOptions
from .policy import AttestationPolicy
from .snp.parse import parse_cert_table
from .types import Evidence, Verdict

CONFIGFS_TSM_REPORT_ROOT = Path("/sys/kernel/config/tsm/report")
REPORT_DATA_SIZE = 64
_KERNEL_PROVIDERS = {"tdx_guest": "tdx", "sev_guest": "sev-snp"}


class EvidenceProvider(Protocol):
    """Produces evidence whose report_data is the given 64 bytes."""

    name: str

    def is_available(self) -> bool: ...

    def get_evidence(self, report_data: bytes) -> Evidence: ...


class ConfigfsTsmProvider:
    """configfs-tsm report provider for one evidence type (``tdx`` or ``sev-snp``).

    ``root`` is configurable for tests. ``entry_name``: use (and keep) an existing entry of that
    name; otherwise a fresh uniquely named entry is created and removed afterwards.
    """

    def __init__(self, evidence_type: str, root: Path | str = CONFIGFS_TSM_REPORT_ROOT, entry_name: str | None = None):
        if evidence_type not in _KERNEL_PROVIDERS.values():
            raise ProviderError("provider", f"configfs-tsm cannot produce {evidence_type!r} evidence")
        self.name = evidence_type
        self.root = Path(root)
        self.entry_name = entry_name

    def is_available(self) -> bool:
        return _tsm_available(self.root)

    def get_evidence(self, report_data: bytes) -> Evidence:
        if len(report_data) != REPORT_DATA_SIZE:
            raise ProviderError("report_data", f"report_data must be {REPORT_DATA_SIZE} bytes, got {len(report_data)}")
        if not self.is_available():
            raise ProviderError("provider_unavailable", f"configfs-tsm not available at {self.root}")
        try:
            with _tsm_entry(self.root, self.entry_name, "bifrost") as entry:
                kernel_provider = _read_text(entry / "provider")
                if _KERNEL_PROVIDERS.get(kernel_provider) != self.name:
                    raise ProviderError("provider_mismatch", f"configfs-tsm provider is {kernel_provider!r}, wanted {self.name}")
                (entry / "inblob").write_bytes(report_data)
                generation = _read_text(entry / "generation")
                outblob = (entry / "outblob").read_bytes()
                aux_path = entry / "auxblob"
                auxblob = aux_path.read_bytes() if aux_path.exists() else b""
                if _read_text(entry / "generation") != generation:
                    raise ProviderError("generation", "configfs-tsm entry was rewritten concurrently; retry")
        except OSError as exc:
            raise ProviderError("configfs_io", f"configfs-tsm I/O failed under {self.root}: {exc.strerror or exc}") from None
        if not outblob:
            raise ProviderError("outblob", "configfs-tsm returned an empty outblob")
        endorsements: dict[str, bytes] = {}
        if self.name == "sev-snp" and auxblob:
            endorsements.update(parse_cert_table(auxblob))
        return Evidence(self.name, outblob, endorsements)


def _read_text(path: Path) -> str:
    return path.read_bytes().decode("ascii", errors="replace").strip()


def _tsm_available(root: Path) -> bool:
    """configfs-tsm is usable here: its report folder exists and we may create entries in it."""
    return root.is_dir() and os.access(root, os.W_OK)


@contextlib.contextmanager
def _tsm_entry(root: Path, entry_name: str | None, prefix: str) -> Iterator[Path]:
    """A configfs-tsm report entry: ``root/entry_name`` (reused if it exists) or a fresh uniquely
    named one. An entry created here is removed on exit (best effort: the kernel frees its state
    with the directory). OSError propagates to the caller."""
    entry = root / (entry_name or f"{prefix}-{secrets.token_hex(8)}")
    created = False
    try:
        try:
            entry.mkdir()
            created = True
        except FileExistsError:
            if entry_name is None:
                raise
        yield entry
    finally:
        if created:
            try:
                entry.rmdir()
            except OSError:
                pass


def detect_tsm_evidence_type(root: Path | str = CONFIGFS_TSM_REPORT_ROOT, entry_name: str | None = None) -> str:
    """The evidence type (``tdx``/``sev-snp``) this guest's configfs-tsm produces.

    Reads ``provider`` from the entry ``entry_name`` if given, else from a fresh probe entry that is
    removed again. Raises :class:`ProviderError` when configfs-tsm is absent, unreadable, or names
    a provider Bifrost cannot verify.
    """
    root = Path(root)
    if not _tsm_available(root):
        raise ProviderError(
            "provider_unavailable",
            f"evidence provider 'auto': no writable configfs-tsm at {root} (not a TDX/SEV-SNP guest, or "
            "configfs not mounted); for development configure evidence_provider: simulated explicitly",
        )
    try:
        with _tsm_entry(root, entry_name, "bifrost-probe") as entry:
            kernel_provider = _read_text(entry / "provider")
    except OSError as exc:
        raise ProviderError("configfs_io", f"cannot read the configfs-tsm provider under {root}: {exc.strerror or exc}") from None
    evidence_type = _KERNEL_PROVIDERS.get(kernel_provider)
    if evidence_type is None:
        raise ProviderError(
            "provider_unknown", f"configfs-tsm provider {kernel_provider!r} is not one of {', '.join(sorted(_KERNEL_PROVIDERS))}"
        )
    return evidence_type


def auto_provider(root: Path | str = CONFIGFS_TSM_REPORT_ROOT, entry_name: str | None = None) -> ConfigfsTsmProvider:
    """The configfs-tsm provider for this guest's TEE (see :func:`detect_tsm_evidence_type`)."""
    return ConfigfsTsmProvider(detect_tsm_evidence_type(root, entry_name), root=root, entry_name=entry_name)


# --------------------------------------------------------------------------- simulated

SIMULATED_MAGIC = b"BIFROST-SIMULATED-EVIDENCE-v1\x00"
_ED25519_PUB = 32
_ED25519_SIG = 64


class SimulatedProvider:
    """Development provider: Ed25519-signed evidence, NOT a TEE. Key is generated per instance
    (OS randomness) unless given. ``measurement`` (48 bytes) stands in for a launch measurement."""

    name = "simulated"

    def __init__(self, signing_key: Ed25519PrivateKey | None = None, measurement: bytes = bytes(48), debug: bool = False):
        if len(measurement) != 48:
            raise ProviderError("measurement", "simulated measurement must be 48 bytes")
        self._key = signing_key or Ed25519PrivateKey.generate()
        self.measurement = measurement
        self.debug = debug

    @property
    def public_key_bytes(self) -> bytes:
        from cryptography.hazmat.primitives import serialization

        return self._key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)

    def is_available(self) -> bool:
        return True

    def get_evidence(self, report_data: bytes) -> Evidence:
        if len(report_data) != REPORT_DATA_SIZE:
            raise ProviderError("report_data", f"report_data must be {REPORT_DATA_SIZE} bytes")
        body = json.dumps(
            {
                "measurement": self.measurement.hex(),
                "report_data": report_data.hex(),
                "debug": self.debug,
                "issued_at": int(time.time()),
            },
            sort_keys=True,
        ).encode()
        signed = SIMULATED_MAGIC + self.public_key_bytes + struct.pack(">I", len(body)) + body
        return Evidence("simulated", signed + self._key.sign(signed))


class SimulatedVerifier:
    """Verifies simulated evidence; refuses it unless ``policy.allow_simulated``."""

    evidence_type = "simulated"

    def __init__(self, options: VerifyOptions | None = None) -> None:
        self.options = options or DEFAULT_OPTIONS

    def verify(
        self, evidence: Evidence, policy: AttestationPolicy, *, at: datetime | None = None, expected_report_data: bytes | None = None
    ) -> Verdict:
        at = self.options.time(at)
        if not policy.allow_simulated:
            raise PolicyViolationError("simulated", "simulated evidence is refused by this policy (allow_simulated: false)")
        raw = evidence.raw
        head = len(SIMULATED_MAGIC) + _ED25519_PUB + 4
        if len(raw) < head + _ED25519_SIG or not raw.startswith(SIMULATED_MAGIC):
            raise EvidenceFormatError("simulated_format", "not simulated evidence or truncated")
        pub = raw[len(SIMULATED_MAGIC) : len(SIMULATED_MAGIC) + _ED25519_PUB]
        (body_len,) = struct.unpack(">I", raw[head - 4 : head])
        if len(raw) != head + body_len + _ED25519_SIG:
            raise EvidenceFormatError("simulated_format", "simulated evidence has the wrong length")
        signed, signature = raw[: head + body_len], raw[head + body_len :]
        try:
            Ed25519PublicKey.from_public_bytes(pub).verify(signature, signed)
        except (InvalidSignature, ValueError):
            raise SignatureError("simulated_signature", "simulated evidence signature does not verify") from None
        log = CheckLog()
        log.ok("simulated_format", "simulated_signature")
        check_allow_list("simulated_signer", pub, policy.simulated_public_keys, log)
        try:
            body = json.loads(raw[head : head + body_len])
            measurement = bytes.fromhex(body["measurement"])
            report_data = bytes.fromhex(body["report_data"])
            debug = body["debug"]
        except (ValueError, KeyError, TypeError):
            raise EvidenceFormatError("simulated_format", "simulated evidence body is malformed") from None
        if len(measurement) != 48 or len(report_data) != 64 or not isinstance(debug, bool):
            raise EvidenceFormatError("simulated_format", "simulated evidence body has wrong field sizes")
        check_debug(debug, policy.allow_debug, "simulated evidence claims debug; the policy refuses debug", log)
        check_report_data(report_data, expected_report_data, log)
        return Verdict(
            evidence_type="simulated",
            measurement=measurement,
            report_data=report_data,
            debug=debug,
            tcb_status="SIMULATED (no hardware TCB)",
            tcb={"hardware": "none (simulated)"},
            fields={"signer_public_key": pub.hex(), "WARNING": "SIMULATED: not a TEE, no confidentiality"},
            verified_at=at,
            checks_passed=tuple(log.passed),
            checks_skipped=tuple(log.skipped),
            simulated=True,
        )


# --------------------------------------------------------------------------- provider registry

_PROVIDERS: dict[str, Callable[[], EvidenceProvider]] = {
    "auto": auto_provider,
    "tdx": lambda: ConfigfsTsmProvider("tdx"),
    "sev-snp": lambda: ConfigfsTsmProvider("sev-snp"),
    "simulated": SimulatedProvider,
}


def get_provider(name: str) -> EvidenceProvider:
    try:
        return _PROVIDERS[name]()
    except KeyError:
        raise ProviderError("provider", f"unknown evidence provider {name!r}; known: {', '.join(sorted(_PROVIDERS))}") from None


def provider_names() -> tuple[str, ...]:
    return tuple(sorted(_PROVIDERS))
