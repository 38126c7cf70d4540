"""Real training: checkpoints and exact resume, early stopping, best model, non-finite losses,
mixed precision and the fp16 skip logic, multi-process training."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lrfind
from lrfind import Callback, Checkpoint, EarlyStopping, SaveBest

# the range tests here sweep a few steps over curves too short to read: the warning that
# says so is checked in test_finder.py
pytestmark = pytest.mark.filterwarnings("ignore:lr_find. the smoothed loss falls by only")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A seeded task, shared by this process and the subprocesses below.
TASK = """
import torch, torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
import lrfind

def make_learner(generator=None, **kw):
    torch.manual_seed(0)
    x = torch.randn(200, 8)
    y = (x[:, 0] + x[:, 1] > 0).long()
    dl = DataLoader(TensorDataset(x[:160], y[:160]), batch_size=16, shuffle=True,
                    generator=generator)
    valid = DataLoader(TensorDataset(x[160:], y[160:]), batch_size=40)
    model = nn.Sequential(nn.Linear(8, 16), nn.Dropout(0.1), nn.ReLU(), nn.Linear(16, 2))
    return lrfind.Learner(model, dl, valid, loss_func=F.cross_entropy, progress=False, **kw)
"""
namespace: dict = {}
exec(TASK, namespace)
make_learner = namespace["make_learner"]


def weights(learn: lrfind.Learner) -> list[torch.Tensor]:
    return [t.detach().clone() for t in learn.model.state_dict().values()]


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


class StopAt(Callback):
    """Raise KeyboardInterrupt after the given epoch or optimizer step (after checkpoints)."""

    order = 110

    def __init__(self, epoch: int | None = None, step: int | None = None) -> None:
        self.epoch, self.step = epoch, step

    def after_batch(self, learn: lrfind.Learner) -> None:
        if self.step is not None and learn.train_iter == self.step + 1:  # step done
            raise KeyboardInterrupt

    def after_epoch(self, learn: lrfind.Learner) -> None:
        if learn.epoch == self.epoch:
            raise KeyboardInterrupt


@pytest.mark.parametrize("own_generator", [False, True], ids=["global-rng", "own-generator"])
@pytest.mark.parametrize("every", ["epoch", 7])
def test_resume_is_bitwise_exact(tmp_path, every, own_generator):
    def learner():
        return make_learner(torch.Generator().manual_seed(5) if own_generator else None)

    full = learner()
    full.fit_one_cycle(4, 1e-2)
    path = tmp_path / "ck.pt"
    cut = learner()
    with pytest.raises(KeyboardInterrupt):
        cut.fit_one_cycle(4, 1e-2, cbs=[Checkpoint(path, every=every), StopAt(1)])
    resumed = learner()
    resumed.fit_one_cycle(4, 1e-2, resume_from=path)
    assert same(weights(full), weights(resumed))
    assert resumed.recorder.lrs == full.recorder.lrs
    assert len(resumed.recorder.values) == 4
    assert [r["epoch"] for r in resumed.recorder.values] == [0, 1, 2, 3]


def test_mid_epoch_checkpoint_skips_seen_batches(tmp_path):
    path = tmp_path / "ck.pt"
    learn = make_learner()
    with pytest.raises(KeyboardInterrupt):
        learn.fit(2, 1e-2, cbs=[Checkpoint(path, every=3), StopAt(0)])
    state = torch.load(path, weights_only=False)
    assert state["batches_done"] == 9 and state["epoch"] == 0  # 10 batches an epoch
    seen = []

    class Spy(Callback):
        def before_batch(self, learn):
            seen.append(learn.iter)

    resumed = make_learner()
    resumed.fit(2, 1e-2, cbs=[Spy()], resume_from=path)
    assert seen == [9] + list(range(10))


def test_resume_after_sigkill_in_new_process(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(TASK + textwrap.dedent("""
        import os, signal, sys
        out, mode = sys.argv[1], sys.argv[2]
        learn = make_learner()
        class Kill(lrfind.Callback):
            order = 110
            def after_epoch(self, learn):
                if learn.epoch == 1:
                    os.kill(os.getpid(), signal.SIGKILL)
        cbs = [lrfind.Checkpoint(out + "/ck.pt")] + ([Kill()] if mode == "kill" else [])
        resume = out + "/ck.pt" if mode == "resume" else None
        learn.fit_one_cycle(4, 1e-2, cbs=cbs, resume_from=resume)
        torch.save(learn.model.state_dict(), out + "/final-" + mode + ".pt")
    """))
    env = {**os.environ, "PYTHONPATH": ROOT}

    def run(mode: str) -> int:
        return subprocess.run([sys.executable, str(script), str(tmp_path), mode], env=env,
                              capture_output=True, timeout=120).returncode

    assert run("kill") == -signal.SIGKILL
    assert not (tmp_path / "final-kill.pt").exists()
    assert run("resume") == 0
    assert run("full") == 0
    a = torch.load(tmp_path / "final-resume.pt")
    b = torch.load(tmp_path / "final-full.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_checkpoint_write_killed_leaves_previous_intact(tmp_path):
    script = tmp_path / "write.py"
    script.write_text(textwrap.dedent(f"""
        import os, signal, sys, torch
        sys.path.insert(0, {ROOT!r})
        from lrfind.utils import atomic_save
        path = sys.argv[1]
        atomic_save({{"v": torch.arange(5)}}, path)
        real = torch.save
        def half_then_die(obj, f, *a, **k):
            f.write(b"partial bytes")
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        torch.save = half_then_die
        atomic_save({{"v": torch.arange(9)}}, path)
    """))
    path = tmp_path / "ck.pt"
    proc = subprocess.run([sys.executable, str(script), str(path)], capture_output=True,
                          timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert torch.equal(torch.load(path)["v"], torch.arange(5))
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == [
        "ck.pt", "write.py"]


def test_resume_bad_input_changes_nothing(tmp_path):
    learn = make_learner()
    before = weights(learn)
    with pytest.raises(FileNotFoundError, match="resume_from"):
        learn.fit_one_cycle(2, 1e-2, resume_from=tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not an lrfind checkpoint"):
        learn.fit_one_cycle(2, 1e-2, resume_from=tmp_path / "junk.pt")
    torch.save({"model": {}}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not an lrfind checkpoint"):
        learn.fit_one_cycle(2, 1e-2, resume_from=tmp_path / "other.pt")
    # a checkpoint of a different model
    other = lrfind.Learner(nn.Linear(8, 2), learn.train_dl, loss_func=F.cross_entropy,
                           progress=False)
    with pytest.raises(KeyboardInterrupt):
        other.fit(2, 1e-2, cbs=[Checkpoint(tmp_path / "lin.pt"), StopAt(0)])
    with pytest.raises(ValueError, match="does not match the model"):
        learn.fit(2, 1e-2, resume_from=tmp_path / "lin.pt")
    # same model, other schedule
    with pytest.raises(KeyboardInterrupt):
        learn.fit_one_cycle(3, 1e-2, cbs=[Checkpoint(tmp_path / "ck.pt"), StopAt(0)])
    before = weights(learn)
    with pytest.raises(ValueError, match="n_epoch"):
        learn.fit_one_cycle(4, 1e-2, resume_from=tmp_path / "ck.pt")
    with pytest.raises(ValueError, match="same call"):
        learn.fit_one_cycle(3, 2e-2, resume_from=tmp_path / "ck.pt")
    # same model, another optimizer, or other parameter groups
    sgd = make_learner(opt_func=torch.optim.SGD)
    with pytest.raises(ValueError, match=r"holds the state of the optimizer AdamW, this "
                                         r"learner's optimizer is SGD"):
        sgd.fit_one_cycle(3, 1e-2, resume_from=tmp_path / "ck.pt")
    split = make_learner(splitter=lambda m: [list(m[0].parameters()), list(m[3].parameters())])
    split_before = weights(split)
    with pytest.raises(ValueError, match=r"parameter groups of sizes \[4\], this learner's "
                                         r"optimizer \[2, 2\]"):
        split.fit_one_cycle(3, 1e-2, resume_from=tmp_path / "ck.pt")
    assert same(before, weights(learn)) and same(split_before, weights(split))


@pytest.mark.parametrize("every", [0, "batch", 2.0, True])
def test_checkpoint_every_must_be_epoch_or_positive(every):
    with pytest.raises(ValueError, match=f"every must be 'epoch' or an integer >= 1, got "
                                         f"{re.escape(repr(every))}"):
        Checkpoint("x.pt", every=every)


def test_early_stopping_and_save_best(tmp_path):
    learn = make_learner()
    values = iter([1.0, 0.5, 0.6, 0.7, 0.4, 0.9, 0.9, 0.9, 0.9, 0.9])

    snapshots = []

    class FakeValid(Callback):
        order = 60  # after the recorder wrote the row, before the monitors read it

        def after_epoch(self, learn):
            learn.recorder.values[-1]["valid_loss"] = next(values)
            snapshots.append(weights(learn))

    best = tmp_path / "best.pt"
    learn.fit(10, 1e-3, cbs=[FakeValid(), EarlyStopping(patience=2), SaveBest(best)])
    assert len(learn.recorder.values) == 4  # 0.6 and 0.7 do not beat 0.5
    saved = list(torch.load(best, weights_only=True)["model"].values())
    assert same(saved, snapshots[1]) and not same(saved, snapshots[3])  # epoch 1's, at 0.5
    with pytest.raises(ValueError, match="monitor"):
        learn.fit(1, cbs=[EarlyStopping(monitor="nope")])
    with pytest.raises(ValueError, match="mode"):
        SaveBest(best, mode="up")
    with pytest.raises(ValueError, match="patience"):
        EarlyStopping(patience=0)


@pytest.mark.parametrize(("min_delta", "epochs"), [(0.0, 4), (0.1, 3)])
def test_early_stopping_max_mode_and_min_delta(min_delta, epochs):
    values = iter([1.0, 2.0, 2.05, 1.5, 1.5, 1.5])

    class FakeValid(Callback):
        order = 60

        def after_epoch(self, learn):
            learn.recorder.values[-1]["valid_loss"] = next(values)

    learn = make_learner()
    learn.fit(6, 1e-3, cbs=[FakeValid(), EarlyStopping(mode="max", patience=1,
                                                       min_delta=min_delta)])
    assert len(learn.recorder.values) == epochs  # 2.05 beats 2.0, but not by 0.1
    with pytest.raises(ValueError, match="^min_delta must be a finite number, got True"):
        EarlyStopping(min_delta=True)


@pytest.mark.parametrize("mode", ["min", "max"])
def test_early_stopping_does_not_take_an_equal_value_for_an_improvement(mode):
    class FakeValid(Callback):
        order = 60

        def after_epoch(self, learn):
            learn.recorder.values[-1]["valid_loss"] = 1.0

    learn = make_learner()
    learn.fit(4, 1e-3, cbs=[FakeValid(), EarlyStopping(mode=mode, patience=2)])
    assert len(learn.recorder.values) == 3  # 1.0 after 1.0 twice: stopped before epoch 3


VALUES = [1.0, 0.5, 0.6, 0.4, 0.7, 0.8, 0.9, 0.9]


class FakeValid(Callback):
    """Writes VALUES[epoch] as the epoch's valid loss."""

    order = 51  # after the recorder (50) wrote the row, before a scheduler or monitor reads it

    def after_epoch(self, learn):
        learn.recorder.values[-1]["valid_loss"] = VALUES[learn.epoch]


