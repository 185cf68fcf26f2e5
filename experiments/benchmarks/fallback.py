"""When CG's line search keeps failing: stay in CG, or fall back to Adam?

    python -m experiments.benchmarks.fallback [--quick] [--out FILE.json]

Runs :func:`twophase_optax.two_phase` (Adam, then CG with the golden-section
line search) with ``fallback=None`` (stay in the second phase) and with
``fallback="first"`` after 1, 3 and 10 failed searches in a row, on problems
where the searches fail for different reasons:

* softmax regression on the digits with an L2 penalty of 1e-3, float32, full
  batch: strongly convex with one minimum; CG reaches the float32 floor,
  where no step lowers the loss any more;
* a tanh MLP (64-32-10) with an L2 penalty of 1e-4: non-convex, with minima;
* both without the penalty: the digits are separable, so the loss has no
  minimum and keeps falling as the weights grow;
* the same MLP with bfloat16 parameters: steps smaller than a bfloat16 ulp
  round away, so searches fail far from a minimum;
* the same float32 MLP with CG on mini-batches of 128, a different batch each
  step.

The first phase is Adam (learning rate 1e-2) for ``swap_at`` steps
(``tpo.swap.at_step``, which after a fallback swaps again ``swap_at`` steps
later). For
each run the table gives the final and the best full-batch training loss, the
steps spent in the second phase, the failed searches, the fallbacks and the
compute in full-batch forward-pass equivalents (a gradient counts 3, a
line-search evaluation 1 per batch; a failed search spends its whole budget of
30). These are outcomes, not timings: every run is deterministic.
"""

from __future__ import annotations

import argparse
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax

import twophase_optax as tpo
from experiments import data as data_lib
from experiments.benchmarks import timing

MAX_EVALUATIONS = 30  # The golden-section search's default budget.
SETTINGS = {
    "stay (None, default)": {"fallback": None},
    "first, max_failures=1": {"fallback": "first", "max_failures": 1},
    "first, max_failures=3": {"fallback": "first", "max_failures": 3},
    "first, max_failures=10": {"fallback": "first", "max_failures": 10},
}


def digits() -> tuple[jax.Array, jax.Array]:
    data = data_lib.load("digits")
    x = data.x_train.reshape(len(data.x_train), -1)
    return jnp.asarray(x), jnp.asarray(data.y_train)


def masked_loss(logits_fn, l2):
    """Mean cross-entropy over the rows ``mask`` marks, plus ``l2/2 |w|^2``."""

    def loss(params, x, y, mask):
        logits = logits_fn(params, x).astype(jnp.float32)
        per_example = optax.softmax_cross_entropy_with_integer_labels(logits, y)
        penalty = 0.5 * l2 * optax.tree.norm(params, squared=True)
        return jnp.sum(per_example * mask) / jnp.sum(mask) + penalty

    return loss


def softmax_regression(x, dtype, l2=0.0):
    def logits(params, x):
        return x.astype(dtype) @ params["w"] + params["b"]

    params = {"w": jnp.zeros((x.shape[1], 10), dtype), "b": jnp.zeros(10, dtype)}
    return masked_loss(logits, l2), params


def mlp(x, dtype, hidden=32, seed=0, l2=0.0):
    def logits(params, x):
        h = jnp.tanh(x.astype(dtype) @ params["w1"] + params["b1"])
        return h @ params["w2"] + params["b2"]

    k1, k2 = jax.random.split(jax.random.key(seed))
    d = x.shape[1]
    params = {
        "w1": (jax.random.normal(k1, (d, hidden)) / np.sqrt(d)).astype(dtype),
        "b1": jnp.zeros(hidden, dtype),
        "w2": (jax.random.normal(k2, (hidden, 10)) / np.sqrt(hidden)).astype(dtype),
        "b2": jnp.zeros(10, dtype),
    }
    return masked_loss(logits, l2), params


