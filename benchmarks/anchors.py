"""Adapters that run the anchors (fastai, torch-lr-finder, Lightning) and raw PyTorch loops.

Every adapter is a plain function taking the same inputs: a seeded model factory, the
train/valid loaders, the loss function and the optimizer settings (``opt="adamw"`` for
``torch.optim.AdamW`` with its default weight decay, or ``opt="sgd"`` for SGD with
``momentum``). Anchors are imported lazily; a missing one raises :class:`AnchorMissing`
(an ``ImportError``) so the runner can turn it into a note.

Timing: ``time.perf_counter`` around the training loop only (no setup, restore or
validation), divided by the number of batches/iterations, with one torch CPU thread.
Each adapter calls ``torch.manual_seed(seed)`` just before its loop, so every anchor sees
the same shuffle order (this changes the caller's global RNG state). Results carry extra
keys (``n_iter``, ``lrs``, ``losses``) besides the documented ones.

Smoke run: ``.venv-anchors/bin/python benchmarks/anchors.py``.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import io
import logging
import math
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from functools import partial
from types import ModuleType
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

ModelFactory = Callable[[], nn.Module]
LossFunc = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class AnchorMissing(ImportError):
    """An anchor library is not installed: the runner should skip it with a note."""


def _require(module: str, dist: str) -> ModuleType:
    """Import ``module`` or raise :class:`AnchorMissing` naming the pip distribution."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise AnchorMissing(f"{dist} not installed (see benchmarks/README.md): {e}") from e


def _lightning() -> ModuleType:
    """The Lightning package: ``lightning.pytorch`` or ``pytorch_lightning``."""
    try:
        return importlib.import_module("lightning.pytorch")
    except ImportError:
        return _require("pytorch_lightning", "pytorch-lightning (or lightning)")


def anchor_versions() -> dict[str, str | None]:
    """Installed versions of torch and the anchors (None when missing)."""
    out: dict[str, str | None] = {}
    for dist in ("torch", "fastai", "torch-lr-finder", "pytorch-lightning", "lightning"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    return out


# ----------------------------------------------------------------------------- helpers


def _opt_spec(opt: str, momentum: float) -> tuple[type[torch.optim.Optimizer], dict[str, Any]]:
    """Optimizer class and extra kwargs: AdamW (default weight decay) or SGD with momentum."""
    if opt == "adamw":
        return torch.optim.AdamW, {}
    if opt == "sgd":
        return torch.optim.SGD, {"momentum": momentum}
    raise ValueError(f"opt must be 'adamw' or 'sgd', not {opt!r}")


def _one_cycle(optimizer: torch.optim.Optimizer, lr_max: float, total_steps: int) -> Any:
    """torch OneCycleLR with fastai's settings (final LR = lr_max / 1e5); cycles momentum."""
    return torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=lr_max, total_steps=total_steps,
        pct_start=0.25, div_factor=25.0, final_div_factor=1e5 / 25.0,
    )


@contextlib.contextmanager
def _single_thread() -> Iterator[None]:
    """Run torch on one CPU thread, restoring the previous setting afterwards."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(prev)


@contextlib.contextmanager
def _tqdm_disabled(module: ModuleType) -> Iterator[None]:
    """Make ``module.tqdm`` build disabled bars for the duration (no console output)."""
    saved = module.tqdm
    module.tqdm = partial(saved, disable=True)
    try:
        yield
    finally:
        module.tqdm = saved


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of all parameters and buffers."""
    items = list(model.named_parameters()) + list(model.named_buffers())
    return {k: v.detach().clone() for k, v in items}


def bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    """True when both snapshots hold the same names and bit-identical tensors."""
    if a.keys() != b.keys():
        return False
    return all(
        a[k].dtype == b[k].dtype and a[k].shape == b[k].shape
        and torch.equal(a[k].reshape(-1).view(torch.uint8), b[k].reshape(-1).view(torch.uint8))
        for k in a
    )


@torch.no_grad()
def valid_loss(model: nn.Module, dl: DataLoader, loss_func: LossFunc) -> float:
    """Sample-weighted mean loss over ``dl`` in eval mode (same for every adapter)."""
    was_training = model.training
    model.eval()
    total, n = 0.0, 0
    for xb, yb in dl:
        total += loss_func(model(xb), yb).item() * len(yb)
        n += len(yb)
    model.train(was_training)
    return total / max(n, 1)