def test_resume_with_early_stopping_and_save_best_is_exact(tmp_path):
    def cbs(out):
        return [FakeValid(), Checkpoint(out / "ck.pt"), EarlyStopping(patience=2),
                SaveBest(out / "best.pt")]

    (tmp_path / "full").mkdir()
    (tmp_path / "cut").mkdir()
    full = make_learner()
    full.fit_one_cycle(8, 1e-2, cbs=cbs(tmp_path / "full"))
    assert len(full.recorder.values) == 6  # best at epoch 3, no better at 4 and 5
    cut = make_learner()
    with pytest.raises(KeyboardInterrupt):
        # after epoch 4: EarlyStopping has waited one epoch since the best, at epoch 3
        cut.fit_one_cycle(8, 1e-2, cbs=[*cbs(tmp_path / "cut"), StopAt(4)])
    resumed = make_learner()
    resumed.fit_one_cycle(8, 1e-2, cbs=cbs(tmp_path / "cut"), resume_from=tmp_path / "cut/ck.pt")
    assert len(resumed.recorder.values) == 6
    assert same(weights(full), weights(resumed))
    for name in ("best.pt", "ck.pt"):
        a, b = (torch.load(tmp_path / run / name, weights_only=False) for run in ("full", "cut"))
        assert same(list(a["model"].values()), list(b["model"].values())), name
    assert torch.load(tmp_path / "cut/ck.pt", weights_only=False)["epoch"] == 6  # the last one
    with pytest.raises(ValueError, match=r"callbacks \[\"EarlyStopping\(monitor='valid_loss', "
                                         r"mode='min', min_delta=0.0, patience=2\)\", .*this fit "
                                         r"has \[.*resume with the same callbacks"):
        resumed.fit_one_cycle(8, 1e-2, cbs=[SaveBest(tmp_path / "x.pt")],
                              resume_from=tmp_path / "cut/ck.pt")