def problems(quick: bool):
    """name -> (loss, params, swap_at, steps, cg batch size or None)."""
    x, y = digits()
    scale = 10 if quick else 1
    return {
        "softmax regression + L2 1e-3, float32": (
            *softmax_regression(x, jnp.float32, l2=1e-3),
            100 // scale,
            3000 // scale,
            None,
        ),
        "MLP + L2 1e-4, float32": (
            *mlp(x, jnp.float32, l2=1e-4),
            300 // scale,
            3000 // scale,
            None,
        ),
        "softmax regression, float32": (
            *softmax_regression(x, jnp.float32),
            100 // scale,
            3000 // scale,
            None,
        ),
        "MLP, float32": (*mlp(x, jnp.float32), 300 // scale, 3000 // scale, None),
        "MLP, bfloat16": (*mlp(x, jnp.bfloat16), 300 // scale, 3000 // scale, None),
        "MLP, float32, CG batch 128": (
            *mlp(x, jnp.float32),
            300 // scale,
            3000 // scale,
            128,
        ),
    }, (x, y)


def run(loss, params, data, swap_at, steps, cg_batch, setting):
    """``steps`` steps; returns per-step full-batch loss, phase and failures."""
    x, y = data
    opt = tpo.two_phase(optax.adam(1e-2), swap=tpo.swap.at_step(swap_at), **setting)
    batch = len(y) if cg_batch is None else cg_batch
    num_batches = len(y) // batch

    everything = jnp.ones(len(y))

    def body(carry, k):
        params, state = carry
        # Adam, and CG unless cg_batch is set, see the full batch; mini-batches
        # are the rows [start, start + batch) of the training set.
        start = (k % num_batches) * batch
        in_batch = (jnp.arange(len(y)) >= start) & (jnp.arange(len(y)) < start + batch)
        use_batch = state.in_second_phase & (cg_batch is not None)
        mask = jnp.where(use_batch, in_batch.astype(jnp.float32), everything)
        value, grad = jax.value_and_grad(loss)(params, x, y, mask)
        updates, new_state = opt.update(
            grad, state, params, value=value, value_fn=loss, x=x, y=y, mask=mask
        )
        ran_cg = state.in_second_phase
        failed = ran_cg & (optax.tree.norm(updates) == 0)
        # A fallback resets the CG state, so a failure is counted at the
        # budget it always spends.
        evaluations = jnp.where(
            failed,
            MAX_EVALUATIONS,
            new_state.second_state.linesearch_state.info.num_evaluations,
        )
        cost = (3 + jnp.where(ran_cg, evaluations, 0)) * jnp.sum(mask) / len(y)
        params = optax.apply_updates(params, updates)
        full_loss = loss(params, x, y, everything)
        return (params, new_state), (full_loss, ran_cg, failed, cost)

    @jax.jit
    def go(params):
        carry = (params, opt.init(params))
        (params, state), trace = jax.lax.scan(body, carry, jnp.arange(steps))
        return state, trace

    state, (losses, ran_cg, failed, cost) = jax.device_get(go(params))
    return {
        "final_loss": float(losses[-1]),
        "best_loss": float(np.min(losses)),
        "cg_steps": int(ran_cg.sum()),
        "failed_searches": int(failed.sum()),
        "first_failure": int(np.argmax(failed)) if failed.any() else -1,
        "fallbacks": int(state.num_fallbacks),
        "forward_passes": float(np.sum(cost)),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a tenth of the steps")
    parser.add_argument("--out", type=pathlib.Path, default=None)
    args = parser.parse_args(argv)
    found, data = problems(args.quick)
    rows = []
    for name, (loss, params, swap_at, steps, cg_batch) in found.items():
        for setting_name, setting in SETTINGS.items():
            outcome = run(loss, params, data, swap_at, steps, cg_batch, setting)
            rows.append(
                {
                    "problem": name,
                    "setting": setting_name,
                    "swap_at": swap_at,
                    "steps": steps,
                    **outcome,
                }
            )
            print(f"{name} / {setting_name}: {outcome}", flush=True)
    result = {"environment": timing.environment(), "rows": rows}
    timing.write_json(args.out, result)
    print(format_rows(rows))
    return result


def format_rows(rows: list[dict]) -> str:
    header = [
        "problem",
        "fallback",
        "final loss",
        "best loss",
        "CG steps",
        "failed searches",
        "first failure (step)",
        "fallbacks",
        "forward passes",
    ]
    body = [
        [
            r["problem"],
            r["setting"],
            f"{r['final_loss']:.6g}",
            f"{r['best_loss']:.6g}",
            r["cg_steps"],
            r["failed_searches"],
            r["first_failure"],
            r["fallbacks"],
            f"{r['forward_passes']:.0f}",
        ]
        for r in rows
    ]
    return timing.markdown_table(header, body)


if __name__ == "__main__":
    main()
