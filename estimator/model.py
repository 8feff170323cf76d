"""Per-operator latency model: count operations per layer, multiply by per-operation costs, sum.

Three schemes (see ``estimator/README.md`` for the term-by-term derivation):

- ``bifrost``: every forward (prefill of the whole prompt, then one per new token) sends each delegated
  linear group through CKKS on the accelerator with the profile backend's own packing (``native``: the
  coefficient blocking of ``bifrost_kernels.layout.plan``; ``tenseal``: the BSGS diagonal plan of
  ``PackingPlan.for_shape``), in the calls the trusted engine sends (rows padded to ``row_bucket``, then
  split by the backend's ``rows_per_call``: native = ``ROWS_PER_FFT_CALL``, tenseal = ``ROWS_PER_CALL``);
  encrypts/decrypts in the TEE (one refresh per group and call), moves the ciphertexts over the link
  (native: the backend's exact ``call_bytes``; tenseal: ciphertext counts x the profile's median sizes),
  and runs everything else (norms, attention with the KV cache, softmax, activations, RoPE, LM head,
  sampling) in plaintext in the TEE. Calls, rows and ciphertext counts (and native bytes) equal what the
  engine records per layer group (``forward_traffic`` vs ``DelegationEngine.stats.groups``).
- ``bifrost+``: as ``bifrost`` but the prefill forward runs entirely inside the TEE in plaintext.
- ``fhe``: everything encrypted on the accelerator, composed per layer the way Euston does (Gao et al.,
  IEEE S&P 2026): tokens packed column-wise (one ciphertext = one feature of ``slots`` tokens, e.g.
  32 sequences x 128 tokens at N=2^13), linear layers as ct x pt products with no rotation, attention as
  ct x ct products with the diagonal method, softmax / LayerNorm / GELU as Euston's polynomial recipes
  in a deep bootstrappable context, and bootstrapping whenever a tensor has fewer levels than the next
  operator needs. Costs are amortised per slot (a forward that fills part of a ciphertext pays its share),
  as Euston amortises its per-operator benchmarks over 32 x 128 tokens.

Every term has a ``scope``: ``layer`` (decoder layers), ``io`` (the client's encryption of the input
and decryption of the output under ``fhe``) or ``head`` (final norm, LM head, sampling, per-forward
overhead). ``layers_only`` drops exactly the ``head`` terms, for every scheme.
"""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from bifrost.ckks import CKKSParams, GroupShape, GroupTraffic, row_bucket
from bifrost.ckks.registry import get_backend
from bifrost.errors import UserError

from .profile import CKKSOps, Profile
from .shapes import LinearGroup, ModelShape, ceil_div, log2c

SCHEMES = ("fhe", "bifrost", "bifrost+")
DEVICES = ("accelerator", "tee", "link")
LINEAR_PACKINGS = ("backend", "column")


# ------------------------------------------------------------------------------------------------
# The all-FHE baseline's algorithms (Euston's recipes; printed with --json, overridable with --fhe-recipe)
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Poly:
    """Homomorphic work of one evaluation on one ciphertext: ct x ct products (with relinearisation and
    rescale), plaintext/constant products, additions, and the multiplicative depth consumed."""

    mults: float = 0
    consts: float = 0
    adds: float = 0
    depth: int = 0

    def then(self, other: "Poly") -> "Poly":
        """Sequential composition: work adds, depth adds."""
        return Poly(self.mults + other.mults, self.consts + other.consts, self.adds + other.adds,
                    self.depth + other.depth)

    def times(self, k: float) -> "Poly":
        """``k`` independent evaluations per ciphertext (work scales, depth does not)."""
        return Poly(self.mults * k, self.consts * k, self.adds * k, self.depth)


