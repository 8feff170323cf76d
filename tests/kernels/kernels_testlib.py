"""Shared helpers for the native-kernel tests."""

import numpy as np

from bifrost.ckks import GroupShape


def gpt2_like(rng, rows, d_in, outliers=True):
    """Activations ~N(0,1) with GPT-2-style outlier features of a few hundred."""
    x = rng.normal(0.0, 1.0, (rows, d_in))
    if outliers:
        cols = rng.choice(d_in, size=3, replace=False)
        x[:, cols] = rng.uniform(150, 400, (rows, 3)) * rng.choice([-1, 1], (rows, 3))
    return x


def run_layer(context, evaluator, shape: GroupShape, weights, x):
    prepared = evaluator.prepare(shape, weights)
    batch = context.encrypt(shape, x)
    out = evaluator.apply(prepared, batch.ciphertexts)
    return context.decrypt(shape, out, batch.rows), batch, out


def error_bound(weight_bits, x, w):
    """The documented bound: |ŷ_rk − y_rk| ≤ 2^(−B)·‖x_r‖₁·max|W|."""
    return 2.0 ** -weight_bits * np.abs(x).sum(axis=1, keepdims=True) * np.abs(w).max()
