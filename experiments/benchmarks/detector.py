"""Swap-detector sensitivity: where each rule swaps, against the smoothed peak.

    python -m experiments.benchmarks.detector [--final-loss] [--quick]

Trains Adam (the softmax + MSE head) for each model, batch size and seed, and
records the gradient-norm reading of every epoch, the statistic that
:func:`twophase_optax.two_phase` reads. Before its swap a two-phase run is bit
for bit this Adam run, so replaying the readings through the library's
gradient-norm peak (:func:`twophase_optax.swap.replay` of
:func:`twophase_optax.swap.peak`) gives the epoch on which a two-phase run
would swap, for any rule and ``gn_factor``, without training it. For each run
and ``gn_factor`` the table gives

* the epoch of the peak of a centred 5-epoch moving average of the readings;
* the swap epoch of Algorithm 1 as printed (``PAPER_RULE``) and of the
  library's default rule: the epoch whose reading triggers the swap, CG runs
  from the next one (epochs count from 1; "-" for no swap);
* with ``--final-loss``, the final training loss of the two-phase run with
  each rule at its own ``gn_factor`` (CG on the full batch from the epoch
  after the swap, for the same number of epochs as Adam), and Adam's own.

The Adam runs go to ``<runs>/<model>/b<batch>/s<seed>`` and are resumable;
the two-phase runs beside them.
"""

from __future__ import annotations

import argparse
import json
import pathlib
from typing import Any

import twophase_optax as tpo
from experiments import config as config_lib
from experiments import train as train_lib
from experiments.analysis import centred_average

GN_FACTORS = (0.5, 0.7, 0.8, 0.9, 0.95)


# Each rule's settings; the paper's brings its own gn_factor (0.9).
PAPER = {
    k: v
    for k, v in config_lib.PAPER_RULE.items()
    if k not in ("swap_rule", "late_swap")
}
RULES = {"paper": PAPER, "default": {}}


def run(args, model: str, batch: int, seed: int, swap: int | None = None):
    """The metrics rows of Adam (``swap=None``) or of two-phase swapping after
    (1-based) epoch ``swap``: CG from the epoch after it, 0-based ``swap``."""
    config = config_lib.Config.of(
        model=model,
        dataset=args.dataset,
        optimizer="adam" if swap is None else "two-phase-fixed",
        swap_epoch=0 if swap is None else swap,
        epochs=args.epochs[batch],
        batch_size=batch,
        seed=seed,
        out=str(
            args.runs
            / model
            / f"b{batch}"
            / f"s{seed}"
            / ("adam" if swap is None else f"swap{swap}")
        ),
        resume=True,
        progress=not args.no_progress,
    )
    return train_lib.train(config)


def swap_epoch(readings: list[float], rule: str, **settings) -> int | None:
    """The 1-based epoch on which ``rule`` swaps (``None``: never)."""
    peak = tpo.swap.peak(**{**RULES[rule], **settings})
    index = tpo.swap.replay(peak, grad_norm=readings)
    return None if index is None else index + 1


def swaps(readings: list[float], gn_factor: float) -> dict[str, int | None]:
    """1-based swap epochs of the paper's rule and of the default rule."""
    return {rule: swap_epoch(readings, rule, gn_factor=gn_factor) for rule in RULES}


def final_losses(args, entry, model, batch, seed) -> dict[str, Any]:
    """Final training loss of two-phase with each rule at its own gn_factor.

    A two-phase run costs a CG epoch (about 17 forward passes on the full
    batch) for every epoch after the swap, so only the two rules as shipped
    are trained: the paper's at 0.9 and the default at its default factor.
    """
    out = {"adam": entry["adam_final_loss"]}
    for rule in RULES:
        swap = swap_epoch(entry["readings"], rule)
        if swap is None or swap >= entry["epochs"]:  # Adam throughout.
            loss = entry["adam_final_loss"]
        else:
            loss = run(args, model, batch, seed, swap)[-1]["train_loss"]
        out[rule] = {"swap": swap, "final_loss": loss}
    return out