@dataclass(frozen=True)
class FHEAlgorithms:
    """Polynomial recipes of the all-FHE baseline, per ciphertext; defaults are Euston's GPU code
    (github.com/FLL-Lab/Euston, Euston-GPU/src/Euston_func and ckks_evaluator.cu).

    exp(x): degree-7 polynomial on x/2^r (7 ct-mults, 7 constant products, depth 3) then r squarings;
    1/x: NEXUS-style iteration (per iteration one squaring and one product, depth 1), ``iters`` + 1 levels;
    sqrt(1+x): 1 + x/2 - x^2/8 (1 ct-mult, depth 2); sign(x): ``sign_polys`` composed odd degree-9
    polynomials (5 ct-mults, depth 4 each). Softmax = exp, sum over keys, one inverse per row, one
    product; LayerNorm = mean (Euston: ``d`` pairwise differences per column), square, sum, sqrt,
    inverse, one product; GELU(x) = x·sigmoid(1.702x) on |x| from sign(x), with Euston's rectification.
    ``bootstrapping`` False reproduces Euston's isolated per-operator benchmarks (fresh inputs, enough
    levels, no bootstrapping, no context switches) — not a sound end-to-end pipeline.
    """

    exp_poly_mults: int = 7
    exp_poly_consts: int = 7
    exp_poly_depth: int = 3
    exp_squarings: int = 1  # cipher_exp_5: r = 1
    softmax_inverse_iters: int = 4
    norm_inverse_iters: int = 4
    gelu_inverse_iters: int = 3
    sign_polys: int = 6  # d_g = 3, d_f = 3
    sign_poly_mults: int = 5
    sign_poly_depth: int = 4
    norm_pairwise_mean: bool = True  # Euston's LayerNorm: sum_j (x_i - x_j), d^2 subtractions per column
    bootstrapping: bool = True

    def exp(self) -> Poly:
        return Poly(self.exp_poly_mults + self.exp_squarings, self.exp_poly_consts, self.exp_poly_mults + 1,
                    self.exp_poly_depth + self.exp_squarings)

    @staticmethod
    def inverse(iters: int) -> Poly:
        return Poly(2 * iters, 0, iters + 2, iters + 1)

    @staticmethod
    def sqrt() -> Poly:
        return Poly(1, 3, 2, 2)

    def softmax(self) -> tuple[Poly, Poly]:
        """(per score ciphertext, per row-sum ciphertext); depth is the whole operator's."""
        per_score = self.exp().then(Poly(1, 0, 1, 1))
        per_row = self.inverse(self.softmax_inverse_iters)
        return per_score, dataclasses.replace(per_row, depth=per_score.depth + per_row.depth)

    def norm(self, width: int, centred: bool) -> tuple[Poly, Poly]:
        """(per column ciphertext, per statistics ciphertext) of a LayerNorm (centred) or RMSNorm over
        ``width`` features, one feature per ciphertext."""
        mean_adds = (width if self.norm_pairwise_mean else 2) if centred else 0
        per_col = Poly(2, 0, mean_adds + 1, 0)  # square, normalising product; the variance sum
        per_stat = self.sqrt().then(self.inverse(self.norm_inverse_iters))
        return per_col, dataclasses.replace(per_stat, depth=1 + per_stat.depth + 1)

    def sign(self) -> Poly:
        return Poly(self.sign_polys * self.sign_poly_mults, self.sign_polys * self.sign_poly_mults + 1,
                    self.sign_polys * 4, self.sign_polys * self.sign_poly_depth + 1)

    def activation(self, gated: bool) -> Poly:
        """GELU (Euston) per ciphertext; SwiGLU = the same sigmoid recipe (SiLU) times the up projection."""
        core = self.exp().then(self.inverse(self.gelu_inverse_iters)).then(Poly(1, 1, 1, 2))  # gelu(|x|)
        rectify = Poly(2, 2, 1, 0).then(self.exp())  # parallel branch: contributes work, not depth
        p = self.sign().then(Poly(1, 0, 0, 1)).then(core).then(Poly(1, 0, 0, 1))
        p = Poly(p.mults + rectify.mults, p.consts + rectify.consts, p.adds + rectify.adds, p.depth)
        return p.then(Poly(1, 0, 0, 1)) if gated else p

    def to_dict(self, shape: ModelShape | None = None) -> dict:
        out: dict = {"fields": dataclasses.asdict(self)}
        sm_score, sm_row = self.softmax()
        out["derived"] = {"exp": dataclasses.asdict(self.exp()),
                          "softmax_per_score_ct": dataclasses.asdict(sm_score),
                          "softmax_per_row_ct": dataclasses.asdict(sm_row),
                          "activation": dataclasses.asdict(self.activation(False))}
        if shape is not None:
            col, stat = self.norm(shape.d_model, shape.norm == "layernorm")
            out["derived"]["norm_per_column_ct"] = dataclasses.asdict(col)
            out["derived"]["norm_per_stat_ct"] = dataclasses.asdict(stat)
            out["derived"]["activation"] = dataclasses.asdict(self.activation(shape.gated))
        return out


def with_overrides(alg: FHEAlgorithms, assignments: list[str] | None) -> FHEAlgorithms:
    """Apply ``KEY=VALUE`` strings (``--fhe-recipe``) to a recipe; unknown keys and bad values are refused."""
    fields = {f.name: f for f in dataclasses.fields(FHEAlgorithms)}
    changes: dict[str, Any] = {}  # bool or int per field: dataclasses.replace checks them
    for item in assignments or []:
        key, sep, raw = item.partition("=")
        key, raw = key.strip(), raw.strip()
        if not sep or key not in fields:
            raise UserError(f"--fhe-recipe {item!r}: expected KEY=VALUE with KEY one of {', '.join(fields)}")
        if fields[key].type in (bool, "bool"):
            if raw.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise UserError(f"--fhe-recipe {key}: expected true or false, got {raw!r}")
            changes[key] = raw.lower() in ("true", "1", "yes")
            continue
        try:
            value = int(raw)
        except ValueError:
            raise UserError(f"--fhe-recipe {key}: expected an integer, got {raw!r}") from None
        if value < 0 or (value == 0 and key not in ("exp_squarings",)):
            raise UserError(f"--fhe-recipe {key}: must be {'>= 0' if key == 'exp_squarings' else '>= 1'}, "
                               f"got {value}")
        changes[key] = value
    return dataclasses.replace(alg, **changes)


# ------------------------------------------------------------------------------------------------
# Cost containers
# ------------------------------------------------------------------------------------------------
@dataclass
class Term:
    op: str
    device: str
    seconds: float
    count: float = 0.0
    scope: str = "layer"


