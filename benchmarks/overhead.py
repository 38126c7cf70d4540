"""Loop overhead of lrfind against hand-written PyTorch loops, in the same run.

For each task: time per batch of ``fit_one_cycle`` against a raw loop with torch's
``OneCycleLR``, and time per iteration of ``lr_find`` against a raw range-test loop. One CPU
thread, runs alternate (lrfind first, then raw first), and the ratio is the median over the
pairs. Also the peak resident memory of ``lr_find`` against the raw range test, each in a
fresh process.

    python benchmarks/overhead.py [--quick]
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tasks  # noqa: E402

import lrfind  # noqa: E402

TASKS = {"tiny MLP (digits)": tasks.digits_mlp, "small CNN (digits)": tasks.digits_cnn,
         "small GRU (sequence)": tasks.sequence}


def raw_one_cycle(model: nn.Module, dl, loss_func: Callable, epochs: int, lr_max: float) -> float:
    """Seconds per batch of the plain loop: forward, loss, backward, step, zero_grad, sched."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr_max)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr_max, total_steps=epochs * len(dl),
                                                pct_start=0.25, div_factor=25.0,
                                                final_div_factor=1e5 / 25.0)
    model.train()
    start = time.perf_counter()
    for _ in range(epochs):
        for xb, yb in dl:
            loss = loss_func(model(xb), yb)
            loss.backward()
            opt.step()
            opt.zero_grad()
            sched.step()
    return (time.perf_counter() - start) / (epochs * len(dl))


def raw_range_test(model: nn.Module, dl, loss_func: Callable, num_it: int) -> float:
    """Seconds per iteration of a plain range test (grid, EMA, stop rule, restore)."""
    saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-7)
    model.train()
    start = time.perf_counter()
    avg, best, k, it = 0.0, math.inf, 0, iter(dl)
    while k < num_it:
        try:
            xb, yb = next(it)
        except StopIteration:
            it = iter(dl)
            continue
        for g in opt.param_groups:
            g["lr"] = 1e-7 * 1e8 ** (k / (num_it - 1))
        loss = loss_func(model(xb), yb)
        loss.backward()
        opt.step()
        opt.zero_grad()
        avg = 0.98 * avg + 0.02 * loss.item()
        smooth = avg / (1 - 0.98 ** (k + 1))
        best = min(best, smooth)
        k += 1
        if not math.isfinite(smooth) or smooth > 4 * best:
            break
    model.load_state_dict(saved)
    return (time.perf_counter() - start) / k


def lrfind_one_cycle(model: nn.Module, dl, loss_func: Callable, epochs: int,
                     lr_max: float) -> float:
    """Seconds per batch of ``Learner.fit_one_cycle`` (no validation, no progress output)."""
    learn = lrfind.Learner(model, dl, loss_func=loss_func, progress=False)
    start = time.perf_counter()
    learn.fit_one_cycle(epochs, lr_max)
    return (time.perf_counter() - start) / (epochs * len(dl))


def lrfind_range_test(model: nn.Module, dl, loss_func: Callable, num_it: int) -> float:
    """Seconds per iteration of ``Learner.lr_find`` (snapshot, sweep, restore, suggestions)."""
    learn = lrfind.Learner(model, dl, loss_func=loss_func, progress=False)
    start = time.perf_counter()
    res = learn.lr_find(num_it=num_it, show_plot=False)
    return (time.perf_counter() - start) / len(res.lrs)


def ratio(ours: Callable[[], float], raw: Callable[[], float], pairs: int) -> tuple[float, float,
                                                                                     float]:
    """Median over alternating pairs of ours/raw; also the median times (seconds)."""
    r, a, b = [], [], []
    for i in range(pairs):
        if i % 2 == 0:
            x, y = ours(), raw()
        else:
            y, x = raw(), ours()
        r.append(x / y)
        a.append(x)
        b.append(y)
    return statistics.median(r), statistics.median(a), statistics.median(b)


def overhead_rows(pairs: int, epochs: int, num_it: int) -> list[tuple]:
    """One row per (task, loop): task, loop, lrfind us, raw us, ratio."""
    rows = []
    for name, task in TASKS.items():
        _, dl, _, loss = task(0)

        def run(loop: Callable, *args: object, task=task, dl=dl, loss=loss) -> float:
            return loop(task(0)[0], dl, loss, *args)  # a fresh model for every run

        rf = ratio(lambda: run(lrfind_one_cycle, epochs, 3e-3),
                   lambda: run(raw_one_cycle, epochs, 3e-3), pairs)
        rl = ratio(lambda: run(lrfind_range_test, num_it), lambda: run(raw_range_test, num_it),
                   pairs)
        rows.append((name, "fit_one_cycle / raw OneCycleLR loop", rf[1] * 1e6, rf[2] * 1e6,
                     rf[0]))
        rows.append((name, "lr_find / raw range-test loop", rl[1] * 1e6, rl[2] * 1e6, rl[0]))
    return rows


MEMORY_CHILD = """
import resource, sys, torch
sys.path.insert(0, {here!r})
import overhead
torch.set_num_threads(1)
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(1024, 2048), torch.nn.ReLU(),
                            torch.nn.Linear(2048, 2048), torch.nn.ReLU(), torch.nn.Linear(2048, 10))
x, y = torch.randn(512, 1024), torch.randint(0, 10, (512,))
dl = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=64)
f = overhead.{func}
f(model, dl, torch.nn.functional.cross_entropy, 30)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""


def peak_memory_mb(func: str) -> float:
    """Peak RSS (MB) of a fresh process running ``func`` on a 6.3M-parameter MLP."""
    here = os.path.dirname(os.path.abspath(__file__))
    code = MEMORY_CHILD.format(here=here, func=func)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def table(rows: list[tuple], header: tuple[str, ...]) -> str:
    """A markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [f"{c:.3f}" if isinstance(c, float) and c < 10 else
                 f"{c:.1f}" if isinstance(c, float) else str(c) for c in row]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    """Print (and return) the overhead and memory tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer pairs and epochs")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    pairs, epochs, num_it = (3, 1, 60) if args.quick else (21, 2, 100)
    out = table(overhead_rows(pairs, epochs, num_it),
                ("task", "loop", "lrfind us/step", "raw us/step", "ratio (median of pairs)"))
    raw_mb, ours_mb = peak_memory_mb("raw_range_test"), peak_memory_mb("lrfind_range_test")
    out += "\n\n" + table([("6.3M-param MLP, 30 iterations", raw_mb, ours_mb, ours_mb / raw_mb)],
                          ("range test", "raw peak RSS MB", "lrfind peak RSS MB", "ratio"))
    print(out)
    return out


if __name__ == "__main__":
    main()
