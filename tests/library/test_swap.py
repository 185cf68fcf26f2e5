"""The swap rules of ``tpo.swap``: exact swap steps, pinned, and their combinations."""

import inspect

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import twophase_optax as tpo
from twophase_optax import swap

PAPER = dict(gn_factor=0.9, smoothing=1.0, patience=1, min_rise=1.0)


def replay_peak(readings, **settings):
    return swap.replay(swap.peak(**settings), grad_norm=readings)


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
    assert replay_peak(readings, **rule) == expected


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("gn_factor", [0.5, 0.9])
def test_peak_replay_equals_the_plain_python_rule(seed, gn_factor):
    readings = noisy_rise_then_fall(seed)
    default = dict(
        smoothing=swap.DEFAULT_SMOOTHING,
        patience=swap.DEFAULT_PATIENCE,
        min_rise=swap.DEFAULT_MIN_RISE,
    )
    for rule in (
        dict(smoothing=1.0, patience=1, min_rise=1.0),
        default,
        dict(smoothing=0.1, patience=2, min_rise=2.0),
    ):
        expected = reference_rule(readings.tolist(), gn_factor, **rule)
        assert replay_peak(readings, gn_factor=gn_factor, **rule) == expected


def test_monotone_fall_swaps_at_once_with_the_paper_rule_and_never_by_default():
    readings = [1.0, 0.95, 0.85, 0.7, 0.5, 0.3, 0.2, 0.1]
    assert replay_peak(readings, **PAPER) == 2  # 0.85 <= 0.9 * 1.0
    # No rise, so no peak: the default keeps the first phase.
    assert replay_peak(readings) is None
    # Without min_rise the smoothed reading halves by reading 6: 1, 0.985,
    # 0.945, 0.872, 0.760, 0.622, 0.495.
    assert replay_peak(readings, min_rise=1.0) == 6


def test_plateau_never_swaps():
    readings = [0.1] * 5 + [0.3] * 40
    for rule in (PAPER, {}):
        assert replay_peak(readings, **rule) is None


def test_min_rise_ignores_an_inflated_first_reading():
    # Like mnist5k: a large first reading, a drop, then the real rise and fall.
    readings = [3.0, 1.0, 1.2, 2.0, 4.0, 6.0, 8.0, 6.0, 4.0, 3.0, 2.0, 1.0, 0.5]
    assert replay_peak(readings, **PAPER) == 1
    # Raw readings so that the numbers are plain: the maximum 8 >= 1.25 * 3
    # arms the test at reading 6, and reading 8 (4 <= 0.5 * 8) is the first
    # below it. Without min_rise reading 1 (1 <= 0.5 * 3) would be.
    assert replay_peak(readings, smoothing=1.0) == 8
    assert replay_peak(readings, smoothing=1.0, min_rise=1.0) == 1


def test_two_phase_swaps_where_replay_says():
    # Full-batch gradients whose norms follow a scripted rise and fall: a
    # linear loss with a slope scaled per step.
    readings = noisy_rise_then_fall(1, n=50)
    expected = replay_peak(readings)
    opt = tpo.two_phase(optax.sgd(0.0), swap=swap.per_window(swap.peak(), steps=1))
    w = jnp.zeros(2)
    state = opt.init(w)
    update = jax.jit(opt.update, static_argnames="value_fn")
    f = lambda w: jnp.sum(w)  # noqa: E731
    swapped_after = None
    for step, g in enumerate(readings):
        grad = jnp.array([g, 0.0])
        _, state = update(grad, state, w, value=f(w), value_fn=f)
        if state.in_second_phase:
            swapped_after = step
            break
    assert int(optax.tree.get(state, "detect_step")) == expected == swapped_after
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
def test_bad_peak_settings_raise_in_the_factory(kwargs, match):
    with pytest.raises(ValueError, match=f"tpo.swap.peak: {match}"):
        swap.peak(**kwargs)


def test_peak_state_with_mean_norm_is_scalars_of_fixed_dtype():
    rule = swap.per_window(swap.peak(statistic="mean_norm"), steps=4)
    opt = tpo.two_phase(swap=rule)
    state = opt.init({"w": jnp.zeros((3, 3), jnp.bfloat16)})
    for path, x in jax.tree_util.tree_leaves_with_path(state.swap):
        assert jnp.shape(x) == (), path
        assert x.dtype in (jnp.float32, jnp.int32), path


