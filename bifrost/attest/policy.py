"""Verification policy: what a client accepts, loaded from YAML into a validated frozen dataclass.

An empty allow-list means "not pinned": the check is skipped and the verdict lists it under
``checks_skipped``. The default policy refuses simulated evidence and debug guests, and accepts
only VMPL 0 (SEV-SNP) and TCB status ``UpToDate`` (TDX).

YAML layout (every key optional; unknown keys are an error)::

    allow_simulated: false
    allow_debug: false
    model_digests: [<64 hex>]            # SHA-256 model digests (bifrost.attest.binding)
    serving_config_digests: [<64 hex>]
    simulated_public_keys: [<64 hex>]    # Ed25519 raw public keys trusted for simulated evidence
    snp:
      allowed_vmpls: [0]
      measurements: [<96 hex>]
      host_data: [<64 hex>]
      min_tcb: {bootloader: 0, tee: 0, snp: 0, microcode: 0, fmc: 0}
      allow_masked_chip_id: false        # accept VCEK reports whose CHIP_ID is zeroed (MASK_CHIP_ID)
    tdx:
      allowed_tcb_statuses: [UpToDate]
      mrtd: [<96 hex>]
      rtmr0: [<96 hex>]   # likewise rtmr1, rtmr2, rtmr3
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from .errors import PolicyConfigError

TDX_TCB_STATUSES = (
    "UpToDate",
    "SWHardeningNeeded",
    "ConfigurationNeeded",
    "ConfigurationAndSWHardeningNeeded",
    "OutOfDate",
    "OutOfDateConfigurationNeeded",
    "Revoked",
)
SNP_TCB_COMPONENTS = ("bootloader", "tee", "snp", "microcode", "fmc")


@dataclass(frozen=True)
class SnpPolicy:
    """SEV-SNP rules. Digests are raw bytes (measurement 48, host_data 32). ``allow_masked_chip_id``:
    accept VCEK-signed reports whose CHIP_ID is all zero (no check that the VCEK is this chip's)."""

    allowed_vmpls: tuple[int, ...] = (0,)
    measurements: tuple[bytes, ...] = ()
    host_data: tuple[bytes, ...] = ()
    min_tcb: Mapping[str, int] = field(default_factory=dict)
    allow_masked_chip_id: bool = False


@dataclass(frozen=True)
class TdxPolicy:
    """TDX rules. ``rtmrs[i]`` is the allow-list for RTMR i (48-byte values)."""

    allowed_tcb_statuses: tuple[str, ...] = ("UpToDate",)
    mrtd: tuple[bytes, ...] = ()
    rtmrs: tuple[tuple[bytes, ...], ...] = ((), (), (), ())


@dataclass(frozen=True)
class AttestationPolicy:
    """Everything the verifier enforces beyond cryptographic authenticity."""

    allow_simulated: bool = False
    allow_debug: bool = False
    model_digests: tuple[bytes, ...] = ()
    serving_config_digests: tuple[bytes, ...] = ()
    simulated_public_keys: tuple[bytes, ...] = ()
    snp: SnpPolicy = field(default_factory=SnpPolicy)
    tdx: TdxPolicy = field(default_factory=TdxPolicy)


DEFAULT_POLICY = AttestationPolicy()


def _check_keys(section: str, data: Any, allowed: set[str]) -> Mapping[str, Any]:
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise PolicyConfigError("policy_format", f"{section or 'policy'} must be a mapping")
    unknown = sorted(str(k) for k in data if k not in allowed)
    if unknown:
        where = f" in {section}" if section else ""
        raise PolicyConfigError(
            "policy_unknown_key", f"unknown key(s) {', '.join(unknown)}{where}; allowed: {', '.join(sorted(allowed))}"
        )
    return data


def _bool(name: str, value: Any, default: bool) -> bool:
    if value is None:
        return default
    if not isinstance(value, bool):
        raise PolicyConfigError("policy_type", f"{name} must be true or false")
    return value


def _hex_list(name: str, value: Any, size: int) -> tuple[bytes, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise PolicyConfigError("policy_type", f"{name} must be a list of hex strings")
    out = []
    for item in value:
        if not isinstance(item, str):
            raise PolicyConfigError("policy_type", f"{name} entries must be hex strings (quote them in YAML)")
        try:
            raw = bytes.fromhex(item)
        except ValueError:
            raise PolicyConfigError("policy_hex", f"{name}: {item!r} is not hex") from None
        if len(raw) != size:
            raise PolicyConfigError("policy_hex", f"{name}: expected {size} bytes, got {len(raw)}")
        out.append(raw)
    return tuple(out)


def _int_list(name: str, value: Any, default: tuple[int, ...]) -> tuple[int, ...]:
    if value is None:
        return default
    if not isinstance(value, list) or not all(type(v) is int and v >= 0 for v in value):
        raise PolicyConfigError("policy_type", f"{name} must be a list of non-negative integers")
    return tuple(value)


def policy_from_mapping(data: Any) -> AttestationPolicy:
    """Validate a parsed YAML/JSON mapping into an :class:`AttestationPolicy`."""
    top = _check_keys(
        "",
        data,
        {"allow_simulated", "allow_debug", "model_digests", "serving_config_digests", "simulated_public_keys", "snp", "tdx"},
    )
    snp_raw = _check_keys("snp", top.get("snp"), {"allowed_vmpls", "measurements", "host_data", "min_tcb", "allow_masked_chip_id"})
    min_tcb_raw = _check_keys("snp.min_tcb", snp_raw.get("min_tcb"), set(SNP_TCB_COMPONENTS))
    for key, value in min_tcb_raw.items():
        if type(value) is not int or not 0 <= value <= 255:
            raise PolicyConfigError("policy_type", f"snp.min_tcb.{key} must be an integer 0..255")
    tdx_raw = _check_keys(
        "tdx", top.get("tdx"), {"allowed_tcb_statuses", "mrtd", "rtmr0", "rtmr1", "rtmr2", "rtmr3"}
    )
    statuses = tdx_raw.get("allowed_tcb_statuses", ["UpToDate"])
    if not isinstance(statuses, list) or any(s not in TDX_TCB_STATUSES for s in statuses):
        raise PolicyConfigError("policy_type", f"tdx.allowed_tcb_statuses must be a list drawn from {', '.join(TDX_TCB_STATUSES)}")
    return AttestationPolicy(
        allow_simulated=_bool("allow_simulated", top.get("allow_simulated"), False),
        allow_debug=_bool("allow_debug", top.get("allow_debug"), False),
        model_digests=_hex_list("model_digests", top.get("model_digests"), 32),
        serving_config_digests=_hex_list("serving_config_digests", top.get("serving_config_digests"), 32),
        simulated_public_keys=_hex_list("simulated_public_keys", top.get("simulated_public_keys"), 32),
        snp=SnpPolicy(
            allowed_vmpls=_int_list("snp.allowed_vmpls", snp_raw.get("allowed_vmpls"), (0,)),
            measurements=_hex_list("snp.measurements", snp_raw.get("measurements"), 48),
            host_data=_hex_list("snp.host_data", snp_raw.get("host_data"), 32),
            min_tcb=dict(min_tcb_raw),
            allow_masked_chip_id=_bool("snp.allow_masked_chip_id", snp_raw.get("allow_masked_chip_id"), False),
        ),
        tdx=TdxPolicy(
            allowed_tcb_statuses=tuple(statuses),
            mrtd=_hex_list("tdx.mrtd", tdx_raw.get("mrtd"), 48),
            rtmrs=tuple(_hex_list(f"tdx.rtmr{i}", tdx_raw.get(f"rtmr{i}"), 48) for i in range(4)),
        ),
    )


def load_policy(path: str | Path) -> AttestationPolicy:
    """Read a YAML policy file. Raises :class:`PolicyConfigError` on any problem (never a traceback)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise PolicyConfigError("policy_read", f"cannot read {path}: {exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise PolicyConfigError("policy_yaml", f"{path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    return policy_from_mapping({} if data is None else data)
