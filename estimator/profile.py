"""Hardware profiles: per-operation costs of one deployment (accelerator, TEE CPU, link), as typed YAML.

Every number is seconds per operation, bytes, or a rate. A profile states where its numbers come from
(``source``): measured here by ``bifrost estimate calibrate``, or published figures with citations and a
list of which values are assumptions. Unknown keys, missing keys, wrong types, negative, infinite or NaN
numbers, required costs that are zero, and CKKS parameters no backend can run (N not a power of two in
[1024, 65536], fewer than two primes, primes outside 20..60 bits) are refused with a one-line
:class:`~bifrost.errors.BifrostError` naming the file and the key.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from bifrost.config import CONFIG_DIR
from bifrost.errors import UserError

HARDWARE_DIR = CONFIG_DIR / "hardware"
DEFAULT_PROFILE = "local-2core"
BACKENDS = ("tenseal", "native")


@dataclass(frozen=True)
class Source:
    kind: str  # measured | published | mixed
    description: str
    date: str = ""
    command: str = ""
    citations: tuple[str, ...] = ()
    assumptions: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in ("measured", "published", "mixed"):
            raise ValueError(f"kind must be measured, published or mixed, got {self.kind!r}")


@dataclass(frozen=True)
class CKKSOps:
    """Seconds per homomorphic operation at one parameter set (fresh ciphertext level unless noted)."""

    poly_modulus_degree: int
    coeff_mod_bit_sizes: tuple[int, ...]
    rotate_s: float  # one key switch (rotation by any step with a key for it)
    mul_plain_s: float  # plaintext × ciphertext (plaintext pre-encoded, NTT form)
    add_s: float
    rescale_s: float
    mul_ct_s: float = 0.0  # ciphertext × ciphertext incl. relinearisation (0: not measured)
    bootstrap_s: float = 0.0  # one bootstrap of a full ciphertext (0: none)
    usable_levels: int = 1  # multiplicative levels a fresh / bootstrapped ciphertext offers

    @property
    def slots(self) -> int:
        return self.poly_modulus_degree // 2

    @property
    def levels(self) -> int:
        """Rescales a fresh ciphertext allows: the primes between the first and the special prime."""
        return max(len(self.coeff_mod_bit_sizes) - 2, 1)


@dataclass(frozen=True)
class Accelerator:
    """The untrusted worker device running the delegated CKKS linear layers."""

    name: str
    backend: str  # CKKS backend whose packing is modelled: tenseal (BSGS slots) | native (coefficient blocks)
    linear: CKKSOps  # at the delegated-layer parameters; native: mul_plain_s = one block product, no rotations
    ct_load_s: float  # parse/validate one input ciphertext
    ct_dump_s: float  # serialize one output ciphertext
    call_overhead_s: float  # per delegated call (RPC handler, weight-cache lookup)
    efficiency: float = 1.0  # measured whole-layer time / time composed from the per-op costs (fitted)
    weight_pass_s: float = 0.0  # native: streaming one encoded weight block through one kernel pass
    weight_block_s: float = 0.0  # native: per encoded weight block and call (independent of the rows)


@dataclass(frozen=True)
class TEE:
    """The trusted CPU: encryption/decryption and all plaintext model compute."""

    name: str
    encrypt_ct_s: float  # pack + encode + encrypt + serialize one input ciphertext
    decrypt_ct_s: float  # parse + decrypt + decode + unpack one output ciphertext
    call_overhead_s: float  # per delegated call: DelegatedLinear, engine bookkeeping, tensor <-> numpy
    gemm_flops: float  # float32 matmul rate (FLOP/s, 2 per MAC): extra time per extra row
    mem_bandwidth_Bps: float  # weight streaming rate of a matmul (each weight is read once per forward: cold)
    norm_s_per_elem: float  # LayerNorm / RMSNorm
    softmax_s_per_elem: float
    act_s_per_elem: float  # GELU / SiLU
    attn_s_per_mac: float  # q·K and p·V in the attention (eager)
    layer_overhead_s: dict = field(default_factory=dict)  # family -> framework time per decoder layer per forward
    forward_overhead_s: float = 0.0  # per forward: embedding, loop, cache bookkeeping
    gemm_s_per_weight: dict = field(default_factory=dict)  # rows -> seconds per weight element, weights > 32 MB
    gemm_s_per_weight_small: dict = field(default_factory=dict)  # the same for delegated-size weights, read cold
    prefill_overhead_s: float = 0.0  # added to the first forward of a sequence (no KV cache yet: masks, cache)
    prefill_layer_overhead_s: dict = field(default_factory=dict)  # family -> added per layer in that forward
    sample_s_per_vocab: float = 0.0  # argmax / sampling over the logits
    encrypt_call_s: float = 0.0  # per delegated call, on top of encrypt_ct_s per ciphertext
    encrypt_row_block_s: float = 0.0  # per row block (sealing its row scales)
    decrypt_call_s: float = 0.0
    decrypt_row_block_s: float = 0.0  # per row block (unsealing its row scales)
    local_call_overhead_s: float = 0.0  # per delegated layer computed in the TEE (Bifrost+ prefill)
    glue_s_per_elem: float = 0.0  # tensor <-> float64 numpy conversion, per input + output element


@dataclass(frozen=True)
class Link:
    """Between the TEE and the accelerator."""

    name: str
    bandwidth_Bps: float
    latency_s: float  # per round trip (one delegated call)
    ct_in_bytes: int  # one input ciphertext on the wire (seeded, at accelerator.linear params)
    ct_out_bytes: int  # one output ciphertext on the wire


@dataclass(frozen=True)
class FHE:
    """Costs for the all-FHE baseline: a shallow context for matmuls, a deep one for non-linear ops."""

    matmul: CKKSOps
    deep: CKKSOps


@dataclass(frozen=True)
class Profile:
    name: str
    description: str
    source: Source
    accelerator: Accelerator
    tee: TEE
    link: Link
    fhe: FHE | None = None

    def to_dict(self) -> dict:
        return _plain(dataclasses.asdict(self))


def _plain(obj):
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def _build(cls, data, where: str):
    if not isinstance(data, dict):
        raise UserError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise UserError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(fields)}")
    missing = sorted(n for n, f in fields.items() if n not in data and f.default is dataclasses.MISSING
                     and f.default_factory is dataclasses.MISSING)
    if missing:
        raise UserError(f"{where}: missing key(s) {missing}")
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(hints[name], value, f"{where}.{name}")
    try:
        return cls(**kwargs)
    except ValueError as exc:
        raise UserError(f"{where}: {exc}") from None


def _coerce(hint, value, where: str):
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None and type(None) in args:
            return None
        hint = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, where)
    if origin is tuple:
        if not isinstance(value, list):
            raise UserError(f"{where}: expected a list")
        return tuple(_coerce(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
    if hint is dict:
        if not isinstance(value, dict) or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                  and math.isfinite(v) and v >= 0 for v in value.values()):
            raise UserError(f"{where}: expected a mapping of names to non-negative numbers")
        return {str(k): float(v) for k, v in value.items()}
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"{where}: expected a number, got {type(value).__name__}")
        if not math.isfinite(value) or value < 0:
            raise UserError(f"{where}: must be a finite non-negative number, got {value}")
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"{where}: expected an integer, got {type(value).__name__}")
        if value < 0:
            raise UserError(f"{where}: must be non-negative, got {value}")
        return value
    if hint is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise UserError(f"{where}: expected a string")
        return str(value)
    return value


_POSITIVE = {  # costs that must be > 0 for the model to make sense
    "accelerator.linear": ("mul_plain_s",),
    "tee": ("encrypt_ct_s", "decrypt_ct_s", "gemm_flops", "mem_bandwidth_Bps"),
    "link": ("bandwidth_Bps", "ct_in_bytes", "ct_out_bytes"),
}
MAX_POLY_DEGREE = 65536


def _check_ckks(ops: CKKSOps, where: str) -> None:
    n, bits = ops.poly_modulus_degree, ops.coeff_mod_bit_sizes
    if n < 1024 or n > MAX_POLY_DEGREE or n & (n - 1):
        raise UserError(f"{where}.poly_modulus_degree: must be a power of two in [1024, {MAX_POLY_DEGREE}], "
                           f"got {n}")
    if len(bits) < 2:
        raise UserError(f"{where}.coeff_mod_bit_sizes: needs at least 2 primes (data + special), got {list(bits)}")
    if any(not 20 <= b <= 60 for b in bits):
        raise UserError(f"{where}.coeff_mod_bit_sizes: every prime must have 20..60 bits, got {list(bits)}")
    if ops.usable_levels < 1:
        raise UserError(f"{where}.usable_levels: must be >= 1, got {ops.usable_levels}")


def _check_native_primes(ops: CKKSOps, where: str) -> None:
    """The native backend's own prime search decides whether it can run these parameters."""
    try:
        from bifrost_kernels.rns import ntt_primes

        ntt_primes(ops.poly_modulus_degree, tuple(ops.coeff_mod_bit_sizes))
    except ImportError:  # kernels not installed: the generic checks above still apply
        return
    except ValueError as exc:
        raise UserError(f"{where}.coeff_mod_bit_sizes: the native backend cannot use {list(ops.coeff_mod_bit_sizes)} "
                           f"at N={ops.poly_modulus_degree}: {exc}") from None


