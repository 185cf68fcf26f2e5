"""The transformations compile once, keep their state dtypes, and accept pytrees."""

import chex
import jax
import jax.numpy as jnp
import optax
import pytest

import twophase_optax as tpo

TRANSFORMATIONS = {
    "golden_section_linesearch": lambda: tpo.golden_section_linesearch(),
    "conjugate_gradient": lambda: tpo.conjugate_gradient(),
}


def loss(params):
    leaves = jax.tree.leaves(params)
    return sum(jnp.sum((leaf.astype(jnp.float32) - 1.0) ** 2) for leaf in leaves)


def descent_input(name, params):
    """CG gets the gradient; the bare line search gets a descent direction."""
    grad = jax.grad(loss)(params)
    return grad if name == "conjugate_gradient" else optax.tree.scale(-1.0, grad)


@pytest.mark.parametrize("name", sorted(TRANSFORMATIONS))
def test_update_compiles_once(name):
    opt = TRANSFORMATIONS[name]()
    chex.clear_trace_counter()  # The counter is per code object, shared by params.

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(params, state):
        updates, state = opt.update(
            descent_input(name, params),
            state,
            params,
            value=loss(params),
            value_fn=loss,
        )
        return optax.apply_updates(params, updates), state

    params = {"w": jnp.zeros(3)}
    state = opt.init(params)
    for _ in range(5):
        params, state = step(params, state)
    assert float(loss(params)) < 1e-3


@pytest.mark.parametrize("name", sorted(TRANSFORMATIONS))
@pytest.mark.parametrize("dtype", ["float32", "float64", "bfloat16"])
def test_state_dtypes_are_stable(name, dtype):
    with jax.enable_x64(dtype == "float64"):
        opt = TRANSFORMATIONS[name]()
        params = {"w": jnp.zeros(4, dtype), "b": jnp.zeros((), dtype)}
        state = opt.init(params)
        expected = jax.tree.map(lambda x: (x.dtype, x.shape), state)
        for _ in range(3):
            updates, state = opt.update(
                descent_input(name, params),
                state,
                params,
                value=loss(params),
                value_fn=loss,
            )
            params = optax.apply_updates(params, updates)
            assert jax.tree.map(lambda x: (x.dtype, x.shape), state) == expected
            assert jax.tree.map(lambda x: x.dtype, updates) == jax.tree.map(
                lambda x: x.dtype, params
            )
        assert all(leaf.dtype == jnp.dtype(dtype) for leaf in jax.tree.leaves(params))
        # Step sizes live in float32 for half precision, float64 for float64.
        scalar = jnp.float64 if dtype == "float64" else jnp.float32
        linesearch_state = (
            state if name != "conjugate_gradient" else state.linesearch_state
        )
        assert linesearch_state.learning_rate.dtype == scalar
        assert float(loss(params)) < float(loss(jax.tree.map(jnp.zeros_like, params)))


def test_nested_pytree_gives_the_same_path_as_a_flat_vector():
    with jax.enable_x64(True):
        scales = jnp.linspace(1.0, 10.0, 6)

        def flat_loss(w):
            return jnp.sum(scales * (w - 1.0) ** 2) + jnp.sum(w[:3] * w[3:]) ** 2

        def to_tree(w):
            return {"a": w[:2], "b": (w[2:3].reshape(()), {"c": w[3:].reshape(3, 1)})}

        def tree_loss(tree):
            a, (b, inner) = tree["a"], tree["b"]
            return flat_loss(jnp.concatenate([a, b[None], inner["c"].ravel()]))

        def run(loss_fn, params):
            opt = tpo.conjugate_gradient()
            state = opt.init(params)
            for _ in range(6):
                value, grad = jax.value_and_grad(loss_fn)(params)
                updates, state = opt.update(
                    grad, state, params, value=value, value_fn=loss_fn
                )
                params = optax.apply_updates(params, updates)
            return params

        flat = run(flat_loss, jnp.zeros(6))
        tree = run(tree_loss, to_tree(jnp.zeros(6)))
        chex.assert_trees_all_close(tree, to_tree(flat), rtol=1e-12)
        assert float(flat_loss(flat)) < 0.2 * float(flat_loss(jnp.zeros(6)))


def test_two_phase_with_lbfgs_compiles_once_across_the_swap():
    # optax.lbfgs's init state has weakly typed scalars; two_phase makes them
    # strong, or the state coming back from the first call would not match
    # the one it was traced with and the second call would compile again.
    opt = tpo.two_phase(optax.adam(0.1), optax.lbfgs(), swap=tpo.swap.at_step(2))
    params = {"w": jnp.zeros(3)}
    state = opt.init(params)
    assert not any(leaf.weak_type for leaf in jax.tree.leaves(state))
    chex.clear_trace_counter()

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(params, state):
        value, grad = jax.value_and_grad(loss)(params)
        updates, state = opt.update(
            grad, state, params, value=value, grad=grad, value_fn=loss
        )
        return optax.apply_updates(params, updates), state

    for _ in range(6):
        params, state = step(params, state)
    # Two Adam steps, then L-BFGS reaches the quadratic's minimum at 1.
    assert bool(state.in_second_phase)
    assert float(loss(params)) < 1e-8
