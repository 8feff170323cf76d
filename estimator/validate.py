"""Predicted vs. measured end-to-end latency of Bifrost and Bifrost+ on this machine.

Runs a real :class:`~bifrost.tee.runtime.TrustedRuntime` against a worker on loopback and compares TTFT
and mean time per output token with :func:`bifrost_estimator.model.estimate` under a profile. Each
(mode, prompt length) runs once cold (reported separately: the worker encodes weights for a new row
blocking, Python/PyTorch warm up — one-off costs the model leaves out on purpose), then ``repeats``
times warm, the configurations taking turns so that a burst of load on the shared machine hits all of
them alike. The best warm TTFT and the best warm decode step are compared (interference only ever adds
time; calibration takes the best of its repetitions too), and the medians are reported beside them.
The split of the measured time (encrypt / transfer / worker / decrypt / trusted compute) is reported next to
the model's, so a miss can be traced to its term. Times depend on the machine's load: they are reported
(``benchmarks/estimator_validation.py``, ``bifrost estimate validate``), not asserted by the test suite.

What does not depend on load is checked exactly: during the cold run of each configuration the engine's
worker traffic of every forward and layer group (calls, rows sent, input and output ciphertexts, and for a
backend with exact sizes the bytes each way; ``DelegationEngine.stats.groups``) is compared with the
model's :func:`~bifrost_estimator.model.forward_traffic`; any difference is listed in ``traffic_mismatches``.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

from bifrost.ckks import TRAFFIC_FIELDS, GroupTraffic

from .model import Cost, estimate, forward_traffic
from .profile import Profile
from .shapes import ModelShape, load_shape

COMPONENTS = ("encrypt", "transfer", "worker", "decrypt", "trusted")


def predicted_components(c: Cost) -> dict[str, float]:
    """The model's terms grouped as the runtime measures them."""
    out = dict.fromkeys(COMPONENTS, 0.0)
    for t in c.terms:
        key = {"encrypt": "encrypt", "decrypt": "decrypt", "transfer": "transfer",
               "linear (CKKS)": "worker"}.get(t.op, "trusted")
        out[key] += t.seconds
    return out


def measured_components(timings) -> dict[str, float]:
    """The split of the best (fastest) of ``timings``."""
    t = min(timings, key=lambda x: x.total_s)
    return {"encrypt": t.encrypt_s, "transfer": t.transfer_s, "worker": t.worker_s, "decrypt": t.decrypt_s,
            "trusted": t.nonlinear_s + t.verify_s + t.local_s}  # the model's trusted terms hold the product checks


def measured_traffic(runtime, ids: list[int], new_tokens: int, mode: str) -> tuple[list, list[dict]]:
    """Generate ``new_tokens`` tokens; returns (the token timings, per forward the engine's worker traffic of
    every layer group that it has called: ``{group: GroupTraffic}``), both from the decode loop's events."""
    from bifrost.tee.runtime import token_timing
    from bifrost.tee.scheduler import Turn

    timings, traffic = [], []
    for event in runtime.events(Turn(runtime.engine, ids, new_tokens, mode=mode)):
        timings.append(token_timing(event.index, event.token, event.seconds, event.stats))
        traffic.append(event.stats.groups)
    return timings, traffic


def predicted_traffic(profile: Profile, shape: ModelShape, prompt_len: int, new_tokens: int,
                      mode: str) -> list[dict[str, GroupTraffic]]:
    """Per forward (the prefill, then one per further token): the model's traffic per group of one layer."""
    return ([forward_traffic(profile, shape, prompt_len, local_linears=mode == "bifrost+")]
            + [forward_traffic(profile, shape, 1) for _ in range(new_tokens - 1)])


def traffic_mismatches(profile: Profile, shape: ModelShape, engine_shapes: dict, measured: list[dict],
                       prompt_len: int, mode: str) -> tuple[int, list[str]]:
    """Compare the engine's traffic per forward and layer group (``engine_shapes``: group -> GroupShape,
    ``measured``: from :func:`measured_traffic`) with the model's, field by field (bytes only where the
    backend gives exact sizes). Returns (comparisons made, one line per difference)."""
    predicted = predicted_traffic(profile, shape, prompt_len, len(measured), mode)
    by_shape = {(g.d_in, tuple(g.d_outs)): g.name for g in shape.groups()}  # traffic depends on the shape only
    if len(engine_shapes) != shape.n_layers * len(shape.groups()):
        return 0, [f"the engine delegates {len(engine_shapes)} groups, the model {shape.n_layers} x "
                   f"{len(shape.groups())}"]
    checked, out = 0, []
    for i, (pred, meas) in enumerate(zip(predicted, measured)):
        for group, gshape in engine_shapes.items():
            name = by_shape.get((gshape.d_in, tuple(gshape.d_outs)))
            if name is None:
                out.append(f"group {group[0]}: shape {gshape} is not one the model delegates")
                continue
            p, m = pred[name], meas.get(group)
            fields = TRAFFIC_FIELDS if p.exact_bytes else [f for f in TRAFFIC_FIELDS if not f.startswith("bytes")]
            for f in fields:
                checked += 1
                got = getattr(m, f) if m is not None else 0
                if getattr(p, f) != got:
                    out.append(f"{mode} L={prompt_len} forward {i} {group[0]}: {f} predicted {getattr(p, f)}, "
                               f"measured {got}")
    return checked, out


