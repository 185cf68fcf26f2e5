"""Minimisation loops shared by the tests: full-batch, jitted, optax-style."""

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
