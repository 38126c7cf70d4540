"""The Learner: training, schedules applied per optimizer step, callbacks, state, bad inputs."""

import collections
import copy
import functools
import math
import os
import subprocess
import sys
import time
import types
import warnings
from itertools import pairwise

import matplotlib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import same
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from lrfind import (
    Callback,
    CancelBatchException,
    CancelEpochException,
    CancelFitException,
    CancelStepException,
    Checkpoint,
    EarlyStopping,
    Learner,
    ParamScheduler,
    Recorder,
    SaveBest,
    TorchScheduler,
    accuracy,
    error_rate,
    schedules,
)
from lrfind.learner import resolve_lrs
from lrfind.metrics import metric_name
from lrfind.utils import map_nested

matplotlib.use("Agg")
# the range tests here sweep a few steps over curves too short to read: the warning that
# says so is checked in test_finder.py
pytestmark = pytest.mark.filterwarnings("ignore:lr_find. the smoothed loss falls by only")

# ---- helpers ---------------------------------------------------------------------------------


W = torch.tensor([[1.5], [-2.0], [0.7], [1.0]])  # one task for every set


def data(n=64, d=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    y = x @ W[:d] + 0.1 * torch.randn(n, 1, generator=g)
    return x, y


def loader(n=64, bs=16, seed=0, shuffle=False):
    return DataLoader(TensorDataset(*data(n, seed=seed)), batch_size=bs, shuffle=shuffle)


def two_layer():
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))


def split2(m):
    return [list(m[0].parameters()), list(m[2].parameters())]


def make(model=None, train=None, valid="default", **kw):
    torch.manual_seed(0)
    model = nn.Linear(4, 1) if model is None else model
    kw.setdefault("loss_func", F.mse_loss)
    kw.setdefault("progress", False)
    valid = loader(32, seed=1) if valid == "default" else valid
    return Learner(model, loader() if train is None else train, valid, **kw)


class SpySGD(torch.optim.SGD):
    """SGD that records every group's hyper-parameters at each step, as the step sees them."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen = []

    def step(self, closure=None):
        self.seen.append([dict(lr=g["lr"], mom=g["momentum"]) for g in self.param_groups])
        return super().step(closure)


class SpyAdam(torch.optim.Adam):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen = []

    def step(self, closure=None):
        self.seen.append([dict(lr=g["lr"], betas=tuple(g["betas"])) for g in self.param_groups])
        return super().step(closure)


def sgd_mom(params, lr=1e-3):
    return SpySGD(params, lr=lr, momentum=0.9)


def snapshot(learn):
    return copy.deepcopy(learn.model.state_dict()), copy.deepcopy(learn.opt.state_dict())


class LogAll(Callback):
    """Logs every event name, in the order the learner fires them."""

    def __init__(self, log=None, tag=None, order=0):
        self.log, self.tag, self.order = ([] if log is None else log), tag, order

    def _add(self, name):
        self.log.append(name if self.tag is None else (self.tag, name))

    def before_fit(self, learn): self._add("before_fit")
    def before_epoch(self, learn): self._add("before_epoch")
    def before_train(self, learn): self._add("before_train")
    def before_batch(self, learn): self._add("before_batch")
    def after_loss(self, learn): self._add("after_loss")
    def before_step(self, learn): self._add("before_step")
    def after_step(self, learn): self._add("after_step")
    def after_batch(self, learn): self._add("after_batch")
    def after_train(self, learn): self._add("after_train")
    def before_validate(self, learn): self._add("before_validate")
    def after_validate(self, learn): self._add("after_validate")
    def after_epoch(self, learn): self._add("after_epoch")
    def after_fit(self, learn): self._add("after_fit")


# ---- training --------------------------------------------------------------------------------


def test_training_lowers_the_valid_loss():
    learn = make(opt_func=sgd_mom)
    before = learn.validate()["valid_loss"]
    learn.fit_one_cycle(5, 0.02)
    after = learn.validate()["valid_loss"]
    assert after < 0.2 * before
    assert [r["epoch"] for r in learn.recorder.values] == list(range(5))
    assert learn.recorder.values[-1]["valid_loss"] == pytest.approx(after)
    assert {"epoch", "train_loss", "valid_loss", "time"} <= set(learn.recorder.values[0])


@pytest.mark.parametrize("opt", ["sgd", "adam"])
def test_one_cycle_trace_equals_the_schedule_at_every_step(opt):
    opt_func = sgd_mom if opt == "sgd" else (lambda p, lr=1e-3: SpyAdam(p, lr=lr,
                                                                       betas=(0.9, 0.99)))
    learn = make(opt_func=opt_func)
    lr_max, n_epoch = 0.05, 3
    learn.fit_one_cycle(n_epoch, lr_max)
    n = n_epoch * 4  # 64 samples, batches of 16
    f, m = schedules.one_cycle(lr_max), schedules.one_cycle_moms((0.95, 0.85, 0.95))
    seen = [s[0] for s in learn.opt.seen]
    assert len(seen) == len(learn.recorder.lrs) == len(learn.recorder.moms) == n
    for i, s in enumerate(seen):
        pos = i / (n - 1)
        assert s["lr"] == f(pos) == learn.recorder.lrs[i]
        mom = s["mom"] if opt == "sgd" else s["betas"][0]
        assert mom == m(pos) == learn.recorder.moms[i]
        if opt == "adam":
            assert s["betas"][1] == 0.99  # betas[1] is kept
    assert seen[0]["lr"] == lr_max / 25  # first step: exactly lr_max/div
    assert seen[-1]["lr"] == lr_max / 1e5  # last step: exactly lr_max/div_final
    assert max(s["lr"] for s in seen) <= lr_max


def test_one_cycle_custom_div_and_pct_start_endpoints():
    learn = make(opt_func=sgd_mom)
    learn.fit_one_cycle(2, 0.3, div=7.0, div_final=300.0, pct_start=0.4, moms=(0.9, 0.8, 0.7))
    seen = [s[0] for s in learn.opt.seen]
    assert seen[0]["lr"] == 0.3 / 7.0
    assert seen[-1]["lr"] == 0.3 / 300.0
    assert (seen[0]["mom"], seen[-1]["mom"]) == (0.9, 0.7)
    n = len(seen)  # every step on the curve, the peak at pct_start of the way
    expected = [schedules.one_cycle(0.3, 7.0, 300.0, 0.4)(i / (n - 1)) for i in range(n)]
    assert [s["lr"] for s in seen] == pytest.approx(expected, rel=1e-12)


class ThreeBetas(torch.optim.Optimizer):
    """An optimizer with three betas (as Adan has) that records them at every step; steps as
    plain SGD."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.92, 0.99)):
        super().__init__(params, {"lr": lr, "betas": betas})
        self.seen = []

    @torch.no_grad()
    def step(self, closure=None):
        self.seen.append(tuple(self.param_groups[0]["betas"]))
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is not None:
                    p.add_(p.grad, alpha=-g["lr"])


def test_one_cycle_schedules_the_first_of_three_betas_and_keeps_the_others():
    learn = make(opt_func=ThreeBetas)
    learn.fit_one_cycle(3, 0.05)
    seen, n = learn.opt.seen, len(learn.opt.seen)
    m = schedules.one_cycle_moms((0.95, 0.85, 0.95))
    assert n == 12
    assert [b[0] for b in seen] == [m(i / (n - 1)) for i in range(n)] == learn.recorder.moms
    assert all(b[1:] == (0.92, 0.99) for b in seen)
    assert learn.opt.param_groups[0]["betas"][1:] == (0.92, 0.99)


def test_warmup_cosine_follows_its_schedule_at_every_step():
    learn = make(opt_func=sgd_mom)
    learn.fit_warmup_cosine(2, 0.3, warmup_pct=0.25, div=10.0, div_final=100.0)
    seen = [s[0]["lr"] for s in learn.opt.seen]
    n = len(seen)
    f = schedules.warmup_cosine(0.3, 0.25, 10.0, 100.0)
    assert seen == pytest.approx([f(i / (n - 1)) for i in range(n)], rel=1e-12)
    assert (seen[0], seen[-1]) == pytest.approx((0.03, 0.003), rel=1e-12)


def test_error_rate_is_one_minus_accuracy():
    preds = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]])
    targets = torch.tensor([0, 1, 1, 1])
    assert error_rate(preds, targets).item() == pytest.approx(0.25)


