"""Run every benchmark, print the tables and write them to ``benchmarks/results.md``.

    python benchmarks/run.py [--quick]

1. Loop overhead of lrfind, fastai, torch-lr-finder and Lightning against raw PyTorch loops.
2. Peak memory of ``lr_find`` against a raw range test.
3. Import time of ``lrfind`` on top of ``torch``.
4. Real training: bf16 against fp32 on CPU, two processes against one (``training.py``).
5. LR suggestions of lrfind and of the anchors: spread over seeds and regret after training.

An anchor that is not installed (see README.md) is skipped with a note, and one that crashes
on a task is reported in its row; neither stops the run.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(HERE), str(ROOT)]
# the child processes (memory, import time) must import this checkout's lrfind too
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))

import anchors  # noqa: E402
import overhead  # noqa: E402
import tasks  # noqa: E402
import training  # noqa: E402

import lrfind  # noqa: E402
from lrfind.learner import AUTO_NUM_IT  # noqa: E402

LR_MAX = 3e-3  # one-cycle LR of the timing runs (speed does not depend on it)
FINDERS = {"fastai": anchors.fastai_lr_find, "torch-lr-finder": anchors.torch_lr_finder_range_test,
           "Lightning": anchors.lightning_lr_find}
FITS = {"fastai": anchors.fastai_fit_one_cycle, "Lightning": anchors.lightning_fit_one_cycle}
MODULES = {"fastai": ("fastai",), "torch-lr-finder": ("torch_lr_finder",),
           "Lightning": ("pytorch_lightning", "lightning")}
ANCHOR_METHODS = {"fastai": ("valley", "steep", "minimum", "slide"),
                  "torch-lr-finder": ("steepest",), "Lightning": ("suggestion",)}


def installed(anchor: str) -> bool:
    """True when the anchor's package can be imported."""
    return any(importlib.util.find_spec(m) is not None for m in MODULES[anchor])


def usable(lr: float | None) -> bool:
    """A suggestion one could train with: a finite positive number."""
    return isinstance(lr, float) and math.isfinite(lr) and lr > 0


def _error(e: Exception) -> str:
    """One short table-safe line for an exception."""
    text = f"{type(e).__name__}: {e}".replace("|", "/").replace("\n", " ")
    return "crashed: " + (text[:150] + "..." if len(text) > 150 else text)