@pytest.mark.parametrize("sched", [
    (torch.optim.lr_scheduler.StepLR, {"step_size": 3, "gamma": 0.5}),
    (torch.optim.lr_scheduler.LinearLR, {"start_factor": 0.25, "total_iters": 4}),
    (torch.optim.lr_scheduler.ReduceLROnPlateau, {"patience": 0, "factor": 0.5}),
])
def test_resume_with_a_torch_scheduler_is_exact(tmp_path, sched):
    def cbs():
        return [FakeValid(), lrfind.TorchScheduler(sched[0], **sched[1])]

    full = make_learner()
    full.fit(7, 1e-2, cbs=cbs())
    cut = make_learner()
    with pytest.raises(KeyboardInterrupt):
        cut.fit(7, 1e-2, cbs=[*cbs(), Checkpoint(tmp_path / "ck.pt"), StopAt(3)])
    resumed = make_learner()
    resumed.fit(7, 1e-2, cbs=cbs(), resume_from=tmp_path / "ck.pt")
    assert len(set(full.recorder.lrs)) > 1  # the scheduler moved the LR
    assert resumed.recorder.lrs == full.recorder.lrs
    assert same(weights(full), weights(resumed))


def two_groups(model):
    return [list(model[0].parameters()), list(model[3].parameters())]


FITS = {  # each method on make_learner's task, 3 epochs of 10 batches
    "fit_sgdr": lambda learn, **kw: learn.fit_sgdr(2, 1, 1e-2, **kw),
    "fit_warmup_cosine": lambda learn, **kw: learn.fit_warmup_cosine(3, slice(1e-3, 1e-2), **kw),
    "fit_flat_cos": lambda learn, **kw: learn.fit_flat_cos(3, 1e-2, wd=0.1, **kw),
    "fine_tune": lambda learn, **kw: learn.fine_tune(2, base_lr=1e-2, **kw),
    "fit": lambda learn, **kw: learn.fit(3, 1e-2, **kw),
}


@pytest.mark.parametrize(("method", "kw", "every", "stop"), [
    ("fit_sgdr", {"accum_steps": 3, "precision": "bf16"}, 2, 5),  # 4 steps an epoch
    ("fit_warmup_cosine", {"accum_steps": 2, "clip_grad": 0.5, "splitter": two_groups}, 1, 7),
    ("fit_flat_cos", {"opt_func": torch.optim.Adam}, "epoch", 19),
    ("fine_tune", {"splitter": two_groups, "accum_steps": 4}, 1, 1),  # in the frozen phase
    ("fine_tune", {"splitter": two_groups}, 3, 14),  # in the second phase
    ("fit", {"opt_func": lambda params, lr: torch.optim.SGD(params, lr, momentum=0.9),
             "accum_steps": 3}, 1, 6),
])
def test_resume_is_exact_for_every_method(tmp_path, method, kw, every, stop):
    path, fit = tmp_path / "ck.pt", FITS[method]
    full = make_learner(**kw)
    fit(full)
    cut = make_learner(**kw)
    with pytest.raises(KeyboardInterrupt):
        fit(cut, cbs=[Checkpoint(path, every=every), StopAt(step=stop)])
    assert cut.train_iter == stop + 1 < full.train_iter  # stopped mid-run
    resumed = make_learner(**kw)
    fit(resumed, cbs=[Checkpoint(path, every=every)], resume_from=path)
    assert same(weights(full), weights(resumed))
    assert resumed.recorder.lrs == full.recorder.lrs
    assert resumed.opt.state_dict()["param_groups"] == full.opt.state_dict()["param_groups"]


