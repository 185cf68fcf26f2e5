"""Cost of the CG phase: loss reached per forward pass from the same Adam start.

    python -m experiments.benchmarks.cg_phase [--quick] [--models vit-mlp vgg5]
        [--pretrain 90] [--budget 900] [--out FILE.json]

Each model is first trained on digits (softmax + MSE) with mini-batch Adam,
batch 512, for ``--pretrain`` epochs. From those parameters every setting
takes full-batch steps, as the second phase of the experiments does, until
it has spent ``--budget`` forward-pass equivalents and made at least 100
steps, or until a step evaluates nothing (a zero gradient, or a line search
that failed and would repeat itself from the same point), after which every
step would be the same. The references continue from the same point:
mini-batch Adam (its moments included) and ``optax.lbfgs``.

Cost is counted honestly in forward-pass equivalents over the training set:
a value is 1, a value and gradient 3. A step costs the gradient at its start
(3, or 0 when ``optax.value_and_grad_from_state`` finds it in the state)
plus its line search (1 per value, 3 per value and gradient; optax's zoom
search evaluates both at every trial). An Adam epoch is 3.

Reported per setting: median and mean forward-pass equivalents and
line-search evaluations per step, the fraction of steps that restarted CG
as steepest descent, the training loss after 100 steps and after budgets of
450 and 900 forward-pass equivalents (the last state within the budget), the
median seconds per step after the first (the first, with compiling, is
reported separately) and the loss curve, in the JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

import twophase_optax as tpo
from experiments import config as config_lib
from experiments import steps as steps_lib
from experiments import trainer as trainer_lib
from experiments.benchmarks import timing
from twophase_optax.conjugate_gradient import DEFAULT_MAX_EVALUATIONS
from twophase_optax.conjugate_gradient import DEFAULT_RTOL

BUDGETS = (450, 900)
DEFAULT = "cg default: Hager-Zhang, slope rtol 0.5, store_grad, 8 evaluations"
FORMER_DEFAULT = "cg Polak-Ribiere+, slope rtol 0.1, store_grad (the former default)"
FIRST_TRIAL_GRAD = (
    "cg Hager-Zhang, slope rtol 0.5, gradient at the first trial, first rtol 0.8"
)
MIN_STEPS = 100


def cg(linesearch, powell: bool = False) -> optax.GradientTransformationExtraArgs:
    """Polak-Ribiere+ (the former default ``beta``) with ``linesearch``."""
    return tpo.conjugate_gradient(
        beta="polak_ribiere_plus",
        linesearch=linesearch,
        powell_threshold=0.2 if powell else None,
    )


# name -> the optimiser
SETTINGS: dict[str, Callable[[], optax.GradientTransformation]] = {
    "cg golden tol 1e-2, Powell (the old default)": lambda: cg(
        tpo.golden_section_linesearch(), powell=True
    ),
    "cg golden tol 1e-2": lambda: cg(tpo.golden_section_linesearch()),
    "cg slope rtol 0.1, values": lambda: cg(tpo.slope_linesearch()),
    "cg slope rtol 0.1, store_grad, Powell": lambda: cg(
        tpo.slope_linesearch(store_grad=True), powell=True
    ),
    FORMER_DEFAULT: lambda: cg(tpo.slope_linesearch(store_grad=True)),
    "cg Polak-Ribiere+, slope rtol 0.3, store_grad": lambda: cg(
        tpo.slope_linesearch(rtol=0.3, store_grad=True)
    ),
    "cg Polak-Ribiere+, slope rtol 0.5, store_grad, 8 evaluations": lambda: cg(
        tpo.slope_linesearch(rtol=0.5, max_evaluations=8, store_grad=True)
    ),
    "cg Hager-Zhang, slope rtol 0.1, store_grad": lambda: tpo.conjugate_gradient(
        linesearch=tpo.slope_linesearch(store_grad=True)
    ),
    DEFAULT: lambda: tpo.conjugate_gradient(),
    FIRST_TRIAL_GRAD: lambda: tpo.conjugate_gradient(
        linesearch=tpo.slope_linesearch(
            rtol=DEFAULT_RTOL,
            max_evaluations=DEFAULT_MAX_EVALUATIONS,
            store_grad=True,
            first_trial_grad=True,
            first_rtol=0.8,
        )
    ),
    "cg zoom curv_rtol 0.1": lambda: cg(
        optax.scale_by_zoom_linesearch(30, curv_rtol=0.1)
    ),
    "optax.lbfgs": lambda: optax.lbfgs(),
}
QUICK_SETTINGS = ("cg golden tol 1e-2", DEFAULT, "optax.lbfgs")


def pretrained_trainer(model: str, epochs: int, images: int | None):
    config = config_lib.Config.of(
        model=model, optimizer="adam", batch_size=512, epochs=epochs, progress=False
    )
    trainer = trainer_lib.Trainer(config)
    if images is not None:
        data = trainer.data
        trainer.data = dataclasses.replace(
            data, x_train=data.x_train[:images], y_train=data.y_train[:images]
        )
    for epoch in range(epochs):
        trainer.run_epoch(epoch)
    return trainer


def full_batch_step(trainer, tx):
    """One jitted full-batch step that reuses a stored value and gradient.

    Returns ``(params, state, forward-pass equivalents, restarted)``.
    """
    reuse = steps_lib.stores_gradient(tx.init(trainer.params))
    if reuse:
        value_and_grad = optax.value_and_grad_from_state(trainer.batch_loss)
    else:
        value_and_grad = jax.value_and_grad(trainer.batch_loss)

    def step(params, state, images, labels):
        if reuse:
            stored = optax.tree.get(state, "value")
            start_cost = jnp.where(jnp.isfinite(stored), 0, steps_lib.VALUE_AND_GRAD)
            value, grad = value_and_grad(params, images, labels, state=state)
        else:
            start_cost = jnp.asarray(steps_lib.VALUE_AND_GRAD)
            value, grad = value_and_grad(params, images, labels)
        updates, state = tx.update(
            grad,
            state,
            params,
            value=value,
            grad=grad,
            value_fn=trainer.batch_loss,
            images=images,
            labels=labels,
        )
        linesearch = tpo.find_linesearch_state(state)
        restarted = optax.tree.get(state, "restarted", jnp.asarray(False))
        cost = start_cost + tpo.linesearch_cost(linesearch)
        return optax.apply_updates(params, updates), state, cost, restarted

    return jax.jit(step)


def run_setting(trainer, name: str, budget: float) -> dict:
    tx = SETTINGS[name]()
    x, y = trainer.data.x_train, trainer.data.y_train
    step = full_batch_step(trainer, tx)
    params, state = trainer.params, tx.init(trainer.params)
    loss_fn = jax.jit(trainer.batch_loss)
    loss = float(loss_fn(params, x, y))
    curve = [[0.0, loss]]
    costs, evaluations, gradients, restarts, seconds = [], [], [], [], []
    spent = 0.0
    while spent < budget or len(costs) < MIN_STEPS:
        start = time.perf_counter()
        params, state, cost, restarted = step(params, state, x, y)
        cost = int(cost)
        seconds.append(time.perf_counter() - start)
        spent += cost
        costs.append(cost)
        info = tpo.find_linesearch_state(state).info
        evaluations.append(int(info[0]))
        gradients.append(int(getattr(info, "num_gradients", 0)))
        restarts.append(bool(restarted))
        curve.append([spent, float(loss_fn(params, x, y))])
        if cost == 0:
            # Nothing evaluated: a zero gradient, or a line search that
            # failed from the same point and would fail again. Every later
            # step would be the same.
            break
    return {
        "setting": name,
        "median_fpe_per_step": statistics.median(costs),
        "mean_fpe_per_step": statistics.fmean(costs),
        "median_evaluations": statistics.median(evaluations),
        "mean_evaluations": statistics.fmean(evaluations),
        "restart_fraction": statistics.fmean(restarts),
        "steps": len(costs),
        "loss_after_100_steps": curve[min(MIN_STEPS, len(costs))][1],
        **{f"loss_at_{b}": loss_within(curve, b) for b in BUDGETS},
        "first_step_seconds": seconds[0],
        "median_step_seconds": statistics.median(seconds[1:]),
        "costs": costs,
        "evaluations": evaluations,
        "gradients": gradients,
        "curve": curve,
    }


def loss_within(curve: list[tuple[float, float]], budget: float) -> float:
    """The loss of the last state reached within ``budget`` forward passes."""
    return [loss for spent, loss in curve if spent <= budget][-1]


def run_adam(trainer, budget: float, first_epoch: int) -> dict:
    """Mini-batch Adam continued from the trainer's state (3 per epoch)."""
    x, y = trainer.data.x_train, trainer.data.y_train
    loss_fn = jax.jit(trainer.batch_loss)
    curve = [[0.0, float(loss_fn(trainer.params, x, y))]]
    seconds, epoch = [], first_epoch
    while curve[-1][0] < budget:
        row = trainer.run_epoch(epoch)
        seconds.append(row["epoch_seconds"])
        epoch += 1
        spent = curve[-1][0] + steps_lib.VALUE_AND_GRAD
        curve.append([spent, float(loss_fn(trainer.params, x, y))])
    steps = len(range(0, len(x), trainer.config.run.batch_size))
    return {
        "setting": f"adam, batch {trainer.config.run.batch_size} (continued)",
        "median_fpe_per_step": steps_lib.VALUE_AND_GRAD / steps,
        "mean_fpe_per_step": steps_lib.VALUE_AND_GRAD / steps,
        "epochs": epoch - first_epoch,
        **{f"loss_at_{b}": loss_within(curve, b) for b in BUDGETS},
        "first_step_seconds": seconds[0] / steps,
        "median_step_seconds": statistics.median(seconds[1:]) / steps,
        "curve": curve,
    }