def test_resolve_lrs():
    assert resolve_lrs(0.1, 3) == [0.1, 0.1, 0.1]
    assert resolve_lrs(slice(1e-3), 3) == pytest.approx([1e-4, 1e-4, 1e-3], rel=1e-12)
    assert resolve_lrs(slice(1e-4, 1e-2), 3) == pytest.approx([1e-4, 1e-3, 1e-2], rel=1e-12)
    assert resolve_lrs(slice(1e-4, 1e-2), 3)[-1] == 1e-2
    assert resolve_lrs(slice(1e-4, 1e-2), 1) == [1e-2]  # a single group gets hi
    assert resolve_lrs([0.1, 0.2], 2) == [0.1, 0.2]
    with pytest.raises(ValueError, match="slice takes no step"):
        resolve_lrs(slice(1e-4, 1e-2, 2), 2)


@pytest.mark.parametrize(("lr", "expected"), [(slice(1e-3, 1e-1), [1e-3, 1e-1]),
                                              (slice(1e-2), [1e-3, 1e-2]),
                                              ([2e-3, 5e-2], [2e-3, 5e-2])])
def test_discriminative_lrs_over_two_groups(lr, expected):
    learn = make(two_layer(), opt_func=sgd_mom, splitter=split2)
    assert len(learn.opt.param_groups) == 2
    learn.fit_one_cycle(1, lr)
    n = len(learn.opt.seen)
    for i, groups in enumerate(learn.opt.seen):
        for g, hi in zip(groups, expected, strict=True):
            assert g["lr"] == pytest.approx(schedules.one_cycle(hi)(i / (n - 1)), rel=1e-12)
    learn.opt.seen.clear()
    learn.fit(1, lr=lr)  # constant per-group LRs
    for groups in learn.opt.seen:
        assert [g["lr"] for g in groups] == pytest.approx(expected, rel=1e-12)
    assert learn.recorder.lrs == pytest.approx([expected[-1]] * n, rel=1e-12)  # the last group