@dataclass
class Comparison:
    mode: str
    prompt_len: int
    new_tokens: int
    measured_ttft_s: float
    predicted_ttft_s: float
    measured_per_token_s: float
    predicted_per_token_s: float
    cold_ttft_s: float
    median_ttft_s: float = 0.0
    median_per_token_s: float = 0.0
    components: dict = field(default_factory=dict)  # {"ttft"|"per_token": {"measured"|"predicted": {...}}}
    traffic_checked: int = 0  # worker-traffic fields compared (forwards x layer groups x fields)
    traffic_mismatches: list = field(default_factory=list)  # one line per predicted != measured

    @property
    def ttft_error(self) -> float:
        return self.predicted_ttft_s / self.measured_ttft_s - 1

    @property
    def per_token_error(self) -> float:
        return self.predicted_per_token_s / self.measured_per_token_s - 1 if self.measured_per_token_s else 0.0

    @property
    def measured_total_s(self) -> float:
        return self.measured_ttft_s + (self.new_tokens - 1) * self.measured_per_token_s

    @property
    def predicted_total_s(self) -> float:
        return self.predicted_ttft_s + (self.new_tokens - 1) * self.predicted_per_token_s

    @property
    def total_error(self) -> float:
        return self.predicted_total_s / self.measured_total_s - 1

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        d.update(ttft_error=self.ttft_error, per_token_error=self.per_token_error, total_error=self.total_error,
                 measured_total_s=self.measured_total_s, predicted_total_s=self.predicted_total_s)
        return d


def run_validation(profile: Profile, model: str, prompt_lens: list[int], new_tokens: int, modes=("bifrost", "bifrost+"),
                   endpoint=None, backend: str | None = None, verbose: bool = False,
                   repeats: int = 3) -> list[Comparison]:
    """Measure each (mode, prompt length): one cold run (its worker traffic compared exactly), then
    ``repeats`` warm runs (see module doc). ``endpoint``: a running worker's
    :class:`~bifrost.attest.mtls.WorkerEndpoint`; None starts a :class:`~bifrost.worker.launcher.LocalWorker`."""
    import contextlib

    from bifrost.config_loader import ckks_params_of, load_config
    from bifrost.errors import UserError
    from bifrost.tee.runtime import TrustedRuntime, trusted_identity
    from bifrost.worker.launcher import LocalWorker

    if new_tokens < 2:
        raise UserError("validation needs --new-tokens >= 2 (TTFT and at least one decode step)")
    if repeats < 1 or not prompt_lens or min(prompt_lens) < 1:
        raise UserError("validation needs --repeats >= 1 and prompt lengths >= 1")
    cfg = load_config().replace(model=model, backend=backend or profile.accelerator.backend)
    if cfg.backend != profile.accelerator.backend:
        raise UserError(f"profile {profile.name!r} models backend {profile.accelerator.backend!r}, "
                           f"the run uses {cfg.backend!r}")
    params, ops = ckks_params_of(cfg), profile.accelerator.linear
    if (params.poly_modulus_degree, tuple(params.coeff_mod_bit_sizes)) != (ops.poly_modulus_degree,
                                                                           tuple(ops.coeff_mod_bit_sizes)):
        raise UserError(f"profile {profile.name!r} models N={ops.poly_modulus_degree}, primes "
                           f"{list(ops.coeff_mod_bit_sizes)}; the run uses N={params.poly_modulus_degree}, primes "
                           f"{list(params.coeff_mod_bit_sizes)}")
    shape = load_shape(model)
    configs = [(mode, L) for mode in modes for L in prompt_lens]
    runs: dict[tuple, list] = {c: [] for c in configs}
    colds: dict[tuple, float] = {}
    traffic: dict[tuple, tuple[int, list[str]]] = {}
    local = None if endpoint else LocalWorker(model, cfg.seed, [trusted_identity(cfg).cert_pem])
    with (local or contextlib.nullcontext()):
        runtime = TrustedRuntime(cfg, endpoint if local is None else local.endpoint)
        try:
            if runtime.engine is None:
                raise UserError(f"{model!r} delegates no layer to a worker: nothing to validate")
            shapes = runtime.engine.shapes
            ids = {L: [(17 * i + 11) % min(50000, shape.vocab - 1) + 1 for i in range(L)] for L in prompt_lens}
            for mode, L in configs:
                timings, measured = measured_traffic(runtime, ids[L], new_tokens, mode)
                colds[(mode, L)] = timings[0].total_s
                traffic[(mode, L)] = traffic_mismatches(profile, shape, shapes, measured, L, mode)
            for _ in range(repeats):
                for mode, L in configs:
                    runs[(mode, L)].append(runtime.generate(ids[L], new_tokens, mode=mode))
        finally:
            runtime.close()
    out: list[Comparison] = []
    for mode, L in configs:
        est = estimate(profile, shape, mode, L, new_tokens)
        pre, dec = est.prefill, est.decode_cost()
        first = [r.timings[0] for r in runs[(mode, L)]]
        steps = [t for r in runs[(mode, L)] for t in r.timings[1:]]
        c = Comparison(mode, L, new_tokens, min(t.total_s for t in first), pre.total,
                       min(t.total_s for t in steps), dec.total, colds[(mode, L)],
                       statistics.median(t.total_s for t in first), statistics.median(t.total_s for t in steps),
                       {"ttft": {"measured": measured_components(first), "predicted": predicted_components(pre)},
                        "per_token": {"measured": measured_components(steps), "predicted": predicted_components(dec)}},
                       *traffic[(mode, L)])
        if verbose:
            print(f"[validate] {mode} L={L}: TTFT {c.measured_ttft_s:.3f} s measured / {c.predicted_ttft_s:.3f} s "
                  f"predicted ({c.ttft_error:+.1%}); per token {c.measured_per_token_s:.3f} / "
                  f"{c.predicted_per_token_s:.3f} s ({c.per_token_error:+.1%}); worker traffic: "
                  f"{len(c.traffic_mismatches) or 'no'} differences in {c.traffic_checked} fields", flush=True)
        out.append(c)
    return out
