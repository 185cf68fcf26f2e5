"""Runs two_phase on an MLP over digits on a mesh; prints a JSON summary.

Started by tests/test_sharding.py in a subprocess whose XLA_FLAGS simulate
several CPU devices:

    python tests/experiments/_sharded_run.py DATA MODEL STEPS [--no-block] [--float64]

The same program runs on ``DATA * MODEL`` devices and on one device, from the
same initial parameters and batches, and reports the parameters after 20
steps, the swap step, the final loss, whether every state leaf kept its
sharding, and how often the step was traced.
"""

from __future__ import annotations

import json
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits

import twophase_optax as tpo
from experiments import sharding

BATCH = 256


def problem(dtype):
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(dtype)
    targets = np.eye(10, dtype=dtype)[y]
    k1, k2 = jax.random.split(jax.random.key(0))
    params = {
        "w1": np.asarray(jax.random.normal(k1, (64, 32)) / 8.0, dtype),
        "b1": np.zeros(32, dtype),
        "w2": np.asarray(jax.random.normal(k2, (32, 10)) / 32**0.5, dtype),
        "b2": np.zeros(10, dtype),
    }
    return x, targets, params


def loss(params, images, targets):
    hidden = jnp.tanh(images @ params["w1"] + params["b1"])
    return jnp.mean((hidden @ params["w2"] + params["b2"] - targets) ** 2)


def run(devices, axes, steps, block, dtype):
    x, targets, params = problem(dtype)
    mesh = sharding.make_mesh(axes, devices)
    # The paper's rule: this MLP's gradient norm falls from the start, so it
    # swaps within the first steps, where the runs are compared.
    tx = tpo.two_phase(
        optax.adam(1e-2), swap=tpo.swap.per_window(tpo.swap.PAPER, steps=1)
    )
    params_shardings = sharding.params_shardings(mesh, params)
    state_shardings = sharding.state_shardings(mesh, tx, params)
    params = jax.device_put(params, params_shardings)
    state = jax.device_put(tx.init(params), state_shardings)

    chex.clear_trace_counter()  # Each run traces its own step once.

    @chex.assert_max_traces(n=1)
    def step(params, state, images, targets):
        value, grad = jax.value_and_grad(loss)(params, images, targets)
        updates, state = tx.update(
            grad,
            state,
            params,
            value=value,
            value_fn=loss,
            images=images,
            targets=targets,
        )
        return optax.apply_updates(params, updates), state, value

    step = jax.jit(
        step,
        out_shardings=(params_shardings, state_shardings, sharding.replicated(mesh)),
    )
    after_20, values = None, []
    for i in range(steps):
        start = (i * BATCH) % (len(x) - BATCH)
        params, state, value = step(
            params,
            state,
            sharding.global_batch(mesh, x[start : start + BATCH]),
            sharding.global_batch(mesh, targets[start : start + BATCH]),
        )
        if block:
            value.block_until_ready()
        values.append(value)
        if i + 1 == 20:
            after_20 = jax.tree.map(lambda a: np.asarray(a).tolist(), params)
    kept = jax.tree.map(
        lambda a, s: a.sharding.is_equivalent_to(s, a.ndim), state, state_shardings
    )
    sharded_leaves = [
        list(a.sharding.spec)
        for a in jax.tree.leaves(state)
        if len(a.sharding.device_set) > 1 and not a.sharding.is_fully_replicated
    ]
    return {
        "devices": len(devices),
        "params_after_20": after_20,
        "swap_step": int(state.swap_step),
        "final_loss": float(loss(params, x, targets)),
        "state_sharding_kept": all(jax.tree.leaves(kept)),
        "sharded_state_leaves": sharded_leaves,
        "cache_size": step._cache_size(),
        "values": [float(v) for v in values],
    }


def main():
    data, model, steps = (int(a) for a in sys.argv[1:4])
    block = "--no-block" not in sys.argv
    dtype = np.float32
    if "--float64" in sys.argv:
        jax.config.update("jax_enable_x64", True)
        dtype = np.float64
    devices = jax.devices()
    assert len(devices) >= data * model, devices
    axes = {"data": data, "model": model}
    many = run(devices[: data * model], axes, steps, block, dtype)
    one = run(devices[:1], {"data": 1, "model": 1}, steps, block, dtype)
    print(json.dumps({"many": many, "one": one}))


if __name__ == "__main__":
    main()
