"""Deterministic solvers on the same float64 problems: ours against CG peers.

    python -m experiments.benchmarks.solvers [--quick] [--out FILE.json]

Problems (float64): the extended Rosenbrock function with n = 2, 100 and 1000
from (-1.2, 1, -1.2, 1, ...); a 1000-dimensional quadratic
``0.5 x'Ax - b'x`` whose SPD matrix has eigenvalues spread log-uniformly over
[1, 1e4] (condition number 1e4) in a random basis; multinomial logistic
regression on scikit-learn's 8x8 digits (all 1797 images, standardised pixels
plus a bias, 650 weights, L2 penalty 1e-3 so that the minimum is unique);
Wood's function from (-3, -1, -3, -1) and the helical valley from (-1, 0, 0)
(Moré, Garbow & Hillstrom's problems 14 and 7).

Solvers, all run to the same test, ``||grad f||_2 <= 1e-5`` (or their own
closest equivalent), from the same start:

* ``ours golden``: :func:`twophase_optax.conjugate_gradient` (its default
  ``beta``, as in every row of ours but the former default) with the paper's
  golden-section line search (tol 1e-2);
* ``ours slope``: the same with :func:`twophase_optax.slope_linesearch`
  (values only; the next step computes its value and gradient);
* ``ours slope, store_grad``: the default, ``conjugate_gradient()``
  (Hager-Zhang ``beta``, ``slope_linesearch(rtol=0.5, max_evaluations=8,
  store_grad=True)``), whose gradient at the accepted point is reused
  through ``optax.value_and_grad_from_state``;
* ``ours former default``: Polak-Ribiere+ with ``slope_linesearch(store_grad=True)``
  (slope to a tenth, 20 evaluations);
* ``ours zoom``: the same with ``optax.scale_by_zoom_linesearch(curv_rtol=0.1)``
  (the value and gradient it returns are reused, as in optax's L-BFGS loop);
* ``scipy CG``: ``scipy.optimize.minimize(method="CG", jac=True)`` with
  ``gtol=1e-5, norm=2``, on jitted value-and-gradient functions;
* ``jaxopt.NonlinearCG`` (Polak-Ribiere, zoom) with ``tol=1e-5``;
* ``optimistix.NonlinearCG`` (Polak-Ribiere, backtracking Armijo) with
  ``rtol = atol = 1e-8`` and the 2-norm; its test is a Cauchy criterion on
  successive values and iterates, not the gradient;
* ``optax.lbfgs`` (memory 10, zoom), in the loop of optax's documentation.

The JAX solvers run their whole loop in one jitted ``lax.while_loop``. Columns:
iterations, function evaluations, gradient evaluations (counted by each solver:
a value-and-gradient call counts as one of each), wall time after compile
(median of interleaved repeats after a warm-up), compile time, the final
``f``, the final gradient norm and success (``||grad f||_2 <= 1e-5`` at the
returned point). A last table gives each solver's cost in forward-pass
equivalents (a value 1, a value and gradient 3) over SciPy's CG's, per
problem and in geometric mean. jaxopt and optimistix are optional: missing
ones are listed as not installed.
"""

from __future__ import annotations

import argparse
import functools
import pathlib
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

import twophase_optax as tpo
from experiments.benchmarks import timing

GTOL = 1e-5


# -- problems ----------------------------------------------------------------
def rosenbrock(x: jax.Array) -> jax.Array:
    return jnp.sum(100.0 * (x[1:] - x[:-1] ** 2) ** 2 + (1.0 - x[:-1]) ** 2)


def rosenbrock_start(n: int) -> jax.Array:
    return jnp.asarray(np.resize([-1.2, 1.0], n), jnp.float64)


