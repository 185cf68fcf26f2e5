"""The golden-section line search finds 1-D minima and never accepts a bad point."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import twophase_optax as tpo

TOL = 1e-6


def search_1d(phi, initial_step=1.0, tol=TOL, max_evaluations=100, **kwargs):
    """Runs one search along d = 1 from w = 0 in float64; returns (alpha, state)."""
    with jax.enable_x64(True):
        w = jnp.zeros((), jnp.float64)
        ls = tpo.golden_section_linesearch(
            initial_step=initial_step,
            tol=tol,
            max_evaluations=max_evaluations,
            **kwargs,
        )
        state = ls.init(w)
        update = jax.jit(ls.update, static_argnames="value_fn")
        step, state = update(
            jnp.ones((), jnp.float64), state, w, value=phi(w), value_fn=phi
        )
        return float(step), state


@pytest.mark.parametrize(
    "name, phi, minimiser, initial_step",
    [
        ("quadratic", lambda a: (a - 2.0) ** 2, 2.0, 1.0),
        ("quartic", lambda a: (a - 1.5) ** 4 + 0.1 * (a - 1.5) ** 2, 1.5, 1.0),
        ("asymmetric", lambda a: jnp.exp(a) - 3.0 * a, math.log(3.0), 1.0),
        ("far beyond the initial step", lambda a: (a - 1000.0) ** 2, 1000.0, 1.0),
        ("initial step overshoots", lambda a: (a - 0.01) ** 2, 0.01, 100.0),
    ],
)
def test_finds_minimiser_within_tolerance(name, phi, minimiser, initial_step):
    alpha, state = search_1d(phi, initial_step=initial_step)
    assert not state.info.failed
    assert abs(alpha - minimiser) <= TOL * minimiser, name
    assert float(state.info.bracket_width) <= TOL * alpha


def test_agrees_with_scipy_golden():
    scipy_optimize = pytest.importorskip("scipy.optimize")
    phi = lambda a: a**4 - 3.0 * a**3 + 2.0  # noqa: E731  (minimum at 9/4)
    alpha, _ = search_1d(phi)
    reference = scipy_optimize.minimize_scalar(
        lambda a: float(phi(a)), bracket=(0.0, 1.0, 4.0), method="golden", tol=1e-8
    ).x
    assert alpha == pytest.approx(reference, rel=2 * TOL)
    assert alpha == pytest.approx(9.0 / 4.0, rel=TOL)


def test_state_value_is_loss_at_new_point():
    phi = lambda a: (a - 2.0) ** 2 + 0.5  # noqa: E731
    alpha, state = search_1d(phi)
    assert float(state.value) == float(phi(alpha))
    assert float(state.learning_rate) == alpha


def test_warm_starts_from_previous_step():
    with jax.enable_x64(True):
        phi = lambda w: (w - 50.0) ** 2  # noqa: E731
        ls = tpo.golden_section_linesearch(tol=1e-3)
        w = jnp.zeros((), jnp.float64)
        state = ls.init(w)
        d = jnp.ones((), jnp.float64)
        _, first = ls.update(d, state, w, value=phi(w), value_fn=phi)
        _, second = ls.update(d, first, w, value=phi(w), value_fn=phi)
        # The second search starts at the first's answer: no expansion needed.
        assert int(second.info.num_evaluations) < int(first.info.num_evaluations)
        assert float(second.learning_rate) == pytest.approx(50.0, rel=1e-3)


def test_respects_evaluation_budget():
    _, state = search_1d(lambda a: (a - 2.0) ** 2, tol=1e-12, max_evaluations=7)
    assert int(state.info.num_evaluations) == 7
    assert not state.info.failed  # The best point so far is still a decrease.


def test_ascent_direction_gives_zero_step_and_failure():
    alpha, state = search_1d(lambda a: (a + 2.0) ** 2, max_evaluations=40)
    assert alpha == 0.0
    assert bool(state.info.failed)
    assert float(state.learning_rate) == 0.0
    assert float(state.value) == 4.0  # phi(0): the params do not move.
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(state))


def test_nan_value_fn_gives_zero_step_and_finite_state():
    def phi(a):
        # Finite at the current point, NaN everywhere the search looks.
        return jnp.where(a == 0.0, 1.0, jnp.nan)

    alpha, state = search_1d(phi, max_evaluations=20)
    assert alpha == 0.0
    assert bool(state.info.failed)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(state))


def test_nan_region_counts_as_worse_and_is_stepped_back_from():
    # Minimum at 2; the loss is NaN beyond 5 and the first trial lands there.
    phi = lambda a: jnp.where(a > 5.0, jnp.nan, (a - 2.0) ** 2)  # noqa: E731
    alpha, state = search_1d(phi, initial_step=10.0)
    assert not state.info.failed
    assert alpha == pytest.approx(2.0, rel=TOL)


def test_non_finite_direction_gives_zero_step_without_evaluating():
    ls = tpo.golden_section_linesearch()
    w = jnp.zeros(3)
    phi = lambda w: jnp.sum(w**2)  # noqa: E731
    d = jnp.array([1.0, jnp.nan, 0.0])
    step, state = ls.update(d, ls.init(w), w, value=phi(w), value_fn=phi)
    np.testing.assert_array_equal(step, jnp.zeros(3))
    assert bool(state.info.failed)
    assert int(state.info.num_evaluations) == 0


def test_passes_extra_arguments_to_value_fn():
    def loss(w, target):
        return jnp.sum((w - target) ** 2)

    ls = tpo.golden_section_linesearch(tol=1e-4)
    w, target = jnp.zeros(2), jnp.array([3.0, 3.0])
    step, _ = ls.update(
        jnp.ones(2), ls.init(w), w, value=loss(w, target), value_fn=loss, target=target
    )
    np.testing.assert_allclose(step, target, rtol=1e-3)


def test_rejects_extra_arguments_value_fn_does_not_take():
    ls = tpo.golden_section_linesearch()
    w = jnp.zeros(2)
    f = lambda w: jnp.sum(w**2)  # noqa: E731
    with pytest.raises(TypeError, match="targte"):
        ls.update(jnp.ones(2), ls.init(w), w, value=f(w), value_fn=f, targte=1.0)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"initial_step": 0.0}, "initial_step"),
        ({"initial_step": float("inf")}, "initial_step"),
        ({"tol": 0.0}, "tol"),
        ({"tol": -1e-3}, "tol"),
        ({"tol": 1.5}, "tol"),
        ({"max_evaluations": 0}, "max_evaluations"),
        ({"max_evaluations": 2.5}, "max_evaluations"),
        ({"max_expansions": -1}, "max_expansions"),
    ],
)
def test_invalid_hyperparameters_raise_value_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        tpo.golden_section_linesearch(**kwargs)


def test_update_without_value_fn_shows_the_right_call():
    ls = tpo.golden_section_linesearch()
    w = jnp.zeros(2)
    with pytest.raises(TypeError, match=r"value_fn") as error:
        ls.update(jnp.ones(2), ls.init(w), w, value=0.0)
    assert "update(grad, state, params, value=value" in str(error.value)
