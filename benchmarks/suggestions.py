"""How good are the LR suggestions? Spread over seeds and regret after one-cycle training.

For each task in ``tasks.py``: run the range test with 5 seeds and record every suggestion;
train one-cycle for the task's fixed epochs at the median suggestion of each method (valid
loss averaged over 3 seeds) and on a log grid of LRs (4 per decade, 1e-4..1). Then

    regret = (L(method) - L(best grid LR)) / (L(untrained) - L(best grid LR))

``benchmarks/run.py`` adds the anchors' methods (fastai, torch-lr-finder, Lightning) through
``study(quick, extra)``. Run ``python benchmarks/suggestions.py [--quick] [--num-it N]`` for
lrfind's methods alone; it prints a markdown table. ``--spread N`` prints instead the spread
of lrfind's minimum, steep and auto over N range-test seeds (no training), a closer estimate
than 5 seeds give, beside the spread of the curve's own landmarks (where it has fallen a
quarter, half and three quarters of its drop, and its bottom) and the number of runs whose
curve falls by less than the noise of the loss (``drop_to_noise < 1``: lr_find warns).
``find``, ``train_eval`` and the landmarks are the only places that call the library.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent
sys.path[:0] = [str(ROOT), str(ROOT.parent)]  # run as a script from anywhere, lrfind not installed

from tasks import EPOCHS, TASKS  # noqa: E402

import lrfind  # noqa: E402
from lrfind.suggest import _fallen, _smoothed_descent  # noqa: E402

METHODS = ("minimum", "steep", "valley", "slide", "auto")


def _landmark(share: float | None) -> Callable[[np.ndarray, np.ndarray], float | None]:
    """LR where the curve, smoothed as steep and auto read it, has fallen ``share`` of its
    drop (None: the LR of its bottom)."""
    def landmark(lrs: np.ndarray, losses: np.ndarray) -> float | None:
        data = _smoothed_descent(lrs, losses, "landmark")
        if data is None:
            return None
        lx, _, fit, _, descent = data
        return float(10 ** (lx[descent[1]] if share is None else _fallen(lx, fit, descent, share)))
    landmark.__name__ = "bottom" if share is None else f"fallen {round(100 * share)}%"
    return landmark


LANDMARKS = tuple(_landmark(share) for share in (0.25, 0.5, 0.75, None))


def find(task: str, seed: int, num_it: int = 100,
         data_seed: int | None = None) -> dict[str, float | None]:
    """Range test of ``num_it`` steps on a fresh ``task(seed)``: every suggestion and
    landmark by name, and the curve's ``drop_to_noise``.

    With ``data_seed``, the model comes from ``seed`` and the loaders from ``data_seed``.
    """
    model, train_dl, valid_dl, loss_func = TASKS[task](seed)
    if data_seed is not None:
        _, train_dl, valid_dl, _ = TASKS[task](data_seed)
    learn = lrfind.Learner(model, train_dl, valid_dl, loss_func=loss_func, progress=False)
    res = learn.lr_find(num_it=num_it, suggest_funcs=(*METHODS, *LANDMARKS), show_plot=False)
    return {**res.suggestions, "drop_to_noise": res.drop_to_noise}


def train_eval(task: str, seed: int, lr_max: float | None) -> float:
    """Valid loss of a fresh ``task(seed)`` after one-cycle at ``lr_max`` (None: untrained)."""
    model, train_dl, valid_dl, loss_func = TASKS[task](seed)
    learn = lrfind.Learner(model, train_dl, valid_dl, loss_func=loss_func, progress=False)
    if lr_max is not None:
        learn.fit_one_cycle(EPOCHS[task], lr_max=lr_max)
    loss = learn.validate()["valid_loss"]
    return loss if math.isfinite(loss) else math.inf


LOSSES: dict = {}  # (task, log10 lr, seeds) -> valid loss per seed, shared by every study


def _seed_losses(task: str, lr: float | None, seeds: range) -> np.ndarray:
    """Valid loss of each of ``seeds``, memoised per (task, lr, seeds)."""
    key = (task, None if lr is None else round(math.log10(lr), 6), len(seeds))
    if key not in LOSSES:
        LOSSES[key] = np.array([train_eval(task, s, lr) for s in seeds])
    return LOSSES[key]


def _mean_loss(task: str, lr: float | None, seeds: range) -> float:
    """Valid loss averaged over ``seeds``."""
    return float(np.mean(_seed_losses(task, lr, seeds)))


Method = Callable[[str, int], "float | None"]


def score(tasks: list[str], methods: dict[str, Method], find_seeds: range, train_seeds: range,
          grid: np.ndarray) -> tuple[dict, dict]:
    """Per (method, task): (median lr, std of log10, regret, its standard error over the
    training seeds); per task: (best lr, L best, L0)."""
    scores, best = {}, {}
    for task in tasks:
        t0 = time.time()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            found = {name: [f(task, s) for s in find_seeds] for name, f in methods.items()}
        untrained = _mean_loss(task, None, train_seeds)
        losses = [_mean_loss(task, lr, train_seeds) for lr in grid]
        i_best = int(np.argmin(losses))
        best[task] = (float(grid[i_best]), losses[i_best], untrained)
        for name, values in found.items():
            logs = np.log10([v for v in values if v is not None and v > 0 and math.isfinite(v)])
            if len(logs) < len(values):  # a method that gives up on a seed is not stable
                scores[name, task] = None
                continue
            lr = float(10 ** np.median(logs))
            per_seed, gain = _seed_losses(task, lr, train_seeds), untrained - losses[i_best]
            se = per_seed.std(ddof=1) / math.sqrt(len(per_seed)) if len(per_seed) > 1 else math.nan
            scores[name, task] = (lr, float(logs.std()), (per_seed.mean() - losses[i_best]) / gain,
                                  se / gain)
        print(f"{task}: {time.time() - t0:.0f}s", file=sys.stderr, flush=True)
    return scores, best


def table(tasks: list[str], methods: list[str], scores: dict, best: dict) -> list[str]:
    """Markdown: one row per method, one cell per task ("median lr, std, regret %"), summary."""
    lines = ["| method | " + " | ".join(tasks) + " | worst std | mean regret | worst regret |",
             "|---|" + "---|" * (len(tasks) + 3)]
    for name in methods:
        cells = [scores[name, t] for t in tasks]
        text = ["gave none" if c is None else f"{c[0]:.2g}, {c[1]:.2f}, {100 * c[2]:.0f}%"
                for c in cells]
        if any(c is None for c in cells):
            summary = ["-", "-", "-"]
        else:
            regrets = [100 * c[2] for c in cells]
            summary = [f"{max(c[1] for c in cells):.2f}", f"{np.mean(regrets):.1f}%",
                       f"{max(regrets):.1f}%"]
        lines.append(f"| {name} | " + " | ".join(text + summary) + " |")
    lines.append("| best grid lr | " + " | ".join(f"{best[t][0]:.2g}" for t in tasks)
                 + " | | | |")
    ses = [100 * c[3] for c in scores.values() if c is not None and math.isfinite(c[3])]
    if ses:
        lines += ["", f"Standard error of one regret figure, from the spread of the valid loss "
                  f"over the training seeds: median {np.median(ses):.1f}, largest "
                  f"{max(ses):.1f} percentage points."]
    return lines


def study(quick: bool, extra: dict[str, Method] | None = None, num_it: int = 100,
          tasks: list[str] | None = None) -> list[str]:
    """The markdown table for lrfind's methods plus ``extra`` ones, same seeds, grid, regret."""
    tasks = list(TASKS) if tasks is None else tasks
    per_decade = 2 if quick else 4
    grid = 10.0 ** (np.arange(-4 * per_decade, 1) / per_decade)  # 1e-4 .. 1
    find_seeds, train_seeds = (range(3), range(1)) if quick else (range(5), range(3))
    runs: dict = {}

    def ours(name: str) -> Method:
        def suggest(task: str, seed: int) -> float | None:
            if (task, seed) not in runs:
                runs[task, seed] = find(task, seed, num_it)
            return runs[task, seed][name]
        return suggest

    methods = {f"lrfind {m}": ours(m) for m in METHODS}
    methods.update(extra or {})
    scores, best = score(tasks, methods, find_seeds, train_seeds, grid)
    return table(tasks, list(methods), scores, best)


