"""Schedules: golden values, properties over grids, torch's OneCycleLR as an oracle, bad inputs."""

import doctest
import math
from itertools import pairwise

import numpy as np
import pytest
import torch

import lrfind.schedules as S

# ---- golden values ---------------------------------------------------------------------------

GOLDEN = [
    # (schedule, pos, expected): values worked out by hand from the documented formulas
    (S.constant(0.1), 0.0, 0.1),
    (S.constant(0.1), 0.7, 0.1),
    (S.constant(-2.0), 1.0, -2.0),
    (S.linear(1.0, 3.0), 0.0, 1.0),
    (S.linear(1.0, 3.0), 0.25, 1.5),
    (S.linear(1.0, 3.0), 1.0, 3.0),
    (S.linear(2.0, 0.0), 0.75, 0.5),
    (S.cosine(1.0, 0.0), 0.0, 1.0),
    (S.cosine(1.0, 0.0), 0.25, (1 + math.cos(math.pi / 4)) / 2),  # 0.853553...
    (S.cosine(1.0, 0.0), 0.5, 0.5),
    (S.cosine(1.0, 0.0), 1.0, 0.0),
    (S.cosine(0.0, 2.0), 0.5, 1.0),
    (S.exponential(1e-3, 1e-1), 0.25, 1e-3 * 100**0.25),  # 3.1623e-3
    (S.exponential(1e-3, 1e-1), 0.5, 1e-2),
    (S.exponential(1.0, 1e-4), 0.75, 1e-3),
    (S.polynomial(1.0, 0.0), 0.25, 0.5625),
    (S.polynomial(1.0, 0.0, power=3), 0.5, 0.125),
    (S.polynomial(2.0, 1.0, power=1), 0.25, 1.75),
    (S.join([S.linear(0, 1), S.linear(1, 0)], [0.25, 0.75]), 0.125, 0.5),
    (S.join([S.linear(0, 1), S.linear(1, 0)], [0.25, 0.75]), 0.25, 1.0),
    (S.join([S.linear(0, 1), S.linear(1, 0)], [0.25, 0.75]), 0.625, 0.5),
    (S.join([S.constant(1.0), S.constant(2.0), S.constant(3.0)], [0.2, 0.3, 0.5]), 0.3, 2.0),
    (S.join([S.constant(1.0), S.constant(2.0), S.constant(3.0)], [0.2, 0.3, 0.5]), 0.9, 3.0),
    (S.one_cycle(1.0), 0.0, 0.04),
    (S.one_cycle(1.0), 0.125, 0.52),  # halfway up: (0.04 + 1) / 2
    (S.one_cycle(1.0), 0.25, 1.0),
    (S.one_cycle(1.0), 0.625, 0.500005),  # halfway down: (1 + 1e-5) / 2
    (S.one_cycle(1.0), 1.0, 1e-5),
    (S.one_cycle(2.0, div=10, div_final=100, pct_start=0.5), 0.25, 1.1),
    (S.one_cycle(2.0, div=10, div_final=100, pct_start=0.5), 0.75, 1.01),
    (S.one_cycle_moms(), 0.0, 0.95),
    (S.one_cycle_moms(), 0.125, 0.9),
    (S.one_cycle_moms(), 0.25, 0.85),
    (S.one_cycle_moms(), 0.625, 0.9),
    (S.one_cycle_moms(), 1.0, 0.95),
    (S.one_cycle_moms((0.9, 0.5, 0.7), pct_start=0.5), 0.75, 0.6),
    (S.flat_cos(0.1), 0.0, 0.1),
    (S.flat_cos(0.1), 0.5, 0.1),
    (S.flat_cos(0.1), 0.875, 0.0500005),
    (S.flat_cos(0.1), 1.0, 1e-6),
    (S.warmup_cosine(1.0), 0.0, 0.04),
    (S.warmup_cosine(1.0), 0.05, 0.52),
    (S.warmup_cosine(1.0), 0.1, 1.0),
    (S.warmup_cosine(1.0), 0.55, 0.500005),
    (S.warmup_cosine(1.0), 1.0, 1e-5),
    (S.sgdr(1.0, 2), 0.0, 1.0),  # cycles of 1/3 and 2/3
    (S.sgdr(1.0, 2), 1 / 6, 0.5),
    (S.sgdr(1.0, 2), 1 / 3, 1.0),  # the restart
    (S.sgdr(1.0, 2), 2 / 3, 0.5),
    (S.sgdr(1.0, 2), 1.0, 0.0),
    (S.sgdr(1.0, 2, cycle_mult=1, lr_min=0.2), 0.25, 0.6),
    (S.sgdr(1.0, 3, cycle_mult=1), 0.5, 0.5),
    (S.sgdr(1.0, 3, cycle_mult=1), 2 / 3, 1.0),
]


