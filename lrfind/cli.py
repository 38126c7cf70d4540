"""Command line: ``lrfind demo``, ``lrfind find TARGET``, ``lrfind fit TARGET``.

TARGET is ``path/to/file.py:function`` or ``package.module:function``, a function taking no
arguments and returning a :class:`~lrfind.Learner`. Bad usage exits with status 2 and one line
on stderr (``lrfind: error: ...``), never a traceback; argparse handles syntax errors itself.
A failure lrfind detects while running (a non-finite training loss) exits 1, also in one line;
errors raised in the user's code or in torch keep their traceback.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import inspect
import json
import linecache
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

from . import __version__, schedules
from .finder import check_args
from .learner import AUTO_NUM_IT, Learner
from .progress import ProgressCallback, format_row
from .suggest import SUGGESTIONS

PACKAGE_DIR = Path(__file__).resolve().parent


class UsageError(Exception):
    """Bad usage: reported as one line and exit status 2."""


# ---- arguments -------------------------------------------------------------------------------
def _epochs(n: int) -> int:
    if n < 1:
        raise UsageError(f"--epochs must be an integer >= 1, got {n}")
    return n


def _suggestion(name: str, option: str) -> str:
    if name not in SUGGESTIONS:
        raise UsageError(f"{option}: unknown suggestion {name!r}; known: {', '.join(SUGGESTIONS)}")
    return name


def _folder(path: str | None, option: str) -> Path | None:
    """``--out``: a folder, made when missing; checked before any work is done."""
    if path is None:
        return None
    for p in [Path(path), *Path(path).parents]:
        if p.exists() and not p.is_dir():
            raise UsageError(f"{option} {path!r}: {str(p)!r} is a file, not a folder")
    return Path(path)


def _file(path: str | None, option: str) -> str | None:
    """``--save``: a file path that is not a folder, nor inside a file."""
    if path is not None:
        if Path(path).is_dir():
            raise UsageError(f"{option} {path!r} is a folder: give a file path")
        _folder(str(Path(path).parent), option)
    return path


def _lr(text: str) -> float | str:
    """``--lr``: a positive number, or the name of a suggestion (the range test runs first)."""
    if text in SUGGESTIONS:
        return text
    try:
        value = float(text)
    except ValueError:
        raise UsageError(f"--lr must be a number or one of {', '.join(SUGGESTIONS)}; "
                         f"got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise UsageError(f"--lr must be a finite number > 0, got {text!r}")
    return value


def load_learner(target: str) -> Learner:
    """Call the zero-argument function named by ``target`` and check it returns a Learner."""
    where, sep, name = target.rpartition(":")
    if not sep or not where or not name:
        raise UsageError(f"TARGET must be path/to/file.py:function or package.module:function, "
                         f"got {target!r}")
    if where.endswith(".py") or os.sep in where or "/" in where:
        path = Path(where)
        if not path.is_file():
            raise UsageError(f"TARGET file {where!r} does not exist")
        mod_name = f"_lrfind_target_{path.stem}"  # prefixed: it shadows no installed module
        spec = importlib.util.spec_from_file_location(mod_name, path)
        if spec is None or spec.loader is None:  # importlib knows the file by its suffix
            raise UsageError(f"TARGET file {where!r} is not a Python file (.py)")
        # Like `python file.py`: the file's folder comes first on sys.path, so it can import
        # its neighbours.
        folder = str(path.resolve().parent)
        if folder not in sys.path:
            sys.path.insert(0, folder)
        module = importlib.util.module_from_spec(spec)
        sys.modules[mod_name] = module
        spec.loader.exec_module(module)
    else:
        # Console scripts do not put the working directory on sys.path; `python -m` does.
        if os.getcwd() not in sys.path and "" not in sys.path:
            sys.path.insert(0, os.getcwd())
        try:
            module = importlib.import_module(where)
        except ModuleNotFoundError as e:
            if e.name is None or not (where == e.name or where.startswith(e.name + ".")):
                raise  # the module exists but one of its own imports failed: a real error
            raise UsageError(f"cannot import TARGET module {where!r} (no module named "
                             f"{e.name!r})") from None
    func = getattr(module, name, None)
    if not callable(func):
        raise UsageError(f"{where!r} has no function {name!r}")
    try:
        inspect.signature(func).bind()
    except TypeError as e:
        raise UsageError(f"TARGET {target} must be callable without arguments: {e}") from None
    except ValueError:  # no signature to read (some builtins): let the call decide
        pass
    learn = func()
    if not isinstance(learn, Learner):
        raise UsageError(f"{target} returned {type(learn).__name__}, not an lrfind.Learner")
    return learn


def set_progress(learn: Learner, on: bool) -> None:
    """Bars on or off for a learner built elsewhere.

    ``Learner(progress=...)`` adds a ProgressCallback at construction and the range test reads
    ``learn.progress``; both are switched here so the command line flag decides.
    """
    learn.progress = on
    bars = [cb for cb in learn.cbs if isinstance(cb, ProgressCallback)]
    for cb in bars if not on else []:
        learn.remove_cb(cb)
    if on and not bars:
        learn.add_cb(ProgressCallback())


# ---- output ----------------------------------------------------------------------------------
def _finite(obj: Any) -> Any:
    """JSON-safe copy: NaN and inf become null (json.dump would write invalid NaN tokens)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def _curve(res: Any) -> dict[str, Any]:
    return {"lrs": res.lrs, "losses": res.losses, "raw_losses": res.raw_losses,
            "stop_reason": res.stop_reason, "num_it": res.num_it,
            "suggestions": res.suggestions, "drop_to_noise": res.drop_to_noise}


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(_finite(data), indent=1) + "\n")