@dataclass
class Cost:
    """Terms of one forward pass (or a sum of them)."""

    terms: list[Term] = field(default_factory=list)

    def add(self, op: str, device: str, seconds: float, count: float = 0.0, scope: str = "layer") -> None:
        self.terms.append(Term(op, device, float(seconds), float(count), scope))

    @property
    def total(self) -> float:
        return sum(t.seconds for t in self.terms)

    def by(self, key: str) -> dict[str, float]:
        out: dict[str, float] = defaultdict(float)
        for t in self.terms:
            out[getattr(t, key)] += t.seconds
        return dict(out)

    def by_op_device(self) -> dict[tuple[str, str], float]:
        out: dict[tuple[str, str], float] = defaultdict(float)
        for t in self.terms:
            out[(t.op, t.device)] += t.seconds
        return dict(out)

    def counts(self) -> dict[str, float]:
        out: dict[str, float] = defaultdict(float)
        for t in self.terms:
            if t.count:
                out[t.op] += t.count
        return dict(out)

    def without_scope(self, scope: str) -> "Cost":
        return Cost([t for t in self.terms if t.scope != scope])

    def scaled(self, factor: float) -> "Cost":
        return Cost([Term(t.op, t.device, t.seconds * factor, t.count * factor, t.scope) for t in self.terms])

    def __add__(self, other: "Cost") -> "Cost":
        return Cost(self.terms + other.terms)


@dataclass
class Estimate:
    scheme: str
    model: str
    profile: str
    prompt_len: int
    new_tokens: int
    batch: int
    prefill: Cost  # forward producing the first token (TTFT)
    decode: list[Cost]  # one per further token
    layers_only: bool = False

    @property
    def ttft_s(self) -> float:
        return self.prefill.total

    @property
    def per_token_s(self) -> float:
        return sum(c.total for c in self.decode) / len(self.decode) if self.decode else 0.0

    @property
    def total_s(self) -> float:
        return self.prefill.total + sum(c.total for c in self.decode)

    def decode_cost(self) -> Cost:
        """Mean decode step."""
        total = Cost()
        for c in self.decode:
            total = total + c
        return total.scaled(1.0 / len(self.decode)) if self.decode else Cost()

    def to_dict(self) -> dict:
        def stage(c: Cost) -> dict:
            return {"total_s": c.total, "by_op": c.by("op"), "by_device": c.by("device"), "by_scope": c.by("scope"),
                    "op_counts": c.counts()}

        return {"scheme": self.scheme, "model": self.model, "profile": self.profile, "prompt_len": self.prompt_len,
                "new_tokens": self.new_tokens, "batch": self.batch, "layers_only": self.layers_only,
                "ttft_s": self.ttft_s, "per_token_s": self.per_token_s, "total_s": self.total_s,
                "prefill": stage(self.prefill), "decode_mean": stage(self.decode_cost())}


# ------------------------------------------------------------------------------------------------
# Operation counts of one delegated call
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LinearCounts:
    """Homomorphic operations of one group (one delegated call) on ``rows`` input rows."""

    rotations: int
    mul_plain: int
    adds: int
    rescales: int
    cts_in: int
    cts_out: int
    row_blocks: int = 1  # row groups the input is split into (one sealed scale block each)
    weight_passes: int = 0  # native: encoded weight blocks streamed through the kernel (per kernel pass)
    weight_blocks: int = 0  # native: encoded weight blocks of the group (touched once per call)


def bsgs_counts(slots: int, group: LinearGroup, rows: int) -> LinearCounts:
    """Counts of the TenSEAL backend's baby-step/giant-step evaluation (see tenseal_backend.apply)."""
    from bifrost.ckks.tenseal_backend import PackingPlan

    plan = PackingPlan.for_shape(slots, GroupShape(group.d_in, group.d_outs))
    n = ceil_div(rows, plan.rows_per_ct)
    outs = sum(plan.out_chunks(d) for d in group.d_outs)
    rot = n * (plan.in_chunks * (plan.baby - 1) + outs * (plan.giant - 1))
    mul = n * outs * plan.in_chunks * plan.a  # all-zero padding diagonals (rare) are not subtracted
    rescale = n * outs * plan.giant
    return LinearCounts(rot, mul, mul + outs * n * (plan.giant - 1), rescale, n * plan.in_chunks, n * outs, n)


def _row_blocks_per_kernel_call() -> int:
    """How many row blocks one native kernel pass takes (the kernel's own constant)."""
    from bifrost_kernels.backend import ROW_BLOCKS_PER_KERNEL_CALL

    return max(int(ROW_BLOCKS_PER_KERNEL_CALL), 1)


def _native_prime_bits(ops: CKKSOps) -> tuple[int, ...]:
    """Bit sizes of the primes the native backend actually picks for these parameters."""
    from bifrost_kernels.rns import ntt_primes

    return tuple(q.bit_length() for q in ntt_primes(ops.poly_modulus_degree, tuple(ops.coeff_mod_bit_sizes)))


def native_blocking(ops: CKKSOps, group: LinearGroup, rows: int):
    """The native backend's blocking for ``rows`` rows: ``bifrost_kernels.layout.plan`` itself."""
    from bifrost_kernels.layout import plan

    return plan(ops.poly_modulus_degree, _native_prime_bits(ops), group.d_in, tuple(group.d_outs), rows)