def test_per_group_list_of_wrong_length_raises():
    learn = make(two_layer(), splitter=split2)
    with pytest.raises(ValueError, match=r"^lr needs one value per parameter group \(2\), got 3"):
        learn.fit(1, lr=[0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match=r"^lr_max needs one value per parameter group \(2\)"):
        learn.fit_one_cycle(1, lr_max=[0.1])
    with pytest.raises(ValueError, match=r"^lr needs one value per parameter group \(2\)"):
        Learner(two_layer(), loader(), loss_func=F.mse_loss, splitter=split2, lr=[0.1])


def test_fit_sets_lr_once_and_a_callback_change_is_kept():
    class Halve(Callback):
        def before_epoch(self, learn):
            if learn.epoch == 1:
                learn.opt.param_groups[0]["lr"] = 0.01

    learn = make(opt_func=sgd_mom)
    learn.fit(3, lr=0.1, cbs=[Halve()])
    lrs = [s[0]["lr"] for s in learn.opt.seen]
    assert lrs == [0.1] * 4 + [0.01] * 8
    assert learn.recorder.lrs == lrs
    learn.opt.seen.clear()
    learn.fit(1)  # no lr given: the learner's lr
    assert [s[0]["lr"] for s in learn.opt.seen] == [1e-3] * 4


def test_smooth_losses_are_the_debiased_ema_of_the_losses():
    learn = make()
    learn.fit(3, lr=0.05)
    losses = learn.recorder.losses
    avg, expected = 0.0, []
    for k, v in enumerate(losses, start=1):
        avg = 0.98 * avg + 0.02 * v
        expected.append(avg / (1 - 0.98**k))
    assert len(losses) == 12 and expected[0] == pytest.approx(losses[0], rel=1e-12)
    assert learn.recorder.smooth_losses == pytest.approx(expected, rel=1e-12)
    for epoch, row in enumerate(learn.recorder.values):  # the mean of that epoch's steps
        assert row["train_loss"] == pytest.approx(np.mean(losses[4 * epoch:4 * epoch + 4]),
                                                  rel=1e-12)


def test_wd_is_written_into_every_parameter_group():
    def wds(learn):
        return [g["weight_decay"] for g in learn.opt.param_groups]

    assert wds(make(two_layer(), splitter=split2)) == [0.01, 0.01]  # AdamW's own
    learn = make(two_layer(), splitter=split2, wd=0.1)
    assert wds(learn) == [0.1, 0.1]
    learn.fit(1, wd=0.2)
    assert wds(learn) == [0.2, 0.2]
    learn.fit_one_cycle(1)  # no wd: left as it is
    assert wds(learn) == [0.2, 0.2]
    learn.fit(1, wd=0)
    assert wds(learn) == [0.0, 0.0]


# ---- torch schedulers ------------------------------------------------------------------------


def test_torch_steplr_per_epoch():
    learn = make(opt_func=sgd_mom)
    learn.fit(3, lr=0.1, cbs=[TorchScheduler(torch.optim.lr_scheduler.StepLR, step_size=1,
                                             gamma=0.5)])
    lrs = [s[0]["lr"] for s in learn.opt.seen]
    assert lrs == pytest.approx([0.1] * 4 + [0.05] * 4 + [0.025] * 4, rel=1e-12)
    assert learn.recorder.lrs == lrs  # the recorder logs the LR each step used


def test_torch_steplr_per_batch_recorder_logs_the_lr_the_step_used():
    learn = make(opt_func=sgd_mom)
    learn.fit(1, lr=0.1, cbs=[TorchScheduler(torch.optim.lr_scheduler.StepLR, step_size=1,
                                             gamma=0.5, interval="batch")])
    lrs = [s[0]["lr"] for s in learn.opt.seen]
    assert lrs == pytest.approx([0.1, 0.05, 0.025, 0.0125], rel=1e-12)
    assert learn.recorder.lrs == lrs


def test_a_torch_scheduler_starts_from_its_fits_lr_after_an_earlier_scheduler():
    learn = make()
    for lr in (0.1, 0.01):  # the first fit's scheduler left initial_lr=0.1 in the groups
        learn.fit(2, lr=lr, cbs=[TorchScheduler(torch.optim.lr_scheduler.LambdaLR,
                                                lambda epoch: 0.5**epoch)])
    assert learn.recorder.lrs == pytest.approx([0.01] * 4 + [0.005] * 4, rel=1e-12)


class SpyPlateau(torch.optim.lr_scheduler.ReduceLROnPlateau):
    fed = []

    def step(self, metrics):
        SpyPlateau.fed.append(float(metrics))
        return super().step(metrics)


class NoStep(Callback):
    def before_step(self, learn):
        raise CancelStepException  # training never changes anything: the loss stalls


def test_reduce_lr_on_plateau_fed_this_epochs_valid_loss():
    SpyPlateau.fed = []
    learn = make(opt_func=sgd_mom)
    epoch_lrs = []

    class EpochLR(Callback):
        def before_epoch(self, learn):
            epoch_lrs.append(learn.opt.param_groups[0]["lr"])

    learn.fit(4, lr=0.1, cbs=[NoStep(), EpochLR(),
                              TorchScheduler(SpyPlateau, factor=0.5, patience=0)])
    valid = [r["valid_loss"] for r in learn.recorder.values]
    assert SpyPlateau.fed == valid  # each epoch's own valid loss, in order
    assert len(set(valid)) == 1  # stalled
    assert epoch_lrs == pytest.approx([0.1, 0.1, 0.05, 0.025], rel=1e-12)
    assert learn.opt.param_groups[0]["lr"] == pytest.approx(0.0125, rel=1e-12)


def test_reduce_lr_on_plateau_keeps_lr_while_improving_and_monitor_train_loss():
    SpyPlateau.fed = []
    learn = make(opt_func=sgd_mom)
    learn.fit(3, lr=0.02, cbs=[TorchScheduler(SpyPlateau, monitor="train_loss", patience=0)])
    assert SpyPlateau.fed == [r["train_loss"] for r in learn.recorder.values]
    assert SpyPlateau.fed[2] < SpyPlateau.fed[1] < SpyPlateau.fed[0]
    assert learn.opt.param_groups[0]["lr"] == 0.02


def test_reduce_lr_on_plateau_per_batch_is_refused_up_front():
    with pytest.raises(ValueError, match="interval must be 'epoch' for ReduceLROnPlateau"):
        TorchScheduler(torch.optim.lr_scheduler.ReduceLROnPlateau, interval="batch")
    with pytest.raises(ValueError, match="^interval must be 'epoch' or 'batch', got 'step'"):
        TorchScheduler(torch.optim.lr_scheduler.StepLR, step_size=1, interval="step")


@pytest.mark.parametrize(("scheds", "exc", "match"), [
    ([("lr", schedules.constant(0.1))], TypeError, r"^scheds must be a dict of schedules"),
    ({"wd": schedules.constant(0.1)}, ValueError, r"^scheds keys must be 'lr' or 'mom', got 'wd'"),
    ({"lr": 0.1}, TypeError, r"^scheds\['lr'\] must be a schedule f\(pos\) -> value or one per "
                             r"parameter group, got 0.1"),
    ({"mom": []}, TypeError, r"^scheds\['mom'\] must be a schedule"),
    ({"lr": [schedules.constant(0.1), "x"]}, TypeError, r"^scheds\['lr'\] must be a schedule"),
])
def test_param_scheduler_refuses_bad_scheds_when_built(scheds, exc, match):
    with pytest.raises(exc, match=match):
        ParamScheduler(scheds)


@pytest.mark.parametrize(("t0", "t_mult"), [(2, 1), (1, 2)])
def test_cosine_warm_restarts_per_batch_matches_closed_form(t0, t_mult):
    base, eta_min, spe = 0.1, 1e-3, 4
    learn = make(opt_func=sgd_mom)
    learn.fit(5, lr=base, cbs=[TorchScheduler(
        torch.optim.lr_scheduler.CosineAnnealingWarmRestarts, T_0=t0, T_mult=t_mult,
        eta_min=eta_min, interval="batch")])
    lrs = [s[0]["lr"] for s in learn.opt.seen]
    assert len(lrs) == 20
    for k, lr in enumerate(lrs):
        epoch = k / spe  # step k runs at fractional epoch k / steps_per_epoch
        if t_mult == 1:
            t_cur, t_i = epoch % t0, t0
        else:
            n = int(math.log(epoch / t0 * (t_mult - 1) + 1, t_mult))
            t_cur, t_i = epoch - t0 * (t_mult**n - 1) / (t_mult - 1), t0 * t_mult**n
        expected = eta_min + (base - eta_min) * (1 + math.cos(math.pi * t_cur / t_i)) / 2
        assert lr == pytest.approx(expected, rel=1e-9), k
    assert learn.recorder.lrs == lrs
    assert lrs[0] == base
    assert lrs[t0 * spe] == pytest.approx(base, rel=1e-12)  # the first restart


# ---- callbacks -------------------------------------------------------------------------------


def test_events_fire_in_the_documented_order():
    log = LogAll()
    learn = make(cbs=[log])
    learn.fit(2)
    batch = ["before_batch", "after_loss", "before_step", "after_step", "after_batch"]
    epoch = (["before_epoch", "before_train"] + batch * 4
             + ["after_train", "before_validate", "after_validate", "after_epoch"])
    assert log.log == ["before_fit"] + epoch * 2 + ["after_fit"]


def test_events_with_accumulation_and_no_validation():
    log = LogAll()
    learn = make(cbs=[log], valid=None, accum_steps=2)
    learn.fit(1, cbs=None)
    b = ["before_batch", "after_loss", "after_batch"]
    s = ["before_batch", "after_loss", "before_step", "after_step", "after_batch"]
    assert log.log == (["before_fit", "before_epoch", "before_train"] + (b + s) * 2
                       + ["after_train", "after_epoch", "after_fit"])


def test_callbacks_run_in_ascending_order():
    log = []
    seen_lrs = {}

    class Peek(LogAll):
        def after_step(self, learn):
            super().after_step(learn)
            seen_lrs.setdefault(self.tag, len(learn.recorder.lrs))

    cbs = [Peek(log, "late", order=70), Peek(log, "early", order=-5), Peek(log, "mid", order=30)]
    learn = make(cbs=cbs[:1])
    learn.fit(1, cbs=cbs[1:])  # fit-only callbacks are merged and sorted with the learner's
    assert [t for t, e in log if e == "before_fit"] == ["early", "mid", "late"]
    assert seen_lrs == {"early": 0, "mid": 0, "late": 1}  # the Recorder (order 50) in between
    log.clear()
    learn.fit(1)
    assert {t for t, _ in log} == {"late"}  # fit-only callbacks are gone afterwards


def test_cancel_batch():
    class Skip(Callback):
        def before_batch(self, learn):
            if learn.iter == 1:
                raise CancelBatchException

    log = LogAll()
    learn = make(cbs=[Skip(), log])
    learn.fit(1)
    assert log.log.count("after_loss") == 3
    assert log.log.count("after_step") == 3
    assert log.log.count("after_batch") == 3
    assert len(learn.recorder.lrs) == 3
    assert "after_validate" in log.log


def test_cancel_epoch():
    class Stop(Callback):
        def after_batch(self, learn):
            if learn.iter == 1:
                raise CancelEpochException

    log = LogAll()
    learn = make(cbs=[Stop(), log])
    learn.fit(2)
    assert log.log.count("after_step") == 4  # two steps in each epoch
    assert log.log.count("after_epoch") == 2
    assert "before_validate" not in log.log and "after_train" not in log.log
    assert len(learn.recorder.values) == 2


def test_cancel_epoch_in_before_epoch_before_the_recorder():
    class Early(Callback):
        order = -1

        def before_epoch(self, learn):
            if learn.epoch == 0:
                raise CancelEpochException

    learn = make(cbs=[Early()])
    learn.fit(2)
    assert len(learn.recorder.values) == 2
    assert math.isnan(learn.recorder.values[0]["train_loss"])  # nothing trained in epoch 0
    assert learn.recorder.values[1]["train_loss"] == pytest.approx(
        sum(learn.recorder.losses) / 4)


def test_cancel_fit():
    class Stop(Callback):
        order = 100  # after the recorder and the log

        def after_step(self, learn):
            if learn.train_iter == 2:
                raise CancelFitException

    log = LogAll()
    learn = make(cbs=[Stop(), log])
    learn.fit(3)  # does not raise
    assert log.log.count("after_step") == 3
    assert log.log[-1] == "after_fit"
    assert "after_epoch" not in log.log
    assert len(learn.recorder.lrs) == 3  # the recorder still ran after the third step


def test_cancel_step_leaves_weights_and_schedule_alone():
    learn = make(opt_func=sgd_mom)
    w = copy.deepcopy(learn.model.state_dict())
    log = LogAll()
    learn.fit(1, cbs=[NoStep(), log])
    assert same(w, learn.model.state_dict())
    assert learn.train_iter == 0 and log.log.count("after_step") == 0
    assert learn.opt.seen == []
    assert all(p.grad is None for p in learn.model.parameters())  # gradients were cleared


def test_errors_propagate_and_after_fit_still_runs():
    class Boom(Callback):
        def after_loss(self, learn):
            raise RuntimeError("boom")

    log = LogAll()
    learn = make(cbs=[Boom(), log], progress=True)
    with pytest.raises(RuntimeError, match="boom"):
        learn.fit(1)
    assert log.log[-1] == "after_fit"
    assert isinstance(learn.fit_error, RuntimeError)


def test_optimizer_without_momentum_warns_once_and_trains():
    learn = make(opt_func=torch.optim.Adagrad)
    g = learn.opt.param_groups[0]
    assert "momentum" not in g and "betas" not in g
    before = learn.validate()["valid_loss"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        learn.fit_one_cycle(3, 0.3)
    mine = [w for w in caught if "momentum" in str(w.message)]
    assert [str(w.message) for w in mine] == [
        "Adagrad has neither 'momentum' nor 'betas': momentum is not scheduled"]
    assert mine[0].filename == __file__  # the user's fit_one_cycle line, not lrfind's code
    assert learn.validate()["valid_loss"] < before
    assert learn.recorder.moms == [None] * 12
    assert learn.recorder.lrs[-1] == 0.3 / 1e5


def test_rmsprop_without_momentum_then_one_cycle_trains():
    # RMSprop makes no momentum buffer when momentum is 0 at its first step
    learn = make(opt_func=functools.partial(torch.optim.RMSprop, momentum=0.0))
    learn.fit(1, 1e-3)
    assert all("momentum_buffer" not in s for s in learn.opt.state.values())
    before = learn.validate()["valid_loss"]
    learn.fit_one_cycle(2, 1e-2)
    assert learn.validate()["valid_loss"] < before
    assert all("momentum_buffer" in s for s in learn.opt.state.values())


def test_wd_on_optimizer_without_weight_decay_refused():
    with pytest.raises(ValueError, match=r"wd=0.1, but Rprop has no weight decay"):
        make(opt_func=torch.optim.Rprop, wd=0.1)
    learn = make(opt_func=torch.optim.Rprop)
    before = copy.deepcopy(learn.opt.state_dict())
    with pytest.raises(ValueError, match=r"wd=0.1, but Rprop has no weight decay"):
        learn.fit_one_cycle(1, wd=0.1)
    assert same(learn.opt.state_dict(), before)


def test_optimizer_that_needs_a_closure_refused():
    with pytest.raises(TypeError, match="opt_func: LBFGS needs a closure"):
        make(opt_func=torch.optim.LBFGS)


def test_rprop_range_test_warns():
    learn = make(opt_func=torch.optim.Rprop)
    with pytest.warns(UserWarning, match="Rprop takes lr only as each weight's first step") as w:
        learn.lr_find(num_it=10, show_plot=False)
    assert w[0].filename == __file__


def test_tensor_lr_stays_the_users_tensor():
    lr = torch.tensor(1e-3)
    learn = make(opt_func=functools.partial(torch.optim.Adam, lr=lr), lr=None)
    assert learn.lr == [lr.item()] and learn.opt.param_groups[0]["lr"] is lr
    learn.lr_find(num_it=10, show_plot=False)
    assert learn.opt.param_groups[0]["lr"] is lr and lr.item() == pytest.approx(1e-3)
    learn.fit_one_cycle(1)  # lr_max from the learner's lr, 1e-3
    assert learn.opt.param_groups[0]["lr"] is lr
    assert lr.item() == pytest.approx(learn.recorder.lrs[-1]) and lr.item() < 1e-7


def test_recorder_keeps_each_step_value_of_a_tensor_lr():
    lr = torch.tensor(1e-3)
    learn = make(opt_func=functools.partial(torch.optim.Adam, lr=lr), lr=None)
    learn.fit_one_cycle(1)
    lrs = learn.recorder.lrs
    assert all(type(v) is float for v in lrs)
    assert lrs[0] == pytest.approx(1e-3 / 25) and lrs[-1] == pytest.approx(lr.item())

# ---- batches ---------------------------------------------------------------------------------


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 1), nn.Linear(2, 1)
        self.calls = 0

    def forward(self, x1, x2):
        self.calls += 1
        return self.a(x1) + self.b(x2)


def test_multi_input_batches_call_model_with_all_inputs():
    x, y = data()
    x2 = torch.randn(64, 2, generator=torch.Generator().manual_seed(3))
    dl = DataLoader(TensorDataset(x, x2, y), batch_size=16)
    model = TwoInputs()
    learn = make(model, train=dl, valid=dl)
    before = learn.validate()["valid_loss"]
    learn.fit(2, lr=0.05)
    assert model.calls == 2 * 4 + 2 * 4 + 4  # train + valid per epoch, and the first validate
    assert learn.validate()["valid_loss"] < before
    preds, targets = learn.get_preds()
    assert preds.shape == (64, 1) and torch.equal(targets, y)


class DictData(Dataset):
    def __init__(self):
        self.x, self.y = data()

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"inputs": self.x[i], "target": self.y[i]}