def _print_suggestions(res: Any) -> None:
    print(f"lr_find: {len(res.lrs)} steps, stopped: {res.stop_reason}")
    for name, lr in res.suggestions.items():
        print(f"  {name:<8} {'none' if lr is None else f'{lr:.2e}'}")


def _print_table(learn: Learner) -> None:
    names = ["epoch", "train_loss"]
    if learn.valid_dl is not None:
        names += ["valid_loss", *learn.metric_names]
    names.append("time")
    print(format_row({n: n for n in names}, names))
    for row in learn.recorder.values:
        print(format_row(row, names))


def _write_fit(learn: Learner, res: Any, out: Path) -> list[Path]:
    """lr_find.png (when a range test ran), loss.png, schedule.png and history.json.

    Under torchrun only the main process writes.
    """
    if not learn.is_main:
        return []
    out.mkdir(parents=True, exist_ok=True)
    rec, written = learn.recorder, []
    if res is not None:
        res.plot().figure.savefig(out / "lr_find.png")
        written.append(out / "lr_find.png")
    rec.plot_loss().figure.savefig(out / "loss.png")
    rec.plot_sched()[0].figure.savefig(out / "schedule.png")
    history = {"values": rec.values, "lrs": rec.lrs, "moms": rec.moms, "losses": rec.losses,
               "suggestions": None if res is None else res.suggestions,
               "lr_find": None if res is None else _curve(res)}
    _write_json(out / "history.json", history)
    return [*written, out / "loss.png", out / "schedule.png", out / "history.json"]


# ---- commands --------------------------------------------------------------------------------
def _fit(learn: Learner, epochs: int, lr: float | str, pct_start: float, quiet: bool) -> Any:
    res = None
    if isinstance(lr, str):
        names = tuple(dict.fromkeys(("minimum", "steep", "valley", lr)))  # lr last, once
        res = learn.lr_find(num_it=AUTO_NUM_IT, suggest_funcs=names, show_plot=False)
        _print_suggestions(res)
        found = res[lr]
        if found is None:
            raise RuntimeError(f"the range test gave no {lr!r} suggestion (see its warning)")
        lr = found
    print(f"fit_one_cycle({epochs}, lr_max={lr:.2e}, pct_start={pct_start})")
    learn.fit_one_cycle(epochs, lr_max=lr, pct_start=pct_start)
    if quiet:
        _print_table(learn)
    return res


def cmd_demo(args: argparse.Namespace) -> None:
    import torch
    from torch.nn import functional as F

    from .data import digits
    from .metrics import accuracy

    start, epochs, threads = time.perf_counter(), _epochs(args.epochs), torch.get_num_threads()
    out = _folder(args.out, "--out")
    # The model is tiny: a second thread only adds synchronisation, and on a busy machine a
    # spinning thread pool made each step 15x slower. Restored for in-process callers.
    torch.set_num_threads(1)
    try:
        train_dl, valid_dl, model = digits()
        learn = Learner(model, train_dl, valid_dl, loss_func=F.cross_entropy,
                        metrics=[accuracy], progress=not args.quiet)
        res = _fit(learn, epochs, "auto", 0.25, args.quiet)
        assert out is not None  # demo's --out has a default
        files = _write_fit(learn, res, out)
    finally:
        torch.set_num_threads(threads)
    final = learn.recorder.values[-1]
    print(f"final: valid_loss {final['valid_loss']:.4f}, accuracy {final['accuracy']:.4f} "
          f"({time.perf_counter() - start:.1f} s)")
    print("wrote " + ", ".join(str(p) for p in files))


def cmd_find(args: argparse.Namespace) -> None:
    names = [_suggestion(s.strip(), "--suggest") for s in args.suggest.split(",") if s.strip()]
    if not names:
        raise UsageError("--suggest needs at least one suggestion name")
    check_args(args.start_lr, args.end_lr, args.num_it, True, 4.0, 0.98, "exp", names)
    out = _folder(args.out, "--out")
    learn = load_learner(args.target)
    set_progress(learn, not args.quiet)
    res = learn.lr_find(start_lr=args.start_lr, end_lr=args.end_lr, num_it=args.num_it,
                        suggest_funcs=names, show_plot=False)
    _print_suggestions(res)
    if out is not None and learn.is_main:
        out.mkdir(parents=True, exist_ok=True)
        res.plot().figure.savefig(out / "lr_find.png")
        _write_json(out / "lr_find.json", _curve(res))
        print(f"wrote {out / 'lr_find.png'}, {out / 'lr_find.json'}")