def coeff_counts(ops: CKKSOps, group: LinearGroup, rows: int) -> LinearCounts:
    """Counts of the native backend's blocking, taken from ``bifrost_kernels.layout.plan`` itself (so the
    model follows when the planner changes): no rotations, no rescales; per row block ``in_blocks`` input and
    ``out_blocks`` output ciphertexts and ``in_blocks x out_blocks`` block products; the kernel streams the
    encoded weights once per ``ROW_BLOCKS_PER_KERNEL_CALL`` row blocks and touches them once per call."""
    blk = native_blocking(ops, group, rows)
    rb = blk.row_blocks(rows)
    kin = blk.in_blocks(group.d_in)
    kout = sum(blk.out_blocks(d) for d in group.d_outs)
    passes = ceil_div(rb, _row_blocks_per_kernel_call())
    return LinearCounts(0, rb * kin * kout, rb * kin * kout, 0, rb * kin, rb * kout, rb, passes * kin * kout, kin * kout)


def column_counts(slots: int, group: LinearGroup, rows: int) -> LinearCounts:
    """Euston's ct x pt product (cMat_mul_pMat): one ciphertext per input feature holding ``slots``
    tokens; each output feature is sum_i ct_i * w_ij (a broadcast plaintext), no rotation."""
    n = ceil_div(rows, slots)  # Bifrost's own requests only: a partly filled ciphertext costs a whole one
    d_out = sum(group.d_outs)
    macs = group.d_in * d_out
    return LinearCounts(0, n * macs, n * macs, n * d_out, n * group.d_in, n * d_out, n)


def linear_counts(backend: str, ops: CKKSOps, group: LinearGroup, rows: int, packing: str = "backend") -> LinearCounts:
    if packing == "column":
        return column_counts(ops.slots, group, rows)
    if backend == "native":
        return coeff_counts(ops, group, rows)
    return bsgs_counts(ops.slots, group, rows)


@lru_cache(maxsize=None)
def backend_params(backend: str, ops: CKKSOps) -> CKKSParams:
    """The CKKS parameters a profile's delegated-layer context stands for: ``ops``' ring dimension and primes
    with the backend's recommended ``scale_bits`` (the rows per call and the wire sizes do not depend on
    the scale; the backend still checks that it can run these parameters)."""
    default = get_backend(backend).default_params
    try:
        params = CKKSParams(ops.poly_modulus_degree, tuple(ops.coeff_mod_bit_sizes), default.scale_bits)
        get_backend(backend).check_params(params)
    except ValueError as exc:
        raise UserError(f"the {backend} backend cannot run N={ops.poly_modulus_degree}, primes "
                           f"{list(ops.coeff_mod_bit_sizes)}: {exc}") from None
    return params


@lru_cache(maxsize=4096)
def rows_per_call(backend: str, ops: CKKSOps, group: LinearGroup, rows: int) -> int:
    """How many of ``rows`` rows one worker call carries: the backend's own ``rows_per_call``, which the
    trusted engine splits by (native: ``ROWS_PER_FFT_CALL``; tenseal: its ``ROWS_PER_CALL``)."""
    return int(get_backend(backend).rows_per_call(backend_params(backend, ops), _group_shape(group), rows))


def call_rows(backend: str, ops: CKKSOps, group: LinearGroup, rows: int) -> list[int]:
    """Rows of each worker call for ``rows`` real rows, exactly as ``DelegationEngine.run_group`` sends them:
    padded with zero rows to :func:`~bifrost.ckks.row_bucket`, then split by the backend's ``rows_per_call``
    (recursively: every part is planned again)."""
    return _split_rows(backend, ops, group, row_bucket(rows))


def _split_rows(backend: str, ops: CKKSOps, group: LinearGroup, rows: int) -> list[int]:
    per_call = rows_per_call(backend, ops, group, rows)
    if rows <= per_call:
        return [rows]
    return [r for i in range(0, rows, per_call) for r in _split_rows(backend, ops, group, min(per_call, rows - i))]


@lru_cache(maxsize=4096)
def exact_call_bytes(backend: str, ops: CKKSOps, group: LinearGroup, rows: int) -> tuple[int, int] | None:
    """(input, output) wire bytes of one honest call of ``rows`` rows from the backend's own ``call_bytes``
    (native: exact, headers included); None for a backend without exact sizes (tenseal: SEAL's compressed
    serialisation varies with the data)."""
    size = get_backend(backend).call_bytes(backend_params(backend, ops), _group_shape(group), rows)
    return None if size is None else (int(size[0]), int(size[1]))


def _group_shape(group: LinearGroup) -> GroupShape:
    return GroupShape(group.d_in, tuple(group.d_outs))


@dataclass(frozen=True)
class DelegatedCall:
    """One worker call of a delegated group: its rows (padding included), operation counts and wire bytes."""

    rows: int
    counts: LinearCounts
    bytes_sent: int
    bytes_received: int
    exact_bytes: bool  # from the backend's call_bytes; else cts x the profile's median ciphertext sizes


def delegated_calls(p: Profile, group: LinearGroup, rows: int, packing: str = "backend") -> list[DelegatedCall]:
    """The worker calls of ``group`` for ``rows`` real rows (``packing="column"``: the what-if of one
    Euston-style call, sized from the profile)."""
    a, link = p.accelerator, p.link
    out = []
    for r in (call_rows(a.backend, a.linear, group, rows) if packing == "backend" else [rows]):
        c = linear_counts(a.backend, a.linear, group, r, packing)
        exact = exact_call_bytes(a.backend, a.linear, group, r) if packing == "backend" else None
        sent, received = exact or (c.cts_in * link.ct_in_bytes, c.cts_out * link.ct_out_bytes)
        out.append(DelegatedCall(r, c, sent, received, exact is not None))
    return out


