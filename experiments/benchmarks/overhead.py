"""Adam-phase overhead of two_phase against optax.adam, and optimizer memory.

    python -m experiments.benchmarks.overhead [--quick] [--out FILE.json]

Table 1: seconds per call of the jitted update alone (float32 params of 1e4,
1e6 and 1e7 elements) and of full jitted train steps (vit-mlp and vgg5 on
digits, batch 512, and an MLP of 1.07e6 params on 784 inputs, batch 256,
where the optimizer is a visible share of the step), for ``optax.adam`` and
``two_phase(optax.adam)`` before the swap with the default rule
(``tpo.swap.default``, fit or plateau), the fixed split (``at_step``, the
least a rule can do), and the gradient-norm peak with each statistic; the
rules read once every 10 steps, as for a 10-step epoch. Every step passes
``num_errors``, computed from the same forward pass. Medians of
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
    peak = lambda statistic: tpo.swap.per_window(  # noqa: E731
        tpo.swap.peak(statistic=statistic), steps=WINDOW
    )
    return {
        "optax.adam": adam,
        "two_phase default": tpo.two_phase(
            adam, swap=tpo.swap.default(steps_per_epoch=WINDOW)
        ),
        "two_phase at_step": tpo.two_phase(adam, swap=tpo.swap.at_step(10**9)),
        "two_phase peak mean_grad": tpo.two_phase(adam, swap=peak("mean_grad")),
        "two_phase peak mean_norm": tpo.two_phase(adam, swap=peak("mean_norm")),
    }


NO_ERRORS = jnp.zeros((), jnp.int32)


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


def timed(case: str, make_call, params, repeats: int, inner: int) -> list[dict]:
    """One row per optimizer: ``make_call(tx)`` gives a function and its
    arguments, timed round-robin against every other optimizer's."""
    candidates, compiles, copies = {}, {}, {}
    for name, tx in optimizers().items():
        call, args = make_call(tx)
        executable, compiles[name] = timing.compiled(call, *args)
        copies[name] = params_sized_copies(executable.as_text(), params)
        candidates[name] = (jax.jit(call), args)
    medians, faults = timing.interleaved_medians_and_faults(candidates, repeats, inner)
    return [
        {
            "case": case,
            "optimizer": name,
            "seconds": medians[name],
            "ratio": medians[name] / medians["optax.adam"],
            "compile_seconds": compiles[name],
            "copies": copies[name],
            "minor_faults_per_call": faults[name],
        }
        for name in candidates
    ]


def update_only(sizes: list[int], repeats: int, inner: int) -> list[dict]:
    rows = []
    value_fn = lambda p: jnp.sum(p["w"] ** 2)  # noqa: E731
    for n in sizes:
        params = {"w": jnp.zeros(n, jnp.float32)}
        grads = {"w": jax.random.normal(jax.random.key(0), (n,), jnp.float32)}

        def make_call(tx, grads=grads, params=params):
            def update(g, s, p):
                zero = jnp.zeros(())
                kwargs = dict(value=zero, value_fn=value_fn, num_errors=NO_ERRORS)
                return tx.update(g, s, p, **kwargs)

            return update, (grads, tx.init(params), params)

        case = f"update only, {n:.0e} params"
        rows += timed(case, make_call, params, repeats, inner)
    return rows


def model_problem(model_name: str):
    """A model of ``experiments.models`` on a digits batch of 512."""
    dataset = data_lib.load("digits")
    model = models.create_model(model_name, "digits", dataset.image_shape, 10)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    params = nnx.to_pure_dict(params)
    apply = lambda p, images: nnx.merge(graphdef, nnx.State(p), rest)(images)  # noqa: E731
    case = f"train step, {model_name} on digits, batch 512"
    return case, apply, params, (dataset.x_train[:512], dataset.y_train[:512])


def mlp_problem():
    """A ReLU MLP 784-1024-256-10 (1.07e6 params) on a random batch of 256."""
    sizes, keys = (784, 1024, 256, 10), jax.random.split(jax.random.key(0), 4)
    params = [
        (jax.random.normal(k, (m, n)) / m**0.5, jnp.zeros(n))
        for k, m, n in zip(keys, sizes, sizes[1:], strict=False)
    ]

    def apply(p, x):
        for w, b in p[:-1]:
            x = jax.nn.relu(x @ w + b)
        return x @ p[-1][0] + p[-1][1]

    x = jax.random.normal(keys[-1], (256, 784))
    labels = jax.random.randint(keys[-1], (256,), 0, 10)
    return "train step, MLP of 1.07e6 params, batch 256", apply, params, (x, labels)


def train_step(problem, repeats: int, inner: int) -> list[dict]:
    case, apply, params, (images, labels) = problem

    def loss_and_errors(p, images, labels):
        outputs = apply(p, images)
        errors = jnp.sum(jnp.argmax(outputs, -1) != labels, dtype=jnp.int32)
        return models.mse_loss(outputs, labels), errors

    def loss(p, images, labels):
        return loss_and_errors(p, images, labels)[0]

    def make_call(tx):
        def step(p, s, images, labels):
            (value, errors), grad = jax.value_and_grad(loss_and_errors, has_aux=True)(
                p, images, labels
            )
            extra = dict(num_errors=errors, images=images, labels=labels)
            updates, s = tx.update(grad, s, p, value=value, value_fn=loss, **extra)
            return optax.apply_updates(p, updates), s

        return step, (params, tx.init(params), images, labels)

    return timed(case, make_call, params, repeats, inner)


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
        "two_phase default, CG with a beta function": tpo.two_phase(
            second=tpo.conjugate_gradient(beta=_own_polak_ribiere_plus),
            swap=tpo.swap.default(steps_per_epoch=WINDOW),
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
        sizes, steps, repeats, inner = [10_000, 100_000], ["vit-nomlp-wkewq-wvwo"], 5, 2
        problems = [model_problem(name) for name in steps]
    else:
        sizes, steps, repeats, inner = (
            [10_000, 1_000_000, 10_000_000],
            ["vit-mlp", "vgg5"],
            5,
            20,
        )
        problems = [model_problem(name) for name in steps] + [mlp_problem()]
    model = steps[0]
    # The update alone is cheap and, on a shared machine, noisy: three times
    # the repeats.
    timings = update_only(sizes, 3 * repeats, inner)
    for problem in problems:
        timings += train_step(problem, repeats, inner)
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
