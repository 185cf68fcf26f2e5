"""The slope line search: interpolation from phi(0), phi'(0) and trial values."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.optimize

import twophase_optax as tpo


def search(f, w, d, ls=None, state=None):
    ls = ls or tpo.slope_linesearch()
    state = ls.init(w) if state is None else state
    value, grad = jax.value_and_grad(f)(w)
    step, state = ls.update(d, state, w, value=value, grad=grad, value_fn=f)
    return step, state


def test_a_quadratic_line_is_minimised_exactly_by_one_interpolation():
    f = lambda w: jnp.sum(jnp.array([1.0, 4.0]) * (w - jnp.array([3.0, -1.0])) ** 2)  # noqa: E731
    w, d = jnp.zeros(2), jnp.array([1.0, -0.5])
    # phi(a) = (a - 3)^2 + 4 (1 - 0.5 a)^2 = 2 a^2 - 10 a + 13: minimum at 2.5.
    step, state = search(f, w, d)
    assert float(state.learning_rate) == pytest.approx(2.5, rel=1e-6)
    assert int(state.info.num_evaluations) == 2  # the trial at 1, then 2.5
    assert float(state.value) == pytest.approx(0.5, rel=1e-5)
    np.testing.assert_allclose(step, 2.5 * d, rtol=1e-6)
    # Started at the minimum, the first trial is accepted: one evaluation.
    _, state = search(f, w, d, tpo.slope_linesearch(initial_step=2.5))
    assert int(state.info.num_evaluations) == 1


def test_a_cubic_line_ends_within_rtol_of_the_minimum():
    # phi(a) = f(a d): a cubic along d = (1,), minimum of a^3/3 - 4 a + a^2 at
    # a = -1 + sqrt(5).
    f = lambda w: jnp.sum(w**3 / 3.0 - 4.0 * w + w**2)  # noqa: E731
    _, state = search(f, jnp.zeros(1), jnp.ones(1))
    exact = -1.0 + 5.0**0.5
    # The cubic through phi(0), phi'(0) and two trials is exact here: the
    # third trial is the minimum, and it confirms itself.
    assert float(state.learning_rate) == pytest.approx(exact, rel=1e-5)
    assert int(state.info.num_evaluations) == 3
    assert not bool(state.info.failed)


def test_a_minimum_beyond_the_first_trial_is_reached():
    # log cosh is linear far from its minimum at 60: no curvature is seen at
    # first, so the step doubles, then the cubic closes in.
    f = lambda w: jnp.sum(jnp.log(jnp.cosh(w - 60.0)))  # noqa: E731
    _, state = search(f, jnp.zeros(1), jnp.ones(1))
    assert float(state.learning_rate) == pytest.approx(60.0, rel=0.02)
    assert float(state.value) < 0.2  # from 59.3 at the start
    assert int(state.info.num_evaluations) <= 12


def test_a_non_finite_value_on_the_line_is_never_accepted():
    # NaN beyond a = 2; minimum of the finite part at a = 1.5.
    f = lambda w: jnp.where(w[0] > 2.0, jnp.nan, (w[0] - 1.5) ** 2)  # noqa: E731
    _, state = search(
        f, jnp.zeros(1), jnp.ones(1), tpo.slope_linesearch(initial_step=8.0)
    )
    assert np.isfinite(float(state.value)) and not bool(state.info.failed)
    assert float(state.learning_rate) == pytest.approx(1.5, rel=0.05)


def test_an_ascent_direction_fails_with_a_zero_step():
    f = lambda w: jnp.sum(w**2)  # noqa: E731
    step, state = search(f, jnp.ones(2), jnp.ones(2))  # uphill
    assert bool(state.info.failed)
    assert int(state.info.num_evaluations) == 0
    np.testing.assert_array_equal(step, jnp.zeros(2))
    assert float(state.learning_rate) == 0.0 and float(state.value) == 2.0


def test_a_zero_direction_is_a_zero_step_but_not_a_failure():
    step, state = search(lambda w: jnp.sum(w**2), jnp.ones(2), jnp.zeros(2))
    assert not bool(state.info.failed)
    np.testing.assert_array_equal(step, jnp.zeros(2))


def test_the_next_first_trial_keeps_alpha_times_slope():
    f = lambda w: jnp.sum(jnp.array([1.0, 4.0]) * w**2)  # noqa: E731
    w, d = jnp.array([1.0, 1.0]), jnp.array([-1.0, 0.0])
    _, state = search(f, w, d)  # slope -2, accepted step 1 (exact)
    assert float(state.learning_rate) == pytest.approx(1.0, rel=1e-6)
    # Along -2 d the slope doubles, so the first trial is 0.5: exact again.
    _, state = search(f, w, 2.0 * d, state=state)
    assert float(state.learning_rate) == pytest.approx(0.5, rel=1e-6)
    assert int(state.info.num_evaluations) == 1


def test_the_first_trial_keeps_the_scale_of_the_last_good_step_through_a_failure():
    f = lambda w: jnp.sum(jnp.array([1.0, 4.0]) * w**2)  # noqa: E731
    w, d = jnp.array([1.0, 1.0]), jnp.array([-1.0, 0.0])
    _, state = search(f, w, d)  # alpha 1, slope -2: scale -2
    assert float(state.first_trial_scale) == pytest.approx(-2.0, rel=1e-6)
    _, state = search(f, w, -d, state=state)  # uphill: fails
    assert bool(state.info.failed) and float(state.learning_rate) == 0.0
    assert float(state.first_trial_scale) == pytest.approx(-2.0, rel=1e-6)
    # Along 2 d the first trial is -2 / -4 = 0.5, the exact minimum; without
    # the kept scale it would start again from initial_step (1.0).
    _, state = search(f, w, 2.0 * d, state=state)
    assert float(state.learning_rate) == pytest.approx(0.5, rel=1e-6)
    assert int(state.info.num_evaluations) == 1


def test_a_failed_search_is_not_repeated_from_the_same_start():
    # Every point off w = 0 has a NaN loss: no search can succeed.
    f = lambda w: jnp.where(jnp.all(w == 0.0), 1.0, jnp.nan)  # noqa: E731
    w, d = jnp.zeros(2), jnp.ones(2)
    ls = tpo.slope_linesearch(max_evaluations=6, store_grad=True)

    def update(state, value=1.0):
        return ls.update(d, state, w, value=value, grad=-d, value_fn=f)

    step, state = update(ls.init(w))
    assert bool(state.info.failed) and int(state.info.num_evaluations) == 6
    # The same phi(0) and phi'(0) again, and nothing finite seen: the same
    # search would follow, so it fails without evaluating anything.
    step, state = update(state)
    assert bool(state.info.failed) and int(state.info.num_evaluations) == 0
    np.testing.assert_array_equal(step, jnp.zeros(2))
    assert float(state.value) == 1.0
    # Another start (a different value) searches again.
    _, state = update(state, value=2.0)
    assert bool(state.info.failed) and int(state.info.num_evaluations) == 6


def test_a_search_whose_steps_were_too_long_resumes_shorter():
    # f = 1e8 * mean(w^2) from w = 1 along -g: the line minimum is at 1e-8,
    # eight tenfold shrinks below the first trial of 1.
    f = lambda w: jnp.mean((1e4 * w) ** 2)  # noqa: E731
    w = jnp.ones(2)
    value, grad = jax.value_and_grad(f)(w)
    ls = tpo.slope_linesearch(rtol=0.5, max_evaluations=8, store_grad=True)

    def update(state):
        return ls.update(-grad, state, w, value=value, grad=grad, value_fn=f)

    _, state = update(ls.init(w))
    assert bool(state.info.failed) and int(state.info.num_evaluations) == 8
    # Its last trial was far above phi(0): the retry goes on shorter.
    assert 0 < float(state.retry_trial) < 1e-6
    step, state = update(state)
    assert not bool(state.info.failed)
    np.testing.assert_allclose(optax.apply_updates(w, step), 0.0, atol=1e-5)
    np.testing.assert_allclose(float(state.learning_rate), 1e-8, rtol=1e-2)
    assert float(state.retry_trial) == 0.0


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_dtypes_and_one_trace(dtype):
    chex.clear_trace_counter()
    with jax.enable_x64(dtype == jnp.float64):
        ls = tpo.slope_linesearch()
        f = lambda w: jnp.sum((w - 3.0) ** 2)  # noqa: E731

        @jax.jit
        @chex.assert_max_traces(n=1)
        def step(w, state):
            value, grad = jax.value_and_grad(f)(w)
            return ls.update(-grad, state, w, value=value, grad=grad, value_fn=f)

        w = jnp.zeros(3, dtype)
        state = ls.init(w)
        for _ in range(3):
            updates, state = step(w, state)
            w = optax.apply_updates(w, updates)
        assert w.dtype == dtype and state.learning_rate.dtype == dtype
        np.testing.assert_allclose(w, 3.0, rtol=1e-5)


def test_cg_with_it_matches_scipy_on_rosenbrock():
    with jax.enable_x64(True):
        f = lambda w: jnp.sum(100.0 * (w[1:] - w[:-1] ** 2) ** 2 + (1 - w[:-1]) ** 2)  # noqa: E731
        opt = tpo.conjugate_gradient(linesearch=tpo.slope_linesearch())
        w = jnp.array([-1.2, 1.0])
        state = opt.init(w)
        step = jax.jit(
            lambda w, s: opt.update(jax.grad(f)(w), s, w, value=f(w), value_fn=f)
        )
        for _ in range(400):
            updates, state = step(w, state)
            w = optax.apply_updates(w, updates)
        reference = scipy.optimize.minimize(
            lambda x: float(f(jnp.asarray(x))), [-1.2, 1.0]
        )
        np.testing.assert_allclose(w, reference.x, atol=1e-3)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"initial_step": 0.0}, "initial_step"),
        ({"rtol": 1.0}, "rtol"),
        ({"max_evaluations": 0}, "max_evaluations"),
        ({"first_trial_grad": True}, "store_grad=True"),
        ({"store_grad": True, "first_rtol": 0.8}, "first_trial_grad=True"),
        (
            {"store_grad": True, "first_trial_grad": True, "first_rtol": 1.5},
            "first_rtol",
        ),
        ({"store_grad": True, "first_trial_grad": 1}, "first_trial_grad"),
    ],
)
def test_bad_hyperparameters_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tpo.slope_linesearch(**kwargs)


def test_missing_grad_says_how_to_call_it():
    ls = tpo.slope_linesearch()
    f = lambda w: jnp.sum(w**2)  # noqa: E731
    with pytest.raises(TypeError, match="grad="):
        ls.update(jnp.ones(2), ls.init(jnp.ones(2)), jnp.ones(2), value=2.0, value_fn=f)


# -- store_grad: the gradient at the accepted point, for the next step --------
def test_store_grad_keeps_the_exact_gradient_of_the_accepted_point():
    f = lambda w: jnp.sum(jnp.array([1.0, 4.0]) * (w - jnp.array([3.0, -1.0])) ** 2)  # noqa: E731
    w, d = jnp.zeros(2), jnp.array([1.0, -0.5])
    step, state = search(f, w, d, tpo.slope_linesearch(store_grad=True))
    # A value at the first trial, then value and gradient at the parabola's
    # minimum 2.5, where the slope is zero: accepted.
    assert float(state.learning_rate) == pytest.approx(2.5, rel=1e-6)
    assert int(state.info.num_evaluations) == 2
    assert int(state.info.num_gradients) == 1
    new_w = optax.apply_updates(w, step)
    value, grad = jax.value_and_grad(f)(new_w)
    np.testing.assert_allclose(state.grad, grad, rtol=1e-6)
    assert float(state.value) == pytest.approx(float(value), rel=1e-6)
    # optax's convention hands them over without computing.
    reused_value, reused_grad = optax.value_and_grad_from_state(f)(new_w, state=state)
    assert float(reused_value) == float(state.value)
    np.testing.assert_array_equal(reused_grad, state.grad)


def test_store_grad_stops_on_the_slope_and_matches_the_line_minimum():
    # phi(a) = a^3/3 - 4 a + a^2 along d = 1, minimum at -1 + sqrt(5).
    f = lambda w: jnp.sum(w**3 / 3.0 - 4.0 * w + w**2)  # noqa: E731
    ls = tpo.slope_linesearch(rtol=0.01, store_grad=True)
    _, state = search(f, jnp.zeros(1), jnp.ones(1), ls)
    exact = -1.0 + 5.0**0.5
    # |phi'(a)| <= 0.01 |phi'(0)| = 0.04 and phi''(exact) = 2 sqrt(5).
    assert abs(float(state.learning_rate) - exact) <= 0.04 / (2 * 5**0.5) + 1e-6
    slope = float(state.grad[0])
    assert abs(slope) <= 0.04
    assert int(state.info.num_gradients) == int(state.info.num_evaluations) - 1


def test_store_grad_after_a_failure_keeps_the_start():
    f = lambda w: jnp.sum(w**2)  # noqa: E731
    w = jnp.ones(2)
    step, state = search(f, w, jnp.ones(2), tpo.slope_linesearch(store_grad=True))
    assert bool(state.info.failed)
    np.testing.assert_array_equal(step, jnp.zeros(2))
    # The params do not move: the given value and gradient stay valid.
    assert float(state.value) == 2.0
    np.testing.assert_array_equal(state.grad, 2.0 * w)


def test_store_grad_never_hands_over_a_non_finite_gradient():
    # The value is finite everywhere; the gradient is NaN at w = 1 exactly,
    # the line minimum (0 * the infinite slope of sqrt at 0).
    f = lambda w: jnp.sum((w - 1.0) ** 2 + 0.0 * jnp.sqrt(jnp.abs(w - 1.0)))  # noqa: E731
    w, d = jnp.zeros(1), jnp.ones(1)
    ls = tpo.slope_linesearch(store_grad=True)
    assert float(ls.init(w).value) == np.inf  # before any search: compute
    # The first trial (a value) hits the minimum, the second (its gradient)
    # is NaN there: the search moves off it to a point with a finite gradient
    # and a slope within rtol of phi'(0) = -2.
    step, state = search(f, w, d, ls)
    new_w = optax.apply_updates(w, step)
    assert abs(float(state.learning_rate) - 1.0) <= 0.1
    np.testing.assert_allclose(state.grad, jax.grad(f)(new_w), rtol=1e-6)
    assert float(state.value) == pytest.approx(float(f(new_w)))
    # Out of evaluations right after the NaN, the best point is the first
    # trial, whose gradient is not known: the state says "compute".
    _, state = search(f, w, d, tpo.slope_linesearch(max_evaluations=2, store_grad=True))
    assert float(state.learning_rate) == 1.0 and not bool(state.info.failed)
    assert float(state.value) == np.inf
    value, grad = optax.value_and_grad_from_state(f)(w + 1.0, state=state)
    assert float(value) == 0.0 and np.isnan(grad[0])  # computed, not stored


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_cg_reusing_the_gradient_solves_a_quadratic_in_n_steps(dtype):
    chex.clear_trace_counter()
    with jax.enable_x64(dtype == jnp.float64):
        a = jnp.diag(jnp.array([1.0, 3.0, 10.0], dtype))
        f = lambda w: 0.5 * w @ a @ w - jnp.sum(w)  # noqa: E731
        opt = tpo.conjugate_gradient(
            linesearch=tpo.slope_linesearch(rtol=1e-4, store_grad=True),
            powell_threshold=None,
        )
        value_and_grad = optax.value_and_grad_from_state(f)

        @jax.jit
        @chex.assert_max_traces(n=1)
        def step(w, state):
            computed = ~jnp.isfinite(optax.tree.get(state, "value"))
            value, grad = value_and_grad(w, state=state)
            updates, state = opt.update(
                grad, state, w, value=value, grad=grad, value_fn=f
            )
            return optax.apply_updates(w, updates), state, computed

        w = jnp.zeros(3, dtype)
        state = opt.init(w)
        computed = []
        for _ in range(3):
            w, state, c = step(w, state)
            computed.append(bool(c))
        assert w.dtype == dtype
        np.testing.assert_allclose(w, 1.0 / jnp.diag(a), rtol=1e-3)
        # Only the first step computed the gradient; the others reused it.
        assert computed == [True, False, False]


# -- first_trial_grad: the gradient at the first trial too ---------------------
def test_first_trial_grad_accepts_a_first_trial_within_first_rtol_in_one_evaluation():
    # phi(a) = 2 a^2 - 10 a + 13: phi'(0) = -10, phi'(1) = -6, minimum at 2.5.
    f = lambda w: jnp.sum(jnp.array([1.0, 4.0]) * (w - jnp.array([3.0, -1.0])) ** 2)  # noqa: E731
    w, d = jnp.zeros(2), jnp.array([1.0, -0.5])
    ls = tpo.slope_linesearch(store_grad=True, first_trial_grad=True, first_rtol=0.8)
    step, state = search(f, w, d, ls)
    # |phi'(1)| = 6 <= 0.8 * 10: the first trial is accepted as it is.
    assert float(state.learning_rate) == 1.0
    assert int(state.info.num_evaluations) == 1
    assert int(state.info.num_gradients) == 1
    value, grad = jax.value_and_grad(f)(optax.apply_updates(w, step))
    np.testing.assert_allclose(state.grad, grad, rtol=1e-6)
    assert float(state.value) == pytest.approx(float(value), rel=1e-6)


def test_first_trial_grad_moves_on_from_a_first_trial_outside_rtol():
    f = lambda w: jnp.sum(jnp.array([1.0, 4.0]) * (w - jnp.array([3.0, -1.0])) ** 2)  # noqa: E731
    w, d = jnp.zeros(2), jnp.array([1.0, -0.5])
    # first_rtol defaults to rtol = 0.1: |phi'(1)| = 6 > 1. The secant of the
    # slopes at 0 and 1 is zero at 1 + 6 / 4 = 2.5, the exact minimum.
    ls = tpo.slope_linesearch(store_grad=True, first_trial_grad=True)
    _, state = search(f, w, d, ls)
    assert float(state.learning_rate) == pytest.approx(2.5, rel=1e-6)
    assert int(state.info.num_evaluations) == 2
    assert int(state.info.num_gradients) == 2
    # The gradient there, (-1, -2), is orthogonal to d: a line minimum.
    np.testing.assert_allclose(state.grad, jnp.array([-1.0, -2.0]), rtol=1e-5)
    assert abs(float(jnp.vdot(state.grad, d))) <= 1e-5


def test_cg_with_a_first_trial_gradient_matches_scipy_on_rosenbrock():
    with jax.enable_x64(True):
        f = lambda w: jnp.sum(100.0 * (w[1:] - w[:-1] ** 2) ** 2 + (1 - w[:-1]) ** 2)  # noqa: E731
        opt = tpo.conjugate_gradient(
            linesearch=tpo.slope_linesearch(
                store_grad=True, first_trial_grad=True, first_rtol=0.8
            )
        )
        value_and_grad = optax.value_and_grad_from_state(f)
        w = jnp.array([-1.2, 1.0])
        state = opt.init(w)

        @jax.jit
        def step(w, state):
            value, grad = value_and_grad(w, state=state)
            updates, state = opt.update(
                grad, state, w, value=value, grad=grad, value_fn=f
            )
            return optax.apply_updates(w, updates), state

        for _ in range(400):
            w, state = step(w, state)
        reference = scipy.optimize.minimize(
            lambda x: float(f(jnp.asarray(x))), [-1.2, 1.0]
        )
        np.testing.assert_allclose(w, reference.x, atol=1e-3)
