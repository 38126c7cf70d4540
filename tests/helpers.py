"""Helpers shared by the tests."""

from __future__ import annotations

import numpy as np
import torch


def same(a, b) -> bool:
    """Bitwise equality of nested tensors, arrays, dicts, lists and plain values."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and np.array_equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return (type(a) is type(b) and len(a) == len(b)
                and all(same(x, y) for x, y in zip(a, b, strict=True)))
    return a == b


def noisy_fall(size: float, n: int = 100, seed: int = 0, lrs=None):
    """(lrs, raw, smoothed) of a sweep over 1e-7..10 whose loss falls from 2 to 1 around 3e-3,
    plus gaussian noise of std ``size``; ``lrs`` replaces the exponential grid of n points."""
    from lrfind.recorder import smooth

    lrs = np.logspace(-7, 1, n) if lrs is None else np.asarray(lrs, dtype=float)
    raw = 2 - 1 / (1 + np.exp(-4 * (np.log10(lrs) + 2.5)))
    raw = raw + size * np.random.default_rng(seed).normal(0, 1, len(lrs))
    return lrs, raw, smooth(raw)
