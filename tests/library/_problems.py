"""Problems shared by the library's tests."""

import jax
import jax.numpy as jnp
import numpy as np
import optax


def regression_problem(seed=0, n=64, d=5):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((n, d)), jnp.float32)
    y = jnp.tanh(x @ jnp.asarray(rng.standard_normal(d), jnp.float32))

    def loss(params, batch_x, batch_y):
        pred = jnp.tanh(batch_x @ params["w"] + params["b"])
        return jnp.mean((pred - batch_y) ** 2)

    batches = [(x[i : i + 16], y[i : i + 16]) for i in range(0, n, 16)]
    params = {"w": jnp.zeros(d), "b": jnp.zeros(())}
    return loss, batches, params


def train_step(opt, loss, pass_grad=False):
    """One mini-batch step of ``opt`` on ``loss``, to be jitted by the caller."""

    def step(params, state, batch_x, batch_y):
        value, grad = jax.value_and_grad(loss)(params, batch_x, batch_y)
        extra = {"grad": grad} if pass_grad else {}
        updates, state = opt.update(
            grad,
            state,
            params,
            value=value,
            value_fn=loss,
            batch_x=batch_x,
            batch_y=batch_y,
            **extra,
        )
        return optax.apply_updates(params, updates), state, updates

    return step
