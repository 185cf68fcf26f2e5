"""Time to loss: Adam against two-phase, vit-mlp on digits.

    python -m experiments.benchmarks.time_to_loss [--quick] [--out FILE.json]

Trains vit-mlp on the digits with the experiments' settings (Adam batch 64,
the CG phase on the full batch) as ``adam``, ``two-phase`` (swap detected by
Algorithm 1, one reading per epoch) and ``two-phase-fixed`` (CG from epoch
``--swap-epoch``), and records, for each training-loss target, the training
wall time and the forward-pass equivalents (backward = 2) until the training
loss, evaluated on the whole training set after each epoch, first reaches the
target. A run stops at ``--budget`` seconds of training time (or
``--max-epochs``); a target not reached by then is "never".

Each optimizer's steps are compiled once (a warm-up step for every batch shape,
reported separately); the runs then restart from the same initial parameters
``--repeats`` times, round-robin over the optimizers. The trajectory is
deterministic, so the epochs and forward passes are the same in every repeat;
the times are medians over the repeats ("never" if the median run did not get
there).
"""

from __future__ import annotations

import argparse
import math
import pathlib
import statistics
import time

import jax
import numpy as np

from experiments import config as config_lib
from experiments import data as data_lib
from experiments import trainer as trainer_lib
from experiments.benchmarks import timing

TARGETS = (1e-3, 1e-4, 1e-5, 1e-6)
OPTIMIZERS = ("adam", "two-phase", "two-phase-fixed")


def warm_up(trainer: trainer_lib.Trainer) -> float:
    """Compiles the train step for every batch shape a run will use; seconds."""
    n = len(trainer.data.x_train)
    chunks = np.array_split(
        np.arange(n), data_lib.num_batches(n, trainer.config.run.batch_size)
    )
    steps = [(trainer.train_step, len(c), False) for c in chunks]
    steps.append((trainer.cg_train_step, trainer.cg_batch_size, True))
    grad_sum = trainer.zero_grad_sum()
    start = time.perf_counter()
    for step, size, cg in dict.fromkeys(steps):
        x, y = trainer.data.x_train[:size], trainer.data.y_train[:size]
        batch = trainer.place(x, y, chunked=cg)
        out = step(trainer.params, trainer.opt_state, grad_sum, *batch)
        jax.block_until_ready(out)
    trainer.evaluate(trainer.data.x_train, trainer.data.y_train)
    return time.perf_counter() - start


def one_run(trainer, start_state, budget: float, max_epochs: int) -> dict:
    """Trains from ``start_state``; the first epoch, time and passes per target."""
    trainer.params, trainer.opt_state = start_state
    seconds = forward_passes = 0.0
    reached, losses = {}, []
    for epoch in range(max_epochs):
        row = trainer.run_epoch(epoch)
        seconds += row["epoch_seconds"]
        forward_passes += row["epoch_forward_passes"]
        loss, _ = trainer.evaluate(trainer.data.x_train, trainer.data.y_train)
        losses.append(loss)
        for target in TARGETS:
            if target not in reached and loss <= target:
                reached[target] = {
                    "epoch": epoch,
                    "seconds": seconds,
                    "forward_passes": forward_passes,
                }
        if seconds >= budget or len(reached) == len(TARGETS):
            break
    return {
        "reached": reached,
        "epochs": len(losses),
        "seconds": seconds,
        "final_loss": losses[-1],
        "swap_epoch": _swap_epoch(trainer),
    }


def _swap_epoch(trainer) -> int | None:
    state = trainer.opt_state
    if not hasattr(state, "swap_step") or int(state.swap_step) < 0:
        return None
    return int(state.swap_step) // trainer.adam_steps


def summarise(name: str, runs: list[dict], warm_up_seconds: float) -> dict:
    per_target = {}
    for target in TARGETS:
        times = [r["reached"].get(target, {}).get("seconds", math.inf) for r in runs]
        median = statistics.median(times)
        first = next(
            (r["reached"][target] for r in runs if target in r["reached"]), None
        )
        per_target[f"{target:.0e}"] = (
            None
            if math.isinf(median) or first is None
            else {
                "seconds": median,
                "epoch": first["epoch"],
                "forward_passes": first["forward_passes"],
            }
        )
    return {
        "optimizer": name,
        "targets": per_target,
        "warm_up_seconds": warm_up_seconds,
        "median_epochs": statistics.median(r["epochs"] for r in runs),
        "median_final_loss": statistics.median(r["final_loss"] for r in runs),
        "median_seconds": statistics.median(r["seconds"] for r in runs),
        "swap_epoch": runs[0]["swap_epoch"],
        "runs": runs,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny run, smoke test")
    parser.add_argument("--model", default="vit-mlp")
    parser.add_argument("--budget", type=float, default=100.0, help="seconds per run")
    parser.add_argument("--max-epochs", type=int, default=1000)
    parser.add_argument("--swap-epoch", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=pathlib.Path, default=None)
    args = parser.parse_args(argv)
    if args.quick:
        args.model, args.budget, args.max_epochs, args.swap_epoch = (
            "vit-nomlp-wkewq-wvwo",
            5.0,
            2,
            1,
        )
    trainers, starts, warm_ups = {}, {}, {}
    for name in OPTIMIZERS:
        config = config_lib.Config.of(
            model=args.model,
            optimizer=name,
            batch_size=64,
            swap_epoch=args.swap_epoch,
            progress=False,
        )
        trainers[name] = trainer_lib.Trainer(config)
        starts[name] = (trainers[name].params, trainers[name].opt_state)
        warm_ups[name] = warm_up(trainers[name])
    runs = {name: [] for name in OPTIMIZERS}
    for _ in range(args.repeats):
        for name in OPTIMIZERS:
            runs[name].append(
                one_run(trainers[name], starts[name], args.budget, args.max_epochs)
            )
    summaries = [summarise(name, runs[name], warm_ups[name]) for name in OPTIMIZERS]
    result = {
        **timing.environment(),
        "model": args.model,
        "budget_seconds": args.budget,
        "max_epochs": args.max_epochs,
        "swap_epoch": args.swap_epoch,
        "repeats": args.repeats,
        "targets": list(TARGETS),
        "optimizers": summaries,
    }
    print(f"device: {result['device']} ({result['backend']}), jax {jax.__version__}")
    print(
        f"{args.model} on digits; budget {args.budget:g} s of training per run "
        f"(at most {args.max_epochs} epochs); medians of {args.repeats} runs\n"
    )
    print(format_table(summaries))
    timing.write_json(args.out, result)
    return result


def format_table(summaries: list[dict]) -> str:
    rows = []
    for s in summaries:
        cells = []
        for target in TARGETS:
            hit = s["targets"][f"{target:.0e}"]
            cells.append(
                "never"
                if hit is None
                else f"{hit['seconds']:.1f} s / {hit['forward_passes']:.0f}"
                f" (epoch {hit['epoch'] + 1})"
            )
        swap = "" if s["swap_epoch"] is None else str(s["swap_epoch"] + 1)
        rows.append(
            [
                s["optimizer"],
                *cells,
                f"{s['median_final_loss']:.2e}",
                f"{s['median_epochs']:g}",
                swap,
                f"{s['warm_up_seconds']:.1f}",
            ]
        )
    return timing.markdown_table(
        [
            "optimizer",
            *[f"loss <= {t:.0e}: time / forward passes" for t in TARGETS],
            "final loss",
            "epochs in budget",
            "CG from epoch",
            "warm-up s",
        ],
        rows,
    )


if __name__ == "__main__":
    main()
