"""Which second phase: CG and its variants against L-BFGS, from the same Adam
checkpoints.

    python -m experiments.benchmarks.second_phase [--quick]
        [--models vit-mlp vgg5] [--seeds 0 1 2] [--losses softmax_mse xent]
        [--swaps 15 45 150] [--budget 300] [--runs runs/second_phase]
        [--out results/benchmarks/second_phase.json]

Each (model, seed, loss) first trains mini-batch Adam on digits (batch 64,
rate 1e-3, as the digits sweep) for ``max(--swaps)`` epochs and keeps the
checkpoint of each swap epoch (resumable: a finished run is read back). From
each checkpoint every second phase takes full-batch steps until it has spent
``--budget`` forward-pass equivalents (3 per Adam epoch), or until a step
evaluates nothing (a zero gradient), after which every step is the same.

The second phases (:data:`VARIANTS`):

* ``cg``: ``tpo.conjugate_gradient()``, the library's default.
* ``cg, HZ first step``: its first trial step Hager and Zhang's guess,
  ``0.01 |p|_inf / |g|_inf`` (later trials keep alpha phi'(0), as the default).
* ``cg, L-BFGS first step``: its first trial step ``min(1, 1/|g|_2)``, the
  step length ``optax.lbfgs`` starts with.
* ``cg, Adam-preconditioned``: CG on ``z`` with ``p = D z`` and
  ``D = 1/sqrt(sqrt(v_hat) + 1e-8)`` from Adam's second moment at the swap
  (diagonal preconditioning by a change of variables; its state is CG's and
  ``D``: 3x the params).
* ``cg, Adam-preconditioned, L-BFGS first step`` and ``cg,
  Adam-preconditioned, HZ first step``: both (the first step's guess taken
  in the preconditioned variables).
* ``L-BFGS``: ``optax.lbfgs()`` (memory 10, zoom line search).

Cost is counted as the experiments count it: a value 1, a value and gradient 3,
nothing for a value and gradient the line search left in the state. Reported
per run: forward-pass equivalents and seconds to reach 1e-4, 1e-6 and 1e-8
times the loss at the swap, the loss at 30, 100 and 300 forward-pass
equivalents (with Adam's own run at the same compute, where it goes that far),
and the state's size against the params'. Seconds exclude compiling.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import twophase_optax as tpo
from experiments import checkpoints
from experiments import config as config_lib
from experiments import models
from experiments import steps as steps_lib
from experiments import train as train_lib
from experiments import trainer as trainer_lib
from experiments.benchmarks import timing
from experiments.run_records import read_metrics
from twophase_optax.conjugate_gradient import DEFAULT_MAX_EVALUATIONS
from twophase_optax.conjugate_gradient import DEFAULT_RTOL

TARGETS = (1e-4, 1e-6, 1e-8)  # relative to the loss at the swap
BUDGETS = (30, 100, 300)  # forward-pass equivalents
ADAM = dict(dataset="digits", optimizer="adam", batch_size=64, lr=1e-3)
EPS = 1e-8


def _cg(initial_step: float = 1.0) -> optax.GradientTransformationExtraArgs:
    """The default CG with its search's first trial at ``initial_step``."""
    return tpo.conjugate_gradient(
        linesearch=tpo.slope_linesearch(
            initial_step=initial_step,
            rtol=DEFAULT_RTOL,
            max_evaluations=DEFAULT_MAX_EVALUATIONS,
            store_grad=True,
        )
    )


def _hz_step(params, grad) -> float:
    top = float(max(jnp.max(jnp.abs(x)) for x in jax.tree.leaves(params)))
    slope = float(max(jnp.max(jnp.abs(g)) for g in jax.tree.leaves(grad)))
    return 0.01 * top / slope if top > 0 and slope > 0 else 1.0


def _lbfgs_step(params, grad) -> float:
    norm = float(optax.tree.norm(grad))
    return min(1.0, 1.0 / norm) if norm > 0 else 1.0


