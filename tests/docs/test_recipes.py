"""The two-phase guide's recipes run as written and do what they claim."""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _markdown import python_blocks

import twophase_optax as tpo

GUIDE = pathlib.Path(__file__).resolve().parents[2] / "docs" / "two_phase.md"


def run_block(heading: str) -> dict:
    (code,) = python_blocks(heading, GUIDE)
    namespace: dict = {}
    exec(compile(code, str(GUIDE), "exec"), namespace)
    return namespace


def full_loss(ns):
    return float(ns["loss_fn"](ns["params"], ns["x"], ns["y"]))


def test_plain_pytree_recipe_swaps_at_an_epoch_boundary_and_cg_improves_the_fit():
    ns = run_block("Recipe: plain pytrees")
    metrics = tpo.two_phase_metrics(ns["state"])
    assert metrics["phase"] == 1
    assert metrics["swap_step"] % len(ns["batches"]) == 0
    assert metrics["swap_step"] == metrics["detect_step"] + 1
    # Adam alone for the same 60 epochs, from the same start.
    adam = run_adam_alone(ns, epochs=60)
    assert full_loss(ns) < full_loss(adam)


def run_adam_alone(ns, epochs):
    k1, k2 = jax.random.split(jax.random.key(1))
    params = {
        "w1": jax.random.normal(k1, (8, 32)) / 8**0.5,
        "b1": jnp.zeros(32),
        "w2": jax.random.normal(k2, (32, 1)) / 32**0.5,
        "b2": jnp.zeros(1),
    }
    opt = optax.adam(1e-2)
    state = opt.init(params)

    @jax.jit
    def step(params, state, x, y):
        grad = jax.grad(ns["loss_fn"])(params, x, y)
        updates, state = opt.update(grad, state, params)
        return optax.apply_updates(params, updates), state

    for _ in range(epochs):
        for x_batch, y_batch in ns["batches"]:
            params, state = step(params, state, x_batch, y_batch)
    return {"loss_fn": ns["loss_fn"], "params": params, "x": ns["x"], "y": ns["y"]}


def test_flax_nnx_recipe_equals_the_same_optimiser_on_a_plain_pytree():
    nnx = pytest.importorskip("flax.nnx", reason="the NNX recipe needs flax")
    ns = run_block("Recipe: Flax NNX")
    assert tpo.two_phase_metrics(ns["optimizer"].opt_state)["swap_step"] == 100

    # The same 150 steps on the same initial params as a plain pytree.
    graphdef, params, rest = nnx.split(ns["MLP"](nnx.Rngs(0)), nnx.Param, ...)
    params = nnx.to_pure_dict(params)

    def loss_fn(params, x, y):
        state = nnx.State(params)
        return jnp.mean((nnx.merge(graphdef, state, rest)(x) - y) ** 2)

    opt = tpo.two_phase(optax.adam(1e-2), swap=tpo.swap.at_step(100))
    state = opt.init(params)

    @jax.jit
    def step(params, state):
        loss, grad = jax.value_and_grad(loss_fn)(params, ns["x"], ns["y"])
        updates, state = opt.update(
            grad, state, params, value=loss, value_fn=loss_fn, x=ns["x"], y=ns["y"]
        )
        return optax.apply_updates(params, updates), state

    for _ in range(150):
        params, state = step(params, state)
    nnx_params = nnx.to_pure_dict(nnx.state(ns["model"], nnx.Param))
    for a, b in zip(jax.tree.leaves(nnx_params), jax.tree.leaves(params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    assert float(loss_fn(params, ns["x"], ns["y"])) < 0.5 * float(
        jnp.mean(ns["y"] ** 2)
    )
