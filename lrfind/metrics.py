"""Metrics: ``f(preds, targets) -> number``, averaged over the validation set by batch size."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


def accuracy(preds: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Share of rows whose arg-max over the last axis equals the target."""
    return (preds.argmax(dim=-1) == targets).float().mean()


def error_rate(preds: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``1 - accuracy(preds, targets)``."""
    return 1.0 - accuracy(preds, targets)


def metric_name(metric: Callable[..., Any]) -> str:
    """The name a metric is reported under: its ``__name__``, or its class's."""
    func = getattr(metric, "func", metric)  # functools.partial
    return getattr(func, "__name__", type(func).__name__)
