"""The LR range test: an exponential (or linear) sweep of the LR, one optimizer step per LR.

The sweep runs in the learner's own loop (so mixed precision, gradient accumulation, clipping
and multi-process training behave as in a fit), with only the callbacks marked ``in_lr_find``
attached (none by default), and leaves the model, optimizer, RNGs and loader exactly as they
were: see :func:`preserved`.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import math
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parameter import is_lazy

from .callback import Callback, CancelFitException, set_lr
from .learner import Learner
from .plots import in_notebook, new_axes
from .progress import bar
from .suggest import READABLE, SUGGESTIONS, drop_to_noise, suggestion_input
from .utils import (
    check_int,
    check_number,
    check_positive,
    get_rng_state,
    map_nested,
    set_rng_state,
    warn,
)

Suggestion = Callable[[np.ndarray, np.ndarray], "float | None"]
STOP_REASONS = ("diverged", "non-finite loss", "num_it reached")


class _Saved:
    """A tensor's value copied to the CPU, and the device it goes back to."""

    __slots__ = ("value", "device")

    def __init__(self, t: torch.Tensor) -> None:
        self.value, self.device = t.detach().to("cpu", copy=True), t.device


def _save(obj: Any) -> Any:
    """Copy of a nested dict/list/tuple with every tensor copied to the CPU (dtype kept)."""
    return map_nested(obj, _Saved)


def _load(obj: Any) -> Any:
    """Inverse of :func:`_save`: every tensor back on its device, with its dtype."""
    return map_nested(obj, lambda s: s.value.to(s.device, copy=True), _Saved)


def _put_back(current: dict, saved: dict, keep: tuple[str, ...] = ()) -> None:
    """Make ``current`` hold ``saved`` (from :func:`_save`) again, tensors copied in place.

    A tensor of the same shape, dtype and device is overwritten, so whatever holds it (a
    ``state_dict()`` taken before, a compiled step) sees the old values again; any other
    value is replaced. Keys not in ``saved`` go, except those in ``keep``.
    """
    for k in [k for k in current if k not in saved and k not in keep]:
        del current[k]
    for k, v in saved.items():
        t = current.get(k)
        if (isinstance(v, _Saved) and isinstance(t, torch.Tensor) and t.device == v.device
                and t.dtype == v.value.dtype and t.shape == v.value.shape):
            with torch.no_grad():
                t.copy_(v.value)
        else:
            current[k] = _load(v)


