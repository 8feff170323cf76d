"""Malicious CKKS workers: real workers (real keys, real kernels, mutual TLS) that deviate from the protocol
on the calls an attack picks, and record everything they observe.

An :class:`AdversarialService` answers every call honestly first and then lets its attack rewrite (or
replace, or refuse) the reply, with full access to what a compromised worker has: the worker session's
evaluator (public context), the input ciphertexts, its own weights and every earlier reply. Its
``observed`` list is the worker's whole view of the trusted side, minus timing: each request's method,
worker session (by order of first appearance), layer group and byte sizes. Two runs whose views are equal are
indistinguishable to the worker.
"""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import grpc
import numpy as np

from bifrost.ckks import GroupShape
from bifrost.worker.service import WorkerService


@dataclass(frozen=True)
class Observation:
    method: str
    worker_session: int       # order of first appearance of the worker session id (ids themselves are random)
    group: tuple[str, ...]
    sizes: tuple[int, ...]    # bytes of every ciphertext (or public context) received


@dataclass
class Call:
    """One layer call as the attacker sees it (one item of a batch counts as one call)."""

    index: int                       # calls answered so far by this worker (0-based)
    group: tuple[str, ...]
    evaluator: object                # the worker session's evaluator (public context only)
    inputs: list[bytes]
    outputs: list[list[bytes]]       # the honest reply
    service: "AdversarialService"

    @property
    def rows(self) -> int:
        """Activation rows of the call (padding included): 1 for a decode step, more for a prefill call."""
        from bifrost_kernels import wire

        return wire._IN_HEAD.unpack_from(self.inputs[0])[4]

    def layer_calls(self, name: str) -> int:
        """How many earlier calls included layer ``name``."""
        return self.service.calls_by_layer.get(name, 0)