@pytest.mark.parametrize(("f", "pos", "expected"), GOLDEN)
def test_golden_values(f, pos, expected):
    assert f(pos) == pytest.approx(expected, rel=1e-12, abs=1e-15)


# ---- properties ------------------------------------------------------------------------------

LR_MAX = [1e-4, 3e-2, 1.0, 7.5]
PCTS = [0.05, 0.25, 0.3, 0.5, 0.9]
GRID = np.linspace(0.0, 1.0, 401)


def _warmup_anneal(kind, lr_max, pct):
    if kind == "one_cycle":
        return S.one_cycle(lr_max, 25.0, 1e5, pct)
    return S.warmup_cosine(lr_max, pct, 25.0, 1e5)


@pytest.mark.parametrize("kind", ["one_cycle", "warmup_cosine"])
@pytest.mark.parametrize("lr_max", LR_MAX)
@pytest.mark.parametrize("pct", PCTS)
def test_warmup_never_decreases_anneal_never_increases(kind, lr_max, pct):
    f = _warmup_anneal(kind, lr_max, pct)
    up = [f(p) for p in GRID[GRID <= pct]] + [f(pct)]
    down = [f(pct)] + [f(p) for p in GRID[GRID >= pct]]
    assert all(b >= a for a, b in pairwise(up))
    assert all(b <= a for a, b in pairwise(down))
    assert max(f(p) for p in GRID) <= lr_max
    assert f(pct) == lr_max  # the peak is exactly lr_max


@pytest.mark.parametrize("pct", PCTS)
@pytest.mark.parametrize("moms", [(0.95, 0.85, 0.95), (0.9, 0.8, 0.99)])
def test_one_cycle_moms_down_then_up(pct, moms):
    f = S.one_cycle_moms(moms, pct)
    down = [f(p) for p in GRID[GRID <= pct]]
    up = [f(p) for p in GRID[GRID >= pct]]
    assert all(b <= a for a, b in pairwise(down))
    assert all(b >= a for a, b in pairwise(up))
    assert (f(0.0), f(pct), f(1.0)) == moms


@pytest.mark.parametrize("pct", PCTS)
def test_flat_cos_flat_then_never_increases(pct):
    f = S.flat_cos(0.3, 1e3, pct)
    assert all(f(p) == 0.3 for p in GRID[GRID <= pct])
    vals = [f(p) for p in GRID]
    assert all(b <= a for a, b in pairwise(vals))


@pytest.mark.parametrize(("n_cycles", "mult"), [(1, 2.0), (3, 1.0), (3, 2.0), (4, 1.5)])
def test_sgdr_each_cycle_anneals_then_restarts(n_cycles, mult):
    f = S.sgdr(2.0, n_cycles, mult, lr_min=0.1)
    lengths = [mult**i for i in range(n_cycles)]
    starts = np.cumsum([0.0] + lengths[:-1]) / sum(lengths)
    for i, s in enumerate(starts):
        assert f(s) == pytest.approx(2.0, rel=1e-12)  # every cycle restarts at lr_max
        end = starts[i + 1] if i + 1 < n_cycles else 1.0
        vals = [f(p) for p in np.linspace(s, end, 50)[:-1]]
        assert all(b <= a for a, b in pairwise(vals))
    assert f(1.0) == 0.1