def dict_loss(model, batch):
    return F.mse_loss(model(batch["inputs"]), batch["target"])


def test_dict_batches_via_compute_loss():
    dl = DataLoader(DictData(), batch_size=16)
    learn = make(train=dl, valid=dl, loss_func=None, compute_loss=dict_loss)
    before = learn.validate()["valid_loss"]
    learn.fit(3, lr=0.3)
    after = learn.validate()["valid_loss"]
    assert after < 0.5 * before
    with torch.no_grad():
        full = dict_loss(learn.model, {"inputs": DictData().x, "target": DictData().y})
    assert after == pytest.approx(full.item(), rel=1e-5)
    with pytest.raises(ValueError, match="metrics need"):
        make(train=dl, loss_func=None, compute_loss=dict_loss, metrics=[lambda p, t: 0.0])
    with pytest.raises(TypeError, match="pass compute_loss for other batches"):
        make(train=dl, valid=None).fit(1)


def test_dict_batches_with_a_text_field_first_and_a_defaultdict_collate():
    """validate weighs each batch by its size, found past the text field."""
    x, y = data()

    def collate(rows):
        out = collections.defaultdict(list)
        out["id"] = [f"row{i}" for i, _, _ in rows]
        out["inputs"] = torch.stack([r[1] for r in rows])
        out["target"] = torch.stack([r[2] for r in rows])
        return out

    dl = DataLoader([(i, x[i], y[i]) for i in range(64)], batch_size=24, collate_fn=collate)
    learn = make(train=dl, valid=dl, loss_func=None, compute_loss=dict_loss)
    learn.fit(1, lr=0.1)  # a defaultdict batch moves to the device like a dict
    with torch.no_grad():
        full = dict_loss(learn.model, {"inputs": x, "target": y})
    assert learn.validate()["valid_loss"] == pytest.approx(full.item(), rel=1e-5)


def test_map_nested_keeps_each_containers_type():
    class Encoding(collections.UserDict):  # like a tokenizer's batch: a mapping with fields
        def __init__(self, data, n):
            super().__init__(data)
            self.n = n

    Pair = collections.namedtuple("Pair", "a b")
    t = torch.ones(2)
    obj = [Encoding({"ids": t}, n=3), Pair(t, "s"), collections.defaultdict(int, k=t),
           types.MappingProxyType({"k": t}), (t,)]
    out = map_nested(obj, lambda v: v * 2)
    assert isinstance(out[0], Encoding) and out[0].n == 3 and out[0]["ids"].tolist() == [2, 2]
    assert isinstance(out[1], Pair) and out[1].b == "s" and out[1].a.tolist() == [2, 2]
    assert out[2].default_factory is int and out[2]["k"].tolist() == [2, 2]
    assert out[3] == {"k": out[3]["k"]} and out[3]["k"].tolist() == [2, 2]
    assert isinstance(out[4], tuple) and out[4][0].tolist() == [2, 2]
    assert obj[0]["ids"] is t  # the input is left as it was


def test_a_batch_whose_first_tensor_is_a_scalar_counts_as_one_sample():
    from lrfind.utils import batch_size

    assert batch_size({"n": torch.tensor(3), "x": torch.ones(5, 2)}) == 1
    assert batch_size(["name", torch.ones(5, 2)]) == 5  # past a non-tensor field


def mae(preds, targets):
    return (preds - targets).abs().mean()


def test_metrics_weighted_by_batch_size():
    valid = loader(10, bs=4, seed=5)  # batches of 4, 4 and 2
    learn = make(valid=valid, metrics=[mae])
    learn.fit(1, lr=0.05)
    res = learn.validate()
    x, y = data(10, seed=5)
    with torch.no_grad():
        pred = learn.model(x)
    assert res["valid_loss"] == pytest.approx(F.mse_loss(pred, y).item(), rel=1e-5)
    assert res["mae"] == pytest.approx((pred - y).abs().mean().item(), rel=1e-5)
    unweighted = sum(mae(learn.model(xb), yb).item() for xb, yb in valid) / 3
    assert abs(unweighted - res["mae"]) > 1e-4  # the test can tell the two apart
    assert learn.recorder.values[-1]["mae"] == pytest.approx(res["mae"], rel=1e-6)


def test_get_preds_in_eval_mode_and_modes_restored():
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 1))
    learn = make(model)
    model.train()
    preds, targets = learn.get_preds()
    x, y = data(32, seed=1)
    model.eval()
    with torch.no_grad():
        assert torch.allclose(preds, model(x))
    assert torch.equal(targets, y)
    model.train()
    learn.get_preds()
    assert model.training and model[1].training
    with pytest.raises(ValueError, match="no dl given"):
        make(valid=None).get_preds()


# ---- parameters ------------------------------------------------------------------------------


def split3(m):
    return [list(m[0].parameters()), list(m[2].parameters()), list(m[4].parameters())]


def three_layer():
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 1))


def flags(learn):
    return [[p.requires_grad for p in g] for g in split3(learn.model)]


def test_freeze_unfreeze_freeze_to():
    learn = make(three_layer(), splitter=split3)
    learn.freeze()
    assert flags(learn) == [[False, False], [False, False], [True, True]]
    w = copy.deepcopy(learn.model.state_dict())
    learn.fit(1, lr=0.05)
    after = learn.model.state_dict()
    assert torch.equal(w["0.weight"], after["0.weight"])
    assert torch.equal(w["2.weight"], after["2.weight"])
    assert not torch.equal(w["4.weight"], after["4.weight"])
    learn.freeze_to(1)
    assert flags(learn) == [[False, False], [True, True], [True, True]]
    learn.freeze_to(-2)
    assert flags(learn) == [[False, False], [True, True], [True, True]]
    learn.unfreeze()
    assert flags(learn) == [[True, True]] * 3
    with pytest.raises(TypeError, match="^n must be an int"):
        learn.freeze_to(1.0)


