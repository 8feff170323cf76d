"""Shared helpers for the native-kernel tests."""

import numpy as np

from bifrost.ckks import GroupShape, WeightStats


def gpt2_like(rng, rows, d_in, outliers=True):
    """Activations ~N(0,1) with GPT-2-style outlier features of a few hundred."""
    x = rng.normal(0.0, 1.0, (rows, d_in))
    if outliers:
        cols = rng.choice(d_in, size=3, replace=False)
        x[:, cols] = rng.uniform(150, 400, (rows, 3)) * rng.choice([-1, 1], (rows, 3))
    return x


def run_layer(context, evaluator, shape: GroupShape, weights, x):
    """(decoded outputs, batch, output ciphertexts) of one honest call."""
    prepared = evaluator.prepare(shape, weights)
    batch = context.encrypt(shape, x)
    out = evaluator.apply(prepared, batch.ciphertexts)
    return context.decrypt(shape, out, batch, stats(weights)), batch, out


def stats(weights):
    return [WeightStats.of(w) for w in weights]


def error_ratio(context, shape, batch, weights, x, ys) -> float:
    """max over rows, members and outputs of |ŷ − x·Wᵀ| / the backend's documented worst-case bound."""
    bounds = context.error_bound(shape, batch, stats(weights))
    worst = 0.0
    for m, (y, w) in enumerate(zip(ys, weights)):
        err = np.abs(y - x @ np.asarray(w).T).max(axis=1)
        b = bounds[:, m]
        worst = max(worst, float(np.max(np.where(b > 0, err / np.where(b > 0, b, 1), np.where(err > 0, np.inf, 0)))))
    return worst


def error_bound(weight_bits, x, w):
    """The bound's leading term, 2^(−B)·‖x_r‖₁·max|W| (the full worst case is ``context.error_bound``)."""
    return 2.0 ** -weight_bits * np.abs(x).sum(axis=1, keepdims=True) * np.abs(w).max()