def test_sgdr_a_rounding_error_short_of_a_restart_is_the_restart():
    f = S.sgdr(1.0, 2, cycle_mult=1)
    assert f(np.nextafter(0.5, 0.0)) == 1.0  # not the end of the first cycle, 0


def _all_schedules():
    return {
        "constant": (S.constant(0.3), 0.3, 0.3),
        "linear": (S.linear(0.1, 0.7), 0.1, 0.7),
        "cosine": (S.cosine(0.1, 0.7), 0.1, 0.7),
        "exponential": (S.exponential(1e-7, 10.0), 1e-7, 10.0),
        "polynomial": (S.polynomial(0.3, 0.1, 1.7), 0.3, 0.1),
        "join": (S.join([S.linear(0.2, 1.0), S.cosine(1.0, 0.3)], [0.4, 0.6]), 0.2, 0.3),
        "one_cycle": (S.one_cycle(0.1, 25.0, 1e5, 0.3), 0.1 / 25, 0.1 / 1e5),
        "one_cycle_moms": (S.one_cycle_moms(), 0.95, 0.95),
        "flat_cos": (S.flat_cos(0.1, 7.0), 0.1, 0.1 / 7),
        "warmup_cosine": (S.warmup_cosine(0.1, 0.1, 25.0, 1e5), 0.1 / 25, 0.1 / 1e5),
        "sgdr": (S.sgdr(0.1, 5, 1.3, 0.01), 0.1, 0.01),
    }


@pytest.mark.parametrize("name", list(_all_schedules()))
def test_endpoints_exact_and_pos_clamped(name):
    f, first, last = _all_schedules()[name]
    assert f(0.0) == first  # bitwise: the first step uses exactly the start value
    assert f(1.0) == last  # bitwise: the last step uses exactly the end value
    for pos in (-1e-9, -0.5, -3.0, -math.inf):
        assert f(pos) == first
    for pos in (1.0 + 1e-9, 1.5, 10.0, math.inf):
        assert f(pos) == last


@pytest.mark.parametrize("lr_max", LR_MAX)
def test_one_cycle_endpoints_exact_over_grid(lr_max):
    for div in (2.0, 25.0, 1e3):
        for div_final in (10.0, 1e5):
            for pct in (0.1, 0.25, 0.3, 0.7):
                f = S.one_cycle(lr_max, div, div_final, pct)
                assert f(0.0) == lr_max / div
                assert f(pct) == lr_max
                assert f(1.0) == lr_max / div_final


@pytest.mark.parametrize(("start", "end"), [(1e-7, 10.0), (3e-5, 7e-1), (0.9, 1e-6), (2.0, 3.0),
                                           (0.3, 0.7)])  # 0.3 * (0.7 / 0.3) != 0.7
def test_simple_phases_endpoints_exact_over_grid(start, end):
    for f in (S.linear(start, end), S.cosine(start, end), S.exponential(start, end),
              S.polynomial(start, end, 0.5), S.polynomial(start, end, 3.0)):
        assert (f(0.0), f(1.0)) == (start, end)


def test_schedules_are_pure():
    f = S.one_cycle(1.0)
    first = [f(p) for p in GRID]
    f(0.9)
    f(-1.0)
    assert [f(p) for p in GRID] == first  # no hidden state: same pos, same value


# ---- torch's OneCycleLR as an oracle ---------------------------------------------------------


def _torch_one_cycle(n, lr_max, div, div_final, pct):
    """LR and momentum that torch's OneCycleLR gives at steps 0..n-1."""
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=lr_max, momentum=0.9)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=lr_max, total_steps=n, pct_start=pct, div_factor=div,
        final_div_factor=div_final / div, anneal_strategy="cos", three_phase=False,
        base_momentum=0.85, max_momentum=0.95)
    lrs, moms = [], []
    for i in range(n):
        lrs.append(opt.param_groups[0]["lr"])
        moms.append(opt.param_groups[0]["momentum"])
        if i < n - 1:
            opt.step()
            sched.step()
    return lrs, moms


