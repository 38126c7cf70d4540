"""Suggestion functions: pure ``f(lrs, losses) -> lr | None`` over numpy arrays.

Every function takes the *suggestion input* built by :func:`suggestion_input` (smoothed
losses of the range test, cut at the first non-finite value, warm-up and tail skipped) and
returns a float, or ``None`` with a warning when there are too few points for its rule
(or, for ``steep`` and ``auto``, when the loss never falls below its start level).
They are registered by name in :data:`SUGGESTIONS`.

>>> lrs = np.logspace(-5, 0, 50)
>>> losses = 1 + (np.log10(lrs) + 2) ** 2       # lowest at lr = 1e-2
>>> f"{minimum(lrs, losses):.0e}"
'1e-03'

Every rule on one curve that is flat, falls steepest at 1e-3, bottoms out near 2e-2 and
blows up:

>>> x = np.linspace(-6, 0, 120)  # log10 of the LRs of a 120-step sweep
>>> losses = 2.3 - 2 / (1 + np.exp(-4 * (x + 3))) + np.exp(5 * (x + 0.7))
>>> for name, f in SUGGESTIONS.items():
...     print(f"{name:8s}{f(10**x, losses):.1e}")
minimum 1.8e-03
steep   1.0e-03
valley  1.3e-04
slide   4.7e-04
auto    2.4e-03
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from .utils import check_int, check_number, warn

__all__ = ["SUGGESTIONS", "auto", "drop_to_noise", "minimum", "slide", "steep", "suggestion_input",
           "valley"]

#: half-width, in decades of LR, of the window that smooths the curve for minimum/steep/auto
WINDOW = 0.25
#: points per decade of LR above which ``auto`` warns that its suggestion runs low
AUTO_MAX_DENSITY = 50
#: decades below the lowest loss within which ``steep`` looks for the steepest descent
STEEP_SPAN = 3.0
#: ``drop_to_noise`` under which the range test warns that its curve is too noisy to read
READABLE = 1.0


def suggestion_input(
    lrs: np.ndarray, smooth_losses: np.ndarray, num_it: int
) -> tuple[np.ndarray, np.ndarray]:
    """Cut at the first non-finite loss, skip ``num_it // 10`` points at the start and 5 at the end.

    Each skip is capped at a quarter of the points left after the cut, so a short run
    (early divergence) keeps at least half of its points instead of becoming empty.

    >>> x, y = suggestion_input(np.arange(1.0, 101), np.ones(100), num_it=100)
    >>> float(x[0]), float(x[-1]), len(x)
    (11.0, 95.0, 85)
    """
    lrs = np.asarray(lrs, dtype=float).ravel()
    losses = np.asarray(smooth_losses, dtype=float).ravel()
    if len(lrs) != len(losses):
        raise ValueError(f"lrs and smooth_losses differ in length: {len(lrs)} != {len(losses)}")
    if isinstance(num_it, bool) or not isinstance(num_it, (int, np.integer)) or num_it < 0:
        raise ValueError(f"num_it must be a non-negative int, got {num_it!r}")
    bad = np.flatnonzero(~(np.isfinite(losses) & np.isfinite(lrs)))
    n = int(bad[0]) if len(bad) else len(losses)
    start = min(int(num_it) // 10, n // 4)
    end = min(5, n // 4)
    return lrs[start : n - end], losses[start : n - end]


def _warm(n: int) -> int:
    """How many first points of an ``n``-point curve are too noisy to start or end a drop."""
    return max(5, n // 10)


def _prepare(lrs: np.ndarray, losses: np.ndarray, need: int, name: str | None,
             to_blow_up: bool = False):
    """Finite float arrays (cut at the first non-finite value or lr <= 0), or None + a warning.

    The warning names the rule ``name``; with ``name=None`` there is none.

    ``to_blow_up`` also cuts where the loss first passes both 4x its lowest value so far
    (the range test's divergence rule with the default ``div_th``; the first tenth of the
    points aside) and every value before it: the blow-up of a run that went on past it
    (``stop_div=False``), where the loss can reach 1e30 and swamp the fits of the curve
    before it; nothing there is a minimum or a descent.
    """
    lrs = np.asarray(lrs, dtype=float).ravel()
    losses = np.asarray(losses, dtype=float).ravel()
    if len(lrs) != len(losses):
        raise ValueError(f"lrs and losses differ in length: {len(lrs)} != {len(losses)}")
    bad = np.flatnonzero(~(np.isfinite(losses) & np.isfinite(lrs) & (lrs > 0)))
    n = int(bad[0]) if len(bad) else len(losses)
    warm = _warm(n)
    if to_blow_up and n > warm:
        y = losses[warm:n]
        best, top = np.minimum.accumulate(y), np.maximum.accumulate(losses[:n])[warm - 1:-1]
        # 4x in a form for any sign, as the stop rule; a new high over the whole curve so far
        over = np.flatnonzero((y - best > 3 * np.abs(best)) & (y > top))
        n = warm + int(over[0]) if len(over) else n
    if n < need:
        if name is not None:
            warn(f"{name}: needs at least {need} finite points, got {n}; no suggestion "
                 "(run the range test longer or with a smaller start_lr)")
        return None
    return lrs[:n], losses[:n]


def _local_linear(x: np.ndarray, y: np.ndarray, h: float) -> tuple[np.ndarray, np.ndarray]:
    """Fit a line to the points within ``h`` of each ``x[i]``; return (value, slope) at each x[i].

    A box-kernel local regression: with the usual exponential LR grid it is a moving
    least-squares fit over a fixed number of points; it works for any grid spacing.
    Window sums come from prefix sums, so it is O(n log n) for any number of points.
    """
    order = np.argsort(x, kind="stable")
    y_mean = y.mean()
    xs, ys = x[order] - x.mean(), y[order] - y_mean  # centred: prefix sums stay accurate
    scale = float(np.abs(ys).max()) or 1.0  # scaled: any loss magnitude neither under- nor
    ys = ys / scale                          # overflows in the sums of squares
    lo = np.searchsorted(xs, xs - h - 1e-12, side="left")
    hi = np.searchsorted(xs, xs + h + 1e-12, side="right")

    def window_sum(v: np.ndarray) -> np.ndarray:
        c = np.concatenate([[0.0], np.cumsum(v)])
        return c[hi] - c[lo]

    n = (hi - lo).astype(float)
    mx, my = window_sum(xs) / n, window_sum(ys) / n
    sxx = window_sum(xs * xs) - n * mx * mx
    sxy = window_sum(xs * ys) - n * mx * my
    ok = sxx > 1e-12 * np.maximum(n, 1.0)
    slope = np.where(ok, sxy / np.where(ok, sxx, 1.0), 0.0)
    value, out_slope = np.empty_like(xs), np.empty_like(xs)
    value[order] = scale * (my + slope * (xs - mx)) + y_mean
    out_slope[order] = scale * slope
    return value, out_slope


def _descent(fit: np.ndarray) -> tuple[int, int, float]:
    """(start j, minimum i, start level) of the descent of a smoothed curve.

    The minimum ``i`` is the bottom of the largest drop: the point furthest below the
    highest point before it, ``p``. On a clean curve that is the lowest point; it differs
    when noise in the first few points (the moving average has seen few batches there)
    dips below the real minimum, since nothing fell to that dip. A drop whose bottom is
    higher than a point between the first tenth of the curve and its peak is a fall after
    the blow-up (the loss can come down from a peak just under the divergence threshold):
    then the curve is read only up to that peak. The start level is the median of the
    first third of ``p..i`` (at least 5 points, none past ``i``), and the descent starts at
    ``j``, the last point at or above that level before the minimum.
    """
    warm = _warm(len(fit))
    while True:
        i = int(np.argmax(np.maximum.accumulate(fit) - fit))
        p = int(np.argmax(fit[: i + 1]))
        if p <= warm or fit[i] <= fit[warm:p].min():
            break
        fit = fit[:p]  # a prefix: indices stay those of the whole curve
    head = np.sort(fit[p : min(i + 1, p + max(5, (i - p) // 3))])
    level = float((head[(len(head) - 1) // 2] + head[len(head) // 2]) / 2)  # np.median, faster
    above = np.flatnonzero(fit[: i + 1] >= level)
    return (int(above[-1]) if len(above) else 0), i, level


def _smoothed_descent(
    lrs: np.ndarray, losses: np.ndarray, name: str | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, tuple[int, int, float]] | None:
    """(log10 lrs, curve smoothed over +-2*WINDOW, its slope, ``_descent``) or None + a warning.

    None when there are fewer than 5 finite points or the smoothed loss never falls
    below its start level; the warning names the rule ``name`` (none for ``name=None``).
    """
    data = _prepare(lrs, losses, 5, name, to_blow_up=True)
    if data is None:
        return None
    lx = np.log10(data[0])
    fit, slope = _local_linear(lx, data[1], 2 * WINDOW)
    descent = _descent(fit)
    _, i, level = descent
    if level - fit[i] > 1e-9 * abs(level):
        return lx, data[1], fit, slope, descent
    if name is not None:
        warn(f"{name}: the loss never fell below its start level; no suggestion")
    return None


def _minimum_lr(lx: np.ndarray, losses: np.ndarray) -> float:
    """log10 of the LR at the middle of the flat bottom of the curve (smoothed over WINDOW)."""
    fit, _ = _local_linear(lx, losses, WINDOW)
    j, i, level = _descent(fit)
    near = fit <= fit[i] + 0.1 * max(level - fit[i], 0.0)
    lo, hi = i, i
    while lo > j and near[lo - 1]:
        lo -= 1
    while hi < len(fit) - 1 and near[hi + 1]:
        hi += 1
    return float(lx[lo : hi + 1].mean())


def minimum(lrs: np.ndarray, losses: np.ndarray) -> float | None:
    """LR at the lowest loss, divided by 10; the lowest loss is found robustly.

    The curve is smoothed by a local line over +-WINDOW decades; its minimum is the bottom
    of the largest drop (see ``_descent``), so a noisy low first point is not taken for it.
    "The lowest loss" is then the middle, in log10(lr), of the contiguous run of points
    around that minimum within 10% of the drop (start level - minimum) from it, so a flat
    bottom gives its centre instead of whichever point the noise makes lowest.
    """
    data = _prepare(lrs, losses, 3, "minimum", to_blow_up=True)
    if data is None:
        return None
    lrs, losses = data
    return float(10 ** _minimum_lr(np.log10(lrs), losses) / 10)


def steep(lrs: np.ndarray, losses: np.ndarray) -> float | None:
    """LR of the steepest descent: log10(lr) averaged over the descent with weights slope**2.

    The slope d loss / d log10(lr) is fitted by a local line over +-2*WINDOW decades.
    Only the descent counts (from its start level down to the smoothed minimum, see
    ``_descent``, and at most STEEP_SPAN decades below that minimum), so neither the
    blow-up nor the noisy start, where the moving average has seen few batches, can win.
    Weighting by the squared slope puts the answer at the most negative slope when the
    slope has one clear peak, and at the middle of a plateau of equal slopes instead of
    whichever point of it the noise makes steepest.
    """
    data = _smoothed_descent(lrs, losses, "steep")
    if data is None:
        return None
    lx, _, _, slope, (j, i, _) = data
    j = max(j, int(np.flatnonzero(lx[: i + 1] >= lx[i] - STEEP_SPAN)[0]))
    weight = np.clip(-slope[j : i + 1], 0.0, None)
    if weight.max() <= 0:
        return float(10 ** lx[j])
    weight = (weight / weight.max()) ** 2  # scaled first: squares of huge slopes overflow
    return float(10 ** (weight @ lx[j : i + 1] / weight.sum()))


def valley(lrs: np.ndarray, losses: np.ndarray) -> float | None:
    """fastai's valley: longest strictly decreasing subsequence of losses, LR about halfway into it.

    ``L[i]`` is the length of the longest strictly decreasing subsequence ending at ``i``;
    with ``e`` the first index of the largest ``L`` and ``s = e - L[e]``, the answer is
    ``lrs[s + int(L[e] / 3) + int(L[e] / 6)]``. O(n^2) in vectorised numpy (n ~ 100).
    """
    data = _prepare(lrs, losses, 3, "valley")
    if data is None:
        return None
    lrs, losses = data
    n = len(losses)
    lds = np.ones(n, dtype=int)
    for i in range(1, n):
        higher = losses[:i] > losses[i]  # earlier points a decreasing run can come from
        if higher.any():
            lds[i] = lds[:i][higher].max() + 1
    end = int(np.argmax(lds))
    length = int(lds[end])
    idx = end - length + int(length / 3) + int(length / 6)
    return float(lrs[min(max(idx, 0), n - 1)])


def slide(
    lrs: np.ndarray, losses: np.ndarray, width: int = 15, thresh: float = 0.005
) -> float | None:
    """fastai's slide rule: slide a ``width``-point window left from the right end of the curve.

    The slope is ``np.gradient(losses)`` on the index grid; the window ``(l, l + width)``
    moves left until its end slopes differ by at most ``thresh`` (absolute loss units, so the
    rule depends on the loss scale). As in fastai, the answer is ``lrs[l]`` of the last window
    that did not qualify (``lrs[n - 1 - width]`` when the first one does), and ``lrs[0]`` when
    none does. Defaults: width=15, thresh=0.005; needs ``width + 1`` points.
    """
    width = check_int("width", width)
    if check_number("thresh", thresh) < 0:
        raise ValueError(f"thresh must be >= 0, got {thresh!r}")
    data = _prepare(lrs, losses, width + 1, "slide")
    if data is None:
        return None
    lrs, losses = data
    grad = np.gradient(losses)
    last = len(losses) - 1
    for right in range(last, width - 1, -1):
        if abs(grad[right] - grad[right - width]) <= thresh:
            return float(lrs[right - width + (right < last)])
    return float(lrs[0])


def _fallen(lx: np.ndarray, fit: np.ndarray, descent: tuple[int, int, float],
            share: float = 0.5) -> float:
    """log10 LR where the smoothed loss last crosses, before its minimum, ``share`` of its drop."""
    _, i, start = descent
    level = fit[i] + (1 - share) * (start - fit[i])
    above = np.flatnonzero(fit[: i + 1] > level)
    j = int(above[-1]) if len(above) else 0
    if j >= i:
        return float(lx[j])
    # linear interpolation between j (above the level) and j + 1 (at or below it)
    t = min(max((fit[j] - level) / (fit[j] - fit[j + 1]), 0.0), 1.0)
    return float(lx[j] + t * (lx[j + 1] - lx[j]))


def auto(lrs: np.ndarray, losses: np.ndarray) -> float | None:
    """The lr_max for one-cycle: sqrt(half_drop * lowest / sqrt(10)), a geometric mean.

    ``half_drop`` is the LR at which the curve (smoothed over +-0.5 decade) has fallen
    halfway from its start level to its minimum: the middle of the descent, where
    training is fast but far from the blow-up. ``lowest`` is the LR at the lowest loss
    (:func:`minimum` times 10); half a decade below it is bold but clear of the blow-up.
    The two anchors err in different directions from seed to seed, so their mean in log
    space is steadier than either. In log10: ``(log half_drop + log lowest - 0.5) / 2``.
    Made for range tests of 100-300 steps over 1e-7..10 (12-37 points a decade): a
    denser sweep trains more at small LRs, so its whole curve, and every suggestion,
    moves to smaller LRs; above AUTO_MAX_DENSITY points a decade a warning says so.
    """
    data = _smoothed_descent(lrs, losses, "auto")
    if data is None:
        return None
    lx, losses, fit, _, descent = data
    density = 1 / max(float(np.median(np.diff(lx))), 1e-12)
    if density > AUTO_MAX_DENSITY:
        warn(
            f"auto: the range test has {density:.0f} points a decade; auto is made for "
            "100-300 steps over 1e-7..10 (12-37 a decade) and suggests too low an LR on much "
            "denser sweeps")
    return float(10 ** ((_fallen(lx, fit, descent) + _minimum_lr(lx, losses) - 0.5) / 2))


def drop_to_noise(lrs: np.ndarray, raw_losses: np.ndarray, losses: np.ndarray,
                  num_it: int) -> float | None:
    """How far the smoothed loss falls, in batch-to-batch standard deviations of the raw loss.

    ``drop / noise``: ``drop`` is the fall of the smoothed curve ``losses`` that ``steep``
    and ``auto`` read (start level - minimum of the suggestion input, see ``_descent``), and
    ``noise`` the std of one batch's loss about its local trend, ``std(second differences of
    raw_losses) / sqrt(6)``, along that fall (at least its last 10 points). Under READABLE
    (1.0) the curve falls by less than the loss of one batch varies: its shape, and every
    suggestion read from it, then changes from run to run (on lrfind's benchmark tasks, the
    runs under 1 are those of the tasks whose suggestions spread most between seeds). None
    when there is no fall to measure (fewer than 5 points, or a curve that never falls); inf
    for a loss without noise.

    >>> from lrfind.recorder import smooth
    >>> lrs = np.logspace(-7, 1, 100)
    >>> fall = 2 - 1 / (1 + np.exp(-4 * (np.log10(lrs) + 2.5)))  # from 2 to 1 around 3e-3
    >>> noise = np.random.default_rng(0).normal(0, 1, 100)
    >>> for size in (0.05, 1.0):
    ...     raw = fall + size * noise
    ...     print(f"{drop_to_noise(lrs, raw, smooth(raw), num_it=100):.1f}")
    11.4
    0.4
    """
    lrs = np.asarray(lrs, dtype=float).ravel()
    raw = np.asarray(raw_losses, dtype=float).ravel()
    losses = np.asarray(losses, dtype=float).ravel()
    if not len(lrs) == len(raw) == len(losses):
        raise ValueError(f"lrs, raw_losses and losses differ in length: {len(lrs)}, "
                         f"{len(raw)}, {len(losses)}")
    data = _smoothed_descent(*suggestion_input(lrs, losses, num_it), None)
    if data is None:
        return None
    lx, _, fit, _, (j, i, level) = data
    ok = (lrs > 0) & np.isfinite(raw)
    x, y = np.log10(lrs[ok]), raw[ok]
    fall = y[x <= lx[i]][-max(10, int(np.sum((x >= lx[j]) & (x <= lx[i])))):]
    if len(fall) < 5:
        return None
    scale = float(np.abs(fall).max()) or 1.0  # scaled: huge losses do not overflow the std
    noise = float(np.diff(fall / scale, 2).std()) / math.sqrt(6)
    drop = (level - float(fit[i])) / scale
    return drop / noise if noise > 0 else math.inf


SUGGESTIONS: dict[str, Callable[[np.ndarray, np.ndarray], float | None]] = {
    "minimum": minimum,
    "steep": steep,
    "valley": valley,
    "slide": slide,
    "auto": auto,
}
