"""``conjugate_gradient(precondition=True)``: CG on ``z`` with ``p = P^(1/2) z``,
and ``two_phase`` setting ``P`` from Adam's second moment at the swap."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import twophase_optax as tpo

H = jnp.array([1.0, 10.0, 1e3, 1e4])


def quadratic(w):
    return 0.5 * jnp.sum(H * (w - 1.0) ** 2)


def rosenbrock(w):
    return jnp.sum(100.0 * (w[1:] - w[:-1] ** 2) ** 2 + (1.0 - w[:-1]) ** 2)


def _steps(opt, loss, params, state, steps):
    """``steps`` jitted steps of ``opt``: the params after each, the state."""

    @jax.jit
    def step(params, state):
        value, grad = jax.value_and_grad(loss)(params)
        updates, state = opt.update(
            grad, state, params, value=value, grad=grad, value_fn=loss
        )
        return optax.apply_updates(params, updates), state

    path = []
    for _ in range(steps):
        params, state = step(params, state)
        path.append(params)
    return path, state


def test_the_inverse_hessian_as_preconditioner_solves_a_quadratic_in_one_step():
    opt = tpo.conjugate_gradient(precondition=True)
    w = jnp.zeros(4)
    state = opt.init(w)._replace(preconditioner=1.0 / H)
    (w,), _ = _steps(opt, quadratic, w, state, 1)
    np.testing.assert_allclose(w, jnp.ones(4), rtol=1e-6)
    plain = tpo.conjugate_gradient()
    (w,), _ = _steps(plain, quadratic, jnp.zeros(4), plain.init(jnp.zeros(4)), 1)
    assert float(quadratic(w)) > 1.0  # steepest descent gets nowhere near


@pytest.mark.parametrize(
    "linesearch",
    [None, tpo.golden_section_linesearch(tol=1e-10)],
    ids=["products (slope search)", "trees (golden section)"],
)
def test_preconditioned_cg_is_cg_after_the_change_of_variables(linesearch):
    # float64 Rosenbrock: P-preconditioned CG on p against plain CG on z,
    # p = P^(1/2) z, step for step.
    with jax.enable_x64(True):
        pre = jnp.array([2.0, 0.5, 3.0, 0.25, 1.5], jnp.float64)
        root = jnp.sqrt(pre)
        p0 = jnp.array([-1.2, 1.0, -0.5, 0.8, 1.1], jnp.float64)
        opt = tpo.conjugate_gradient(precondition=True, linesearch=linesearch)
        ours, _ = _steps(
            opt, rosenbrock, p0, opt.init(p0)._replace(preconditioner=pre), 12
        )
        plain = tpo.conjugate_gradient(linesearch=linesearch)
        in_z = lambda z: rosenbrock(root * z)  # noqa: E731
        theirs, _ = _steps(plain, in_z, p0 / root, plain.init(p0 / root), 12)
        for p, z in zip(ours, theirs, strict=True):
            np.testing.assert_allclose(p, root * z, rtol=1e-7, atol=1e-9)
        assert float(rosenbrock(ours[-1])) < float(rosenbrock(p0))


def test_two_phase_sets_the_preconditioner_from_adams_second_moment():
    params = {"w": jnp.zeros(4), "b": jnp.zeros(())}

    def loss(p):
        return quadratic(p["w"]) + (p["b"] - 2.0) ** 2

    opt = tpo.two_phase(
        optax.adam(0.1),
        tpo.conjugate_gradient(precondition=True),
        swap=tpo.swap.at_step(5),
    )
    state = opt.init(params)

    @jax.jit
    def step(params, state):
        value, grad = jax.value_and_grad(loss)(params)
        updates, state = opt.update(grad, state, params, value=value, value_fn=loss)
        return optax.apply_updates(params, updates), state

    for k in range(7):
        if k == 5:  # the swap: Adam's moment as it stands
            nu = state.first_phase_state()[0].nu
        params, state = step(params, state)
    cg = state.second_state
    expected = jax.tree.map(lambda v: 1.0 / (jnp.sqrt(v) + 1e-8), nu)
    for a, b in zip(
        jax.tree.leaves(cg.preconditioner), jax.tree.leaves(expected), strict=True
    ):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    # Three params-sized trees: Adam's two moments share CG's direction and
    # stored gradient; the preconditioner is the third.
    nbytes = sum(np.asarray(x).nbytes for x in jax.tree.leaves(state))
    params_bytes = sum(np.asarray(x).nbytes for x in jax.tree.leaves(params))
    assert nbytes <= 3 * params_bytes + 200