# ----------------------------------------------------------------------------- header


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (platform's guess elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def header(quick: bool, threads: int) -> str:
    """Machine and versions."""
    v = anchors.anchor_versions()
    rows = [("CPU", cpu_model()), ("cores", os.cpu_count()),
            ("torch threads", f"{threads} by default; 1 in every timed section"),
            ("python", platform.python_version()), ("torch", torch.__version__),
            ("lrfind", lrfind.__version__), ("fastai", v["fastai"]),
            ("torch-lr-finder", v["torch-lr-finder"]),
            ("Lightning", v["pytorch-lightning"] or v["lightning"])]
    rows = [(k, "not installed" if x is None else x) for k, x in rows]
    mode = "`--quick`" if quick else "full"
    return (f"# lrfind benchmarks\n\nRun: {time.strftime('%Y-%m-%d %H:%M')}, {mode} mode.\n\n"
            + overhead.table(rows, ("", "")))


# ----------------------------------------------------------------------------- 1. overhead


def _cells(r: tuple[float, float, float] | None) -> list[str]:
    """(ratio, ours s, raw s) from ``overhead.ratio`` as table cells in microseconds."""
    if r is None:
        return ["n/a"] * 3
    return [f"{r[1] * 1e6:.0f}", f"{r[2] * 1e6:.0f}", f"{r[0]:.2f}x"]


def lrfind_unchanged(task: Callable, num_it: int) -> bool:
    """Parameters and buffers bit-identical after ``Learner.lr_find``."""
    model, dl, _, loss_func = task(0)
    before = anchors.snapshot(model)
    lrfind.Learner(model, dl, loss_func=loss_func, progress=False).lr_find(num_it=num_it,
                                                                           show_plot=False)
    return anchors.bitwise_equal(before, anchors.snapshot(model))


def lrfind_cells(task: Callable, pairs: int, epochs: int, num_it: int) -> list[str]:
    """lrfind against the raw loops of overhead.py (whole calls: setup-free, restore included)."""
    _, dl, _, loss_func = task(0)

    def model() -> torch.nn.Module:
        return task(0)[0]

    find = overhead.ratio(lambda: overhead.lrfind_range_test(model(), dl, loss_func, num_it),
                          lambda: overhead.raw_range_test(model(), dl, loss_func, num_it), pairs)
    fit = overhead.ratio(
        lambda: overhead.lrfind_one_cycle(model(), dl, loss_func, epochs, LR_MAX),
        lambda: overhead.raw_one_cycle(model(), dl, loss_func, epochs, LR_MAX), pairs)
    return [*_cells(find), *_cells(fit), "yes" if lrfind_unchanged(task, num_it) else "NO"]


def anchor_cells(anchor: str, task: Callable, pairs: int, epochs: int, num_it: int) -> list[str]:
    """An anchor against the raw loops of anchors.py (loop only, as the anchors are timed)."""
    _, train_dl, valid_dl, loss_func = task(0)
    args = (lambda: task(0)[0], train_dl, valid_dl, loss_func)
    unchanged = []

    def finder() -> float:
        r = FINDERS[anchor](*args, num_it=num_it)
        unchanged.append(r["unchanged"])
        return r["sec_per_iter"]

    find = overhead.ratio(finder, lambda: anchors.raw_range_test(*args, num_it=num_it)
                          ["sec_per_iter"], pairs)
    fit = None
    if anchor in FITS:
        kw = dict(lr_max=LR_MAX, epochs=epochs)
        fit = overhead.ratio(lambda: FITS[anchor](*args, **kw)["sec_per_batch"],
                             lambda: anchors.raw_fit_one_cycle(*args, **kw)["sec_per_batch"],
                             pairs)
    return [*_cells(find), *_cells(fit), "yes" if all(unchanged) else "NO"]


def overhead_section(pairs: int, epochs: int, num_it: int) -> str:
    """One row per task and tool: lr_find and fit_one_cycle against raw loops, and restore."""
    rows = []
    for name, task in overhead.TASKS.items():
        for tool in ("lrfind", *FINDERS):
            t0 = time.perf_counter()
            if tool != "lrfind" and not installed(tool):
                cells = ["not installed", *[""] * 6]
            else:
                try:
                    cells = (lrfind_cells(task, pairs, epochs, num_it) if tool == "lrfind"
                             else anchor_cells(tool, task, pairs, epochs, num_it))
                except Exception as e:  # one broken anchor must not end the run
                    cells = [_error(e), *[""] * 6]
            rows.append((name, tool, *cells))
            print(f"  {name} / {tool}: {time.perf_counter() - t0:.0f}s", file=sys.stderr,
                  flush=True)
    head = ("task", "tool", "lr_find us/iter", "raw us/iter", "lr_find ratio",
            "fit_one_cycle us/batch", "raw us/batch", "fit ratio",
            "model bitwise unchanged after the range test")
    return overhead.table(rows, head)


# ----------------------------------------------------------------------------- 2. memory


def memory_section() -> str:
    """Peak RSS of lr_find against the raw range test, each in a fresh process."""
    raw, ours = overhead.peak_memory_mb("raw_range_test"), overhead.peak_memory_mb(
        "lrfind_range_test")
    row = ("6.3M-param MLP, AdamW, 30 iterations", f"{raw:.0f}", f"{ours:.0f}",
           f"{ours - raw:+.0f}", f"{ours / raw:.2f}x")
    return overhead.table([row], ("range test", "raw peak RSS MB", "lrfind peak RSS MB",
                                  "added MB", "ratio"))


# ----------------------------------------------------------------------------- 3. import time

TIMED_IMPORT = ("import time, torch\nt = time.perf_counter()\nimport lrfind\n"
                "print(time.perf_counter() - t)")


def _run(code: str) -> tuple[float, str]:
    """Wall seconds of a fresh ``python -c code`` (start-up included) and its stdout."""
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return time.perf_counter() - start, out.stdout


def import_section(runs: int) -> str:
    """``import torch`` against ``import torch, lrfind`` in fresh processes, alternating."""
    walls: dict[str, list[float]] = {"import torch": [], TIMED_IMPORT: []}
    inside = []
    for i in range(runs):
        for code in list(walls)[:: 1 if i % 2 == 0 else -1]:
            wall, out = _run(code)
            walls[code].append(wall)
            if code == TIMED_IMPORT:
                inside.append(float(out.split()[-1]))
    _, out = _run("import sys, lrfind\nprint('matplotlib' in sys.modules)")
    a, b = (statistics.median(w) * 1e3 for w in walls.values())
    rows = [('`python -c "import torch"`', f"{a:.0f}"),
            ('`python -c "import torch, lrfind"`', f"{b:.0f}"),
            ("added by lrfind (difference of the medians)", f"{b - a:+.0f}"),
            ("`import lrfind` after torch, timed inside the process",
             f"{statistics.median(inside) * 1e3:.0f}"),
            ("matplotlib in sys.modules after `import lrfind`",
             "yes" if out.strip() == "True" else "no")]
    return overhead.table(rows, (f"fresh processes, median of {runs}", "wall ms"))


# ----------------------------------------------------------------------------- 4. suggestions


class AnchorSuggestions:
    """The anchors' suggestions per (task, seed), memoised: one range test per anchor, task, seed.

    Every range test uses the adapters' settings: 1e-7 to 10 over ``num_it`` iterations with
    AdamW, each anchor's own stop rule and suggestion code. A crash is kept as an error
    (suggestions None) so the study goes on.
    """

    def __init__(self, num_it: int) -> None:
        self.num_it = num_it
        self.runs: dict[tuple[str, str, int], dict] = {}

    def run(self, anchor: str, task: str, seed: int) -> dict:
        key = (anchor, task, seed)
        if key not in self.runs:
            model, train_dl, valid_dl, loss_func = tasks.TASKS[task](seed)
            try:
                self.runs[key] = FINDERS[anchor](lambda: model, train_dl, valid_dl, loss_func,
                                                 seed=seed, num_it=self.num_it)
            except Exception as e:
                self.runs[key] = {"suggestions": {}, "error": _error(e)}
        return self.runs[key]

    def method(self, anchor: str, name: str) -> Callable[[str, int], float | None]:
        """``(task, seed) -> lr or None``; a NaN or non-positive suggestion counts as None."""
        def suggest(task: str, seed: int) -> float | None:
            value = self.run(anchor, task, seed)["suggestions"].get(name)
            return value if usable(value) else None
        return suggest

    def methods(self) -> dict[str, Callable[[str, int], float | None]]:
        """Every installed anchor's methods, named ``"<anchor> <method>"``."""
        return {f"{a} {m}": self.method(a, m) for a, ms in ANCHOR_METHODS.items()
                if installed(a) for m in ms}

    def notes(self) -> list[str]:
        """What went wrong across all cached range tests, per anchor."""
        lines = []
        for anchor in ANCHOR_METHODS:
            runs = [r for (a, _, _), r in self.runs.items() if a == anchor]
            if not runs:
                continue
            errors = sorted({r["error"] for r in runs if "error" in r})
            changed = sum(not r.get("unchanged", True) for r in runs)
            bad = {m: sum(not usable(r["suggestions"].get(m)) for r in runs if "error" not in r)
                   for m in ANCHOR_METHODS[anchor]}
            text = f"- {anchor}: {len(runs)} range tests"
            crashed = sum("error" in r for r in runs)
            text += f", {crashed} crashed ({'; '.join(errors)})" if crashed else ""
            text += f", model changed after {changed}" if changed else ", model always unchanged"
            text += "".join(f", {m} None/NaN {n}x" for m, n in bad.items() if n)
            lines.append(text + ".")
        return lines


def suggestion_section(quick: bool) -> str:
    """``suggestions.study``: lrfind's and every installed anchor's methods, 100 and 300 steps."""
    import suggestions

    out = [f"- {a}: not installed, skipped." for a in ANCHOR_METHODS if not installed(a)]
    n_seeds = 10 if quick else 30
    for num_it, title in ((100, "every tool's default"),
                          (AUTO_NUM_IT, "what `fit_one_cycle(lr_max=\"auto\")` runs")):
        cache = AnchorSuggestions(num_it)
        lines = suggestions.study(quick, extra=cache.methods(), num_it=num_it)
        out += ["", f"Range tests of {num_it} steps ({title}):", "", *lines, "", *cache.notes()]
        out += ["", f"lrfind's spread over {n_seeds} seeds at {num_it} steps: std of log10 over "
                "all of them (lowest-highest std over disjoint groups of 5):", "",
                *suggestions.spread(list(tasks.TASKS), num_it, n_seeds)]
    return "\n".join(out)


# ----------------------------------------------------------------------------- main

INTRO = {
    "overhead": "Time per iteration of `lr_find` and per batch of `fit_one_cycle`, as a ratio "
                "to a raw PyTorch loop timed in the same run: one CPU thread, runs alternating "
                "(tool first, then raw first), median of {pairs} pairs; `fit_one_cycle` "
                "{epochs} epoch(s) at lr 3e-3, range test 1e-7..10 over {num_it} iterations, "
                "AdamW everywhere. lrfind's times are whole calls (snapshot, sweep, restore, "
                "suggestions) against a raw loop that restores too; the anchors' are their "
                "training loops only, against a raw loop timed the same way. The last column "
                "compares every parameter and buffer bit for bit before and after the range "
                "test (torch-lr-finder: after its `reset()`).",
    "memory": "Peak resident memory of a fresh process running the range test (torch import "
              "included), lr_find against the raw loop.",
    "import": "Fresh interpreter processes, alternating; the difference of medians is noisy, "
              "the in-process time of `import lrfind` (torch already imported) is not.",
    "training": "`fit_one_cycle` on a small CNN: bf16 autocast against fp32 (time per batch, "
                "one thread, alternating runs, median of pairs), and one process against two "
                "under torchrun with the same global batch (time per epoch, one thread each).",
    "suggestions": "Per task: the median suggestion over the seeds, the std of log10 of the "
                   "suggestions over the seeds, and regret = (L(s) - L(best)) / (L(untrained) - "
                   "L(best)), L the valid loss after one-cycle at that LR, best over a log grid. "
                   "Every tool runs one range test per task and seed (1e-7..10, AdamW, each "
                   "anchor's own stop rule and suggestion code), first at the default 100 steps, "
                   "then at 300. A std over 5 seeds is itself noisy, so each study is followed by "
                   "the spread of lrfind's minimum, steep and auto over more range-test seeds "
                   "(no training), beside the spread of the curve's own landmarks (the LRs where "
                   "the smoothed loss has fallen a quarter, half and three quarters of its drop, "
                   "and its bottom) and the number of runs whose curve falls by less than the "
                   "noise of one batch (`drop_to_noise < 1`, where lr_find warns).",
}


def main(argv: list[str] | None = None) -> str:
    """Run every section, print it as it finishes and write results.md after each."""
    parser = argparse.ArgumentParser(description="Run all benchmarks, write results.md.")
    parser.add_argument("--quick", action="store_true", help="fewer pairs, epochs, seeds")
    parser.add_argument("--out", default=str(HERE / "results.md"), help="markdown output")
    args = parser.parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    pairs, epochs, num_it, runs = (3, 1, 60, 5) if args.quick else (21, 2, 100, 7)
    start = time.perf_counter()
    parts = [header(args.quick, threads)]
    print(parts[0], flush=True)
    sections = [
        ("overhead", "1. Loop overhead against raw PyTorch loops",
         lambda: overhead_section(pairs, epochs, num_it)),
        ("memory", "2. Peak memory of the range test", memory_section),
        ("import", "3. Import time", lambda: import_section(runs)),
        ("training", "4. Real training: bf16 and several processes",
         lambda: training.tables(args.quick)),
        ("suggestions", "5. LR suggestions: spread over seeds and regret",
         lambda: suggestion_section(args.quick)),
    ]
    for key, title, run in sections:
        t0 = time.perf_counter()
        body = run()
        intro = INTRO[key].format(pairs=pairs, epochs=epochs, num_it=num_it)
        took = f"_Section time: {time.perf_counter() - t0:.0f} s._"
        part = f"## {title}\n\n{intro}\n\n{body}\n\n{took}"
        parts.append(part)
        print("\n" + part, flush=True)
        Path(args.out).write_text("\n\n".join(parts) + "\n")
    total = f"Total time: {time.perf_counter() - start:.0f} s."
    parts.append(total)
    print("\n" + total)
    Path(args.out).write_text("\n\n".join(parts) + "\n")
    return "\n\n".join(parts)


if __name__ == "__main__":
    main()
