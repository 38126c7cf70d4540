"""Progress bars over epochs and batches, and the per-epoch table."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from .callback import Callback

if TYPE_CHECKING:
    from .learner import Learner

REFRESH = 0.1  # seconds between bar updates: each update reads the loss (a device sync)


def bar(total: int, desc: str, show: bool = True, **kwargs: Any) -> Any:
    """A tqdm bar that shows in a terminal or a notebook, not when stderr is a file or a pipe.

    Written to a log, a bar's carriage-return updates pile up as one garbled line per
    refresh; tqdm's ``disable=None`` turns the bar off there (the epoch table still prints).
    """
    # Imported here: tqdm.auto warns in notebooks without ipywidgets, even with no bar shown
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False, disable=None if show else True, **kwargs)


def format_row(row: dict, names: list[str]) -> str:
    """One line of the epoch table: numbers with 6 digits, time as mm:ss."""
    cells = []
    for name in names:
        v = row.get(name, "")
        if isinstance(v, str):
            pass
        elif name == "time":
            v = f"{int(v) // 60:02d}:{int(v) % 60:02d}"
        elif name == "epoch":
            v = str(v)
        elif isinstance(v, float):
            v = f"{v:.6f}"
        cells.append(f"{v:<{max(len(name), 10)}}")
    return "  ".join(cells).rstrip()


class ProgressCallback(Callback):
    """tqdm bars over epochs and batches, and one table row per epoch (``learn.print``)."""

    order = 60

    def before_fit(self, learn: Learner) -> None:
        self.names = ["epoch", "train_loss"]
        if learn.valid_dl is not None:
            self.names += ["valid_loss", *learn.metric_names]
        self.names.append("time")
        self.header = False
        self.epochs = bar(learn.n_epoch, "epoch", learn.is_main, initial=learn.epoch)

    def before_train(self, learn: Learner) -> None:
        self.bar = bar(len(learn.train_dl), "train", learn.is_main)
        self.last = time.monotonic()

    def after_batch(self, learn: Learner) -> None:
        now = time.monotonic()
        if now - self.last >= REFRESH:
            self.last = now
            self.bar.set_postfix(loss=f"{learn.loss.item():.4f}", refresh=False)
            self.bar.update(learn.iter + 1 - self.bar.n)

    def after_train(self, learn: Learner) -> None:
        self.bar.close()

    def after_epoch(self, learn: Learner) -> None:
        if not self.header:
            learn.print(format_row({n: n for n in self.names}, self.names))
            self.header = True
        learn.print(format_row(learn.recorder.values[-1], self.names))
        self.epochs.update(1)

    def after_fit(self, learn: Learner) -> None:
        # before_fit may not have run (an earlier callback raised): close only what exists
        for bar in (getattr(self, "epochs", None), getattr(self, "bar", None)):
            if bar is not None:
                bar.close()
