"""The fixed problem on which the swap rules' recording was made.

``tests/library/data/swap_recording.npz`` holds, for each case of :data:`CASES`, the
updates and swap steps of every step of a run made by the code before the swap
rules became objects (commit e189cd7's ``two_phase`` keywords, recorded by the
commit that added this file). ``tests/library/test_swap_recording.py`` runs the new
spelling of each case on the same problem and asserts equality, bit for bit.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

NUM_STEPS = 160
WINDOW = 4  # batches per epoch
BATCH = 16


def data():
    """A fixed 3-class problem: 64 points, 4 batches of 16."""
    kx, kt, kn = jax.random.split(jax.random.PRNGKey(0), 3)
    x = jax.random.normal(kx, (WINDOW * BATCH, 5))
    teacher = jax.random.normal(kt, (5, 3))
    logits = x @ teacher + 0.5 * jax.random.normal(kn, (WINDOW * BATCH, 3))
    return x, jnp.argmax(logits, axis=1)


def init_params():
    k1, k2 = jax.random.split(jax.random.PRNGKey(1))
    return {
        "hidden": 0.05 * jax.random.normal(k1, (5, 8)),
        "out": 0.05 * jax.random.normal(k2, (8, 3)),
    }


def logits_fn(params, x):
    return jnp.tanh(x @ params["hidden"]) @ params["out"]


def loss_fn(params, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(
        logits_fn(params, x), y
    ).mean()


def run(opt, *, manual_at=None, pass_errors=True, start=None):
    """``NUM_STEPS`` mini-batch steps; returns (updates [steps, n], swap steps,
    phases) as numpy arrays. ``manual_at``: call ``start(state)`` before that
    step."""
    x, y = data()
    params = init_params()

    @jax.jit
    def step(params, state, xb, yb):
        value_fn = lambda p: loss_fn(p, xb, yb)  # noqa: E731
        value, grad = jax.value_and_grad(value_fn)(params)
        errors = jnp.sum(jnp.argmax(logits_fn(params, xb), 1) != yb)
        extra = {"num_errors": errors} if pass_errors else {}
        updates, state = opt.update(
            grad, state, params, value=value, value_fn=value_fn, **extra
        )
        return optax.apply_updates(params, updates), state, updates

    state = opt.init(params)
    all_updates, swap_steps, phases = [], [], []
    for k in range(NUM_STEPS):
        if manual_at is not None and k == manual_at:
            state = start(state)
        b = k % WINDOW
        xb, yb = x[b * BATCH : (b + 1) * BATCH], y[b * BATCH : (b + 1) * BATCH]
        params, state, updates = step(params, state, xb, yb)
        flat, _ = jax.flatten_util.ravel_pytree(updates)
        all_updates.append(np.asarray(flat))
        swap_steps.append(int(state.swap_step))
        phases.append(bool(state.in_second_phase))
    return np.stack(all_updates), np.asarray(swap_steps), np.asarray(phases)