@dataclasses.dataclass(frozen=True)
class Variant:
    """A second phase: how it is built from the start (params, gradient) and
    whether it runs on Adam-preconditioned variables."""

    make: Callable[[Any, Any], optax.GradientTransformation]
    preconditioned: bool = False


VARIANTS = {
    "cg": Variant(lambda p, g: _cg()),
    "cg, HZ first step": Variant(lambda p, g: _cg(_hz_step(p, g))),
    "cg, L-BFGS first step": Variant(lambda p, g: _cg(_lbfgs_step(p, g))),
    "cg, Adam-preconditioned": Variant(lambda z, g: _cg(), preconditioned=True),
    "cg, Adam-preconditioned, L-BFGS first step": Variant(
        lambda z, g: _cg(_lbfgs_step(z, g)), preconditioned=True
    ),
    "cg, Adam-preconditioned, HZ first step": Variant(
        lambda z, g: _cg(_hz_step(z, g)), preconditioned=True
    ),
    "L-BFGS": Variant(lambda p, g: optax.lbfgs()),
}


# The L-BFGS-style first step, min(1, 1/|g|), is the default's 1 wherever the
# gradient's norm at the swap is below 1 (each entry records it): run it with
# --variants where it is not.
DEFAULT_VARIANTS = (
    "cg",
    "cg, HZ first step",
    "cg, Adam-preconditioned",
    "cg, Adam-preconditioned, HZ first step",
    "L-BFGS",
)


QUICK_VARIANTS = ("cg", "cg, Adam-preconditioned", "L-BFGS")


def adam_run(args, model: str, seed: int, loss: str):
    """The Adam run's trainer and directory, trained (or resumed) to the last
    swap epoch with the swap epochs' checkpoints kept."""
    out = args.runs / loss / model / f"seed{seed}"
    epochs = max(args.swaps)
    settings = dict(
        ADAM,
        model=model,
        loss=loss,
        seed=seed,
        epochs=epochs,
        out=str(out),
        progress=False,
        keep_epochs=tuple(s - 1 for s in args.swaps),
    )
    if args.quick:
        settings["batch_size"] = 512
    done = len(read_metrics(out / "metrics.jsonl")) >= epochs
    config = config_lib.Config.of(**settings, resume=(out / "metrics.jsonl").exists())
    rows = read_metrics(out / "metrics.jsonl") if done else None
    if rows is None:
        rows = train_lib.train(config)
    return trainer_lib.Trainer(config), out, rows


def swap_state(trainer, out: pathlib.Path, epoch: int):
    """Params and Adam state at the end of ``epoch`` of the Adam run."""
    template = (trainer.params, optax.adam(1e-3).init(trainer.params))
    manager = checkpoints.open_checkpoints(out.absolute(), checkpoints.KEPT, None)
    counters = {"forward_passes": 0.0, "wall_time": 0.0, "compile_time": 0.0}
    restored = checkpoints.restore_checkpoint(manager, template, counters, epoch=epoch)
    manager.close()
    if restored is None:
        raise SystemExit(f"{out} keeps no checkpoint of epoch {epoch}; rerun it.")
    return restored[1]


def _second_moment_scale(adam_state) -> Any:
    """``D = 1/sqrt(sqrt(v_hat) + eps)`` from Adam's state (b2 = 0.999)."""
    (scale_state, _) = adam_state
    correction = 1.0 - 0.999 ** float(scale_state.count)
    return jax.tree.map(
        lambda v: 1.0 / jnp.sqrt(jnp.sqrt(v / correction) + EPS), scale_state.nu
    )


