"""Schedules: pure functions of training progress ``pos`` in [0, 1].

A schedule is a plain function ``f(pos) -> value``; ``pos`` is clamped to [0, 1]. Complex
schedules are joins of simple phases. There is no step counter: resuming means recomputing
``pos``. For optimizer step ``i`` of ``n`` the trainer uses ``pos = i / (n - 1)``, so the first
step gets ``f(0)`` and the last exactly ``f(1)``.

>>> f = one_cycle(1.0)
>>> [round(f(p), 4) for p in (0, 0.25, 1)]
[0.04, 1.0, 0.0]
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Sequence

from .utils import check_int as _check_int
from .utils import check_number as _check_number
from .utils import check_pct as _check_pct
from .utils import check_positive as _check_positive

Schedule = Callable[[float], float]

__all__ = [
    "Schedule", "constant", "linear", "cosine", "exponential", "polynomial", "join",
    "one_cycle", "one_cycle_moms", "flat_cos", "warmup_cosine", "sgdr",
]


def _clamp(pos: float) -> float:
    return 0.0 if pos <= 0.0 else 1.0 if pos >= 1.0 else pos


def constant(value: float) -> Schedule:
    """``f(pos) = value``.

    >>> constant(0.1)(0.7)
    0.1
    """
    value = _check_number("value", value)
    return lambda pos: value


def linear(start: float, end: float) -> Schedule:
    """``f(pos) = start + (end - start) * pos``.

    >>> linear(0.0, 2.0)(0.25)
    0.5
    """
    start, end = _check_number("start", start), _check_number("end", end)
    return lambda pos: end if pos >= 1 else start + (end - start) * _clamp(pos)  # exact ends


def cosine(start: float, end: float) -> Schedule:
    """``f(pos) = end + (start - end) * (1 + cos(pi * pos)) / 2``.

    >>> cosine(1.0, 0.0)(0.5)
    0.5
    """
    start, end = _check_number("start", start), _check_number("end", end)
    return lambda pos: start if pos <= 0 else (  # exact at 0; cos(pi) == -1 makes 1 exact
        end + (start - end) * (1.0 + math.cos(math.pi * _clamp(pos))) / 2.0)


def exponential(start: float, end: float) -> Schedule:
    """``f(pos) = start * (end / start) ** pos``; start and end > 0.

    >>> round(exponential(1e-3, 1e-1)(0.5), 6)
    0.01
    """
    start, end = _check_positive("start", start), _check_positive("end", end)
    ratio = end / start
    return lambda pos: end if pos >= 1 else start * ratio ** _clamp(pos)  # exact ends


def polynomial(start: float, end: float, power: float = 2.0) -> Schedule:
    """``f(pos) = end + (start - end) * (1 - pos) ** power``; power > 0 (default 2).

    >>> polynomial(1.0, 0.0)(0.5)
    0.25
    """
    start, end = _check_number("start", start), _check_number("end", end)
    power = _check_positive("power", power)
    return lambda pos: start if pos <= 0 else end + (start - end) * (1.0 - _clamp(pos)) ** power


def join(phases: Sequence[Schedule], pcts: Sequence[float]) -> Schedule:
    """Run ``phases[i]`` over a share ``pcts[i]`` of progress; the shares sum to 1.

    ``f(pos) = phases[i]((pos - s[i]) / pcts[i])`` where ``s[i] = sum(pcts[:i]) <= pos <
    s[i + 1]``: inside phase i, the phase sees its own progress from 0 to 1. At a boundary the
    next phase starts; ``f(1)`` is the last phase's value at 1.

    >>> f = join([linear(0, 1), constant(1.0)], [0.5, 0.5])
    >>> f(0.25), f(0.75)
    (0.5, 1.0)
    """
    if len(phases) == 0 or len(phases) != len(pcts):
        raise ValueError(f"phases and pcts must be non-empty and of equal length, got "
                         f"{len(phases)} and {len(pcts)}")
    for phase in phases:
        if not callable(phase):
            raise TypeError(f"phases must be schedules f(pos) -> value, got {phase!r}")
    for p in pcts:
        if _check_number("pcts", p) <= 0:
            raise ValueError(f"pcts must all be > 0, got {list(pcts)!r}")
    if abs(sum(pcts) - 1.0) > 1e-6:
        raise ValueError(f"pcts must sum to 1, got {list(pcts)!r} (sum {sum(pcts)})")
    starts = [0.0]
    for p in pcts[:-1]:
        starts.append(starts[-1] + p)
    widths = list(pcts)

    def f(pos: float) -> float:
        pos = _clamp(pos)
        i = bisect.bisect_right(starts, pos) - 1
        return phases[i]((pos - starts[i]) / widths[i])

    return f


def one_cycle(lr_max: float, div: float = 25.0, div_final: float = 1e5,
              pct_start: float = 0.25) -> Schedule:
    """One-cycle learning rate: a cosine warm-up, then a cosine decay.

    Cosine ``lr_max/div -> lr_max`` over ``pct_start``, then cosine ``lr_max ->
    lr_max/div_final``. Defaults: div=25, div_final=1e5 (relative to lr_max), pct_start=0.25.

    >>> f = one_cycle(0.1)
    >>> round(f(0), 6), f(0.25), round(f(1), 9)
    (0.004, 0.1, 1e-06)
    """
    lr_max = _check_positive("lr_max", lr_max)
    div, div_final = _check_positive("div", div), _check_positive("div_final", div_final)
    pct_start = _check_pct("pct_start", pct_start)
    return join([cosine(lr_max / div, lr_max), cosine(lr_max, lr_max / div_final)],
                [pct_start, 1.0 - pct_start])


def one_cycle_moms(moms: Sequence[float] = (0.95, 0.85, 0.95), pct_start: float = 0.25) -> Schedule:
    """One-cycle momentum: down while the LR warms up, back up while it decays.

    Cosine ``moms[0] -> moms[1]`` over ``pct_start``, then cosine ``moms[1] -> moms[2]``;
    each momentum in [0, 1). Defaults: moms=(0.95, 0.85, 0.95), pct_start=0.25.

    >>> f = one_cycle_moms()
    >>> f(0), f(0.25), f(1)
    (0.95, 0.85, 0.95)
    """
    if not isinstance(moms, Sequence) or len(moms) != 3:
        raise ValueError(f"moms must be a sequence of three values, got {moms!r}")
    m0, m1, m2 = (_check_number("moms", m) for m in moms)
    if not all(0.0 <= m < 1.0 for m in (m0, m1, m2)):  # SGD momentum or Adam's beta1
        raise ValueError(f"moms must lie in [0, 1), got {tuple(moms)!r}")
    pct_start = _check_pct("pct_start", pct_start)
    return join([cosine(m0, m1), cosine(m1, m2)], [pct_start, 1.0 - pct_start])


def flat_cos(lr: float, div_final: float = 1e5, pct_start: float = 0.75) -> Schedule:
    """Flat, then cosine: ``lr`` for ``pct_start``, then cosine ``lr -> lr/div_final``.

    Defaults: div_final=1e5, pct_start=0.75.

    >>> f = flat_cos(0.1)
    >>> f(0.5), round(f(1), 9)
    (0.1, 1e-06)
    """
    lr = _check_positive("lr", lr)
    div_final = _check_positive("div_final", div_final)
    pct_start = _check_pct("pct_start", pct_start)
    return join([constant(lr), cosine(lr, lr / div_final)], [pct_start, 1.0 - pct_start])


def warmup_cosine(lr_max: float, warmup_pct: float = 0.1, div: float = 25.0,
                  div_final: float = 1e5) -> Schedule:
    """Linear warmup, then cosine decay.

    Linear ``lr_max/div -> lr_max`` over ``warmup_pct``, then cosine ``lr_max ->
    lr_max/div_final``. Defaults: warmup_pct=0.1, div=25, div_final=1e5.

    >>> f = warmup_cosine(1.0)
    >>> f(0), f(0.1), round(f(1), 9)
    (0.04, 1.0, 1e-05)
    """
    lr_max = _check_positive("lr_max", lr_max)
    div, div_final = _check_positive("div", div), _check_positive("div_final", div_final)
    warmup_pct = _check_pct("warmup_pct", warmup_pct)
    return join([linear(lr_max / div, lr_max), cosine(lr_max, lr_max / div_final)],
                [warmup_pct, 1.0 - warmup_pct])


def sgdr(lr_max: float, n_cycles: int, cycle_mult: float = 2.0, lr_min: float = 0.0) -> Schedule:
    """Cosine with warm restarts (SGDR).

    ``n_cycles`` cosines ``lr_max -> lr_min``, cycle i lasting ``cycle_mult ** i`` times the
    first: ``f(pos) = lr_min + (lr_max - lr_min) * (1 + cos(pi * t)) / 2``, ``t`` in [0, 1)
    the progress within the current cycle (``t = 1`` only at ``pos = 1``). Defaults:
    cycle_mult=2, lr_min=0.

    >>> f = sgdr(1.0, 2, cycle_mult=1)
    >>> f(0), f(0.25), f(0.5)
    (1.0, 0.5, 1.0)
    """
    lr_max = _check_positive("lr_max", lr_max)
    n_cycles = _check_int("n_cycles", n_cycles)
    cycle_mult = _check_positive("cycle_mult", cycle_mult)
    lr_min = _check_number("lr_min", lr_min)
    lengths = [cycle_mult ** i for i in range(n_cycles)]
    starts = [sum(lengths[:i]) for i in range(n_cycles)]  # in units of the first cycle
    total = sum(lengths)
    anneal = cosine(lr_max, lr_min)

    def f(pos: float) -> float:
        x = _clamp(pos) * total
        # a position a rounding error short of a restart is the restart
        i = bisect.bisect_right(starts, x + 1e-9 * total) - 1
        return anneal(min(max((x - starts[i]) / lengths[i], 0.0), 1.0))

    return f