def group_traffic(p: Profile, group: LinearGroup, rows: int) -> GroupTraffic:
    """The worker traffic of ``group`` in one forward of ``rows`` rows, as the engine records it (``exact_bytes``
    False: bytes from the profile's median ciphertext sizes, an approximation)."""
    calls = delegated_calls(p, group, rows)
    return GroupTraffic(len(calls), sum(c.rows for c in calls), sum(c.counts.cts_in for c in calls),
                        sum(c.counts.cts_out for c in calls), sum(c.bytes_sent for c in calls),
                        sum(c.bytes_received for c in calls), all(c.exact_bytes for c in calls))


def forward_traffic(p: Profile, m: ModelShape, rows: int, local_linears: bool = False) -> dict[str, GroupTraffic]:
    """Per delegated group of one decoder layer (every layer alike): the worker traffic of one forward of
    ``rows`` rows; nothing when the layers run in the TEE (Bifrost+ prefill)."""
    return {g.name: GroupTraffic() if local_linears else group_traffic(p, g, rows) for g in m.groups()}


def ckks_seconds(ops: CKKSOps, c: LinearCounts) -> float:
    return c.rotations * ops.rotate_s + c.mul_plain * ops.mul_plain_s + c.adds * ops.add_s + c.rescales * ops.rescale_s


def accelerator_seconds(p: Profile, c: LinearCounts) -> float:
    """Worker time of one delegated call (what the worker reports as compute seconds)."""
    a = p.accelerator
    return a.efficiency * (ckks_seconds(a.linear, c) + c.cts_in * a.ct_load_s + c.cts_out * a.ct_dump_s
                           + c.weight_passes * a.weight_pass_s + c.weight_blocks * a.weight_block_s) + a.call_overhead_s


def encrypt_seconds(p: Profile, c: LinearCounts) -> float:
    t = p.tee
    return t.encrypt_call_s + c.cts_in * t.encrypt_ct_s + c.row_blocks * t.encrypt_row_block_s


def decrypt_seconds(p: Profile, c: LinearCounts) -> float:
    t = p.tee
    return t.decrypt_call_s + c.cts_out * t.decrypt_ct_s + c.row_blocks * t.decrypt_row_block_s


LARGE_WEIGHT_BYTES = 32 << 20


def _per_weight(table: dict, rows: int) -> float:
    """Seconds per weight element at ``rows``: linear between the measured row counts, extrapolated with the
    last segment's slope beyond them."""
    pts = sorted((int(k), v) for k, v in table.items())
    if rows <= pts[0][0]:
        return pts[0][1]
    for (r0, v0), (r1, v1) in zip(pts, pts[1:]):
        if rows <= r1:
            return v0 + (v1 - v0) * (rows - r0) / (r1 - r0)
    (r0, v0), (r1, v1) = pts[-2], pts[-1]
    return v1 + (v1 - v0) * (rows - r1) / (r1 - r0)


def gemm_seconds(p: Profile, rows: int, d_in: int, d_out: int) -> float:
    """Plaintext float32 ``rows x d_in`` @ ``d_in x d_out`` in the TEE. With the calibrated tables: weight
    elements x the measured seconds per weight element at this row count (LM-head-sized table above
    32 MB of weights, the cold delegated-size table below). Otherwise a roofline: weights streamed once
    from memory plus 2·rows·MACs at ``gemm_flops``."""
    t = p.tee
    table = t.gemm_s_per_weight if 4 * d_in * d_out > LARGE_WEIGHT_BYTES else t.gemm_s_per_weight_small
    if table:
        return d_in * d_out * _per_weight(table, rows)
    return 4.0 * d_in * d_out / t.mem_bandwidth_Bps + 2.0 * rows * d_in * d_out / t.gemm_flops


# ------------------------------------------------------------------------------------------------
# Bifrost / Bifrost+: one forward of ``rows`` tokens (x batch) with ``ctx`` keys per query after it
# ------------------------------------------------------------------------------------------------
def _tee_nonlinear(cost: Cost, p: Profile, m: ModelShape, rows: int, ctx: int, batch: int, prefill: bool) -> None:
    t = p.tee
    d, H, KV, hd = m.d_model, m.n_heads, m.n_kv_heads, m.head_dim
    L = m.n_layers
    norm_elems = rows * d * 2 + (rows * (H + KV) * hd if m.qk_norm else 0)
    cost.add("norm", "tee", L * norm_elems * t.norm_s_per_elem, L * (2 + 2 * m.qk_norm))
    attn_macs = 2 * rows * ctx * H * hd  # q·K^T and p·V (eager: full rows x ctx block)
    cost.add("attention", "tee", L * attn_macs * t.attn_s_per_mac, L * attn_macs)
    cost.add("softmax", "tee", L * rows * H * ctx * t.softmax_s_per_elem, L * rows * H * ctx)
    act = rows * m.d_ff * (2 if m.gated else 1) + (rows * (H + KV) * hd * 2 if m.rope else 0) + 2 * rows * d
    cost.add("activation/rope/residual", "tee", L * act * t.act_s_per_elem, L * act)
    def per_family(table: dict) -> float:
        return table.get(m.family, max(table.values(), default=0.0))

    overhead = per_family(t.layer_overhead_s) + (per_family(t.prefill_layer_overhead_s) if prefill else 0.0)
    cost.add("framework", "tee", L * overhead * batch)
    cost.add("framework", "tee", (t.forward_overhead_s + (t.prefill_overhead_s if prefill else 0.0)) * batch,
             scope="head")
    cost.add("norm", "tee", rows * d * t.norm_s_per_elem, scope="head")  # final norm
    cost.add("lm head", "tee", gemm_seconds(p, rows, d, m.vocab), rows * d * m.vocab, scope="head")
    cost.add("sampling", "tee", batch * m.vocab * t.sample_s_per_vocab, scope="head")