@pytest.mark.parametrize("stop", [5, 9])  # mid-epoch; the last step of epoch 0
def test_resume_from_a_step_checkpoint_keeps_the_epoch_rows(tmp_path, stop):
    full = make_learner()
    full.fit_one_cycle(3, 1e-2)
    cut = make_learner()
    with pytest.raises(KeyboardInterrupt):
        cut.fit_one_cycle(3, 1e-2, cbs=[Checkpoint(tmp_path / "ck.pt", every=stop + 1),
                                        StopAt(step=stop)])
    resumed = make_learner()
    resumed.fit_one_cycle(3, 1e-2, resume_from=tmp_path / "ck.pt")
    assert same(weights(full), weights(resumed))
    assert resumed.recorder.lrs == full.recorder.lrs
    # every epoch's row, its train_loss the mean over all of its steps, before and after
    for a, b in zip(full.recorder.values, resumed.recorder.values, strict=True):
        assert {k: v for k, v in a.items() if k != "time"} == {
            k: v for k, v in b.items() if k != "time"}


class WeightAverage(Callback):
    """A running average of the weights, updated after every batch (state in checkpoints)."""

    def before_fit(self, learn):
        self.avg, self.n = torch.cat([p.detach().flatten() for p in learn.model.parameters()]), 0

    def after_batch(self, learn):
        w = torch.cat([p.detach().flatten() for p in learn.model.parameters()])
        self.avg, self.n = 0.9 * self.avg + 0.1 * w, self.n + 1

    def state_dict(self):
        return {"avg": self.avg.clone(), "n": self.n}

    def load_state_dict(self, state):
        self.avg, self.n = state["avg"].clone(), state["n"]


@pytest.mark.parametrize("accum_steps", [1, 2])
def test_a_step_checkpoint_holds_what_callbacks_did_after_the_batch(tmp_path, accum_steps):
    full, average = make_learner(accum_steps=accum_steps), WeightAverage()
    full.fit(2, 1e-2, cbs=[average])
    cut = make_learner(accum_steps=accum_steps)
    with pytest.raises(KeyboardInterrupt):
        cut.fit(2, 1e-2, cbs=[WeightAverage(), Checkpoint(tmp_path / "ck.pt", every=2),
                              StopAt(step=2)])
    resumed, again = make_learner(accum_steps=accum_steps), WeightAverage()
    resumed.fit(2, 1e-2, cbs=[again, Checkpoint(tmp_path / "ck.pt", every=2)],
                resume_from=tmp_path / "ck.pt")
    assert again.n == average.n == 20
    assert torch.equal(again.avg, average.avg)
    assert same(weights(full), weights(resumed))


class StopAfterEpochs(Callback):
    """KeyboardInterrupt after the n-th epoch end, counted across fits (after checkpoints)."""

    order = 110

    def __init__(self, n: int) -> None:
        self.n = n

    def after_epoch(self, learn: lrfind.Learner) -> None:
        self.n -= 1
        if self.n == 0:
            raise KeyboardInterrupt


@pytest.mark.parametrize("stop", [1, 3])  # in the frozen phase; in the second phase
def test_fine_tune_resumes_in_the_phase_that_wrote_the_checkpoint(tmp_path, stop):
    def split(m):
        return [list(m[0].parameters()), list(m[3].parameters())]

    full = make_learner(splitter=split)
    full.fine_tune(2, freeze_epochs=2)
    cut, path = make_learner(splitter=split), tmp_path / "ck.pt"
    with pytest.raises(KeyboardInterrupt):
        cut.fine_tune(2, freeze_epochs=2, cbs=[Checkpoint(path), StopAfterEpochs(stop)])
    resumed = make_learner(splitter=split)
    resumed.fine_tune(2, freeze_epochs=2, resume_from=path)
    assert same(weights(full), weights(resumed))
    assert resumed.recorder.lrs == full.recorder.lrs  # the second phase's
    other = make_learner(splitter=split)
    other_phase = {"freeze_epochs": 3} if stop == 1 else {"freeze_epochs": 2, "lr_mult": 10}
    for kwargs in (other_phase, {"freeze_epochs": 2, "base_lr": 1e-3}):
        with pytest.raises(ValueError, match=r"was written by a fit of \d epochs at lrs "
                                             r".*, not by a phase of this fine_tune"):
            other.fine_tune(2, resume_from=path, **kwargs)
        assert all(p.requires_grad for p in other.model.parameters())  # nothing changed
    if stop == 1:  # a frozen-phase checkpoint does not resume into an unfrozen learner
        with pytest.raises(ValueError, match=r"was written with 2 of 4 parameter tensors "
                                             r"trainable, this learner has 4: freeze as before"):
            make_learner(splitter=split).fit_one_cycle(2, 2e-3, resume_from=path)


class CancelAfterStep(Callback):
    """Cancels the rest of the batch of one optimizer step (the step itself counts)."""

    order = 90

    def __init__(self, step: int) -> None:
        self.step = step

    def after_step(self, learn: lrfind.Learner) -> None:
        if learn.train_iter == self.step:
            raise lrfind.CancelBatchException


def test_a_step_checkpoint_cut_short_is_written_on_the_next_batch(tmp_path):
    full = make_learner()
    full.fit(2, 1e-2, cbs=[CancelAfterStep(1)])
    cut, path = make_learner(), tmp_path / "ck.pt"
    with pytest.raises(KeyboardInterrupt):  # after step 2's batch was cut short, and step 3
        cut.fit(2, 1e-2, cbs=[CancelAfterStep(1), Checkpoint(path, every=2), StopAt(step=2)])
    assert torch.load(path, weights_only=False)["train_iter"] == 3
    resumed = make_learner()
    resumed.fit(2, 1e-2, cbs=[CancelAfterStep(1)], resume_from=path)
    assert same(weights(full), weights(resumed))