def ill_conditioned_quadratic(n: int, condition: float = 1e4, seed: int = 0):
    """``0.5 x'Ax - b'x`` with log-spaced eigenvalues; returns (f, x0, f*)."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    eigenvalues = np.logspace(0.0, np.log10(condition), n)
    a = jnp.asarray((q * eigenvalues) @ q.T)
    b = jnp.asarray(rng.standard_normal(n))
    f_star = float(-0.5 * b @ np.linalg.solve(np.asarray(a), np.asarray(b)))
    f = lambda x: 0.5 * x @ (a @ x) - b @ x  # noqa: E731
    return f, jnp.zeros(n, jnp.float64), f_star


def digits_logistic_regression(num_images: int | None = None, l2: float = 1e-3):
    """Multinomial logistic regression on the digits; returns (f, x0, None)."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x, y = x[:num_images], y[:num_images]
    x = (x - x.mean(0)) / (x.std(0) + 1e-8)
    x = jnp.asarray(np.hstack([x, np.ones((len(x), 1))]), jnp.float64)
    labels = jnp.asarray(y)
    shape = (x.shape[1], 10)

    def f(w):
        logits = x @ w.reshape(shape)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        return jnp.mean(loss) + 0.5 * l2 * jnp.sum(w**2)

    return f, jnp.zeros(shape[0] * shape[1], jnp.float64), None


def wood(x: jax.Array) -> jax.Array:
    """Wood's function (Moré, Garbow & Hillstrom's problem 14), minimum 0 at 1."""
    return (
        100.0 * (x[1] - x[0] ** 2) ** 2
        + (1.0 - x[0]) ** 2
        + 90.0 * (x[3] - x[2] ** 2) ** 2
        + (1.0 - x[2]) ** 2
        + 10.0 * (x[1] + x[3] - 2.0) ** 2
        + 0.1 * (x[1] - x[3]) ** 2
    )


def helical_valley(x: jax.Array) -> jax.Array:
    """The helical valley (Moré, Garbow & Hillstrom's problem 7), minimum 0 at e1.

    Its angle ``theta`` lies in (-1/4, 3/4], as in the original's
    ``arctan(x2 / x1) / 2pi`` (+ 1/2 for ``x1 < 0``).
    """
    theta = jnp.arctan2(x[1], x[0]) / (2.0 * jnp.pi)
    theta = jnp.where(theta < -0.25, theta + 1.0, theta)
    radius = jnp.sqrt(x[0] ** 2 + x[1] ** 2)
    return 100.0 * (x[2] - 10.0 * theta) ** 2 + 100.0 * (radius - 1.0) ** 2 + x[2] ** 2


def problems(quick: bool) -> dict[str, tuple[Callable, jax.Array, float | None]]:
    sizes, quadratic_n, images = (
        ([2, 20], 50, 300) if quick else ([2, 100, 1000], 1000, None)
    )
    out = {f"Rosenbrock n={n}": (rosenbrock, rosenbrock_start(n), 0.0) for n in sizes}
    out[f"quadratic n={quadratic_n}, cond 1e4"] = ill_conditioned_quadratic(quadratic_n)
    out["logistic regression, digits"] = digits_logistic_regression(images)
    out["Wood"] = (wood, jnp.asarray([-3.0, -1.0, -3.0, -1.0], jnp.float64), 0.0)
    out["helical valley"] = (
        helical_valley,
        jnp.asarray([-1.0, 0.0, 0.0], jnp.float64),
        0.0,
    )
    return out


