"""Adam-phase overhead of two_phase against optax.adam, and optimizer memory.

    python -m experiments.benchmarks.overhead [--quick] [--out FILE.json]

Table 1: seconds per call of the jitted update alone (float32 params of 1e4,
1e6 and 1e7 elements) and of a full jitted train step of vit-mlp on digits
(batch 512), for ``optax.adam`` and ``two_phase(optax.adam)`` with each
statistic (a reading every 10 steps) and with the default ``window=1`` (where
both statistics are the step's gradient norm), before the swap. Medians of
interleaved repeats after a warm-up; compile time is reported separately, and
so are the params-sized ``copy`` instructions of the optimised HLO and the
minor page faults per call (memory the host allocator handed back and the
next call touches again).
Table 2: optimizer-state bytes as a multiple of the parameters' bytes.
"""

from __future__ import annotations

import argparse
import pathlib
import re

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


def _computations(hlo_text: str) -> tuple[dict[str, list[str]], str]:
    """The HLO module's computations by name (body lines), and the entry's name."""
    computations, entry, name = {}, None, None
    for line in hlo_text.splitlines():
        header = re.match(r"(ENTRY )?%(\S+) \(.*\{$", line)
        if header:
            name = header.group(2)
            computations[name] = []
            entry = name if header.group(1) else entry
        elif line.startswith("}"):
            name = None
        elif name is not None:
            computations[name].append(line)
    return computations, entry


def params_sized_copies(hlo_text: str, params) -> dict[str, int]:
    """Params-sized ``copy`` instructions in an optimised HLO module.

    ``"total"`` counts them everywhere; ``"first_phase"`` those that run
    when the first branch of the entry computation's first conditional runs
    (for ``two_phase`` the first phase's branch of its ``lax.switch``): in
    that branch and in the entry computation, where XLA also puts copies for
    operands a branch passes through. Without a conditional it counts the
    entry computation's. A leaf is params-sized if it has the shape and dtype
    of a non-scalar leaf of ``params``.
    """
    hlo_types = {
        "float32": "f32",
        "float64": "f64",
        "bfloat16": "bf16",
        "float16": "f16",
    }
    shapes = {
        f"{hlo_types[jnp.dtype(x.dtype).name]}[{','.join(map(str, x.shape))}]"
        for x in jax.tree.leaves(params)
        if x.ndim
    }

    def count(lines):
        found = (
            re.search(r"= (\w+\[[\d,]*\])\{[^}]*\} copy\(", line) for line in lines
        )
        return sum(1 for m in found if m and m.group(1) in shapes)

    computations, entry = _computations(hlo_text)
    branches = [
        re.search(r"branch_computations=\{%([^,}]+)", line)
        for line in computations[entry]
        if " conditional(" in line
    ]
    first = next((m.group(1) for m in branches if m), None)
    in_first = 0 if first is None else count(computations[first])
    return {
        "total": sum(count(lines) for lines in computations.values()),
        "first_phase": count(computations[entry]) + in_first,
    }


def update_only(sizes: list[int], repeats: int, inner: int) -> list[dict]:
    rows = []
    value_fn = lambda p: jnp.sum(p["w"] ** 2)  # noqa: E731
    for n in sizes:
        params = {"w": jnp.zeros(n, jnp.float32)}
        grads = {"w": jax.random.normal(jax.random.key(0), (n,), jnp.float32)}
        candidates, compiles, copies = {}, {}, {}
        for name, tx in optimizers().items():

            def update(g, s, p, tx=tx):
                return tx.update(g, s, p, value=jnp.zeros(()), value_fn=value_fn)

            args = (grads, tx.init(params), params)
            executable, compiles[name] = timing.compiled(update, *args)
            copies[name] = params_sized_copies(executable.as_text(), params)
            candidates[name] = (jax.jit(update), args)
        medians, faults = timing.interleaved_medians_and_faults(
            candidates, repeats, inner
        )
        for name in candidates:
            rows.append(
                {
                    "case": f"update only, {n:.0e} params",
                    "optimizer": name,
                    "seconds": medians[name],
                    "ratio": medians[name] / medians["optax.adam"],
                    "compile_seconds": compiles[name],
                    "copies": copies[name],
                    "minor_faults_per_call": faults[name],
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

    candidates, compiles, copies = {}, {}, {}
    for name, tx in optimizers().items():

        def step(p, s, images, labels, tx=tx):
            value, grad = jax.value_and_grad(loss)(p, images, labels)
            updates, s = tx.update(
                grad, s, p, value=value, value_fn=loss, images=images, labels=labels
            )
            return optax.apply_updates(p, updates), s

        args = (params, tx.init(params), images, labels)
        executable, compiles[name] = timing.compiled(step, *args)
        copies[name] = params_sized_copies(executable.as_text(), params)
        candidates[name] = (jax.jit(step), args)
    medians, faults = timing.interleaved_medians_and_faults(candidates, repeats, inner)
    return [
        {
            "case": f"train step, {model_name} on digits, batch 512",
            "optimizer": name,
            "seconds": medians[name],
            "ratio": medians[name] / medians["optax.adam"],
            "compile_seconds": compiles[name],
            "copies": copies[name],
            "minor_faults_per_call": faults[name],
        }
        for name in candidates
    ]


def _own_polak_ribiere_plus(grad, grad_prev, dir_prev):
    # Polak-Ribiere+ as a user's function: CG cannot tell it from any other.
    return tpo.polak_ribiere_plus(grad, grad_prev, dir_prev)


def state_memory(model_name: str) -> list[dict]:
    model = models.create_model(model_name, "digits", (8, 8, 1), 10)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    nbytes = lambda tree: sum(x.nbytes for x in jax.tree.leaves(tree))  # noqa: E731
    transformations = {
        **optimizers(),
        "conjugate_gradient": tpo.conjugate_gradient(),
        # A beta function of the trees needs CG's previous gradient too: the
        # general path, with one params-sized tree that Adam cannot share.
        "two_phase window 1, CG with a beta function": tpo.two_phase(
            second=tpo.conjugate_gradient(beta=_own_polak_ribiere_plus)
        ),
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
    # The update alone is cheap and, on a shared machine, noisy: three times
    # the repeats.
    timings = update_only(sizes, 3 * repeats, inner) + train_step(model, repeats, inner)
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
            [
                "case",
                "optimizer",
                "median ms",
                "ratio to optax.adam",
                "compile s",
                "params-sized copies: first phase / all",
                "minor page faults / call",
            ],
            [
                [
                    t["case"],
                    t["optimizer"],
                    f"{1e3 * t['seconds']:.3f}",
                    f"{t['ratio']:.3f}",
                    f"{t['compile_seconds']:.2f}",
                    f"{t['copies']['first_phase']} / {t['copies']['total']}",
                    f"{t['minor_faults_per_call']:.1f}",
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