@contextlib.contextmanager
def preserved(learn: Learner, cbs: Sequence[Callback] = ()) -> Iterator[None]:
    """Snapshot everything a range test touches, on the CPU, and restore it bitwise on exit.

    Covers parameters (the model's and any other the optimizer trains), buffers and
    gradients, which tensor each module attribute holds, ``requires_grad`` flags, every
    module's train mode, the optimizer's state (dtypes kept) and hyper-parameters, the grad
    scaler, the torch (CPU and CUDA), numpy and Python RNGs, the train loader's generators and
    its sampler's epoch, and the ``state_dict`` of the callbacks ``cbs`` that join the
    sweep. Restores in ``finally``, so an exception or Ctrl-C restores the state, then
    propagates. Writes no file.
    """
    model, opt, dl = learn.model, learn.opt, learn.train_dl
    # what each module holds: a model may assign a new tensor (or a parameter) to a buffer
    held = [(m, dict(m._parameters), dict(m._buffers), set(m._non_persistent_buffers_set))
            for m in model.modules()]
    cb_states = [(cb, copy.deepcopy(cb.state_dict())) for cb in cbs]
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers(),
                                  *(p for g in opt.param_groups for p in g["params"])]}.values()
    saved = [(t, t.detach().to("cpu", copy=True),
              None if t.grad is None else t.grad.detach().to("cpu", copy=True),
              t.requires_grad) for t in tensors]
    modes = [(m, m.training) for m in model.modules()]
    # restored by hand: Optimizer.load_state_dict would cast the state to the parameters' dtype
    groups = [_save({k: v for k, v in g.items() if k != "params"}) for g in opt.param_groups]
    opt_state = {p: _save(s) for p, s in opt.state.items()}
    scaler = learn.scaler  # fit runs on a fresh scaler: the user's comes back as it was
    scaler_state = None if scaler is None else _save(scaler.state_dict())
    rng = get_rng_state(dl)
    sampler: Any = getattr(dl, "sampler", None)
    epoch = getattr(sampler, "epoch", None) if hasattr(sampler, "set_epoch") else None
    workers = getattr(dl, "_iterator", None)  # a DataLoader's persistent workers, if any
    attrs = {k: getattr(learn, k) for k in ("epoch", "n_epoch", "train_iter", "iter",
                                            "total_steps", "steps_per_epoch", "valid_result",
                                            "fit_error", "resuming", "sched_args")}
    if workers is not None:
        dl._iterator = None  # the sweep starts workers of its own: these keep their RNGs
    try:
        yield
    finally:
        for m, params, buffers, non_persistent in held:
            m._parameters.clear()
            m._parameters.update(params)
            m._buffers.clear()
            m._buffers.update(buffers)
            m._non_persistent_buffers_set.clear()
            m._non_persistent_buffers_set.update(non_persistent)
        with torch.no_grad():
            for t, value, grad, requires_grad in saved:
                t.copy_(value)
                t.grad = None if grad is None else grad.to(t.device)
                t.requires_grad_(requires_grad)
        for m, mode in modes:
            m.training = mode
        for g, hyper in zip(opt.param_groups, groups):
            _put_back(g, hyper, keep=("params",))
        for p in [p for p in opt.state if p not in opt_state]:  # state the sweep created
            del opt.state[p]
        for p, s in opt_state.items():
            _put_back(opt.state[p], s)
        learn.scaler = scaler
        if scaler is not None:
            scaler.load_state_dict(_load(scaler_state))
        if epoch is not None:  # first: a sampler may re-seed its generator in set_epoch
            sampler.set_epoch(epoch)
        set_rng_state(rng, dl)
        if getattr(dl, "_iterator", None) is not workers:
            # the sweep's workers have drawn from their RNGs: let them go, and give the next
            # pass the workers it would have had without the range test (or fresh ones)
            dl._iterator = workers
        for k, v in attrs.items():
            setattr(learn, k, v)
        for cb, state in cb_states:
            cb.load_state_dict(state)
        learn.batch = learn.pred = None
        # typed as tensors for callbacks, which read them during a fit; the sweep's are dropped
        learn.loss = learn.loss_grad = learn.step_loss = None  # type: ignore[assignment]


