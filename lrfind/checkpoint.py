"""Checkpoints that resume exactly, early stopping, and keeping the best model."""

from __future__ import annotations

import math
import os
import re
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from torch import nn

from .callback import Callback, CancelFitException
from .distributed import barrier
from .utils import atomic_save, check_int, check_number, check_path, set_rng_state

if TYPE_CHECKING:
    from .learner import Learner

FORMAT = "lrfind-checkpoint-1"
T = TypeVar("T")


def stateful_callbacks(learn: Learner, cbs: list[Callback]) -> list[Callback]:
    """The callbacks among ``cbs`` with a ``state_dict`` of their own (the recorder aside)."""
    return [cb for cb in cbs
            if cb is not learn.recorder and type(cb).state_dict is not Callback.state_dict]


def describe(cb: Callback) -> str:
    """How a checkpoint names a callback: its repr when it has one, else its class name.

    Memory addresses (`` at 0x...``, as in the repr of a function) are left out: they differ
    from one process to the next.
    """
    if type(cb).__repr__ is object.__repr__:
        return type(cb).__name__
    return re.sub(r" at 0x[0-9a-fA-F]+", "", repr(cb))


def training_state(learn: Learner, mid_epoch: bool) -> dict[str, Any]:
    """Everything to resume: model, optimizer, scaler, recorder, callbacks, progress and RNGs.

    At an epoch end the state points at the start of the next epoch; mid-epoch it holds the
    batches already seen and the RNG state of the epoch's start, to replay the same order.
    """
    learn.recorder.flush(learn)  # raises on a non-finite loss: a bad state is never saved
    return {
        "format": FORMAT,
        "model": learn.model.state_dict(),
        "opt": learn.opt.state_dict(),
        "opt_class": type(learn.opt).__name__,
        "trainable": [p.requires_grad for p in learn.model.parameters()],
        "scaler": None if learn.scaler is None else learn.scaler.state_dict(),
        "recorder": learn.recorder.state_dict(),
        "callbacks": [(describe(cb), cb.state_dict())
                      for cb in stateful_callbacks(learn, [*learn.cbs, *learn._extra])],
        "epoch": learn.epoch if mid_epoch else learn.epoch + 1,
        "batches_done": learn.iter + 1 if mid_epoch else 0,
        "train_iter": learn.train_iter,
        "n_epoch": learn.n_epoch,
        "total_steps": learn.total_steps,
        "sched": learn.sched_args,
        "rng": _every_process(learn, learn.rng_state()),
        "epoch_rng": _every_process(learn, learn.epoch_rng) if mid_epoch else None,
        # a DistributedSampler shuffles from its own seed (drawn at the start of the job)
        "sampler_seed": getattr(getattr(learn.train_dl, "sampler", None), "seed", None),
    }


def _every_process(learn: Learner, rng: T) -> list[T]:
    """The RNG state of every process, in rank order: each may draw its own numbers."""
    if learn.world_size == 1:
        return [rng]
    import torch.distributed as dist

    states: list[Any] = [None] * learn.world_size
    dist.all_gather_object(states, rng)
    return states


def _own(learn: Learner, saved: list[dict] | dict) -> dict:
    """This process's RNG state from :func:`_every_process` (older files hold one dict)."""
    return saved if isinstance(saved, dict) else saved[min(learn.rank, len(saved) - 1)]