def forward_bifrost(p: Profile, m: ModelShape, rows: int, ctx: int, local_linears: bool, batch: int = 1,
                    packing: str = "backend", prefill: bool | None = None) -> Cost:
    """``prefill`` (default: ``ctx == rows // batch``): the first forward of the sequences, no KV cache yet."""
    cost = Cost()
    t, link = p.tee, p.link
    L = m.n_layers
    for g in m.groups():
        if local_linears:  # Bifrost+ prefill: each member layer is one float32 F.linear in the TEE
            cost.add("linear (plaintext)", "tee", L * sum(gemm_seconds(p, rows, g.d_in, d) for d in g.d_outs),
                     L * rows * g.macs)
            cost.add("framework", "tee", L * len(g.d_outs) * t.local_call_overhead_s)
            continue
        calls = delegated_calls(p, g, rows, packing)
        for call in calls:
            c = call.counts
            cost.add("linear (CKKS)", "accelerator", L * accelerator_seconds(p, c), L * (c.rotations + c.mul_plain))
            cost.add("encrypt", "tee", L * encrypt_seconds(p, c), L * c.cts_in)
            cost.add("decrypt", "tee", L * decrypt_seconds(p, c), L * c.cts_out)
            nbytes = call.bytes_sent + call.bytes_received
            cost.add("transfer", "link", L * (nbytes / link.bandwidth_Bps + link.latency_s), L * nbytes)
        # per call: DelegatedLinear and the engine; per real row: tensor <-> float64 numpy of input and outputs
        glue = len(calls) * t.call_overhead_s + rows * (g.d_in + sum(g.d_outs)) * t.glue_s_per_elem
        cost.add("framework", "tee", L * glue)
    _tee_nonlinear(cost, p, m, rows, ctx, batch, ctx * batch == rows if prefill is None else prefill)
    return cost


# ------------------------------------------------------------------------------------------------
# All-FHE baseline (Euston-style composition with bootstrapping)
# ------------------------------------------------------------------------------------------------
class _FHELayerModel:
    """Accumulates the fhe terms of one forward while tracking each tensor's remaining levels.

    Ciphertext counts are amortised (elements / slots). Linear operators run in ``fhe.matmul`` (Euston:
    N=2^13, {60,40,40,40,60}); softmax / norms / activations in ``fhe.deep`` (bootstrappable). A tensor
    that needs more levels than it has is bootstrapped in the deep context (``ceil(deficit / usable_levels)``
    bootstraps per deep ciphertext); each move between the two contexts (repacking ``deep.slots /
    matmul.slots`` small ciphertexts into one deep one, or back) costs one deep key switch per deep
    ciphertext (``context switch``)."""

    def __init__(self, p: Profile, m: ModelShape, alg: FHEAlgorithms):
        if p.fhe is None:
            raise UserError(f"hardware profile {p.name!r} has no 'fhe' section: cannot estimate the fhe scheme")
        self.mm, self.deep, self.m, self.alg = p.fhe.matmul, p.fhe.deep, m, alg
        self.acc: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0.0, 0.0])
        self.levels: dict[str, int] = {}

    # -- primitive charges ------------------------------------------------------------------------
    def charge(self, op: str, seconds: float, count: float = 0.0, scope: str = "layer") -> None:
        slot = self.acc[(op, scope)]
        slot[0] += seconds
        slot[1] += count

    def mm_work(self, op: str, n_ct: float, *, rot=0.0, mulp=0.0, tensor=0.0, relin=0.0, add=0.0, resc=0.0,
                scope: str = "layer") -> None:
        o = self.mm
        sec = n_ct * (rot * o.rotate_s + (mulp + 2 * tensor) * o.mul_plain_s + relin * o.mul_ct_s
                      + add * o.add_s + resc * o.rescale_s)
        self.charge(op, sec, n_ct * (rot + mulp + tensor), scope)

    def deep_poly(self, op: str, n_ct: float, poly: Poly, extra_rot: float = 0.0, scope: str = "layer") -> None:
        o = self.deep
        sec = n_ct * (poly.mults * (o.mul_ct_s + o.rescale_s) + poly.consts * (o.mul_plain_s + o.rescale_s)
                      + poly.adds * o.add_s + extra_rot * o.rotate_s)
        self.charge(op, sec, n_ct * poly.mults, scope)

    def switch(self, elements: float, scope: str = "layer") -> None:
        if self.alg.bootstrapping:
            n = elements / self.deep.slots
            self.charge("context switch", n * self.deep.rotate_s, n, scope)

    def bootstrap(self, elements: float, times: int, scope: str = "layer") -> None:
        if times > 0 and self.alg.bootstrapping:
            n = elements / self.deep.slots
            self.charge("bootstrap", n * times * self.deep.bootstrap_s, n * times, scope)

    # -- level bookkeeping ------------------------------------------------------------------------
    def need(self, name: str, k: int, elements: float, scope: str = "layer") -> None:
        """Before a matmul-context operator of depth ``k`` on tensor ``name``."""
        if not self.alg.bootstrapping:
            return
        if self.levels.get(name, 0) < k:
            self.switch(elements, scope)
            self.bootstrap(elements, 1, scope)
            self.switch(elements, scope)
            self.levels[name] = min(self.deep.usable_levels, self.mm.levels)

    def use(self, name: str, k: int, out: str | None = None) -> None:
        self.levels[out or name] = self.levels.get(name, 0) - k

    def deep_op(self, op: str, src: str, dst: str, elements: float, per_ct: Poly, extra: Sequence[tuple[float, Poly]] = (),
                rot_per_ct: float = 0.0, scope: str = "layer") -> None:
        """A deep-context operator: move in, bootstrap as often as its depth needs, evaluate, move back."""
        n = elements / self.deep.slots
        self.deep_poly(op, n, per_ct, rot_per_ct, scope)
        for frac, poly in extra:  # per-row statistics ciphertexts (a fraction of the column count)
            self.deep_poly(op, n * frac, poly, 0.0, scope)
        depth = max([per_ct.depth] + [p.depth for _, p in extra])
        if not self.alg.bootstrapping:
            self.levels[dst] = self.mm.levels
            return
        have = self.levels.get(src, 0)
        boots = max(0, math.ceil((depth - have) / self.deep.usable_levels))
        self.switch(elements, scope)
        self.bootstrap(elements, boots, scope)
        self.switch(elements, scope)
        self.levels[dst] = min(have + boots * self.deep.usable_levels - depth, self.mm.levels)

    def cost(self) -> Cost:
        c = Cost()
        for (op, scope), (sec, cnt) in self.acc.items():
            c.add(op, "accelerator" if op not in ("encrypt", "decrypt") else "tee", sec, cnt, scope)
        return c


