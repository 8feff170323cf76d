"""Predicted vs. measured end-to-end latency of Bifrost and Bifrost+ on this machine.

Runs a real :class:`~bifrost.tee.runtime.TrustedRuntime` against a worker on loopback and compares TTFT
and mean time per output token with :func:`bifrost_estimator.model.estimate` under a profile. Each
(mode, prompt length) runs once cold (reported separately: the worker encodes weights for a new row
blocking, Python/PyTorch warm up — one-off costs the model leaves out on purpose), then ``repeats``
times warm, the configurations taking turns so that a burst of load on the shared machine hits all of
them alike. The best warm TTFT and the best warm decode step are compared (interference only ever adds
time; calibration takes the best of its repetitions too), and the medians are reported beside them.
The split of the measured time (encrypt / transfer / worker / decrypt / trusted compute) is reported next to
the model's, so a miss can be traced to its term.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

from .model import Cost, estimate
from .profile import Profile
from .shapes import load_shape

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
            "trusted": t.nonlinear_s}


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
                   address: str | None = None, backend: str | None = None, verbose: bool = False,
                   repeats: int = 3) -> list[Comparison]:
    """Measure each (mode, prompt length): one cold run, then ``repeats`` warm runs (see module doc)."""
    import contextlib

    from bifrost.config import load_config
    from bifrost.errors import BifrostError
    from bifrost.tee.runtime import TrustedRuntime
    from bifrost.worker.launcher import LocalWorker

    if new_tokens < 2:
        raise BifrostError("validation needs --new-tokens >= 2 (TTFT and at least one decode step)")
    if repeats < 1 or not prompt_lens or min(prompt_lens) < 1:
        raise BifrostError("validation needs --repeats >= 1 and prompt lengths >= 1")
    cfg = load_config().replace(model=model, backend=backend or profile.accelerator.backend)
    if cfg.backend != profile.accelerator.backend:
        raise BifrostError(f"profile {profile.name!r} models backend {profile.accelerator.backend!r}, "
                           f"the run uses {cfg.backend!r}")
    shape = load_shape(model)
    configs = [(mode, L) for mode in modes for L in prompt_lens]
    runs: dict[tuple, list] = {c: [] for c in configs}
    colds: dict[tuple, float] = {}
    with (contextlib.nullcontext(None) if address else LocalWorker(model, cfg.seed)) as worker:
        runtime = TrustedRuntime(cfg, address or worker.address)
        try:
            ids = {L: [(17 * i + 11) % min(50000, shape.vocab - 1) + 1 for i in range(L)] for L in prompt_lens}
            for mode, L in configs:
                colds[(mode, L)] = runtime.generate(ids[L], new_tokens, mode=mode).timings[0].total_s
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
                        "per_token": {"measured": measured_components(steps), "predicted": predicted_components(dec)}})
        if verbose:
            print(f"[validate] {mode} L={L}: TTFT {c.measured_ttft_s:.3f} s measured / {c.predicted_ttft_s:.3f} s "
                  f"predicted ({c.ttft_error:+.1%}); per token {c.measured_per_token_s:.3f} / "
                  f"{c.predicted_per_token_s:.3f} s ({c.per_token_error:+.1%})", flush=True)
        out.append(c)
    return out
