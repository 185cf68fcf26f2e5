"""Nonlinear CG on its own, full batch: iterations and line-search cost.

Runs ``twophase_optax.conjugate_gradient`` with the golden-section line search on
the 2-D Rosenbrock function (float64, against ``scipy.optimize.minimize(method=
"CG")`` from the same start) and on a small MLP fitted to scikit-learn's 8x8
digits with the mean squared error on one-hot targets (float32), for several
line-search tolerances. Each CG step costs one gradient plus ``k`` forward
passes; the table gives the median and maximum ``k``.

    python -m experiments.cg_standalone
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax

import twophase_optax as tpo


def rosenbrock(w: jax.Array) -> jax.Array:
    return jnp.sum(100.0 * (w[1:] - w[:-1] ** 2) ** 2 + (1.0 - w[:-1]) ** 2)


def run_cg(loss, params, opt, max_steps, target):
    """The full-batch loop of docs/cg.md, "Using CG on its own"."""

    @jax.jit
    def step(params, state):
        value, grad = jax.value_and_grad(loss)(params)
        updates, state = opt.update(grad, state, params, value=value, value_fn=loss)
        return optax.apply_updates(params, updates), state

    state = opt.init(params)
    evaluations = []
    for k in range(1, max_steps + 1):  # noqa: B007  (k is the result)
        params, state = step(params, state)
        evaluations.append(int(state.linesearch_state.info.num_evaluations))
        if float(loss(params)) < target:
            break
    return params, k, evaluations


def digits_mlp(hidden: int = 32, seed: int = 0):
    """A 64-hidden-10 tanh MLP on all 1797 digits; returns (loss, params)."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = jnp.asarray(x / 16.0, jnp.float32)
    targets = jax.nn.one_hot(jnp.asarray(y), 10)
    k1, k2 = jax.random.split(jax.random.key(seed))
    params = {
        "w1": jax.random.normal(k1, (64, hidden)) / 8.0,
        "b1": jnp.zeros(hidden),
        "w2": jax.random.normal(k2, (hidden, 10)) / hidden**0.5,
        "b2": jnp.zeros(10),
    }

    def loss(p):
        h = jnp.tanh(x @ p["w1"] + p["b1"])
        return jnp.mean((h @ p["w2"] + p["b2"] - targets) ** 2)

    return loss, params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tols", type=float, nargs="+", default=[1e-2, 1e-3, 1e-4])
    parser.add_argument("--mlp-steps", type=int, default=200)
    args = parser.parse_args()

    rows = []
    with jax.enable_x64(True):
        start = np.array([-1.2, 1.0])
        from scipy.optimize import minimize

        reference = minimize(
            lambda w: float(rosenbrock(jnp.asarray(w))),
            start,
            jac=lambda w: np.asarray(jax.grad(rosenbrock)(jnp.asarray(w))),
            method="CG",
            options={"gtol": 1e-8},
        )
        rows.append(
            (
                "Rosenbrock 2-D",
                "scipy CG",
                reference.nit,
                f"{reference.fun:.1e}",
                "-",
                "-",
                reference.nfev,
            )
        )
        for tol in args.tols:
            opt = tpo.conjugate_gradient(
                linesearch=tpo.golden_section_linesearch(tol=tol, max_evaluations=60)
            )
            w, steps, evals = run_cg(rosenbrock, jnp.asarray(start), opt, 2000, 1e-10)
            rows.append(
                (
                    "Rosenbrock 2-D",
                    f"ours, tol={tol:g}",
                    steps,
                    f"{float(rosenbrock(w)):.1e}",
                    np.median(evals),
                    max(evals),
                    sum(evals),
                )
            )

    loss, params = digits_mlp()
    for tol in args.tols:
        opt = tpo.conjugate_gradient(linesearch=tpo.golden_section_linesearch(tol=tol))
        p, steps, evals = run_cg(loss, params, opt, args.mlp_steps, 0.0)
        rows.append(
            (
                "digits MLP 64-32-10",
                f"ours, tol={tol:g}",
                steps,
                f"{float(loss(p)):.2e}",
                np.median(evals),
                max(evals),
                sum(evals),
            )
        )

    print(
        "| problem | solver | iterations | final f | median k | max k | "
        "value_fn evals |"
    )
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(str(c) for c in row) + " |")


if __name__ == "__main__":
    main()