def measure(model: str, pretrain: int, names, budget: float, images: int | None):
    trainer = pretrained_trainer(model, pretrain, images)
    x, y = trainer.data.x_train, trainer.data.y_train
    start_loss = float(jax.jit(trainer.batch_loss)(trainer.params, x, y))
    rows = []
    for name in names:
        rows.append(run_setting(trainer, name, budget))
        print(format_row(rows[-1]), flush=True)
    rows.append(run_adam(trainer, budget, pretrain))
    print(format_row(rows[-1]), flush=True)
    return {"model": model, "images": len(x), "start_loss": start_loss, "rows": rows}


HEADER = [
    "setting",
    "fpe/step median",
    "mean",
    "evals/step median",
    "mean",
    "restarts",
    "loss @100 steps",
    *[f"loss @{b} fpe" for b in BUDGETS],
    "ms/step",
]


def format_row(r: dict) -> str:
    return timing.markdown_table(HEADER, [table_row(r)]).splitlines()[-1]


def table_row(r: dict) -> list:
    def num(key, fmt):
        return format(r[key], fmt) if key in r else ""

    return [
        r["setting"],
        num("median_fpe_per_step", "g"),
        num("mean_fpe_per_step", ".2f"),
        num("median_evaluations", "g"),
        num("mean_evaluations", ".2f"),
        num("restart_fraction", ".2f"),
        num("loss_after_100_steps", ".2e"),
        *[num(f"loss_at_{b}", ".2e") for b in BUDGETS],
        f"{1e3 * r['median_step_seconds']:.1f}",
    ]