def study(args) -> dict[str, Any]:
    results = []
    for model in args.models:
        for batch in args.batch_sizes:
            for seed in args.seeds:
                rows = run(args, model, batch, seed)
                readings = [r["gn_reading"] for r in rows]
                peak = int(centred_average(readings).argmax()) + 1
                cells = []
                for gn_factor in args.gn_factors:
                    cells.append({"gn_factor": gn_factor, **swaps(readings, gn_factor)})
                entry = {
                    "model": model,
                    "batch_size": batch,
                    "seed": seed,
                    "epochs": len(rows),
                    "smoothed_peak": peak,
                    "adam_final_loss": rows[-1]["train_loss"],
                    "readings": readings,
                    "cells": cells,
                }
                if args.final_loss:
                    entry["final_loss"] = final_losses(args, entry, model, batch, seed)
                results.append(entry)
    return {
        "dataset": args.dataset,
        "loss": config_lib.Config().run.loss,
        "default_rule": {
            "gn_factor": tpo.swap.DEFAULT_GN_FACTOR,
            "smoothing": tpo.swap.DEFAULT_SMOOTHING,
            "patience": tpo.swap.DEFAULT_PATIENCE,
            "min_rise": tpo.swap.DEFAULT_MIN_RISE,
        },
        "runs": results,
    }


def table(result: dict[str, Any]) -> str:
    head = (
        "| model | batch | seed | smoothed peak | gn_factor | paper swap | "
        "default swap |"
    )
    lines = [head, "|---|---|---|---|---|---|---|"]
    show = lambda x: "-" if x is None else str(x)  # noqa: E731
    for run in result["runs"]:
        for c in run["cells"]:
            lines.append(
                f"| {run['model']} | {run['batch_size']} | {run['seed']} | "
                f"{run['smoothed_peak']} | {c['gn_factor']} | {show(c['paper'])} | "
                f"{show(c['default'])} |"
            )
    finals = [run for run in result["runs"] if "final_loss" in run]
    if finals:
        lines += [
            "",
            "| model | batch | seed | smoothed peak | paper (0.9): swap, final loss "
            "| default: swap, final loss | Adam final loss |",
            "|---|---|---|---|---|---|---|",
        ]
        for run in finals:
            f = run["final_loss"]
            cell = lambda r: f"{show(r['swap'])}, {r['final_loss']:.3g}"  # noqa: E731
            lines.append(
                f"| {run['model']} | {run['batch_size']} | {run['seed']} | "
                f"{run['smoothed_peak']} | {cell(f['paper'])} | {cell(f['default'])} "
                f"| {f['adam']:.3g} |"
            )
    return "\n".join(lines) + "\n"


def _epochs(text: str) -> dict[int, int]:
    """``512=150,64=60``: Adam epochs per batch size."""
    return {int(k): int(v) for k, v in (item.split("=") for item in text.split(","))}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["vit-mlp", "vgg5"])
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[64, 512])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=_epochs, default="512=150,64=60")
    parser.add_argument("--gn-factors", nargs="+", type=float, default=list(GN_FACTORS))
    parser.add_argument("--final-loss", action="store_true")
    parser.add_argument(
        "--runs", type=pathlib.Path, default=pathlib.Path("results/detector/runs")
    )
    parser.add_argument(
        "--out", type=pathlib.Path, default=None, help="JSON file to write"
    )
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.models, args.batch_sizes, args.seeds = ["vit-mlp"], [512], [0]
        args.epochs, args.gn_factors = {512: 6}, [0.9]
    for batch in args.batch_sizes:
        if args.epochs.get(batch, 0) < 1:
            parser.error(f"argument --epochs: give batch size {batch} at least 1 epoch")
    result = study(args)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(table(result))
    return result


if __name__ == "__main__":
    main()