def profile_from_dict(data: dict, where: str = "profile") -> Profile:
    prof = _build(Profile, data, where)
    if prof.accelerator.backend not in BACKENDS:
        raise UserError(f"{where}.accelerator.backend: must be one of {', '.join(BACKENDS)}, "
                           f"got {prof.accelerator.backend!r}")
    if prof.accelerator.backend == "tenseal" and not prof.accelerator.linear.rotate_s > 0:
        raise UserError(f"{where}.accelerator.linear.rotate_s: must be > 0 for the tenseal (BSGS) backend")
    for path, keys in _POSITIVE.items():
        obj = prof
        for part in path.split("."):
            obj = getattr(obj, part)
        for k in keys:
            if not getattr(obj, k) > 0:
                raise UserError(f"{where}.{path}.{k}: must be > 0")
    contexts = [(prof.accelerator.linear, "accelerator.linear")]
    if prof.fhe is not None:
        contexts += [(prof.fhe.matmul, "fhe.matmul"), (prof.fhe.deep, "fhe.deep")]
    for ops, label in contexts:
        _check_ckks(ops, f"{where}.{label}")
    if prof.accelerator.backend == "native":
        _check_native_primes(prof.accelerator.linear, f"{where}.accelerator.linear")
    if prof.fhe is not None:
        mm, d = prof.fhe.matmul, prof.fhe.deep
        if not (mm.rotate_s > 0 and mm.mul_plain_s > 0 and mm.add_s > 0 and mm.mul_ct_s > 0):
            raise UserError(f"{where}.fhe.matmul: needs rotate_s, mul_plain_s, add_s and mul_ct_s > 0")
        if not (d.rotate_s > 0 and d.mul_plain_s > 0 and d.add_s > 0 and d.mul_ct_s > 0 and d.bootstrap_s > 0):
            raise UserError(f"{where}.fhe.deep: needs rotate_s, mul_plain_s, add_s, mul_ct_s and bootstrap_s > 0")
    return prof


def resolve_profile_path(name_or_path: str | None) -> Path:
    """A profile name in ``configs/hardware/`` (without .yaml) or a path to a YAML file."""
    if not name_or_path:
        name_or_path = DEFAULT_PROFILE
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.exists():
        if not p.is_file():
            raise UserError(f"hardware profile not found: {p}")
        return p
    candidate = HARDWARE_DIR / f"{name_or_path}.yaml"
    if not candidate.is_file():
        known = sorted(q.stem for q in HARDWARE_DIR.glob("*.yaml")) if HARDWARE_DIR.is_dir() else []
        raise UserError(f"unknown hardware profile {name_or_path!r}; known: {', '.join(known) or '(none)'}")
    return candidate


def load_profile(name_or_path: str | None = None) -> Profile:
    p = resolve_profile_path(name_or_path)
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise UserError(f"{p}: invalid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise UserError(f"{p}: top level must be a mapping")
    return profile_from_dict(data, p.name)


def dump_profile(profile: Profile, path: Path | str, header: str = "") -> None:
    text = yaml.safe_dump(profile.to_dict(), sort_keys=False, width=110)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text((header + "\n" if header else "") + text)
