"""Suggestion functions: golden values on synthetic curves, bad input, and properties."""

import warnings

import numpy as np
import pytest
from helpers import noisy_fall

from lrfind.recorder import smooth
from lrfind.suggest import (
    SUGGESTIONS,
    auto,
    drop_to_noise,
    minimum,
    slide,
    steep,
    suggestion_input,
    valley,
)

X = np.linspace(-6, 0, 76)  # log10(lr), 0.08 decade apart
LRS = 10**X
# falls around lr = 1e-3 (tanh centre), bottoms out near 0.04, blows up past 0.1
DROP = 1 - 0.5 * np.tanh(2 * (X + 3)) + 0.05 * np.exp(4 * (X + 0.5))


def _log(v):
    return float(np.log10(v))


# ---- suggestion_input ------------------------------------------------------------------------
def test_input_skips_num_it_over_10_and_5():
    lrs, losses = suggestion_input(np.arange(100.0), np.arange(100.0), num_it=100)
    assert lrs[0] == 10 and lrs[-1] == 94 and len(lrs) == 85
    assert np.array_equal(lrs, losses)


def test_input_cuts_at_first_non_finite():
    losses = np.arange(100.0)
    losses[60] = np.nan
    losses[80] = np.inf
    lrs, out = suggestion_input(np.arange(100.0), losses, num_it=100)
    assert lrs[0] == 10 and lrs[-1] == 54  # cut at 60, then 5 skipped
    assert np.isfinite(out).all()


@pytest.mark.parametrize("n, expected", [(12, (3, 9)), (20, (5, 15)), (3, (0, 3)), (40, (10, 35))])
def test_input_short_runs_keep_at_least_half(n, expected):
    lrs, _ = suggestion_input(np.arange(float(n)), np.ones(n), num_it=100)
    assert (int(lrs[0]), int(lrs[-1]) + 1) == expected
    assert len(lrs) >= n / 2


def test_input_empty_and_all_nan():
    assert len(suggestion_input(np.array([]), np.array([]), 100)[0]) == 0
    assert len(suggestion_input(np.ones(50), np.full(50, np.nan), 100)[0]) == 0


def test_input_checks_args():
    with pytest.raises(ValueError, match="differ in length"):
        suggestion_input(np.ones(3), np.ones(4), 100)
    with pytest.raises(ValueError, match="num_it.*-1"):
        suggestion_input(np.ones(3), np.ones(3), -1)


# ---- golden values ---------------------------------------------------------------------------
def test_minimum_of_a_bowl_is_its_bottom_over_10():
    x = np.linspace(-5, 0, 51)
    assert minimum(10**x, 1 + (x + 2) ** 2) == pytest.approx(1e-3)


def test_minimum_takes_the_centre_of_a_flat_bottom():
    x = np.linspace(-5, 0, 51)
    losses = np.where(np.abs(x + 2) <= 0.5, 0.0, (np.abs(x + 2) - 0.5) ** 2)
    assert _log(minimum(10**x, losses)) == pytest.approx(-3, abs=0.05)


def test_minimum_takes_the_run_within_a_tenth_of_the_drop():
    x = np.linspace(-6, 0, 121)
    # falls by 1 to its lowest at 1e-4, then rises 0.1 a decade: within 10% of the drop
    # from 1e-4 to 1e-3, whose middle in log10 is -3.5 (-3 with 20%)
    losses = np.where(x < -4, 1 + 0.5 * (-4 - x), 1 + 0.1 * (x + 4))
    assert _log(minimum(10**x, losses)) == pytest.approx(-4.5, abs=0.15)


def test_steep_finds_the_middle_of_the_descent():
    assert _log(steep(LRS, DROP)) == pytest.approx(-3, abs=0.1)


def test_steep_ignores_noise_before_the_descent():
    rng = np.random.default_rng(0)
    noisy = DROP + np.where(X < -4.5, 0.05 * rng.standard_normal(len(X)), 0.0)
    assert _log(steep(LRS, noisy)) == pytest.approx(-3, abs=0.15)


def test_steep_takes_the_middle_of_a_descent_of_constant_slope():
    # straight descent from -4 to -2: every point is "the steepest"; the answer is its middle
    x = np.linspace(-6, 0, 76)
    losses = 1 - 0.25 * np.clip(x + 4, 0, 2) + 0.05 * np.exp(4 * (x + 0.5))
    assert _log(steep(10**x, losses)) == pytest.approx(-3, abs=0.1)