def bn_net():
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.LayerNorm(8), nn.GroupNorm(2, 8),
                         nn.Linear(8, 1))


def split_bn(m):
    return [list(m[:4].parameters()), list(m[4].parameters())]


@pytest.mark.parametrize("train_bn", [True, False])
def test_freeze_keeps_norm_layers_trainable_with_train_bn(train_bn):
    learn = make(bn_net(), splitter=split_bn, train_bn=train_bn)
    learn.freeze()
    m = learn.model
    assert not m[0].weight.requires_grad and not m[0].bias.requires_grad
    norms = [p for layer in m[1:4] for p in layer.parameters()]
    assert len(norms) == 6
    assert all(p.requires_grad == train_bn for p in norms)
    w = copy.deepcopy(m.state_dict())
    learn.fit(1, lr=0.05)
    assert torch.equal(w["0.weight"], m.state_dict()["0.weight"])
    assert torch.equal(w["1.weight"], m.state_dict()["1.weight"]) != train_bn
    assert torch.equal(w["2.bias"], m.state_dict()["2.bias"]) != train_bn
    assert torch.equal(w["3.weight"], m.state_dict()["3.weight"]) != train_bn
    learn.unfreeze()
    assert all(p.requires_grad for p in m.parameters())


def test_train_bn_must_be_bool():
    with pytest.raises(TypeError, match="^train_bn must be a bool, got 'yes'"):
        make(train_bn="yes")


def test_fine_tune_runs():
    learn = make(two_layer(), splitter=split2, opt_func=sgd_mom)
    w = copy.deepcopy(learn.model.state_dict())
    before = learn.validate()["valid_loss"]
    learn.fine_tune(2, base_lr=0.05, freeze_epochs=1)
    assert all(p.requires_grad for p in learn.model.parameters())
    assert all(not torch.equal(w[k], v) for k, v in learn.model.state_dict().items())
    assert learn.validate()["valid_loss"] < before
    # the last fit: slice(base_lr/2/lr_mult, base_lr/2) peaks, div=5
    seen = learn.opt.seen[-8:]
    assert [g["lr"] for g in seen[0]] == pytest.approx([0.025 / 100 / 5, 0.025 / 5], rel=1e-12)
    # the frozen phase: 4 steps where the first group was frozen
    assert len(learn.opt.seen) == 4 + 8
    f = schedules.one_cycle(0.05, pct_start=0.99)  # the frozen phase's last group
    assert [g[-1]["lr"] for g in learn.opt.seen[:4]] == pytest.approx(
        [f(i / 3) for i in range(4)], rel=1e-12)
    frozen, first = make(two_layer(), splitter=split2, opt_func=sgd_mom), []

    class FirstGroup(Callback):
        def before_fit(self, learn):
            first.append([p.detach().clone() for p in learn.model[0].parameters()])

    frozen.fine_tune(1, base_lr=0.05, freeze_epochs=1, cbs=[FirstGroup()])
    assert same(first[0], first[1])  # the frozen phase left the first group alone


def test_fine_tune_passes_wd_and_callbacks_to_both_fits():
    fits = []

    class Count(Callback):
        def before_fit(self, learn):
            fits.append([g["weight_decay"] for g in learn.opt.param_groups])

    learn = make(two_layer(), splitter=split2, opt_func=sgd_mom)
    learn.fine_tune(1, wd=0.01, cbs=[Count()])
    assert fits == [[0.01, 0.01], [0.01, 0.01]]
    w = copy.deepcopy(learn.model.state_dict())
    with pytest.raises(ValueError, match=r"^monitor must be one of"):
        learn.fine_tune(1, cbs=[EarlyStopping(monitor="accuracy")])
    assert all(p.requires_grad for p in learn.model.parameters())  # nothing frozen first
    assert same(w, learn.model.state_dict())


def test_save_load_round_trip_atomic(tmp_path):
    learn = make(opt_func=torch.optim.Adam)
    learn.fit(1, lr=0.01)
    path = tmp_path / "model.pt"
    learn.save(path)
    assert os.listdir(tmp_path) == ["model.pt"]  # no temp file left behind
    saved = snapshot(learn)
    learn.fit(1, lr=0.01)
    assert not same(saved[0], learn.model.state_dict())
    learn.load(path)
    assert same(saved[0], learn.model.state_dict())
    assert same(saved[1], learn.opt.state_dict())
    learn.save(path)  # overwrite in place
    assert os.listdir(tmp_path) == ["model.pt"]


def test_load_of_a_checkpoint_file_says_what_it_is(tmp_path):
    learn = make()
    path = tmp_path / "ckpt.pt"
    learn.fit(1, 0.01, cbs=[Checkpoint(path)])
    before = snapshot(learn)
    with pytest.raises(ValueError, match=r"is not a file written by Learner.save; a Checkpoint "
                                         r"file holds more than weights: resume from it with "
                                         r"resume_from="):
        learn.load(path)
    assert same(before, snapshot(learn))


def test_a_monitor_without_a_valid_dl_says_there_is_none():
    with pytest.raises(ValueError, match=r"^monitor must be one of \['train_loss'\], got "
                                         r"'valid_loss': the learner has no valid_dl$"):
        make(valid=None, cbs=[EarlyStopping()])


@pytest.mark.parametrize("plot", ["plot_loss", "plot_sched"])
def test_plots_before_any_training_say_so(plot):
    learn = make()
    learn.lr_find(num_it=10)  # a range test records nothing in the recorder's history
    with pytest.raises(ValueError, match=r"^no training recorded yet: call fit first"):
        getattr(learn.recorder, plot)()


def test_load_mismatched_model_raises_before_anything_changes(tmp_path):
    path = tmp_path / "m.pt"
    make().save(path)
    other = make(nn.Linear(5, 1), train=DataLoader(TensorDataset(torch.randn(8, 5),
                                                                 torch.randn(8, 1)),
                                                   batch_size=4), valid=None)
    before = snapshot(other)
    with pytest.raises(ValueError, match="checkpoint does not match the model"):
        other.load(path)
    assert same(before, snapshot(other))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        other.load(tmp_path / "nope.pt")


@pytest.mark.parametrize("beta", [1.0, -0.1, float("nan"), "0.9"])
def test_recorder_beta_must_lie_in_0_1(beta):
    with pytest.raises(ValueError, match=r"^beta must be"):
        Recorder(beta=beta)

# ---- bad inputs ------------------------------------------------------------------------------


def _trained():
    learn = make(two_layer(), splitter=split2, opt_func=torch.optim.Adam)
    learn.fit_one_cycle(1, 0.01)
    learn.opt.param_groups[0]["lr"] = 1.234e-3  # set by hand: a bad call must not reset it
    return learn