def run_variant(trainer, variant: Variant, params, adam_state, budget: float):
    """Full-batch steps of ``variant`` from ``params`` until ``budget``."""
    x, y = trainer.data.x_train, trainer.data.y_train
    batch_loss = trainer.batch_loss
    scale = _second_moment_scale(adam_state) if variant.preconditioned else None

    def loss(z, images, labels):
        p = z if scale is None else jax.tree.map(jnp.multiply, z, scale)
        return batch_loss(p, images, labels)

    z = params if scale is None else jax.tree.map(jnp.divide, params, scale)
    grad = jax.grad(loss)(z, x, y)
    tx = variant.make(z, grad)
    state = tx.init(z)
    state_bytes = sum(np.asarray(a).nbytes for a in jax.tree.leaves(state))
    if scale is not None:
        state_bytes += sum(np.asarray(a).nbytes for a in jax.tree.leaves(scale))
    param_bytes = sum(np.asarray(a).nbytes for a in jax.tree.leaves(params))
    reuse = steps_lib.stores_gradient(state)
    value_and_grad = (
        tpo.value_and_grad_from_state(loss) if reuse else jax.value_and_grad(loss)
    )

    @jax.jit
    def step(z, state, images, labels):
        if reuse:
            stored = optax.tree.get(state, "value")
            start = jnp.where(jnp.isfinite(stored), 0.0, steps_lib.VALUE_AND_GRAD)
            value, grad = value_and_grad(z, images, labels, state=state)
        else:
            start = jnp.asarray(steps_lib.VALUE_AND_GRAD)
            value, grad = value_and_grad(z, images, labels)
        updates, state = tx.update(
            grad,
            state,
            z,
            value=value,
            grad=grad,
            value_fn=loss,
            images=images,
            labels=labels,
        )
        cost = start + tpo.linesearch_cost(tpo.find_linesearch_state(state))
        z = optax.apply_updates(z, updates)
        return z, state, cost, loss(z, images, labels)

    step, compile_seconds = timing.compiled(step, z, state, x, y)
    to_params = (
        (lambda z: z)
        if scale is None
        else (lambda z: jax.tree.map(jnp.multiply, z, scale))
    )
    curve = [(0.0, float(loss(z, x, y)), 0.0)]
    validation = {}  # budget -> the last state's within it, on held-out data
    while curve[-1][0] < budget:
        start = time.perf_counter()
        previous = z
        z, state, cost, value = jax.block_until_ready(step(z, state, x, y))
        seconds = curve[-1][2] + time.perf_counter() - start
        cost = float(cost)
        spent = curve[-1][0] + cost
        for b in BUDGETS:
            if b not in validation and spent > b:
                validation[b] = validate(trainer, to_params(previous))
        curve.append((spent, float(value), seconds))
        if cost == 0:  # nothing evaluated: every later step is the same
            break
    for b in BUDGETS:
        validation.setdefault(b, validate(trainer, to_params(z)))
    return {
        "validation_at": {str(b): v for b, v in validation.items()},
        "curve": curve,
        "state_over_params": state_bytes / param_bytes,
        "compile_seconds": compile_seconds,
    }


def validate(trainer, params) -> dict:
    """The mean loss and accuracy of ``params`` on the validation images."""
    loss_sum, correct = trainer.evaluate_batch(
        params, *trainer.place(trainer.data.x_val, trainer.data.y_val)
    )
    n = len(trainer.data.y_val)
    return {"loss": float(loss_sum) / n, "acc": int(correct) / n}


def loss_within(curve, budget: float) -> float:
    """The loss of the last state reached within ``budget`` forward passes."""
    return [loss for spent, loss, _ in curve if spent <= budget][-1]


def reached(curve, level: float) -> tuple[float, float] | None:
    """Forward passes and seconds to the first loss at or below ``level``."""
    for spent, loss, seconds in curve:
        if loss <= level:
            return spent, seconds
    return None


def summarise(curve, start: float) -> dict:
    return {
        "to_target": {f"{t:g}": reached(curve, t * start) for t in TARGETS},
        "loss_at": {str(b): loss_within(curve, b) for b in BUDGETS},
        "final_loss": curve[-1][1],
        "spent": curve[-1][0],
    }


