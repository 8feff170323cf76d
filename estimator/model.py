"""Per-operator latency model: count operations per layer, multiply by per-operation costs, sum.

Three schemes (see ``estimator/README.md`` for the term-by-term derivation):

- ``bifrost``: every forward (prefill of the whole prompt, then one per new token) sends each delegated
  linear group through CKKS on the accelerator (BSGS diagonal method, exactly the TenSEAL backend's
  packing plan), encrypts/decrypts in the TEE (one refresh per group), moves the ciphertexts over the link,
  and runs everything else (norms, attention with the KV cache, softmax, activations, RoPE, LM head,
  sampling) in plaintext in the TEE.
- ``bifrost+``: as ``bifrost`` but the prefill forward runs entirely inside the TEE in plaintext.
- ``fhe``: everything encrypted on the accelerator: linear layers as ct×pt BSGS matmuls in a shallow
  context, attention as ct×ct products, softmax/norm/activation as polynomial approximations in a deep
  context, and bootstrapping whenever an operator's depth exceeds the levels a ciphertext has left.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from dataclasses import dataclass, field

from bifrost.ckks.backend import GroupShape
from bifrost.ckks.tenseal_backend import PackingPlan
from bifrost.errors import BifrostError

from .profile import CKKSOps, Profile
from .shapes import LinearGroup, ModelShape, ceil_div, log2c

SCHEMES = ("fhe", "bifrost", "bifrost+")
DEVICES = ("accelerator", "tee", "link")


@dataclass(frozen=True)
class FHEAlgorithms:
    """Polynomial-approximation recipes of the all-FHE baseline: ct×ct multiplications and depth per ciphertext.

    Defaults follow the usual CKKS transformer recipes (Euston-style per-operator composition):
    exp(x) ≈ (1 + x/2^r)^(2^r); 1/x by Goldschmidt; 1/sqrt(x) by Newton; GELU/SiLU by a composite
    minimax polynomial. They are algorithmic choices, not hardware numbers, and are printed with --json.
    """

    exp_squarings: int = 8  # (1 + x/2^8)^(2^8): 8 squarings (+1 plaintext mult)
    inverse_iterations: int = 10  # Goldschmidt, 2 ct-mults per iteration, depth 1 each
    isqrt_iterations: int = 6  # Newton y(3 - x y^2)/2: 3 ct-mults, depth 2 each
    act_mults: int = 30  # GELU / SiLU composite polynomial
    act_depth: int = 12

    def softmax(self) -> tuple[int, int]:
        return 1 + self.exp_squarings + 2 * self.inverse_iterations + 1, self.exp_squarings + 1 + self.inverse_iterations + 1

    def norm(self) -> tuple[int, int]:
        return 1 + 3 * self.isqrt_iterations + 2, 1 + 2 * self.isqrt_iterations + 2


@dataclass
class Term:
    op: str
    device: str
    seconds: float
    count: float = 0.0


@dataclass
class Cost:
    """Terms of one forward pass (or a sum of them)."""

    terms: list[Term] = field(default_factory=list)

    def add(self, op: str, device: str, seconds: float, count: float = 0.0) -> None:
        self.terms.append(Term(op, device, float(seconds), float(count)))

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

    def scaled(self, factor: float) -> "Cost":
        return Cost([Term(t.op, t.device, t.seconds * factor, t.count * factor) for t in self.terms])

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
            return {"total_s": c.total, "by_op": c.by("op"), "by_device": c.by("device"), "op_counts": c.counts()}

        return {"scheme": self.scheme, "model": self.model, "profile": self.profile, "prompt_len": self.prompt_len,
                "new_tokens": self.new_tokens, "batch": self.batch, "ttft_s": self.ttft_s,
                "per_token_s": self.per_token_s, "total_s": self.total_s,
                "prefill": stage(self.prefill), "decode_mean": stage(self.decode_cost())}


# ------------------------------------------------------------------------------------------------
# Operation counts
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


def bsgs_counts(slots: int, group: LinearGroup, rows: int) -> LinearCounts:
    """Counts of the TenSEAL backend's baby-step/giant-step evaluation (see tenseal_backend.apply)."""
    plan = PackingPlan.for_shape(slots, GroupShape(group.d_in, group.d_outs))
    n = ceil_div(rows, plan.rows_per_ct)
    outs = sum(plan.out_chunks(d) for d in group.d_outs)
    rot = n * (plan.in_chunks * (plan.baby - 1) + outs * (plan.giant - 1))
    mul = n * outs * plan.in_chunks * plan.a  # all-zero padding diagonals (rare) are not subtracted
    rescale = n * outs * plan.giant
    return LinearCounts(rot, mul, mul + outs * n * (plan.giant - 1), rescale, n * plan.in_chunks, n * outs)


