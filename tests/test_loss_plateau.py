"""The loss-plateau and fit swap rules, and the manual swap: exact swap steps."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import twophase_optax as tpo
from twophase_optax import loss_plateau


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
    flags = loss_plateau.replay(noisy_decay(0), **settings)
    assert flags.index(True) == expected


def test_a_spike_is_not_a_plateau():
    means = [4.0, 2.0, 1.0, 1.0, 1.0, 5.0, 5.0, 5.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    flags = loss_plateau.replay(means, rtol=0.1, patience=5, smoothing=1.0)
    # Flat from window 3; the spike at 5-7 restarts the count, which reaches
    # five at window 12 (without the spike it would have at window 7).
    assert flags.index(True) == 12
    assert (
        loss_plateau.replay(
            means[:5] + [1.0] * 9, rtol=0.1, patience=5, smoothing=1.0
        ).index(True)
        == 7
    )


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("rtol, patience, smoothing", [(0.1, 5, 0.3), (0.02, 2, 1.0)])
def test_replay_equals_the_plain_python_rule(seed, rtol, patience, smoothing):
    means = noisy_decay(seed)
    expected = reference_plateau(means.astype(np.float64), rtol, patience, smoothing)
    assert (
        loss_plateau.replay(means, rtol=rtol, patience=patience, smoothing=smoothing)
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
    replayed = loss_plateau.replay(means).index(True)
    opt = tpo.two_phase(swap_rule="plateau", window=window)
    state = drive(opt, values, grads, window)
    assert int(state.swap_step) == (replayed + 1) * window
    assert int(state.plateau.plateau_step) == (replayed + 1) * window - 1


def test_peak_then_plateau_waits_for_the_peak():
    # The loss is flat from the start (a plateau at window 5), but the
    # gradient norm peaks at window 20 and halves (default rule) by 27.
    n = 40
    values = np.full(n, 0.5, np.float32)
    norms = np.concatenate([np.linspace(1, 3, 21), np.linspace(3, 0.5, n - 21)[1:]])
    norms = np.concatenate([norms, [0.5]])[:n]
    grads = [jnp.array([g, 0.0], jnp.float32) for g in norms]
    peak = tpo.swap_detection.replay(norms)
    assert peak is not None and peak > 5
    plateau_only = drive(tpo.two_phase(swap_rule="plateau"), values, grads, 1)
    assert int(plateau_only.swap_step) == loss_plateau.replay(values).index(True) + 1
    armed = drive(tpo.two_phase(swap_rule="peak-then-plateau"), values, grads, 1)
    assert int(armed.swap_step) == peak + 1
    manual = drive(tpo.two_phase(swap_rule="manual"), values, grads, 1)
    assert int(manual.swap_step) == -1 and not manual.in_second_phase
    assert int(manual.detection.detect_step) == peak  # recorded all the same


def test_start_second_phase_swaps_on_the_next_step_and_compiles_once():
    f = lambda w: jnp.sum((w - 1.0) ** 2)  # noqa: E731
    opt = tpo.two_phase(optax.adam(0.1), swap_rule="manual")

    def step(w, state):
        value, grad = jax.value_and_grad(f)(w)
        updates, state = opt.update(grad, state, w, value=value, value_fn=f)
        return optax.apply_updates(w, updates), state

    chex.clear_trace_counter()
    step = jax.jit(chex.assert_max_traces(step, n=1))
    swap = jax.jit(tpo.start_second_phase)
    w = jnp.array([-2.0, 3.0])
    state = opt.init(w)
    for k in range(8):
        if k == 4:
            state = swap(state)
        w, state = step(w, state)
        if k == 4:
            # The swapped step is CG's first: steepest descent with an exact
            # line search reaches the minimum of this round quadratic at once.
            np.testing.assert_allclose(w, [1.0, 1.0], rtol=1e-5)
        elif k < 4:
            assert not state.in_second_phase
    assert int(state.swap_step) == 4 and bool(state.in_second_phase)
    again = tpo.start_second_phase(state)  # Already swapped: unchanged.
    assert int(again.swap_step) == 4


def test_plateau_state_is_scalar_and_skips_non_finite_values():
    params = {"w": jnp.zeros((50, 40)), "b": jnp.zeros(40)}
    opt = tpo.two_phase(swap_rule="plateau", window=2)
    state = opt.init(params)
    assert all(jnp.shape(x) == () for x in jax.tree.leaves(state.plateau))
    f = lambda p: jnp.sum(p["w"] ** 2)  # noqa: E731
    grads = jax.tree.map(jnp.ones_like, params)
    _, state = opt.update(grads, state, params, value=1.0, value_fn=f)
    _, skipped = opt.update(grads, state, params, value=jnp.nan, value_fn=f)
    chex.assert_trees_all_equal(skipped.plateau, state.plateau)
    assert int(skipped.num_skipped) == 1


@pytest.mark.parametrize(
    "kwargs",
    [
        {"swap_rule": "loss"},
        {"plateau_rtol": 1.0},
        {"plateau_rtol": -0.1},
        {"plateau_patience": 0},
        {"plateau_smoothing": 0.0},
        {"fit_errors": -1},
        {"fit_patience": 0},
    ],
)
def test_bad_rule_settings_raise(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        tpo.two_phase(**kwargs)


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
    found = tpo.fitted.replay(counts, fit_errors=fit_errors, fit_patience=fit_patience)
    assert found == expected and any(expected)


def test_two_phase_fit_rule_swaps_after_the_fitted_windows():
    window = 3
    per_window = [9, 4, 0, 2, 0, 0, 1]  # fitted twice in a row at window 5
    counts = [c // window + (k < c % window) for c in per_window for k in range(window)]
    assert [sum(counts[i : i + window]) for i in range(0, 21, window)] == per_window
    opt = tpo.two_phase(swap_rule="fit", fit_patience=2, window=window)
    f = lambda p: jnp.sum(p**2)  # noqa: E731  (takes no extra arguments)
    params = jnp.array([1.0, -1.0])
    state = opt.init(params)
    for c in counts:
        _, state = opt.update(
            jax.grad(f)(params),
            state,
            params,
            value=f(params),
            value_fn=f,
            num_errors=c,
        )
    assert int(state.fitted.fitted_step) == 6 * window - 1
    assert int(state.swap_step) == 6 * window
    assert bool(state.in_second_phase)


def test_fit_rule_without_counts_says_how_to_call_it():
    opt = tpo.two_phase(swap_rule="fit")
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
    plateau = loss_plateau.replay(values).index(True)
    assert plateau == 33
    without_counts = drive(tpo.two_phase(swap_rule="fit-or-plateau"), values, grads, 1)
    assert int(without_counts.swap_step) == plateau + 1

    def run(counts):
        opt = tpo.two_phase(swap_rule="fit-or-plateau", fit_patience=3)
        params, state = jnp.zeros(2), None
        state = opt.init(params)
        f = lambda p: jnp.sum(p**2)  # noqa: E731
        for v, g, c in zip(values, grads, counts, strict=True):
            _, state = opt.update(g, state, params, value=v, value_fn=f, num_errors=c)
        return int(state.swap_step)

    # Fitted from window 10: the third fitted window in a row is window 12.
    assert run([5] * 10 + [0] * (n - 10)) == 13
    # Never fitted: the plateau decides.
    assert run([1] * n) == plateau + 1


def test_the_default_rule_compiles_once_across_its_swap_and_keeps_scalar_state():
    f = lambda w, x: jnp.mean((x @ w - 1.0) ** 2)  # noqa: E731
    opt = tpo.two_phase(optax.adam(0.05), window=2, fit_patience=2)  # default rule
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
    scalars = [state.plateau, state.fitted]
    assert all(jnp.shape(x) == () for x in jax.tree.leaves(scalars))
    for k in range(12):
        w, state = step(w, state, jnp.asarray(3 if k < 4 else 0, jnp.int32))
    # Windows 0-1 had errors; windows 2 and 3 (steps 4-7) are fitted: the
    # swap comes at step 8, and CG runs in the same compiled program.
    assert int(state.fitted.fitted_step) == 7 and int(state.swap_step) == 8
    assert tpo.DEFAULT_SWAP_RULE == "fit-or-plateau"
