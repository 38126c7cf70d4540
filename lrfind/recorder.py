"""The recorder: per-step LR, momentum and loss, per-epoch values, and their plots."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .callback import Callback, get_momentum
from .utils import check_int, check_number

if TYPE_CHECKING:
    from .learner import Learner

FLUSH_EVERY = 32  # losses stay on the device and are read in chunks: one host sync per chunk


def smooth(losses: Any, beta: float = 0.98) -> np.ndarray:
    """Debiased EMA: ``avg = beta*avg + (1-beta)*loss`` from 0, reported ``avg/(1-beta**k)``."""
    out = np.empty(len(losses))
    avg = 0.0
    for k, loss in enumerate(losses, start=1):
        avg = beta * avg + (1 - beta) * loss
        out[k - 1] = avg / (1 - beta**k)
    return out


class Recorder(Callback):
    """Records ``lrs``, ``moms`` and ``losses`` once per optimizer step and ``values`` per epoch.

    ``lrs``/``moms`` are those the step used in the last parameter group; ``losses`` the step's
    training loss (mean over accumulated batches); ``smooth_losses`` their debiased EMA
    (``beta``, default 0.98); ``values`` one dict per epoch: epoch, train_loss, valid_loss,
    each metric, time.
    """

    order = 50

    def __init__(self, beta: float = 0.98) -> None:
        if not 0 <= check_number("beta", beta) < 1:
            raise ValueError(f"beta must be in [0, 1), got {beta!r}")
        self.beta = float(beta)
        self.lrs: list[float] = []
        self.moms: list[float | None] = []
        self._losses: list[float] = []
        self._pending: list[torch.Tensor] = []
        self._epoch_start = 0  # index in the losses of the current epoch's first step
        self._epoch_ends: list[int] = []  # steps done at the end of each epoch in values
        self.values: list[dict[str, float]] = []
        self.lr_find_result: Any = None
        self._shared = False  # training in several processes: averaging needs all of them

    @property
    def losses(self) -> list[float]:
        """Training loss of every optimizer step so far (reads pending values from the device).

        Under torchrun the steps since the last average across processes (made every
        FLUSH_EVERY steps and at each epoch's end, on every process at once) read as this
        process's own until then.
        """
        if not self._shared:
            self.flush()
        elif self._pending:
            return self._losses + torch.stack(self._pending).float().cpu().tolist()
        return self._losses

    @property
    def smooth_losses(self) -> list[float]:
        """Debiased EMA of :attr:`losses`."""
        return smooth(self.losses, self.beta).tolist()

    def flush(self, learn: Learner | None = None) -> None:
        """Move pending losses to the host; raise if one is not finite during training."""
        if not self._pending:
            return
        values = torch.stack(self._pending).float()
        if learn is not None:
            values = learn.reduce_loss(values)  # one collective per chunk under DDP
        losses: list[float] = values.cpu().tolist()
        self._pending.clear()
        start = len(self._losses)
        self._losses.extend(losses)
        if learn is not None:
            for i, v in enumerate(losses):
                if not np.isfinite(v):
                    raise FloatingPointError(
                        f"non-finite training loss {v} at epoch {learn.epoch}, optimizer step "
                        f"{start + i} of this fit; training stopped")

    def state_dict(self) -> dict[str, Any]:
        """History as plain Python values (for checkpoints)."""
        return {"lrs": self.lrs, "moms": self.moms, "losses": self.losses, "values": self.values,
                "epoch_start": self._epoch_start, "epoch_ends": self._epoch_ends}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the history saved by :meth:`state_dict`."""
        self.lrs, self.moms = list(state["lrs"]), list(state["moms"])
        self._losses, self.values = list(state["losses"]), [dict(v) for v in state["values"]]
        self._pending = []
        self._epoch_start = state.get("epoch_start", len(self._losses))
        per_epoch = len(self._losses) / max(len(self.values), 1)  # older files: evenly spaced
        self._epoch_ends = list(state.get("epoch_ends", [round((i + 1) * per_epoch)
                                                          for i in range(len(self.values))]))

    def before_fit(self, learn: Learner) -> None:
        self._shared = learn.world_size > 1
        if not learn.resuming:
            self.lrs, self.moms, self._losses, self._pending, self.values = [], [], [], [], []
            self._epoch_start, self._epoch_ends = 0, []
        # A mid-epoch resume keeps the loaded epoch start, so the epoch's train_loss averages
        # all of its steps. It moves on at each epoch end, not in before_epoch, which a
        # resumed epoch also fires and an earlier callback may cancel.
        self._start_time = time.perf_counter()

    def after_step(self, learn: Learner) -> None:
        group = learn.opt.param_groups[-1]
        lr = group["lr"]  # a tensor LR is one object, rewritten every step: keep its value
        self.lrs.append(float(lr) if isinstance(lr, torch.Tensor) else lr)
        self.moms.append(get_momentum(group))
        self._pending.append(learn.step_loss)
        if len(self._pending) >= FLUSH_EVERY:
            self.flush(learn)

    def after_epoch(self, learn: Learner) -> None:
        self.flush(learn)
        epoch_losses = self._losses[self._epoch_start:]
        row: dict[str, float] = {"epoch": learn.epoch,
                                 "train_loss": float(np.mean(epoch_losses)) if epoch_losses
                                 else float("nan")}
        row.update(learn.valid_result or {})
        row["time"] = time.perf_counter() - self._start_time
        self.values.append(row)
        self._epoch_ends.append(len(self._losses))
        self._start_time = time.perf_counter()
        self._epoch_start = len(self._losses)

    def after_fit(self, learn: Learner) -> None:
        if learn.fit_error is None:
            self.flush(learn)

    def _check_recorded(self) -> None:
        if not self.lrs:  # an empty plot would look like a plotting problem
            raise ValueError("no training recorded yet: call fit first (the range test's curve "
                             "is learn.recorder.plot_lr_find())")

    def plot_loss(self, skip_start: int = 5, with_valid: bool = True, ax: Any = None) -> Any:
        """Training loss per step (raw and smoothed) and the validation loss at each epoch end.

        Skips the first ``skip_start`` steps (default 5). Returns the matplotlib Axes.
        """
        from .plots import new_axes

        check_int("skip_start", skip_start, low=0)
        self._check_recorded()
        ax = new_axes(ax)
        losses = np.asarray(self.losses)
        steps = np.arange(len(losses))
        ax.plot(steps[skip_start:], losses[skip_start:], alpha=0.3, label="train (raw)")
        ax.plot(steps[skip_start:], smooth(losses, self.beta)[skip_start:], label="train")
        # each epoch's validation loss at the last step of that epoch
        valid = [(end - 1, r["valid_loss"]) for end, r in zip(self._epoch_ends, self.values)
                 if "valid_loss" in r]
        if with_valid and valid:
            ax.plot(*zip(*valid), "o-", label="valid")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss")
        ax.legend()
        return ax

    def plot_sched(self, keys: tuple[str, ...] = ("lr", "mom"), ax: Any = None) -> Any:
        """The recorded ``lr`` and ``mom`` per optimizer step, one axes each (default both).

        Returns the array of Axes (one per key), or the single Axes given as ``ax``.
        """
        from .plots import new_axes

        series: dict[str, Sequence[float | None]] = {"lr": self.lrs, "mom": self.moms}
        if isinstance(keys, str) or not keys or any(k not in series for k in keys):
            raise ValueError(f"keys must be a non-empty sequence of names among "
                             f"{tuple(series)}, got {keys!r}")
        self._check_recorded()
        axes = new_axes(ax, ncols=1 if ax is not None else len(keys))
        if ax is None:
            axes = np.atleast_1d(axes)
        for a, k in zip(axes if ax is None else [ax] * len(keys), keys):
            a.plot([np.nan if v is None else v for v in series[k]])
            a.set_xlabel("optimizer step")
            a.set_ylabel(k)
        return axes

    def plot_lr_find(self, skip_end: int = 5, ax: Any = None) -> Any:
        """Plot of the last range test: ``LRFindResult.plot``, which returns the matplotlib Axes.

        ValueError when no range test has run on this learner yet.
        """
        if self.lr_find_result is None:
            raise ValueError("no range test recorded yet: call learn.lr_find() first")
        return self.lr_find_result.plot(skip_end=skip_end, ax=ax)