def _steepest(lrs: list[float], losses: list[float],
              skip_start: int = 10, skip_end: int = 5) -> float | None:
    """torch-lr-finder's suggestion: argmin of np.gradient(losses[10:-5]) on the index grid."""
    if len(lrs) < skip_start + skip_end + 2:
        return None
    lr = lrs[skip_start:-skip_end] if skip_end else lrs[skip_start:]
    lo = losses[skip_start:-skip_end] if skip_end else losses[skip_start:]
    return float(lr[int(np.gradient(np.asarray(lo)).argmin())])


# ----------------------------------------------------------------------------- fastai


def _fastai_learner(make_model: ModelFactory, train_dl: DataLoader, valid_dl: DataLoader,
                    loss_func: LossFunc, opt: str, momentum: float, path: str) -> tuple[Any, Any]:
    """A fastai Learner on plain torch loaders with a torch optimizer, plus a timer callback."""
    _require("fastai.basics", "fastai")
    # schedule patches in lr_find/fit_one_cycle; progress adds ProgressCallback and no_bar
    import fastai.callback.progress  # noqa: F401
    import fastai.callback.schedule  # noqa: F401
    from fastai.basics import Callback, DataLoaders, Learner, OptimWrapper

    class _TrainTimer(Callback):
        """Sums wall time of the training phases (first batch start to last batch end)."""

        order = 100  # after Recorder/ParamScheduler: their per-batch work is included

        def before_fit(self) -> None:
            self.elapsed, self._t0 = 0.0, None

        def before_train(self) -> None:
            self._t0 = time.perf_counter()

        def _stop(self) -> None:
            if self._t0 is not None:
                self.elapsed += time.perf_counter() - self._t0
                self._t0 = None

        def after_train(self) -> None:
            self._stop()

        def after_cancel_fit(self) -> None:  # lr_find ends by raising CancelFitException
            self._stop()

    cls, kw = _opt_spec(opt, momentum)
    model = make_model()
    learn = Learner(DataLoaders(train_dl, valid_dl), model, loss_func=loss_func,
                    opt_func=partial(OptimWrapper, opt=cls, **kw), path=path)
    timer = _TrainTimer()
    learn.add_cb(timer)
    return learn, timer


def fastai_lr_find(make_model: ModelFactory, train_dl: DataLoader, valid_dl: DataLoader,
                   loss_func: LossFunc, opt: str = "adamw", momentum: float = 0.9,
                   start_lr: float = 1e-7, end_lr: float = 10.0, num_it: int = 100,
                   seed: int = 0) -> dict[str, Any]:
    """fastai ``Learner.lr_find`` with valley/steep/minimum/slide suggestions."""
    _require("fastai.basics", "fastai")
    from fastai.callback.schedule import minimum, slide, steep, valley

    with tempfile.TemporaryDirectory() as tmp, _single_thread():
        learn, timer = _fastai_learner(make_model, train_dl, valid_dl, loss_func, opt, momentum,
                                       tmp)
        before = snapshot(learn.model)
        torch.manual_seed(seed)
        with learn.no_bar():
            res = learn.lr_find(start_lr=start_lr, end_lr=end_lr, num_it=num_it,
                                suggest_funcs=(valley, steep, minimum, slide), show_plot=False)
        unchanged = bitwise_equal(before, snapshot(learn.model))
    lrs = [float(x) for x in learn.recorder.lrs]
    return dict(
        suggestions={k: float(v) for k, v in res._asdict().items()},
        sec_per_iter=timer.elapsed / max(len(lrs), 1),
        unchanged=unchanged, n_iter=len(lrs), lrs=lrs,
        losses=[float(x) for x in learn.recorder.losses],
    )


def fastai_fit_one_cycle(make_model: ModelFactory, train_dl: DataLoader, valid_dl: DataLoader,
                         loss_func: LossFunc, lr_max: float, epochs: int, opt: str = "adamw",
                         momentum: float = 0.9, seed: int = 0) -> dict[str, Any]:
    """fastai ``fit_one_cycle`` (its defaults: div 25, div_final 1e5, pct_start 0.25)."""
    with tempfile.TemporaryDirectory() as tmp, _single_thread():
        learn, timer = _fastai_learner(make_model, train_dl, valid_dl, loss_func, opt, momentum,
                                       tmp)
        torch.manual_seed(seed)
        with learn.no_bar(), learn.no_logging():
            learn.fit_one_cycle(epochs, lr_max)
        n_batches = epochs * len(train_dl)
        return dict(sec_per_batch=timer.elapsed / n_batches,
                    valid_loss=valid_loss(learn.model, valid_dl, loss_func))


# ----------------------------------------------------------------------------- torch-lr-finder