def load_checkpoint(path: str) -> dict[str, Any]:
    """The checkpoint at ``path``; FileNotFoundError or ValueError if there is none."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"resume_from {path!r} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise ValueError(f"resume_from {path!r} is not an lrfind checkpoint "
                         f"({type(e).__name__})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"resume_from {path!r} is not an lrfind checkpoint")
    return state


def read_checkpoint(learn: Learner, path: str | os.PathLike, n_epoch: int,
                    cbs: list[Callback]) -> dict[str, Any]:
    """Load and check a checkpoint against ``learn``, ``n_epoch`` and the fit's ``cbs``.

    Changes nothing.
    """
    path = check_path("resume_from", path)
    state = load_checkpoint(path)
    check_state_dict(learn.model, state["model"])
    trainable = [p.requires_grad for p in learn.model.parameters()]
    if state.get("trainable", trainable) != trainable:  # older files: not recorded
        raise ValueError(f"resume_from {path!r} was written with {sum(state['trainable'])} of "
                         f"{len(trainable)} parameter tensors trainable, this learner has "
                         f"{sum(trainable)}: freeze as before resuming")
    check_opt_state(learn.opt, state["opt"], path, state.get("opt_class"))  # older files: none
    if state["n_epoch"] != n_epoch:
        raise ValueError(f"n_epoch is {n_epoch} but the checkpoint was written by a fit of "
                         f"{state['n_epoch']} epochs: resume with the same arguments")
    steps = n_epoch * math.ceil(len(learn.train_dl) / learn.accum_steps)
    if state["total_steps"] != steps:
        raise ValueError(f"the checkpoint's run had {state['total_steps']} optimizer steps, this "
                         f"one would have {steps}: the loader or accum_steps changed")
    saved = [name for name, _ in state.get("callbacks") or []]
    names = [describe(cb) for cb in stateful_callbacks(learn, [*learn.cbs, *cbs])]
    if "callbacks" in state and names != saved:  # files of earlier versions hold none
        raise ValueError(f"the checkpoint holds the state of the callbacks {saved}, this fit "
                         f"has {names}: resume with the same callbacks")
    return state


def apply_checkpoint(learn: Learner, state: dict[str, Any]) -> None:
    """Put the learner in the state :func:`read_checkpoint` returned, ready to continue."""
    learn.model.load_state_dict(state["model"])
    learn.opt.load_state_dict(state["opt"])
    if learn.scaler is not None and state["scaler"] is not None:
        learn.scaler.load_state_dict(state["scaler"])
    learn.recorder.load_state_dict(state["recorder"])
    if "callbacks" in state:
        learn.resume_cbs = [s for _, s in state["callbacks"]]
    sampler: Any = getattr(learn.train_dl, "sampler", None)
    if state.get("sampler_seed") is not None and hasattr(sampler, "seed"):
        sampler.seed = state["sampler_seed"]
    learn.epoch, learn.train_iter = state["epoch"], state["train_iter"]
    learn.resume_skip = state["batches_done"]
    if state["batches_done"]:  # replay the epoch's batch order, then go on from the RNGs
        set_rng_state(_own(learn, state["epoch_rng"]), learn.train_dl)
        learn.resume_rng = _own(learn, state["rng"])
    else:
        set_rng_state(_own(learn, state["rng"]), learn.train_dl)
    learn.resuming = True


def load_callback_states(learn: Learner, states: list[dict]) -> None:
    """Hand each stateful callback of a resumed fit its saved state (after ``before_fit``)."""
    cbs = stateful_callbacks(learn, [*learn.cbs, *learn._extra])
    for cb, state in zip(cbs, states, strict=True):
        cb.load_state_dict(state)
    learn.resume_cbs = None


class Checkpoint(Callback):
    """Write the full training state to ``path`` atomically, every epoch or every N steps.

    ``every="epoch"`` (default) writes at each epoch end; an int N writes after every N-th
    optimizer step. Resume with ``fit_one_cycle(..., resume_from=path)`` (same arguments and
    callbacks; the state of those with a ``state_dict``, such as :class:`EarlyStopping`,
    :class:`SaveBest` and :class:`TorchScheduler`, is in the checkpoint too).
    """

    order = 100  # last: the file holds what every other callback made of the batch or epoch

    def __init__(self, path: str | os.PathLike, every: str | int = "epoch") -> None:
        if every != "epoch":
            try:
                check_int("every", every)
            except ValueError:
                raise ValueError(f"every must be 'epoch' or an integer >= 1, "
                                 f"got {every!r}") from None
        self.path, self.every = check_path("path", path), every

    def _save(self, learn: Learner, mid_epoch: bool) -> None:
        state = training_state(learn, mid_epoch)
        if learn.is_main:
            atomic_save(state, self.path)
        barrier(learn.world_size)  # the other processes may read it next

    def before_fit(self, learn: Learner) -> None:
        self.saved = learn.train_iter  # steps done at the last save (or at the resume)

    def after_batch(self, learn: Learner) -> None:
        # After the batch of every N-th step, once the callbacks before this one are done
        # with it; on the next batch when a callback cancelled the rest of that one. Always
        # "mid-epoch", also after an epoch's last step: validation and after_epoch have not
        # run yet, so a resume replays the epoch's end from here.
        n, every = learn.train_iter, self.every
        if not isinstance(every, str) and n // every > self.saved // every:  # str: "epoch"
            self._save(learn, mid_epoch=True)
            self.saved = n

    def after_epoch(self, learn: Learner) -> None:
        if self.every == "epoch":
            self._save(learn, mid_epoch=False)


class _Monitor(Callback):
    """Tracks the best value of a monitored quantity across epochs."""

    order = 70

    def __init__(self, monitor: str, mode: str, min_delta: float = 0.0) -> None:
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        if check_number("min_delta", min_delta) < 0:
            raise ValueError(f"min_delta must be a number >= 0, got {min_delta!r}")
        self.monitor, self.mode, self.min_delta = monitor, mode, float(min_delta)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(monitor={self.monitor!r}, mode={self.mode!r}, "
                f"min_delta={self.min_delta!r}{self._more()})")

    def _more(self) -> str:
        return ""

    def before_fit(self, learn: Learner) -> None:
        self.best = math.inf if self.mode == "min" else -math.inf

    def state_dict(self) -> dict[str, Any]:
        """The best value so far."""
        return {"best": self.best}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best = state["best"]

    def improved(self, learn: Learner) -> bool | None:
        """Read this epoch's value; True (and remember it) when it beats the best.

        None when the epoch has no such value (it was cancelled before validation).
        """
        value = learn.recorder.values[-1].get(self.monitor)
        if value is None:
            return None
        better = (value < self.best - self.min_delta if self.mode == "min"
                  else value > self.best + self.min_delta)
        if better:
            self.best = value
        return better


class EarlyStopping(_Monitor):
    """Stop when ``monitor`` has not improved by more than ``min_delta`` for ``patience`` epochs.

    The decision is made at the end of an epoch and acted on before the next one, so the
    callbacks after it (a :class:`Checkpoint`) still see the last epoch end. Defaults:
    monitor "valid_loss", patience 3, min_delta 0, mode "min".
    """

    def __init__(self, monitor: str = "valid_loss", patience: int = 3, min_delta: float = 0.0,
                 mode: str = "min") -> None:
        super().__init__(monitor, mode, min_delta)
        self.patience = check_int("patience", patience)

    def _more(self) -> str:
        return f", patience={self.patience!r}"

    def before_fit(self, learn: Learner) -> None:
        super().before_fit(learn)
        self.wait = 0

    def state_dict(self) -> dict[str, Any]:
        """The best value so far and the epochs since it."""
        return {"best": self.best, "wait": self.wait}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.wait = state["best"], state["wait"]

    def before_epoch(self, learn: Learner) -> None:
        if self.wait >= self.patience:
            raise CancelFitException

    def after_epoch(self, learn: Learner) -> None:
        improved = self.improved(learn)
        if improved is None:
            return
        self.wait = 0 if improved else self.wait + 1
        if self.wait >= self.patience and learn.progress:  # progress=False prints nothing
            learn.print(f"early stopping after epoch {learn.epoch}: {self.monitor} has not "
                        f"improved for {self.patience} epochs (best {self.best:.6g})")


class SaveBest(_Monitor):
    """Save the model (``learn.save``) whenever ``monitor`` reaches a new best.

    Defaults: monitor "valid_loss", mode "min".
    """

    def __init__(self, path: str | os.PathLike, monitor: str = "valid_loss",
                 mode: str = "min") -> None:
        super().__init__(monitor, mode)
        self.path = check_path("path", path)

    def after_epoch(self, learn: Learner) -> None:
        if self.improved(learn):
            learn.save(self.path)


def check_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Raise ValueError if ``state`` does not have exactly ``model``'s keys and shapes."""
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    shapes = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    if missing or unexpected or shapes:
        raise ValueError(f"checkpoint does not match the model: missing keys {missing[:5]}, "
                         f"unexpected keys {unexpected[:5]}, shape mismatches {shapes[:5]}")


def check_opt_state(opt: torch.optim.Optimizer, state: dict, where: str,
                    kind: str | None = None) -> None:
    """Raise ValueError unless ``state`` has ``opt``'s parameter groups (and class ``kind``)."""
    if kind is not None and kind != type(opt).__name__:
        raise ValueError(f"{where!r} holds the state of the optimizer {kind}, this learner's "
                         f"optimizer is {type(opt).__name__}")
    sizes = [len(g["params"]) for g in state["param_groups"]]
    if sizes != [len(g["params"]) for g in opt.param_groups]:
        raise ValueError(f"{where!r}: the optimizer state has parameter groups of sizes {sizes}, "
                         f"this learner's optimizer {[len(g['params']) for g in opt.param_groups]}")