def _fhe_norm(f: _FHELayerModel, src: str, dst: str, tokens: float, width: int, centred: bool, scope: str) -> None:
    col, stat = f.alg.norm(width, centred)
    f.deep_op("norm", src, dst, tokens * width, col, extra=[(1.0 / width, stat)], scope=scope)


def _fhe_linear(f: _FHELayerModel, op: str, tokens: float, d_in: int, d_out: int, scope: str = "layer") -> None:
    n = tokens / f.mm.slots
    f.mm_work(op, n, mulp=d_in * d_out, add=d_in * d_out, resc=d_out, scope=scope)


def forward_fhe(p: Profile, m: ModelShape, T: int, ctx: int, batch: int, alg: FHEAlgorithms,
                lm_head: bool = True) -> Cost:
    """One forward of ``T`` tokens per sequence for ``batch`` sequences, keys ``ctx`` per query."""
    f = _FHELayerModel(p, m, alg)
    mm, S = f.mm, f.mm.slots
    tok = T * batch
    d, H, KV, hd = m.d_model, m.n_heads, m.n_kv_heads, m.head_dim
    q_cols, kv_cols = H * hd, KV * hd
    centred = m.norm == "layernorm"
    f.levels["x"] = mm.levels  # the client's fresh input
    for _ in range(m.n_layers):
        _fhe_norm(f, "x", "h1", tok, d, centred, "layer")
        f.need("h1", 1, tok * d)
        _fhe_linear(f, "linear (ct×pt)", tok, d, q_cols + 2 * kv_cols)
        f.use("h1", 1, "qkv")
        if m.qk_norm:  # Qwen3: RMSNorm of every q and k head over its head_dim features
            _fhe_norm(f, "qkv", "qkv", tok * (H + KV), hd, False, "layer")
        if m.rope:  # rotate_half is a permutation of feature ciphertexts: 2 plaintext products + 1 add
            f.need("qkv", 1, tok * (q_cols + kv_cols))
            f.mm_work("activation/rope/residual", tok * (q_cols + kv_cols) / S, mulp=2, add=1, resc=1)
            f.use("qkv", 1)
        # attention: q·K^T (CRMM) and p·V (DCMM), ct x ct
        f.need("qkv", 2, tok * (q_cols + 2 * kv_cols))
        if T > 1:  # Euston's diagonal method per head on T x ctx blocks of S/T sequences
            n_blk = H * tok / S
            f.mm_work("attention (ct×ct)", n_blk, rot=2 * hd * ctx, mulp=2 * hd * ctx, tensor=hd * ctx,
                      relin=ctx, add=2 * hd * ctx, resc=hd * ctx + ctx)
        else:  # one query: broadcast q_i over the cached keys (log2 ctx rotations), multiply, accumulate
            n_kv = H * batch * ctx / S
            f.mm_work("attention (ct×ct)", n_kv, rot=hd * log2c(ctx), tensor=hd, relin=1, add=hd * (1 + log2c(ctx)),
                      resc=1)
        f.use("qkv", 2, "scores")
        per_score, per_row = alg.softmax()
        score_elems = H * T * ctx * batch
        row_sum_rot = 0.0 if T > 1 else log2c(ctx)  # diagonal packing sums over keys with additions
        f.deep_op("softmax", "scores", "probs", score_elems, per_score, extra=[(1.0 / ctx, per_row)],
                  rot_per_ct=row_sum_rot)
        f.need("probs", 2, score_elems)
        if T > 1:
            n_blk = H * tok / S
            f.mm_work("attention (ct×ct)", n_blk, rot=2 * hd * T, mulp=2 * hd * T, tensor=hd * ctx,
                      add=hd * (T + ctx), resc=hd * T + hd)
        else:
            n_kv = H * batch * ctx / S
            f.mm_work("attention (ct×ct)", n_kv, rot=hd * log2c(ctx), tensor=hd, add=hd * (1 + log2c(ctx)), resc=hd)
        f.levels["attn"] = min(f.levels["probs"], f.levels.get("qkv", 0)) - 2
        f.need("attn", 1, tok * q_cols)
        _fhe_linear(f, "linear (ct×pt)", tok, q_cols, d)
        f.mm_work("activation/rope/residual", tok * d / S, add=1)
        f.use("attn", 1, "r1")
        _fhe_norm(f, "r1", "h2", tok, d, centred, "layer")
        f.need("h2", 1, tok * d)
        up = m.d_ff * (2 if m.gated else 1)
        _fhe_linear(f, "linear (ct×pt)", tok, d, up)
        f.use("h2", 1, "ff1")
        f.deep_op("activation", "ff1", "act", tok * m.d_ff, alg.activation(m.gated))
        f.need("act", 1, tok * m.d_ff)
        _fhe_linear(f, "linear (ct×pt)", tok, m.d_ff, d)
        f.mm_work("activation/rope/residual", tok * d / S, add=1)
        f.use("act", 1, "x")
    # the client: encrypt the embedded input, decrypt the output (logits, or the last hidden state)
    t = p.tee
    cost_per_ct = (mm.poly_modulus_degree * len(mm.coeff_mod_bit_sizes)) / (
        p.accelerator.linear.poly_modulus_degree * len(p.accelerator.linear.coeff_mod_bit_sizes))
    f.charge("encrypt", tok * d / S * t.encrypt_ct_s * cost_per_ct, tok * d / S, "io")
    if lm_head:
        _fhe_norm(f, "x", "xf", tok, d, centred, "head")
        f.need("xf", 1, tok * d, "head")
        _fhe_linear(f, "lm head", tok, d, m.vocab, "head")
        f.charge("decrypt", tok * m.vocab / S * t.decrypt_ct_s * cost_per_ct, tok * m.vocab / S, "io")
    else:
        f.charge("decrypt", tok * d / S * t.decrypt_ct_s * cost_per_ct, tok * d / S, "io")
    return f.cost()


