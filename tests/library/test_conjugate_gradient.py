"""Nonlinear CG reaches known minima, restarts when it must, composes with optax."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _loops import minimise

import twophase_optax as tpo

BETA_NAMES = sorted(tpo.BETA_RULES)


def spd_quadratic(n=30, condition=1e3, seed=0):
    """0.5 (w - w*)^T A (w - w*) with eigenvalues evenly spread over [1, condition].

    Writing it around its minimiser w* keeps f(w*) = 0, so a value-only line
    search is not drowned in cancellation near the minimum.
    """
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    a = jnp.asarray(q @ np.diag(np.linspace(1.0, condition, n)) @ q.T)
    w_star = jnp.asarray(rng.standard_normal(n))
    loss = lambda w: 0.5 * (w - w_star) @ a @ (w - w_star)  # noqa: E731
    grad_norm = lambda w: float(jnp.linalg.norm(a @ (w - w_star)))  # noqa: E731
    return loss, grad_norm, w_star


def rosenbrock(w):
    return jnp.sum(100.0 * (w[1:] - w[:-1] ** 2) ** 2 + (1.0 - w[:-1]) ** 2)


def tight_cg(beta="polak_ribiere_plus"):
    return tpo.conjugate_gradient(
        beta, linesearch=tpo.golden_section_linesearch(tol=1e-7, max_evaluations=80)
    )


@pytest.mark.parametrize("beta", BETA_NAMES)
def test_spd_quadratic_gradient_norm_below_1e_6_within_45_steps(beta):
    with jax.enable_x64(True):
        loss, grad_norm, w_star = spd_quadratic()
        w, steps, _ = minimise(
            loss, jnp.zeros(30), tight_cg(beta), 45, lambda w: grad_norm(w) < 1e-6
        )
        assert grad_norm(w) < 1e-6, f"{beta}: {grad_norm(w):.2e} after {steps} steps"
        np.testing.assert_allclose(w, w_star, atol=1e-6)


@pytest.mark.parametrize(
    "start",
    [
        pytest.param(np.array([-1.2, 1.0]), id="2d"),
        pytest.param(np.tile([-1.2, 1.0], 5), id="extended-10d"),
    ],
)
def test_rosenbrock_reaches_1e_10_within_twice_scipy_iterations(start):
    scipy_optimize = pytest.importorskip("scipy.optimize")
    with jax.enable_x64(True):
        reference = scipy_optimize.minimize(
            lambda x: float(rosenbrock(jnp.asarray(x))),
            start,
            jac=lambda x: np.asarray(jax.grad(rosenbrock)(jnp.asarray(x))),
            method="CG",
            options={"gtol": 1e-8, "maxiter": 5000},
        )
        assert reference.fun < 1e-10
        w, steps, _ = minimise(
            rosenbrock,
            jnp.asarray(start),
            tight_cg(),
            2 * reference.nit,
            lambda w: float(rosenbrock(w)) < 1e-10,
        )
        assert float(rosenbrock(w)) < 1e-10
        assert steps <= 2 * reference.nit
        np.testing.assert_allclose(w, np.ones_like(start), atol=1e-4)


def test_first_step_is_exact_steepest_descent_step():
    loss = lambda w: jnp.sum(jnp.array([1.0, 4.0]) * w**2)  # noqa: E731
    w = jnp.array([1.0, 1.0])
    opt = tpo.conjugate_gradient()
    value, grad = jax.value_and_grad(loss)(w)
    updates, state = opt.update(grad, opt.init(w), w, value=value, value_fn=loss)
    assert bool(state.info.restarted)
    np.testing.assert_array_equal(state.dir_prev, -grad)
    alpha = state.linesearch_state.learning_rate
    np.testing.assert_array_equal(updates, alpha * -grad)


def restart_after(opt, grad_prev, dir_prev, count=1):
    """Runs one update from a hand-made state; returns (restarted, direction)."""
    loss = lambda w: jnp.sum(w**2)  # noqa: E731
    w = jnp.array([1.0, 2.0])
    state = opt.init(w)._replace(
        count=jnp.asarray(count, jnp.int32),
        grad_prev=jnp.asarray(grad_prev),
        dir_prev=jnp.asarray(dir_prev),
    )
    value, grad = jax.value_and_grad(loss)(w)  # grad = (2, 4)
    _, state = opt.update(grad, state, w, value=value, value_fn=loss)
    return bool(state.info.restarted), state.dir_prev, grad


def test_restarts_when_direction_is_not_descent():
    # beta = 1 with d_prev = (4, 8): d = -(2, 4) + (4, 8) = (2, 4), uphill.
    opt = tpo.conjugate_gradient(beta=lambda g, gp, dp: 1.0, powell_threshold=None)
    restarted, direction, grad = restart_after(opt, [1.0, 0.0], [4.0, 8.0])
    assert restarted
    np.testing.assert_array_equal(direction, -grad)


def test_keeps_conjugate_direction_when_no_criterion_fires():
    opt = tpo.conjugate_gradient(beta=lambda g, gp, dp: 0.5, powell_threshold=None)
    restarted, direction, grad = restart_after(opt, [1.0, 0.0], [-2.0, 0.0])
    assert not restarted
    np.testing.assert_array_equal(direction, -grad + 0.5 * jnp.array([-2.0, 0.0]))


def test_powell_criterion_restarts():
    # g = (2, 4), |g|^2 = 20. g.g_prev = 4 = 0.2 |g|^2: restart; 3.9 would not.
    opt = tpo.conjugate_gradient(beta=lambda g, gp, dp: 0.5, powell_threshold=0.2)
    assert restart_after(opt, [2.0, 0.0], [-2.0, 0.0])[0]
    assert not restart_after(opt, [1.95, 0.0], [-2.0, 0.0])[0]
    # Off by default.
    off = tpo.conjugate_gradient(beta=lambda g, gp, dp: 0.5)
    assert not restart_after(off, [2.0, 0.0], [-2.0, 0.0])[0]


def test_periodic_restart_every_n_steps():
    opt = tpo.conjugate_gradient(
        beta=lambda g, gp, dp: 0.5, powell_threshold=None, restart_every=3
    )
    assert not restart_after(opt, [1.0, 0.0], [-2.0, 0.0], count=2)[0]
    assert restart_after(opt, [1.0, 0.0], [-2.0, 0.0], count=3)[0]


def test_failed_line_search_is_followed_by_a_restart():
    # An evaluation budget of 1 that overshoots fails; params stay, g = g_prev,
    # and Powell's criterion sends CG back to steepest descent.
    loss = lambda w: jnp.sum((w - 1.0) ** 2)  # noqa: E731
    opt = tpo.conjugate_gradient(
        linesearch=tpo.golden_section_linesearch(initial_step=100.0, max_evaluations=1)
    )
    w = jnp.zeros(2)
    state = opt.init(w)
    for _ in range(2):
        value, grad = jax.value_and_grad(loss)(w)
        updates, state = opt.update(grad, state, w, value=value, value_fn=loss)
        assert bool(state.linesearch_state.info.failed)
        assert bool(state.info.restarted)
        np.testing.assert_array_equal(updates, jnp.zeros(2))


def test_zoom_line_search_fits_the_linesearch_slot():
    with jax.enable_x64(True):
        loss, grad_norm, w_star = spd_quadratic(n=10, condition=100.0)
        # curv_rtol = 0.1 is the strong Wolfe constant CG needs (Nocedal & Wright
        # 5.2); optax's default of 0.9 suits quasi-Newton methods.
        opt = tpo.conjugate_gradient(
            linesearch=optax.scale_by_zoom_linesearch(30, curv_rtol=0.1)
        )
        w, steps, _ = minimise(
            loss, jnp.zeros(10), opt, 100, lambda w: grad_norm(w) < 1e-8
        )
        np.testing.assert_allclose(w, w_star, atol=1e-7)
        assert steps <= 60


def test_backtracking_line_search_fits_the_linesearch_slot():
    with jax.enable_x64(True):
        loss, grad_norm, w_star = spd_quadratic(n=10, condition=100.0)
        opt = tpo.conjugate_gradient(
            beta="polak_ribiere_plus",
            linesearch=optax.scale_by_backtracking_linesearch(
                30, max_learning_rate=10.0
            ),
        )
        w, _, states = minimise(
            loss, jnp.zeros(10), opt, 1500, lambda w: grad_norm(w) < 1e-8
        )
        np.testing.assert_allclose(w, w_star, atol=1e-7)
        # Armijo steps are far from exact, successive gradients are not nearly
        # orthogonal, and Powell's criterion restarts almost every step.
        restarts = np.mean([bool(s.info.restarted) for s in states])
        assert restarts > 0.9


def test_zoom_line_search_solves_rosenbrock():
    with jax.enable_x64(True):
        opt = tpo.conjugate_gradient(
            linesearch=optax.scale_by_zoom_linesearch(30, curv_rtol=0.1)
        )
        w, _, _ = minimise(
            rosenbrock,
            jnp.array([-1.2, 1.0]),
            opt,
            500,
            lambda w: rosenbrock(w) < 1e-10,
        )
        assert float(rosenbrock(w)) < 1e-10


def test_composes_after_gradient_clipping_in_a_chain():
    with jax.enable_x64(True):
        loss, grad_norm, w_star = spd_quadratic(n=10, condition=100.0)
        opt = optax.chain(optax.clip_by_global_norm(1.0), tight_cg())
        w, _, states = minimise(
            loss, jnp.zeros(10), opt, 100, lambda w: grad_norm(w) < 1e-6
        )
        np.testing.assert_allclose(w, w_star, atol=1e-6)
        # The clip really acted: the first stored gradient has norm 1.
        first_grad = states[0][1].grad_prev
        assert float(jnp.linalg.norm(first_grad)) == pytest.approx(1.0)


def test_invalid_hyperparameters_raise_value_error():
    with pytest.raises(ValueError, match="restart_every"):
        tpo.conjugate_gradient(restart_every=0)
    with pytest.raises(ValueError, match="powell_threshold"):
        tpo.conjugate_gradient(powell_threshold=-0.2)
    with pytest.raises(ValueError, match="linesearch"):
        tpo.conjugate_gradient(linesearch="golden")


def test_update_without_value_fn_shows_the_right_call():
    opt = tpo.conjugate_gradient()
    w = jnp.zeros(2)
    with pytest.raises(TypeError, match="value_fn=loss_fn") as error:
        opt.update(jnp.ones(2), opt.init(w), w)
    assert "conjugate_gradient.update" in str(error.value)
