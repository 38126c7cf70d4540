"""Callbacks: named training events, a no-op base class, cancel exceptions, and the schedulers.

Events, in the order the trainer fires them (each method receives the learner):

    before_fit
      before_epoch
        before_train
          before_batch   learn.batch is on the device
          after_loss     learn.loss is the batch's loss; learn.loss_grad is what backward sees
          before_step    gradients ready (every accum_steps batches); learn.train_iter = step index
          after_step     an optimizer step happened (not fired when it was cancelled or skipped)
          after_batch
        after_train
        before_validate
        after_validate   learn.valid_result holds the validation dict
      after_epoch        always, also after CancelEpochException
    after_fit            always, also after an error (learn.fit_error is set then)

Callbacks run in ascending ``order``. Raising a cancel exception from an event skips the rest of
that unit of work: the batch, the optimizer step, the epoch or the whole fit.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from .schedules import Schedule
from .utils import warn

if TYPE_CHECKING:
    from .learner import Learner

EVENTS = ("before_fit", "before_epoch", "before_train", "before_batch", "after_loss",
          "before_step", "after_step", "after_batch", "after_train", "before_validate",
          "after_validate", "after_epoch", "after_fit")


class CancelBatchException(Exception):
    """Skip the rest of the current batch."""


class CancelStepException(Exception):
    """Skip the optimizer step (gradients are cleared; the schedule does not advance)."""


class CancelEpochException(Exception):
    """Skip the rest of the current epoch (``after_epoch`` still runs)."""


class CancelFitException(Exception):
    """Stop training (``after_fit`` still runs)."""


class Callback:
    """Base class: each event is a no-op method ``event(self, learn)``; lower ``order`` first.

    ``in_lr_find`` (default False): also run during the range test. Set it on callbacks that
    change what the model sees or how it learns (batch transforms, a custom loss), so the
    test measures the training you will run; schedulers, checkpoints and loggers stay out.
    """

    order: int = 0
    in_lr_find: bool = False

    def before_fit(self, learn: Learner) -> None:
        """Start of a fit, before the first epoch (a resumed fit loads callback states next)."""

    def before_epoch(self, learn: Learner) -> None:
        """Start of an epoch, before training on it."""

    def before_train(self, learn: Learner) -> None:
        """Start of the epoch's training pass, the model in train mode."""

    def before_batch(self, learn: Learner) -> None:
        """A batch is on the device as ``learn.batch``, before the forward pass."""

    def after_loss(self, learn: Learner) -> None:
        """``learn.loss`` is the batch's loss, ``learn.loss_grad`` what backward will see."""

    def before_step(self, learn: Learner) -> None:
        """Gradients are ready; ``learn.train_iter`` is the index of this optimizer step."""

    def after_step(self, learn: Learner) -> None:
        """An optimizer step happened (not fired when it was cancelled or skipped)."""

    def after_batch(self, learn: Learner) -> None:
        """End of a batch not cancelled, whether or not it ended an optimizer step."""

    def after_train(self, learn: Learner) -> None:
        """End of the epoch's training pass."""

    def before_validate(self, learn: Learner) -> None:
        """Before validation (only with a ``valid_dl``)."""

    def after_validate(self, learn: Learner) -> None:
        """``learn.valid_result`` holds the validation dict."""

    def after_epoch(self, learn: Learner) -> None:
        """End of an epoch; also after ``CancelEpochException``."""

    def after_fit(self, learn: Learner) -> None:
        """End of a fit; always, also after an error (``learn.fit_error`` is set then)."""

    def state_dict(self) -> dict[str, Any]:
        """What a :class:`Checkpoint` keeps of this callback to resume exactly (default none).

        A callback that carries state from one epoch to the next overrides this and
        :meth:`load_state_dict`, which a resumed fit calls right after ``before_fit``.
        """
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take back what :meth:`state_dict` returned."""


def momentum_key(group: dict) -> str | None:
    """``"momentum"`` for SGD-like groups, ``"betas"`` for Adam-like ones, else None."""
    if "momentum" in group:
        return "momentum"
    if "betas" in group:
        return "betas"
    return None


def get_momentum(group: dict) -> float | None:
    """The group's momentum: SGD ``momentum`` or ``betas[0]``; None when it has neither."""
    key = momentum_key(group)
    return None if key is None else group[key] if key == "momentum" else group[key][0]


