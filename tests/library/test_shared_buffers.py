"""The two phases share their params-sized buffers; CG keeps products of g_{k-1}.

two_phase's state holds each params-shaped tree once: Adam's moments before
the swap and CG's direction and stored gradient after it live in the same
buffers, so the state is twice the params (plus scalars) and the first
phase's branch copies nothing params-sized.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import twophase_optax as tpo
from experiments.benchmarks import overhead

MANUAL = tpo.swap.manual()

PARAMS = {"a": jnp.zeros(1000), "b": jnp.zeros((20, 30))}


def nbytes(tree):
    return sum(x.nbytes for x in jax.tree.leaves(tree))


def own_polak_ribiere_plus(grad, grad_prev, dir_prev):
    # A user's function: CG must keep the previous gradient itself for it.
    return tpo.polak_ribiere_plus(grad, grad_prev, dir_prev)


@pytest.mark.parametrize(
    "tx, multiple",
    [
        (tpo.two_phase(swap=MANUAL), 2),
        (
            tpo.two_phase(
                swap=tpo.swap.per_window(tpo.swap.peak(statistic="mean_norm"), steps=10)
            ),
            2,
        ),
        (
            tpo.two_phase(swap=tpo.swap.per_window(tpo.swap.peak(), steps=10)),
            3,
        ),  # the window's sum
        (tpo.conjugate_gradient(), 2),  # direction, stored gradient
        (tpo.conjugate_gradient(linesearch=tpo.golden_section_linesearch()), 2),
        # The general path: a beta function needs g_{k-1} as a tree, which
        # Adam's two moments leave no buffer for.
        (
            tpo.two_phase(
                swap=MANUAL, second=tpo.conjugate_gradient(beta=own_polak_ribiere_plus)
            ),
            3,
        ),
    ],
)
def test_state_is_a_small_multiple_of_the_params(tx, multiple):
    state = tx.init(PARAMS)
    shapes = {x.shape for x in jax.tree.leaves(PARAMS)}
    params_shaped = [x for x in jax.tree.leaves(state) if x.shape in shapes]
    assert sum(x.nbytes for x in params_shaped) == multiple * nbytes(PARAMS)
    assert nbytes(state) - multiple * nbytes(PARAMS) < 200  # the scalars


@pytest.mark.parametrize(
    "tx, copies",
    [
        (tpo.two_phase(swap=MANUAL), 0),
        (tpo.two_phase(swap=tpo.swap.per_window(tpo.swap.peak(), steps=10)), 0),
        # The general path passes CG's third tree (two leaves here) through.
        (
            tpo.two_phase(
                swap=MANUAL, second=tpo.conjugate_gradient(beta=own_polak_ribiere_plus)
            ),
            2,
        ),
    ],
)
def test_first_phase_branch_copies_nothing_params_sized(tx, copies):
    grads = jax.tree.map(jnp.ones_like, PARAMS)

    def update(g, s, p):
        return tx.update(g, s, p, value=jnp.zeros(()), value_fn=lambda p: 0.0)

    hlo = jax.jit(update).lower(grads, tx.init(PARAMS), PARAMS).compile().as_text()
    assert overhead.params_sized_copies(hlo, PARAMS)["first_phase"] == copies


def test_copy_counter_sees_a_params_sized_pass_through():
    # The counter itself: a conditional whose first branch (lax.cond's false
    # branch) returns an operand unchanged needs a copy of it on that path.
    def passes_z_through(x, z):
        return jax.lax.cond(
            x[0] > 0, lambda y, w: (y, 2.0 * w), lambda y, w: (2.0 * y, w), x, z
        )

    def computes_both(x, z):
        return jax.lax.cond(
            x[0] > 0,
            lambda y, w: (3.0 * y, 2.0 * w),
            lambda y, w: (2.0 * y, w + 1),
            x,
            z,
        )

    x = jnp.ones(1000)
    for f, copies in ((passes_z_through, 1), (computes_both, 0)):
        hlo = jax.jit(f).lower(x, x).compile().as_text()
        assert overhead.params_sized_copies(hlo, x)["first_phase"] == copies
        assert overhead.params_sized_copies(hlo, jnp.ones(999))["total"] == 0


def test_the_buffers_hold_adam_before_the_swap_and_cg_after():
    w = {"a": jnp.array([1.0, -2.0, 0.5])}
    f = lambda p: jnp.sum((p["a"] - 1.0) ** 2 * jnp.array([1.0, 4.0, 9.0]))  # noqa: E731
    opt = tpo.two_phase(optax.adam(0.1), swap=tpo.swap.at_step(3))
    adam = optax.adam(0.1)
    state, adam_state = opt.init(w), adam.init(w)
    value_and_grad = optax.value_and_grad_from_state(f)
    for step in range(5):
        value, grad = value_and_grad(w, state=state)
        updates, state = opt.update(grad, state, w, value=value, grad=grad, value_fn=f)
        if step < 3:
            _, adam_state = adam.update(grad, adam_state, w)
            chex.assert_trees_all_equal(state.first_phase_state(), adam_state)
            # Adam's moments sit in CG's direction and stored-gradient slots.
            cg = state.second_state
            chex.assert_trees_all_equal(cg.dir_prev, adam_state[0].mu)
            chex.assert_trees_all_equal(cg.linesearch_state.grad, adam_state[0].nu)
        w = optax.apply_updates(w, updates)
    # After the swap they are CG's own: the direction of its last step, and
    # the gradient at the new params, which the next step reuses.
    cg = state.second_state
    chex.assert_trees_all_close(cg.linesearch_state.grad, jax.grad(f)(w), rtol=1e-6)
    assert type(state.first_state[0].mu).__name__ == "_SharedBuffer"


def test_tree_map_params_sees_the_params_shaped_trees():
    # optax's convention for shardings and the like must keep working.
    tx = tpo.two_phase(swap=MANUAL)
    state = tx.init(PARAMS)
    marked = optax.tree_utils.tree_map_params(
        tx, lambda x: x + 1.0, state, transform_non_params=lambda x: x
    )
    shapes = {x.shape for x in jax.tree.leaves(PARAMS)}
    params_shaped = [x for x in jax.tree.leaves(marked) if x.shape in shapes]
    assert len(params_shaped) == 2 * len(jax.tree.leaves(PARAMS))
    assert all(bool(jnp.all(x == 1.0)) for x in params_shaped)


def quadratic_problem():
    a = jnp.diag(jnp.array([1.0, 3.0, 10.0, 30.0]))
    b = jnp.array([1.0, -1.0, 2.0, 0.5])
    return (lambda w: 0.5 * w @ a @ w - b @ w), jnp.linalg.solve(a, b)


def run_cg(opt, f, steps, w=None):
    w = jnp.zeros(4, jnp.float64) if w is None else w
    state, value_and_grad = opt.init(w), optax.value_and_grad_from_state(f)
    for _ in range(steps):
        value, grad = value_and_grad(w, state=state)
        updates, state = opt.update(grad, state, w, value=value, grad=grad, value_fn=f)
        w = optax.apply_updates(w, updates)
    return w, state


@pytest.mark.parametrize("beta", sorted(tpo.BETA_RULES))
def test_products_give_the_same_steps_as_the_previous_gradient(beta):
    with jax.enable_x64(True):
        f, minimum = quadratic_problem()
        ls = tpo.slope_linesearch(rtol=1e-4, store_grad=True)
        rule = tpo.BETA_RULES[beta]
        ours, state = run_cg(tpo.conjugate_gradient(beta, ls), f, 4)
        tree, tree_state = run_cg(tpo.conjugate_gradient(lambda *t: rule(*t), ls), f, 4)
        assert state.grad_prev is None and tree_state.grad_prev_products is None
        np.testing.assert_allclose(ours, tree, rtol=1e-10, atol=1e-12)
        # CG on a 4-D quadratic: the minimum in 4 near-exact searches.
        np.testing.assert_allclose(ours, minimum, rtol=1e-5, atol=1e-8)


def test_a_different_gradient_restarts_a_products_direction():
    with jax.enable_x64(True):
        f, _ = quadratic_problem()
        opt = tpo.conjugate_gradient()
        w, state = run_cg(opt, f, 1)
        stored = state.linesearch_state.grad
        kwargs = dict(value=f(w), value_fn=f)
        _, same = opt.update(stored, state, w, grad=stored, **kwargs)
        assert not bool(same.info.restarted)
        # beta from the products is Polak-Ribiere+ of the trees.
        g0 = jax.grad(f)(jnp.zeros(4, jnp.float64))
        expected = tpo.polak_ribiere_plus(stored, g0, -g0)
        np.testing.assert_allclose(same.info.beta, expected, rtol=1e-12)
        # A gradient of another batch: no g_{k-1} to form beta with.
        other = stored * jnp.array([1.0, 1.0, 1.0, 1.1])
        _, restarted = opt.update(other, state, w, grad=other, **kwargs)
        assert bool(restarted.info.restarted)
        np.testing.assert_array_equal(restarted.dir_prev, -other)
        # Rounding differences do not restart it.
        close = stored * (1.0 + 1e-12)
        _, kept = opt.update(close, state, w, grad=close, **kwargs)
        assert not bool(kept.info.restarted)
