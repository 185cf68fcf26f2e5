"""``tpo.two_phase(optax.adam(...), optax.lbfgs())``: Adam, then L-BFGS, as a
tested combination: shared buffers, value and gradient reuse, a chunked
full-batch loss, the fallback and the metrics."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

import twophase_optax as tpo


def _problem():
    """A tanh regression of 128 points: loss(params, x, y), params, data."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((128, 6)), jnp.float32)
    y = jnp.tanh(x @ jnp.asarray(rng.standard_normal(6), jnp.float32))

    def loss(params, x, y):
        return jnp.mean((jnp.tanh(x @ params["w"] + params["b"]) - y) ** 2)

    return loss, {"w": jnp.zeros(6), "b": jnp.zeros(())}, (x, y)


def _nbytes(tree):
    return sum(np.asarray(a).nbytes for a in jax.tree.leaves(tree))


def _train(opt, loss, params, data, steps, reuse):
    value_and_grad = (
        tpo.value_and_grad_from_state(loss) if reuse else jax.value_and_grad(loss)
    )

    @jax.jit
    def step(params, state):
        kwargs = {"state": state} if reuse else {}
        value, grad = value_and_grad(params, *data, **kwargs)
        updates, state = opt.update(
            grad,
            state,
            params,
            value=value,
            grad=grad,
            value_fn=loss,
            x=data[0],
            y=data[1],
        )
        return optax.apply_updates(params, updates), state, value

    state = opt.init(params)
    values = []
    for _ in range(steps):
        params, state, value = step(params, state)
        values.append(float(value))
    return params, state, values


def test_adam_shares_lbfgs_buffers_so_the_state_is_lbfgs_own():
    loss, params, _ = _problem()
    opt = tpo.two_phase(optax.adam(0.05), optax.lbfgs(), swap=tpo.swap.at_step(5))
    alone = _nbytes(optax.lbfgs().init(params))
    adam = _nbytes(optax.adam(0.05).init(params))
    # Adam's two moments live in L-BFGS's params-shaped buffers: what two_phase
    # adds to L-BFGS's own state is a few scalars, not Adam's moments.
    extra = _nbytes(opt.init(params)) - alone
    assert 0 < extra < adam - 2 * _nbytes(params) + 64


def test_reusing_the_searchs_value_and_gradient_gives_the_same_run():
    loss, params, data = _problem()
    opt = tpo.two_phase(optax.adam(0.05), optax.lbfgs(), swap=tpo.swap.at_step(10))
    fresh, _, fresh_values = _train(opt, loss, params, data, 30, reuse=False)
    reused, state, reused_values = _train(opt, loss, params, data, 30, reuse=True)
    assert bool(state.in_second_phase)
    np.testing.assert_allclose(reused_values, fresh_values, rtol=1e-5, atol=1e-9)
    for a, b in zip(jax.tree.leaves(reused), jax.tree.leaves(fresh), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    # L-BFGS after Adam fits far below where Adam was at the swap.
    assert reused_values[-1] < 1e-3 * reused_values[10]


def test_a_chunked_full_batch_loss_gives_the_same_run():
    loss, params, data = _problem()
    in_chunks_of_32 = tpo.chunked_loss(loss, 32)

    def chunked(params, x, y):  # optax's zoom search passes the data by name
        return in_chunks_of_32(params, x, y)

    opt = tpo.two_phase(optax.adam(0.05), optax.lbfgs(), swap=tpo.swap.at_step(10))
    _, _, whole = _train(opt, loss, params, data, 25, reuse=True)
    _, _, in_chunks = _train(opt, chunked, params, data, 25, reuse=True)
    np.testing.assert_allclose(in_chunks, whole, rtol=1e-4, atol=1e-9)


def test_failed_lbfgs_searches_fall_back_to_adam_and_metrics_read_them():
    loss, params, data = _problem()
    start = params

    def misleading(params, x, y):
        # Every point but the start looks far worse: each search fails.
        moved = optax.tree.norm(optax.tree.sub(params, start)) > 0
        return loss(params, x, y) + jnp.where(moved, 10.0, 0.0)

    opt = tpo.two_phase(
        optax.adam(0.05),
        optax.lbfgs(),
        swap=tpo.swap.at_step(0),
        fallback="first",
        max_failures=2,
    )
    value, grad = jax.value_and_grad(loss)(params, *data)

    def step(state):  # always from the start, where the loss is true
        return opt.update(
            grad,
            state,
            params,
            value=value,
            grad=grad,
            value_fn=misleading,
            x=data[0],
            y=data[1],
        )

    state = opt.init(params)
    for _ in range(2):
        updates, state = step(state)
        assert float(optax.tree.norm(updates)) == 0.0  # rejected or failed
    metrics = tpo.two_phase_metrics(state)
    assert (metrics["phase"], metrics["num_failures"]) == (1, 2)
    assert metrics["num_evaluations"] > 0
    # The third step falls back: Adam's step from a fresh state.
    updates, state = step(state)
    adam_step, _ = optax.adam(0.05).update(grad, optax.adam(0.05).init(params))
    for a, b in zip(jax.tree.leaves(updates), jax.tree.leaves(adam_step), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    metrics = tpo.two_phase_metrics(state)
    assert (metrics["phase"], metrics["num_fallbacks"]) == (0, 1)