ORACLE = [(n, lr, div, div_final, pct) for n, lr, div, div_final, pct in [
    (10, 1.0, 25.0, 1e5, 0.25), (100, 0.1, 25.0, 1e5, 0.25), (37, 3e-3, 10.0, 1e4, 0.3),
    (200, 2.0, 5.0, 50.0, 0.5), (51, 0.01, 25.0, 1e5, 0.1), (8, 0.5, 4.0, 1e3, 0.75)]]


@pytest.mark.parametrize(("n", "lr_max", "div", "div_final", "pct"), ORACLE)
def test_one_cycle_matches_torch_at_every_step_with_aligned_boundary(n, lr_max, div, div_final,
                                                                     pct):
    # torch puts the peak at step pct*n - 1, lrfind at pos = pct, i.e. step pct*(n-1). The two
    # curves are the same cosines, so giving torch pct' with pct'*n - 1 == pct*(n-1) must make
    # them agree at every step (LR and momentum), up to rounding.
    torch_pct = (pct * (n - 1) + 1) / n
    lrs, moms = _torch_one_cycle(n, lr_max, div, div_final, torch_pct)
    f, m = S.one_cycle(lr_max, div, div_final, pct), S.one_cycle_moms((0.95, 0.85, 0.95), pct)
    for i in range(n):
        assert f(i / (n - 1)) == pytest.approx(lrs[i], rel=1e-9, abs=0), i
        assert m(i / (n - 1)) == pytest.approx(moms[i], rel=1e-9, abs=0), i


@pytest.mark.parametrize(("n", "lr_max", "div", "div_final", "pct"), ORACLE)
def test_one_cycle_vs_torch_same_pct_agree_at_ends_only(n, lr_max, div, div_final, pct):
    # With the same pct_start the endpoints agree (first lr_max/div, last lr_max/div_final,
    # torch's final_div_factor being div_final/div) but the peaks sit at different steps.
    lrs, _ = _torch_one_cycle(n, lr_max, div, div_final, pct)
    f = S.one_cycle(lr_max, div, div_final, pct)
    ours = [f(i / (n - 1)) for i in range(n)]
    assert ours[0] == pytest.approx(lrs[0], rel=1e-12) == lr_max / div
    assert ours[-1] == pytest.approx(lrs[-1], rel=1e-12)
    assert ours[-1] == lr_max / div_final
    # torch's peak (exactly lr_max) is at step pct*n - 1; ours at pos pct
    if float(pct * n).is_integer():
        assert max(lrs) == pytest.approx(lr_max, rel=1e-12)
        assert lrs.index(max(lrs)) == round(pct * n - 1)
    else:  # the peak falls between two steps: torch never uses lr_max itself
        assert max(lrs) < lr_max * (1 - 1e-9)
    assert f(pct) == lr_max
    diff = max(abs(a - b) for a, b in zip(ours, lrs, strict=True))
    assert diff > 1e-4 * lr_max  # different boundaries really give different curves
    assert diff < 0.5 * lr_max


# ---- bad inputs ------------------------------------------------------------------------------