def test_resume_takes_the_distributed_samplers_seed_from_the_checkpoint(tmp_path):
    """A new job draws a new sampler seed; the checkpoint's seed gives the run's order."""
    def learner(seed):
        learn = make_learner()
        ds = learn.train_dl.dataset
        sampler = torch.utils.data.DistributedSampler(ds, 1, 0, shuffle=True, seed=seed)
        learn.train_dl = torch.utils.data.DataLoader(ds, batch_size=16, sampler=sampler)
        return learn

    full = learner(5)
    full.fit(2, 1e-2)
    with pytest.raises(KeyboardInterrupt):
        learner(5).fit(2, 1e-2, cbs=[Checkpoint(tmp_path / "ck.pt"), StopAt(0)])
    resumed = learner(9)
    resumed.fit(2, 1e-2, resume_from=tmp_path / "ck.pt")
    assert resumed.train_dl.sampler.seed == 5
    assert same(weights(full), weights(resumed))


def test_a_resume_that_fails_early_does_not_leak_into_the_next_fit(tmp_path):
    cut = make_learner()
    with pytest.raises(KeyboardInterrupt):
        cut.fit(2, 1e-2, cbs=[Checkpoint(tmp_path / "ck.pt", every=3), StopAt(step=5)])

    class Fail(Callback):
        def before_fit(self, learn):
            raise RuntimeError("failed early")

    learn = make_learner()
    with pytest.raises(RuntimeError, match="failed early"):
        learn.fit(2, 1e-2, cbs=[Fail()], resume_from=tmp_path / "ck.pt")
    learn.fit(1, 1e-2)
    assert len(learn.recorder.lrs) == 10  # every batch of the epoch, none skipped


def test_resume_with_other_settings_is_refused(tmp_path):
    step = [lrfind.TorchScheduler(torch.optim.lr_scheduler.StepLR, step_size=1, gamma=0.5)]
    cut = make_learner(accum_steps=5)
    with pytest.raises(KeyboardInterrupt):
        cut.fit(2, 1e-2, wd=0.1, cbs=[*step, Checkpoint(tmp_path / "ck.pt"), StopAt(0)])
    path = tmp_path / "ck.pt"
    other = [lrfind.TorchScheduler(torch.optim.lr_scheduler.StepLR, step_size=3, gamma=0.5)]
    with pytest.raises(ValueError, match=r"holds the state of the callbacks .*step_size': 1.*"
                                         r"this fit has .*step_size': 3"):
        make_learner(accum_steps=5).fit(2, 1e-2, wd=0.1, cbs=other, resume_from=path)
    with pytest.raises(ValueError, match=r"'wd': 0.1.*not by .*'wd': 0.5.*same call"):
        make_learner(accum_steps=5).fit(2, 1e-2, wd=0.5, cbs=step, resume_from=path)
    # 10 batches make 2 optimizer steps an epoch with accum_steps 5 and with 6
    with pytest.raises(ValueError, match=r"'accum_steps': 5.*not by .*'accum_steps': 6"):
        make_learner(accum_steps=6).fit(2, 1e-2, wd=0.1, cbs=step, resume_from=path)
    short = make_learner(accum_steps=5)  # 5 batches of 32: one optimizer step an epoch
    short.train_dl = torch.utils.data.DataLoader(short.train_dl.dataset, batch_size=32)
    with pytest.raises(ValueError, match=r"^the checkpoint's run had 4 optimizer steps, this "
                                         r"one would have 2"):
        short.fit(2, 1e-2, wd=0.1, cbs=step, resume_from=path)
    with pytest.raises(TypeError, match=r"^resume_from must be a path \(str or os.PathLike\), "
                                        r"got 123"):
        make_learner().fit(2, 1e-2, resume_from=123)


def test_resume_takes_equivalent_callbacks_and_older_checkpoints(tmp_path):
    from lrfind.checkpoint import describe

    def decay(epoch):
        return 0.5**epoch

    sched = lrfind.TorchScheduler(torch.optim.lr_scheduler.LambdaLR, lr_lambda=decay)
    assert "0x" not in describe(sched)  # an address differs in the next process
    path = tmp_path / "ck.pt"
    full = make_learner()
    full.fit(3, 1e-2, cbs=[EarlyStopping(patience=5)])
    cut = make_learner()
    with pytest.raises(KeyboardInterrupt):
        cut.fit(3, 1e-2, cbs=[EarlyStopping(patience=5), SaveBest(tmp_path / "a.pt"),
                              Checkpoint(path), StopAt(0)])
    state = torch.load(path, weights_only=False)
    resumed = make_learner()  # SaveBest writes elsewhere now: the same callback all the same
    resumed.fit(3, 1e-2, cbs=[EarlyStopping(patience=5), SaveBest(tmp_path / "b.pt")],
                resume_from=path)
    assert same(weights(full), weights(resumed))
    # a file of an earlier version: no callback states, no epoch start, fewer call keys
    del state["callbacks"], state["recorder"]["epoch_start"]
    del state["sched"]["wd"], state["sched"]["accum_steps"]
    torch.save(state, path)
    old = make_learner()
    old.fit(3, 1e-2, cbs=[EarlyStopping(patience=5)], resume_from=path)
    assert same(weights(full), weights(old))


def test_per_group_scheduler_arguments_and_numpy_settings(tmp_path):
    learn = make_learner(wd=np.float32(0.01), accum_steps=np.int64(1))
    two = [lambda e: 1.0, lambda e: 0.5**e]
    learn.opt.add_param_group({"params": [torch.zeros(1, requires_grad=True)], "lr": 1e-3})
    learn.fit(np.int64(2), 1e-2, cbs=[
        lrfind.TorchScheduler(torch.optim.lr_scheduler.LambdaLR, lr_lambda=two)])
    assert type(learn.opt.param_groups[0]["weight_decay"]) is float
    learn.save(tmp_path / "m.pt")
    learn.load(tmp_path / "m.pt")  # loads: no numpy value inside


