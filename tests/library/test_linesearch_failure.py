"""A failed line search restarts CG; repeated failures may return to phase one."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import twophase_optax as tpo

# One evaluation that overshoots a unit quadratic: the search always fails.
FAILING = tpo.golden_section_linesearch(initial_step=100.0, max_evaluations=1)


def quadratic(w):
    return jnp.sum((w - 1.0) ** 2)


def steps(opt, w, n, loss=quadratic):
    """``n`` full-batch steps; returns (updates, params, state) after each."""

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(w, state):
        value, grad = jax.value_and_grad(loss)(w)
        updates, state = opt.update(grad, state, w, value=value, value_fn=loss)
        return optax.apply_updates(w, updates), state, updates

    chex.clear_trace_counter()
    state, history = opt.init(w), []
    for _ in range(n):
        w, state, updates = step(w, state)
        history.append((updates, w, state))
    return history


def test_failure_restarts_with_steepest_descent_without_powell():
    # A constant beta and no Powell test: only the failure can restart CG.
    calls = []

    def scripted_search():
        inner = tpo.golden_section_linesearch()

        def update(d, state, params, **kwargs):
            step, state = inner.update(d, state, params, **kwargs)
            fail = len(calls) == 1  # The second search fails.
            calls.append(fail)
            info = state.info._replace(failed=jnp.asarray(fail))
            step = step if not fail else jax.tree.map(jnp.zeros_like, step)
            return step, state._replace(info=info)

        return optax.GradientTransformationExtraArgs(inner.init, update)

    opt = tpo.conjugate_gradient(
        beta=lambda g, gp, dp: 0.5,
        powell_threshold=None,
        linesearch=scripted_search(),
    )
    loss = lambda w: (w[0] - 1.0) ** 2 + 10.0 * (w[1] - 1.0) ** 2  # noqa: E731
    w = jnp.array([0.0, 3.0])
    state = opt.init(w)
    restarted, failures = [], []
    for _ in range(4):
        value, grad = jax.value_and_grad(loss)(w)
        updates, state = opt.update(grad, state, w, value=value, value_fn=loss)
        w = optax.apply_updates(w, updates)
        restarted.append(bool(state.info.restarted))
        failures.append(int(state.num_failures))
    assert calls == [False, True, False, False]
    assert failures == [0, 1, 0, 0]
    # Step 0 is steepest descent; step 2 restarts because step 1 failed.
    assert restarted == [True, False, True, False]


def test_failures_in_a_row_are_counted():
    history = steps(tpo.conjugate_gradient(linesearch=FAILING), jnp.zeros(2), 4)
    assert [int(s.num_failures) for _, _, s in history] == [1, 2, 3, 4]
    for updates, _, state in history:
        np.testing.assert_array_equal(updates, jnp.zeros(2))
        assert bool(state.info.restarted)


def test_failure_flags_of_optax_line_searches_are_read():
    w = jnp.zeros(2)
    zoom = optax.scale_by_zoom_linesearch(10).init(w)
    failed = zoom._replace(info=zoom.info._replace(decrease_error=jnp.asarray(0.1)))
    succeeded = zoom._replace(info=zoom.info._replace(decrease_error=jnp.asarray(0.0)))
    step = jnp.ones(2)
    assert bool(tpo.linesearch_failed(failed, step))
    assert not bool(tpo.linesearch_failed(succeeded, step))
    # Unknown line searches: a zero step is a failure.
    assert bool(tpo.linesearch_failed(optax.EmptyState(), jnp.zeros(2)))
    assert not bool(tpo.linesearch_failed(optax.EmptyState(), step))


def test_fallback_none_stays_in_the_second_phase():
    opt = tpo.two_phase(
        optax.adam(0.1),
        tpo.conjugate_gradient(linesearch=FAILING),
        swap=tpo.swap.at_step(2),
        fallback=None,
    )
    history = steps(opt, jnp.zeros(2), 12)
    final = history[-1][2]
    assert bool(final.in_second_phase) and int(final.num_fallbacks) == 0
    assert int(final.second_state.num_failures) == 10


def test_fallback_returns_to_a_fresh_first_phase_after_max_failures():
    adam = optax.adam(0.1)
    opt = tpo.two_phase(
        adam,
        tpo.conjugate_gradient(linesearch=FAILING),
        swap=tpo.swap.at_step(2),
        fallback="first",
        max_failures=3,
    )
    w = jnp.array([0.0, 3.0])
    history = steps(opt, w, 8)
    phases = [bool(s.in_second_phase) for _, _, s in history]
    # Steps 0-1 Adam, 2-4 CG (three failures), then Adam again from step 5;
    # at_step(2) counts afresh and swaps after step 6.
    assert phases[:7] == [False, True, True, True, True, False, True]
    assert int(history[4][2].second_state.num_failures) == 3
    state = history[5][2]
    assert int(state.num_fallbacks) == 1 and int(state.swap_step) == -1
    assert int(state.count) == 6
    # Step 5 is the first step of a fresh Adam from where CG left the params,
    # with a fresh rule state and a fresh CG state for the next swap.
    w4 = history[4][1]
    grad = jax.grad(quadratic)(w4)
    # Inside one jitted program, as in the step, where XLA folds the fresh
    # state's constants into Adam's bias correction.
    fresh_adam = jax.jit(lambda g, w: adam.update(g, adam.init(w), w))
    expected, adam_state = fresh_adam(grad, w4)
    chex.assert_trees_all_equal(history[5][0], expected)
    chex.assert_trees_all_equal(state.first_phase_state(), adam_state)
    # CG's previous gradient and direction share Adam's moment buffers; the
    # rest of CG's state is fresh for the next swap.
    assert state.second_state.grad_prev is state.first_phase_state()[0].mu
    fresh = opt.init(w4)
    no_buffers = dict(grad_prev=None, dir_prev=None)
    chex.assert_trees_all_equal(
        state.second_state._replace(**no_buffers),
        fresh.second_state._replace(**no_buffers),
    )
    assert int(state.swap.phase_steps) == 1


def test_after_a_fallback_the_re_armed_rule_decides_the_next_swap():
    # A steep start that Adam walks down: the gradient norm falls at once,
    # which Algorithm 1's rule takes for a peak.
    opt = tpo.two_phase(
        optax.adam(0.1),
        tpo.conjugate_gradient(linesearch=FAILING),
        swap=tpo.swap.per_window(tpo.swap.PAPER, steps=1),
        fallback="first",
        max_failures=1,
    )
    history = steps(opt, jnp.array([-5.0, 8.0]), 40)
    states = [s for _, _, s in history]
    phases = [bool(s.in_second_phase) for s in states]
    # Detected on some step d = k + 1; step d + 1 fails; step d + 2 falls back.
    k = phases.index(True) - 1
    assert phases[k + 1 : k + 4] == [True, True, False]
    assert int(states[k + 3].num_fallbacks) == 1
    assert int(optax.tree.get(states[k + 3], "num_readings")) == 1  # re-armed
    again = next(i for i in range(k + 4, 40) if states[i].in_second_phase)
    # Detected on step `again`, so CG runs from the next step on.
    assert int(optax.tree.get(states[again], "detect_step")) == again
    assert int(states[again].swap_step) == again + 1


def test_fallback_reads_the_line_search_inside_a_chain():
    second = optax.chain(optax.clip(10.0), tpo.conjugate_gradient(linesearch=FAILING))
    opt = tpo.two_phase(
        optax.adam(0.1),
        second,
        swap=tpo.swap.at_step(1),
        fallback="first",
        max_failures=2,
    )
    states = [s for _, _, s in steps(opt, jnp.array([0.0, 3.0]), 4)]
    assert [int(s.num_failures) for s in states] == [0, 1, 2, 0]
    assert [int(s.num_fallbacks) for s in states] == [0, 0, 0, 1]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"fallback": "adam"}, "fallback"),
        ({"max_failures": 0}, "max_failures"),
        ({"max_failures": 2.5}, "max_failures"),
    ],
)
def test_invalid_fallback_settings_raise_value_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        tpo.two_phase(swap=tpo.swap.manual(), **kwargs)
