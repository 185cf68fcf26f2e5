"""Loops shared by the library's tests: full-batch minimisation and one
mini-batch step, jitted, optax-style."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import optax


def minimise(
    loss: Callable[[Any], jax.Array],
    params: Any,
    opt: optax.GradientTransformationExtraArgs,
    max_steps: int,
    done: Callable[[Any], bool],
) -> tuple[Any, int, list[optax.OptState]]:
    """Runs ``opt`` until ``done(params)``; returns params, steps and states."""

    @jax.jit
    def step(params, state):
        value, grad = jax.value_and_grad(loss)(params)
        updates, state = opt.update(grad, state, params, value=value, value_fn=loss)
        return optax.apply_updates(params, updates), state

    state = opt.init(params)
    states = []
    for k in range(1, max_steps + 1):
        params, state = step(params, state)
        states.append(state)
        if done(params):
            return params, k, states
    return params, max_steps, states


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