def format_table(result: dict) -> str:
    return timing.markdown_table(HEADER, [table_row(r) for r in result["rows"]])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny run, smoke test")
    parser.add_argument("--models", nargs="+", default=["vit-mlp", "vgg5"])
    parser.add_argument("--pretrain", type=int, default=90, help="Adam epochs first")
    parser.add_argument("--budget", type=float, default=max(BUDGETS))
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS))
    parser.add_argument("--out", type=pathlib.Path, default=None)
    args = parser.parse_args(argv)
    images = None
    if args.quick:
        args.models, args.pretrain, images = ["vit-nomlp-wkewq-wvwo"], 1, 128
        args.settings = list(QUICK_SETTINGS)
    unknown = sorted(set(args.settings) - set(SETTINGS))
    if unknown:
        parser.error(f"unknown --settings {unknown}; choose from {list(SETTINGS)}")
    result = {**timing.environment(), "pretrain_epochs": args.pretrain, "runs": []}
    print(f"device: {result['device']} ({result['backend']}), jax {jax.__version__}")
    for model in args.models:
        print(f"\n{model} on digits, full batch, after {args.pretrain} Adam epochs\n")
        print("\n".join(timing.markdown_table(HEADER, []).splitlines()[:2]))
        run = measure(model, args.pretrain, args.settings, args.budget, images)
        result["runs"].append(run)
        print(f"start loss {run['start_loss']:.3e}, {run['images']} images")
    timing.write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
