"""Problems shared by the library's tests, as fixtures."""

import jax.numpy as jnp
import numpy as np
import pytest


@pytest.fixture(scope="session")
def regression_problem():
    """``(loss, batches, params)``: a tanh regression of 64 points in 5
    dimensions, in 4 batches of 16, from zero parameters.

    ``loss(params, batch_x, batch_y)`` is the batch's mean squared error; the
    arrays are immutable, so every test may share them.
    """
    rng = np.random.default_rng(0)
    n, d = 64, 5
    x = jnp.asarray(rng.standard_normal((n, d)), jnp.float32)
    y = jnp.tanh(x @ jnp.asarray(rng.standard_normal(d), jnp.float32))

    def loss(params, batch_x, batch_y):
        pred = jnp.tanh(batch_x @ params["w"] + params["b"])
        return jnp.mean((pred - batch_y) ** 2)

    batches = [(x[i : i + 16], y[i : i + 16]) for i in range(0, n, 16)]
    params = {"w": jnp.zeros(d), "b": jnp.zeros(())}
    return loss, batches, params