def test_monitors_skip_an_epoch_cancelled_before_validation(tmp_path):
    class CancelFirstEpoch(Callback):
        def before_batch(self, learn):
            if learn.epoch == 0 and learn.iter == 3:
                raise lrfind.CancelEpochException

    plateau = lrfind.TorchScheduler(torch.optim.lr_scheduler.ReduceLROnPlateau)
    stop, best = EarlyStopping(patience=1), SaveBest(tmp_path / "best.pt")
    learn = make_learner()
    learn.fit(2, 1e-2, cbs=[CancelFirstEpoch(), plateau, stop, best])
    assert "valid_loss" not in learn.recorder.values[0] and len(learn.recorder.values) == 2
    assert stop.wait == 0 and best.best == learn.recorder.values[1]["valid_loss"]


# The NaN comes at optimizer step 14 (batch 4 of epoch 1). The last good checkpoint: the end
# of epoch 0, or, written every step, the one after step 13, with 14 steps and 4 batches done.
@pytest.mark.parametrize(("every", "written"), [
    ("epoch", {"epoch": 1, "train_iter": 10, "batches_done": 0}),
    (1, {"epoch": 1, "train_iter": 14, "batches_done": 4})])
def test_non_finite_loss_stops_with_epoch_and_step(tmp_path, every, written):
    learn = make_learner()
    steps = [0]

    class Poison(Callback):
        def after_loss(self, learn):
            steps[0] += 1
            if learn.epoch == 1 and learn.iter == 4:
                learn.loss = learn.loss * float("nan")
                learn.loss_grad = learn.loss

    path = tmp_path / "ck.pt"
    with pytest.raises(FloatingPointError, match=r"epoch 1, optimizer step 14"):
        learn.fit(3, 1e-2, cbs=[Poison(), Checkpoint(path, every=every)])
    state = torch.load(path, weights_only=False)
    assert {k: state[k] for k in written} == written
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    losses = state["recorder"]["losses"]
    assert len(losses) == written["train_iter"] and all(np.isfinite(losses))


class PredDtypes(Callback):
    """Records the dtype of the model's output at every loss (it shows autocast at work)."""

    def __init__(self) -> None:
        self.seen: set = set()

    def after_loss(self, learn: lrfind.Learner) -> None:
        self.seen.add(learn.pred.dtype)


@pytest.mark.parametrize(("precision", "dtype"), [("bf16", torch.bfloat16),
                                                  ("fp16", torch.float16)])
def test_mixed_precision_on_cpu_trains_with_float32_params(precision, dtype):
    learn, dtypes = make_learner(precision=precision), PredDtypes()
    first = learn.validate()["valid_loss"]
    learn.fit_one_cycle(3, 1e-2, cbs=[dtypes])
    assert dtypes.seen == {dtype}  # the forward pass ran under autocast
    assert learn.validate()["valid_loss"] < first
    assert all(p.dtype == torch.float32 for p in learn.model.parameters())


def test_fp16_overflow_skips_step_without_advancing_schedule():
    learn = make_learner(precision="fp16")
    assert learn.scaler is not None

    class Overflow(Callback):
        def after_loss(self, learn):
            if learn.epoch == 0 and learn.iter == 3:
                learn.loss_grad = learn.loss * float("inf")

    learn.fit_one_cycle(2, 1e-2, cbs=[Overflow()])
    rec = learn.recorder
    assert len(rec.lrs) == learn.total_steps - 1  # one step skipped, not recorded
    expected = [lrfind.schedules.one_cycle(1e-2)(i / (learn.total_steps - 1))
                for i in range(learn.total_steps - 1)]
    assert rec.lrs == pytest.approx(expected, rel=1e-12)
    res = make_learner(precision="fp16").lr_find(num_it=20, stop_div=False, show_plot=False)
    assert len(res.lrs) == 20 and res.stop_reason == "num_it reached"  # skipped steps retried


class OverflowAt(Callback):
    """Makes the gradients of the n-th batch overflow (fp16), also in the range test."""

    in_lr_find = True

    def __init__(self, n: int) -> None:
        self.n, self.batches = n, 0

    def after_loss(self, learn: lrfind.Learner) -> None:
        self.batches += 1
        if self.batches == self.n:
            learn.loss_grad = learn.loss * float("inf")


def test_fp16_range_test_retries_the_lr_of_a_step_skipped_for_an_overflow():
    overflow = OverflowAt(4)
    learn = make_learner(precision="fp16", cbs=[overflow])
    stepped = []  # the LR of every optimizer step taken
    step = learn.opt.step

    def spy(*args, **kwargs):
        stepped.append(learn.opt.param_groups[-1]["lr"])
        return step(*args, **kwargs)

    learn.opt.step = spy
    res = learn.lr_find(num_it=20, start_lr=1e-6, end_lr=1e-1, stop_div=False, show_plot=False)
    grid = [1e-6 * 1e5 ** (k / 19) for k in range(20)]
    assert res.stop_reason == "num_it reached"
    assert overflow.batches == 21  # one batch more for the skipped step
    assert res.lrs == pytest.approx(grid, rel=1e-12)
    assert stepped == res.lrs  # batch 5 stepped at the LR batch 4 could not
    assert len(res.raw_losses) == 20 and all(np.isfinite(res.raw_losses))
    assert learn.scaler.get_scale() == 2.0**16  # the overflow's halving is undone


def test_fp16_range_test_on_a_one_batch_loader_takes_every_step():
    # one optimizer step per epoch: the sweep has epochs to spare for the skipped one
    overflow = OverflowAt(4)
    torch.manual_seed(0)
    x = torch.randn(32, 8)
    dl = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, (x[:, 0] > 0).long()),
                                     batch_size=32)
    learn = lrfind.Learner(nn.Linear(8, 2), dl, loss_func=F.cross_entropy, precision="fp16",
                           progress=False, cbs=[overflow])
    res = learn.lr_find(num_it=10, stop_div=False, show_plot=False)
    assert overflow.batches == 11 and len(res.lrs) == 10
    assert res.stop_reason == "num_it reached"


