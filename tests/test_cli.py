"""The command line: demo end to end, find/fit on a TARGET file or module, and bad usage."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lrfind.cli import main

ROOT = Path(__file__).resolve().parents[1]

TASK = '''
import torch
from torch import nn
from torch.nn import functional as F

from lrfind import Learner, accuracy
from lrfind.data import digits


def make():
    print("TARGET ran")
    train_dl, valid_dl, model = digits(batch_size=128)
    return Learner(model, train_dl, valid_dl, loss_func=F.cross_entropy, metrics=[accuracy])


def needs_args(size):
    return size


def not_a_learner():
    return [1, 2]


def raises():
    raise ValueError("a bug in the user's own code")
'''


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny models: a second thread only adds synchronisation (and spins on a busy machine).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def task(tmp_path):
    path = tmp_path / "task.py"
    path.write_text(TASK)
    (tmp_path / "task.txt").write_text(TASK)  # the same code, under a name importlib refuses
    return path


def run(capsys, *args):
    """``main(args)`` in-process: (status, stdout, stderr); argparse's exits give their code."""
    try:
        code = main([str(a) for a in args])
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def test_demo_end_to_end(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)  # bars would show but for --quiet
    out = tmp_path / "demo"
    code, stdout, stderr = run(capsys, "demo", "--quiet", "--epochs", 2, "--out", out)
    assert code == 0
    assert stderr == ""  # --quiet: no bars
    for name in ("minimum", "steep", "valley", "auto", "train_loss", "accuracy", "final:"):
        assert name in stdout
    for name in ("lr_find.png", "loss.png", "schedule.png", "history.json"):
        assert (out / name).stat().st_size > 0
    history = json.loads((out / "history.json").read_text())
    assert [row["epoch"] for row in history["values"]] == [0, 1]
    assert history["values"][-1]["accuracy"] > 0.8
    assert set(history["suggestions"]) == {"minimum", "steep", "valley", "auto"}
    curve = history["lr_find"]
    assert len(curve["lrs"]) == len(curve["losses"]) > 10
    assert len(history["lrs"]) == len(history["losses"]) == 2 * 23  # 1438 images / 64