def coeff_counts(ops: CKKSOps, group: LinearGroup, rows: int) -> LinearCounts:
    """Counts of the native backend's coefficient blocking (kernels/layout.py): no rotations."""
    from bifrost_kernels.layout import plan
    from bifrost_kernels.rns import ntt_primes

    bits = tuple(q.bit_length() for q in ntt_primes(ops.poly_modulus_degree, tuple(ops.coeff_mod_bit_sizes)))
    blk = plan(ops.poly_modulus_degree, bits, group.d_in, tuple(group.d_outs), rows)
    rb, kin = blk.row_blocks(rows), blk.in_blocks(group.d_in)
    kout = sum(blk.out_blocks(d) for d in group.d_outs)
    return LinearCounts(0, rb * kin * kout, rb * kin * kout, rb * kout, rb * kin, rb * kout)


def linear_counts(backend: str, ops: CKKSOps, group: LinearGroup, rows: int) -> LinearCounts:
    if backend == "native":
        return coeff_counts(ops, group, rows)
    return bsgs_counts(ops.slots, group, rows)


def _ckks_seconds(ops: CKKSOps, c: LinearCounts) -> float:
    return c.rotations * ops.rotate_s + c.mul_plain * ops.mul_plain_s + c.adds * ops.add_s + c.rescales * ops.rescale_s


def _gemm_s(profile: Profile, rows: int, d_in: int, d_out: int) -> float:
    """Plaintext float32 matmul in the TEE: compute-bound or weight-streaming-bound, whichever is slower."""
    t = profile.tee
    return max(2.0 * rows * d_in * d_out / t.gemm_flops, 4.0 * d_in * d_out / t.mem_bandwidth_Bps)


# ------------------------------------------------------------------------------------------------
# One forward pass per scheme. rows = tokens in this forward (x batch); ctx = keys per query after it.
# ------------------------------------------------------------------------------------------------
def _tee_nonlinear(cost: Cost, p: Profile, m: ModelShape, rows: int, ctx: int, batch: int) -> None:
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
    overhead = t.layer_overhead_s.get(m.family, max(t.layer_overhead_s.values(), default=0.0))
    cost.add("framework", "tee", L * overhead * batch + t.forward_overhead_s * batch)
    cost.add("norm", "tee", rows * d * t.norm_s_per_elem)  # final norm
    cost.add("lm head", "tee", _gemm_s(p, rows, d, m.vocab), rows * d * m.vocab)
    cost.add("sampling", "tee", batch * m.vocab * t.sample_s_per_vocab)


def forward_bifrost(p: Profile, m: ModelShape, rows: int, ctx: int, local_linears: bool, batch: int = 1) -> Cost:
    cost = Cost()
    a, t, link = p.accelerator, p.tee, p.link
    for g in m.groups():
        if local_linears:
            cost.add("linear (plaintext)", "tee", m.n_layers * _gemm_s(p, rows, g.d_in, sum(g.d_outs)),
                     m.n_layers * rows * g.macs)
            cost.add("framework", "tee", m.n_layers * t.call_overhead_s)
            continue
        c = linear_counts(a.backend, a.linear, g, rows)
        L = m.n_layers
        acc = a.efficiency * (_ckks_seconds(a.linear, c) + c.cts_in * a.ct_load_s + c.cts_out * a.ct_dump_s) \
            + a.call_overhead_s
        cost.add("linear (CKKS)", "accelerator", L * acc, L * (c.rotations + c.mul_plain))
        cost.add("encrypt", "tee", L * c.cts_in * t.encrypt_ct_s, L * c.cts_in)
        cost.add("decrypt", "tee", L * c.cts_out * t.decrypt_ct_s, L * c.cts_out)
        cost.add("framework", "tee", L * t.call_overhead_s)
        nbytes = c.cts_in * link.ct_in_bytes + c.cts_out * link.ct_out_bytes
        cost.add("transfer", "link", L * (nbytes / link.bandwidth_Bps + link.latency_s), L * nbytes)
    _tee_nonlinear(cost, p, m, rows, ctx, batch)
    return cost