def cmd_fit(args: argparse.Namespace) -> None:
    epochs, lr = _epochs(args.epochs), _lr(args.lr)
    schedules.one_cycle(1.0, pct_start=args.pct_start)  # check it before any work is done
    out, save = _folder(args.out, "--out"), _file(args.save, "--save")
    learn = load_learner(args.target)
    set_progress(learn, not args.quiet)
    res = _fit(learn, epochs, lr, args.pct_start, args.quiet)
    if save:
        learn.save(save)
        print(f"saved {save}")
    if out is not None:
        files = _write_fit(learn, res, out)
        print("wrote " + ", ".join(str(p) for p in files))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lrfind", description="Find a learning rate with a range test, then train.")
    parser.add_argument("--version", action="version", version=f"lrfind {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    target_help = "path/to/file.py:function or package.module:function returning a Learner"
    quiet_help = "no progress bars; the epoch table is printed at the end"

    text = "range test and one-cycle training on the built-in digits"
    p = sub.add_parser("demo", help=text, description=(
        f"{text}: a {AUTO_NUM_IT}-step range test, then one-cycle at its 'auto' suggestion; "
        "writes lr_find.png, loss.png, schedule.png and history.json into --out"))
    p.add_argument("--out", default="lrfind-demo", help="output folder (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=5, help="epochs (default: %(default)s)")
    p.add_argument("--quiet", action="store_true", help=quiet_help)
    p.set_defaults(func=cmd_demo)

    text = "run the LR range test on TARGET's learner"
    p = sub.add_parser("find", help=text, description=(
        f"{text} and print its suggestions; the learner is left as it was"))
    p.add_argument("target", metavar="TARGET", help=target_help)
    p.add_argument("--start-lr", type=float, default=1e-7,
                   help="LR of the first step (default: %(default)s)")
    p.add_argument("--end-lr", type=float, default=10.0,
                   help="LR of the last step (default: %(default)s)")
    p.add_argument("--num-it", type=int, default=100,
                   help="optimizer steps of the sweep, at most (default: %(default)s)")
    p.add_argument("--suggest", default="minimum,steep,valley",
                   help=f"comma-separated, among {', '.join(SUGGESTIONS)} (default: %(default)s)")
    p.add_argument("--out", help="folder for lr_find.png and lr_find.json (default: none)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_find)

    text = "train TARGET's learner with one-cycle"
    p = sub.add_parser("fit", help=text, description=f"{text} (fit_one_cycle)")
    p.add_argument("target", metavar="TARGET", help=target_help)
    p.add_argument("--epochs", type=int, required=True, help="epochs to train")
    p.add_argument("--lr", required=True,
                   help=f"lr_max: a number, or a suggestion ({', '.join(SUGGESTIONS)}) taken "
                        f"from a range test of {AUTO_NUM_IT} steps run first")
    p.add_argument("--pct-start", type=float, default=0.25,
                   help="share of the steps the LR warms up for (default: %(default)s)")
    p.add_argument("--save", metavar="PATH", help="learn.save(PATH) after training")
    p.add_argument("--out", help="folder for loss.png, schedule.png, history.json (and "
                                 "lr_find.png when --lr names a suggestion; default: none)")
    p.add_argument("--quiet", action="store_true", help=quiet_help)
    p.set_defaults(func=cmd_fit)
    return parser


def _raised_in_lrfind(exc: BaseException) -> bool:
    """True when a ``raise`` of lrfind's own code raised ``exc``: one of its checks.

    Not when the innermost lrfind line called into C (torch, a constructor) that raised.
    """
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if tb is None:
        return False
    path = tb.tb_frame.f_code.co_filename
    return (Path(path).resolve().parent == PACKAGE_DIR
            and linecache.getline(path, tb.tb_lineno).lstrip().startswith("raise "))


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``lrfind`` console script and ``python -m lrfind``; returns the status."""
    args = build_parser().parse_args(argv)
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun only the main process prints
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the life of the process
    try:
        args.func(args)
        return 0
    except UsageError as e:
        status, message = 2, str(e)
    except (ValueError, TypeError, RuntimeError, FloatingPointError) as e:
        if not _raised_in_lrfind(e):
            raise  # from user code or torch: a real failure, keep its traceback
        status = 2 if isinstance(e, (ValueError, TypeError)) else 1
        message = " ".join(str(e).splitlines())
    print(f"lrfind: error: {message}", file=sys.stderr)
    return status
