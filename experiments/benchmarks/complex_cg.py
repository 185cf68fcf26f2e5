"""The default CG on complex params against the same problem on their real split.

    python -m experiments.benchmarks.complex_cg [--quick] [--n 500000]
        [--steps 200] [--out FILE.json]

The extended Rosenbrock function of ``2n`` real variables, once written on
``n`` complex64 params (real parts first, then imaginary parts) and once on
the ``2n`` float32 params themselves, minimised from zero by
``tpo.conjugate_gradient()`` for ``--steps`` steps in one jitted ``lax.scan``
(the value and gradient reused through ``optax.value_and_grad_from_state``,
the complex gradient conjugated as in optax). Complex params are optimised as
their real split, so both runs should reach the same loss; the table gives
the time per step of each (median of 5 repeats after the first call, which
also compiles and whose time is reported as the compile time) and the
complex run's time over the real one's.
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import time

import jax
import jax.numpy as jnp
import optax

import twophase_optax as tpo
from experiments.benchmarks import timing


def rosenbrock(x: jax.Array) -> jax.Array:
    return jnp.sum(100.0 * (x[1:] - x[:-1] ** 2) ** 2 + (1.0 - x[:-1]) ** 2)


def complex_rosenbrock(z: jax.Array) -> jax.Array:
    return rosenbrock(jnp.concatenate([z.real, z.imag]))


def run(fun, x0: jax.Array, steps: int, repeats: int = 5) -> dict:
    """Compile time, median seconds per step and the last value of ``steps`` steps."""
    opt = tpo.conjugate_gradient()
    value_and_grad = optax.value_and_grad_from_state(fun)

    def body(carry, _):
        x, state = carry
        value, grad = value_and_grad(x, state=state)
        grad = optax.tree.conj(grad)
        updates, state = opt.update(
            grad, state, x, value=value, grad=grad, value_fn=fun
        )
        return (optax.apply_updates(x, updates), state), value

    @jax.jit
    def minimise(x):
        return jax.lax.scan(body, (x, opt.init(x)), None, length=steps)

    start = time.perf_counter()
    jax.block_until_ready(minimise(x0))
    compile_seconds = time.perf_counter() - start
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        (x, _), values = jax.block_until_ready(minimise(x0))
        seconds.append(time.perf_counter() - start)
    return {
        "compile_seconds": compile_seconds,
        "seconds_per_step": statistics.median(seconds) / steps,
        "final_value": float(values[-1]),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny run, smoke test")
    parser.add_argument("--n", type=int, default=500_000, help="complex params")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--out", type=pathlib.Path, default=None)
    args = parser.parse_args(argv)
    for flag, value in (("--n", args.n), ("--steps", args.steps)):
        if value < 1:
            parser.error(f"argument {flag}: must be an integer >= 1, got {value}")
    n, steps = (50, 20) if args.quick else (args.n, args.steps)
    complex_run = run(complex_rosenbrock, jnp.zeros(n, jnp.complex64), steps)
    real_run = run(rosenbrock, jnp.zeros(2 * n, jnp.float32), steps)
    result = {
        **timing.environment(),
        "real_variables": 2 * n,
        "steps": steps,
        "complex64": complex_run,
        "float32 split": real_run,
        "ratio": complex_run["seconds_per_step"] / real_run["seconds_per_step"],
    }
    print(f"device: {result['device']}, jax {jax.__version__}\n")
    print(
        f"Rosenbrock, {2 * n} real variables, {steps} steps of "
        "tpo.conjugate_gradient()\n"
    )
    print("| params | ms/step | / float32 split | compile s | final loss |")
    print("|---|---|---|---|---|")
    for name in ("complex64", "float32 split"):
        row = result[name]
        ratio = row["seconds_per_step"] / real_run["seconds_per_step"]
        print(
            f"| {name} | {1e3 * row['seconds_per_step']:.3f} | {ratio:.2f} | "
            f"{row['compile_seconds']:.2f} | {row['final_value']:.6e} |"
        )
    timing.write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
