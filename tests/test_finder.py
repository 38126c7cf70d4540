"""The LR range test: grid, recording, stopping, bitwise restore, result object, bad inputs."""

import copy
import math
import os
import random
import sys
import tempfile
import types
import warnings

import matplotlib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import noisy_fall, same
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lrfind
from lrfind import Callback, Learner

matplotlib.use("Agg")
# the tiny learners here sweep few steps over curves that are mostly noise: the warning that
# says so is checked by its own test
pytestmark = pytest.mark.filterwarnings("ignore:lr_find. the smoothed loss falls by only")

W = torch.tensor([[1.5], [-2.0], [0.7], [1.0]])
SUGGESTIONS = ("minimum", "steep", "valley", "slide", "auto")


def data(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    return x, x @ W + 0.1 * torch.randn(n, 1, generator=g)


def loader(n=64, bs=16, shuffle=False, generator=None):
    return DataLoader(TensorDataset(*data(n)), batch_size=bs, shuffle=shuffle,
                      generator=generator)


class SpySGD(torch.optim.SGD):
    """Records every group's LR as each step sees it."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen = []

    def step(self, closure=None):
        self.seen.append([g["lr"] for g in self.param_groups])
        return super().step(closure)


def spy_sgd(params, lr=1e-3):
    return SpySGD(params, lr=lr, momentum=0.9)


def make(model=None, dl=None, **kw):
    torch.manual_seed(0)
    kw.setdefault("loss_func", F.mse_loss)
    kw.setdefault("progress", False)
    return Learner(nn.Linear(4, 1) if model is None else model, loader() if dl is None else dl,
                   **kw)


def scripted(values):
    """A compute_loss whose k-th call returns values[k] (with a gradient path to the model)."""
    calls = []

    def compute_loss(model, batch):
        v = values[min(len(calls), len(values) - 1)]
        calls.append(v)
        return model(batch[0]).sum() * 0.0 + v

    compute_loss.calls = calls
    return compute_loss


# ---- the grid --------------------------------------------------------------------------------


def test_exp_grid_exact_endpoints_and_constant_ratio():
    learn = make(opt_func=spy_sgd)
    res = learn.lr_find(start_lr=1e-6, end_lr=1e-1, num_it=20, stop_div=False)
    assert res.stop_reason == "num_it reached"
    assert len(res.lrs) == len(res.losses) == len(res.raw_losses) == 20
    assert res.lrs[0] == 1e-6 and res.lrs[-1] == 1e-1
    ratios = np.array(res.lrs[1:]) / np.array(res.lrs[:-1])
    assert ratios == pytest.approx(np.full(19, 1e5 ** (1 / 19)), rel=1e-12)
    for k, lr in enumerate(res.lrs):
        assert lr == pytest.approx(1e-6 * (1e5) ** (k / 19), rel=1e-12)


@pytest.mark.filterwarnings("ignore:mode='linear'")
def test_linear_grid_exact_endpoints_and_constant_difference():
    learn = make(opt_func=spy_sgd)
    res = learn.lr_find(start_lr=1e-4, end_lr=5e-2, num_it=12, stop_div=False, mode="linear")
    assert res.stop_reason == "num_it reached"
    assert len(res.lrs) == 12
    assert res.lrs[0] == 1e-4 and res.lrs[-1] == 5e-2
    assert np.diff(res.lrs) == pytest.approx(np.full(11, (5e-2 - 1e-4) / 11), rel=1e-9)


def test_recorded_lr_is_the_one_used_by_the_step_that_made_the_loss():
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    init = copy.deepcopy(model.state_dict())
    learn = make(model, opt_func=spy_sgd)
    res = learn.lr_find(start_lr=1e-4, end_lr=1e-1, num_it=10, stop_div=False, beta=0.5)
    assert [s[-1] for s in learn.opt.seen] == res.lrs
    # replay by hand: loss k is the forward pass of the batch whose step uses lrs[k]
    ref = nn.Linear(4, 1)
    ref.load_state_dict(init)
    opt = torch.optim.SGD(ref.parameters(), lr=1.0, momentum=0.9)
    batches = list(loader())
    raw = []
    for k, lr in enumerate(res.lrs):
        xb, yb = batches[k % len(batches)]
        loss = F.mse_loss(ref(xb), yb)
        raw.append(loss.item())
        loss.backward()
        opt.param_groups[0]["lr"] = lr
        opt.step()
        opt.zero_grad()
    assert res.raw_losses == pytest.approx(raw, rel=1e-6)
    # smoothed: debiased EMA with beta 0.5
    avg, smooth = 0.0, []
    for k, v in enumerate(raw, start=1):
        avg = 0.5 * avg + 0.5 * v
        smooth.append(avg / (1 - 0.5**k))
    assert res.losses == pytest.approx(smooth, rel=1e-6)


def test_short_loader_cycles():
    learn = make(dl=loader(48, bs=16))  # 3 batches
    res = learn.lr_find(start_lr=1e-6, end_lr=1e-2, num_it=20)
    assert len(res.lrs) == 20
    assert res.stop_reason == "num_it reached"


def test_longer_loader_stops_at_num_it():
    learn = make(dl=loader(256, bs=8))  # 32 batches
    res = learn.lr_find(start_lr=1e-6, end_lr=1e-2, num_it=7)
    assert len(res.lrs) == 7 and res.lrs[-1] == 1e-2


# ---- stopping --------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:.*needs at least")
def test_stops_when_smoothed_loss_exceeds_div_th_times_best():
    # beta=0: smoothed == raw. best 1.0; 4.0 is not > 4x, 4.125 is (values exact in float32)
    loss = scripted([2.0, 1.0, 1.5, 3.875, 4.0, 4.125, 1.0, 1.0])
    learn = make(loss_func=None, compute_loss=loss)
    res = learn.lr_find(num_it=8, beta=0.0, suggest_funcs=SUGGESTIONS)
    assert res.stop_reason == "diverged"
    assert res.raw_losses == [2.0, 1.0, 1.5, 3.875, 4.0, 4.125]
    assert res.losses == res.raw_losses
    assert len(loss.calls) == 6  # nothing ran after the stop
    assert all(v is None or math.isfinite(v) for v in res.suggestions.values())


def test_div_th_changes_the_threshold():
    loss = scripted([2.0, 1.0, 1.5, 2.5, 1.0, 1.0])
    with pytest.warns(UserWarning, match="steep: needs at least 5") as w:  # 3 points to read
        res = make(loss_func=None, compute_loss=loss).lr_find(num_it=6, beta=0.0, div_th=2.0)
    assert w[0].filename == __file__  # the user's lr_find line
    assert res.stop_reason == "diverged" and len(res.lrs) == 4
    loss = scripted([2.0, 1.0, 1.5, 2.5, 1.0, 1.0])
    res = make(loss_func=None, compute_loss=loss).lr_find(num_it=6, beta=0.0, stop_div=False)
    assert res.stop_reason == "num_it reached" and len(res.lrs) == 6


def test_divergence_rule_for_negative_losses():
    # best -4: stop once smooth - best > 3 * |best|, i.e. smooth > 8 (a ratio test would stop
    # at once: every value is > 4 * -4)
    loss = scripted([-1.0, -2.0, -4.0, -3.0, 0.0, 7.875, 8.0, 8.125, -5.0, -5.0])
    res = make(loss_func=None, compute_loss=loss).lr_find(num_it=10, beta=0.0)
    assert res.stop_reason == "diverged"
    assert res.raw_losses == [-1.0, -2.0, -4.0, -3.0, 0.0, 7.875, 8.0, 8.125]
    loss = scripted([-1.0, -2.0, -3.0, -4.0, -5.0, -6.0])  # improving: never stops
    res = make(loss_func=None, compute_loss=loss).lr_find(num_it=6, beta=0.0)
    assert res.stop_reason == "num_it reached"


def test_real_divergence_stops_early():
    learn = make(opt_func=spy_sgd)
    res = learn.lr_find(start_lr=1e-5, end_lr=1e3, num_it=100)
    assert res.stop_reason in ("diverged", "non-finite loss")
    assert 10 < len(res.lrs) < 100
    assert res.lrs[-1] < 1e3
    assert all(v is None or math.isfinite(v) for v in res.suggestions.values())


# the finite points before the NaN, and the suggestions that have enough of them to answer:
# 3 points are read whole (minimum and valley need 3); of 30, 20 are left after the skips
ANSWERED = {1: (), 3: ("minimum", "valley"), 30: SUGGESTIONS}


@pytest.mark.parametrize("k", [1, 3, 30])
def test_stops_at_nan_and_suggestions_are_never_nan(k):
    rng = np.random.default_rng(0)
    values = list(1.0 + 0.1 * rng.random(k)) + [float("nan")] * 5
    loss = scripted(values)
    learn = make(loss_func=None, compute_loss=loss)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = learn.lr_find(num_it=50, suggest_funcs=SUGGESTIONS)
    if k < 16:  # too few points for some methods: a clear warning, not an IndexError
        assert any("needs at least" in str(w.message) for w in caught)
    assert res.stop_reason == "non-finite loss"
    assert len(res.lrs) == k + 1
    assert math.isnan(res.raw_losses[-1]) and math.isnan(res.losses[-1])
    assert all(math.isfinite(v) for v in res.losses[:-1])
    assert set(res.suggestions) == set(SUGGESTIONS)
    for name, v in res.suggestions.items():
        assert v is None or (math.isfinite(v) and v > 0)
        assert (v is not None) == (name in ANSWERED[k]), name
    assert all(p.isfinite().all() for p in learn.model.parameters())
    assert "nan" not in repr(res).lower()


def test_inf_loss_stops_too():
    loss = scripted([1.0, 1.0, 1.0, float("inf"), 1.0])
    with pytest.warns(UserWarning, match="needs at least"):  # too few points before inf
        res = make(loss_func=None, compute_loss=loss).lr_find(num_it=5, stop_div=False)
    assert res.stop_reason == "non-finite loss" and len(res.lrs) == 4


def overflowing_learner(n=32):
    """fp16 on a linear model whose loss overflows fp16 as the LR grows."""
    torch.manual_seed(0)
    x = 30 * torch.randn(n, 4)
    dl = DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=8)
    return make(dl=dl, loss_func=lambda p, t: F.mse_loss(p.float(), t), opt_func=torch.optim.SGD,
                precision="fp16")


def test_fp16_stops_at_the_first_non_finite_loss():
    """A skipped step (fp16 overflow) with a non-finite loss ends the sweep there."""
    learn = overflowing_learner()
    seen = []

    def loss_func(pred, target):
        loss = F.mse_loss(pred.float(), target)
        seen.append(loss.item())
        return loss

    learn.loss_func = loss_func
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = learn.lr_find(num_it=40, start_lr=1e-6, end_lr=10.0, stop_div=False)
    assert res.stop_reason == "non-finite loss" and math.isinf(res.raw_losses[-1])
    assert all(math.isfinite(v) for v in res.raw_losses[:-1])
    assert math.isinf(seen[-1]) and all(math.isfinite(v) for v in seen[:-1])  # no batch after


def test_an_interrupted_fp16_step_leaves_a_scaler_that_fit_can_use():
    learn = overflowing_learner()
    scaler = learn.scaler
    before = scaler.state_dict()
    step = learn.opt.step

    def interrupted(*args, **kwargs):  # Ctrl-C inside the optimizer step, after unscale_
        raise KeyboardInterrupt

    learn.opt.step = interrupted
    with pytest.raises(KeyboardInterrupt):
        learn.lr_find(num_it=10)
    del learn.opt.step
    assert learn.opt.step == step
    assert learn.scaler is scaler and scaler.state_dict() == before
    learn.fit(1, lr=1e-6)  # used to raise "unscale_() has already been called"
    assert learn.scaler.get_scale() < before["scale"]  # it ran: overflows lowered the scale


# ---- restoring everything --------------------------------------------------------------------


def bn_model():
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.2),
                         nn.Linear(8, 1))


def prepared_learner():
    """A learner with Adam state, two groups with their own hyper-parameters, a frozen
    parameter, a submodule in eval mode, a gradient set, a shuffling loader with a generator
    and seeded global RNGs."""
    g = torch.Generator().manual_seed(7)
    dl = loader(shuffle=True, generator=g)
    model = bn_model()
    learn = make(model, dl=dl, opt_func=torch.optim.Adam,
                 splitter=lambda m: [list(m[0].parameters()) + list(m[1].parameters()),
                                     list(m[4].parameters())])
    learn.fit(1, lr=[1e-3, 1e-2])
    g0, g1 = learn.opt.param_groups
    g0["betas"], g0["weight_decay"], g1["eps"] = (0.8, 0.95), 0.01, 1e-6
    model[1].eval()  # a submodule in eval mode
    model[0].bias.requires_grad_(False)
    model[4].weight.grad = torch.full_like(model[4].weight, 0.5)
    torch.manual_seed(11)
    np.random.seed(12)
    random.seed(13)
    return learn, g


def full_state(learn, g):
    model = learn.model
    return {
        "model": copy.deepcopy(model.state_dict()),  # includes running_mean/var and batches
        "grads": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "modes": [m.training for m in model.modules()],
        "opt": copy.deepcopy(learn.opt.state_dict()),  # state and every group's settings
        "torch_rng": torch.get_rng_state(),
        "numpy_rng": np.random.get_state(),
        "python_rng": random.getstate(),
        "loader_rng": g.get_state(),
    }


def assert_same_state(before, after):
    for key in before:
        assert same(before[key], after[key]), key


def test_state_restored_bitwise_after_a_normal_run():
    learn, g = prepared_learner()
    before = full_state(learn, g)
    assert before["model"]["1.num_batches_tracked"].item() == 4
    assert before["modes"] != [True] * len(before["modes"])
    res = learn.lr_find(num_it=30, stop_div=False, start_lr=1e-5, end_lr=1e-1)
    assert len(res.lrs) == 30
    assert_same_state(before, full_state(learn, g))


def test_state_restored_after_a_joining_callback_changed_flags_and_groups():
    class Meddle(Callback):
        in_lr_find = True

        def before_fit(self, learn):
            learn.model[0].bias.requires_grad_(True)  # frozen before the range test
            learn.opt.param_groups[0]["initial_lr"] = 1.0  # a key the group did not have

    learn, g = prepared_learner()
    learn.add_cb(Meddle())
    before = full_state(learn, g)
    learn.lr_find(num_it=10, stop_div=False)
    assert_same_state(before, full_state(learn, g))


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_state_restored_after_an_exception_inside_the_loss(exc):
    learn, g = prepared_learner()
    before = full_state(learn, g)
    calls = []

    def compute_loss(model, batch):
        calls.append(1)
        if len(calls) == 6:
            raise exc("stop here")
        return F.mse_loss(model(batch[0]), batch[1])

    learn.loss_func, learn.compute_loss = None, compute_loss
    with pytest.raises(exc, match="stop here"):
        learn.lr_find(num_it=30, stop_div=False)
    assert len(calls) == 6
    assert_same_state(before, full_state(learn, g))


def test_lr_find_then_fit_trains_exactly_like_fit_alone():
    def build():
        learn, g = prepared_learner()
        return learn

    a, b = build(), build()
    assert same(a.model.state_dict(), b.model.state_dict())
    rng = torch.get_rng_state()  # dropout draws from it: both fits must start from it
    a.lr_find(num_it=15)
    a.fit(2, lr=[1e-3, 1e-2])
    torch.set_rng_state(rng)
    b.fit(2, lr=[1e-3, 1e-2])
    assert same(a.model.state_dict(), b.model.state_dict())
    assert same(a.opt.state_dict(), b.opt.state_dict())
    assert a.recorder.losses == b.recorder.losses


class ShuffleSampler(torch.utils.data.Sampler):
    """Shuffles with its own ``generator`` of any kind lrfind restores."""

    def __init__(self, n, generator):
        self.n, self.generator = n, generator

    def __len__(self):
        return self.n

    def __iter__(self):
        gen = self.generator
        if isinstance(gen, torch.Generator):
            return iter(torch.randperm(self.n, generator=gen).tolist())
        if isinstance(gen, random.Random):
            return iter(gen.sample(range(self.n), self.n))
        return iter(gen.permutation(self.n).tolist())  # numpy Generator or RandomState


@pytest.mark.parametrize("make_gen", [
    lambda: torch.Generator().manual_seed(3), lambda: np.random.default_rng(3),
    lambda: np.random.RandomState(3), lambda: random.Random(3)],
    ids=["torch", "numpy-generator", "numpy-randomstate", "python-random"])
def test_a_custom_samplers_generator_is_restored(make_gen):
    def build():
        dl = DataLoader(TensorDataset(*data()), batch_size=16,
                        sampler=ShuffleSampler(64, make_gen()))
        return make(dl=dl), dl

    (a, dl), (b, _) = build(), build()
    a.lr_find(num_it=15)  # draws 4 orders from the sampler's generator
    assert [y.tolist() for _, y in dl] == [y.tolist() for _, y in b.train_dl]
    a.fit(1)
    b.fit(1)
    assert a.recorder.losses == b.recorder.losses


def test_optimizer_state_tensors_are_restored_in_place():
    learn, _ = prepared_learner()
    before = learn.opt.state_dict()  # holds the state tensors themselves, not copies
    copied = copy.deepcopy(before)
    tensors = {id(t) for s in learn.opt.state.values() for t in s.values()}
    learn.lr_find(num_it=10)
    assert {id(t) for s in learn.opt.state.values() for t in s.values()} == tensors
    assert same(before, copied)  # a state_dict taken before still reads as before


def test_two_runs_in_a_row_give_identical_curves():
    learn, _ = prepared_learner()
    r1 = learn.lr_find(num_it=25)
    r2 = learn.lr_find(num_it=25)
    assert r1.lrs == r2.lrs
    assert r1.raw_losses == r2.raw_losses
    assert r1.losses == r2.losses
    assert r1.suggestions == r2.suggestions


def test_parameter_groups_keep_their_ratios():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    learn = make(model, opt_func=spy_sgd, lr=[1e-3, 1e-2],
                 splitter=lambda m: [list(m[0].parameters()), list(m[2].parameters())])
    res = learn.lr_find(num_it=20, stop_div=False, start_lr=1e-5, end_lr=1e-1)
    assert len(learn.opt.seen) == 20
    for (lr0, lr1), lr in zip(learn.opt.seen, res.lrs, strict=True):
        assert lr1 == lr  # the last group follows the grid
        assert lr0 / lr1 == pytest.approx(0.1, rel=1e-12)
    assert [g["lr"] for g in learn.opt.param_groups] == [1e-3, 1e-2]


def test_groups_keep_the_learners_ratios_after_a_schedule_that_ended_at_zero():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    learn = make(model, opt_func=spy_sgd, lr=[1e-3, 1e-2],
                 splitter=lambda m: [list(m[0].parameters()), list(m[2].parameters())])
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR
    learn.fit(1, cbs=[lrfind.TorchScheduler(cosine, T_max=1)])
    assert [g["lr"] for g in learn.opt.param_groups] == [0.0, 0.0]
    learn.opt.seen.clear()
    learn.lr_find(num_it=10, stop_div=False)
    assert all(lr0 / lr1 == pytest.approx(0.1) for lr0, lr1 in learn.opt.seen)


def test_standalone_lr_find_restores_model_and_optimizer():
    torch.manual_seed(0)
    model = bn_model()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    dl = loader()
    for xb, yb in dl:  # some optimizer state first
        F.mse_loss(model(xb), yb).backward()
        opt.step()
        opt.zero_grad()
    before = (copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict()),
              [m.training for m in model.modules()], torch.get_rng_state())
    res = lrfind.lr_find(model, opt, dl, loss_func=F.mse_loss, num_it=20, end_lr=1.0)
    assert isinstance(res, lrfind.LRFindResult)
    assert 2 <= len(res.lrs) <= 20
    after = (model.state_dict(), opt.state_dict(), [m.training for m in model.modules()],
             torch.get_rng_state())
    assert same(before, after)
    assert opt.param_groups[0]["lr"] == 3e-3
    with pytest.raises(TypeError, match="^optimizer must be a torch.optim.Optimizer"):
        lrfind.lr_find(model, "adam", dl, loss_func=F.mse_loss)


def test_no_files_written(tmp_path, monkeypatch):
    cwd, tmp = tmp_path / "cwd", tmp_path / "tmp"
    cwd.mkdir()
    tmp.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("TMPDIR", str(tmp))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    os.chmod(cwd, 0o555)
    try:
        learn, _ = prepared_learner()
        res = learn.lr_find(num_it=20)
        model = bn_model()
        lrfind.lr_find(model, torch.optim.SGD(model.parameters(), lr=0.1), loader(),
                       loss_func=F.mse_loss, num_it=10)
    finally:
        os.chmod(cwd, 0o755)
    assert len(res.lrs) > 0
    assert os.listdir(cwd) == [] and os.listdir(tmp) == []


class CountingSGD(torch.optim.SGD):
    """Keeps an int64 step counter in its state, which a dtype cast would turn into a float."""

    def step(self, closure=None):
        for p in self.param_groups[0]["params"]:
            self.state[p]["count"] = self.state[p].get("count", torch.tensor(0)) + 1
        return super().step(closure)


@pytest.mark.parametrize("opt_func", [torch.optim.NAdam, CountingSGD])
def test_optimizer_state_keeps_its_dtypes(opt_func):
    # NAdam keeps mu_product in float32 next to float64 parameters
    model = nn.Linear(4, 1).double()
    learn = make(model, dl=DataLoader(TensorDataset(*(t.double() for t in data())), batch_size=16),
                 opt_func=lambda ps, lr=1e-3: opt_func(ps, lr=lr))
    learn.fit(1)
    before = copy.deepcopy(learn.opt.state_dict())
    dtypes = {v.dtype for s in before["state"].values() for v in s.values()}
    assert dtypes & {torch.float32, torch.int64}  # a state dtype other than the parameters'
    learn.lr_find(num_it=10)
    assert same(before, learn.opt.state_dict())


def test_parameters_only_the_optimizer_trains_are_restored():
    model = bn_model()
    temperature = nn.Parameter(torch.zeros(()))
    opt = torch.optim.Adam([*model.parameters(), temperature], lr=1e-3)

    def compute_loss(m, batch):
        return F.mse_loss(m(batch[0]) * temperature.exp(), batch[1])

    lrfind.lr_find(model, opt, loader(), compute_loss=compute_loss, num_it=10, end_lr=1.0)
    assert temperature.item() == 0.0 and temperature.grad is None
    assert opt.state == {}


class RunningMean(nn.Module):
    """Updates its buffer by assignment, so the module ends up holding a new tensor."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 1)
        self.register_buffer("mean", torch.zeros(4))

    def forward(self, x):
        if self.training:
            self.mean = 0.9 * self.mean + 0.1 * x.mean(0)
        return self.lin(x - self.mean)


def test_a_buffer_the_model_reassigns_is_restored():
    learn = make(RunningMean())
    mean = learn.model.mean
    learn.lr_find(num_it=10)
    assert learn.model.mean is mean and torch.equal(mean, torch.zeros(4))


class Rebinds(nn.Module):
    """Fills a None buffer and turns a buffer into a parameter during its first forward."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 1)
        self.register_buffer("cache", None)
        self.register_buffer("scale", torch.ones(()))

    def forward(self, x):
        if self.cache is None:
            self.cache = x.mean(0).detach()
            self.scale = nn.Parameter(self.scale.clone())
        return self.lin(x) * self.scale


def test_module_registries_are_restored():
    learn = make(Rebinds())
    before = copy.deepcopy(learn.model.state_dict())
    learn.lr_find(num_it=10)
    assert learn.model.cache is None and "scale" in learn.model._buffers
    assert same(before, learn.model.state_dict())
    fresh = Rebinds()
    fresh.load_state_dict(learn.model.state_dict())  # the same keys as before


class NoisyData(torch.utils.data.Dataset):
    """Adds noise drawn in the loader's worker process."""

    def __len__(self):
        return 64

    def __getitem__(self, i):
        x, y = data()
        return x[i] + 0.1 * torch.randn(4), y[i]


def test_persistent_workers_restart_so_fit_trains_like_fit_alone():
    def build():
        torch.manual_seed(0)
        dl = DataLoader(NoisyData(), batch_size=16, num_workers=1, persistent_workers=True)
        return make(dl=dl)

    a, b = build(), build()
    a.lr_find(num_it=10)  # workers started by the sweep are let go
    torch.manual_seed(1)
    a.fit(2)
    torch.manual_seed(1)
    b.fit(2)
    assert a.recorder.losses == b.recorder.losses
    a.lr_find(num_it=10)  # workers the fits started are kept aside, their RNGs untouched
    a.fit(1)
    b.fit(1)
    assert a.recorder.losses == b.recorder.losses


class ReseedingSampler(torch.utils.data.Sampler):
    """Re-seeds its generator in set_epoch, as some distributed samplers do."""

    def __init__(self, n):
        self.n, self.epoch, self.generator = n, 0, torch.Generator()

    def __len__(self):
        return self.n

    def set_epoch(self, epoch):
        self.epoch = epoch
        self.generator.manual_seed(100 + epoch)

    def __iter__(self):
        return iter(torch.randperm(self.n, generator=self.generator).tolist())


def test_a_sampler_that_reseeds_in_set_epoch_gets_its_generator_back():
    sampler = ReseedingSampler(64)
    learn = make(dl=DataLoader(TensorDataset(*data()), batch_size=16, sampler=sampler))
    learn.fit(1)
    list(sampler)  # one order drawn since set_epoch
    before = sampler.generator.get_state()
    learn.lr_find(num_it=10)
    assert torch.equal(sampler.generator.get_state(), before) and sampler.epoch == 0


def test_sampler_epoch_is_restored():
    ds = TensorDataset(*data())
    sampler = torch.utils.data.DistributedSampler(ds, num_replicas=1, rank=0, shuffle=True)
    learn = make(dl=DataLoader(ds, batch_size=16, sampler=sampler))
    learn.lr_find(num_it=10)
    assert sampler.epoch == 0


class HostNoise(torch.utils.data.Dataset):
    """Augments every sample with numbers from the numpy and Python global RNGs."""

    def __init__(self):
        self.x, self.y = data()
        self.draws = 0

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        self.draws += 1
        return self.x[i] + 0.01 * (np.random.rand() + random.random()), self.y[i]


def test_numpy_and_python_rngs_are_restored():
    ds = HostNoise()
    learn = make(dl=DataLoader(ds, batch_size=16))
    np.random.seed(1)
    random.seed(2)
    before = np.random.get_state(), random.getstate()
    learn.lr_find(num_it=10)
    assert ds.draws == 160  # the sweep drew from both
    assert same((np.random.get_state(), random.getstate()), before)


def test_the_learners_progress_and_schedule_are_restored():
    learn = make(valid_dl=loader(32))
    learn.fit_one_cycle(2, 1e-2)
    names = ("epoch", "n_epoch", "train_iter", "iter", "total_steps", "steps_per_epoch",
             "valid_result", "sched_args", "fit_error")
    before = {k: copy.deepcopy(getattr(learn, k)) for k in names}
    assert before["epoch"] == 1 and before["n_epoch"] == 2 and before["total_steps"] == 8
    assert before["sched_args"]["method"] == "one_cycle" and before["valid_result"]
    learn.lr_find(num_it=10)
    assert {k: getattr(learn, k) for k in names} == before


def test_uninitialized_lazy_model_raises_a_clear_error():
    model = nn.Sequential(nn.LazyLinear(1))
    learn = make(model)
    with pytest.raises(ValueError, match=r"^the model has uninitialized lazy parameters \['0.w"):
        learn.lr_find(num_it=5)
    learn.fit(1)  # one batch through it, and the range test runs
    assert len(learn.lr_find(num_it=10).lrs) == 10


class OneShot:
    """A sized loader that can be iterated only once."""

    def __init__(self, dl):
        self.batches, self.n = iter(dl), len(dl)

    def __len__(self):
        return self.n

    def __iter__(self):
        return self.batches


def test_a_loader_that_cannot_cycle_raises_and_restores():
    learn = make(dl=OneShot(loader()))
    before = copy.deepcopy(learn.model.state_dict())
    with pytest.raises(ValueError, match="^train_dl yielded no batch on pass 2 of the range "
                                         "test, after 4 steps"):
        learn.lr_find(num_it=20)
    assert same(before, learn.model.state_dict())


class Doubler(Callback):
    """Scales the inputs of every batch."""

    def __init__(self, in_lr_find):
        self.in_lr_find, self.calls = in_lr_find, 0

    def before_batch(self, learn):
        self.calls += 1
        learn.batch = (2 * learn.batch[0], learn.batch[1])


class Noise(Callback):
    """Adds noise from its own generator; its state is what a checkpoint or the sweep keeps."""

    in_lr_find = True

    def __init__(self):
        self.gen = torch.Generator().manual_seed(0)
        self.calls = 0

    def before_batch(self, learn):
        self.calls += 1
        x, y = learn.batch
        learn.batch = (x + 0.1 * torch.randn(x.shape, generator=self.gen), y)

    def state_dict(self):
        return {"gen": self.gen.get_state()}

    def load_state_dict(self, state):
        self.gen.set_state(state["gen"])


def test_a_joining_callback_is_restored_and_auto_takes_fit_callbacks():
    a, b = Noise(), Noise()
    learn_a, learn_b = make(cbs=[a]), make(cbs=[b])
    learn_a.lr_find(num_it=10)
    learn_a.fit(1)
    learn_b.fit(1)
    assert a.calls == 14 and learn_a.recorder.losses == learn_b.recorder.losses
    c = Noise()
    make().fit_one_cycle(1, "auto", cbs=[c])  # a fit-level callback joins the range test too
    assert c.calls > 4


@pytest.mark.parametrize("in_lr_find", [False, True])
def test_only_callbacks_marked_in_lr_find_run_in_the_range_test(in_lr_find):
    cb = Doubler(in_lr_find)
    learn = make(cbs=[cb])
    res = learn.lr_find(num_it=10, stop_div=False)
    assert cb.calls == (10 if in_lr_find else 0)
    learn.remove_cb(cb)
    plain = learn.lr_find(num_it=10, stop_div=False)
    assert (res.raw_losses != plain.raw_losses) == in_lr_find


class CountsEvents(Callback):
    """Counts the batches and validations it sees, also in the range test."""

    in_lr_find = True

    def __init__(self):
        self.batches = self.validations = 0

    def before_batch(self, learn):
        self.batches += 1

    def before_validate(self, learn):
        self.validations += 1


def test_no_validation_runs_during_the_range_test():
    valid, counts = loader(32), CountsEvents()
    learn = make(valid_dl=valid, cbs=[counts])
    res = learn.lr_find(num_it=12, stop_div=False)  # 3 passes over 4 batches
    assert len(res.lrs) == 12 and counts.batches == 12
    assert counts.validations == 0
    assert learn.valid_dl is valid
    learn.fit(1)
    assert counts.validations == 1


# ---- the result object -----------------------------------------------------------------------


def test_result_object():
    learn = make()
    res = learn.lr_find(num_it=40)
    a, b = res  # the fastai < 2.4 style unpacking keeps working
    assert len(res) == 2
    assert res.minimum == a == res[0] == res["minimum"]
    assert res.steep == b == res[1]
    assert res.suggestions == {"minimum": a, "steep": b}
    assert a is not None and b is not None
    with pytest.raises(AttributeError, match="no suggestion 'valley'"):
        _ = res.valley
    r = repr(res)
    assert r.startswith("LRFindResult(minimum=") and "steep=" in r
    assert "points=40" in r and "stop_reason='num_it reached'" in r
    assert learn.recorder.lr_find_result is res
    assert res.num_it == 40


def test_a_curve_within_the_noise_warns_and_a_clear_one_does_not():
    noisy = make(loss_func=None, compute_loss=scripted(list(noisy_fall(1.0)[1])))
    with pytest.warns(UserWarning, match=r"lr_find: the smoothed loss falls by only 0\.\d+ times "
                      "the batch-to-batch std of the loss, too little to read") as w:
        res = noisy.lr_find(stop_div=False)
    assert w[0].filename == __file__  # points at the caller
    assert res.drop_to_noise < 1
    assert res.drop_to_noise == lrfind.suggest.drop_to_noise(
        np.array(res.lrs), np.array(res.raw_losses), np.array(res.losses), 100)
    clear = make(loss_func=None, compute_loss=scripted(list(noisy_fall(0.02)[1])))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = clear.lr_find(stop_div=False)
    assert res.drop_to_noise > 10


def test_custom_suggestion_function():
    def middle(lrs, losses):
        return float(lrs[len(lrs) // 2])

    res = make().lr_find(num_it=30, suggest_funcs=("valley", middle))
    assert list(res.suggestions) == ["valley", "middle"]
    assert res.middle > 0
    model = nn.Linear(4, 1)  # any iterable, read once, also by the standalone function
    res = lrfind.lr_find(model, torch.optim.SGD(model.parameters(), lr=0.1), loader(),
                         loss_func=F.mse_loss, num_it=30, suggest_funcs=iter(["valley", middle]))
    assert list(res.suggestions) == ["valley", "middle"]


@pytest.mark.parametrize("value", [math.inf, math.nan])
def test_a_custom_suggestion_that_is_not_finite_is_none(value):
    def odd(lrs, losses):
        return value

    assert make().lr_find(num_it=10, suggest_funcs=(odd,)).odd is None


def test_suggestions_read_the_curve_without_its_first_tenth_and_last_5_points():
    # beta=0: the smoothed losses are the scripted ones. A bowl lowest at step 25, and lower
    # losses still in the first 5 (num_it // 10) and the last 5 steps, which are skipped
    values = list(1 - 0.5 * np.exp(-(((np.arange(50) - 25) / 6) ** 2)))
    values[:5] = values[45:] = [0.1] * 5
    got = []

    def lowest(lrs, losses):
        got.append((lrs, losses))
        return float(lrs[np.argmin(losses)])

    learn = make(loss_func=None, compute_loss=scripted(values))
    res = learn.lr_find(num_it=50, beta=0.0, stop_div=False, suggest_funcs=("minimum", lowest))
    assert res.losses == pytest.approx(values, rel=1e-6) and len(got) == 1
    lrs, losses = got[0]
    assert isinstance(lrs, np.ndarray) and isinstance(losses, np.ndarray)
    assert lrs.tolist() == res.lrs[5:45] and losses.tolist() == res.losses[5:45]
    assert res.lowest == res.lrs[25]
    assert res.minimum == pytest.approx(res.lrs[25] / 10, rel=0.05)


@pytest.mark.parametrize(("name", "parent", "expected"), [
    (None, None, False), ("TerminalInteractiveShell", None, False),
    ("ZMQInteractiveShell", None, True), ("Shell", "ZMQInteractiveShell", True)])  # Colab's
def test_in_notebook_knows_a_kernel_by_its_shell(monkeypatch, name, parent, expected):
    from lrfind.plots import in_notebook

    shell = None
    if name is not None:
        base = type(parent, (), {}) if parent else object
        shell = type(name, (base,), {})()
    monkeypatch.setitem(sys.modules, "IPython", types.SimpleNamespace(get_ipython=lambda: shell))
    assert in_notebook() is expected


@pytest.mark.parametrize(("notebook", "show_plot", "main", "plots"), [
    (True, True, True, True), (True, False, True, False), (False, True, True, False),
    (True, True, False, False)])
def test_show_plot_draws_the_curve_in_a_notebook_on_the_main_process(monkeypatch, notebook,
                                                                     show_plot, main, plots):
    drawn = []
    plot = lrfind.LRFindResult.plot

    def spy(self, *args, **kwargs):
        drawn.append(plot(self, *args, **kwargs))
        return drawn[-1]

    monkeypatch.setattr(lrfind.LRFindResult, "plot", spy)
    monkeypatch.setattr(lrfind.finder, "in_notebook", lambda: notebook)
    learn = make()
    learn.is_main = main
    res = learn.lr_find(num_it=20, show_plot=show_plot)
    assert len(drawn) == plots
    if plots:  # the curve, and a marker for each suggestion
        assert len(drawn[0].lines) == 1 + sum(v is not None for v in res.suggestions.values())


def test_plot_headless_one_marker_per_suggestion():
    from matplotlib.axes import Axes

    learn = make()
    with pytest.raises(ValueError, match="no range test recorded yet"):
        learn.recorder.plot_lr_find()
    res = learn.lr_find(num_it=50, suggest_funcs=("minimum", "steep", "valley"))
    ax = res.plot()
    assert isinstance(ax, Axes)
    n_found = sum(v is not None for v in res.suggestions.values())
    assert n_found >= 2
    assert len(ax.lines) == 1 + n_found
    legend = ax.get_legend()
    assert legend is not None
    labels = [t.get_text() for t in legend.get_texts()]
    assert [lab.split(":")[0] for lab in labels] == [k for k, v in res.suggestions.items()
                                                      if v is not None]
    assert ax.get_xscale() == "log"
    found = [v for v in res.suggestions.values() if v is not None]
    for line, lr in zip(ax.lines[1:], found, strict=True):
        assert line.get_xdata()[0] == lr  # the marker sits at the returned LR
    ax2 = learn.recorder.plot_lr_find()
    assert isinstance(ax2, Axes) and ax2 is not ax
    assert len(ax2.lines) == 1 + n_found


@pytest.mark.parametrize("points", [6, 7, 9])
def test_plot_of_a_short_run_keeps_its_curve_and_markers_on_it(points):
    res = lrfind.LRFindResult(list(np.logspace(-4, -1, points)), [1.0] * points,
                              list(np.linspace(2.0, 1.0, points)), "diverged",
                              {"minimum": 1e-3, "none": None}, num_it=100)
    ax = res.plot()
    curve = ax.lines[0].get_xdata()
    assert len(curve) == points - points // 4  # the cut of the suggestion input, not 5
    assert len(ax.lines) == 2 and curve[0] <= ax.lines[1].get_xdata()[0] <= curve[-1]
    with pytest.raises(ValueError, match=r"^skip_end must be an integer >= 0, got -1"):
        res.plot(skip_end=-1)


def test_plot_markers_for_many_suggestions_and_no_legend_without_them():
    lrs, losses = list(np.logspace(-4, -1, 20)), list(np.linspace(2.0, 1.0, 20))
    many = {f"s{i}": 1e-3 * (i + 1) for i in range(9)}
    ax = lrfind.LRFindResult(lrs, losses, losses, "num_it reached", many, 20).plot()
    assert len(ax.lines) == 1 + 9 and len(ax.get_legend().get_texts()) == 9
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matplotlib warns on a legend with nothing in it
        ax = lrfind.LRFindResult(lrs, losses, losses, "diverged", {"steep": None}, 20).plot()
    assert ax.get_legend() is None


# ---- bad inputs ------------------------------------------------------------------------------

BAD = [
    (dict(start_lr=0.0), ValueError, r"^start_lr must be > 0"),
    (dict(start_lr=-1e-7), ValueError, r"^start_lr must be > 0"),
    (dict(start_lr=1e-3, end_lr=1e-3), ValueError, r"^end_lr must be > start_lr"),
    (dict(start_lr=1e-3, end_lr=1e-4), ValueError, r"^end_lr must be > start_lr"),
    (dict(end_lr=float("nan")), ValueError, r"^end_lr must be a finite number"),
    (dict(num_it=1), ValueError, r"^num_it must be an integer >= 2, got 1"),
    (dict(num_it=10.0), ValueError, r"^num_it must be an integer >= 2"),
    (dict(mode="cubic"), ValueError, r"^mode must be 'exp' or 'linear', got 'cubic'"),
    (dict(beta=1.0), ValueError, r"^beta must be in \[0, 1\), got 1.0"),
    (dict(beta=-0.1), ValueError, r"^beta must be in \[0, 1\)"),
    (dict(div_th=1), ValueError, r"^div_th must be > 1, got 1"),
    (dict(suggest_funcs=("minimum", "nope")), ValueError, r"^unknown suggestion 'nope'"),
    (dict(suggest_funcs=(3,)), TypeError, r"^suggest_funcs must hold names or functions"),
    (dict(suggest_funcs=(lambda x, y: 1e-3, lambda x, y: 1e-2)), ValueError,
     r"^suggest_funcs has two suggestions named '<lambda>'"),
    (dict(suggest_funcs=("steep", lrfind.steep)), ValueError,
     r"^suggest_funcs has two suggestions named 'steep'"),
    (dict(suggest_funcs=None), TypeError, r"^suggest_funcs must be names or functions, got None"),
    (dict(stop_div="no"), TypeError, r"^stop_div must be a bool, got 'no'"),
]


@pytest.mark.parametrize(("kwargs", "exc", "match"), BAD)
def test_bad_inputs_raise_before_anything_changes(kwargs, exc, match):
    learn, g = prepared_learner()
    before = full_state(learn, g)
    with pytest.raises(exc, match=match):
        learn.lr_find(**kwargs)
    assert_same_state(before, full_state(learn, g))
    assert learn.recorder.lr_find_result is None
    model = bn_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(exc, match=match):
        lrfind.lr_find(model, opt, loader(), loss_func=F.mse_loss, **kwargs)


def test_empty_loader_raises():
    model = nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    empty = DataLoader(TensorDataset(torch.zeros(0, 4), torch.zeros(0, 1)), batch_size=4)
    w = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="^train_dl is empty"):
        lrfind.lr_find(model, opt, empty, loss_func=F.mse_loss)
    assert same(w, model.state_dict())


def test_linear_mode_over_many_decades_warns():
    with pytest.warns(UserWarning, match="mode='linear' from 1e-07 to 10 spends nine tenths") as w:
        make().lr_find(num_it=10, mode="linear")
    assert w[0].filename == __file__  # points at the caller
    with pytest.warns(UserWarning, match="mode='linear' from 0.001 to 1 spends"):  # 3 decades
        make().lr_find(num_it=10, mode="linear", start_lr=1e-3, end_lr=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.filterwarnings("ignore", "lr_find: the smoothed loss falls by only")
        make().lr_find(num_it=20, mode="linear", start_lr=1e-3, end_lr=1e-1, stop_div=False,
                       suggest_funcs=("minimum",))


def test_rprop_is_warned_about():
    with pytest.warns(UserWarning, match="Rprop takes lr only as each weight's first step"):
        make(opt_func=torch.optim.Rprop).lr_find(num_it=10)


def test_a_loader_without_a_length_is_refused_by_name():
    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(zip(*data()))

    model = nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match="^train_dl must have a length"):
        lrfind.lr_find(model, opt, DataLoader(Stream(), batch_size=16), loss_func=F.mse_loss)


def test_standalone_trains_what_the_optimizer_holds():
    """A model with no parameters of its own: the optimizer holds them."""
    w = nn.Parameter(torch.zeros(4, 1))

    class Outside(nn.Module):
        def forward(self, x):
            return x @ w

    opt = torch.optim.SGD([w], lr=0.1)
    res = lrfind.lr_find(Outside(), opt, loader(), loss_func=F.mse_loss, num_it=20)
    assert len(res.lrs) > 5 and torch.equal(w, torch.zeros(4, 1))


def test_non_scalar_loss_raises_and_restores():
    learn, g = prepared_learner()
    before = full_state(learn, g)
    learn.loss_func = lambda p, y: (p - y) ** 2
    with pytest.raises(ValueError, match=r"the loss must be a scalar, got shape \(16, 1\)"):
        learn.lr_find(num_it=10)
    assert_same_state(before, full_state(learn, g))


# ---- lr_max="auto" ---------------------------------------------------------------------------


def test_fit_one_cycle_auto_uses_the_auto_suggestion():
    learn = make(opt_func=spy_sgd)
    learn.fit_one_cycle(2, "auto")
    res = learn.recorder.lr_find_result
    assert res is not None and list(res.suggestions) == ["auto"]
    assert res.auto is not None and res.auto > 0
    n = len(learn.recorder.lrs)
    assert n == 8
    assert learn.recorder.lrs[0] == res.auto / 25  # first step: lr_max / div
    assert learn.recorder.lrs[-1] == res.auto / 1e5
    assert learn.opt.seen[-n:] == [[v] for v in learn.recorder.lrs]


def test_fit_auto_trains_at_the_auto_suggestion():
    learn = make()
    learn.fit(1, "auto")
    res = learn.recorder.lr_find_result
    assert list(res.suggestions) == ["auto"] and res.auto is not None
    assert learn.recorder.lrs == [res.auto] * len(learn.recorder.lrs)


def test_fit_auto_says_which_lr_it_took_when_progress_is_on(capsys):
    make().fit_one_cycle(1, "auto")
    assert "auto" not in capsys.readouterr().out  # progress=False: silent
    learn = make(progress=True)
    learn.fit_flat_cos(1, "auto")
    found = learn.recorder.lr_find_result.auto
    assert f"lr='auto': {found:.3g}, from a range test of 300 steps" in capsys.readouterr().out
