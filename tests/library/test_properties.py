"""Properties that hold for random problems, pytrees and dtypes (hypothesis).

The examples are derandomized by default (the ``ci`` profile of conftest.py),
so a run is reproducible; ``HYPOTHESIS_PROFILE=thorough`` draws many more,
freshly random ones.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import twophase_optax as tpo

hypothesis = pytest.importorskip("hypothesis", reason="property tests need hypothesis")
from hypothesis import given  # noqa: E402
from hypothesis import settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

DTYPES = ("float32", "bfloat16", "float64")


def spd_matrix(n, log10_condition, seed):
    """A random symmetric positive definite matrix with the given conditioning."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    eigenvalues = np.logspace(0.0, log10_condition, n)
    return (q * eigenvalues) @ q.T, rng.standard_normal(n), rng.standard_normal(n)


def quadratic(w, a, b):
    return 0.5 * w @ a @ w - b @ w


quadratics = st.tuples(
    st.integers(1, 8),  # dimension
    st.floats(0.0, 4.0),  # log10 of the condition number
    st.integers(0, 2**31 - 1),  # seed
)

CG = tpo.conjugate_gradient()
objective = jax.jit(quadratic)


@jax.jit
def cg_step(w, state, a, b):
    value, grad = jax.value_and_grad(quadratic)(w, a, b)
    updates, state = CG.update(
        grad, state, w, value=value, value_fn=quadratic, a=a, b=b
    )
    return optax.apply_updates(w, updates), state


@given(quadratics, st.sampled_from(["float32", "float64"]))
def test_cg_never_raises_the_objective_beyond_rounding(problem, dtype):
    with jax.enable_x64(dtype == "float64"):
        a, b, w = (jnp.asarray(x, dtype) for x in spd_matrix(*problem))
        state = CG.init(w)
        for _ in range(2 * len(w) + 2):
            new_w, state = cg_step(w, state, a, b)
            if float(state.linesearch_state.learning_rate) > 0:  # Accepted.
                # Lower, or level within the rounding allowance (1e-6
                # relative) with which the search accepts a step on its slope.
                before = float(objective(w, a, b))
                assert float(objective(new_w, a, b)) <= before + 1e-6 * abs(before)
            else:  # Failed, or a zero gradient: nothing moves.
                np.testing.assert_array_equal(new_w, w)
            w = new_w


def pytrees(leaf):
    """Random nests of dicts, lists and tuples around ``leaf``."""
    return st.recursive(
        leaf,
        lambda children: st.one_of(
            st.lists(children, min_size=1, max_size=3),
            st.lists(children, min_size=1, max_size=3).map(tuple),
            st.dictionaries(st.sampled_from("abcd"), children, min_size=1),
        ),
        max_leaves=5,
    )


leaf_specs = st.tuples(
    st.lists(st.integers(1, 3), max_size=2).map(tuple),  # shape
    st.sampled_from(DTYPES),
)


def is_spec(node):
    return isinstance(node, tuple) and len(node) == 2 and isinstance(node[1], str)


def materialise(spec_tree, seed, draw=None):
    """Arrays for a tree of (shape, dtype) specs, drawn from ``seed``."""
    specs, treedef = jax.tree.flatten(spec_tree, is_leaf=is_spec)
    rng = np.random.default_rng(seed)
    draw = draw or rng.standard_normal
    leaves = [jnp.asarray(draw(shape), dtype) for shape, dtype in specs]
    return jax.tree.unflatten(treedef, leaves)


@given(
    pytrees(leaf_specs),
    st.integers(0, 2**31 - 1),
    st.floats(0.0, 3.0),  # log10 of the curvature spread
    st.floats(-2.0, 2.0),  # log10 of the radius beyond which the loss is NaN
)
def test_line_search_never_returns_a_non_finite_or_worse_point(
    spec_tree, seed, log10_spread, log10_radius
):
    with jax.enable_x64(True):
        params = materialise(spec_tree, seed)
        direction = materialise(spec_tree, seed + 1)  # Not always downhill.
        rng = np.random.default_rng(seed + 2)
        curvature = jax.tree.map(
            lambda x: jnp.asarray(10.0 ** (log10_spread * rng.random(x.shape))),
            params,
        )

        def loss(p):
            terms = jax.tree.map(
                lambda x, c: jnp.sum(c * (x.astype(jnp.float32) - 1.0) ** 2),
                p,
                curvature,
            )
            total = sum(jax.tree.leaves(terms))
            largest = optax.tree.max(jax.tree.map(jnp.abs, p))
            return jnp.where(largest < 10.0**log10_radius + 2.0, total, jnp.nan)

        search = tpo.golden_section_linesearch()
        objective = jax.jit(loss)
        value = objective(params)
        step, state = jax.jit(search.update, static_argnames="value_fn")(
            direction, search.init(params), params, value=value, value_fn=loss
        )
        new_params = optax.apply_updates(params, step)
        new_value = objective(new_params)
        assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(new_params))
        chex.assert_trees_all_equal_dtypes(new_params, params)
        if bool(state.info.failed):
            chex.assert_trees_all_equal(new_params, params)
        else:
            assert bool(jnp.isfinite(new_value)) and new_value < value


@settings(max_examples=8)
@given(pytrees(leaf_specs), st.integers(0, 2**31 - 1), st.integers(1, 6))
def test_two_phase_before_the_swap_equals_first(spec_tree, seed, swap_at):
    with jax.enable_x64(True):
        params = materialise(spec_tree, seed)
        gradients = [materialise(spec_tree, seed + 1 + k) for k in range(swap_at)]
        first = optax.adam(1e-2)
        ours = tpo.two_phase(first, swap=tpo.swap.at_step(swap_at))

        def loss(p):
            return sum(jnp.sum(x.astype(jnp.float32)) for x in jax.tree.leaves(p))

        value = loss(params)
        first_update = jax.jit(first.update)
        ours_update = jax.jit(ours.update, static_argnames="value_fn")
        ours_state, first_state = ours.init(params), first.init(params)
        for grad in gradients:
            expected, first_state = first_update(grad, first_state, params)
            got, ours_state = ours_update(
                grad, ours_state, params, value=value, value_fn=loss
            )
            chex.assert_trees_all_equal(got, expected, strict=True)
        chex.assert_trees_all_equal(
            ours_state.first_phase_state(), first_state, strict=True
        )
        assert bool(ours_state.in_second_phase) and int(ours_state.swap_step) == swap_at