def test_steep_is_steadier_than_the_argmin_of_the_slope():
    rng = np.random.default_rng(3)
    x = np.linspace(-6, 0, 76)
    base = 1 - 0.25 * np.clip(x + 4, 0, 2) + 0.05 * np.exp(4 * (x + 0.5))
    ours, naive = [], []
    for _ in range(20):
        losses = base + 0.01 * rng.standard_normal(len(x))
        ours.append(_log(steep(10**x, losses)))
        naive.append(x[np.argmin(np.gradient(losses, x))])
    assert np.std(ours) < 0.5 * np.std(naive)


def test_a_falling_start_is_not_taken_for_the_descent():
    # a moving average warming up on a few high first losses falls at tiny LRs
    warm_up = DROP + 0.4 * np.exp(-3 * (X + 6))
    assert _log(steep(LRS, warm_up)) == pytest.approx(_log(steep(LRS, DROP)), abs=0.15)
    assert _log(auto(LRS, warm_up)) == pytest.approx(_log(auto(LRS, DROP)), abs=0.15)


def test_steep_ignores_a_warm_up_fall_far_below_a_small_descent():
    # a small real drop (0.2, steepest at 10^-1.75) and, 4 decades lower, a moving average
    # warming up on high first losses that falls faster than the real drop
    small = 1 - 0.1 * np.tanh(2 * (X + 1.75)) + 0.05 * np.exp(4 * (X + 0.5))
    warm_up = small + 0.4 * np.exp(-4 * (X + 6))
    assert _log(steep(LRS, small)) == pytest.approx(-1.75, abs=0.1)
    assert _log(steep(LRS, warm_up)) == pytest.approx(_log(steep(LRS, small)), abs=0.05)


@pytest.mark.parametrize("name", ["minimum", "steep", "auto"])
def test_a_low_first_point_is_not_the_minimum(name):
    # noise makes the first points lower than the real minimum: nothing fell to them
    dip = DROP.copy()
    dip[:4] = DROP.min() - 0.2
    assert _log(SUGGESTIONS[name](LRS, dip)) == pytest.approx(_log(SUGGESTIONS[name](LRS, DROP)),
                                                              abs=0.1)


@pytest.mark.parametrize("name", ["minimum", "steep", "auto"])
def test_a_fall_after_the_blow_up_is_not_the_descent(name):
    # the loss blows up to just under the divergence threshold, then comes part of the way
    # down again, by more than the real descent fell: the sweep ran to its end
    blown = DROP + 3.0 * np.exp(-8 * (X + 0.5) ** 2) * (X > -0.5) + 2.0 * (X > -0.5)
    drop = DROP.max() - DROP.min()
    assert blown.max() - blown[-1] > drop  # the fall is the larger one
    cut = X <= -0.5  # the curve of a sweep that stopped at the blow-up
    assert _log(SUGGESTIONS[name](LRS, blown)) == pytest.approx(
        _log(SUGGESTIONS[name](LRS[cut], DROP[cut])), abs=0.15)  # was up to 1.5 decades off


@pytest.mark.parametrize("name", ["minimum", "steep", "auto"])
def test_the_blow_up_starts_where_the_loss_first_passes_4x_its_lowest(name):
    # falls to 0.5, jumps to 2.25 (4.5x) for 5 points, then falls far lower: the stop rule
    # (div_th=4) would have ended the sweep at the jump, so nothing from there counts
    losses = np.r_[np.ones(20), np.linspace(1, 0.5, 20), np.full(6, 0.5), np.full(5, 2.25),
                   np.linspace(2.25, 0.05, 25)]
    assert SUGGESTIONS[name](LRS, losses) == SUGGESTIONS[name](LRS[:46], losses[:46])


@pytest.mark.parametrize("name", ["minimum", "steep", "auto"])
def test_a_run_past_its_blow_up_is_read_before_it(name):
    # stop_div=False: the loss climbs to 1e30 before it turns non-finite
    past = DROP.copy()
    past[X > -0.5] = 10.0 ** (4 + 60 * (X[X > -0.5] + 0.5))
    assert past.max() > 1e30
    cut = X <= -0.5
    assert _log(SUGGESTIONS[name](LRS, past)) == pytest.approx(
        _log(SUGGESTIONS[name](LRS[cut], DROP[cut])), abs=0.15)


def test_minimum_of_an_early_bowl():
    # the run diverged soon after its minimum, which sits in the first fifth of the curve
    x = np.linspace(-5, 0, 51)
    assert minimum(10**x, 1 + (x + 4) ** 2) == pytest.approx(1e-5)


