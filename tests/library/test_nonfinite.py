"""A step with a NaN or inf loss or gradient is skipped as if it never happened."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import twophase_optax as tpo

POISONS = {
    "nan gradient": (jnp.nan, 1.0),
    "inf gradient": (jnp.inf, 1.0),
    "nan loss": (1.0, jnp.nan),
    "inf loss": (1.0, jnp.inf),
}


def poisoned_step(opt, loss):
    """A step whose gradient's ``w`` and loss are multiplied as told."""

    def step(params, state, batch_x, batch_y, grad_factor, value_factor):
        value, grad = jax.value_and_grad(loss)(params, batch_x, batch_y)
        grad = {**grad, "w": grad["w"] * grad_factor}
        updates, state = opt.update(
            grad,
            state,
            params,
            value=value * value_factor,
            value_fn=loss,
            batch_x=batch_x,
            batch_y=batch_y,
        )
        return optax.apply_updates(params, updates), state, updates

    return step


def run(opt, loss, batches, params, schedule, poison=(1.0, 1.0)):
    """Steps through ``schedule``: batch indices, or ``None`` for a bad step."""
    step = jax.jit(poisoned_step(opt, loss))
    state, history = opt.init(params), []
    for k in schedule:
        if k is None:
            params, state, updates = step(params, state, *batches[0], *poison)
        else:
            params, state, updates = step(params, state, *batches[k], 1.0, 1.0)
        history.append((updates, params, state))
    return history


def without_counters(state):
    """The state with its skipped-step counters zeroed, for comparison."""
    state = state._replace(num_skipped=jnp.zeros_like(state.num_skipped))
    if isinstance(state, tpo.TwoPhaseState):
        cg = state.second_state._replace(
            num_skipped=jnp.zeros_like(state.second_state.num_skipped)
        )
        state = state._replace(second_state=cg)
    return state


def check_skipped_as_if_never_seen(problem, opt, bad_at, poison, steps=30):
    loss, batches, params = problem
    clean = [k % len(batches) for k in range(steps)]
    bad = clean[:bad_at] + [None] + clean[bad_at:]
    reference = run(opt, loss, batches, params, clean)
    ours = run(opt, loss, batches, params, bad, poison)
    updates, after_bad, state = ours[bad_at]
    chex.assert_trees_all_equal(updates, jax.tree.map(jnp.zeros_like, updates))
    before = ours[bad_at - 1]
    chex.assert_trees_all_equal(after_bad, before[1])
    assert int(state.num_skipped) == 1
    chex.assert_trees_all_equal(without_counters(state), before[2])
    for k in range(bad_at, steps):
        ours_k, reference_k = ours[k + 1], reference[k]
        chex.assert_trees_all_equal(ours_k[0], reference_k[0])  # updates
        chex.assert_trees_all_equal(ours_k[1], reference_k[1])  # params
        chex.assert_trees_all_equal(without_counters(ours_k[2]), reference_k[2])
    return ours, reference


@pytest.mark.parametrize("poison", POISONS.values(), ids=POISONS.keys())
def test_first_phase_skips_the_step_mid_window(poison, regression_problem):
    # A window of 4 read by "mean_grad" keeps a gradient sum; step 6 is
    # mid-window.
    window = tpo.swap.per_window(tpo.swap.peak(min_windows=10**6), steps=4)
    swap = tpo.swap.any_of(tpo.swap.at_step(20), window)
    opt = tpo.two_phase(optax.adam(1e-2), swap=swap)
    ours, _ = check_skipped_as_if_never_seen(
        regression_problem, opt, bad_at=6, poison=poison
    )
    state = ours[6][2]
    assert not bool(state.in_second_phase)
    assert int(state.count) == 6 and int(state.first_state[0].count) == 6
    assert int(state.swap[1].window_count) == 2
    assert int(ours[-1][2].swap_step) == 20  # The step count did not advance.


@pytest.mark.parametrize("poison", POISONS.values(), ids=POISONS.keys())
def test_second_phase_skips_the_step_and_keeps_the_cg_direction(
    poison, regression_problem
):
    opt = tpo.two_phase(optax.adam(1e-2), swap=tpo.swap.at_step(5))
    ours, _ = check_skipped_as_if_never_seen(
        regression_problem, opt, bad_at=9, poison=poison
    )
    state = ours[9][2]
    assert bool(state.in_second_phase)
    assert int(state.second_state.count) == 4
    assert int(state.second_state.num_skipped) == 0  # two_phase skipped first.


def test_conjugate_gradient_alone_skips_the_step(regression_problem):
    opt = tpo.conjugate_gradient()
    ours, _ = check_skipped_as_if_never_seen(
        regression_problem, opt, bad_at=3, poison=(jnp.nan, 1.0)
    )
    assert int(ours[-1][2].num_skipped) == 1