# -- solvers: each returns a function x0 -> (x, iterations, f evals, g evals) --
def _optax_loop(f, opt, max_iter, evals_per_iteration, from_state):
    """A jitted optax loop to ``||g||_2 <= GTOL``; counts evaluations."""
    value_and_grad = jax.value_and_grad(f)

    def solve(x0):
        value, grad = value_and_grad(x0)
        zero = jnp.asarray(0, jnp.int32)
        carry = (x0, opt.init(x0), value, grad, zero, zero + 1, zero + 1)

        def keep_going(c):
            return (optax.tree.norm(c[3]) > GTOL) & (c[4] < max_iter)

        def step(c):
            x, state, value, grad, it, f_evals, g_evals = c
            updates, state = opt.update(
                grad, state, x, value=value, grad=grad, value_fn=f
            )
            x = optax.apply_updates(x, updates)
            searched, with_grad = evals_per_iteration(state)
            if from_state:  # The line search returned f and grad at the new x.
                value, grad = from_state(state)
                # Or +inf: not known there, computed (optax's convention).
                unknown = ~jnp.isfinite(value)
                value, grad = optax.value_and_grad_from_state(f)(x, state=state)
                searched, with_grad = searched + unknown, with_grad + unknown
            else:
                value, grad = value_and_grad(x)
                searched, with_grad = searched + 1, with_grad + 1
            f_evals = f_evals + searched.astype(jnp.int32)
            g_evals = g_evals + with_grad.astype(jnp.int32)
            return (x, state, value, grad, it + 1, f_evals, g_evals)

        x, _, _, _, it, f_evals, g_evals = jax.lax.while_loop(keep_going, step, carry)
        return x, it, f_evals, g_evals

    return solve


def ours_golden(f, max_iter):
    def evals(state):
        n = state.linesearch_state.info.num_evaluations
        return n, jnp.zeros_like(n)

    opt = tpo.conjugate_gradient(linesearch=tpo.golden_section_linesearch())
    return _optax_loop(f, opt, max_iter, evals, None)


def ours_zoom(f, max_iter):
    zoom = optax.scale_by_zoom_linesearch(max_linesearch_steps=30, curv_rtol=0.1)
    opt = tpo.conjugate_gradient(linesearch=zoom)

    def evals(state):
        n = state.linesearch_state.info.num_linesearch_steps
        return n, n

    def from_state(state):
        return state.linesearch_state.value, state.linesearch_state.grad

    return _optax_loop(f, opt, max_iter, evals, from_state)


def ours_slope(f, max_iter, store_grad=False, former=False):
    if former:  # Polak-Ribiere+ and the search to a tenth of the slope.
        opt = tpo.conjugate_gradient(
            beta="polak_ribiere_plus",
            linesearch=tpo.slope_linesearch(store_grad=True),
        )
    elif store_grad:  # The default.
        opt = tpo.conjugate_gradient()
    else:
        opt = tpo.conjugate_gradient(linesearch=tpo.slope_linesearch())

    def evals(state):
        info = state.linesearch_state.info
        return info.num_evaluations, info.num_gradients

    def from_state(state):
        return state.linesearch_state.value, state.linesearch_state.grad

    reuse = store_grad or former
    return _optax_loop(f, opt, max_iter, evals, from_state if reuse else None)


def optax_lbfgs(f, max_iter):
    def evals(state):
        n = optax.tree.get(state, "num_linesearch_steps")
        return n, n

    def from_state(state):
        return optax.tree.get(state, "value"), optax.tree.get(state, "grad")

    return _optax_loop(f, optax.lbfgs(), max_iter, evals, from_state)


def jaxopt_cg(f, max_iter):
    import jaxopt

    solver = jaxopt.NonlinearCG(fun=f, maxiter=max_iter, tol=GTOL)

    def solve(x0):
        x, state = solver.run(x0)
        return x, state.iter_num, state.num_fun_eval, state.num_grad_eval

    return solve


def optimistix_cg(f, max_iter):
    import optimistix as optx

    solver = optx.NonlinearCG(rtol=1e-8, atol=1e-8, norm=optx.two_norm)

    def solve(x0):
        sol = optx.minimise(
            lambda x, _: f(x), solver, x0, max_steps=max_iter, throw=False
        )
        # Every step evaluates f and its gradient once (jax.linearize).
        steps = sol.stats["num_steps"]
        return sol.value, steps, steps + 1, steps + 1

    return solve