# ------------------------------------------------------------------------------------------------
def estimate(profile: Profile, shape: ModelShape, scheme: str, prompt_len: int, new_tokens: int,
             batch: int = 1, layers_only: bool = False, alg: FHEAlgorithms | None = None,
             linear_packing: str = "backend") -> Estimate:
    """TTFT (prefill forward) + one forward per further token; context grows by one each step.

    ``batch`` > 1 amortises: every forward processes ``batch`` independent sequences at once (rows
    packed together into ciphertexts) and the reported times are per sequence (cost / batch).
    ``layers_only`` drops the ``head`` terms (final norm, LM head, sampling, per-forward overhead) of
    every scheme, keeping the decoder layers and, for fhe, the client's encryption/decryption (Euston
    composes decoder layers only). ``linear_packing="column"`` evaluates Bifrost's prefill forward with
    Euston's column packing instead of the backend's own plan (what-if, for the comparison with Euston;
    decode steps keep the backend's plan, where one token per sequence would leave the columns empty).
    """
    if scheme not in SCHEMES:
        raise UserError(f"unknown scheme {scheme!r}; choose one of {', '.join(SCHEMES)} or all")
    if linear_packing not in LINEAR_PACKINGS:
        raise UserError(f"unknown linear packing {linear_packing!r}; choose one of {', '.join(LINEAR_PACKINGS)}")
    if prompt_len < 1 or new_tokens < 1 or batch < 1:
        raise UserError("need --prompt-len >= 1, --new-tokens >= 1 and --batch >= 1")
    if prompt_len + new_tokens > shape.max_positions:
        raise UserError(f"prompt ({prompt_len}) + new tokens ({new_tokens}) exceeds {shape.name}'s context "
                           f"of {shape.max_positions}")
    alg = alg or FHEAlgorithms()

    def fwd(rows: int, ctx: int, prefill: bool) -> Cost:
        if scheme == "fhe":
            c = forward_fhe(profile, shape, rows, ctx, batch, alg, lm_head=not layers_only)
        else:
            c = forward_bifrost(profile, shape, rows * batch, ctx, local_linears=prefill and scheme == "bifrost+",
                                batch=batch, packing=linear_packing if prefill else "backend", prefill=prefill)
        if layers_only:
            c = c.without_scope("head")
        return c.scaled(1.0 / batch)

    prefill = fwd(prompt_len, prompt_len, True)
    decode = [fwd(1, prompt_len + i + 1, False) for i in range(new_tokens - 1)]
    return Estimate(scheme, shape.name, profile.name, prompt_len, new_tokens, batch, prefill, decode, layers_only)