def test_composes_with_optax_apply_if_finite(regression_problem):
    """apply_if_finite checks the gradient; two_phase also checks the loss."""
    loss, batches, params = regression_problem
    inner = tpo.two_phase(optax.adam(1e-2), swap=tpo.swap.at_step(4))
    opt = optax.apply_if_finite(inner, max_consecutive_errors=5)
    clean = [k % len(batches) for k in range(12)]
    reference = run(inner, loss, batches, params, clean)
    bad = clean[:6] + [None] + clean[6:]
    nan_grad = run(opt, loss, batches, params, bad, (jnp.nan, 1.0))
    nan_loss = run(opt, loss, batches, params, bad, (1.0, jnp.nan))
    # A NaN gradient never reaches two_phase: apply_if_finite rejects it.
    state = nan_grad[6][2]
    assert int(state.total_notfinite) == 1 and int(state.inner_state.num_skipped) == 0
    # A NaN loss with a finite gradient passes apply_if_finite; two_phase skips it.
    state = nan_loss[6][2]
    assert int(state.total_notfinite) == 0 and int(state.inner_state.num_skipped) == 1
    for history in (nan_grad, nan_loss):
        chex.assert_trees_all_equal(history[6][1], history[5][1])
        for k in range(6, 12):
            chex.assert_trees_all_equal(history[k + 1][0], reference[k][0])
            chex.assert_trees_all_equal(history[k + 1][1], reference[k][1])


def test_skipped_step_does_not_retrace(regression_problem):
    loss, batches, params = regression_problem
    opt = tpo.two_phase(optax.adam(1e-2), swap=tpo.swap.at_step(2))
    chex.clear_trace_counter()
    step = jax.jit(chex.assert_max_traces(poisoned_step(opt, loss), n=1))
    state = opt.init(params)
    for factor in (1.0, jnp.nan, 1.0, 1.0, jnp.inf, 1.0):
        params, state, _ = step(params, state, *batches[0], factor, 1.0)
    assert int(state.num_skipped) == 2 and int(state.count) == 4
    assert np.isfinite(np.asarray(params["w"])).all()


# -- all_finite: one float reduction per leaf ---------------------------------
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.complex64])
@pytest.mark.parametrize("bad", [jnp.nan, jnp.inf, -jnp.inf])
def test_all_finite_finds_one_non_finite_element_anywhere(dtype, bad):
    from twophase_optax import _protocol

    finite = jnp.linspace(-3.0, 3.0, 1001).astype(dtype)
    tree = {"a": finite, "b": jnp.arange(5), "c": None}
    check = jax.jit(_protocol.all_finite)
    assert bool(check(tree))
    for where in (0, 500, 1000):
        assert not bool(check({**tree, "a": finite.at[where].set(bad)}))
    if jnp.issubdtype(dtype, jnp.complexfloating):
        # A non-finite imaginary part alone.
        assert not bool(check({**tree, "a": finite.at[7].set(1.0 + 1j * bad)}))


def test_all_finite_keeps_the_largest_finite_numbers_and_empty_leaves():
    from twophase_optax import _protocol

    largest = jnp.finfo(jnp.float32).max
    big = jnp.array([largest, -largest], jnp.float32)
    # A complex number whose magnitude overflows is still finite.
    huge = jnp.array([largest + 1j * largest], jnp.complex64)
    assert bool(_protocol.all_finite(big, huge, jnp.zeros((0,)), 3.0))
    assert not bool(_protocol.all_finite(big, jnp.float32(jnp.nan)))


@pytest.mark.skipif(
    jax.default_backend() != "cpu", reason="XLA's CPU buffer assignment is measured"
)
def test_the_cg_branch_needs_at_most_one_params_sized_scratch_array():
    # Scratch memory of the whole two_phase update (both phases compiled):
    # the line search's trial gradient. The finiteness masks of
    # jnp.all(jnp.isfinite(.)) made it 2.25 params-sized arrays.
    n = 100_000
    params = {"w": jnp.zeros(n, jnp.float32)}
    loss = lambda p: jnp.sum(p["w"] ** 2)  # noqa: E731
    for tx in (
        tpo.two_phase(optax.adam(1e-3), swap=tpo.swap.manual()),
        tpo.conjugate_gradient(),
    ):
        update = jax.jit(
            lambda g, s, p, tx=tx: tx.update(
                g, s, p, value=jnp.zeros(()), value_fn=loss
            )
        )
        compiled = update.lower(params, tx.init(params), params).compile()
        scratch = compiled.memory_analysis().temp_size_in_bytes
        assert scratch <= 1.1 * 4 * n, scratch