BAD = [
    (lambda: S.constant("a"), "^value must be a finite number"),
    (lambda: S.constant(float("nan")), "^value must be a finite number"),
    (lambda: S.linear(float("inf"), 1.0), "^start must be a finite number"),
    (lambda: S.linear(True, 1.0), "^start must be a finite number"),
    (lambda: S.cosine(1.0, None), "^end must be a finite number"),
    (lambda: S.exponential(0.0, 1.0), "^start must be > 0"),
    (lambda: S.exponential(1.0, -1.0), "^end must be > 0"),
    (lambda: S.polynomial(1.0, 0.0, power=0), "^power must be > 0"),
    (lambda: S.join([], []), "phases and pcts must be non-empty"),
    (lambda: S.join([S.constant(1.0)], [0.5, 0.5]), "phases and pcts must be non-empty and of "
                                                    "equal length, got 1 and 2"),
    (lambda: S.join([S.constant(1.0)], [0.5]), "pcts must sum to 1"),
    (lambda: S.join([S.constant(1.0)] * 2, [0.5, 0.499]), "pcts must sum to 1"),
    (lambda: S.join([S.constant(1.0)] * 2, [1.0, 0.0]), "pcts must all be > 0"),
    (lambda: S.join([S.constant(1.0)] * 2, [0.5, "x"]), "^pcts must be a finite number"),
    (lambda: S.one_cycle(0.0), "^lr_max must be > 0"),
    (lambda: S.one_cycle(-1.0), "^lr_max must be > 0"),
    (lambda: S.one_cycle(1.0, div=0), "^div must be > 0"),
    (lambda: S.one_cycle(1.0, div_final=-1e5), "^div_final must be > 0"),
    (lambda: S.one_cycle(1.0, pct_start=0.0), r"^pct_start must be in \(0, 1\), got 0.0"),
    (lambda: S.one_cycle(1.0, pct_start=1.0), r"^pct_start must be in \(0, 1\)"),
    (lambda: S.one_cycle(1.0, pct_start=1.5), r"^pct_start must be in \(0, 1\)"),
    (lambda: S.one_cycle_moms((0.9, 0.8)), "^moms must be a sequence of three values"),
    (lambda: S.one_cycle_moms(0.9), "^moms must be a sequence of three values"),
    (lambda: S.one_cycle_moms((0.9, "a", 0.9)), "^moms must be a finite number"),
    (lambda: S.one_cycle_moms(pct_start=-0.1), "^pct_start must be in"),
    (lambda: S.one_cycle_moms((0.95, 1.2, 0.95)), r"^moms must lie in \[0, 1\), got \(0.95, 1.2"),
    (lambda: S.one_cycle_moms((-0.1, 0.85, 0.95)), r"^moms must lie in \[0, 1\)"),
    (lambda: S.one_cycle_moms((0.95, 0.85, 1.0)), r"^moms must lie in \[0, 1\)"),
    (lambda: S.flat_cos(-1.0), "^lr must be > 0"),
    (lambda: S.flat_cos(1.0, pct_start=1.0), "^pct_start must be in"),
    (lambda: S.warmup_cosine(1.0, warmup_pct=0.0), "^warmup_pct must be in"),
    (lambda: S.warmup_cosine(1.0, div=float("inf")), "^div must be a finite number"),
    (lambda: S.sgdr(1.0, 0), "^n_cycles must be an integer >= 1, got 0"),
    (lambda: S.sgdr(1.0, 1.5), "^n_cycles must be an integer >= 1"),
    (lambda: S.sgdr(1.0, True), "^n_cycles must be an integer >= 1"),
    (lambda: S.sgdr(1.0, np.int64(0)), "^n_cycles must be an integer >= 1"),
    (lambda: S.sgdr(0.0, 2), "^lr_max must be > 0"),
    (lambda: S.sgdr(1.0, 2, cycle_mult=0), "^cycle_mult must be > 0"),
    (lambda: S.sgdr(1.0, 2, lr_min=float("nan")), "^lr_min must be a finite number"),
]


@pytest.mark.parametrize(("call", "match"), BAD)
def test_bad_inputs_raise_value_error_naming_the_parameter(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_join_refuses_a_phase_that_is_not_a_schedule():
    with pytest.raises(TypeError, match=r"^phases must be schedules f\(pos\) -> value, got 0.1"):
        S.join([0.1, S.constant(1.0)], [0.5, 0.5])

# ---- doctests --------------------------------------------------------------------------------


def test_doctests_pass():
    result = doctest.testmod(S, verbose=False, report=False)
    assert result.attempted >= 10
    assert result.failed == 0