class GradNorm(Callback):
    """The global norm of the gradients each optimizer step used."""

    def __init__(self) -> None:
        self.norms: list[float] = []

    def after_step(self, learn: lrfind.Learner) -> None:
        grads = [p.grad.flatten() for p in learn.model.parameters() if p.grad is not None]
        self.norms.append(torch.cat(grads).norm().item())


def test_fp16_clips_the_unscaled_gradients():
    # every gradient norm of this task is well above 0.01: each step is clipped to it
    norms = GradNorm()
    make_learner(precision="fp16", clip_grad=0.01).fit(1, 1e-2, cbs=[norms])
    assert len(norms.norms) == 10
    assert norms.norms == pytest.approx([0.01] * 10, rel=1e-4)


def test_fp16_stops_at_a_non_finite_loss_as_fp32_does():
    class NaNLoss(Callback):
        def after_loss(self, learn):
            if learn.iter == 3:
                learn.loss = learn.loss_grad = learn.loss * float("nan")

    for precision in ("32", "fp16"):
        with pytest.raises(FloatingPointError, match="non-finite training loss nan at epoch 0"):
            make_learner(precision=precision).fit(1, 1e-2, cbs=[NaNLoss()])


def test_fit_after_a_fit_interrupted_inside_an_fp16_step():
    learn = make_learner(precision="fp16")

    def interrupted(*args, **kwargs):  # Ctrl-C inside the optimizer step, after unscale_
        raise KeyboardInterrupt

    learn.opt.step = interrupted
    with pytest.raises(KeyboardInterrupt):
        learn.fit(1, 1e-2)
    del learn.opt.step
    learn.fit(1, 1e-2)  # used to raise "unscale_() has already been called"
    assert len(learn.recorder.values) == 1


def test_bad_training_arguments():
    with pytest.raises(ValueError, match="precision"):
        make_learner(precision="fp8")
    with pytest.raises(ValueError, match="accum_steps"):
        make_learner(accum_steps=0)
    with pytest.raises(ValueError, match="clip_grad"):
        make_learner(clip_grad=0.0)


def test_lr_find_counts_optimizer_steps_under_accumulation():
    class Batches(Callback):
        in_lr_find = True

        def __init__(self) -> None:
            self.n = 0

        def before_batch(self, learn: lrfind.Learner) -> None:
            self.n += 1

    batches = Batches()
    learn = make_learner(accum_steps=4, cbs=[batches])
    res = learn.lr_find(num_it=30, stop_div=False, show_plot=False)
    # 10 batches an epoch make 3 steps (4 + 4 + 2 batches): 30 steps take 10 epochs
    assert len(res.lrs) == 30 and batches.n == 100


def test_a_distributed_sampler_shuffles_anew_every_epoch():
    from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

    ds = TensorDataset(torch.randn(64, 4), torch.arange(64))
    sampler = DistributedSampler(ds, num_replicas=1, rank=0, shuffle=True, seed=3)
    seen: list[int] = []

    class Spy(Callback):
        def before_batch(self, learn: lrfind.Learner) -> None:
            seen.extend(learn.batch[1].tolist())

    learn = lrfind.Learner(nn.Linear(4, 1), DataLoader(ds, batch_size=16, sampler=sampler),
                           compute_loss=lambda m, b: m(b[0]).pow(2).mean(), progress=False)
    learn.fit(3, 1e-3, cbs=[Spy()])
    orders = [seen[:64], seen[64:128], seen[128:]]
    # the sampler's order for epoch e: a permutation seeded with seed + e (set_epoch(e))
    assert orders == [torch.randperm(64, generator=torch.Generator().manual_seed(3 + e)).tolist()
                      for e in range(3)]
    assert orders[0] != orders[1] != orders[2]