BAD_CALLS = [
    (lambda ln: ln.fit(1, lr=0.5, cbs=[ParamScheduler({"lr": [schedules.constant(0.1)] * 3})]),
     ValueError, r"^lr schedules: expected 2 \(one per parameter group\), got 3"),
    (lambda ln: ln.fit_one_cycle(1, 0.01, pct_start=0.0), ValueError, r"^pct_start must be in"),
    (lambda ln: ln.fit_one_cycle(1, 0.01, pct_start=1.0), ValueError, r"^pct_start must be in"),
    (lambda ln: ln.fit_one_cycle(1, 0.01, pct_start=-0.2), ValueError, r"^pct_start must be in"),
    (lambda ln: ln.fit_one_cycle(1, 0.01, div=0.0), ValueError, r"^div must be > 0"),
    (lambda ln: ln.fit_one_cycle(1, 0.01, div=-25.0), ValueError, r"^div must be > 0"),
    (lambda ln: ln.fit_one_cycle(1, 0.01, div_final=0), ValueError, r"^div_final must be > 0"),
    (lambda ln: ln.fit_one_cycle(1, 0.0), ValueError, r"^lr_max must be > 0"),
    (lambda ln: ln.fit_one_cycle(1, -0.1), ValueError, r"^lr_max must be > 0"),
    (lambda ln: ln.fit_one_cycle(1, slice(-1.0, 0.1)), ValueError, r"^lr_max must be > 0"),
    (lambda ln: ln.fit_one_cycle(1, [0.1, 0.1, 0.1]), ValueError, r"^lr_max needs one value"),
    (lambda ln: ln.fit_one_cycle(1, "fast"), ValueError, r"'auto', got 'fast'"),
    (lambda ln: ln.fit(1, lr=0.0), ValueError, r"^lr must be > 0"),
    (lambda ln: ln.fit(1, lr=[0.1]), ValueError, r"^lr needs one value per parameter group"),
    (lambda ln: ln.fit(1, lr=0.1, wd=-1.0), ValueError, r"^wd must be >= 0"),
    (lambda ln: ln.fit_one_cycle(1, 0.01, moms=(0.9, 0.8)), ValueError,
     r"^moms must be a sequence of three values"),
    (lambda ln: ln.fit_one_cycle(1, 0.01, moms=(0.9, 0.8, 0.9, 0.1)), ValueError,
     r"^moms must be a sequence of three values"),
    (lambda ln: ln.fit_one_cycle(0, 0.01), ValueError, r"^n_epoch must be an integer >= 1, got 0"),
    (lambda ln: ln.fit(0), ValueError, r"^n_epoch must be an integer >= 1"),
    (lambda ln: ln.fit(1.5), ValueError, r"^n_epoch must be an integer >= 1"),
    (lambda ln: ln.fit(1, cbs=["x"]), TypeError, r"^cbs must hold Callback instances"),
    (lambda ln: ln.fit(1, cbs=[TorchScheduler(torch.optim.lr_scheduler.ReduceLROnPlateau,
                                            monitor="nope")]),
     ValueError, r"^monitor must be one of \['train_loss', 'valid_loss'\], got 'nope'"),
    (lambda ln: ln.fit(1, cbs=[ln.recorder]), ValueError,
     r"^cbs holds <lrfind.recorder.Recorder.* twice or one the learner already has"),
    (lambda ln: ln.fit(1, cbs=[cb := Callback(), cb]), ValueError, r"^cbs holds .* twice"),
    (lambda ln: ln.add_cb(ln.recorder), ValueError, r"^cb holds .* twice or one the learner"),
    (lambda ln: ln.remove_cb(Callback()), ValueError,
     r"^cb <lrfind.callback.Callback .* is not one of this learner's callbacks"),
    (lambda ln: ln.add_cb(EarlyStopping(monitor="accuracy")), ValueError,
     r"^monitor must be one of \['train_loss', 'valid_loss'\], got 'accuracy'"),
    (lambda ln: ln.fit(1, lr=0.5, cbs=[TorchScheduler(torch.optim.lr_scheduler.StepLR)]),
     TypeError, r"^sched_cls 'StepLR' rejects the arguments \(\), \{\}: .*step_size"),
    (lambda ln: ln.validate(5), TypeError, r"^dl must be an iterable of batches"),
    (lambda ln: ln.get_preds(DataLoader(TensorDataset(torch.zeros(0, 4), torch.zeros(0, 1)),
                                        batch_size=4)), ValueError, r"^dl is empty"),
    (lambda ln: ln.fit(1, cbs=[Checkpoint(None)]), TypeError,
     r"^path must be a path \(str or os.PathLike\), got None"),
    (lambda ln: ln.fit(1, cbs=[SaveBest(None)]), TypeError, r"^path must be a path"),
    (lambda ln: ln.save(None), TypeError, r"^path must be a path \(str or os.PathLike\), got None"),
    (lambda ln: ln.load(0), TypeError, r"^path must be a path \(str or os.PathLike\), got 0"),
]


@pytest.mark.parametrize(("call", "exc", "match"), BAD_CALLS)
@pytest.mark.parametrize("progress", [False, True])
def test_bad_calls_raise_and_change_nothing(call, exc, match, progress):
    learn = _trained()
    learn.progress = progress
    if progress:
        from lrfind.progress import ProgressCallback

        learn.add_cb(ProgressCallback())
    before = snapshot(learn)
    history = copy.deepcopy(learn.recorder.state_dict())
    with pytest.raises(exc, match=match):
        call(learn)
    assert same(before, snapshot(learn))
    assert learn.opt.param_groups[0]["lr"] == 1.234e-3
    assert history == learn.recorder.state_dict()


BAD_LEARNERS = [
    (lambda: Learner("model", loader(), loss_func=F.mse_loss), TypeError,
     r"^model must be a torch.nn.Module, got str"),
    (lambda: Learner(nn.Linear(4, 1), DataLoader(TensorDataset(torch.zeros(0, 4),
                                                               torch.zeros(0, 1))),
                     loss_func=F.mse_loss), ValueError, r"^train_dl is empty"),
    (lambda: Learner(nn.Linear(4, 1), [], loss_func=F.mse_loss), ValueError,
     r"^train_dl is empty"),
    (lambda: Learner(nn.Linear(4, 1), 5, loss_func=F.mse_loss), TypeError, r"^train_dl must be"),
    (lambda: Learner(nn.Linear(4, 1), loader()), ValueError, r"loss_func and compute_loss"),
    (lambda: Learner(nn.Linear(4, 1), loader(), loss_func=F.mse_loss, lr=-1.0), ValueError,
     r"^lr must be > 0"),
    (lambda: Learner(nn.Linear(4, 1), loader(), loss_func=F.mse_loss, moms=(0.9,)), ValueError,
     r"^moms must be a sequence of three values"),
    (lambda: Learner(nn.Linear(4, 1), loader(), loss_func=F.mse_loss, precision="fp8"),
     ValueError, r"^precision must be one of"),
    (lambda: Learner(nn.Linear(4, 1), loader(), loss_func=F.mse_loss, accum_steps=0),
     ValueError, r"^accum_steps must be an integer >= 1"),
    (lambda: Learner(nn.Linear(4, 1), loader(), loss_func=F.mse_loss, clip_grad=0.0),
     ValueError, r"^clip_grad must be > 0"),
    (lambda: Learner(nn.Linear(4, 1), loader(), loss_func=F.mse_loss, wd=-0.1),
     ValueError, r"^wd must be >= 0"),
    (lambda: Learner(nn.Linear(4, 1), loader(), loss_func=F.mse_loss, metrics=[3]),
     TypeError, r"^metrics must be callables"),
    (lambda: Learner(nn.Linear(4, 1), loader(), loss_func=F.mse_loss, cbs=[object()]),
     TypeError, r"^cbs must hold Callback instances"),
    (lambda: Learner(nn.Linear(4, 1), loader(), loss_func=F.mse_loss,
                     metrics=[lambda p, t: 0.0, lambda p, t: 1.0]), ValueError,
     r"^metrics must have distinct names .*, got \['<lambda>', '<lambda>'\]"),
    (lambda: Learner(nn.Linear(4, 1), loader(), loss_func=F.mse_loss, metrics=[time.time]),
     ValueError, r"^metrics must have distinct names other than epoch, train_loss, valid_loss "
                 r"and time, got \['time'\]"),
    (lambda: Learner(nn.ReLU(), loader(), loss_func=F.mse_loss), ValueError,
     r"^model has no parameters to train: ReLU"),
    (lambda: Learner(two_layer(), loader(), loss_func=F.mse_loss, splitter=lambda m: [[]]),
     ValueError, r"^splitter must return a non-empty list of non-empty parameter lists"),
    (lambda: Learner(nn.Linear(4, 1), loader(), loss_func=F.mse_loss, moms=(0.9, 1.5, 0.9)),
     ValueError, r"^moms must lie in \[0, 1\)"),
    (lambda: Learner(nn.Linear(4, 1), loader(), loss_func=nn.MSELoss), TypeError,
     r"^loss_func is the class MSELoss: pass an instance, MSELoss\(\)"),
    (lambda: Learner(nn.Linear(4, 1), loader(), compute_loss=nn.MSELoss), TypeError,
     r"^compute_loss is the class MSELoss: pass an instance, MSELoss\(\)"),
    (lambda: Learner(nn.Linear(4, 1), loader(), loss_func=F.mse_loss,
                     opt_func=torch.optim.SGD(nn.Linear(4, 1).parameters(), lr=0.1)), TypeError,
     r"^opt_func must build the optimizer from the parameter groups \(such as "
     r"torch.optim.AdamW\), got an SGD instance$"),
]