def set_lr(group: dict, value: float) -> None:
    """Write ``value`` as the group's LR, into its tensor when the LR is one.

    A tensor LR (for a compiled or capturable step) stays the same object, so whatever holds
    it sees the schedule.
    """
    if isinstance(group["lr"], torch.Tensor):
        group["lr"].fill_(value)
    else:
        group["lr"] = value


def set_momentum(group: dict, value: float) -> None:
    """Write ``value`` as the group's momentum (``betas[0]``, keeping the other betas)."""
    key = momentum_key(group)
    if key == "momentum":
        group["momentum"] = value
    elif key == "betas":
        group["betas"] = (value, *group["betas"][1:])


def _momentum_buffers(opt: torch.optim.Optimizer) -> None:
    """Give RMSprop state made without momentum the zero buffer RMSprop makes with it.

    RMSprop creates ``momentum_buffer`` only when momentum > 0 at a parameter's first step,
    and its step fails with a KeyError once momentum is set later (one-cycle after a fit
    with momentum=0).
    """
    if isinstance(opt, torch.optim.RMSprop):
        for state in opt.state.values():
            if state and "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(state["square_avg"])


class ParamScheduler(Callback):
    """Set hyper-parameters from schedules before every optimizer step.

    ``scheds`` maps ``"lr"`` or ``"mom"`` to one schedule for all groups or one per group. For
    step ``i`` of ``n`` in the fit, ``pos = i / (n - 1)``.
    """

    order = 10

    def __init__(self, scheds: dict[str, Schedule | Sequence[Schedule]]) -> None:
        if not isinstance(scheds, Mapping):
            raise TypeError(f"scheds must be a dict of schedules, got {scheds!r}")
        for name, sched in scheds.items():
            if name not in ("lr", "mom"):
                raise ValueError(f"scheds keys must be 'lr' or 'mom', got {name!r}")
            fns = list(sched) if isinstance(sched, Sequence) else [sched]
            if not fns or not all(callable(f) for f in fns):
                raise TypeError(f"scheds[{name!r}] must be a schedule f(pos) -> value or one "
                                f"per parameter group, got {sched!r}")
        self.scheds = dict(scheds)

    def per_group(self, n_groups: int) -> dict[str, list[Schedule]]:
        """Each name's schedules, one per parameter group (ValueError for a list too long/short)."""
        out = {}
        for name, sched in self.scheds.items():
            fns = list(sched) if isinstance(sched, Sequence) else [sched] * n_groups
            if len(fns) != n_groups:
                raise ValueError(f"{name} schedules: expected {n_groups} (one per parameter "
                                 f"group), got {len(fns)}")
            out[name] = fns
        return out

    def before_fit(self, learn: Learner) -> None:
        groups = learn.opt.param_groups
        self._lr: list[tuple[dict[str, Any], Schedule]] = []  # (param group, its schedule)
        self._mom: list[tuple[dict[str, Any], Schedule]] = []
        for name, fns in self.per_group(len(groups)).items():
            if name == "mom" and any(momentum_key(g) is None for g in groups):
                warn(f"{type(learn.opt).__name__} has neither 'momentum' nor 'betas': "
                     "momentum is not scheduled")
                continue
            if name == "mom":
                _momentum_buffers(learn.opt)
            (self._lr if name == "lr" else self._mom).extend(zip(groups, fns))
        self._denom = max(learn.total_steps - 1, 1)

    def before_step(self, learn: Learner) -> None:
        pos = learn.train_iter / self._denom
        for group, f in self._lr:
            set_lr(group, f(pos))
        for group, f in self._mom:
            set_momentum(group, f(pos))