VARY = ("both", "init", "order")  # what a seed sets in ``spread``


def spread(tasks: list[str], num_it: int, n_seeds: int,
           methods: tuple[str, ...] = ("minimum", "steep", "auto"), vary: str = "both"
           ) -> list[str]:
    """Markdown: std of log10(suggestion) over ``n_seeds`` range-test seeds per task and method.

    A cell is "std over all seeds (lowest-highest std over disjoint groups of 5 seeds)": the
    study's 5-seed std is one draw from that range, and the all-seed std is what it estimates.
    After lrfind's ``methods``, the same for the curve's landmarks (``LANDMARKS``): where
    they all move, a rule that reads the descent moves with them. The last row counts the runs
    whose ``drop_to_noise`` is under 1, for which lr_find warns. ``vary`` says what the seed
    sets: "both" (model init and data, as in the study), "init" (the model only; data of
    seed 0) or "order" (the data only: shuffle order, and the split for digits; model of
    seed 0).
    """
    lines = ["| method | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
    runs = {}
    for task in tasks:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            runs[task] = [find(task, 0 if vary == "order" else s, num_it,
                               {"both": None, "init": 0, "order": s}[vary])
                          for s in range(n_seeds)]
    rows = [(f"lrfind {m}", m) for m in methods]
    rows += [(f"curve {f.__name__}", f.__name__) for f in LANDMARKS]
    for label, key in rows:
        cells = []
        for task in tasks:
            values = [r[key] for r in runs[task]]
            if not all(v is not None and v > 0 and math.isfinite(v) for v in values):
                cells.append("gave none")
                continue
            v = np.log10(values)
            groups = [v[i:i + 5].std() for i in range(0, len(v) - 4, 5)]
            cells.append(f"{v.std():.3f} ({min(groups):.2f}-{max(groups):.2f})")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    warned = [sum(r["drop_to_noise"] is not None and r["drop_to_noise"] < 1 for r in runs[task])
              for task in tasks]
    lines.append("| runs with drop_to_noise < 1 | "
                 + " | ".join(f"{w} of {n_seeds}" for w in warned) + " |")
    return lines


def main() -> None:
    """Parse arguments, run, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="3 finder seeds, 1 training seed, 2 grid points per decade")
    parser.add_argument("--tasks", nargs="*", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--num-it", type=int, default=100, help="range-test length")
    parser.add_argument("--spread", type=int, metavar="N",
                        help="instead of the study: the spread of minimum/steep/auto and of "
                             "the curve's landmarks over N seeds")
    parser.add_argument("--vary", choices=VARY, default="both",
                        help="with --spread, what a seed sets: model init and data (default), "
                             "the init only or the data only")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.spread is not None and args.spread < 5:
        parser.error(f"--spread needs at least 5 seeds, got {args.spread}")
    lines = (spread(args.tasks, args.num_it, args.spread, vary=args.vary) if args.spread
             else study(args.quick, num_it=args.num_it, tasks=args.tasks))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
