"""Output: rich tables in the terminal, JSON, and stacked-bar plots of the breakdown."""

from __future__ import annotations

import json

from .model import DEVICES, Estimate

PLOT_FORMATS = ("png", "pdf", "svg", "jpg", "jpeg")


def _fmt(s: float) -> str:
    if s >= 100:
        return f"{s:,.0f} s"
    if s >= 1:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.1f} ms"
    return f"{s * 1e6:.0f} µs"


def print_tables(estimates: list[Estimate], console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    e0 = estimates[0]
    summary = Table(title=f"{e0.model} on profile {e0.profile}: prompt {e0.prompt_len} tokens, "
                          f"{e0.new_tokens} new tokens" + (f", batch {e0.batch} (per sequence)" if e0.batch > 1 else ""))
    for col in ("scheme", "TTFT", "per output token", "total", "accelerator", "TEE CPU", "link"):
        summary.add_column(col, justify="right" if col != "scheme" else "left")
    for e in estimates:
        dev = (e.prefill + _sum(e.decode)).by("device")
        summary.add_row(e.scheme, _fmt(e.ttft_s), _fmt(e.per_token_s), _fmt(e.total_s),
                        *(_fmt(dev.get(d, 0.0)) for d in DEVICES))
    console.print(summary)
    for e in estimates:
        t = Table(title=f"{e.scheme}: breakdown by operator class (seconds)")
        for col in ("operator", "device", "prefill (TTFT)", "per decode token"):
            t.add_column(col, justify="left" if col in ("operator", "device") else "right")
        pre, dec = e.prefill.by_op_device(), e.decode_cost().by_op_device()
        for key in sorted(set(pre) | set(dec), key=lambda k: -(pre.get(k, 0) + dec.get(k, 0))):
            t.add_row(key[0], key[1], _fmt(pre.get(key, 0.0)), _fmt(dec.get(key, 0.0)))
        console.print(t)


def validation_table(rows, title: str, console=None) -> None:
    """Measured vs predicted TTFT and time per token; narrow enough for an 80-column terminal."""
    from rich.console import Console
    from rich.table import Table

    checked = sum(r.traffic_checked for r in rows)
    wrong = [line for r in rows for line in r.traffic_mismatches]
    caption = ("worker traffic (calls, rows, ciphertexts, bytes per layer group and forward): "
               + (f"{len(wrong)} of {checked} fields differ from the model" if wrong else
                  f"all {checked} fields as predicted")) if checked or wrong else None
    t = Table(title=title, caption=caption)
    t.add_column("mode", no_wrap=True, min_width=8)
    for col in ("L", "TTFT", "pred", "err", "token", "pred", "err", "median err"):
        t.add_column(col, justify="right", no_wrap=True)
    for r in rows:
        med = (r.predicted_ttft_s / r.median_ttft_s - 1 if r.median_ttft_s else 0.0,
               r.predicted_per_token_s / r.median_per_token_s - 1 if r.median_per_token_s else 0.0)
        t.add_row(r.mode, str(r.prompt_len), f"{r.measured_ttft_s:.3f}", f"{r.predicted_ttft_s:.3f}",
                  f"{r.ttft_error:+.0%}", f"{r.measured_per_token_s:.3f}", f"{r.predicted_per_token_s:.3f}",
                  f"{r.per_token_error:+.0%}", f"{med[0]:+.0%}/{med[1]:+.0%}")
    console = console or Console()
    console.print(t)
    for line in wrong[:20]:
        console.print(f"  traffic: {line}")


def _sum(costs):
    from .model import Cost

    total = Cost()
    for c in costs:
        total = total + c
    return total


def to_json(estimates: list[Estimate], extra: dict | None = None) -> str:
    return json.dumps({"estimates": [e.to_dict() for e in estimates], **(extra or {})}, indent=2, sort_keys=False)


def plot(estimates: list[Estimate], path: str) -> None:
    """Two panels (TTFT, per output token); one stacked bar per scheme, stacked by operator class."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 5))
    all_ops = sorted({t.op for e in estimates for c in [e.prefill, e.decode_cost()] for t in c.terms})
    cmap = plt.get_cmap("tab20")
    colors = {op: cmap(i % 20) for i, op in enumerate(all_ops)}
    for ax, title, get in ((axes[0], "TTFT (prefill)", lambda e: e.prefill),
                           (axes[1], "per output token", lambda e: e.decode_cost())):
        ops = sorted({t.op for e in estimates for t in get(e).terms})
        bottoms = [0.0] * len(estimates)
        for op in ops:
            vals = [get(e).by("op").get(op, 0.0) for e in estimates]
            ax.bar([e.scheme for e in estimates], vals, bottom=bottoms, label=op, color=colors[op])
            bottoms = [b + v for b, v in zip(bottoms, vals)]
        ax.set_ylabel("seconds")
        ax.set_title(title)
    axes[1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    e0 = estimates[0]
    fig.suptitle(f"{e0.model} — profile {e0.profile} — prompt {e0.prompt_len}, {e0.new_tokens} new tokens")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
