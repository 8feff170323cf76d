"""Predicted vs. measured end-to-end latency of Bifrost and Bifrost+ on this machine.

Runs a real :class:`~bifrost.tee.runtime.TrustedRuntime` against a worker on loopback and compares
TTFT and mean time per output token with :func:`bifrost_estimator.model.estimate` under a profile.
Each (mode, prompt length) is generated twice and the second run is reported: the first run with a new
row count pays one-off costs the model leaves out on purpose (the worker encodes weights for a new
blocking; Python/PyTorch warm-up).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

from .model import estimate
from .profile import Profile
from .shapes import load_shape


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

    @property
    def ttft_error(self) -> float:
        return self.predicted_ttft_s / self.measured_ttft_s - 1

    @property
    def per_token_error(self) -> float:
        return self.predicted_per_token_s / self.measured_per_token_s - 1

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
                   repeats: int = 1) -> list[Comparison]:
    """Measure each (mode, prompt length) after one cold run, ``repeats`` warm runs: the medians of TTFT and of
    every decode step's time are compared with the prediction (medians resist a shared machine's spikes)."""
    import contextlib

    from bifrost.config import load_config
    from bifrost.tee.runtime import TrustedRuntime
    from bifrost.worker.launcher import LocalWorker

    cfg = load_config().replace(model=model, backend=backend or profile.accelerator.backend)
    if cfg.backend != profile.accelerator.backend:
        raise ValueError(f"profile models backend {profile.accelerator.backend!r}, run uses {cfg.backend!r}")
    shape = load_shape(model)
    out: list[Comparison] = []
    with (contextlib.nullcontext(None) if address else LocalWorker(model, cfg.seed)) as worker:
        runtime = TrustedRuntime(cfg, address or worker.address)
        try:
            for mode in modes:
                for L in prompt_lens:
                    ids = [(17 * i + 11) % 50000 + 100 for i in range(L)]
                    cold = runtime.generate(ids, new_tokens, mode=mode)
                    warm = [runtime.generate(ids, new_tokens, mode=mode) for _ in range(max(repeats, 1))]
                    est = estimate(profile, shape, mode, L, new_tokens)
                    ttft = statistics.median(r.timings[0].total_s for r in warm)
                    per_tok = (statistics.median(t.total_s for r in warm for t in r.timings[1:])
                               if new_tokens > 1 else 0.0)
                    c = Comparison(mode, L, new_tokens, ttft, est.ttft_s, per_tok, est.per_token_s,
                                   cold.timings[0].total_s)
                    if verbose:
                        print(f"[validate] {mode} L={L}: TTFT {c.measured_ttft_s:.3f} s measured / "
                              f"{c.predicted_ttft_s:.3f} s predicted ({c.ttft_error:+.1%}); per token "
                              f"{c.measured_per_token_s:.3f} / {c.predicted_per_token_s:.3f} s "
                              f"({c.per_token_error:+.1%})", flush=True)
                    out.append(c)
        finally:
            runtime.close()
    return out


def timed(fn):
    t0 = time.perf_counter()
    r = fn()
    return r, time.perf_counter() - t0