JAX_SOLVERS = {
    "ours golden": ours_golden,
    "ours slope": ours_slope,
    "ours slope, store_grad": functools.partial(ours_slope, store_grad=True),
    "ours former default": functools.partial(ours_slope, former=True),
    "ours zoom": ours_zoom,
    "jaxopt.NonlinearCG": jaxopt_cg,
    "optimistix.NonlinearCG": optimistix_cg,
    "optax.lbfgs": optax_lbfgs,
}
OURS = [
    "ours golden",
    "ours slope",
    "ours slope, store_grad",
    "ours former default",
    "ours zoom",
]
SOLVER_ORDER = [*OURS, "scipy CG", *[s for s in JAX_SOLVERS if s not in OURS]]
CG_PEERS = ("scipy CG", "jaxopt.NonlinearCG", "optimistix.NonlinearCG")


def scipy_cg(f, max_iter):
    from scipy.optimize import minimize

    value_and_grad = jax.jit(jax.value_and_grad(f))

    def fun(x):
        value, grad = value_and_grad(x)
        return float(value), np.asarray(grad)

    def solve(x0):
        res = minimize(
            fun,
            np.asarray(x0),
            jac=True,
            method="CG",
            options={"gtol": GTOL, "norm": 2, "maxiter": max_iter},
        )
        return jnp.asarray(res.x), res.nit, res.nfev, res.njev

    return solve, value_and_grad


def _installed(name: str) -> bool:
    try:
        __import__(name)
    except ImportError:
        return False
    return True


def run_problem(name, f, x0, f_star, max_iter, repeats) -> list[dict]:
    candidates, compiles, solves = {}, {}, {}
    for solver_name, make in JAX_SOLVERS.items():
        module = solver_name.split(".")[0]
        if module in ("jaxopt", "optimistix") and not _installed(module):
            continue
        solves[solver_name], compiles[solver_name] = timing.compiled(
            make(f, max_iter), x0
        )
        candidates[solver_name] = (solves[solver_name], (x0,))
    scipy_solve, value_and_grad = scipy_cg(f, max_iter)
    start = time.perf_counter()
    jax.block_until_ready(value_and_grad(x0))
    compiles["scipy CG"] = time.perf_counter() - start
    solves["scipy CG"] = scipy_solve
    candidates["scipy CG"] = (scipy_solve, (x0,))
    medians = timing.interleaved_medians(candidates, repeats, inner=1)

    grad_norm = jax.jit(lambda x: optax.tree.norm(jax.grad(f)(x)))
    rows = []
    for solver_name in SOLVER_ORDER:
        if solver_name not in solves:
            rows.append({"problem": name, "solver": solver_name, "installed": False})
            continue
        x, iterations, f_evals, g_evals = jax.device_get(solves[solver_name](x0))
        final_grad = float(grad_norm(x))
        rows.append(
            {
                "problem": name,
                "solver": solver_name,
                "installed": True,
                "iterations": int(iterations),
                "f_evals": int(f_evals),
                "g_evals": int(g_evals),
                "seconds": medians[solver_name],
                "compile_seconds": compiles[solver_name],
                "final_f": float(f(jnp.asarray(x))),
                "f_star": f_star,
                "final_grad_norm": final_grad,
                "success": final_grad <= GTOL,
            }
        )
    return rows


def forward_passes(row: dict) -> int:
    """Cost in forward-pass equivalents: a value 1, a value and gradient 3."""
    return row["f_evals"] + 2 * row["g_evals"]


def versus_scipy(rows: list[dict]) -> list[dict]:
    """Each solver's cost (forward-pass equivalents) over SciPy's CG's, per problem,
    and its geometric mean over the problems (``problem`` "geometric mean")."""
    out, logs = [], {}
    for problem in dict.fromkeys(r["problem"] for r in rows):
        here = [r for r in rows if r["problem"] == problem and r["installed"]]
        scipy = next(r for r in here if r["solver"] == "scipy CG")
        for r in here:
            ratio = forward_passes(r) / forward_passes(scipy)
            logs.setdefault(r["solver"], []).append(np.log(ratio))
            out.append(
                {
                    "problem": problem,
                    "solver": r["solver"],
                    "cost_ratio": ratio,
                    "success": r["success"],
                }
            )
    for solver, values in logs.items():
        out.append(
            {
                "problem": "geometric mean",
                "solver": solver,
                "cost_ratio": float(np.exp(np.mean(values))),
                "success": all(r["success"] for r in out if r["solver"] == solver),
            }
        )
    return out