DDP_SCRIPT = """
import json, os, sys
import torch, torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset
import lrfind
torch.manual_seed(0)
x = torch.randn(256, 8); y = (x[:, 0] > 0).long(); idx = torch.arange(256)
dl = DataLoader(TensorDataset(x, y, idx), batch_size=16, shuffle=True)
model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
seen = []
class Spy(lrfind.Callback):
    def before_batch(self, learn):
        seen.extend(learn.batch[2].tolist())
learn = lrfind.Learner(model, dl, compute_loss=lambda m, b: F.cross_entropy(m(b[0]), b[1]),
                       progress=False, cbs=[Spy()],
                       splitter=lambda m: [list(m[0].parameters()), list(m[2].parameters())])
res = learn.lr_find(show_plot=False)
seen.clear()
learn.fit_one_cycle(2, 1e-2)
w = torch.cat([p.detach().flatten() for p in learn.model.parameters()]).tolist()
fit_seen = list(seen)  # the fit's batches, before the fits below add to them
first = model[0].weight.detach().clone()
learn.freeze()  # DDP is rebuilt for what trains
learn.fit(1, 1e-2)
frozen_kept = bool(torch.equal(first, model[0].weight))
learn.fine_tune(1, freeze_epochs=1)
tuned = torch.cat([p.detach().flatten() for p in learn.model.parameters()]).tolist()
torch.manual_seed(100 + learn.rank)  # a plain model of each process's own
own = torch.nn.Linear(8, 2)
mine = [p.detach().clone() for p in own.parameters()]
lrfind.lr_find(own, torch.optim.SGD(own.parameters(), lr=0.1), dl, num_it=10,
               compute_loss=lambda m, b: F.cross_entropy(m(b[0]), b[1]), show_plot=False)
own_kept = all(torch.equal(a, b) for a, b in zip(mine, own.parameters()))

def dropout_learner():  # each process draws its own dropout masks, from its own seed
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Dropout(0.5), torch.nn.Linear(16, 2))
    learn = lrfind.Learner(net, dl, compute_loss=lambda m, b: F.cross_entropy(m(b[0]), b[1]),
                           progress=False)
    torch.manual_seed(100 + learn.rank)
    return learn

class Stop(lrfind.Callback):
    order = 110
    def after_batch(self, learn):
        if learn.train_iter == 11:
            raise KeyboardInterrupt

full = dropout_learner()
full.fit_one_cycle(2, 1e-2)
try:
    dropout_learner().fit_one_cycle(2, 1e-2, cbs=[lrfind.Checkpoint(sys.argv[1] + "/ck.pt",
                                                                    every=3), Stop()])
except KeyboardInterrupt:
    pass
resumed = dropout_learner()
resumed.fit_one_cycle(2, 1e-2, resume_from=sys.argv[1] + "/ck.pt")
resumed_exact = all(torch.equal(a, b)
                    for a, b in zip(full.model.parameters(), resumed.model.parameters()))

torch.manual_seed(0)  # BatchNorm: each process updates its statistics from its own batches
bn = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.BatchNorm1d(16), torch.nn.Linear(16, 2))
torch.manual_seed(100 + learn.rank)
valid = DataLoader(TensorDataset(x[:64], y[:64], idx[:64]), batch_size=32)
bn_learn = lrfind.Learner(bn, dl, valid, compute_loss=lambda m, b: F.cross_entropy(m(b[0]), b[1]),
                          progress=False)
bn_learn.fit(2, 1e-2)
bn_state = [b.tolist() for b in bn.buffers()] + [bn_learn.recorder.values[-1]["valid_loss"]]
try:  # loaders of other lengths would leave one process waiting for the other
    lrfind.Learner(torch.nn.Linear(8, 2), DataLoader(TensorDataset(x[:32 * (1 + learn.rank)],
                   y[:32 * (1 + learn.rank)]), batch_size=8), loss_func=F.cross_entropy)
    uneven = "accepted"
except ValueError as e:
    uneven = str(e)
json.dump({"sugg": res.suggestions, "n": len(res.lrs), "w": w, "seen": fit_seen,
           "losses": learn.recorder.losses, "frozen_kept": frozen_kept, "tuned": tuned,
           "own_kept": own_kept, "resumed_exact": resumed_exact, "bn": bn_state,
           "uneven": uneven},
          open(os.path.join(sys.argv[1], "rank%d.json" % learn.rank), "w"))
"""


@pytest.mark.slow
def test_two_processes_on_cpu(tmp_path):
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           str(script), str(tmp_path)], env=env, capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{i}.json").read_text()) for i in (0, 1))
    assert r0["sugg"] == r1["sugg"] and r0["n"] == r1["n"]
    assert r0["w"] == r1["w"]
    assert r0["losses"] == r1["losses"]  # averaged across processes
    # each process saw half of the data every epoch, and the halves do not overlap
    assert len(r0["seen"]) == len(r1["seen"]) == 256
    for epoch in (r0["seen"][:128], r1["seen"][:128]), (r0["seen"][128:], r1["seen"][128:]):
        assert set(epoch[0]).isdisjoint(epoch[1])
        assert set(epoch[0]) | set(epoch[1]) == set(range(256))
    # a new shuffle each epoch (set_epoch)
    assert r0["seen"][:128] != r0["seen"][128:] and r1["seen"][:128] != r1["seen"][128:]
    assert r0["frozen_kept"] and r1["frozen_kept"]  # freeze under DDP, then fine_tune
    assert r0["tuned"] == r1["tuned"] and r0["tuned"] != r0["w"]
    assert r0["own_kept"] and r1["own_kept"]  # standalone lr_find: each its own weights back
    assert r0["resumed_exact"] and r1["resumed_exact"]  # each process resumes its own RNGs
    assert r0["bn"] == r1["bn"]  # the same statistics, so the same validation everywhere
    assert r0["uneven"] == r1["uneven"] == ("train_dl has [2, 4] batches in processes 0..1: "
                                            "every process needs the same number, or they "
                                            "wait on each other")


def test_a_loader_with_its_own_sampler_is_not_resharded_silently():
    from torch.utils.data import (
        BatchSampler,
        DataLoader,
        RandomSampler,
        SequentialSampler,
        TensorDataset,
        WeightedRandomSampler,
    )

    from lrfind.distributed import distributed_loader

    ds = TensorDataset(torch.zeros(8, 2))
    weighted = DataLoader(ds, batch_size=2, sampler=WeightedRandomSampler([1.0] * 8, 8))
    with pytest.raises(ValueError, match=r"^train_dl has its own WeightedRandomSampler settings, "
                                         r"which sharding for 2 processes would replace"):
        distributed_loader(weighted, 2, 0)
    drawn = DataLoader(ds, batch_size=2, sampler=RandomSampler(ds, replacement=True))
    with pytest.raises(ValueError, match=r"^train_dl has its own RandomSampler settings"):
        distributed_loader(drawn, 2, 0)
    batches = DataLoader(ds, batch_sampler=BatchSampler(SequentialSampler(ds), 2, False))
    with pytest.raises(ValueError, match=r"^train_dl has its own batch_sampler"):
        distributed_loader(batches, 2, 0)


def test_sharding_keeps_the_loaders_order_and_a_distributed_sampler(monkeypatch):
    from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

    from lrfind.distributed import distributed_loader

    monkeypatch.setattr(torch.distributed, "broadcast_object_list", lambda objs, src: None)
    ds = TensorDataset(torch.arange(8))
    ordered = distributed_loader(DataLoader(ds, batch_size=2), 2, 0)
    assert [b[0].tolist() for b in ordered] == [[0, 2], [4, 6]]  # rank 0's share, in order
    assert distributed_loader(DataLoader(ds, batch_size=2, shuffle=True), 2, 0).sampler.shuffle
    own = DataLoader(ds, batch_size=2, sampler=DistributedSampler(ds, num_replicas=2, rank=0))
    assert distributed_loader(own, 2, 0) is own