@pytest.mark.parametrize(("call", "exc", "match"), BAD_LEARNERS)
def test_bad_learner_arguments(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_a_single_metric_needs_no_list():
    learn = make(metrics=mae)
    learn.fit(1, 0.01)
    assert "mae" in learn.recorder.values[-1] and "mae" in learn.validate()


@pytest.mark.parametrize(("batches", "mult"), [(1, 1), (2, 1), (4, 2)])
def test_sgdr_restarts_on_the_first_step_of_every_cycle(batches, mult):
    learn = make(train=loader(16 * batches))
    learn.fit_sgdr(np.int64(3), np.int64(1), 0.1, cycle_mult=np.int64(mult))  # numpy ints too
    lrs = learn.recorder.lrs
    starts = [batches * sum(mult**j for j in range(k)) for k in range(4)]
    assert len(lrs) == starts[-1]
    for a, b in pairwise(starts):
        assert lrs[a] == pytest.approx(0.1, rel=1e-12)  # a restart at lr_max
        assert all(y < x for x, y in pairwise(lrs[a:b])) and lrs[b - 1] > 0


@pytest.mark.parametrize("on", ["learner", "fit"])
def test_a_torch_scheduler_is_refused_by_a_schedule_that_would_overwrite_it(on):
    step = TorchScheduler(torch.optim.lr_scheduler.StepLR, step_size=1, gamma=0.1)
    learn = make(cbs=[step] if on == "learner" else ())
    cbs = [step] if on == "fit" else None
    before = snapshot(learn)
    for call in (lambda: learn.fit_one_cycle(2, 0.01, cbs=cbs),
                 lambda: learn.fit_flat_cos(2, 0.01, cbs=cbs),
                 lambda: learn.fine_tune(1, cbs=cbs)):
        with pytest.raises(ValueError, match=r"^cbs: TorchScheduler\(StepLR, .*\) sets the LR, "
                                             r"which (fit_one_cycle|fit_flat_cos|fine_tune) "
                                             r"sets at every step: use it with fit\(\)"):
            call()
    assert same(before, snapshot(learn))
    learn.fit(2, 0.01, cbs=cbs)  # a constant LR leaves it to the scheduler
    assert learn.recorder.lrs[::4] == pytest.approx([0.01, 0.001])


def test_torch_scheduler_from_a_function_of_the_optimizer():
    sched = torch.optim.lr_scheduler

    def chain(opt):
        return sched.SequentialLR(opt, [sched.LinearLR(opt, 0.1, total_iters=2),
                                        sched.CosineAnnealingLR(opt, T_max=3)], milestones=[2])

    learn = make()
    learn.fit(5, lr=0.01, cbs=[TorchScheduler(chain)])
    per_epoch = learn.recorder.lrs[::4]  # 4 batches an epoch
    assert per_epoch == pytest.approx([0.001, 0.0055, 0.01, 0.0075, 0.0025])


def test_torch_scheduler_from_a_function_that_builds_reduce_on_plateau():
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau
    learn = make()
    # a huge threshold: no epoch counts as an improvement, so the LR halves after every epoch
    learn.fit(3, lr=0.01, cbs=[TorchScheduler(lambda opt: plateau(opt, patience=0, factor=0.5,
                                                                  threshold=10.0))])
    assert learn.recorder.lrs[::4] == pytest.approx([0.01, 0.005, 0.0025])
    with pytest.raises(ValueError, match="^interval must be 'epoch' for ReduceLROnPlateau"):
        make().fit(1, cbs=[TorchScheduler(lambda opt: plateau(opt), interval="batch")])
    with pytest.raises(ValueError, match="^monitor must be one of"):  # never silently idle
        make().fit(1, cbs=[TorchScheduler(lambda opt: plateau(opt), monitor="valid_los")])


def test_a_partial_metric_is_named_by_its_own_name_first():
    acc = functools.partial(accuracy)
    assert metric_name(acc) == "accuracy"
    acc.__name__ = "acc1"
    assert metric_name(acc) == "acc1"


def test_numpy_numbers_are_numbers():
    learn = make()
    learn.fit(1, lr=np.float32(1e-2))
    assert learn.recorder.lrs[0] == pytest.approx(1e-2)
    learn.fit_one_cycle(1, lr_max=np.float64(1e-2), div=np.int64(10))
    assert learn.recorder.lrs[0] == pytest.approx(1e-3)


class CancelIters(Callback):
    def __init__(self, iters):
        self.iters = set(iters)

    def before_batch(self, learn):
        if learn.iter in self.iters:
            raise CancelBatchException


class CutShort(Callback):
    """Stops a fit (``how``) at batch 1 of epoch 0, inside an accumulation chunk of 2 batches
    or (``"in_step"``) in the step of batch 1; records whether each batch starts with
    gradients left over from an earlier one."""

    def __init__(self, how):
        self.how, self.leftover = how, []

    def before_batch(self, learn):
        left = any(p.grad is not None for p in learn.model.parameters())
        self.leftover.append((learn.iter, left))

    def after_batch(self, learn):
        if (learn.epoch, learn.iter) == (0, 2) and self.how in ("epoch", "interrupt"):
            how, self.how = self.how, None  # once: batch 2 opened a chunk, its gradient is set
            raise CancelEpochException if how == "epoch" else KeyboardInterrupt

    def after_step(self, learn):
        if self.how == "in_step" and learn.iter == 1:
            raise CancelBatchException


@pytest.mark.parametrize("how", ["epoch", "interrupt", "in_step"])
def test_no_gradient_outlives_a_chunk_cut_short(how):
    learn, cut = make(accum_steps=2, valid=None), CutShort(how)
    try:
        learn.fit(2, lr=1e-2, cbs=[cut])
    except KeyboardInterrupt:
        learn.fit(1, lr=1e-2, cbs=[cut])  # the same learner again, as in a notebook
    starts = [left for i, left in cut.leftover if i % 2 == 0]  # batches that open a chunk
    assert len(starts) >= 3 and not any(starts)
    if how == "in_step":  # the step happened, so it counts, and the schedule moves on
        assert learn.train_iter == 2 * 2


@pytest.mark.parametrize("cancel", [{0}, {2}])
def test_a_cancelled_batch_counts_for_neither_loss_nor_step(cancel):
    seen = {}

    class Log(Callback):
        def after_loss(self, learn):
            seen[learn.iter] = learn.loss.item()

    learn = make(accum_steps=2, valid=None)
    learn.fit(1, lr=1e-2, cbs=[CancelIters(cancel), Log()])
    first = min(cancel)
    chunk = first // 2  # the optimizer step the cancelled batch belonged to
    assert learn.recorder.losses[chunk] == pytest.approx(seen[first + 1])  # the other batch alone


def test_bad_learner_leaves_the_model_alone():
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    w = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="^accum_steps"):
        Learner(model, loader(), loss_func=F.mse_loss, accum_steps=-1)
    assert same(w, model.state_dict())


class Output:
    """What a model with its own loss may return: an object holding the loss."""

    def __init__(self, loss):
        self.loss = loss


@pytest.mark.parametrize("run", ["fit", "lr_find", "validate"])
@pytest.mark.parametrize("kw", [
    {"compute_loss": lambda m, b: Output(F.mse_loss(m(b[0]), b[1]))},
    {"loss_func": lambda p, y: F.mse_loss(p, y).item()},
])
def test_a_loss_that_is_not_a_tensor_is_named(kw, run):
    learn = make(**kw)
    name, got = next(iter(kw)), "Output" if "compute_loss" in kw else "float"
    with pytest.raises(TypeError, match=rf"^{name} must return the loss as a tensor, got {got}"):
        learn.fit(1) if run == "fit" else getattr(learn, run)()


def test_non_scalar_loss_raises():
    learn = make(loss_func=lambda p, y: (p - y) ** 2)
    with pytest.raises(ValueError, match=r"the loss must be a scalar, got shape \(16, 1\)"):
        learn.fit(1)


# ---- output ----------------------------------------------------------------------------------


def test_progress_false_prints_nothing(capsys):
    learn = make(metrics=[mae])
    learn.fit_one_cycle(2, 0.05)
    learn.validate()
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""


def test_progress_false_keeps_early_stopping_quiet(capsys):
    learn = make(metrics=[mae])
    learn.fit(4, 1e-6, cbs=[EarlyStopping(monitor="mae", mode="max", patience=1)])
    assert len(learn.recorder.values) == 2  # it stopped
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""
    learn.progress = True
    learn.fit(4, 1e-6, cbs=[EarlyStopping(monitor="mae", mode="max", patience=1)])
    assert "early stopping after epoch 1" in capsys.readouterr().out