def versus_best_cg_peer(rows: list[dict]) -> list[dict]:
    """Our f evaluations and time as multiples of the best successful CG peer."""
    out = []
    for problem in dict.fromkeys(r["problem"] for r in rows):
        here = [r for r in rows if r["problem"] == problem and r["installed"]]
        peers = [r for r in here if r["solver"] in CG_PEERS and r["success"]]
        if not peers:
            continue
        best_evals = min(r["f_evals"] for r in peers)
        best_time = min(r["seconds"] for r in peers)
        for r in here:
            if r["solver"].startswith("ours"):
                out.append(
                    {
                        "problem": problem,
                        "solver": r["solver"],
                        "f_evals_ratio": r["f_evals"] / best_evals,
                        "time_ratio": r["seconds"] / best_time,
                        "success": r["success"],
                    }
                )
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small problems")
    parser.add_argument("--out", type=pathlib.Path, default=None)
    args = parser.parse_args(argv)
    repeats = 5
    max_iter = 2_000 if args.quick else 20_000
    with jax.enable_x64(True):
        rows = []
        for name, (f, x0, f_star) in problems(args.quick).items():
            rows += run_problem(name, f, x0, f_star, max_iter, repeats)
    ratios = versus_best_cg_peer(rows)
    cost_ratios = versus_scipy(rows)
    result = {
        **timing.environment(),
        "repeats": repeats,
        "gtol": GTOL,
        "max_iterations": max_iter,
        "rows": rows,
        "versus_best_cg_peer": ratios,
        "cost_versus_scipy": cost_ratios,
    }
    print(f"device: {result['device']} ({result['backend']}), jax {jax.__version__}\n")
    print(format_rows(rows))
    print()
    print(
        timing.markdown_table(
            ["problem", "ours", "f evals / best CG peer", "time / best CG peer"],
            [
                [
                    r["problem"],
                    r["solver"],
                    f"{r['f_evals_ratio']:.2f}",
                    f"{r['time_ratio']:.2f}",
                ]
                for r in ratios
            ],
        )
    )
    print()
    print(format_cost_ratios(cost_ratios))
    timing.write_json(args.out, result)
    return result


def format_cost_ratios(cost_ratios: list[dict]) -> str:
    """Cost over SciPy's CG's: a row per problem, a column per solver."""
    solvers = list(dict.fromkeys(r["solver"] for r in cost_ratios))
    problems_ = list(dict.fromkeys(r["problem"] for r in cost_ratios))
    cell = {(r["problem"], r["solver"]): r for r in cost_ratios}
    table = []
    for problem in problems_:
        row = [problem]
        for solver in solvers:
            r = cell.get((problem, solver))
            row.append(
                ""
                if r is None
                else f"{r['cost_ratio']:.2f}" + ("" if r["success"] else " (failed)")
            )
        table.append(row)
    return timing.markdown_table(["cost / scipy CG", *solvers], table)


def format_rows(rows: list[dict]) -> str:
    header = [
        "problem",
        "solver",
        "iterations",
        "f evals",
        "grad evals",
        "wall ms",
        "compile s",
        "final f",
        "final grad norm",
        "success",
    ]
    table = []
    for r in rows:
        if not r["installed"]:
            table.append([r["problem"], r["solver"], *["not installed"] + [""] * 7])
            continue
        table.append(
            [
                r["problem"],
                r["solver"],
                r["iterations"],
                r["f_evals"],
                r["g_evals"],
                f"{1e3 * r['seconds']:.2f}",
                f"{r['compile_seconds']:.2f}",
                f"{r['final_f']:.6e}",
                f"{r['final_grad_norm']:.1e}",
                "yes" if r["success"] else "no",
            ]
        )
    return timing.markdown_table(header, table)


if __name__ == "__main__":
    main()