# -- the loss plateau --------------------------------------------------
def reference_plateau(means, rtol, patience, smoothing):
    """The rule in plain Python: per window, whether the plateau holds."""
    smoothed, best, bad, flags = None, np.inf, 0, []
    for m in means:
        smoothed = m if smoothed is None else smoothed + smoothing * (m - smoothed)
        if smoothed < (1 - rtol) * best:
            best, bad = smoothed, 0
        elif smoothed > best / (1 - rtol):  # a spike
            bad = 0
        else:
            bad += 1
        flags.append(bad >= patience)
    return flags


def noisy_decay(seed, n=80, floor=1e-4):
    """A loss falling tenfold every 20 windows to a floor, with 20% noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(n)
    clean = np.maximum(0.1 * 10.0 ** (-t / 20), floor)
    return (clean * rng.uniform(0.8, 1.2, n)).astype(np.float32)


def replay_plateau(means, **settings):
    """Per window: whether the plateau rule holds there."""
    rule = swap.plateau(**settings)
    state = rule.init(jnp.zeros(()))
    flags = []
    for k, m in enumerate(means):
        reading = swap.Reading(
            step=jnp.asarray(k),
            complete=jnp.asarray(True),
            value=jnp.asarray(m, jnp.float32),
            grad_norm=jnp.zeros(()),
            mean_grad_norm=jnp.zeros(()),
            num_errors=None,
        )
        reason, state = rule.update(reading, state)
        flags.append(bool(reason > 0))
    return flags


@pytest.mark.parametrize(
    "settings, expected",
    [
        # The decay reaches its floor at window 60; the smoothed mean stops
        # improving by 10% soon after, and five windows later the rule fires.
        ({}, 67),
        # Without patience, the smoothed mean's first window without a 10%
        # fall counts (the decay is 11% a window, the noise 20%).
        ({"patience": 1}, 1),
        # Raw window means: a noisy window above the band around the best is
        # a spike and restarts the count, so three flat ones in a row come late.
        ({"smoothing": 1.0, "patience": 3}, 23),
    ],
)
def test_noisy_decay_plateaus_at_a_pinned_window(settings, expected):
    means = noisy_decay(0)
    assert swap.replay(swap.plateau(**settings), value=means) == expected
    assert replay_plateau(means, **settings).index(True) == expected


def test_a_spike_is_not_a_plateau():
    means = [4.0, 2.0, 1.0, 1.0, 1.0, 5.0, 5.0, 5.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    flags = replay_plateau(means, rtol=0.1, patience=5, smoothing=1.0)
    # Flat from window 3; the spike at 5-7 restarts the count, which reaches
    # five at window 12 (without the spike it would have at window 7).
    assert flags.index(True) == 12
    assert (
        replay_plateau(
            means[:5] + [1.0] * 9, rtol=0.1, patience=5, smoothing=1.0
        ).index(True)
        == 7
    )


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("rtol, patience, smoothing", [(0.1, 5, 0.3), (0.02, 2, 1.0)])
def test_plateau_replay_equals_the_plain_python_rule(seed, rtol, patience, smoothing):
    means = noisy_decay(seed)
    expected = reference_plateau(means.astype(np.float64), rtol, patience, smoothing)
    assert (
        replay_plateau(means, rtol=rtol, patience=patience, smoothing=smoothing)
        == expected
    )


def drive(opt, values, grads, window, params=None):
    """Feeds ``values`` and ``grads`` step by step; returns the final state."""
    params = jnp.zeros(2) if params is None else params
    f = lambda p: jnp.sum(p**2)  # noqa: E731  (value_fn; CG never runs here)
    state = opt.init(params)
    update = jax.jit(opt.update, static_argnames="value_fn")
    for v, g in zip(values, grads, strict=True):
        _, state = update(g, state, params, value=v, value_fn=f)
    return state


@pytest.mark.parametrize("window", [1, 4])
def test_two_phase_swaps_where_the_replay_says(window):
    means = noisy_decay(1)
    # Each window's values average to its mean: a spread around it.
    spread = np.linspace(-0.1, 0.1, window) if window > 1 else np.zeros(1)
    values = np.concatenate([m * (1 + spread) for m in means]).astype(np.float32)
    grads = [jnp.ones(2) * 0.01] * len(values)
    replayed = replay_plateau(means).index(True)
    opt = tpo.two_phase(swap=swap.per_window(swap.plateau(), steps=window))
    state = drive(opt, values, grads, window)
    assert int(state.swap_step) == (replayed + 1) * window
    assert int(optax.tree.get(state, "plateau_step")) == (replayed + 1) * window - 1


def test_peak_then_plateau_waits_for_the_peak():
    # The loss is flat from the start (a plateau at window 5), but the
    # gradient norm peaks at window 20 and halves (default rule) by 27.
    n = 40
    values = np.full(n, 0.5, np.float32)
    norms = np.concatenate([np.linspace(1, 3, 21), np.linspace(3, 0.5, n - 21)[1:]])
    norms = np.concatenate([norms, [0.5]])[:n]
    grads = [jnp.array([g, 0.0], jnp.float32) for g in norms]
    peak = replay_peak(norms)
    assert peak is not None and peak > 5
    per_step = lambda rule: tpo.two_phase(swap=swap.per_window(rule, steps=1))  # noqa: E731
    plateau_only = drive(per_step(swap.plateau()), values, grads, 1)
    assert int(plateau_only.swap_step) == replay_plateau(values).index(True) + 1
    rule = swap.after(swap.peak(), swap.plateau())
    armed = drive(per_step(rule), values, grads, 1)
    assert int(armed.swap_step) == peak + 1
    assert swap.SWAP_REASONS[int(armed.swap_reason)] == "plateau"
    assert swap.replay(rule, value=values, grad_norm=norms) == peak
    manual = drive(tpo.two_phase(swap=swap.manual()), values, grads, 1)
    assert int(manual.swap_step) == -1 and not manual.in_second_phase


def test_start_second_phase_swaps_on_the_next_step_and_compiles_once():
    f = lambda w: jnp.sum((w - 1.0) ** 2)  # noqa: E731
    opt = tpo.two_phase(optax.adam(0.1), swap=swap.manual())

    def step(w, state):
        value, grad = jax.value_and_grad(f)(w)
        updates, state = opt.update(grad, state, w, value=value, value_fn=f)
        return optax.apply_updates(w, updates), state

    chex.clear_trace_counter()
    step = jax.jit(chex.assert_max_traces(step, n=1))
    start = jax.jit(tpo.start_second_phase)
    w = jnp.array([-2.0, 3.0])
    state = opt.init(w)
    for k in range(8):
        if k == 4:
            state = start(state)
        w, state = step(w, state)
        if k == 4:
            # The swapped step is CG's first: steepest descent with an exact
            # line search reaches the minimum of this round quadratic at once.
            np.testing.assert_allclose(w, [1.0, 1.0], rtol=1e-5)
        elif k < 4:
            assert not state.in_second_phase
    assert int(state.swap_step) == 4 and bool(state.in_second_phase)
    assert swap.SWAP_REASONS[int(state.swap_reason)] == "manual"
    again = tpo.start_second_phase(state)  # Already swapped: unchanged.
    assert int(again.swap_step) == 4


def test_plateau_state_is_scalar_and_skips_non_finite_values():
    params = {"w": jnp.zeros((50, 40)), "b": jnp.zeros(40)}
    opt = tpo.two_phase(swap=swap.per_window(swap.plateau(), steps=2))
    state = opt.init(params)
    assert all(jnp.shape(x) == () for x in jax.tree.leaves(state.swap))
    f = lambda p: jnp.sum(p["w"] ** 2)  # noqa: E731
    grads = jax.tree.map(jnp.ones_like, params)
    _, state = opt.update(grads, state, params, value=1.0, value_fn=f)
    _, skipped = opt.update(grads, state, params, value=jnp.nan, value_fn=f)
    chex.assert_trees_all_equal(skipped.swap, state.swap)
    assert int(skipped.num_skipped) == 1


@pytest.mark.parametrize(
    "factory, kwargs",
    [
        (swap.plateau, {"rtol": 1.0}),
        (swap.plateau, {"rtol": -0.1}),
        (swap.plateau, {"patience": 0}),
        (swap.plateau, {"smoothing": 0.0}),
        (swap.plateau, {"min_windows": 0}),
        (swap.fitted, {"max_errors": -1}),
        (swap.fitted, {"max_errors": 0.5}),
        (swap.fitted, {"patience": 0}),
        (swap.at_step, {"n": -1}),
        (swap.at_step, {"n": 2.0}),
        (swap.default, {"steps_per_epoch": 0}),
    ],
)
def test_bad_rule_settings_raise_in_the_factory(factory, kwargs):
    name = next(iter(kwargs))
    with pytest.raises(ValueError, match=f"tpo.swap.{factory.__name__}: {name}"):
        factory(**kwargs)


# -- the fit rule -------------------------------------------------------------
def reference_fitted(counts, fit_errors, fit_patience):
    run, flags = 0, []
    for c in counts:
        run = run + 1 if c <= fit_errors else 0
        flags.append(run >= fit_patience)
    return flags


@pytest.mark.parametrize("fit_errors, fit_patience", [(0, 1), (0, 3), (2, 2)])
def test_fitted_replay_equals_the_plain_python_rule(fit_errors, fit_patience):
    counts = np.random.default_rng(0).integers(0, 4, 60)
    expected = reference_fitted(counts, fit_errors, fit_patience)
    found = swap.replay(
        swap.fitted(fit_errors, patience=fit_patience), num_errors=counts
    )
    assert found == expected.index(True)


def test_two_phase_fit_rule_swaps_after_the_fitted_windows():
    window = 3
    per_window = [9, 4, 0, 2, 0, 0, 1]  # fitted twice in a row at window 5
    counts = [c // window + (k < c % window) for c in per_window for k in range(window)]
    assert [sum(counts[i : i + window]) for i in range(0, 21, window)] == per_window
    rule = swap.per_window(swap.fitted(patience=2), steps=window)
    opt = tpo.two_phase(swap=rule)
    f = lambda p: jnp.sum(p**2)  # noqa: E731  (takes no extra arguments)
    params = jnp.array([1.0, -1.0])
    state = opt.init(params)
    update = jax.jit(opt.update, static_argnames="value_fn")
    for c in counts:
        _, state = update(
            jax.grad(f)(params),
            state,
            params,
            value=f(params),
            value_fn=f,
            num_errors=c,
        )
    assert int(optax.tree.get(state, "fitted_step")) == 6 * window - 1
    assert swap.SWAP_REASONS[int(state.swap_reason)] == "fitted"
    assert int(state.swap_step) == 6 * window
    assert bool(state.in_second_phase)


def test_fit_rule_without_counts_says_how_to_call_it():
    opt = tpo.two_phase(swap=swap.default(steps_per_epoch=3))
    params = jnp.zeros(2)
    f = lambda p: jnp.sum(p**2)  # noqa: E731
    with pytest.raises(ValueError, match="num_errors=k"):
        opt.update(jnp.ones(2), opt.init(params), params, value=1.0, value_fn=f)


def test_fit_or_plateau_swaps_on_whichever_comes_first():
    n = 40
    # The loss falls 20% a window until window 20, then stays: the smoothed
    # mean (smoothing 0.3) creeps down for a while, and the fifth window
    # without a 10% fall (rtol 0.1, patience 5) is window 33.
    values = (0.8 ** np.minimum(np.arange(n), 20)).astype(np.float32)
    grads = [jnp.array([0.1, 0.0], jnp.float32)] * n
    plateau = replay_plateau(values).index(True)
    assert plateau == 33

    def run(counts):
        rule = swap.any_of(swap.fitted(patience=3), swap.plateau())
        opt = tpo.two_phase(swap=swap.per_window(rule, steps=1))
        params, state = jnp.zeros(2), None
        state = opt.init(params)
        update = jax.jit(opt.update, static_argnames="value_fn")
        f = lambda p: jnp.sum(p**2)  # noqa: E731
        for v, g, c in zip(values, grads, counts, strict=True):
            _, state = update(g, state, params, value=v, value_fn=f, num_errors=c)
        return int(state.swap_step)

    # Fitted from window 10: the third fitted window in a row is window 12.
    assert run([5] * 10 + [0] * (n - 10)) == 13
    # Never fitted: the plateau decides.
    assert run([1] * n) == plateau + 1


def test_the_default_rule_compiles_once_across_its_swap_and_keeps_scalar_state():
    f = lambda w, x: jnp.mean((x @ w - 1.0) ** 2)  # noqa: E731
    rule = swap.per_window(
        swap.any_of(swap.fitted(patience=2), swap.plateau()), steps=2
    )
    opt = tpo.two_phase(optax.adam(0.05), swap=rule)
    x = jax.random.normal(jax.random.key(0), (16, 3))

    def step(w, state, errors):
        value, grad = jax.value_and_grad(f)(w, x)
        updates, state = opt.update(
            grad, state, w, value=value, value_fn=f, x=x, num_errors=errors
        )
        return optax.apply_updates(w, updates), state

    chex.clear_trace_counter()
    step = jax.jit(chex.assert_max_traces(step, n=1))
    w = jnp.zeros(3)
    state = opt.init(w)
    assert all(jnp.shape(x) == () for x in jax.tree.leaves(state.swap))
    for k in range(12):
        w, state = step(w, state, jnp.asarray(3 if k < 4 else 0, jnp.int32))
    # Windows 0-1 had errors; windows 2 and 3 (steps 4-7) are fitted: the
    # swap comes at step 8, and CG runs in the same compiled program.
    assert int(optax.tree.get(state, "fitted_step")) == 7
    assert int(state.swap_step) == 8


# -- within: no swap late in a budget -------------------------------------------
@pytest.mark.parametrize("windows", [1, 4, 5, 6, 9, 30])
def test_within_keeps_the_rules_first_hold_up_to_its_limit_and_drops_later_ones(
    windows,
):
    values = 0.9 ** np.minimum(np.arange(30), 8)  # flat from reading 8
    counts = np.random.default_rng(0).integers(0, 3, 30)
    rule = swap.any_of(swap.fitted(patience=2), swap.plateau())
    flags = swap.holds(rule, value=values, num_errors=counts)
    limited = swap.holds(
        swap.within(rule, windows=windows), value=values, num_errors=counts
    )
    assert limited == [f and n < windows for n, f in enumerate(flags)]


@pytest.mark.parametrize("epochs, swaps", [(8, True), (7, True), (6, False)])
def test_two_phase_with_the_default_for_a_budget_swaps_only_before_its_last_fifth(
    epochs, swaps
):
    # A flat loss: the plateau holds on window 5 (the sixth), so the swap
    # comes after 6 windows of 3 steps, if the budget's last fifth starts later.
    window = 3
    rule = swap.default(steps_per_epoch=window, epochs=epochs)
    opt = tpo.two_phase(swap=rule)
    f = lambda p: jnp.sum(p**2)  # noqa: E731
    params = jnp.array([1.0, -1.0])
    state = opt.init(params)
    update = jax.jit(opt.update, static_argnames="value_fn")
    for _ in range(epochs * window):
        _, state = update(
            jnp.ones(2), state, params, value=1.0, value_fn=f, num_errors=3
        )
    assert bool(state.in_second_phase) == swaps
    assert int(state.swap_step) == (6 * window if swaps else -1)
    assert epochs - epochs // 5 >= 6 if swaps else epochs - epochs // 5 < 6


@pytest.mark.parametrize("epochs", [1, 4, 5, 9, 10, 150, 1000])
def test_last_swap_epoch_leaves_out_the_last_fifth(epochs):
    last = swap.last_swap_epoch(epochs)
    assert last == epochs - epochs // 5
    assert 5 * (epochs - last) <= epochs < 5 * (epochs - last + 1)


@pytest.mark.parametrize("epochs", [0, -3, 2.5, True])
def test_last_swap_epoch_rejects_what_is_not_a_count(epochs):
    with pytest.raises(ValueError, match="tpo.swap.last_swap_epoch: epochs must be"):
        swap.last_swap_epoch(epochs)


def test_within_says_where_it_goes_and_checks_its_limit():
    with pytest.raises(ValueError, match="per_window\\(within\\(rule"):
        swap.within(swap.per_window(swap.plateau(), steps=2), windows=3)
    with pytest.raises(ValueError, match="tpo.swap.within: windows must be"):
        swap.within(swap.plateau(), windows=0)
    with pytest.raises(ValueError, match="tpo.swap.default: epochs must be"):
        swap.default(steps_per_epoch=2, epochs=0)


# -- the API: signature, state, errors ------------------------------------------
F = lambda p: jnp.sum(p**2)  # noqa: E731


def test_two_phase_takes_at_most_six_parameters():
    assert len(inspect.signature(tpo.two_phase).parameters) <= 6


def test_the_state_is_a_plain_named_tuple_whose_fields_optax_finds():
    params = {"w": jnp.zeros((4, 3)), "b": jnp.zeros(3)}
    state = tpo.two_phase(swap=swap.default(steps_per_epoch=5)).init(params)
    assert type(state).__bases__ == (tuple,) and "swap_step" in state._fields
    assert optax.tree.get(state, "in_second_phase") is state.in_second_phase
    assert optax.tree.get(state, "swap_step") is state.swap_step
    # Every rule's fields, by name.
    assert int(optax.tree.get(state, "plateau_step")) == -1
    assert int(optax.tree.get(state, "fitted_step")) == -1
    assert int(optax.tree.get(state, "window_count")) == 0
    paths = [jax.tree_util.keystr(p) for p, _ in tree_paths(state)]
    assert ".swap_step" in paths
    assert any(p.startswith(".swap.rule_state[1].num_flat") for p in paths)
    # A combinator's state is the tuple of its children's.
    assert isinstance(state.swap.rule_state, tuple)
    assert isinstance(state.swap.rule_state[0], swap.FittedState)


def tree_paths(tree):
    return jax.tree_util.tree_flatten_with_path(tree)[0]


def state_bytes(state):
    return sum(x.nbytes for x in jax.tree.leaves(state))


@pytest.mark.parametrize(
    "rule, params_sized",
    [
        (swap.default(steps_per_epoch=23), 2),
        (swap.per_window(swap.plateau(), steps=23), 2),
        (swap.per_window(swap.peak(statistic="mean_norm"), steps=23), 2),
        (swap.per_window(swap.peak(), steps=1), 2),
        # Only a rule that reads the window's mean gradient keeps its sum.
        (swap.per_window(swap.peak(), steps=23), 3),
    ],
)
def test_the_state_is_twice_the_params_unless_a_rule_reads_the_mean_gradient(
    rule, params_sized
):
    params = {"w": jnp.zeros((300, 100)), "b": jnp.zeros(100)}
    size = state_bytes(params)
    state = tpo.two_phase(swap=rule).init(params)
    assert params_sized * size <= state_bytes(state) < params_sized * size + 1024


def one_line_error(call):
    with pytest.raises(ValueError) as error:
        call()
    message = str(error.value)
    assert "\n" not in message
    return message


def test_no_swap_rule_shows_the_call_to_make():
    message = one_line_error(lambda: tpo.two_phase(optax.adam(1e-3)))
    assert "swap=tpo.swap.default(steps_per_epoch=N)" in message


def test_a_rule_without_a_window_says_how_to_give_one():
    for rule in (swap.peak(), swap.PAPER, swap.any_of(swap.plateau(), swap.fitted())):
        message = one_line_error(lambda rule=rule: tpo.two_phase(swap=rule))
        assert "tpo.swap.per_window(rule, steps=steps_per_epoch)" in message


def test_a_string_rule_is_refused():
    message = one_line_error(lambda: tpo.two_phase(swap="plateau"))
    assert "tpo.swap" in message


def update_with_errors(num_errors, rule=None):
    rule = swap.default(steps_per_epoch=2) if rule is None else rule
    opt = tpo.two_phase(swap=rule)
    params = jnp.zeros(2)
    extra = {} if num_errors is None else {"num_errors": num_errors}
    return opt.update(
        jnp.ones(2), opt.init(params), params, value=1.0, value_fn=F, **extra
    )


def test_a_missing_num_errors_says_how_to_pass_it():
    message = one_line_error(lambda: update_with_errors(None))
    assert "num_errors=k" in message and "tpo.swap.plateau()" in message


@pytest.mark.parametrize(
    "num_errors",
    [2.0, jnp.asarray(2.0), jnp.array([True, False]), jnp.array([1, 0]), True],
)
def test_num_errors_must_be_an_integer_scalar(num_errors):
    message = one_line_error(lambda: update_with_errors(num_errors))
    assert message.startswith("two_phase: num_errors must be an integer scalar")


def test_num_errors_is_accepted_as_python_and_jax_integers():
    for num_errors in (3, jnp.asarray(3, jnp.int32), np.int64(3)):
        _, state = update_with_errors(num_errors)
        assert int(state.swap.window_errors) == 3


def test_replay_says_which_records_a_rule_reads():
    message = one_line_error(
        lambda: swap.replay(swap.default(steps_per_epoch=3), value=[1.0, 0.5])
    )
    assert "num_errors=[...]" in message
    assert swap.replay(swap.plateau(), value=[]) is None


def test_per_window_cannot_be_nested():
    inner = swap.per_window(swap.plateau(), steps=3)
    one_line_error(lambda: swap.per_window(swap.any_of(inner), steps=3))


# -- fallback, reasons and compute ------------------------------------------------
FAILING = tpo.golden_section_linesearch(initial_step=100.0, max_evaluations=1)


def run_quadratic(opt, steps, start_at=()):
    f = lambda w: jnp.sum((w - 1.0) ** 2)  # noqa: E731

    @jax.jit
    def step(w, state):
        value, grad = jax.value_and_grad(f)(w)
        updates, state = opt.update(grad, state, w, value=value, value_fn=f)
        return optax.apply_updates(w, updates), state

    w, state, states = jnp.array([0.0, 3.0]), opt.init(jnp.zeros(2)), []
    for k in range(steps):
        if k in start_at:
            state = tpo.start_second_phase(state)
        w, state = step(w, state)
        states.append(state)
    return states


def test_at_step_after_a_fallback_swaps_again_n_steps_later():
    second = tpo.conjugate_gradient(linesearch=FAILING)
    opt = tpo.two_phase(
        optax.adam(0.1),
        second,
        swap=swap.at_step(3),
        fallback="first",
        max_failures=2,
    )
    phases = [int(s.in_second_phase) for s in run_quadratic(opt, 14)]
    # Steps 0-2 Adam, 3-4 CG (two failures), 5 falls back: 5-7 Adam again,
    # 8-9 CG, 10 falls back, ...
    assert phases == [0, 0, 1, 1, 1, 0, 0, 1, 1, 1, 0, 0, 1, 1]
    states = run_quadratic(opt, 14)
    assert [int(s.swap_step) for s in states[4:9]] == [3, -1, -1, 8, 8]
    assert [int(s.num_fallbacks) for s in states][-1] == 2


def test_manual_after_a_fallback_stays_in_the_first_phase_until_called_again():
    second = tpo.conjugate_gradient(linesearch=FAILING)
    opt = tpo.two_phase(
        optax.adam(0.1), second, swap=swap.manual(), fallback="first", max_failures=1
    )
    states = run_quadratic(opt, 12, start_at=(2, 9))
    phases = [int(s.in_second_phase) for s in states]
    # Swapped before step 2; step 2 fails; step 3 falls back; Adam until the
    # next call before step 9.
    assert phases == [0, 0, 1, 0, 0, 0, 0, 0, 0, 1, 0, 0]
    assert int(states[3].swap_reason) == 0 and int(states[3].swap_step) == -1
    assert swap.SWAP_REASONS[int(states[9].swap_reason)] == "manual"


def test_any_of_records_the_rule_that_fired():
    # A loss that never stops falling by 10%, fitted from the start: "fitted".
    rule = swap.per_window(
        swap.any_of(swap.plateau(), swap.fitted(patience=2)), steps=1
    )
    opt = tpo.two_phase(swap=rule)
    params = jnp.zeros(2)
    state = opt.init(params)
    update = jax.jit(opt.update, static_argnames="value_fn")
    for k in range(3):
        _, state = update(
            jnp.ones(2), state, params, value=0.5**k, value_fn=F, num_errors=0
        )
    assert int(state.swap_step) == 2
    assert tpo.two_phase_metrics(state)["swap_reason"] == "fitted"


def test_the_state_counts_the_second_phase_evaluations():
    opt = tpo.two_phase(optax.adam(0.1), swap=swap.at_step(2))
    states = run_quadratic(opt, 6)
    evaluations = gradients = 0
    previous = None
    for state in states:
        info = tpo.find_linesearch_state(state.second_state).info
        # A step whose gradient is exactly zero (the quadratic solved) runs
        # no search and leaves the second phase's state as it was.
        searched = previous is None or any(
            bool(jnp.any(a != b))
            for a, b in zip(
                jax.tree.leaves(state.second_state),
                jax.tree.leaves(previous.second_state),
                strict=True,
            )
        )
        if bool(state.in_second_phase) and int(state.count) > 2 and searched:
            evaluations += int(info.num_evaluations)
            gradients += int(info.num_gradients)
        assert int(state.num_evaluations) == evaluations
        assert int(state.num_gradients) == gradients
        previous = state
    assert evaluations > 0 and gradients > 0