def adam_at(rows, swap: int) -> dict:
    """Adam's own training loss and validation accuracy at the budgets, where
    its run goes that far."""
    out = {}
    for b in BUDGETS:
        epoch = swap - 1 + round(b / 3)
        row = rows[epoch] if epoch < len(rows) else None
        out[str(b)] = row and row["train_loss"]
        out[f"val_acc_{b}"] = row and row["val_acc"]
    return out


def _sci(x) -> str:
    return "-" if x is None else f"{x:.2g}"


def _ratio(loss: float, reference: float) -> float:
    """``loss / reference``, where a float32 loss of exactly 0 (cross-entropy
    underflows) is level with another 0 and infinitely below anything else."""
    if reference == 0:
        return 1.0 if loss == 0 else float("inf")
    return loss / reference


def _acc(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def _within_lbfgs(runs: list[dict], swap: int) -> str:
    """Per loss and budget, each variant's loss over L-BFGS's per cell at the
    swap after ``swap`` epochs, and in how many cells it is within 10x."""
    summary = []
    for loss, budget in (
        (loss, str(b))
        for loss in sorted({r["loss"] for r in runs})
        for b in BUDGETS[1:]
    ):
        final = {
            (r["loss"], r["model"], r["seed"], r["variant"]): r["loss_at"][budget]
            for r in runs
            if r["swap"] == swap and r["loss"] == loss
        }
        lbfgs = {k[:3]: v for k, v in final.items() if k[3] == "L-BFGS"}
        for variant in dict.fromkeys(k[3] for k in final):
            ratios = [
                _ratio(final[cell + (variant,)], lbfgs[cell])
                for cell in lbfgs
                if cell + (variant,) in final
            ]
            summary.append(
                [
                    loss,
                    budget,
                    variant,
                    f"{sum(r <= 10 for r in ratios)} of {len(ratios)}",
                    ", ".join(f"{r:.2g}" for r in ratios),
                ]
            )
    return timing.markdown_table(
        ["loss", "at fpe", "second phase", "within 10x", "ratios"], summary
    )


def report(runs: list[dict]) -> str:
    """The study's tables, in markdown: per cell (model, seed, loss, swap) each
    second phase's compute and seconds to the targets and its loss at equal
    compute; then, per swap from the longest, how many cells each CG variant
    ends within 10x of L-BFGS's loss at 100 and 300 forward-pass equivalents."""
    lines = []
    cells = sorted({(r["loss"], r["model"], r["swap"], r["seed"]) for r in runs})
    header = [
        "second phase",
        *[f"fpe to {t:g}" for t in TARGETS],
        *[f"s to {t:g}" for t in TARGETS],
        *[f"loss @{b}" for b in BUDGETS],
        *[f"val acc @{b}" for b in BUDGETS[1:]],
        "state / params",
    ]
    for loss, model, swap, seed in cells:
        rows = [
            r
            for r in runs
            if (r["loss"], r["model"], r["swap"], r["seed"])
            == (loss, model, swap, seed)
        ]
        first = rows[0]
        adam = first["adam_at"]
        lines += [
            f"\n{model}, {loss}, seed {seed}, swap after epoch {swap}: loss "
            f"{first['start_loss']:.2e} at the swap (gradient norm "
            f"{first.get('start_grad_norm', float('nan')):.1e}); Adam's own run "
            f"at 30/100/300: {', '.join(_sci(adam[str(b)]) for b in BUDGETS)} "
            f"(validation accuracy at 100/300: "
            f"{', '.join(_acc(adam.get(f'val_acc_{b}')) for b in BUDGETS[1:])})\n",
        ]
        table = []
        for r in rows:
            to = [r["to_target"][f"{t:g}"] for t in TARGETS]
            table.append(
                [
                    r["variant"],
                    *[_sci(x and x[0]) for x in to],
                    *["-" if x is None else f"{x[1]:.1f}" for x in to],
                    *[_sci(r["loss_at"][str(b)]) for b in BUDGETS],
                    *[
                        f"{r['validation_at'][str(b)]['acc']:.3f}"
                        if "validation_at" in r
                        else "-"
                        for b in BUDGETS[1:]
                    ],
                    f"{r['state_over_params']:.1f}",
                ]
            )
        lines.append(timing.markdown_table(header, table))
    for swap in sorted({r["swap"] for r in runs}, reverse=True):
        lines.append(
            f"\nAt the swap after epoch {swap}, each second phase's loss over "
            "L-BFGS's at equal compute, per (model, seed, loss) cell, and the "
            "cells where it is within 10x of L-BFGS's:\n"
        )
        lines.append(_within_lbfgs(runs, swap))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny run, smoke test")
    parser.add_argument("--models", nargs="+", default=["vit-mlp", "vgg5"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument(
        "--losses", nargs="+", default=["softmax_mse"], choices=tuple(models.LOSSES)
    )
    parser.add_argument("--swaps", nargs="+", type=int, default=[15, 45, 150])
    parser.add_argument("--budget", type=float, default=max(BUDGETS))
    parser.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS))
    parser.add_argument(
        "--runs", type=pathlib.Path, default=pathlib.Path("runs/second_phase")
    )
    parser.add_argument("--out", type=pathlib.Path, default=None)
    parser.add_argument(
        "--report",
        nargs="+",
        type=pathlib.Path,
        metavar="JSON",
        help="train nothing: print the tables of these results",
    )
    args = parser.parse_args(argv)
    if args.report:
        runs = [r for path in args.report for r in json.loads(path.read_text())["runs"]]
        print(report(runs))
        return {"runs": runs}
    if unknown := sorted(set(args.variants) - set(VARIANTS)):
        parser.error(f"unknown --variants {unknown}; choose from {list(VARIANTS)}")
    if args.quick:
        args.models, args.seeds, args.swaps = ["vit-nomlp-wkewq-wvwo"], [0], [2]
        args.budget = 30
        args.variants = list(QUICK_VARIANTS)
    result = {**timing.environment(), "adam": ADAM, "budget": args.budget, "runs": []}
    if args.out is not None and args.out.exists():  # resumable: keep what is done
        result["runs"] = json.loads(args.out.read_text())["runs"]
    done = {
        (r["model"], r["seed"], r["loss"], r["swap"], r["variant"])
        for r in result["runs"]
    }
    # Every Adam run first; then the second phases, the longest swap first
    # (the cells the comparison rests on), so an interrupted study has them.
    adam = {
        (loss, model, seed): adam_run(args, model, seed, loss)
        for loss in args.losses
        for model in args.models
        for seed in args.seeds
    }
    for swap in sorted(args.swaps, reverse=True):
        for (loss, model, seed), (trainer, out, rows) in adam.items():
            params, adam_state = swap_state(trainer, out, swap - 1)
            x, y = trainer.data.x_train, trainer.data.y_train
            start, grad = jax.value_and_grad(trainer.batch_loss)(params, x, y)
            start = float(start)
            for name in args.variants:
                if (model, seed, loss, swap, name) in done:
                    continue
                run = run_variant(
                    trainer, VARIANTS[name], params, adam_state, args.budget
                )
                entry = {
                    "model": model,
                    "seed": seed,
                    "loss": loss,
                    "swap": swap,
                    "variant": name,
                    "start_loss": start,
                    "start_grad_norm": float(optax.tree.norm(grad)),
                    "adam_at": adam_at(rows, swap),
                    **summarise(run["curve"], start),
                    **run,
                }
                result["runs"].append(entry)
                print(
                    f"{loss} {model} seed {seed} swap {swap} {name}: "
                    f"{start:.2e} -> {entry['loss_at']} "
                    f"state {run['state_over_params']:.1f}x",
                    flush=True,
                )
                if args.out is not None:
                    timing.write_json(args.out, result)
    print(report(result["runs"]))
    return result


if __name__ == "__main__":
    sys.exit(main() and 0)