class LRFindResult:
    """The outcome of a range test.

    Unpacks into the requested suggestions in order (``lr_min, lr_steep = res``); each is also
    an attribute (``res.minimum``) and an entry of ``res.suggestions``. ``lrs[k]`` is the LR of
    the optimizer step taken on the batch whose loss is ``raw_losses[k]`` (computed just before
    that step); ``losses`` are the smoothed losses. ``stop_reason`` is one of
    ``STOP_REASONS``: "diverged", "non-finite loss" or "num_it reached"; ``num_it`` is the
    number of steps asked for. A suggestion is None when its rule found no answer;
    ``drop_to_noise`` says how well the curve can be read at all.
    """

    def __init__(self, lrs: list[float], raw_losses: list[float], losses: list[float],
                 stop_reason: str, suggestions: dict[str, float | None], num_it: int) -> None:
        self.lrs, self.raw_losses, self.losses = lrs, raw_losses, losses
        self.stop_reason, self.suggestions, self.num_it = stop_reason, suggestions, num_it

    def __getattr__(self, name: str) -> Any:
        suggestions = self.__dict__.get("suggestions", {})
        if name in suggestions:
            return suggestions[name]
        raise AttributeError(f"no suggestion {name!r}; requested: {list(suggestions)}")

    def __iter__(self) -> Iterator[float | None]:
        return iter(self.suggestions.values())

    def __len__(self) -> int:
        return len(self.suggestions)

    def __getitem__(self, key: int | str) -> float | None:
        return self.suggestions[key] if isinstance(key, str) else list(self)[key]

    def __repr__(self) -> str:
        found = ", ".join(f"{k}={'None' if v is None else f'{v:.3g}'}"
                          for k, v in self.suggestions.items())
        return f"LRFindResult({found}, points={len(self.lrs)}, stop_reason={self.stop_reason!r})"

    @property
    def drop_to_noise(self) -> float | None:
        """The smoothed loss's fall over the batch-to-batch loss std; under 1, too little to read.

        See :func:`lrfind.suggest.drop_to_noise`; None when the curve never falls.
        """
        return drop_to_noise(np.array(self.lrs), np.array(self.raw_losses),
                             np.array(self.losses), self.num_it)

    def plot(self, ax: Any = None, skip_end: int = 5) -> Any:
        """Smoothed loss against LR on a log-x axis, one labelled marker per suggestion.

        The last ``skip_end`` points (default 5) are left out, at most a quarter of them as in
        the suggestion input, so a short run still shows its curve. Returns the matplotlib Axes.
        """
        check_int("skip_end", skip_end, low=0)
        ax = new_axes(ax)
        n = len(self.lrs) - min(skip_end, len(self.lrs) // 4)
        lrs, losses = np.asarray(self.lrs[:n]), np.asarray(self.losses[:n])
        ax.plot(lrs, losses)
        good = np.isfinite(losses)
        found = [(k, v) for k, v in self.suggestions.items() if v is not None]
        for (name, lr), marker in zip(found, itertools.cycle("ovs^Dp*h")):
            if good.any():
                y = np.interp(np.log(lr), np.log(lrs[good]), losses[good])
                ax.plot([lr], [y], marker, markersize=8, label=f"{name}: {lr:.2e}")
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.set_ylabel("loss (smoothed)")
        if found and good.any():
            ax.legend()
        return ax


class RangeTest(Callback):
    """Sets the LR of optimizer step k from the grid; records, smooths and stops the sweep."""

    def __init__(self, grid: list[float], stop_div: bool, div_th: float, beta: float) -> None:
        self.grid, self.stop_div, self.div_th, self.beta = grid, stop_div, div_th, beta
        self.lrs: list[float] = []
        self.raw: list[float] = []
        self.smooth: list[float] = []
        self.stop_reason = "num_it reached"

    def before_fit(self, learn: Learner) -> None:
        # Groups keep their ratios to the last group, which follows the grid. A schedule
        # that ended at LR 0 left no ratios: then they are those of the learner's lr.
        lrs = [float(g["lr"]) for g in learn.opt.param_groups]
        if not lrs[-1] > 0:
            try:
                lrs = learn._lrs(None)
            except ValueError:  # no positive LR anywhere: all groups alike
                lrs = [1.0] * len(lrs)
        self.ratios = [lr / lrs[-1] for lr in lrs]
        self.avg, self.best = 0.0, math.inf
        self.bar = None
        if learn.progress and learn.is_main:
            self.bar = bar(len(self.grid), "lr_find")

    def before_train(self, learn: Learner) -> None:
        self.fed = False

    def before_batch(self, learn: Learner) -> None:
        self.fed = True

    def after_train(self, learn: Learner) -> None:
        if not self.fed:  # a loader that cannot be iterated again would loop on nothing
            raise ValueError(f"train_dl yielded no batch on pass {learn.epoch + 1} of the range "
                             f"test, after {len(self.lrs)} steps: it must be iterable again "
                             "when it runs out before num_it steps")

    def before_step(self, learn: Learner) -> None:
        lr = self.grid[learn.train_iter]
        for g, r in zip(learn.opt.param_groups, self.ratios):
            set_lr(g, lr * r)

    def after_step(self, learn: Learner) -> None:
        loss = learn.reduce_loss(learn.step_loss).item()  # the one host sync per step
        k = learn.train_iter
        self.lrs.append(self.grid[k])
        self.raw.append(loss)
        if self.bar is not None:
            self.bar.update(1)
        if not math.isfinite(loss):
            self.smooth.append(float("nan"))
            self.stop_reason = "non-finite loss"
            raise CancelFitException
        self.avg = self.beta * self.avg + (1 - self.beta) * loss
        smooth = self.avg / (1 - self.beta ** (k + 1))
        self.smooth.append(smooth)
        self.best = min(self.best, smooth)
        # smooth > div_th * best for positive losses; also meaningful for negative ones
        if self.stop_div and smooth - self.best > (self.div_th - 1) * abs(self.best):
            self.stop_reason = "diverged"
            raise CancelFitException
        if k + 1 == len(self.grid):
            raise CancelFitException

    def after_fit(self, learn: Learner) -> None:
        if self.bar is not None:
            self.bar.close()


def check_args(start_lr: float, end_lr: float, num_it: int, stop_div: bool, div_th: float,
               beta: float, mode: str, suggest_funcs: Any) -> dict[str, Suggestion]:
    """Check the range test's arguments; return the suggestion functions by name."""
    check_positive("start_lr", start_lr)
    if check_number("end_lr", end_lr) <= start_lr:
        raise ValueError(f"end_lr must be > start_lr ({start_lr!r}), got {end_lr!r}")
    check_int("num_it", num_it, low=2)
    if not isinstance(stop_div, bool):
        raise TypeError(f"stop_div must be a bool, got {stop_div!r}")
    if check_number("div_th", div_th) <= 1:
        raise ValueError(f"div_th must be > 1, got {div_th!r}")
    if not 0 <= check_number("beta", beta) < 1:
        raise ValueError(f"beta must be in [0, 1), got {beta!r}")
    if mode not in ("exp", "linear"):
        raise ValueError(f"mode must be 'exp' or 'linear', got {mode!r}")
    if isinstance(suggest_funcs, str) or callable(suggest_funcs):
        suggest_funcs = [suggest_funcs]
    if not isinstance(suggest_funcs, Iterable):
        raise TypeError(f"suggest_funcs must be names or functions, got {suggest_funcs!r}")
    funcs = {}
    for f in suggest_funcs:
        if isinstance(f, str):
            if f not in SUGGESTIONS:
                raise ValueError(f"unknown suggestion {f!r}; known: {sorted(SUGGESTIONS)}")
            name, f = f, SUGGESTIONS[f]
        elif callable(f):
            name = getattr(f, "__name__", type(f).__name__)
        else:
            raise TypeError(f"suggest_funcs must hold names or functions, got {f!r}")
        if name in funcs:  # the result is keyed by name: one would hide the other
            raise ValueError(f"suggest_funcs has two suggestions named {name!r}: give each "
                             "function its own __name__")
        funcs[name] = f
    return funcs


def learner_lr_find(learn: Learner, *, start_lr: float, end_lr: float, num_it: int,
                    stop_div: bool, div_th: float, beta: float, mode: str,
                    suggest_funcs: Sequence[str | Suggestion], show_plot: bool) -> LRFindResult:
    """Run the LR range test on ``learn`` (the defaults: ``Learner.lr_find``, :func:`lr_find`)."""
    funcs = check_args(start_lr, end_lr, num_it, stop_div, div_th, beta, mode, suggest_funcs)
    if mode == "linear" and end_lr > 100 * start_lr:
        warn(f"mode='linear' from {start_lr:g} to {end_lr:g} spends nine tenths of the "
             "sweep in its top decade, and the suggestions skip the first tenth: use "
             "mode='exp' for more than two decades")
    if isinstance(learn.opt, torch.optim.Rprop):
        warn("Rprop takes lr only as each weight's first step size and adapts it "
             "from the signs of the gradients: the range test's curve says little "
             "about the LR")
    if mode == "exp":
        grid = [start_lr * (end_lr / start_lr) ** (k / (num_it - 1)) for k in range(num_it)]
    else:
        grid = [start_lr + (end_lr - start_lr) * k / (num_it - 1) for k in range(num_it)]
    grid[-1] = end_lr
    lazy = [n for n, p in learn.model.named_parameters() if is_lazy(p)]
    if lazy:
        raise ValueError(f"the model has uninitialized lazy parameters {lazy[:3]}: run one "
                         "batch through it before the range test")
    test = RangeTest(grid, stop_div, div_th, beta)
    joining = [cb for cb in [*learn.cbs, *learn._extra] if cb.in_lr_find]
    valid_dl, learn.valid_dl = learn.valid_dl, None  # no validation during the sweep
    try:
        with preserved(learn, joining):
            # Every epoch tries at least one step; fp16 skips a few (overflow): 2 * num_it
            # epochs leave room for num_it skipped steps.
            learn._fit(2 * num_it, [test, *joining], only=True)
    finally:
        learn.valid_dl = valid_dl
    lrs, losses = suggestion_input(np.array(test.lrs), np.array(test.smooth), num_it)
    suggestions = {}
    for name, f in funcs.items():
        value = f(lrs, losses)
        suggestions[name] = None if value is None or not math.isfinite(value) else float(value)
    res = LRFindResult(test.lrs, test.raw, test.smooth, test.stop_reason, suggestions, num_it)
    learn.recorder.lr_find_result = res
    readable = res.drop_to_noise
    if readable is not None and readable < READABLE:
        warn(f"lr_find: the smoothed loss falls by only {readable:.2g} times the batch-to-batch "
             "std of the loss, too little to read: suggestions from this curve change from run "
             "to run; a longer sweep (more num_it) or larger batches read it better")
    if show_plot and in_notebook() and learn.is_main:
        res.plot()
    return res


def lr_find(model: nn.Module, optimizer: torch.optim.Optimizer, train_dl: Any, *,
            loss_func: Callable[..., torch.Tensor] | None = None,
            compute_loss: Callable[[nn.Module, Any], torch.Tensor] | None = None,
            start_lr: float = 1e-7, end_lr: float = 10.0, num_it: int = 100,
            stop_div: bool = True, div_th: float = 4.0, beta: float = 0.98, mode: str = "exp",
            suggest_funcs: Sequence[str | Suggestion] = ("minimum", "steep"),
            show_plot: bool = True, progress: bool = False) -> LRFindResult:
    """LR range test on a plain model and optimizer; everything is restored afterwards.

    Optimizer step k of ``num_it`` uses ``start_lr * (end_lr/start_lr) ** (k/(num_it-1))``
    (``mode="exp"``) or ``start_lr + (end_lr-start_lr) * k/(num_it-1)`` (``"linear"``), times
    each group's ratio to the last group. The loss is smoothed by a debiased EMA (``beta``);
    the sweep stops when the smoothed loss exceeds ``div_th`` times its best (``stop_div``), at
    a non-finite loss, or after ``num_it`` steps. The loader cycles when shorter than
    ``num_it``. Defaults: 1e-7 to 10 over 100 steps, mode "exp", stop_div True, div_th 4,
    beta 0.98, suggestions ``minimum`` and ``steep``, progress False. ``show_plot`` (default
    True) draws the curve in notebooks only.
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {optimizer!r}")
    funcs = check_args(start_lr, end_lr, num_it, stop_div, div_th, beta, mode, suggest_funcs)
    # under torchrun the Learner wraps the model in DDP, which copies the first process's
    # weights into every process: each gets its own back afterwards
    own = _save(model.state_dict()) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None
    learn = Learner(model, train_dl, loss_func=loss_func, compute_loss=compute_loss,
                    opt_func=lambda groups: optimizer, lr=None, progress=progress,
                    splitter=lambda m: [g["params"] for g in optimizer.param_groups])
    try:
        return learner_lr_find(learn, start_lr=start_lr, end_lr=end_lr, num_it=num_it,
                               stop_div=stop_div, div_th=div_th, beta=beta, mode=mode,
                               suggest_funcs=tuple(funcs.values()), show_plot=show_plot)
    finally:
        if own is not None:
            model.load_state_dict(_load(own))
