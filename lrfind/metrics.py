"""Metrics: ``f(preds, targets) -> number``, averaged over the validation set by batch size."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


def accuracy(preds: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Share of rows whose arg-max over the last axis equals the target.

    Targets may be of shape (N,) or (N, 1); any other number of them is an error.

    >>> accuracy(torch.tensor([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]]), torch.tensor([1, 1, 1]))
    tensor(0.6667)
    """
    picked = preds.argmax(dim=-1).reshape(-1)
    targets = targets.reshape(-1)
    if picked.shape != targets.shape:
        raise ValueError(f"accuracy: {picked.numel()} predictions (preds of shape "
                         f"{tuple(preds.shape)}) but {targets.numel()} targets")
    return (picked == targets).float().mean()


def error_rate(preds: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``1 - accuracy(preds, targets)``."""
    return 1.0 - accuracy(preds, targets)


def metric_name(metric: Callable[..., Any]) -> str:
    """The name a metric is reported under: its ``__name__``, a partial's function's, or its
    class's."""
    func = metric if hasattr(metric, "__name__") else getattr(metric, "func", metric)
    return getattr(func, "__name__", type(func).__name__)
