"""The Learner: a model, its data, an optimizer, and a training loop with events."""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
import numbers
import os
import pickle
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from . import schedules
from .callback import (
    EVENTS,
    Callback,
    CancelBatchException,
    CancelEpochException,
    CancelFitException,
    CancelStepException,
    ParamScheduler,
    TorchScheduler,
    set_lr,
)
from .checkpoint import (
    apply_checkpoint,
    check_opt_state,
    check_state_dict,
    load_callback_states,
    load_checkpoint,
    read_checkpoint,
)
from .distributed import (
    barrier,
    check_same_length,
    distributed_loader,
    init_distributed,
    is_sharded,
    sync_buffers,
)
from .metrics import metric_name
from .progress import ProgressCallback
from .recorder import Recorder
from .utils import (
    atomic_save,
    batch_size,
    check_int,
    check_number,
    check_path,
    check_positive,
    get_rng_state,
    set_rng_state,
    to_device,
)

if TYPE_CHECKING:
    from torch.nn.parallel import DistributedDataParallel

    from .finder import LRFindResult, Suggestion

LR = float | slice | Sequence[float]
PRECISIONS = {"32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
#: layers whose parameters ``freeze`` leaves trainable when ``train_bn`` is set
NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm,
              nn.LayerNorm, nn.GroupNorm)
# lr="auto" runs a longer range test than lr_find's default 100 steps: with ~40 steps a decade
# the curve is read well enough that the suggestion moves < 0.1 decade between seeds.
AUTO_NUM_IT = 300


def resolve_lrs(lr: LR, n_groups: int, name: str = "lr") -> list[float]:
    """One LR per parameter group from a float, ``slice(lo, hi)``, ``slice(hi)`` or a sequence.

    ``slice(lo, hi)`` is geometric from lo to hi across groups (a single group gets hi);
    ``slice(hi)`` gives ``hi/10`` to all groups but the last, which gets hi.
    """
    if isinstance(lr, slice):
        if lr.step is not None:
            raise ValueError(f"{name} slice takes no step, got {lr!r}")
        hi = check_positive(name, lr.stop)
        if lr.start is None:
            return [hi / 10] * (n_groups - 1) + [hi]
        lo = check_positive(name, lr.start)
        if n_groups == 1:
            return [hi]
        return [lo * (hi / lo) ** (i / (n_groups - 1)) for i in range(n_groups)]
    if isinstance(lr, (list, tuple)):
        if len(lr) != n_groups:
            raise ValueError(f"{name} needs one value per parameter group ({n_groups}), "
                             f"got {len(lr)}: {lr!r}")
        return [check_positive(name, v) for v in lr]
    return [check_positive(name, lr)] * n_groups


def _check_cbs(cbs: Any, name: str = "cbs") -> list[Callback]:
    cbs = [] if cbs is None else [cbs] if isinstance(cbs, Callback) else list(cbs)
    for cb in cbs:
        if not isinstance(cb, Callback):
            raise TypeError(f"{name} must hold Callback instances, got {cb!r}")
    return cbs


