"""The swap rules on synthetic reading sequences: exact swap steps, pinned."""

import jax.numpy as jnp
import numpy as np
import optax
import pytest

import twophase_optax as tpo
from twophase_optax import swap_detection

PAPER = swap_detection.PAPER_RULE


def reference_rule(readings, gn_factor, smoothing, patience, min_rise):
    """The default rule in plain Python: the index of the triggering reading."""
    smoothed = gn_max = first = None
    below = 0
    for n, g in enumerate(readings):
        smoothed = g if smoothed is None else smoothed + smoothing * (g - smoothed)
        first = smoothed if first is None else first
        gn_max = smoothed if gn_max is None else max(gn_max, smoothed)
        fell = gn_max >= min_rise * first and smoothed <= gn_factor * gn_max
        below = below + 1 if fell else 0
        if below >= patience:
            return n
    return None


def noisy_rise_then_fall(seed, n=60, peak=25):
    rng = np.random.default_rng(seed)
    t = np.arange(n)
    clean = 0.02 + 0.08 * np.exp(-(((t - peak) / 8.0) ** 2))
    return (clean * rng.uniform(0.85, 1.15, n)).astype(np.float32)


# Pinned: a noisy rise peaking at reading 26 (0-based; seed 0), whose start
# jitters by 15%.
@pytest.mark.parametrize(
    "rule, expected",
    [
        (PAPER, 1),  # the raw rule fires on the first dip: 0.019 <= 0.9 * 0.021
        ({**PAPER, "patience": 3}, 3),  # three dips in a row
        ({**PAPER, "smoothing": 0.3}, 3),  # a smoothed dip
        # All three: the early dips do not count before the 1.5-fold rise,
        # and the smoothed fall after the peak needs three readings.
        ({"gn_factor": 0.9, "smoothing": 0.3, "patience": 3, "min_rise": 1.5}, 32),
        # The default: ten readings after the peak the smoothed reading has
        # halved from its maximum.
        ({}, 36),
    ],
)
def test_noisy_rise_then_fall_swaps_at_a_pinned_step(rule, expected):
    readings = noisy_rise_then_fall(0)
    assert swap_detection.replay(readings, **rule) == expected


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("gn_factor", [0.5, 0.9])
def test_replay_equals_the_plain_python_rule(seed, gn_factor):
    readings = noisy_rise_then_fall(seed)
    default = dict(
        smoothing=swap_detection.DEFAULT_SMOOTHING,
        patience=swap_detection.DEFAULT_PATIENCE,
        min_rise=swap_detection.DEFAULT_MIN_RISE,
    )
    for rule in (
        dict(smoothing=1.0, patience=1, min_rise=1.0),
        default,
        dict(smoothing=0.1, patience=2, min_rise=2.0),
    ):
        expected = reference_rule(readings.tolist(), gn_factor, **rule)
        assert swap_detection.replay(readings, gn_factor=gn_factor, **rule) == expected


def test_monotone_fall_swaps_at_once_with_the_paper_rule_and_never_by_default():
    readings = [1.0, 0.95, 0.85, 0.7, 0.5, 0.3, 0.2, 0.1]
    assert swap_detection.replay(readings, **PAPER) == 2  # 0.85 <= 0.9 * 1.0
    # No rise, so no peak: the default keeps the first phase.
    assert swap_detection.replay(readings) is None
    # Without min_rise the smoothed reading halves by reading 6: 1, 0.985,
    # 0.945, 0.872, 0.760, 0.622, 0.495.
    assert swap_detection.replay(readings, min_rise=1.0) == 6


def test_plateau_never_swaps():
    readings = [0.1] * 5 + [0.3] * 40
    for rule in (PAPER, {}):
        assert swap_detection.replay(readings, **rule) is None


def test_min_rise_ignores_an_inflated_first_reading():
    # Like mnist5k: a large first reading, a drop, then the real rise and fall.
    readings = [3.0, 1.0, 1.2, 2.0, 4.0, 6.0, 8.0, 6.0, 4.0, 3.0, 2.0, 1.0, 0.5]
    assert swap_detection.replay(readings, **PAPER) == 1
    # Raw readings so that the numbers are plain: the maximum 8 >= 1.25 * 3
    # arms the test at reading 6, and reading 8 (4 <= 0.5 * 8) is the first
    # below it. Without min_rise reading 1 (1 <= 0.5 * 3) would be.
    assert swap_detection.replay(readings, smoothing=1.0) == 8
    assert swap_detection.replay(readings, smoothing=1.0, min_rise=1.0) == 1


def test_two_phase_swaps_where_replay_says():
    # Full-batch gradients whose norms follow a scripted rise and fall: a
    # linear loss with a slope scaled per step.
    readings = noisy_rise_then_fall(1, n=50)
    expected = swap_detection.replay(readings)
    opt = tpo.two_phase(optax.sgd(0.0), swap_rule="peak")
    w = jnp.zeros(2)
    state = opt.init(w)
    f = lambda w: jnp.sum(w)  # noqa: E731
    swapped_after = None
    for step, g in enumerate(readings):
        grad = jnp.array([g, 0.0])
        _, state = opt.update(grad, state, w, value=f(w), value_fn=f)
        if state.in_second_phase:
            swapped_after = step
            break
    assert int(state.detection.detect_step) == expected == swapped_after
    assert int(state.swap_step) == expected + 1


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"smoothing": 0.0}, "smoothing"),
        ({"smoothing": 1.5}, "smoothing"),
        ({"patience": 0}, "patience"),
        ({"patience": 2.0}, "patience"),
        ({"min_rise": 0.5}, "min_rise"),
        ({"gn_factor": 1.0}, "gn_factor"),
    ],
)
def test_bad_detector_settings_raise_in_the_factory(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tpo.two_phase(**kwargs)


def test_detector_state_is_scalars_of_fixed_dtype():
    state = tpo.two_phase(window=4, statistic="mean_norm").init(
        {"w": jnp.zeros((3, 3), jnp.bfloat16)}
    )
    for name, x in state.detection._asdict().items():
        if x is None:
            continue
        assert jnp.shape(x) == (), name
        assert x.dtype in (jnp.float32, jnp.int32), name