def test_python_dash_m_entry():
    paths = [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
    proc = subprocess.run([sys.executable, "-m", "lrfind", "demo", "--help"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "--epochs" in proc.stdout and "usage: lrfind demo" in proc.stdout


def test_find_file_target(task, tmp_path, capsys):
    out = tmp_path / "find"
    code, stdout, stderr = run(capsys, "find", f"{task}:make", "--num-it", 40, "--quiet",
                               "--out", out)
    assert code == 0, stderr
    assert stderr == ""
    assert all(name in stdout for name in ("minimum", "steep", "valley"))
    assert (out / "lr_find.png").stat().st_size > 0
    curve = json.loads((out / "lr_find.json").read_text())
    assert curve["num_it"] == 40 and 10 < len(curve["lrs"]) <= 40
    assert curve["lrs"][0] == pytest.approx(1e-7)
    assert curve["drop_to_noise"] > 1  # this curve reads: no warning on stderr above


def test_find_module_target(task, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(task.parent))
    monkeypatch.delitem(sys.modules, "task", raising=False)
    code, stdout, stderr = run(capsys, "find", "task:make", "--num-it", 30, "--quiet",
                               "--suggest", "steep,slide", "--start-lr", 1e-5, "--end-lr", 1)
    assert code == 0, stderr
    lines = [line.split() for line in stdout.splitlines()]
    assert lines[0] == ["TARGET", "ran"]
    assert [line[0] for line in lines[2:]] == ["steep", "slide"]
    assert "task" in sys.modules


def test_find_shows_bars_unless_quiet(task, capsys, monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)  # capsys's stream, as a terminal
    code, _, stderr = run(capsys, "find", f"{task}:make", "--num-it", 20)
    assert code == 0
    assert "lr_find" in stderr  # the learner was built with progress on: the bar is shown


def test_fit_with_suggestion_and_save(task, tmp_path, capsys):
    path, out = tmp_path / "model.pt", tmp_path / "fit"
    code, stdout, stderr = run(capsys, "fit", f"{task}:make", "--epochs", 2, "--lr", "steep",
                               "--pct-start", 0.3, "--save", path, "--out", out, "--quiet")
    assert code == 0, stderr
    assert "lr_find:" in stdout and "steep" in stdout  # the range test ran first
    assert "pct_start=0.3" in stdout and "train_loss" in stdout
    history = json.loads((out / "history.json").read_text())
    steep = history["suggestions"]["steep"]
    assert max(history["lrs"]) == pytest.approx(steep, rel=1e-2)  # lr_max = the suggestion
    assert len(history["values"]) == 2

    sys.path.insert(0, str(task.parent))
    try:
        import importlib

        learn = importlib.import_module("task").make()
    finally:
        sys.path.remove(str(task.parent))
        sys.modules.pop("task", None)
    before = learn.validate()["accuracy"]
    learn.load(path)
    assert learn.validate()["accuracy"] > max(before, 0.7)
    assert torch.load(path, weights_only=True)["opt"] is not None


def test_fit_with_number(task, capsys):
    code, stdout, _ = run(capsys, "fit", f"{task}:make", "--epochs", 1, "--lr", "3e-3",
                          "--quiet")
    assert code == 0
    assert "lr_find" not in stdout and "lr_max=3.00e-03" in stdout


@pytest.mark.parametrize("args, message", [
    (["find", "{dir}/missing.py:make"], "TARGET file '{dir}/missing.py' does not exist"),
    (["find", "lrfind_no_such_module:make"], "cannot import TARGET module"),
    (["find", "{task}:nope"], "has no function 'nope'"),
    (["find", "{dir}/task.txt:make"], "TARGET file '{dir}/task.txt' is not a Python file (.py)"),
    (["find", "{task}:not_a_learner"], "returned list, not an lrfind.Learner"),
    (["find", "{task}:needs_args"],
     "TARGET {task}:needs_args must be callable without arguments: missing a required argument"),
    (["find", "{task}"], "TARGET must be path/to/file.py:function"),
    (["fit", "{task}:make", "--epochs", "0", "--lr", "1e-2"], "--epochs must be an integer >= 1"),
    (["fit", "{task}:make", "--epochs", "-3", "--lr", "1e-2"], "--epochs must be an integer"),
    (["fit", "{task}:make", "--epochs", "1", "--lr", "abc"], "--lr must be a number or one of"),
    (["fit", "{task}:make", "--epochs", "1", "--lr", "-1"], "--lr must be a finite number > 0"),
    (["fit", "{task}:make", "--epochs", "1", "--lr", "0"], "--lr must be a finite number > 0"),
    (["fit", "{task}:make", "--epochs", "1", "--lr", "nan"], "--lr must be a finite number > 0"),
    (["find", "{task}:make", "--suggest", "steep,bogus"], "unknown suggestion 'bogus'"),
    (["demo", "--epochs", "0"], "--epochs must be an integer >= 1"),
    (["find", "{task}:make", "--out", "{task}"],
     "--out '{task}': '{task}' is a file, not a folder"),
    (["find", "{task}:make", "--out", "{task}/sub"], "'{task}' is a file, not a folder"),
    (["fit", "{task}:make", "--epochs", "1", "--lr", "steep", "--save", "{dir}"],
     "--save '{dir}' is a folder: give a file path"),
    (["demo", "--out", "{task}"], "--out '{task}': '{task}' is a file"),
    # lrfind's own argument checks, reported the same way
    (["find", "{task}:make", "--start-lr", "-1"], "start_lr must be > 0"),
    (["find", "{task}:make", "--num-it", "1"], "num_it must be an integer >= 2"),
    (["find", "{task}:make", "--end-lr", "1e-9"], "end_lr must be > start_lr"),
    (["fit", "{task}:make", "--epochs", "1", "--lr", "steep", "--pct-start", "2"],
     "pct_start must be in (0, 1)"),
])
def test_bad_usage_exits_2_with_one_line(task, capsys, args, message):
    fill = {"dir": str(task.parent), "task": str(task)}
    code, stdout, stderr = run(capsys, *[a.format(**fill) for a in args])
    assert code == 2
    assert stderr.count("\n") == 1 and "Traceback" not in stderr
    assert stderr.startswith("lrfind: error: ")
    assert message.format(**fill) in stderr
    assert "TARGET ran" not in stdout  # rejected before any work


def test_json_files_hold_null_for_nan_and_inf(tmp_path):
    from lrfind.cli import _write_json

    _write_json(tmp_path / "h.json", {"losses": [1.0, float("nan")], "lr": float("inf")})
    assert json.loads((tmp_path / "h.json").read_text()) == {"losses": [1.0, None], "lr": None}


def test_syntax_errors_use_argparse(task, capsys):
    code, _, stderr = run(capsys, "fit", f"{task}:make", "--epochs", "x", "--lr", "1")
    assert code == 2 and "invalid int value: 'x'" in stderr
    code, _, stderr = run(capsys)
    assert code == 2 and "required" in stderr


def test_errors_in_user_code_keep_their_traceback(task, capsys):
    with pytest.raises(ValueError, match="user's own code"):
        main(["find", f"{task}:raises"])


def test_only_lrfinds_own_raise_counts_as_bad_usage():
    from lrfind.cli import _raised_in_lrfind
    from lrfind.utils import check_int, to_device

    with pytest.raises(ValueError) as own:
        check_int("n", 0)
    with pytest.raises(RuntimeError) as from_torch:  # raised by torch, called from lrfind
        to_device(torch.ones(1), "no-such-device")
    assert _raised_in_lrfind(own.value) and not _raised_in_lrfind(from_torch.value)


def test_diverged_training_exits_1_with_one_line(task, capsys):
    code, _, stderr = run(capsys, "fit", f"{task}:make", "--epochs", 1, "--lr", 1e4, "--quiet")
    assert code == 1
    assert stderr.startswith("lrfind: error: non-finite training loss")
    assert stderr.count("\n") == 1