def torch_lr_finder_range_test(make_model: ModelFactory, train_dl: DataLoader, valid_dl: DataLoader,
                               loss_func: LossFunc, opt: str = "adamw", momentum: float = 0.9,
                               start_lr: float = 1e-7, end_lr: float = 10.0, num_it: int = 100,
                               seed: int = 0) -> dict[str, Any]:
    """torch-lr-finder ``range_test`` then ``reset()``; suggestion = ``plot()``'s steepest gradient.

    Its tqdm bar is disabled (the other anchors run without bars too); the timed span is the
    ``range_test`` call, whose body is the loop.
    """
    mod = _require("torch_lr_finder", "torch-lr-finder")
    impl = importlib.import_module("torch_lr_finder.lr_finder")
    cls, kw = _opt_spec(opt, momentum)
    with _single_thread():
        model = make_model()
        before = snapshot(model)
        optimizer = cls(model.parameters(), lr=start_lr, **kw)
        finder = mod.LRFinder(model, optimizer, loss_func, device="cpu")
        torch.manual_seed(seed)
        with _tqdm_disabled(impl), contextlib.redirect_stdout(io.StringIO()):
            t0 = time.perf_counter()
            finder.range_test(train_dl, start_lr=start_lr, end_lr=end_lr, num_iter=num_it)
            elapsed = time.perf_counter() - t0
        finder.reset()
        unchanged = bitwise_equal(before, snapshot(model))
    lrs = [float(x) for x in finder.history["lr"]]
    losses = [float(x) for x in finder.history["loss"]]
    return dict(suggestions={"steepest": _steepest(lrs, losses)},
                sec_per_iter=elapsed / max(len(lrs), 1), unchanged=unchanged,
                n_iter=len(lrs), lrs=lrs, losses=losses)


# ----------------------------------------------------------------------------- Lightning


def _lit_module(pl: ModuleType) -> type:
    """A LightningModule wrapping a plain model; it times its own training phases.

    The timer lives in module hooks, not in a Callback, because ``Tuner.lr_find`` swaps
    the trainer's callbacks for its own. Module hooks run after the callbacks' hooks, so
    the finder's per-batch work is included.
    """

    class LitModel(pl.LightningModule):
        """Plain model + loss; AdamW/SGD, optionally with OneCycleLR stepped per batch."""

        def __init__(self, model: nn.Module, loss_func: LossFunc, opt: str, momentum: float,
                     lr: float, total_steps: int | None = None) -> None:
            super().__init__()
            self.model, self.loss_func = model, loss_func
            self.opt, self.momentum, self.lr, self.total_steps = opt, momentum, lr, total_steps
            self.elapsed, self.n_batches = 0.0, 0
            self._t0: float | None = None
            self._last = 0.0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.model(x)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            xb, yb = batch
            return self.loss_func(self.model(xb), yb)

        def configure_optimizers(self) -> Any:
            cls, kw = _opt_spec(self.opt, self.momentum)
            optimizer = cls(self.model.parameters(), lr=self.lr, **kw)
            if self.total_steps is None:
                return optimizer
            sched = _one_cycle(optimizer, self.lr, self.total_steps)
            return {"optimizer": optimizer,
                    "lr_scheduler": {"scheduler": sched, "interval": "step"}}

        # timing: per epoch, from epoch start to the end of its last training batch
        def on_train_epoch_start(self) -> None:
            self._t0 = self._last = time.perf_counter()

        def on_train_batch_end(self, *args: Any) -> None:
            self._last = time.perf_counter()
            self.n_batches += 1

        def _stop(self) -> None:
            if self._t0 is not None:
                self.elapsed += self._last - self._t0
                self._t0 = None

        def on_train_epoch_end(self) -> None:
            self._stop()

        def on_train_end(self) -> None:
            self._stop()

    return LitModel


@contextlib.contextmanager
def _quiet_lightning() -> Iterator[None]:
    """Silence Lightning's info logs and its warnings (e.g. about DataLoader workers)."""
    loggers = [logging.getLogger(n) for n in ("lightning", "lightning.pytorch", "pytorch_lightning",
                                             "lightning_fabric", "lightning.fabric")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, lv in zip(loggers, levels, strict=True):
            lg.setLevel(lv)


def _lit_trainer(pl: ModuleType, root: str, **kw: Any) -> Any:
    """A quiet single-CPU Trainer."""
    return pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False,
                      default_root_dir=root, **kw)