def test_valley_on_a_v_shape():
    losses = np.r_[np.arange(10.0, 0, -1), np.arange(2.0, 8)]  # 10..1 then up
    lrs = np.arange(1.0, len(losses) + 1)
    # longest decreasing run: length 10 ending at index 9; 9 - 10 + int(10/3) + int(10/6) = 3
    assert valley(lrs, losses) == 4.0


def test_valley_counts_a_run_of_equal_losses_once():
    losses = np.r_[10.0, 9, 9, 9, 8, 7, 7, 7, 6, 5, 4, 3, 2, 1, np.arange(2.0, 8)]
    lrs = np.arange(1.0, len(losses) + 1)
    # strictly decreasing: 10, 9, 8, ..., 1, length 10 ending at index 13: 13 - 10 + 3 + 1 = 7
    assert valley(lrs, losses) == 8.0


def test_slide_golden():
    i = np.arange(50.0)
    flat_then_quadratic = np.where(i < 29, 1.0, 1 + 0.02 * (i - 29) ** 2)
    # slopes differ by > 0.005 across 15 points until the right end reaches index 28; the
    # answer is the left end of the window before, as in fastai 2.8 (checked against it)
    assert slide(i + 1, flat_then_quadratic) == 15.0
    assert slide(i[:30] + 1, np.ones(30)) == 15.0  # the first window qualifies: lrs[-16]


def test_slide_takes_slopes_that_differ_by_exactly_thresh():
    i = np.arange(30.0)
    assert slide(i + 1, 2 - 0.01 * i, thresh=0) == 15.0  # a line: its slopes differ by 0


def test_slide_returns_first_lr_when_no_window_is_flat():
    i = np.arange(30.0)
    assert slide(i + 1, 0.01 * i**3) == 1.0


def test_auto_is_geometric_mean_of_half_drop_and_half_a_decade_below_the_lowest_loss():
    half = -3.0  # the tanh is halfway down at its centre
    lowest = _log(minimum(LRS, DROP)) + 1
    assert _log(auto(LRS, DROP)) == pytest.approx((half + lowest - 0.5) / 2, abs=0.02)
    assert half < _log(auto(LRS, DROP)) < lowest - 0.5 < 0  # below the blow-up


def test_auto_warns_on_a_denser_sweep_than_it_is_made_for():
    dense = np.linspace(-6, 0, 601)  # 100 points a decade
    with pytest.warns(UserWarning, match="100 points a decade"):
        assert np.isfinite(auto(10**dense, 1 - 0.5 * np.tanh(2 * (dense + 3))))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        auto(LRS, DROP)  # 12.5 points a decade: silent
    x = np.linspace(-6, 0, 361)  # 60 points a decade, just over AUTO_MAX_DENSITY
    with pytest.warns(UserWarning, match="60 points a decade"):
        auto(10**x, 1 - 0.5 * np.tanh(2 * (x + 3)))


def test_registry():
    assert SUGGESTIONS == {
        "minimum": minimum, "steep": steep, "valley": valley, "slide": slide, "auto": auto
    }


# ---- bad input -------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(SUGGESTIONS))
@pytest.mark.parametrize("n", [0, 1, 2])
def test_too_short_returns_none_with_warning(name, n):
    with pytest.warns(UserWarning, match=f"{name}: needs at least"):
        assert SUGGESTIONS[name](LRS[:n], DROP[:n]) is None


def test_slide_needs_16_points():
    with pytest.warns(UserWarning, match="at least 16"):
        assert slide(LRS[:15], DROP[:15]) is None
    assert slide(LRS[:16], DROP[:16]) is not None


@pytest.mark.parametrize(("kwargs", "match"), [
    (dict(width=0), r"^width must be an integer >= 1, got 0"),
    (dict(width=2.5), r"^width must be an integer >= 1, got 2.5"),
    (dict(thresh=-0.1), r"^thresh must be >= 0, got -0.1"),
    (dict(thresh="x"), r"^thresh must be a finite number, got 'x'"),
])
def test_slide_checks_its_parameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        slide(LRS, DROP, **kwargs)


@pytest.mark.parametrize("name", list(SUGGESTIONS))
def test_a_non_positive_lr_cuts_the_curve(name):
    lrs = LRS.copy()
    lrs[50] = 0.0
    assert SUGGESTIONS[name](lrs, DROP) == SUGGESTIONS[name](LRS[:50], DROP[:50])


@pytest.mark.parametrize("name", list(SUGGESTIONS))
def test_nan_never_becomes_the_answer(name):
    losses = DROP.copy()
    losses[60:] = np.nan  # a NaN past the minimum: cut there
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        value = SUGGESTIONS[name](LRS, losses)
    assert value is not None and np.isfinite(value) and value <= LRS[59]