class Abort(Exception):
    """Raised by an attack to answer with an error status instead of a reply."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


Attack = Callable[[Call], "list[list[bytes]] | None"]


class AdversarialService(WorkerService):
    """A worker that runs ``attack`` on every reply (None: honest) and records its view."""

    def __init__(self, base: WorkerService, attack: Attack | None = None) -> None:
        super().__init__(base.model_name, [(s, w) for s, w in base.layers.values()], base.limits)
        self.attack = attack
        self.observed: list[Observation] = []
        self.history: list[Call] = []          # every call, honest outputs included
        self.calls_by_layer: dict[str, int] = {}
        self.deviated: list[int] = []          # indices of calls the attack changed
        self.timeline: list[tuple[float, float]] = []  # (request received, reply sent) per layer call, monotonic s
        self._ids: dict[str, int] = {}
        self._view_lock = threading.Lock()

    def _observe(self, method: str, session_id: str, group, blobs) -> None:
        with self._view_lock:
            sid = self._ids.setdefault(session_id, len(self._ids)) if session_id else -1
            names = tuple(ref.name for ref in group.layers) if group is not None else ()
            self.observed.append(Observation(method, sid, names, tuple(len(b) for b in blobs)))

    def OpenSession(self, request, context):
        reply = super().OpenSession(request, context)
        self._observe("OpenSession", reply.session_id, None, [request.public_context])
        return reply

    def CloseSession(self, request, context):
        self._observe("CloseSession", request.session_id, None, [])
        return super().CloseSession(request, context)

    def _attacked(self, session_id, group, inputs, outputs, context):
        names = tuple(ref.name for ref in group.layers)
        call = Call(len(self.history), names, self._worker_sessions[session_id].evaluator, list(inputs), outputs, self)
        self.history.append(call)
        try:
            new = self.attack(call) if self.attack is not None else None
        except Abort as exc:
            self.deviated.append(call.index)
            context.abort(exc.code, exc.message)
        finally:
            for n in names:
                self.calls_by_layer[n] = self.calls_by_layer.get(n, 0) + 1
        if new is None:
            return outputs
        self.deviated.append(call.index)
        return new

    def Linear(self, request, context):
        received = time.monotonic()
        self._observe("Linear", request.session_id, request.group, request.ciphertexts)
        reply = super().Linear(request, context)
        outputs = self._attacked(request.session_id, request.group, request.ciphertexts,
                                 [list(o.ciphertexts) for o in reply.outputs], context)
        del reply.outputs[:]
        for o in outputs:
            reply.outputs.add().ciphertexts.extend(o)
        self.timeline.append((received, time.monotonic()))
        return reply

    def LinearBatch(self, request, context):
        for item in request.items:
            self._observe("LinearBatch", item.session_id, request.group, item.ciphertexts)
        reply = super().LinearBatch(request, context)
        for item, result in zip(request.items, reply.results):
            outputs = self._attacked(item.session_id, request.group, item.ciphertexts,
                                     [list(o.ciphertexts) for o in result.outputs], context)
            del result.outputs[:]
            for o in outputs:
                result.outputs.add().ciphertexts.extend(o)
        return reply


# ------------------------------------------------------------------ native ciphertext surgery
def _codec(evaluator):
    return evaluator._codec


def native_unpack(evaluator, ct: bytes) -> tuple[bytes, np.ndarray]:
    """(header, residues [L, r·n_o]: the output's wanted coefficients mod each prime) of a native output."""
    from bifrost_kernels import wire

    c = _codec(evaluator)
    fields = wire._OUT_HEAD.unpack_from(ct)
    p = fields[5] * fields[7]  # r·n_o
    head = ct[:wire._OUT_HEAD.size]
    body = np.frombuffer(ct[wire._OUT_HEAD.size:], dtype=np.uint8)[None]
    return head, wire.unpack_residues(body, p, c.primes)[0]


def native_pack(evaluator, head: bytes, values: np.ndarray) -> bytes:
    from bifrost_kernels import wire

    c = _codec(evaluator)
    q = np.array(c.primes)[:, None]
    return head + wire.pack_residues(np.mod(values, q)[None], c.bits)[0].tobytes()


def native_combine(evaluator, ct: bytes, other: bytes | None, k_self: int = 1, k_other: int = 1,
                   add_c0: dict[int, int] | None = None) -> bytes:
    """k_self·ct + k_other·other (+ constants on chosen coefficients), mod each prime."""
    head, v = native_unpack(evaluator, ct)
    out = v * k_self
    if other is not None:
        out = out + native_unpack(evaluator, other)[1] * k_other
    for pos, value in (add_c0 or {}).items():
        out[:, pos] += np.array([value % q for q in _codec(evaluator).primes])
    return native_pack(evaluator, head, out)


def encrypted_dot(call: Call, member: int, row: int, w: np.ndarray) -> list[bytes]:
    """Ciphertexts (member ``member``'s layout) whose output ``row`` encrypts ⟨w, x⟩ and every other output
    0: the worker multiplies the input ciphertexts by weights of its own choosing (the half-space probe)."""
    d_outs = [len(o) for o in call.outputs]
    site = call.service.layers[call.group[member]][0]
    shape = GroupShape(site.d_in, tuple(call.service.layers[n][0].d_out for n in call.group))
    fake = [np.zeros((call.service.layers[n][0].d_out, site.d_in)) for n in call.group]
    fake[member][row] = w
    prepared = call.evaluator.prepare(shape, fake)
    out = call.evaluator.apply(prepared, call.inputs)
    assert [len(o) for o in out] == d_outs
    return out[member]


# ------------------------------------------------------------------ attacks
def on_layer(name: str, occurrence: int = 0):
    """A predicate: the ``occurrence``-th call of layer ``name`` (0: the prompt's prefill, 1: the first decode step)."""
    return lambda call: name in call.group and call.layer_calls(name) == occurrence


def half_space_probe(when, direction: np.ndarray, gain: int, replace: bool = False) -> Attack:
    """The attack of issue 13: in the chosen call, add (or, ``replace``, substitute) gain·Enc(⟨w, x⟩) on one
    output. Whether the trusted side notices depends on |⟨w, x⟩|, i.e. on the plaintext: a yes/no query."""
    def attack(call: Call):
        if not when(call):
            return None
        probe = encrypted_dot(call, 0, 0, direction)
        member = [native_combine(call.evaluator, ct, p, 0 if replace else 1, gain) if i == 0 else ct
                  for i, (ct, p) in enumerate(zip(call.outputs[0], probe))]
        return [member] + call.outputs[1:]
    return attack


def rewrite_first(when, fn) -> Attack:
    """An attack that replaces the first output ciphertext of member 0 by ``fn(call, ciphertext)``."""
    def attack(call: Call):
        if not when(call):
            return None
        member = list(call.outputs[0])
        member[0] = fn(call, member[0])
        return [member] + call.outputs[1:]
    return attack


def scaled_output(when, factor: int) -> Attack:
    """Multiply one output ciphertext by ``factor`` (the native analogue of the old worker-chosen scale)."""
    return rewrite_first(when, lambda call, ct: native_combine(call.evaluator, ct, None, factor))


def constant_on_one_output(when, value: int) -> Attack:
    """Add ``value`` (units of the encoded product, Δx·Δw) to one decoded output: its wanted coefficient."""
    return rewrite_first(when, lambda call, ct: native_combine(call.evaluator, ct, None, add_c0={0: value}))


def scaled_row(when, factor: int) -> Attack:
    """Multiply every output ciphertext of the first row block by ``factor``: one token's whole row when
    every row has its own ciphertexts (decode steps, short prompts)."""
    def attack(call: Call):
        if not when(call):
            return None
        from bifrost_kernels import wire

        outs = []
        for member in call.outputs:
            new = []
            for ct in member:
                _, _, _, _, rows, r, _, _, _, index, count = wire._OUT_HEAD.unpack_from(ct)
                per_block = count // -(-rows // r)  # output ciphertexts per row block
                new.append(native_combine(call.evaluator, ct, None, factor) if index < per_block else ct)
            outs.append(new)
        return outs
    return attack


def replay(when, source=lambda call, earlier: earlier[-1]) -> Attack:
    """Answer with the honest reply of an earlier call of the same group (byte for byte)."""
    def attack(call: Call):
        if not when(call):
            return None
        earlier = [c for c in call.service.history[:-1] if c.group == call.group
                   and [len(o) for o in c.outputs] == [len(o) for o in call.outputs]]
        if not earlier:
            return None
        return [list(o) for o in source(call, earlier).outputs]
    return attack


def other_weights(when, swap: dict[str, str]) -> Attack:
    """Compute with another layer's weights (same shape): e.g. layer 1's c_fc instead of layer 0's."""
    def attack(call: Call):
        if not when(call) or call.group[0] not in swap:
            return None
        site = call.service.layers[call.group[0]][0]
        shape = GroupShape(site.d_in, (site.d_out,))
        prepared = call.evaluator.prepare(shape, [call.service.layers[swap[call.group[0]]][1]])
        return call.evaluator.apply(prepared, call.inputs)
    return attack


def flipped_bits(when, seed: int = 0, count: int = 8, header: bool = False) -> Attack:
    """Flip bits of the reply: the top bit of ``count`` random coefficients (or one header byte)."""
    def attack(call: Call):
        if not when(call):
            return None
        rng = random.Random(seed + call.index)
        member = list(call.outputs[0])
        i = rng.randrange(len(member))
        if header:
            b = bytearray(member[i]); b[30] ^= 0x40
            member[i] = bytes(b)
        else:
            head, v = native_unpack(call.evaluator, member[i])                 # [L, r·n_o]
            top = 1 << (_codec(call.evaluator).bits[0] - 2)
            for pos in rng.sample(range(v.shape[1]), min(count, v.shape[1])):
                v[0, pos] ^= top
            member[i] = native_pack(call.evaluator, head, v)
        return [member] + call.outputs[1:]
    return attack


def input_as_output(when) -> Attack:
    """Return the input ciphertexts as the output."""
    def attack(call: Call):
        if not when(call):
            return None
        return [list(call.inputs[: len(o)]) for o in call.outputs]
    return attack


def error_status(when, code: grpc.StatusCode = grpc.StatusCode.INVALID_ARGUMENT) -> Attack:
    def attack(call: Call):
        if when(call):
            raise Abort(code, "refusing this one")
        return None
    return attack


def oversized(when, extra_bytes: int) -> Attack:
    """Append junk to one output ciphertext."""
    return rewrite_first(when, lambda call, ct: ct + bytes(extra_bytes))


def legacy_tolerance(call: Call, member: int = 0, z: float = 8.0) -> float:
    """τ of the tolerance check the native backend had before exact verification, in units of the encoded product
    (Δx·Δw), for ``call``'s member: z·√d_out·ε with ε = 32·n_o·(‖W̃‖_row + d_in/2) + the float64 decode term. A
    function of public data only (N, Q, scale bits, n_o, the public weights): a worker computes it exactly."""
    from bifrost_kernels import wire
    from bifrost_kernels.backend import ERROR_MAX, integer_weights

    ev = call.evaluator
    site, w = call.service.layers[call.group[member]]
    n_o = wire._OUT_HEAD.unpack_from(call.outputs[member][0])[7]
    w_row = float(np.abs(integer_weights(ev.weight_bits, np.asarray(w, dtype=np.float64))).sum(axis=1).max())
    eps = ERROR_MAX * n_o * (w_row + site.d_in / 2) + 2.0 ** -45 * 2.0 ** ev.params.scale_bits * (w_row + site.d_in)
    return z * float(np.sqrt(site.d_out)) * eps


def add_to_outputs(call: Call, member: int, delta: np.ndarray) -> list[list[bytes]]:
    """The honest reply with the integer vector ``delta`` (d_out, units of the encoded product) added to the
    outputs of member ``member`` in every row block (output k sits at wanted coefficient k mod n_o of output
    block k // n_o)."""
    from bifrost_kernels import wire

    outs = [list(o) for o in call.outputs]
    for i, ct in enumerate(outs[member]):
        fields = wire._OUT_HEAD.unpack_from(ct)
        rows, r, n_o, index, count = fields[4], fields[5], fields[7], fields[9], fields[10]
        per_block = count // -(-rows // r)  # output blocks per row block
        ob = index % per_block
        head, v = native_unpack(call.evaluator, ct)                               # [L, r·n_o]
        part = np.zeros(v.shape[1], dtype=np.int64)
        chunk = delta[ob * n_o:(ob + 1) * n_o]
        part[:len(chunk)] = chunk
        outs[member][i] = native_pack(call.evaluator, head, v + part[None, :])
    return outs


def steering(layers: set[str], fraction: float, direction: Callable[[str, int], np.ndarray], decode_only: bool = True
             ) -> Attack:
    """Issue 23's steering attack: after computing honestly, add a fixed, data-independent deviation δ to every
    (decode) output of ``layers``, along ``direction(layer, d_out)`` (chosen offline from public weights) with
    ‖δ‖₂ = ``fraction``·τ, τ being the pre-exact-verification tolerance (:func:`legacy_tolerance`)."""
    def attack(call: Call):
        if call.group[0] not in layers or (decode_only and call.rows != 1):
            return None
        site = call.service.layers[call.group[0]][0]
        d = np.asarray(direction(call.group[0], site.d_out), dtype=np.float64)
        delta = np.rint(d / np.linalg.norm(d) * fraction * legacy_tolerance(call)).astype(np.int64)
        return add_to_outputs(call, 0, delta)
    return attack


def one_residue(when, prime: int = 1, delta: int = 1) -> Attack:
    """±1 (``delta``) in a single residue (mod q_prime) of one wanted coefficient of one output ciphertext."""
    def change(call: Call, ct: bytes) -> bytes:
        head, v = native_unpack(call.evaluator, ct)
        v[prime, 0] += delta
        return native_pack(call.evaluator, head, v)
    return rewrite_first(when, change)


def prefill_only(call: Call) -> bool:
    """Every prompt-prefill call (more than one row), none of the decode steps."""
    return call.rows > 1


def one_call_in(n: int, inner_factory, seed: int = 1) -> Attack:
    """Honest except on one random call in every ``n`` (``inner_factory(when)`` builds the deviation)."""
    rng = random.Random(seed)
    chosen = {k * n + rng.randrange(n) for k in range(1000)}
    return inner_factory(lambda call: call.index in chosen)


# ------------------------------------------------------------------ TenSEAL surgery
def tenseal_edit(call: Call, blob: bytes, fn) -> bytes:
    """``blob`` (an output ciphertext of member 0) with ``fn(evaluator, seal_ciphertext)`` applied in place."""
    from bifrost.ckks.tenseal_backend import _HEADER_BYTES, PackingPlan, _load_ciphertext, _scratch

    ev = call.evaluator
    site = call.service.layers[call.group[0]][0]
    plan = PackingPlan.for_shape(ev.params.slots, GroupShape(site.d_in, (site.d_out,)))
    ct = _load_ciphertext(ev._ctx, ev.context_id, plan, blob)
    fn(ev, ct)
    return blob[:_HEADER_BYTES] + _scratch().dump(ct)


def tenseal_rewrite(when, fn) -> Attack:
    """Apply ``fn(evaluator, seal_ciphertext)`` (in place) to the first output ciphertext of member 0."""
    return rewrite_first(when, lambda call, blob: tenseal_edit(call, blob, fn))


def tenseal_public_tolerance(call: Call, member: int = 0, z: float = 8.0) -> float:
    """TenSEAL's tolerance τ = z·√d_out·ε for ``call``'s member as a worker can compute it: ε from the backend's
    documented bound with the input's (secret) ‖x‖₁ taken as 0, i.e. a slight underestimate of the true τ."""
    from bifrost.ckks.tenseal_backend import ERROR_FLOOR, ERROR_PER_WEIGHT

    ev = call.evaluator
    site, w = call.service.layers[call.group[member]]
    row_l1 = float(np.abs(np.asarray(w, dtype=np.float64)).sum(axis=1).max())
    eps = 2.0 ** -ev.params.scale_bits * np.sqrt(ev.params.poly_modulus_degree) * (ERROR_FLOOR + ERROR_PER_WEIGHT * row_l1)
    return z * float(np.sqrt(site.d_out)) * eps


def tenseal_steering(layers: set[str], fraction: float, direction: Callable[[str, int], np.ndarray]) -> Attack:
    """The steering attack against TenSEAL: δ along ``direction`` with ‖δ‖₂ = ``fraction``·τ
    (:func:`tenseal_public_tolerance`) added, by a plaintext addition, to row 0 of every decode output of ``layers``."""
    def attack(call: Call):
        if call.group[0] not in layers or call.layer_calls(call.group[0]) < 1:  # occurrence 0: the prefill
            return None
        import tenseal.sealapi as seal

        from bifrost.ckks.tenseal_backend import PackingPlan

        ev = call.evaluator
        site = call.service.layers[call.group[0]][0]
        m = PackingPlan.for_shape(ev.params.slots, GroupShape(site.d_in, (site.d_out,))).m
        d = np.asarray(direction(call.group[0], site.d_out), dtype=np.float64)
        delta = d / np.linalg.norm(d) * fraction * tenseal_public_tolerance(call)

        def add_chunk(c: int):
            def add(ev, ct):
                slots = np.zeros(ev.params.slots)
                chunk = delta[c * m:(c + 1) * m]
                slots[:len(chunk)] = chunk  # row 0's outputs c·m … c·m + m − 1
                pt = seal.Plaintext()
                ev._encoder.encode(slots.tolist(), ct.parms_id(), ct.scale, pt)
                ev._evaluator.add_plain_inplace(ct, pt)
            return add
        member = [tenseal_edit(call, blob, add_chunk(c)) for c, blob in enumerate(call.outputs[0])]
        return [member] + call.outputs[1:]
    return attack


def tenseal_scale(when, factor: float) -> Attack:
    def bend(ev, ct):
        ct.scale = ct.scale * factor
    return tenseal_rewrite(when, bend)


def tenseal_constant(when, value: float) -> Attack:
    def add(ev, ct):
        import tenseal.sealapi as seal

        pt = seal.Plaintext()
        ev._encoder.encode([value] + [0.0] * (ev.params.slots - 1), ct.parms_id(), ct.scale, pt)
        ev._evaluator.add_plain_inplace(ct, pt)
    return tenseal_rewrite(when, add)


@dataclass
class Outcome:
    """One run against a (possibly malicious) worker."""

    tokens: list[int]
    plaintext: list[int]
    observed: list[Observation]
    deviated: list[int]
    quarantined: dict = field(default_factory=dict)
    deviations_seen: int = 0
    local_calls: int = 0
    timeline: list[tuple[float, float]] = field(default_factory=list)
    local_s: float = 0.0
    first_detection: int = -1   # the engine's index of the first call it found deviating (-1: none)
    text: str = ""

    def gaps(self) -> list[float]:
        """Seconds between each reply and the next request, as the worker sees them."""
        return [b[0] - a[1] for a, b in zip(self.timeline, self.timeline[1:])]


def run_attack(run_config, model: str, attack: Attack | None, prompt, backend: str = "native",
               new_tokens: int = 4, mode: str | None = None, chat: bool = False) -> Outcome:
    """Generate through a fresh worker running ``attack`` (None: honest); everything the worker saw comes back.
    ``chat``: the prompt as a user message in the model's chat template, generation ending at its end-of-turn
    token (as ``bifrost demo`` does)."""
    from bifrost.tee.runtime import TrustedRuntime
    from tests.workers import make_service, start_worker

    cfg = run_config.replace(model=model, backend=backend)
    service = AdversarialService(make_service(cfg, model), attack)  # (the worker accepts the model's parameters)
    _, server, endpoint = start_worker(cfg, model, service=service)
    rt = TrustedRuntime(cfg, endpoint, reference=True)
    try:
        if chat:
            from bifrost.model.tokenizer import chat_prompt

            prompt = chat_prompt(rt.tokenizer, prompt)
        result = rt.generate(prompt, new_tokens, mode=mode, stop_at_eos=chat)
        stats = rt.engine.stats
    finally:
        rt.close()
        server.stop(grace=None)
    return Outcome(result.tokens, result.fidelity.plaintext_tokens, list(service.observed), service.deviated,
                   rt.quarantine.entries(), stats.deviations, stats.local_calls, list(service.timeline), stats.local_s,
                   stats.first_deviation, result.text)


# ------------------------------------------------------------------ the catalog the tests and the report share
MODEL = "gpt2-mini"
C_FC0, C_FC1 = "transformer.h.0.mlp.c_fc", "transformer.h.1.mlp.c_fc"
SHORT = "Private LLM"                              # 11 prompt rows -> 12: one row per ciphertext
LONG = [(37 * i + 11) % 50000 for i in range(90)]  # 90 rows -> 96: two worker calls per layer group
DECODE = on_layer(C_FC0, 1)


@dataclass(frozen=True)
class Scenario:
    name: str
    make: Callable[[], Attack]
    reason: str | None          # the check expected to catch it (prefix of the quarantine reason); None: any
    prompt: object = SHORT
    backend: str = "native"
    new_tokens: int = 4


def _probe_direction() -> np.ndarray:
    return np.random.default_rng(3).normal(size=64)


ATTN_OUT = ("transformer.h.0.attn.c_proj", "transformer.h.1.attn.c_proj")
MLP_OUT = ("transformer.h.0.mlp.c_proj", "transformer.h.1.mlp.c_proj")


def _steer_direction(layer: str, d_out: int) -> np.ndarray:
    """A fixed direction per layer, chosen offline (the attack does not depend on the data)."""
    return np.random.default_rng(len(layer)).normal(size=d_out)


# reason: the name the quarantine records for the check that caught it ("product check": the native exact check or
# TenSEAL's tolerance check; "malformed reply" / "oversized reply": refused before any arithmetic)
CATALOG = [
    Scenario("half-space probe x2^24, prefill (one row per ciphertext)",
             lambda: half_space_probe(on_layer(C_FC0, 0), _probe_direction(), 2 ** 24, replace=True), "product"),
    Scenario("half-space probe x2^24, long prefill (two calls per group)",
             lambda: half_space_probe(on_layer(C_FC0, 0), _probe_direction(), 2 ** 24, replace=True), "product", LONG),
    Scenario("half-space probe x2^24, decode step",
             lambda: half_space_probe(on_layer(C_FC0, 1), _probe_direction(), 2 ** 24, replace=True), "product"),
    Scenario("inflated output (x2^20)", lambda: scaled_output(DECODE, 2 ** 20), "product"),
    Scenario("constant on one output",
             lambda: constant_on_one_output(on_layer("transformer.h.1.attn.c_proj", 1), 2 ** 46), "product"),
    Scenario("scaled row (x2)", lambda: scaled_row(on_layer("transformer.h.0.attn.c_attn", 1), 2), "product"),
    Scenario("replayed result", lambda: replay(on_layer(C_FC0, 2)), "malformed"),  # another call's id in its headers
    Scenario("other weights (another layer's, same shape)", lambda: other_weights(DECODE, {C_FC0: C_FC1}), "product"),
    Scenario("flipped ciphertext bits", lambda: flipped_bits(DECODE), None),
    Scenario("flipped header bits", lambda: flipped_bits(DECODE, header=True), "malformed"),
    Scenario("input returned as output", lambda: input_as_output(DECODE), "oversized"),  # inputs are N coefficients
    Scenario("reply a little too long", lambda: oversized(DECODE, 100), "oversized"),
    Scenario("correct 49 calls in 50", lambda: one_call_in(50, lambda when: constant_on_one_output(when, 2 ** 46)),
             "product", new_tokens=8),
    Scenario("steering: δ = 0.1·τ (the old tolerance) on every decode output of 4 layers",
             lambda: steering(set(ATTN_OUT + MLP_OUT), 0.1, _steer_direction), "product"),
    Scenario("+1 in a single residue (mod the 24-bit prime) of one coefficient",
             lambda: one_residue(DECODE, prime=1, delta=1), "product"),
    Scenario("-1 in a single residue (mod the 30-bit prime) of one coefficient",
             lambda: one_residue(DECODE, prime=0, delta=-1), "product"),
    Scenario("+1 in one residue of every prefill call only", lambda: one_residue(prefill_only), "product", LONG),
    Scenario("TenSEAL: scale x1e-9 (issue 13)", lambda: tenseal_scale(DECODE, 1e-9), "malformed", backend="tenseal"),
    Scenario("TenSEAL: scale x1e9", lambda: tenseal_scale(DECODE, 1e9), "malformed", backend="tenseal"),
    Scenario("TenSEAL: input returned as output", lambda: input_as_output(DECODE), "malformed", backend="tenseal"),
    Scenario("TenSEAL: constant added to one slot", lambda: tenseal_constant(DECODE, 0.05), "product",
             backend="tenseal"),
    Scenario("TenSEAL: other weights", lambda: other_weights(DECODE, {C_FC0: C_FC1}), "product", backend="tenseal"),
]


def layer_input(run_config, model: str, prompt, layer: str) -> np.ndarray:
    """What an attacker computes offline for a guessed prompt: the input rows of ``layer`` in the plaintext
    model (the weights are public)."""
    import torch

    from bifrost.model.catalog import load_model, resolve
    from bifrost.model.tokenizer import load_tokenizer

    spec = resolve(model)
    net = load_model(spec, run_config.seed)
    ids = load_tokenizer(spec.path).encode(prompt) if isinstance(prompt, str) else list(prompt)
    seen = []
    hook = net.get_submodule(layer).register_forward_hook(lambda m, args, out: seen.append(args[0][0].double()))
    with torch.no_grad():
        net(input_ids=torch.tensor([ids]))
    hook.remove()
    return seen[0].numpy()  # [rows, d_in]


def yes_no_directions(run_config) -> tuple[np.ndarray, np.ndarray]:
    """A half-space query's two answers for SHORT at layer 0's c_fc: ``yes`` along the first row's hidden
    state (|⟨w, x⟩| > 1), ``no`` orthogonal to every prompt row (⟨w, x⟩ = 0)."""
    x = layer_input(run_config, MODEL, SHORT, C_FC0)
    yes = x[0] / np.linalg.norm(x[0])
    no = np.random.default_rng(4).normal(size=x.shape[1])
    q, _ = np.linalg.qr(x.T)
    no -= q @ (q.T @ no)
    return yes, no / np.linalg.norm(no)