def forward_fhe(p: Profile, m: ModelShape, rows: int, ctx: int, alg: FHEAlgorithms, batch: int = 1,
                lm_head: bool = True) -> Cost:
    if p.fhe is None:
        raise BifrostError(f"hardware profile {p.name!r} has no 'fhe' section: cannot estimate the fhe scheme")
    mm, deep = p.fhe.matmul, p.fhe.deep
    S = deep.slots
    d, H, KV, hd, L = m.d_model, m.n_heads, m.n_kv_heads, m.head_dim, m.n_layers
    cost = Cost()

    def boots(n_ct: int, depth: int) -> int:
        return n_ct * ceil_div(depth, deep.usable_levels)

    def nonlin(op: str, elems: int, mults: int, depth: int, rotations: int = 0, instances: int = 1) -> None:
        n = ceil_div(elems, S)
        sec = n * (mults * (deep.mul_ct_s + deep.rescale_s) + rotations * deep.rotate_s + 2 * mults * deep.add_s)
        cost.add(op, "accelerator", L * instances * sec, L * instances * n * mults)
        b = boots(n, depth)
        cost.add("bootstrap", "accelerator", L * instances * b * deep.bootstrap_s, L * instances * b)

    for g in m.groups():
        c = bsgs_counts(mm.slots, g, rows)
        cost.add("linear (ct×pt)", "accelerator", L * _ckks_seconds(mm, c), L * (c.rotations + c.mul_plain))
    # attention: q·K^T and p·V as ct×ct SIMD products + rotation trees for the reductions
    qk = ceil_div(rows * ctx * H * hd, S)
    att_s = qk * (2 * (deep.mul_ct_s + deep.rescale_s) + (log2c(hd) + log2c(ctx)) * (deep.rotate_s + deep.add_s))
    cost.add("attention (ct×ct)", "accelerator", L * att_s, L * 2 * qk)
    qkv_cts = ceil_div(rows * (H + 2 * KV) * hd, S)
    cost.add("bootstrap", "accelerator", L * qkv_cts * deep.bootstrap_s, L * qkv_cts)  # matmul -> deep context
    sm_mults, sm_depth = alg.softmax()
    nonlin("softmax", rows * H * ctx, sm_mults, sm_depth, rotations=log2c(ctx))
    n_mults, n_depth = alg.norm()
    nonlin("norm", rows * d, n_mults, n_depth, rotations=2 * log2c(d), instances=2)
    if m.qk_norm:
        nonlin("norm", rows * (H + KV) * hd, n_mults, n_depth, rotations=2 * log2c(hd))
    nonlin("activation", rows * m.d_ff, alg.act_mults + (1 if m.gated else 0), alg.act_depth)
    if m.rope:
        n = ceil_div(rows * (H + KV) * hd, S)
        cost.add("activation/rope/residual", "accelerator", L * n * (2 * deep.mul_plain_s + deep.rotate_s), L * n)
    n_res = ceil_div(rows * d, S)
    cost.add("activation/rope/residual", "accelerator", L * 2 * n_res * deep.add_s, L * 2 * n_res)
    if lm_head:
        n_mults, n_depth = alg.norm()
        n = ceil_div(rows * d, S)
        cost.add("norm", "accelerator", n * n_mults * (deep.mul_ct_s + deep.rescale_s) + boots(n, n_depth) * deep.bootstrap_s)
        c = bsgs_counts(mm.slots, LinearGroup("lm_head", d, (m.vocab,)), rows)
        cost.add("lm head", "accelerator", _ckks_seconds(mm, c), c.rotations + c.mul_plain)
        # client: encrypt the embedded prompt, decrypt the logits (TEE-class CPU costs per ciphertext)
        cost.add("encrypt", "tee", ceil_div(rows * d, mm.slots) * p.tee.encrypt_ct_s)
        cost.add("decrypt", "tee", c.cts_out * p.tee.decrypt_ct_s)
    return cost


def estimate(profile: Profile, shape: ModelShape, scheme: str, prompt_len: int, new_tokens: int,
             batch: int = 1, layers_only: bool = False, alg: FHEAlgorithms | None = None) -> Estimate:
    """TTFT (prefill forward) + one forward per further token; context grows by one each step.

    ``batch`` > 1 amortises: every forward processes ``batch`` independent sequences at once (rows
    packed together into ciphertexts) and the reported times are per sequence (cost / batch).
    ``layers_only`` drops the LM head, final norm, sampling and per-forward overhead (Euston-style
    per-layer composition).
    """
    if scheme not in SCHEMES:
        raise BifrostError(f"unknown scheme {scheme!r}; choose one of {', '.join(SCHEMES)} or all")
    if prompt_len < 1 or new_tokens < 1 or batch < 1:
        raise BifrostError("need --prompt-len >= 1, --new-tokens >= 1 and --batch >= 1")
    if prompt_len + new_tokens > shape.max_positions:
        raise BifrostError(f"prompt ({prompt_len}) + new tokens ({new_tokens}) exceeds {shape.name}'s context "
                           f"of {shape.max_positions}")
    alg = alg or FHEAlgorithms()

    def fwd(rows: int, ctx: int, prefill: bool) -> Cost:
        if scheme == "fhe":
            c = forward_fhe(profile, shape, rows * batch, ctx, alg, batch, lm_head=not layers_only)
        else:
            c = forward_bifrost(profile, shape, rows * batch, ctx, local_linears=prefill and scheme == "bifrost+",
                                batch=batch)
        if layers_only:
            c = Cost([t for t in c.terms if t.op not in ("lm head", "sampling")])
        return c.scaled(1.0 / batch)

    prefill = fwd(prompt_len, prompt_len, True)
    decode = [fwd(1, prompt_len + i + 1, False) for i in range(new_tokens - 1)]
    return Estimate(scheme, shape.name, profile.name, prompt_len, new_tokens, batch, prefill, decode)


def with_overrides(alg: FHEAlgorithms, **kw) -> FHEAlgorithms:
    return dataclasses.replace(alg, **{k: v for k, v in kw.items() if v is not None})
