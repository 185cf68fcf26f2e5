"""The optimizer state survives orbax and numpy round trips, in both phases."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _loops import train_step

import twophase_optax as tpo

ocp = pytest.importorskip("orbax.checkpoint", reason="the round trip needs orbax")

SWAP_AT = 10


def make_opt(**kwargs):
    # A window of 2 read by "mean_grad": the state holds a gradient sum
    # mid-window.
    window = tpo.swap.per_window(tpo.swap.peak(min_windows=10**6), steps=2)
    swap = tpo.swap.any_of(tpo.swap.at_step(SWAP_AT), window)
    return tpo.two_phase(optax.adam(1e-2), swap=swap, **kwargs)


def trajectory(opt, loss, batches, params, state, first, last):
    """Steps ``first .. last - 1``; returns (params, state) after each."""
    step = jax.jit(train_step(opt, loss))
    history = []
    for k in range(first, last):
        params, state, _ = step(params, state, *batches[k % len(batches)])
        history.append((params, state))
    return history


def save_and_restore(tmp_path, tree, template):
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / "checkpoint", tree)
    checkpointer.wait_until_finished()
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
    return checkpointer.restore(tmp_path / "checkpoint", target)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float64"])
@pytest.mark.parametrize("step", [SWAP_AT - 5, SWAP_AT + 5], ids=["first", "second"])
def test_full_state_round_trips_through_orbax(dtype, step, tmp_path):
    with jax.enable_x64(dtype == "float64"):
        loss = lambda p: sum(  # noqa: E731
            jnp.sum((x.astype(jnp.float32) - 2.0) ** 2) for x in jax.tree.leaves(p)
        )
        params = {"w": jnp.zeros((3, 2), dtype), "b": [jnp.ones(4, dtype)]}
        # One-way (as the default): with bfloat16 params CG's searches soon
        # fail at the resolution of bfloat16, and a fallback would leave CG.
        opt = make_opt(fallback=None)
        state = opt.init(params)
        update = jax.jit(opt.update, static_argnames="value_fn")
        for _ in range(step):
            value, grad = jax.value_and_grad(loss)(params)
            updates, state = update(grad, state, params, value=value, value_fn=loss)
            params = optax.apply_updates(params, updates)
        assert bool(state.in_second_phase) == (step > SWAP_AT)
        restored = save_and_restore(tmp_path, state, opt.init(params))
        # strict: the same NamedTuple types, dtypes and shapes, bit for bit.
        chex.assert_trees_all_equal(restored, state, strict=True)


def test_full_state_round_trips_through_numpy_leaves(regression_problem):
    loss, batches, params = regression_problem
    opt = make_opt()
    history = trajectory(opt, loss, batches, params, opt.init(params), 0, 15)
    params, state = history[-1]
    leaves, treedef = jax.tree.flatten(state)
    as_numpy = [np.asarray(x) for x in leaves]
    restored = jax.tree.unflatten(treedef, as_numpy)
    assert type(restored) is tpo.TwoPhaseState and bool(restored.in_second_phase)
    chex.assert_trees_all_equal(restored, state, strict=False)
    assert [x.dtype for x in as_numpy] == [x.dtype for x in leaves]
    # The restored state drives the same compiled step to the same result.
    chex.clear_trace_counter()
    step = jax.jit(chex.assert_max_traces(train_step(opt, loss), n=1))
    ours = step(params, state, *batches[0])
    theirs = step(params, restored, *batches[0])
    chex.assert_trees_all_equal(ours, theirs)


def test_training_restored_mid_cg_continues_bit_identically(
    tmp_path, regression_problem
):
    loss, batches, params = regression_problem
    opt = make_opt()
    straight = trajectory(opt, loss, batches, params, opt.init(params), 0, 30)
    params_18, state_18 = straight[17]  # After step 17: the eighth CG step.
    assert bool(state_18.in_second_phase) and int(state_18.second_state.count) == 8
    saved = {"params": params_18, "opt_state": state_18}
    # A new optimizer object, as in a new process, gives only the structure.
    new_opt = make_opt()
    template = {"params": params, "opt_state": new_opt.init(params)}
    restored = save_and_restore(tmp_path, saved, template)
    resumed = trajectory(
        new_opt, loss, batches, restored["params"], restored["opt_state"], 18, 30
    )
    for (p, s), (p_ref, s_ref) in zip(resumed, straight[18:], strict=True):
        chex.assert_trees_all_equal(p, p_ref)
        chex.assert_trees_all_equal(s, s_ref)
