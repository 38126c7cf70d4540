"""How good are the LR suggestions? Spread over seeds and regret after one-cycle training.

For each task in ``tasks.py``: run the range test with 5 seeds and record every suggestion;
train one-cycle for the task's fixed epochs at the median suggestion of each method (valid
loss averaged over 3 seeds) and on a log grid of LRs (4 per decade, 1e-4..1). Then

    regret = (L(method) - L(best grid LR)) / (L(untrained) - L(best grid LR))

Besides lrfind's methods it scores fastai's naive ``minimum`` (argmin / 10 of the raw
smoothed curve) and ``steep`` (forward differences); lrfind's ``valley`` and ``slide`` are
fastai's rules as they are. Run ``python benchmarks/suggestions.py [--quick]``; it prints a
markdown table. ``find`` and ``train_eval`` are the only two places that call the library.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent
sys.path[:0] = [str(ROOT), str(ROOT.parent)]  # run as a script from anywhere, lrfind not installed

from tasks import EPOCHS, TASKS  # noqa: E402

import lrfind  # noqa: E402

METHODS = ("minimum", "steep", "valley", "slide", "auto")


def naive_minimum(lrs: np.ndarray, losses: np.ndarray) -> float | None:
    """fastai's minimum as written: lrs[argmin(losses)] / 10 on the unsmoothed-in-lr curve."""
    return float(lrs[int(np.argmin(losses))] / 10) if len(losses) else None


def naive_steep(lrs: np.ndarray, losses: np.ndarray) -> float | None:
    """fastai's steep as written: most negative forward difference of loss vs log(lr)."""
    if len(losses) < 2:
        return None
    grads = np.diff(losses) / np.diff(np.log(lrs))
    return float(lrs[int(np.argmin(grads))])


def find(task: str, seed: int) -> dict[str, float | None]:
    """Range test on a fresh ``task(seed)``; return every suggestion by name."""
    model, train_dl, valid_dl, loss_func = TASKS[task](seed)
    learn = lrfind.Learner(model, train_dl, valid_dl, loss_func=loss_func, progress=False)
    funcs = (*METHODS, naive_minimum, naive_steep)
    res = learn.lr_find(suggest_funcs=funcs, show_plot=False)
    out = dict(res.suggestions)
    out["fastai_minimum"] = out.pop("naive_minimum")
    out["fastai_steep"] = out.pop("naive_steep")
    return out


def train_eval(task: str, seed: int, lr_max: float | None) -> float:
    """Valid loss of a fresh ``task(seed)`` after one-cycle at ``lr_max`` (None: untrained)."""
    model, train_dl, valid_dl, loss_func = TASKS[task](seed)
    learn = lrfind.Learner(model, train_dl, valid_dl, loss_func=loss_func, progress=False)
    if lr_max is not None:
        learn.fit_one_cycle(EPOCHS[task], lr_max=lr_max)
    loss = learn.validate()["valid_loss"]
    return loss if math.isfinite(loss) else math.inf


def _mean_loss(task: str, lr: float | None, seeds: range, cache: dict) -> float:
    """Valid loss averaged over ``seeds``, memoised per (task, lr)."""
    key = (task, None if lr is None else round(math.log10(lr), 6))
    if key not in cache:
        cache[key] = float(np.mean([train_eval(task, s, lr) for s in seeds]))
    return cache[key]


def run(tasks: list[str], find_seeds: range, train_seeds: range, grid: np.ndarray) -> list[str]:
    """Score every method on every task; return the markdown table lines."""
    lines = ["| task | method | median lr | std log10 | regret % |", "|---|---|---|---|---|"]
    best_lines = ["", "| task | best grid lr | L(best) | L(untrained) |", "|---|---|---|---|"]
    cache: dict = {}
    for task in tasks:
        t0 = time.time()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            found = [find(task, s) for s in find_seeds]
        untrained = _mean_loss(task, None, train_seeds, cache)
        losses = [_mean_loss(task, lr, train_seeds, cache) for lr in grid]
        i_best = int(np.argmin(losses))
        best = losses[i_best]
        for method in found[0]:
            values = [f[method] for f in found if f[method] is not None]
            if not values:
                lines.append(f"| {task} | {method} | none | - | - |")
                continue
            logs = np.log10(values)
            lr = float(10 ** np.median(logs))
            regret = (_mean_loss(task, lr, train_seeds, cache) - best) / (untrained - best)
            missing = f" ({len(found) - len(values)} none)" if len(values) < len(found) else ""
            lines.append(f"| {task} | {method} | {lr:.3g}{missing} | {logs.std():.2f} "
                         f"| {100 * regret:.1f} |")
        best_lines.append(f"| {task} | {grid[i_best]:.3g} | {best:.4f} | {untrained:.4f} |")
        print(f"{task}: {time.time() - t0:.0f}s", file=sys.stderr, flush=True)
    return lines + best_lines


def main() -> None:
    """Parse arguments, run, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="3 finder seeds, 1 training seed, 2 grid points per decade")
    parser.add_argument("--tasks", nargs="*", default=list(TASKS), choices=list(TASKS))
    args = parser.parse_args()
    torch.set_num_threads(1)
    per_decade = 2 if args.quick else 4
    grid = 10.0 ** (np.arange(-4 * per_decade, 1) / per_decade)  # 1e-4 .. 1
    find_seeds, train_seeds = (range(3), range(1)) if args.quick else (range(5), range(3))
    print("\n".join(run(args.tasks, find_seeds, train_seeds, grid)))


if __name__ == "__main__":
    main()