@pytest.mark.parametrize("name", list(SUGGESTIONS))
def test_leading_nan_gives_none_not_an_error(name):
    losses = DROP.copy()
    losses[0] = np.nan
    with pytest.warns(UserWarning):
        assert SUGGESTIONS[name](LRS, losses) is None


@pytest.mark.parametrize("name", list(SUGGESTIONS))
def test_too_few_points_warning_points_at_the_caller(name):
    with pytest.warns(UserWarning, match="needs at least") as record:
        assert SUGGESTIONS[name](LRS[:2], DROP[:2]) is None
    assert record[0].filename == __file__


@pytest.mark.parametrize("name", ["steep", "auto"])
def test_flat_curve_gives_none_for_descent_rules(name):
    with pytest.warns(UserWarning, match="never fell"):
        assert SUGGESTIONS[name](LRS, np.ones_like(LRS)) is None


@pytest.mark.parametrize("name", ["minimum", "valley", "slide"])
def test_flat_curve_still_finite_for_the_others(name):
    value = SUGGESTIONS[name](LRS, np.ones_like(LRS))
    assert np.isfinite(value) and LRS[0] / 10 <= value <= LRS[-1]


def test_mismatched_lengths_raise():
    with pytest.raises(ValueError, match="differ in length"):
        minimum(LRS, DROP[:-1])


# ---- properties ------------------------------------------------------------------------------
def _noisy_curves(count=8):
    rng = np.random.default_rng(1)
    for _ in range(count):
        shift = rng.uniform(-1, 1)
        x = X + shift
        yield 10**x, DROP + 0.01 * rng.standard_normal(len(X)), shift


@pytest.mark.parametrize("name", list(SUGGESTIONS))
def test_answers_are_finite_and_in_range(name):
    for lrs, losses, _ in _noisy_curves():
        value = SUGGESTIONS[name](lrs, losses)
        assert np.isfinite(value) and lrs[0] / 10 <= value <= lrs[-1]


@pytest.mark.parametrize("name", list(SUGGESTIONS))
def test_scaling_lrs_scales_the_answer(name):
    for lrs, losses, _ in _noisy_curves(3):
        expected = 7 * SUGGESTIONS[name](lrs, losses)
        assert SUGGESTIONS[name](lrs * 7.0, losses) == pytest.approx(expected)


@pytest.mark.parametrize("name", ["minimum", "steep", "valley", "auto"])
def test_affine_loss_change_keeps_the_answer(name):
    # slide is the exception: its 0.005 threshold is in absolute loss units
    for lrs, losses, _ in _noisy_curves(3):
        expected = SUGGESTIONS[name](lrs, losses)
        assert SUGGESTIONS[name](lrs, 3 * losses - 2) == pytest.approx(expected)


@pytest.mark.parametrize("scale", [1e-10, 1e250])
@pytest.mark.parametrize("name", ["minimum", "steep", "valley", "auto"])
def test_the_loss_scale_does_not_matter(name, scale):
    for lrs, losses, _ in _noisy_curves(3):
        expected = SUGGESTIONS[name](lrs, losses)
        assert SUGGESTIONS[name](lrs, scale * losses) == pytest.approx(expected)


@pytest.mark.parametrize("name", ["minimum", "steep", "auto"])
def test_a_minimum_two_points_after_the_peak_stays_in_range(name):
    # the start level is read from the peak up to the minimum, never from points after it
    lrs = np.logspace(-6.7, -4.8, 6)
    value = SUGGESTIONS[name](lrs, np.array([-0.47, -0.33, -0.30, 1.44, -0.53, 0.92]))
    assert lrs[0] / 10 <= value <= lrs[-1]


@pytest.mark.parametrize("name", ["minimum", "steep", "auto"])
def test_answers_follow_a_shifted_curve(name):
    base = _log(SUGGESTIONS[name](LRS, DROP))
    for lrs, losses, shift in _noisy_curves():
        assert _log(SUGGESTIONS[name](lrs, losses)) == pytest.approx(base + shift, abs=0.2)


def test_robust_minimum_is_steadier_than_argmin():
    # a wide flat bottom with noise: the argmin wanders, the centre of the bottom does not
    rng = np.random.default_rng(2)
    x = np.linspace(-5, 0, 63)
    base = np.where(np.abs(x + 2) <= 0.6, 0.0, (np.abs(x + 2) - 0.6) ** 2)
    ours, naive = [], []
    for _ in range(20):
        losses = base + 0.02 * rng.standard_normal(len(x))
        ours.append(_log(minimum(10**x, losses)))
        naive.append(x[np.argmin(losses)] - 1)
    assert np.std(ours) < 0.5 * np.std(naive)
    assert np.median(ours) == pytest.approx(-3, abs=0.15)


