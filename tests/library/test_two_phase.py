"""two_phase: Adam bit for bit until the gradient-norm peak, then CG."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _loops import train_step

import twophase_optax as tpo

E1 = jnp.array([1.0, 0.0])


# Algorithm 1's one-way swap, for the tests of the detector. The scripted
# gradients below point away from the minimum of value_fn, so every CG search
# fails, and the mini-batch CG runs fail three in a row too; with the default
# fallback those runs would return to Adam.
# Algorithm 1 as printed, one-way: these tests pin its exact swap steps (the
# default rule's are pinned in test_swap.py).
def one_way(window=1, **peak):
    rule = tpo.swap.peak(**{**PAPER, **peak})
    return dict(fallback=None, swap=tpo.swap.per_window(rule, steps=window))


PAPER = dict(gn_factor=0.9, smoothing=1.0, patience=1, min_rise=1.0)
ONE_WAY = one_way()
get = optax.tree.get


def value_fn(params):
    return jnp.sum((params - 3.0) ** 2)


def feed(opt, grads):
    """Feeds scripted gradients at fixed params; returns the state after each."""
    params = jnp.zeros(2)
    update = jax.jit(opt.update, static_argnames="value_fn")
    state, states = opt.init(params), []
    for g in grads:
        _, state = update(
            jnp.asarray(g), state, params, value=value_fn(params), value_fn=value_fn
        )
        states.append(state)
    return states


def scripted(norms):
    return [n * E1 for n in norms]


# Algorithm 1 with window = 1: the peak is 5, the first reading <= 4.5 is step 7.
NORMS = [1.0, 2.0, 3.0, 4.0, 5.0, 4.8, 4.6, 4.4, 4.2, 4.0]


def test_window_1_swaps_after_the_step_whose_reading_falls_below_gn_factor_peak():
    states = feed(tpo.two_phase(**ONE_WAY), scripted(NORMS))
    final = states[-1]
    assert int(get(final, "detect_step")) == 7
    assert int(final.swap_step) == 8
    assert float(get(final, "gn_max")) == 5.0
    # Step 7 itself was still Adam; CG ran from step 8 on (steps 8 and 9).
    assert not bool(states[7 - 1].in_second_phase)
    assert bool(states[7].in_second_phase)
    assert int(states[7].second_state.count) == 0
    assert int(final.second_state.count) == 2
    assert int(final.first_state[0].count) == 8  # Adam's own step count froze.


def test_window_3_swaps_at_the_first_step_of_the_next_window():
    # Readings (mean gradient norm per window of 3): 1, 2, 3, 2.5 <= 0.9 * 3.
    norms = [1.0] * 3 + [2.0] * 3 + [3.0] * 3 + [2.5] * 3 + [1.0] * 3
    final = feed(tpo.two_phase(**one_way(3)), scripted(norms))[-1]
    assert int(get(final, "detect_step")) == 11
    assert int(final.swap_step) == 12
    assert int(get(final, "num_readings")) == 5
    assert float(get(final, "gn_max")) == 3.0


@pytest.mark.parametrize(
    "statistic, detect_step, gn_max",
    [
        # Window readings: mean_grad |a + b| / 2 = 2, 4, 1 -> swaps in window 2.
        ("mean_grad", 5, 4.0),
        # mean_norm (|a| + |b|) / 2 = 2, 4, 4, 3 -> swaps in window 3.
        ("mean_norm", 7, 4.0),
    ],
)
def test_statistics_read_the_window_differently(statistic, detect_step, gn_max):
    signed = [2.0, 2.0, 4.0, 4.0, 5.0, -3.0, 3.0, 3.0, 1.0, 1.0]
    opt = tpo.two_phase(**one_way(2, statistic=statistic))
    final = feed(opt, scripted(signed))[-1]
    assert int(get(final, "detect_step")) == detect_step
    assert int(final.swap_step) == detect_step + 1
    assert float(get(final, "gn_max")) == gn_max
    if statistic == "mean_norm":
        assert final.swap.window_grad_sum is None  # Scalar state only.
    else:
        assert final.swap.window_grad_sum.shape == (2,)


def test_window_1_keeps_no_gradient_sum_and_both_statistics_agree():
    # One step per window: both statistics are the step's gradient norm.
    signed = [2.0, -2.0, 4.0, -4.0, 5.0, -3.0, 3.0, 3.0, 1.0, 1.0]
    runs = {
        statistic: feed(tpo.two_phase(**one_way(statistic=statistic)), scripted(signed))
        for statistic in ("mean_grad", "mean_norm")
    }
    for by_grad, by_norm in zip(runs["mean_grad"], runs["mean_norm"], strict=True):
        assert by_grad.swap.window_grad_sum is None
        chex.assert_trees_all_equal(by_grad.count, by_norm.count)
        chex.assert_trees_all_equal(by_grad.swap.rule_state, by_norm.swap.rule_state)
    assert int(get(runs["mean_grad"][-1], "detect_step")) == 5  # 3 <= 0.9 * 5.


def test_min_windows_delays_the_swap():
    norms = [5.0, 1.0, 1.0, 1.0]
    assert int(feed(tpo.two_phase(**ONE_WAY), scripted(norms))[-1].swap_step) == 2
    final = feed(tpo.two_phase(**one_way(min_windows=3)), scripted(norms))[-1]
    assert int(get(final, "detect_step")) == 2
    assert int(final.swap_step) == 3


def test_at_step_forces_the_split():
    final = feed(tpo.two_phase(swap=tpo.swap.at_step(9)), scripted(NORMS))[-1]
    assert int(final.swap_step) == 9
    assert int(final.second_state.count) == 1
    early = feed(tpo.two_phase(swap=tpo.swap.at_step(3)), scripted(NORMS))[-1]
    assert int(early.swap_step) == 3
    assert int(early.second_state.count) == len(NORMS) - 3


def test_swap_at_zero_runs_the_second_phase_from_the_start():
    final = feed(tpo.two_phase(swap=tpo.swap.at_step(0)), scripted(NORMS[:3]))[-1]
    assert int(final.swap_step) == 0
    assert int(final.second_state.count) == 3
    assert int(final.first_state[0].count) == 0


def run(opt, loss, batches, params, steps, pass_grad=False, edit_state=None):
    """Mini-batch training, one jitted step each; returns (updates, params, state).

    ``edit_state(k, state)``, if given, may change the state before step ``k``.
    """
    step = jax.jit(train_step(opt, loss, pass_grad))
    state, history = opt.init(params), []
    for k in range(steps):
        if edit_state is not None:
            edit_state(k, state)
        params, state, updates = step(params, state, *batches[k % len(batches)])
        history.append((updates, params, state))
    return history


def assert_bit_identical(history, reference, steps, fused_in_front=False):
    """Updates and params of the first ``steps`` steps agree bit for bit.

    ``fused_in_front``: a transformation before ``two_phase`` (clipping) is
    fused into Adam's arithmetic in the reference program but not across the
    ``lax.cond``. On the CPU the FMA cap of conftest.py makes both exact; on a
    GPU XLA contracts into FMAs regardless, and the two agree to an ulp.
    """
    exact = not fused_in_front or jax.default_backend() == "cpu"
    for k in range(steps):
        for ours, theirs in zip(history[k][:2], reference[k][:2], strict=True):
            if exact:
                chex.assert_trees_all_equal(ours, theirs)
            else:
                chex.assert_trees_all_close(ours, theirs, rtol=1e-6, atol=0)


def test_before_the_swap_updates_are_bit_identical_to_adam(regression_problem):
    loss, batches, params = regression_problem
    adam = run(optax.adam(1e-2), loss, batches, params, 200)
    ours = run(
        tpo.two_phase(optax.adam(1e-2), swap=tpo.swap.at_step(150)),
        loss,
        batches,
        params,
        200,
    )
    assert_bit_identical(ours, adam, 150)
    assert not np.array_equal(ours[150][0]["w"], adam[150][0]["w"])  # CG from 150.


def test_detected_swap_keeps_adam_bit_identical_until_it(regression_problem):
    loss, batches, params = regression_problem
    adam = run(optax.adam(1e-2), loss, batches, params, 300)
    opt = tpo.two_phase(optax.adam(1e-2), **one_way(4))
    ours = run(opt, loss, batches, params, 300)
    swap_step = int(ours[-1][2].swap_step)
    assert 0 < swap_step < 300, "the problem should swap within 300 steps"
    assert swap_step % 4 == 0  # The first step of a window.
    assert_bit_identical(ours, adam, swap_step)


def test_after_the_swap_updates_equal_conjugate_gradient_run_alone(regression_problem):
    loss, batches, params = regression_problem
    full_batch = [
        (
            jnp.concatenate([b[0] for b in batches]),
            jnp.concatenate([b[1] for b in batches]),
        )
    ]
    ours = run(
        tpo.two_phase(optax.adam(1e-2), swap=tpo.swap.at_step(20)),
        loss,
        full_batch,
        params,
        40,
    )
    cg_alone = run(tpo.conjugate_gradient(), loss, full_batch, ours[19][1], 20)
    # Bit for bit on the CPU; on a GPU the reduction order of the dot products
    # may differ between the two programs, and 20 line searches amplify it.
    exact = jax.default_backend() == "cpu"
    for k in range(20):
        for a, b in zip(ours[20 + k][:2], cg_alone[k][:2], strict=True):
            if exact:
                chex.assert_trees_all_equal(a, b)
            else:
                chex.assert_trees_all_close(a, b, rtol=1e-4, atol=0)
    # The first CG step is steepest descent from Adam's parameters.
    assert bool(ours[20][2].second_state.info.restarted)


def test_value_and_grad_from_state_computes_before_and_reuses_after_the_swap():
    a = jnp.diag(jnp.array([1.0, 3.0, 10.0]))
    f = lambda w: 0.5 * w @ a @ w - jnp.sum(w)  # noqa: E731
    second = tpo.conjugate_gradient(
        linesearch=tpo.slope_linesearch(store_grad=True), powell_threshold=None
    )
    opt = tpo.two_phase(optax.adam(0.1), second, swap=tpo.swap.at_step(3))
    value_and_grad = optax.value_and_grad_from_state(f)

    @jax.jit
    def step(w, state):
        reused = jnp.isfinite(optax.tree.get(state, "value"))
        value, grad = value_and_grad(w, state=state)
        updates, state = opt.update(grad, state, w, value=value, grad=grad, value_fn=f)
        return optax.apply_updates(w, updates), state, reused, value, grad

    w, state, reused = jnp.zeros(3), opt.init(jnp.zeros(3)), []
    for _ in range(7):
        exact_value, exact_grad = jax.value_and_grad(f)(w)
        w, state, was_reused, value, grad = step(w, state)
        # Computed or handed over, they are the value and gradient at w.
        np.testing.assert_allclose(value, exact_value, rtol=1e-5)
        np.testing.assert_allclose(grad, exact_grad, rtol=1e-4, atol=1e-6)
        reused.append(bool(was_reused))
    # Adam's three steps and CG's first (a fresh state) compute; then the
    # line search's last gradient is reused.
    assert reused == [False] * 4 + [True] * 3


def test_no_retrace_across_the_swap(regression_problem):
    loss, batches, params = regression_problem
    opt = tpo.two_phase(optax.adam(1e-2), swap=tpo.swap.at_step(3))
    chex.clear_trace_counter()
    step = jax.jit(chex.assert_max_traces(train_step(opt, loss), n=1))
    state = opt.init(params)
    for k in range(8):
        params, state, _ = step(params, state, *batches[k % len(batches)])
    assert int(state.swap_step) == 3


@pytest.mark.parametrize("dtype", ["float32", "float64", "bfloat16"])
def test_state_dtypes_are_stable_across_the_swap(dtype):
    with jax.enable_x64(dtype == "float64"):
        opt = tpo.two_phase(swap=tpo.swap.at_step(2))
        params = jnp.zeros(3, dtype)
        loss = lambda p: jnp.sum((p.astype(jnp.float32) - 1.0) ** 2)
        state = opt.init(params)
        expected = jax.tree.map(lambda x: (x.dtype, x.shape), state)
        for _ in range(4):
            value, grad = jax.value_and_grad(loss)(params)
            updates, state = opt.update(grad, state, params, value=value, value_fn=loss)
            params = optax.apply_updates(params, updates)
            assert jax.tree.map(lambda x: (x.dtype, x.shape), state) == expected
            assert updates.dtype == jnp.dtype(dtype)


def test_works_behind_gradient_clipping_in_a_chain(regression_problem):
    loss, batches, params = regression_problem
    clip = lambda: optax.clip_by_global_norm(0.05)
    reference = run(optax.chain(clip(), optax.adam(1e-2)), loss, batches, params, 300)
    ours = run(
        optax.chain(clip(), tpo.two_phase(optax.adam(1e-2), **one_way(4))),
        loss,
        batches,
        params,
        300,
        pass_grad=True,
    )
    two_phase_state = ours[-1][2][1]
    swap_step = int(two_phase_state.swap_step)
    assert 0 < swap_step < 300
    assert_bit_identical(ours, reference, swap_step, fused_in_front=True)
    # Readings use the raw gradient passed as grad=, not the clipped updates.
    assert float(get(two_phase_state, "gn_max")) > 0.05


def test_inject_hyperparams_around_first_learning_rate(regression_problem):
    loss, batches, params = regression_problem
    make_adam = lambda: optax.inject_hyperparams(optax.adam)(learning_rate=1e-2)
    opt = tpo.two_phase(make_adam(), swap=tpo.swap.at_step(100))
    reference_opt = make_adam()

    def halve_every_10_steps(get_hyperparams):
        def edit_state(k, state):
            if k and k % 10 == 0:
                hyperparams = get_hyperparams(state)
                hyperparams["learning_rate"] = hyperparams["learning_rate"] / 2

        return edit_state

    ours = run(
        opt,
        loss,
        batches,
        params,
        60,
        edit_state=halve_every_10_steps(lambda s: s.first_state.hyperparams),
    )
    reference = run(
        reference_opt,
        loss,
        batches,
        params,
        60,
        edit_state=halve_every_10_steps(lambda s: s.hyperparams),
    )
    assert_bit_identical(ours, reference, 60)
    final_lr = ours[-1][2].first_state.hyperparams["learning_rate"]
    assert float(final_lr) == pytest.approx(1e-2 / 32)


def test_metrics_helper_gives_flat_python_scalars():
    states = feed(
        optax.chain(optax.identity(), tpo.two_phase(**ONE_WAY)), scripted(NORMS)
    )
    metrics = tpo.two_phase_metrics(states[-1])
    assert metrics["phase"] == 1
    assert metrics["swap_step"] == 8
    assert metrics["detect_step"] == 7
    assert metrics["gn_max"] == 5.0
    assert metrics["gn_last"] == pytest.approx(4.0)
    assert metrics["step"] == 10
    assert metrics["num_skipped"] == 0 and metrics["num_fallbacks"] == 0
    # The scripted gradients point away from the minimum of value_fn, so both
    # CG steps' line searches fail.
    assert metrics["num_failures"] == 2 and metrics["linesearch_failed"]
    assert set(metrics) >= {
        "linesearch_learning_rate",
        "linesearch_value",
        "linesearch_num_evaluations",
        "linesearch_num_gradients",
        "linesearch_failed",
    }
    assert metrics["swap_reason"] == "peak"
    assert all(isinstance(v, (int, float, bool, str)) for v in metrics.values())


def test_metrics_helper_rejects_a_state_without_two_phase():
    with pytest.raises(ValueError, match="TwoPhaseState"):
        tpo.two_phase_metrics(optax.adam(1e-3).init(jnp.zeros(2)))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"first": "adam"}, "first"),
        ({"second": "cg"}, "second"),
        ({"fallback": "adam"}, "fallback"),
        ({"max_failures": 0}, "max_failures"),
        ({"max_failures": True}, "max_failures"),
    ],
)
def test_invalid_hyperparameters_raise_value_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        tpo.two_phase(**{"swap": tpo.swap.manual(), **kwargs})


def test_update_without_value_fn_shows_the_right_call():
    opt = tpo.two_phase(swap=tpo.swap.manual())
    params = jnp.zeros(2)
    with pytest.raises(TypeError, match="value_fn=loss_fn") as error:
        opt.update(jnp.ones(2), opt.init(params), params, value=1.0)
    assert "two_phase.update" in str(error.value)