def lightning_lr_find(make_model: ModelFactory, train_dl: DataLoader, valid_dl: DataLoader,
                      loss_func: LossFunc, opt: str = "adamw", momentum: float = 0.9,
                      start_lr: float = 1e-7, end_lr: float = 10.0, num_it: int = 100,
                      seed: int = 0) -> dict[str, Any]:
    """Lightning ``Tuner.lr_find`` (exponential, 4x stop) and its ``.suggestion()``.

    Its hard-wired tqdm bar is disabled (Lightning ignores ``enable_progress_bar`` there).
    """
    pl = _lightning()
    tuner_cls = importlib.import_module(pl.__name__ + ".tuner").Tuner
    impl = importlib.import_module(pl.__name__ + ".tuner.lr_finder")
    lit_cls = _lit_module(pl)
    with (tempfile.TemporaryDirectory() as tmp, _single_thread(), _quiet_lightning(),
          _tqdm_disabled(impl)):
        model = make_model()
        before = snapshot(model)
        trainer = _lit_trainer(pl, tmp)
        lit = lit_cls(model, loss_func, opt, momentum, lr=start_lr)
        torch.manual_seed(seed)
        finder = tuner_cls(trainer).lr_find(lit, train_dataloaders=train_dl, min_lr=start_lr,
                                            max_lr=end_lr, num_training=num_it, update_attr=False)
        unchanged = bitwise_equal(before, snapshot(model))
        suggestion = finder.suggestion()
    lrs = [float(x) for x in finder.results["lr"]]
    return dict(suggestions={"suggestion": None if suggestion is None else float(suggestion)},
                sec_per_iter=lit.elapsed / max(len(lrs), 1), unchanged=unchanged,
                n_iter=len(lrs), lrs=lrs, losses=[float(x) for x in finder.results["loss"]])


def lightning_fit_one_cycle(make_model: ModelFactory, train_dl: DataLoader, valid_dl: DataLoader,
                            loss_func: LossFunc, lr_max: float, epochs: int, opt: str = "adamw",
                            momentum: float = 0.9, seed: int = 0) -> dict[str, Any]:
    """Lightning fit with OneCycleLR stepped per batch; validation loss computed afterwards."""
    pl = _lightning()
    lit_cls = _lit_module(pl)
    with tempfile.TemporaryDirectory() as tmp, _single_thread(), _quiet_lightning():
        model = make_model()
        trainer = _lit_trainer(pl, tmp, max_epochs=epochs)
        lit = lit_cls(model, loss_func, opt, momentum, lr=lr_max,
                      total_steps=epochs * len(train_dl))
        torch.manual_seed(seed)
        trainer.fit(lit, train_dataloaders=train_dl)
        return dict(sec_per_batch=lit.elapsed / max(lit.n_batches, 1),
                    valid_loss=valid_loss(model, valid_dl, loss_func))


# ----------------------------------------------------------------------------- raw PyTorch


def raw_fit_one_cycle(make_model: ModelFactory, train_dl: DataLoader, valid_dl: DataLoader,
                      loss_func: LossFunc, lr_max: float, epochs: int, opt: str = "adamw",
                      momentum: float = 0.9, seed: int = 0) -> dict[str, Any]:
    """Hand-written loop with torch OneCycleLR (fastai's settings): the overhead floor."""
    cls, kw = _opt_spec(opt, momentum)
    with _single_thread():
        model = make_model()
        optimizer = cls(model.parameters(), lr=lr_max, **kw)
        sched = _one_cycle(optimizer, lr_max, epochs * len(train_dl))
        model.train()
        torch.manual_seed(seed)
        elapsed, n = 0.0, 0
        for _ in range(epochs):
            t0 = time.perf_counter()
            for xb, yb in train_dl:
                loss = loss_func(model(xb), yb)
                loss.backward()
                optimizer.step()
                optimizer.zero_grad()
                sched.step()
                n += 1
            elapsed += time.perf_counter() - t0
        return dict(sec_per_batch=elapsed / max(n, 1),
                    valid_loss=valid_loss(model, valid_dl, loss_func))