class TorchScheduler(Callback):
    """Drive a ``torch.optim.lr_scheduler`` class from the learner.

    ``sched_cls(learn.opt, *args, **kwargs)`` builds it at the start of fit; any callable
    taking the optimizer first works, e.g. ``lambda opt: SequentialLR(opt, [...], [...])``
    to chain schedulers built on that optimizer. ``interval="epoch"`` (default) steps at each
    epoch end, ``ReduceLROnPlateau`` with the ``monitor`` value (default ``"valid_loss"``);
    ``interval="batch"`` steps after every optimizer step, and ``CosineAnnealingWarmRestarts``
    then gets the fractional epoch ``(step + 1) / steps_per_epoch``. It drives ``fit``: the
    other ``fit_*`` methods and ``fine_tune`` set the LR at every step, so they refuse it.
    """

    order = 55  # after the Recorder: it logs the LR a step used, then reads this epoch's row

    def __init__(self, sched_cls: Callable[..., Any], *args: Any, interval: str = "epoch",
                 monitor: str = "valid_loss", **kwargs: Any) -> None:
        if not callable(sched_cls):
            raise TypeError(f"sched_cls must be a scheduler class, got {sched_cls!r}")
        if interval not in ("epoch", "batch"):
            raise ValueError(f"interval must be 'epoch' or 'batch', got {interval!r}")
        try:  # missing or unknown arguments show now, not after fit has set the LRs
            signature = inspect.signature(sched_cls)
        except (TypeError, ValueError):  # no signature to read: the scheduler will tell
            signature = None
        if signature is not None:
            try:
                signature.bind(None, *args, **kwargs)  # None stands for the optimizer
            except TypeError as e:
                raise TypeError(f"sched_cls {getattr(sched_cls, '__name__', sched_cls)!r} "
                                f"rejects the arguments {args!r}, {kwargs!r}: {e}") from None
        self.sched_cls, self.args, self.kwargs = sched_cls, args, kwargs
        self.interval = interval
        cls = getattr(sched_cls, "func", sched_cls)  # a functools.partial's class
        self.plateau = isinstance(cls, type) and issubclass(
            cls, torch.optim.lr_scheduler.ReduceLROnPlateau)
        self.monitor = monitor if self.plateau else None  # checked by the learner up front
        self._monitor = monitor  # also for a function that builds a ReduceLROnPlateau
        self._check_interval()

    def _check_interval(self) -> None:
        if self.plateau and self.interval == "batch":
            raise ValueError("interval must be 'epoch' for ReduceLROnPlateau, got 'batch'")

    def __repr__(self) -> str:
        name = getattr(self.sched_cls, "__name__", repr(self.sched_cls))
        return (f"TorchScheduler({name}, args={self.args!r}, kwargs={self.kwargs!r}, "
                f"interval={self.interval!r}, monitor={self.monitor!r})")

    def before_fit(self, learn: Learner) -> None:
        for group in learn.opt.param_groups:
            group.pop("initial_lr", None)  # else a scheduler from an earlier fit sets the base LR
        self.sched = self.sched_cls(learn.opt, *self.args, **self.kwargs)
        # what it is decides how it steps: sched_cls may be a function that builds it
        lr_scheduler = torch.optim.lr_scheduler
        self.plateau = isinstance(self.sched, lr_scheduler.ReduceLROnPlateau)
        self.restarts = isinstance(self.sched, lr_scheduler.CosineAnnealingWarmRestarts)
        self._check_interval()
        if self.plateau:
            learn.check_monitor(self._monitor)

    def state_dict(self) -> dict[str, Any]:
        """The scheduler's state and the hyper-parameters of every group it drives."""
        groups = [{k: v for k, v in g.items() if k != "params"}
                  for g in self.sched.optimizer.param_groups]
        return {"sched": self.sched.state_dict(), "groups": groups}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sched.load_state_dict(state["sched"])
        # building the scheduler in before_fit may have set LRs (LinearLR, OneCycleLR): undo it
        for g, saved in zip(self.sched.optimizer.param_groups, state["groups"]):
            g.update(saved)

    def after_step(self, learn: Learner) -> None:
        if self.interval != "batch":
            return
        if self.restarts:
            self.sched.step((learn.train_iter + 1) / learn.steps_per_epoch)
        else:
            self.sched.step()

    def after_epoch(self, learn: Learner) -> None:
        if self.interval != "epoch":
            return
        if self.plateau:
            value = learn.recorder.values[-1].get(self._monitor)
            if value is not None:  # None: the epoch was cancelled before validation
                self.sched.step(value)
        else:
            self.sched.step()