def test_progress_true_prints_a_table_with_metric_names(capsys):
    learn = make(metrics=[mae], progress=True)
    learn.fit(2, lr=0.05)
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.strip()]
    header = lines[0].split()
    assert header == ["epoch", "train_loss", "valid_loss", "mae", "time"]
    rows = [line.split() for line in lines[1:]]
    assert [r[0] for r in rows] == ["0", "1"]
    assert float(rows[1][2]) == pytest.approx(learn.recorder.values[1]["valid_loss"], abs=1e-6)
    assert float(rows[1][3]) == pytest.approx(learn.recorder.values[1]["mae"], abs=1e-6)


def test_the_table_shows_time_as_minutes_and_seconds():
    from lrfind.progress import format_row

    row = format_row({"epoch": 3, "train_loss": 0.5, "time": 75.4}, ["epoch", "train_loss", "time"])
    assert row.split() == ["3", "0.500000", "01:15"]


@pytest.mark.parametrize("terminal", [False, True])
def test_bars_show_on_a_terminal_only(terminal, capsys, monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: terminal)  # capsys's stream
    learn = make(metrics=[mae], progress=True)
    learn.lr_find(num_it=20)
    learn.fit(2, lr=0.05)
    out = capsys.readouterr()
    assert out.out.split()[:2] == ["epoch", "train_loss"]  # the table prints either way
    bars = ("lr_find", "epoch:", "train:")
    assert [b in out.err for b in bars] == [terminal] * 3  # a log file gets no bar lines


def test_a_process_other_than_rank_0_prints_nothing(capsys, monkeypatch):
    monkeypatch.setattr("lrfind.learner.init_distributed", lambda device: (1, 1))  # rank 1
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)  # bars would show on rank 0
    learn = make(metrics=[mae], progress=True)
    assert learn.rank == 1 and not learn.is_main
    learn.fit(2, lr=0.05)
    learn.print("a line")
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""  # no table, no line, no bars
    learn.is_main = True
    learn.print("a line")
    assert capsys.readouterr().out == "a line\n"


def test_plots_are_headless_and_return_axes():
    from matplotlib.axes import Axes

    learn = make()
    learn.fit_one_cycle(2, 0.05)
    ax = learn.recorder.plot_loss()
    assert isinstance(ax, Axes)
    assert len(ax.lines) == 3  # raw, smoothed, valid
    axes = learn.recorder.plot_sched()
    assert len(axes) == 2 and all(isinstance(a, Axes) for a in axes)
    assert list(axes[0].lines[0].get_ydata()) == learn.recorder.lrs
    one = learn.recorder.plot_sched(keys=("lr",))
    assert len(one) == 1 and isinstance(one[0], Axes)  # an array for any number of keys
    given = learn.recorder.plot_loss(ax=ax)
    assert given is ax
    for keys in [("wd",), (), "lr"]:
        with pytest.raises(ValueError, match=r"^keys must be a non-empty sequence of names"):
            learn.recorder.plot_sched(keys=keys)
    with pytest.raises(ValueError, match=r"^skip_start must be an integer >= 0, got -5"):
        learn.recorder.plot_loss(skip_start=-5)


def test_plot_loss_puts_each_validation_at_its_epoch_end():
    class Stop(Callback):
        def before_batch(self, learn):
            if learn.epoch == 1 and learn.iter == 0:
                raise CancelEpochException  # no validation for epoch 1
            if learn.epoch == 2 and learn.iter == 2:
                raise KeyboardInterrupt

    learn = make()
    with pytest.raises(KeyboardInterrupt):
        learn.fit(3, lr=0.01, cbs=[Stop()])
    valid = learn.recorder.plot_loss().lines[2]
    assert list(valid.get_xdata()) == [3]  # epoch 0 ends after step 3; epoch 1 has none


def test_accuracy_checks_shapes_and_validate_skips_empty_batches():
    preds = torch.tensor([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
    assert accuracy(preds, torch.tensor([[1], [0], [0], [0]])).item() == 0.75  # (N, 1) targets
    with pytest.raises(ValueError, match=r"^accuracy: 4 predictions .* but 1 targets"):
        accuracy(preds, torch.tensor([1]))
    learn = make(metrics=[lambda p, y: (p - y).abs().mean()])
    x, y = data(16)
    one = DataLoader(TensorDataset(x, y), batch_size=16)
    empty = [(x[:0], y[:0])]
    assert learn.validate([*one, *empty]) == learn.validate(one)  # not NaN


def test_import_does_not_import_matplotlib():
    code = "import sys, lrfind; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                         check=True)
    assert out.stdout.strip() == "False"


# ---- accumulation, clipping, precision -------------------------------------------------------


def _sgd(params, lr=1e-3):
    return torch.optim.SGD(params, lr=lr)


def test_accumulating_4_batches_of_16_equals_one_batch_of_64():
    torch.manual_seed(0)
    model = two_layer()
    init = copy.deepcopy(model.state_dict())
    a = Learner(model, loader(64, bs=16), loss_func=F.mse_loss, opt_func=_sgd,
                accum_steps=4, progress=False)
    a.fit(2, lr=0.1)
    b_model = two_layer()
    b_model.load_state_dict(init)
    b = Learner(b_model, loader(64, bs=64), loss_func=F.mse_loss, opt_func=_sgd,
                progress=False)
    b.fit(2, lr=0.1)
    for (k, va), vb in zip(a.model.state_dict().items(),
                                 b.model.state_dict().values(), strict=True):
        assert torch.allclose(va, vb, atol=1e-6), k
    assert not torch.allclose(init["0.weight"], b_model.state_dict()["0.weight"])
    assert a.recorder.losses == pytest.approx(b.recorder.losses, rel=1e-5)
    assert len(a.recorder.lrs) == 2


def test_partial_last_accumulation_is_stepped_and_steps_counted():
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    init = copy.deepcopy(model.state_dict())
    dl = loader(80, bs=16)  # 5 batches
    learn = Learner(model, dl, loss_func=F.mse_loss, opt_func=_sgd, accum_steps=2,
                    progress=False)
    learn.fit(2, lr=0.1)
    assert len(learn.recorder.lrs) == 2 * math.ceil(5 / 2)
    # the same thing by hand: steps over batches [0, 1], [2, 3] and [4] alone (not halved)
    ref = nn.Linear(4, 1)
    ref.load_state_dict(init)
    opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    batches = list(dl)
    losses = []
    for _ in range(2):
        for chunk in ([0, 1], [2, 3], [4]):
            total = sum(F.mse_loss(ref(batches[i][0]), batches[i][1]) for i in chunk) / len(chunk)
            total.backward()
            opt.step()
            opt.zero_grad()
            losses.append(total.item())
    for k, v in ref.state_dict().items():
        assert torch.allclose(v, learn.model.state_dict()[k], atol=1e-6), k
    assert learn.recorder.losses == pytest.approx(losses, rel=1e-5)


def test_one_cycle_counts_a_short_last_accumulation_as_a_step():
    learn = make(accum_steps=3)  # 4 batches: steps over 3 batches and over 1
    learn.fit_one_cycle(2, 0.1)
    f = schedules.one_cycle(0.1)
    assert learn.recorder.lrs == pytest.approx([f(i / 3) for i in range(4)], rel=1e-12)


def test_clip_grad_limits_the_global_norm():
    torch.manual_seed(0)
    x, y = data(64)
    y = y * 100  # big gradients
    dl = DataLoader(TensorDataset(x, y), batch_size=64)
    model = two_layer()
    init = copy.deepcopy(model.state_dict())
    ref = two_layer()
    ref.load_state_dict(init)
    F.mse_loss(ref(x), y).backward()
    grads = {n: p.grad.clone() for n, p in ref.named_parameters()}
    norm = torch.sqrt(sum((g**2).sum() for g in grads.values()))
    clip, lr = 0.5, 1.0
    assert norm > 10 * clip
    learn = Learner(model, dl, loss_func=F.mse_loss, opt_func=_sgd, clip_grad=clip, lr=lr,
                    progress=False)
    learn.fit(1)
    new = dict(learn.model.named_parameters())
    step_norm = torch.sqrt(sum(((init[n] - new[n].detach()) ** 2).sum() for n in grads))
    assert step_norm == pytest.approx(lr * clip, rel=1e-4)
    for n, g in grads.items():
        assert torch.allclose(new[n].detach(), init[n] - lr * g * (clip / norm), atol=1e-6), n


def test_bf16_trains_on_cpu_and_params_stay_float32():
    learn = make(two_layer(), precision="bf16")
    before = learn.validate()["valid_loss"]
    learn.fit_one_cycle(3, 0.05)
    assert all(p.dtype == torch.float32 for p in learn.model.parameters())
    assert all(math.isfinite(v) for v in learn.recorder.losses)
    assert learn.validate()["valid_loss"] < before
