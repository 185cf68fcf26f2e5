"""Adam-phase overhead of two_phase against optax.adam, and optimizer memory.

    python -m experiments.benchmarks.overhead [--quick] [--out FILE.json]

Table 1: seconds per call of the jitted update alone (float32 params of 1e4,
1e6 and 1e7 elements) and of a full jitted train step of vit-mlp on digits
(batch 512), for ``optax.adam`` and ``two_phase(optax.adam)`` with each
statistic (a reading every 10 steps) and with the default ``window=1`` (where
both statistics are the step's gradient norm), before the swap. Medians of
interleaved repeats after a warm-up; compile time is reported separately.
Table 2: optimizer-state bytes as a multiple of the parameters' bytes.
"""

from __future__ import annotations

import argparse
import pathlib

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import twophase_optax as tpo
from experiments import data as data_lib
from experiments import models
from experiments.benchmarks import timing

WINDOW = 10  # Steps per gradient-norm reading, as for a 10-step epoch.


def optimizers() -> dict[str, optax.GradientTransformation]:
    adam = optax.adam(1e-3)
    return {
        "optax.adam": adam,
        "two_phase mean_grad": tpo.two_phase(
            adam, window=WINDOW, statistic="mean_grad"
        ),
        "two_phase mean_norm": tpo.two_phase(
            adam, window=WINDOW, statistic="mean_norm"
        ),
        "two_phase window 1": tpo.two_phase(adam),
    }


def update_only(sizes: list[int], repeats: int, inner: int) -> list[dict]:
    rows = []
    value_fn = lambda p: jnp.sum(p["w"] ** 2)  # noqa: E731
    for n in sizes:
        params = {"w": jnp.zeros(n, jnp.float32)}
        grads = {"w": jax.random.normal(jax.random.key(0), (n,), jnp.float32)}
        candidates, compiles = {}, {}
        for name, tx in optimizers().items():

            def update(g, s, p, tx=tx):
                return tx.update(g, s, p, value=jnp.zeros(()), value_fn=value_fn)

            args = (grads, tx.init(params), params)
            compiles[name] = timing.compile_seconds(update, *args)
            candidates[name] = (jax.jit(update), args)
        medians = timing.interleaved_medians(candidates, repeats, inner)
        for name in candidates:
            rows.append(
                {
                    "case": f"update only, {n:.0e} params",
                    "optimizer": name,
                    "seconds": medians[name],
                    "ratio": medians[name] / medians["optax.adam"],
                    "compile_seconds": compiles[name],
                }
            )
    return rows


def train_step(model_name: str, repeats: int, inner: int) -> list[dict]:
    dataset = data_lib.load("digits")
    model = models.create_model(model_name, "digits", dataset.image_shape, 10)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    params = nnx.to_pure_dict(params)
    images, labels = dataset.x_train[:512], dataset.y_train[:512]

    def loss(p, images, labels):
        outputs = nnx.merge(graphdef, nnx.State(p), rest)(images)
        return models.mse_loss(outputs, labels)

    candidates, compiles = {}, {}
    for name, tx in optimizers().items():

        def step(p, s, images, labels, tx=tx):
            value, grad = jax.value_and_grad(loss)(p, images, labels)
            updates, s = tx.update(
                grad, s, p, value=value, value_fn=loss, images=images, labels=labels
            )
            return optax.apply_updates(p, updates), s

        args = (params, tx.init(params), images, labels)
        compiles[name] = timing.compile_seconds(step, *args)
        candidates[name] = (jax.jit(step), args)
    medians = timing.interleaved_medians(candidates, repeats, inner)
    return [
        {
            "case": f"train step, {model_name} on digits, batch 512",
            "optimizer": name,
            "seconds": medians[name],
            "ratio": medians[name] / medians["optax.adam"],
            "compile_seconds": compiles[name],
        }
        for name in candidates
    ]


def state_memory(model_name: str) -> list[dict]:
    model = models.create_model(model_name, "digits", (8, 8, 1), 10)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    nbytes = lambda tree: sum(x.nbytes for x in jax.tree.leaves(tree))  # noqa: E731
    transformations = {
        **optimizers(),
        "conjugate_gradient": tpo.conjugate_gradient(),
        "optax.lbfgs (memory 10)": optax.lbfgs(memory_size=10),
    }
    return [
        {
            "optimizer": name,
            "state_bytes": nbytes(tx.init(params)),
            "params_bytes": nbytes(params),
            "multiple": nbytes(tx.init(params)) / nbytes(params),
        }
        for name, tx in transformations.items()
    ]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, smoke test")
    parser.add_argument("--out", type=pathlib.Path, default=None)
    args = parser.parse_args(argv)
    if args.quick:
        sizes, model, repeats, inner = [10_000, 100_000], "vit-nomlp-wkewq-wvwo", 5, 2
    else:
        sizes, model, repeats, inner = [10_000, 1_000_000, 10_000_000], "vit-mlp", 7, 20
    timings = update_only(sizes, repeats, inner) + train_step(model, repeats, inner)
    memory = state_memory(model)
    result = {
        **timing.environment(),
        "repeats": repeats,
        "inner": inner,
        "timings": timings,
        "memory": memory,
    }
    print(f"device: {result['device']} ({result['backend']}), jax {jax.__version__}\n")
    print(
        timing.markdown_table(
            ["case", "optimizer", "median ms", "ratio to optax.adam", "compile s"],
            [
                [
                    t["case"],
                    t["optimizer"],
                    f"{1e3 * t['seconds']:.3f}",
                    f"{t['ratio']:.3f}",
                    f"{t['compile_seconds']:.2f}",
                ]
                for t in timings
            ],
        )
    )
    print()
    print(
        timing.markdown_table(
            ["optimizer", f"state bytes ({model})", "x params bytes"],
            [
                [m["optimizer"], m["state_bytes"], f"{m['multiple']:.2f}"]
                for m in memory
            ],
        )
    )
    timing.write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