def test_local_linear_matches_polyfit_oracle():
    from lrfind.suggest import _local_linear

    rng = np.random.default_rng(3)
    x = np.sort(rng.uniform(-7, 1, 60))
    y = np.sin(x) + 0.1 * rng.standard_normal(60)
    value, slope = _local_linear(x, y, 0.5)
    for i in range(0, 60, 7):
        inside = np.abs(x - x[i]) <= 0.5
        b, a = np.polyfit(x[inside], y[inside], 1)
        assert slope[i] == pytest.approx(b, abs=1e-9)
        assert value[i] == pytest.approx(a + b * x[i], abs=1e-9)


def test_long_runs_are_fast():
    x = np.linspace(-7, 1, 20_000)
    with pytest.warns(UserWarning, match="points a decade"):
        assert np.isfinite(auto(10**x, 1 - 0.5 * np.tanh(2 * (x + 3)) + 0.05 * np.exp(4 * x)))


# ---- drop_to_noise: can the curve be read at all? -------------------------------------------
def test_drop_to_noise_falls_as_the_noise_grows():
    ratios = [drop_to_noise(*noisy_fall(size), num_it=100) for size in (0.02, 0.1, 0.5, 2.0)]
    assert ratios == sorted(ratios, reverse=True)
    assert ratios[0] > 10 and ratios[-1] < 1  # a clean fall reads; one within the noise does not


def test_drop_to_noise_is_about_drop_over_noise_on_a_long_sweep():
    # 300 steps: the smoothed curve keeps up with the fall of 1, so the ratio is near 1 / 0.2
    lrs, raw, smoothed = noisy_fall(0.2, n=300)
    assert 4 < drop_to_noise(lrs, raw, smoothed, num_it=300) < 6


def test_drop_to_noise_ignores_the_loss_scale_and_offset():
    lrs, raw, smoothed = noisy_fall(0.3)
    base = drop_to_noise(lrs, raw, smoothed, 100)
    for scale, offset in ((1e-6, 5.0), (1e200, 0.0), (1.0, -5.0)):  # tiny, huge, negative
        moved = drop_to_noise(lrs, scale * raw + offset, scale * smoothed + offset, 100)
        assert moved == pytest.approx(base)


@pytest.mark.parametrize("n", [8, 12, 16, 20, 24, 32])
def test_drop_to_noise_stays_finite_on_a_sparse_sweep(n):
    # a few points a decade: the noise is not measured as zero, not even without noise
    clean, noisy = (drop_to_noise(*noisy_fall(size, n=n), num_it=n) for size in (0.0, 0.3))
    assert 0 < clean < 100 and 0 < noisy < 1 / 0.3 * 1.5


def test_drop_to_noise_on_a_linear_sweep():
    lrs = np.linspace(1e-4, 2e-2, 100)
    clear, noisy = (drop_to_noise(*noisy_fall(size, lrs=lrs), 100) for size in (0.02, 2.0))
    assert clear > 10 and noisy < 1


def test_drop_to_noise_of_a_run_past_its_blow_up():
    lrs, raw, _ = noisy_fall(0.1)
    base = drop_to_noise(lrs, raw, smooth(raw), 100)
    raw[90:] *= np.logspace(1, 30, 10)  # stop_div=False: on to 1e30
    value = drop_to_noise(lrs, raw, smooth(raw), 100)
    assert np.isfinite(value) and value == pytest.approx(base, rel=0.5)


def test_drop_to_noise_is_none_without_a_fall():
    lrs = np.logspace(-7, 1, 100)
    assert drop_to_noise(lrs, np.ones(100), np.ones(100), 100) is None
    lrs, raw, smoothed = noisy_fall(0.1)
    assert drop_to_noise(lrs[:4], raw[:4], smoothed[:4], 100) is None  # too few points


def test_drop_to_noise_reads_up_to_the_first_non_finite_loss():
    lrs, raw, smoothed = noisy_fall(0.1)
    cut = drop_to_noise(lrs[:60], raw[:60], smoothed[:60], 100)
    raw[60:], smoothed[60:] = np.inf, np.nan  # the run stopped on an inf loss, mid-fall
    assert drop_to_noise(lrs, raw, smoothed, 100) == cut


def test_drop_to_noise_checks_lengths():
    lrs, raw, smoothed = noisy_fall(0.1)
    with pytest.raises(ValueError, match="lrs, raw_losses and losses differ in length: 100, 99, "
                                         "100"):
        drop_to_noise(lrs, raw[:-1], smoothed, 100)