class Learner:
    """Train ``model`` on ``train_dl`` with events, schedules and a recorder.

    Batches are ``(x, y)`` or ``(x1, ..., xn, y)`` (``model(x1, ..., xn)``, then
    ``loss_func(pred, y)``); anything else goes through ``compute_loss(model, batch) -> loss``.
    The optimizer is ``opt_func(param_groups, lr=lr)`` over the groups of ``splitter(model)``
    (default: one group). Defaults: AdamW, lr=1e-3, moms=(0.95, 0.85, 0.95), precision "32",
    accum_steps=1, no clipping, train_bn=True (normalisation layers stay trainable when frozen).
    ``progress=True`` (default) prints a table row per epoch, with tqdm bars in a terminal or
    a notebook (none when stderr is a file or a pipe, as in a log).
    """

    # set during a fit for the callbacks to read (a range test leaves them None)
    batch: Any
    pred: Any
    loss: torch.Tensor
    loss_grad: torch.Tensor
    step_loss: torch.Tensor

    def __init__(self, model: nn.Module, train_dl: Any, valid_dl: Any = None, *,
                 loss_func: Callable[..., torch.Tensor] | None = None,
                 compute_loss: Callable[[nn.Module, Any], torch.Tensor] | None = None,
                 opt_func: Callable[..., torch.optim.Optimizer] = torch.optim.AdamW,
                 lr: LR | None = 1e-3, wd: float | None = None,
                 moms: Sequence[float] = (0.95, 0.85, 0.95),
                 metrics: Callable[..., Any] | Sequence[Callable[..., Any]] = (),
                 cbs: Callback | Sequence[Callback] = (),
                 splitter: Callable[[nn.Module], list] | None = None,
                 device: str | torch.device | None = None, progress: bool = True,
                 precision: str = "32", accum_steps: int = 1,
                 clip_grad: float | None = None, train_bn: bool = True) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        for name, dl in (("train_dl", train_dl), ("valid_dl", valid_dl)):
            if dl is None and name == "valid_dl":
                continue
            if not hasattr(dl, "__iter__") or not hasattr(dl, "__len__"):
                raise TypeError(f"{name} must be a sized iterable such as a DataLoader, got "
                                f"{type(dl).__name__}")
            try:
                n = len(dl)
            except TypeError as e:  # a DataLoader over an IterableDataset without __len__
                raise TypeError(f"{name} must have a length (schedules count its batches); "
                                f"len({name}) raised: {e}") from None
            if n == 0:
                raise ValueError(f"{name} is empty (len 0): it must yield at least one batch")
        if compute_loss is None and loss_func is None:
            raise ValueError("loss_func and compute_loss are both None: pass one of them")
        if isinstance(opt_func, torch.optim.Optimizer):
            raise TypeError(f"opt_func must build the optimizer from the parameter groups (such "
                            f"as torch.optim.AdamW), got an {type(opt_func).__name__} instance")
        for name, f in (("loss_func", loss_func), ("compute_loss", compute_loss),
                        ("opt_func", opt_func)):
            if f is not None and not callable(f):
                raise TypeError(f"{name} must be callable, got {f!r}")
            if name != "opt_func" and isinstance(f, type) and issubclass(f, nn.Module):
                raise TypeError(f"{name} is the class {f.__name__}: pass an instance, "
                                f"{f.__name__}()")
        metrics = [metrics] if callable(metrics) else list(metrics)  # metrics=accuracy too
        for m in metrics:
            if not callable(m):
                raise TypeError(f"metrics must be callables f(preds, targets), got {m!r}")
        names = [metric_name(m) for m in metrics]
        for i, name in enumerate(names):
            if name in ("epoch", "train_loss", "valid_loss", "time") or name in names[:i]:
                raise ValueError(f"metrics must have distinct names other than epoch, "
                                 f"train_loss, valid_loss and time, got {names}: give each "
                                 "function its own __name__")
        if metrics and compute_loss is not None:
            raise ValueError("metrics need (x, y) batches and cannot be used with compute_loss")
        schedules.one_cycle_moms(moms)  # validates moms
        self.moms = tuple(moms)
        if wd is not None and check_number("wd", wd) < 0:
            raise ValueError(f"wd must be >= 0, got {wd!r}")
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
        self.accum_steps = check_int("accum_steps", accum_steps)
        if clip_grad is not None:
            check_positive("clip_grad", clip_grad)
        if not isinstance(train_bn, bool):
            raise TypeError(f"train_bn must be a bool, got {train_bn!r}")
        cbs = _check_cbs(cbs)
        groups = [list(model.parameters())] if splitter is None else [list(g) for g in
                                                                       splitter(model)]
        if splitter is None and not groups[0]:
            raise ValueError(f"model has no parameters to train: {type(model).__name__}")
        if not groups or any(len(g) == 0 for g in groups):
            raise ValueError("splitter must return a non-empty list of non-empty parameter lists")
        lrs = None if lr is None else resolve_lrs(lr, len(groups))

        if device is not None:
            self.device = torch.device(device)
        else:
            first = next(iter(model.parameters()), None)
            self.device = first.device if first is not None else torch.device("cpu")
        self.world_size, self.rank = init_distributed(self.device)
        if self.world_size > 1 and self.device.type == "cuda":
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        model = model.to(self.device)
        self.precision, self.clip_grad = precision, clip_grad
        dtype = PRECISIONS[precision]
        if dtype is not None:
            try:
                with torch.autocast(self.device.type, dtype=dtype):
                    pass
            except (RuntimeError, ValueError) as e:
                raise ValueError(f"precision={precision!r} is not supported on "
                                 f"{self.device.type}: {e}") from None
        self._autocast: Callable[[], contextlib.AbstractContextManager[Any]]
        if dtype is None:
            self._autocast = contextlib.nullcontext
        else:
            self._autocast = functools.partial(torch.autocast, device_type=self.device.type,
                                               dtype=dtype)
        self.scaler = torch.amp.GradScaler(self.device.type) if precision == "fp16" else None
        self.model, self.train_model = model, model  # training calls train_model
        self.ddp: DistributedDataParallel | None = None  # wraps the model as train_model
        if self.world_size > 1:
            train_dl = distributed_loader(train_dl, self.world_size, self.rank)
            check_same_length(train_dl)
            if not is_sharded(model):  # a model the user wrapped (DDP, FSDP) stays as it is
                self._wrap()
        self.train_dl, self.valid_dl = train_dl, valid_dl
        self.loss_func, self.compute_loss, self.metrics = loss_func, compute_loss, metrics
        self.metric_names = names
        self.splitter, self.progress = splitter, progress
        self._groups, self.train_bn = groups, train_bn
        params = [{"params": g} for g in groups]
        self.opt = opt_func(params) if lrs is None else opt_func(params, lr=lrs[-1])
        if lrs is not None:
            self._set_lrs(lrs)
        closure = inspect.signature(self.opt.step).parameters.get("closure")
        if closure is not None and closure.default is inspect.Parameter.empty:
            raise TypeError(f"opt_func: {type(self.opt).__name__} needs a closure at every step "
                            "(a line search); lrfind steps once per batch without one")
        self._check_wd(wd)
        self.lr = lr if lr is not None else [float(g["lr"]) for g in self.opt.param_groups]
        self._set_wd(wd)
        self.recorder = Recorder()
        self.cbs: list[Callback] = []
        self._extra: list[Callback] = []
        for cb in [self.recorder, *([ProgressCallback()] if progress else []), *cbs]:
            self.add_cb(cb)
        self.epoch, self.n_epoch, self.train_iter, self.iter = 0, 0, 0, 0
        self.total_steps, self.steps_per_epoch, self.step_n = 0, 0, 0
        self.resuming = False
        self.fit_error: BaseException | None = None
        self.valid_result: dict[str, float] | None = None
        self.resume_skip = 0
        self.resume_rng: dict | None = None  # set with resume_skip, to go on after the skip
        self.epoch_rng: dict | None = None  # at the start of the current epoch
        self.resume_cbs: list[dict] | None = None  # states of stateful callbacks, to resume
        self.sched_args: dict[str, Any] = {}
        self.is_main = self.rank == 0

    # ---- callbacks -------------------------------------------------------------------------
    def add_cb(self, cb: Callback) -> None:
        """Add a callback for all later fits."""
        self.cbs.append(self._new_cbs([cb], "cb")[0])
        self._sort_handlers()

    def remove_cb(self, cb: Callback) -> None:
        """Remove a callback added earlier."""
        if not any(c is cb for c in self.cbs):
            raise ValueError(f"cb {cb!r} is not one of this learner's callbacks")
        self.cbs = [c for c in self.cbs if c is not cb]
        self._sort_handlers()

    def _new_cbs(self, cbs: Any, name: str = "cbs") -> list[Callback]:
        """``cbs`` as a checked list; a callback already in it or in the learner's is refused
        (its events would fire twice) and so is a monitor the recorder does not write."""
        cbs = _check_cbs(cbs, name)
        for i, cb in enumerate(cbs):
            if any(c is cb for c in [*self.cbs, *cbs[:i]]):
                raise ValueError(f"{name} holds {cb!r} twice or one the learner already has")
        self._check_monitors(cbs)
        for cb in [*self.cbs, *cbs]:  # before a fit sets any LR
            if isinstance(cb, ParamScheduler):
                cb.per_group(len(self.opt.param_groups))
        return cbs

    def _check_monitors(self, cbs: list[Callback]) -> None:
        for cb in [*self.cbs, *cbs]:  # a callback that reads a monitored value names it
            monitor = getattr(cb, "monitor", None)
            if monitor is not None:
                self.check_monitor(monitor)

    def _sort_handlers(self, only: list[Callback] | None = None) -> None:
        cbs = sorted(self.cbs + self._extra if only is None else only, key=lambda c: c.order)
        # Only overridden events are called: the loop's cost per event is one list iteration.
        self._handlers = {e: [getattr(c, e) for c in cbs
                              if getattr(type(c), e) is not getattr(Callback, e)] for e in EVENTS}

    def _event(self, name: str) -> None:
        for handler in self._handlers[name]:
            handler(self)

    @contextlib.contextmanager
    def _with_cbs(self, cbs: list[Callback], only: bool = False) -> Iterator[None]:
        self._extra = cbs
        self._sort_handlers(cbs if only else None)
        try:
            yield
        finally:
            self._extra = []
            self._sort_handlers()

    def _wrap(self) -> None:
        """Wrap the model in DDP; again after freezing, as DDP only syncs what trains."""
        from torch.nn.parallel import DistributedDataParallel

        self.ddp = DistributedDataParallel(
            self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.train_model = self.ddp

    def reduce_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss averaged over processes (itself when training in one process)."""
        if self.world_size == 1:
            return loss
        import torch.distributed as dist

        loss = loss.detach().clone()
        dist.all_reduce(loss)  # a sum: gloo has no average
        return loss / self.world_size

    def rng_state(self) -> dict:
        """The RNG states training draws from: torch, CUDA, numpy, Python and the loader's."""
        return get_rng_state(self.train_dl)

    def print(self, *args: Any) -> None:
        """Print a line on the main process only (through tqdm, so bars stay intact)."""
        if self.is_main:
            from tqdm.auto import tqdm

            tqdm.write(" ".join(str(a) for a in args))

    # ---- the loop --------------------------------------------------------------------------
    def _loss(self, batch: Any, model: nn.Module) -> torch.Tensor:
        if self.compute_loss is not None:
            name, loss = "compute_loss", self.compute_loss(model, batch)
        else:
            if not isinstance(batch, (list, tuple)) or len(batch) < 2:
                raise TypeError(f"a batch must be (x, y) or (x1, ..., xn, y), got "
                                f"{type(batch).__name__}; pass compute_loss for other batches")
            assert self.loss_func is not None  # __init__ refuses both None
            self.pred = model(*batch[:-1])
            name, loss = "loss_func", self.loss_func(self.pred, batch[-1])
        if not isinstance(loss, torch.Tensor):  # such as a model's output object, or .item()
            raise TypeError(f"{name} must return the loss as a tensor, got "
                            f"{type(loss).__name__}")
        return loss

    def _train_epoch(self) -> None:
        self.model.train()
        sampler: Any = getattr(self.train_dl, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(self.epoch)  # DistributedSampler: a new shuffle every epoch
        self.epoch_rng = self.rng_state()
        # a chunk cut short (cancelled epoch, Ctrl-C) must not leak into this epoch's first step
        self.step_n = 0
        self.opt.zero_grad(set_to_none=True)
        self._event("before_train")
        n, accum, skip = len(self.train_dl), self.accum_steps, self.resume_skip
        no_sync = getattr(self.train_model, "no_sync", None)  # DDP's (or FSDP's), ours or not
        batches = iter(self.train_dl)
        if skip:  # resuming mid-epoch: replay the order, skip what was seen, then the RNGs
            for _ in range(skip):
                next(batches)
            assert self.resume_rng is not None  # apply_checkpoint sets it with resume_skip
            set_rng_state(self.resume_rng, self.train_dl)
            self.resume_skip, self.resume_rng = 0, None
        for self.iter, batch in enumerate(batches, start=skip):
            try:
                stepping = (self.iter + 1) % accum == 0 or self.iter + 1 == n
                size = min(accum, n - self.iter + self.iter % accum)  # last chunk may be short
                self.batch = to_device(batch, self.device)
                self._event("before_batch")
                # DDP: gradients are averaged across processes only on the stepping batch.
                with (contextlib.nullcontext() if stepping or no_sync is None else no_sync()):
                    with self._autocast():
                        self.loss = self._loss(self.batch, self.train_model)
                    if self.loss.ndim != 0:
                        raise ValueError(f"the loss must be a scalar, got shape "
                                         f"{tuple(self.loss.shape)}")
                    self.loss_grad = self.loss / size if size > 1 else self.loss
                    self._event("after_loss")
                    (self.loss_grad if self.scaler is None else
                     self.scaler.scale(self.loss_grad)).backward()
                loss = self.loss.detach()
                # the step's loss: the mean over the batches that reached here (a batch
                # cancelled before its loss counts for neither the loss nor the gradient)
                self.step_loss = loss if self.step_n == 0 else self.step_loss + loss
                self.step_n += 1
                if stepping:
                    if self.step_n > 1:
                        self.step_loss = self.step_loss / self.step_n
                    self.step_n = 0
                    self._step()
                self._event("after_batch")
            except CancelBatchException:
                pass
        self._event("after_train")

    def _step(self) -> None:
        stepped = False
        try:
            self._event("before_step")
            if self.scaler is not None:
                self.scaler.unscale_(self.opt)
            if self.clip_grad is not None:
                nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_grad)
            if self.scaler is None:
                self.opt.step()
            else:
                scale = self.scaler.get_scale()  # a host sync, needed to see a skipped step
                self.scaler.step(self.opt)
                self.scaler.update()
                # an overflow in the gradients skipped the step; a non-finite loss goes on to
                # after_step, where the recorder and the range test stop on it as in fp32
                if (self.scaler.get_scale() < scale
                        and torch.isfinite(self.reduce_loss(self.step_loss))):  # all alike
                    raise CancelStepException
            stepped = True
            self._event("after_step")
        except CancelStepException:
            pass
        finally:  # also when a callback cancels the batch or the fit from after_step
            self.train_iter += stepped
            self.opt.zero_grad(set_to_none=True)

    def _fit(self, n_epoch: int, cbs: list[Callback], only: bool = False) -> None:
        self.n_epoch = n_epoch
        self.steps_per_epoch = math.ceil(len(self.train_dl) / self.accum_steps)
        self.total_steps = n_epoch * self.steps_per_epoch
        if not self.resuming:
            self.epoch, self.train_iter = 0, 0
        self.fit_error = None
        if self.scaler is not None:  # a step cut short (Ctrl-C) leaves the optimizer marked
            state = self.scaler.state_dict()  # as unscaled; a fresh scaler forgets that
            self.scaler = torch.amp.GradScaler(self.device.type)
            self.scaler.load_state_dict(state)
        with self._with_cbs(cbs, only):
            try:
                self._event("before_fit")
                if self.resume_cbs is not None:
                    load_callback_states(self, self.resume_cbs)
                for epoch in range(self.epoch, n_epoch):
                    self.epoch, self.valid_result = epoch, None
                    try:
                        self._event("before_epoch")
                        self._train_epoch()
                        if self.ddp is not None:
                            sync_buffers(self.model, self.world_size)
                        if self.valid_dl is not None and not only:
                            self._event("before_validate")
                            self.valid_result = self.validate()
                            self._event("after_validate")
                    except CancelEpochException:
                        pass
                    self._event("after_epoch")
            except CancelFitException:
                pass
            except BaseException as e:
                self.fit_error = e
                raise
            finally:  # a resume that failed early must not leak into the next fit
                self.resuming, self.resume_skip, self.resume_rng = False, 0, None
                self.resume_cbs = None
                self._event("after_fit")

    # ---- public training API ---------------------------------------------------------------
    def fit(self, n_epoch: int, lr: LR | str | None = None, wd: float | None = None,
            cbs: Sequence[Callback] | None = None,
            resume_from: str | os.PathLike | None = None) -> None:
        """Train for ``n_epoch`` epochs at a constant LR.

        ``lr`` (default: the learner's ``lr``; ``"auto"`` as in :meth:`fit_one_cycle`) is set
        once at the start, so a callback may change it during training; ``wd`` is set when
        given.

        ``resume_from``: a :class:`Checkpoint` file of an interrupted run of the same call.
        """
        self._run(n_epoch, lr, wd, cbs, resume_from, "fit", {}, None)

    def _run(self, n_epoch: int, lr: Any, wd: float | None, cbs: Any,
             resume_from: str | os.PathLike | None, method: str, args: dict,
             scheds: Callable[[list[float]], dict] | None) -> None:
        """Check every argument, resolve the LRs (running the range test for "auto") and fit."""
        check_int("n_epoch", n_epoch)
        name = "lr" if method in ("fit", "flat_cos") else "lr_max"  # the caller's parameter
        auto = isinstance(lr, str)
        if auto and lr != "auto":
            raise ValueError(f"{name} must be a float, slice, sequence or 'auto', got {lr!r}")
        lrs = None if auto else self._lrs(lr, name)  # None: the range test (or resume) sets it
        self._check_wd(wd)
        cbs = self._new_cbs(cbs)
        if scheds is not None:
            self._check_unscheduled(cbs, f"fit_{method}")
        state = None if resume_from is None else read_checkpoint(self, resume_from, n_epoch,
                                                                 cbs)
        # what a checkpoint must match to resume: the call and what shapes its steps
        call = {"method": method, "lrs": lrs, "wd": wd, "accum_steps": self.accum_steps, **args}
        if state is not None:
            call["lrs"] = lrs = state["sched"]["lrs"] if lrs is None else lrs
            if {**call, **state["sched"]} != call:  # a key of a later version: the call's
                raise ValueError(f"resume_from was written by {state['sched']}, not by {call}: "
                                 "resume with the same call")
        elif lrs is None:  # "auto"
            with self._with_cbs(cbs):  # the fit's callbacks marked in_lr_find join the sweep
                found = self.lr_find(num_it=AUTO_NUM_IT, suggest_funcs=("auto",),
                                     show_plot=False).auto
            if found is None:
                raise ValueError("the range test gave no 'auto' suggestion (see its warning)")
            if self.progress:
                self.print(f"{name}='auto': {found:.3g}, from a range test of {AUTO_NUM_IT} steps")
            lrs = self._lrs(found)
        self.sched_args = {**call, "lrs": lrs}
        if state is not None:
            apply_checkpoint(self, state)
        else:
            self._set_lrs(lrs)
            self._set_wd(wd)
        extra = [] if scheds is None else [ParamScheduler(scheds(lrs))]
        self._fit(n_epoch, extra + cbs)

    def _check_unscheduled(self, cbs: list[Callback], caller: str) -> None:
        """Refuse a TorchScheduler where a schedule of lrfind's would overwrite its LRs."""
        for cb in [*self.cbs, *cbs]:
            if isinstance(cb, TorchScheduler):
                raise ValueError(f"cbs: {cb!r} sets the LR, which {caller} sets at every "
                                 "step: use it with fit(), at a constant LR it then changes")

    def _lrs(self, lr: LR | None, name: str = "lr") -> list[float]:
        return resolve_lrs(self.lr if lr is None else lr, len(self.opt.param_groups), name)

    def _check_wd(self, wd: float | None) -> None:
        if wd is not None and check_number("wd", wd) < 0:
            raise ValueError(f"wd must be >= 0, got {wd!r}")
        if wd is not None and "weight_decay" not in self.opt.defaults:
            raise ValueError(f"wd={wd!r}, but {type(self.opt).__name__} has no weight decay")

    def _set_wd(self, wd: float | None) -> None:
        if wd is not None:
            for g in self.opt.param_groups:
                g["weight_decay"] = float(wd)  # a numpy value would not load

    def _set_lrs(self, lrs: list[float]) -> None:
        for g, v in zip(self.opt.param_groups, lrs):
            set_lr(g, v)

    def fit_one_cycle(self, n_epoch: int, lr_max: LR | str | None = None, div: float = 25.0,
                      div_final: float = 1e5, pct_start: float = 0.25,
                      moms: Sequence[float] | None = None, wd: float | None = None,
                      cbs: Sequence[Callback] | None = None,
                      resume_from: str | os.PathLike | None = None) -> None:
        """One-cycle training (``schedules.one_cycle`` for the LR, ``one_cycle_moms`` for momentum).

        ``lr_max`` defaults to the learner's ``lr``; ``"auto"`` runs a 300-step ``lr_find``
        first and uses its ``auto`` suggestion (so do the other ``fit_*`` methods). Defaults:
        div=25, div_final=1e5, pct_start=0.25, moms from the learner (0.95, 0.85, 0.95).
        """
        moms = self.moms if moms is None else moms
        mom = schedules.one_cycle_moms(moms, pct_start)
        schedules.one_cycle(1.0, div, div_final, pct_start)
        args = {"div": div, "div_final": div_final, "pct_start": pct_start, "moms": tuple(moms)}
        self._run(n_epoch, lr_max, wd, cbs, resume_from, "one_cycle", args, lambda lrs: {
            "lr": [schedules.one_cycle(v, div, div_final, pct_start) for v in lrs], "mom": mom})

    def fit_flat_cos(self, n_epoch: int, lr: LR | str | None = None, div_final: float = 1e5,
                     pct_start: float = 0.75, wd: float | None = None,
                     cbs: Sequence[Callback] | None = None,
                     resume_from: str | os.PathLike | None = None) -> None:
        """Flat LR, then cosine annealing: fastai's ``fit_flat_cos``.

        ``lr`` for ``pct_start`` of training, then cosine to ``lr/div_final``. Defaults:
        lr from the learner, div_final=1e5, pct_start=0.75.
        """
        schedules.flat_cos(1.0, div_final, pct_start)
        args = {"div_final": div_final, "pct_start": pct_start}
        self._run(n_epoch, lr, wd, cbs, resume_from, "flat_cos", args, lambda lrs: {
            "lr": [schedules.flat_cos(v, div_final, pct_start) for v in lrs]})

    def fit_sgdr(self, n_cycles: int, cycle_len: int, lr_max: LR | str | None = None,
                 cycle_mult: int = 2, wd: float | None = None,
                 cbs: Sequence[Callback] | None = None,
                 resume_from: str | os.PathLike | None = None) -> None:
        """Cosine annealing with warm restarts: cycle i lasts ``cycle_len * cycle_mult**i`` epochs.

        Each cycle anneals ``lr_max -> 0`` by cosine, starting at exactly ``lr_max`` on its
        first optimizer step: step i of n reads the schedule at ``i/n`` (not ``i/(n-1)``), so
        restarts fall on epoch boundaries and, as in torch's ``CosineAnnealingWarmRestarts``,
        no step trains at LR 0. Default cycle_mult=2 (1 allowed).
        """
        n_cycles, cycle_len = check_int("n_cycles", n_cycles), check_int("cycle_len", cycle_len)
        cycle_mult = check_int("cycle_mult", cycle_mult)
        n_epoch = cycle_len * sum(cycle_mult**i for i in range(n_cycles))
        n = n_epoch * math.ceil(len(self.train_dl) / self.accum_steps)  # optimizer steps

        def on_steps(f: schedules.Schedule) -> schedules.Schedule:
            return lambda pos: f(round(pos * (n - 1)) / n)

        args = {"n_cycles": n_cycles, "cycle_mult": cycle_mult}
        self._run(n_epoch, lr_max, wd, cbs, resume_from, "sgdr", args, lambda lrs: {
            "lr": [on_steps(schedules.sgdr(v, n_cycles, cycle_mult)) for v in lrs]})

    def fit_warmup_cosine(self, n_epoch: int, lr_max: LR | str | None = None,
                          warmup_pct: float = 0.1, div: float = 25.0, div_final: float = 1e5,
                          wd: float | None = None, cbs: Sequence[Callback] | None = None,
                          resume_from: str | os.PathLike | None = None) -> None:
        """Linear warmup, then cosine annealing.

        Linear ``lr_max/div -> lr_max`` over ``warmup_pct``, then cosine to
        ``lr_max/div_final``. Defaults: lr_max from the learner, warmup_pct=0.1, div=25,
        div_final=1e5.
        """
        schedules.warmup_cosine(1.0, warmup_pct, div, div_final)
        args = {"warmup_pct": warmup_pct, "div": div, "div_final": div_final}
        self._run(n_epoch, lr_max, wd, cbs, resume_from, "warmup_cosine", args, lambda lrs: {
            "lr": [schedules.warmup_cosine(v, warmup_pct, div, div_final) for v in lrs]})

    def fine_tune(self, epochs: int, base_lr: float = 2e-3, freeze_epochs: int = 1,
                  lr_mult: float = 100, pct_start: float = 0.3, div: float = 5.0,
                  wd: float | None = None, cbs: Sequence[Callback] | None = None,
                  resume_from: str | os.PathLike | None = None) -> None:
        """Fine-tune a pretrained model: the head first, then everything.

        First the last group (and, with ``train_bn``, every normalisation layer) for
        ``freeze_epochs`` with one-cycle at ``slice(base_lr)``, pct_start 0.99; then all
        groups for ``epochs`` with one-cycle at ``slice(base_lr/2/lr_mult, base_lr/2)``,
        ``pct_start`` and ``div``. ``wd`` and ``cbs`` go to both fits. Defaults: base_lr=2e-3,
        freeze_epochs=1, lr_mult=100, pct_start=0.3, div=5.

        ``resume_from``: a :class:`Checkpoint` file of an interrupted ``fine_tune`` with the
        same arguments; it resumes in the phase that wrote it, told by its epochs and LRs.
        """
        check_int("epochs", epochs)
        check_int("freeze_epochs", freeze_epochs, low=0)
        check_positive("base_lr", base_lr)
        check_positive("lr_mult", lr_mult)
        schedules.one_cycle(1.0, div, 1e5, pct_start)
        self._check_wd(wd)
        cbs = self._new_cbs(cbs)  # before freeze changes anything
        self._check_unscheduled(cbs, "fine_tune")
        n = len(self.opt.param_groups)
        phases = [(freeze_epochs, resolve_lrs(slice(base_lr), n)),
                  (epochs, resolve_lrs(slice(base_lr / 2 / lr_mult, base_lr / 2), n))]
        first = resume_from is None
        if not first:  # which phase wrote it, told before anything changes
            path = check_path("resume_from", resume_from)
            state = load_checkpoint(path)
            written = (state["n_epoch"], state["sched"].get("lrs"))
            if written not in phases[not freeze_epochs:]:
                raise ValueError(f"resume_from {path!r} was written by a fit of "
                                 f"{written[0]} epochs at lrs {written[1]}, not by a phase of "
                                 f"this fine_tune: resume with the same arguments")
            first = written == phases[0]
        if freeze_epochs and first:
            self.freeze()
            self.fit_one_cycle(freeze_epochs, phases[0][1], pct_start=0.99, wd=wd, cbs=cbs,
                               resume_from=resume_from)
            resume_from = None  # the second phase starts afresh
        self.unfreeze()
        self.fit_one_cycle(epochs, phases[1][1], pct_start=pct_start, div=div, wd=wd, cbs=cbs,
                           resume_from=resume_from)

    def lr_find(self, *, start_lr: float = 1e-7, end_lr: float = 10.0, num_it: int = 100,
                stop_div: bool = True, div_th: float = 4.0, beta: float = 0.98, mode: str = "exp",
                suggest_funcs: Sequence[str | Suggestion] = ("minimum", "steep"),
                show_plot: bool = True) -> LRFindResult:
        """LR range test on this learner; everything it touches is restored afterwards.

        The sweep, stop rule and suggestions are those of :func:`lrfind.lr_find`, with the
        same defaults; the callbacks marked ``in_lr_find`` join it, and the result is also
        kept as ``learn.recorder.lr_find_result``.
        """
        from .finder import learner_lr_find

        return learner_lr_find(self, start_lr=start_lr, end_lr=end_lr, num_it=num_it,
                               stop_div=stop_div, div_th=div_th, beta=beta, mode=mode,
                               suggest_funcs=suggest_funcs, show_plot=show_plot)

    # ---- evaluation ------------------------------------------------------------------------
    @contextlib.contextmanager
    def _eval_mode(self) -> Iterator[None]:
        modes = [(m, m.training) for m in self.model.modules()]
        self.model.eval()
        try:
            with torch.no_grad(), self._autocast():
                yield
        finally:
            for m, mode in modes:
                m.training = mode

    def validate(self, dl: Any = None) -> dict[str, float]:
        """Loss and metrics on ``dl`` (default the validation loader), averaged over samples.

        Returns ``{"valid_loss": ..., <metric>: ...}``; batch means are weighted by batch size.
        """
        dl = self._eval_loader(dl)
        n = 0
        sums: list[float | torch.Tensor] = [0.0] * (1 + len(self.metrics))
        with self._eval_mode():
            for batch in dl:
                batch = to_device(batch, self.device)
                bs = batch_size(batch)
                if bs == 0:  # an empty batch weighs nothing (its mean would be NaN)
                    continue
                loss = self._loss(batch, self.model)
                values = [loss.detach().float()]
                values += [m(self.pred, batch[-1]) for m in self.metrics]
                sums = [s + v * bs for s, v in zip(sums, values)]  # stays on the device
                n += bs
        if n == 0:
            raise ValueError("dl is empty: cannot validate on no batches")
        for name, s in zip(self.metric_names, sums[1:]):
            if isinstance(s, torch.Tensor) and s.numel() != 1:
                raise ValueError(f"metrics: {name} must return one number per batch, got "
                                 f"{s.numel()} values")
        return {name: float(s) / n for name, s in zip(["valid_loss", *self.metric_names], sums)}

    def get_preds(self, dl: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Model outputs and targets over ``dl`` (default the validation loader), on the CPU."""
        dl = self._eval_loader(dl)
        preds, targets = [], []
        with self._eval_mode():
            for batch in dl:
                batch = to_device(batch, self.device)
                if not isinstance(batch, (list, tuple)) or len(batch) < 2:
                    raise TypeError("get_preds needs (x, y) or (x1, ..., xn, y) batches")
                preds.append(self.model(*batch[:-1]).float().cpu())
                targets.append(batch[-1].cpu())
        if not preds:
            raise ValueError("dl is empty: no predictions from no batches")
        return torch.cat(preds), torch.cat(targets)

    def _eval_loader(self, dl: Any) -> Any:
        dl = self.valid_dl if dl is None else dl
        if dl is None:
            raise ValueError("no dl given and the learner has no valid_dl")
        if not hasattr(dl, "__iter__"):
            raise TypeError(f"dl must be an iterable of batches such as a DataLoader, got {dl!r}")
        return dl

    # ---- parameters ------------------------------------------------------------------------
    def freeze_to(self, n: int) -> None:
        """Freeze the splitter's groups before index ``n`` and unfreeze the rest.

        With ``train_bn`` (the default) the parameters of normalisation layers (batch,
        instance, layer and group norm) stay trainable in frozen groups, as in fastai, so the
        normalisation can adapt to new data while the rest of a frozen group stays fixed.
        """
        if isinstance(n, bool) or not isinstance(n, numbers.Integral):
            raise TypeError(f"n must be an int, got {n!r}")
        n = int(n)
        frozen = set(range(len(self._groups))[:n])
        norm = {id(p) for m in self.model.modules() if isinstance(m, NORM_TYPES)
                for p in m.parameters(recurse=False)} if self.train_bn else set()
        for i, group in enumerate(self._groups):
            for p in group:
                p.requires_grad_(i not in frozen or id(p) in norm)
        if self.ddp is not None:  # on every process, like the rest of a torchrun script
            self._wrap()

    def freeze(self) -> None:
        """Freeze every parameter group but the last."""
        self.freeze_to(-1)

    def unfreeze(self) -> None:
        """Make every parameter group trainable."""
        self.freeze_to(0)

    def check_monitor(self, monitor: str) -> None:
        """Raise ValueError unless ``monitor`` names a value the recorder writes each epoch."""
        names = ["train_loss"] + (["valid_loss", *self.metric_names] if self.valid_dl else [])
        if monitor not in names:
            why = "" if self.valid_dl else ": the learner has no valid_dl"
            raise ValueError(f"monitor must be one of {names}, got {monitor!r}{why}")

    def save(self, path: str | os.PathLike, with_opt: bool = True) -> None:
        """Save model (and optimizer) state to ``path`` atomically (temp file + rename).

        In multi-process training only the main process writes.
        """
        path = check_path("path", path)
        if self.is_main:
            atomic_save({"model": self.model.state_dict(),
                         "opt": self.opt.state_dict() if with_opt else None}, path)
        barrier(self.world_size)  # the other processes may read it next

    def load(self, path: str | os.PathLike, with_opt: bool = True) -> None:
        """Load what :meth:`save` wrote; keys and shapes are checked before anything changes."""
        path = check_path("path", path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"path {os.fspath(path)!r} does not exist")
        try:
            state = torch.load(path, map_location=self.device, weights_only=True)
        except pickle.UnpicklingError:  # more than tensors: a Checkpoint file holds RNG states
            raise ValueError(f"{os.fspath(path)!r} is not a file written by Learner.save; a "
                             "Checkpoint file holds more than weights: resume from it with "
                             "resume_from=, or read its weights with torch.load(path, "
                             "weights_only=False)['model'] if you trust it") from None
        if not isinstance(state, dict) or "model" not in state:
            raise ValueError(f"{os.fspath(path)!r} is not a file written by Learner.save")
        check_state_dict(self.model, state["model"])
        opt_state = state.get("opt") if with_opt else None
        if opt_state is not None:
            check_opt_state(self.opt, opt_state, os.fspath(path))
        self.model.load_state_dict(state["model"])
        if opt_state is not None:
            self.opt.load_state_dict(opt_state)