def raw_range_test(make_model: ModelFactory, train_dl: DataLoader, valid_dl: DataLoader,
                   loss_func: LossFunc, opt: str = "adamw", momentum: float = 0.9,
                   start_lr: float = 1e-7, end_lr: float = 10.0, num_it: int = 100,
                   seed: int = 0, beta: float = 0.98, div_th: float = 4.0) -> dict[str, Any]:
    """Hand-written LR range test: exponential grid, debiased EMA, stop at div_th x best.

    The loader cycles when shorter than ``num_it``; the model is restored from an in-memory
    copy. Suggestions are naive (minimum/10, steepest slope vs log10 lr on [num_it//10:-5]).
    """
    cls, kw = _opt_spec(opt, momentum)
    with _single_thread():
        model = make_model()
        before = snapshot(model)
        saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
        optimizer = cls(model.parameters(), lr=start_lr, **kw)
        model.train()
        torch.manual_seed(seed)
        lrs: list[float] = []
        losses: list[float] = []
        avg, best = 0.0, math.inf
        t0 = time.perf_counter()
        it = iter(train_dl)
        for k in range(num_it):
            try:
                xb, yb = next(it)
            except StopIteration:
                it = iter(train_dl)
                xb, yb = next(it)
            lr = start_lr * (end_lr / start_lr) ** (k / max(num_it - 1, 1))
            for g in optimizer.param_groups:
                g["lr"] = lr
            loss = loss_func(model(xb), yb)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            avg = beta * avg + (1 - beta) * loss.item()
            smooth = avg / (1 - beta ** (k + 1))
            lrs.append(lr)
            losses.append(smooth)
            best = min(best, smooth)
            if not math.isfinite(smooth) or smooth > div_th * best:
                break
        elapsed = time.perf_counter() - t0
        model.load_state_dict(saved)
        unchanged = bitwise_equal(before, snapshot(model))
    lo, hi = num_it // 10, len(lrs) - 5
    sugg: dict[str, float | None] = {"minimum": None, "steep": None}
    if hi - lo >= 2:
        x, y = np.log10(lrs[lo:hi]), np.asarray(losses[lo:hi])
        sugg = {"minimum": float(lrs[lo + int(y.argmin())] / 10),
                "steep": float(lrs[lo + int(np.gradient(y, x).argmin())])}
    return dict(suggestions=sugg, sec_per_iter=elapsed / max(len(lrs), 1), unchanged=unchanged,
                n_iter=len(lrs), lrs=lrs, losses=losses)


# ----------------------------------------------------------------------------- smoke run


def digits_like(n: int = 1797, n_valid: int = 360, bs: int = 64,
                seed: int = 0) -> tuple[DataLoader, DataLoader]:
    """Synthetic 8x8 'digits': 10 noisy class templates in [0, 1], 64 float32 features."""
    g = torch.Generator().manual_seed(seed)
    templates = torch.rand(10, 64, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    x = (templates[y] + 0.6 * torch.randn(n, 64, generator=g)).clamp(0, 1).float()
    train = TensorDataset(x[n_valid:], y[n_valid:])
    valid = TensorDataset(x[:n_valid], y[:n_valid])
    return DataLoader(train, batch_size=bs, shuffle=True), DataLoader(valid, batch_size=2 * bs)


def tiny_mlp() -> nn.Module:
    """Seeded 64-128-10 MLP with a BatchNorm layer (so buffers matter for ``unchanged``)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 128), nn.BatchNorm1d(128), nn.ReLU(), nn.Linear(128, 10))


def _fmt(x: float | None) -> str:
    return "None" if x is None else f"{x:.3g}"


def main() -> None:
    """Run every adapter once on the tiny MLP and print one line each."""
    train_dl, valid_dl = digits_like()
    args = (tiny_mlp, train_dl, valid_dl, nn.CrossEntropyLoss())
    print("versions:", anchor_versions())
    finders = [("raw", raw_range_test), ("fastai", fastai_lr_find),
               ("torch-lr-finder", torch_lr_finder_range_test), ("lightning", lightning_lr_find)]
    fits = [("raw", raw_fit_one_cycle), ("fastai", fastai_fit_one_cycle),
            ("lightning", lightning_fit_one_cycle)]
    for name, fn in finders:
        try:
            r = fn(*args)
        except AnchorMissing as e:
            print(f"lr_find  {name:16s} skipped: {e}")
            continue
        sugg = ", ".join(f"{k}={_fmt(v)}" for k, v in r["suggestions"].items())
        print(f"lr_find  {name:16s} {sugg}; n_iter={r['n_iter']}; "
              f"sec/iter={r['sec_per_iter'] * 1e3:.3f} ms; unchanged={r['unchanged']}")
    for name, fn in fits:
        try:
            r = fn(*args, lr_max=1e-2, epochs=3)
        except AnchorMissing as e:
            print(f"fit      {name:16s} skipped: {e}")
            continue
        print(f"fit      {name:16s} sec/batch={r['sec_per_batch'] * 1e3:.3f} ms; "
              f"valid_loss={r['valid_loss']:.4f}")


if __name__ == "__main__":
    main()
