"""The paper's Fig. 5 on our runs: the gradient-norm reading against the loss.

    python -m experiments.fig5          # vit-mlp and vgg5 on digits and mnist5k
    python -m experiments.fig5 --quick --out /tmp/fig5      # a smoke test

For each model and dataset it trains Adam (batch 512, the paper's setting)
with the softmax + MSE head and records, once per epoch, the reading that
:func:`twophase_optax.two_phase` reads (the norm of the epoch's mean
gradient), the training loss and the validation accuracy. It then marks

* the **peak**: the epoch of the largest reading;
* the **smoothed peak**: the epoch where a centred 5-epoch moving average of
  the readings is largest (single readings jitter by 10% and more);
* the **swap**: the epoch whose reading Algorithm 1 (``gn_factor`` 0.9, one
  reading per epoch, no smoothing) would swap on, found by replaying the
  readings through the library's own detector
  (:func:`twophase_optax.swap.peak`).

and writes ``<out>/<dataset>-<model>.png`` (reading against the loss and
against the epoch), ``<out>/<dataset>-<model>.json`` (every epoch's numbers
and the marks; the names end in ``-<loss>`` for a head other than the
default) and ``<out>/summary.md``, a table of every run in ``<out>``.
Epochs are counted from 1. A run whose reading does not rise and then fall
says so in its plot's title and in the summary. The training runs themselves
(metrics and checkpoints) go to ``<out>/runs/``; ``--resume`` continues
unfinished ones.
"""

from __future__ import annotations

import argparse
import json
import pathlib
from typing import Any

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import twophase_optax as tpo  # noqa: E402
from experiments import analysis  # noqa: E402
from experiments import cli  # noqa: E402
from experiments import config as config_lib  # noqa: E402
from experiments import data as data_lib  # noqa: E402
from experiments import models  # noqa: E402
from experiments import run_records  # noqa: E402
from experiments import train as train_lib  # noqa: E402

SMOOTHING = analysis.CENTRED_WIDTH  # epochs in the centred moving average
RISE = 1.5  # the peak must be at least this multiple of the first reading ...
FALL = 2 / 3  # ... and the last reading at most this fraction of the peak


def algorithm1_swap(readings: np.ndarray, gn_factor: float) -> int | None:
    """Index of the reading on which Algorithm 1 as printed signals the swap.

    Replays the readings through the library's detector
    (:func:`twophase_optax.swap.replay` of :data:`twophase_optax.swap.PAPER`
    at ``gn_factor``), the code that :func:`twophase_optax.two_phase` runs in
    training. ``None``: no swap.

    Example:
      >>> algorithm1_swap(np.array([1.0, 2.0, 3.0, 2.8, 2.6]), 0.9)
      4
    """
    rule = tpo.swap.peak(gn_factor, smoothing=1.0, patience=1, min_rise=1.0)
    return tpo.swap.replay(rule, grad_norm=readings)


def analyse(rows: list[dict[str, Any]], gn_factor: float) -> dict[str, Any]:
    """The peak, the smoothed peak, the swap and the verdict of one Adam run."""
    readings = np.array([r["gn_reading"] for r in rows])
    losses = np.array([r["train_loss"] for r in rows])
    smoothed = analysis.centred_average(readings)
    peak, smooth_peak = int(np.argmax(readings)), int(np.argmax(smoothed))
    swap = algorithm1_swap(readings, gn_factor)
    # The peak rule's defaults.
    default_swap = tpo.swap.replay(tpo.swap.peak(), grad_norm=readings)
    # two_phase's default rule (fit or plateau), replayed on what the run
    # recorded; older metrics without batch losses have none.
    default_rule_swap = None
    if rows and "batch_loss" in rows[0]:
        default_rule_swap = run_records.replayed_swap(config_lib.Config(), rows)
    rise = float(smoothed[smooth_peak] / smoothed[0])
    fall = float(smoothed[-1] / smoothed[smooth_peak])
    mark = lambda i: (
        None
        if i is None
        else {  # noqa: E731
            "epoch": i + 1,
            "train_loss": float(losses[i]),
            "gn_reading": float(readings[i]),
        }
    )
    return {
        "peak": mark(peak),
        "smoothed_peak": {
            **mark(smooth_peak),
            "smoothed": float(smoothed[smooth_peak]),
        },
        "algorithm1_swap": mark(swap),
        "default_swap": mark(default_swap),
        "default_rule_swap": mark(default_rule_swap),
        "gn_factor": gn_factor,
        "rise": rise,
        "fall": fall,
        "rise_then_fall": bool(rise >= RISE and fall <= FALL),
        "first_reading": float(readings[0]),
    }


def verdict(result: dict[str, Any]) -> str:
    """One line on the shape of the curve, for a title and the summary."""
    rise, fall = result["rise"], result["fall"]
    if result["rise_then_fall"]:
        return f"rises {rise:.1f}x, then falls to {fall:.2f} of the peak"
    if rise < RISE:
        return (
            f"NO rise-then-fall: the smoothed reading rises only {rise:.2f}x "
            "from epoch 1"
        )
    return (
        f"NO rise-then-fall within the run: rises {rise:.1f}x but ends at "
        f"{fall:.2f} of the peak"
    )


def plot(
    rows: list[dict[str, Any]], result: dict[str, Any], title: str, path: pathlib.Path
) -> None:
    """Reading against the loss (the paper's Fig. 5) and against the epoch."""
    epochs = np.arange(1, len(rows) + 1)
    readings = np.array([r["gn_reading"] for r in rows])
    losses = np.array([r["train_loss"] for r in rows])
    smoothed = analysis.centred_average(readings)
    probes = [r for r in rows if r.get("lambda_min") is not None]
    if probes:
        fig, axes = plt.subplots(
            2,
            2,
            figsize=(11, 7.2),
            constrained_layout=True,
            gridspec_kw={"height_ratios": [1.4, 1]},
        )
        (by_loss, by_epoch), (eigen_axis, curvature_axis) = axes
    else:
        fig, (by_loss, by_epoch) = plt.subplots(
            1, 2, figsize=(11, 4.2), constrained_layout=True
        )
    by_loss.plot(losses, readings, ".-", ms=3, lw=0.7, color="tab:blue")
    by_loss.set(
        xscale="log",
        yscale="log",
        xlabel="training loss (log; training moves right)",
        ylabel="gradient-norm reading (log)",
    )
    by_loss.invert_xaxis()
    by_epoch.plot(epochs, readings, ".", ms=3, color="tab:blue", label="reading")
    by_epoch.plot(epochs, smoothed, "-", color="tab:blue", lw=1.2, label="5-epoch mean")
    by_epoch.set(xlabel="epoch", ylabel="gradient-norm reading")
    loss_axis = by_epoch.twinx()
    loss_axis.plot(epochs, losses, color="tab:grey", lw=1, label="training loss")
    loss_axis.set(yscale="log", ylabel="training loss (log)")
    marks = (
        ("peak", "^", "tab:orange"),
        ("smoothed_peak", "D", "tab:green"),
        ("algorithm1_swap", "*", "tab:red"),
        ("default_swap", "P", "tab:purple"),
        ("default_rule_swap", "X", "tab:brown"),
    )
    labels = {
        "peak": "peak",
        "smoothed_peak": "smoothed peak",
        "algorithm1_swap": f"Algorithm 1 swap (gn_factor {result['gn_factor']})",
        "default_swap": "peak rule swap (defaults)",
        "default_rule_swap": "default rule swap (fit or plateau)",
    }
    for key, marker, colour in marks:
        mark = result.get(key)
        if mark is None:
            continue
        label = f"{labels[key]}: epoch {mark['epoch']}"
        # On the epoch axis the smoothed peak sits on the smoothed curve.
        height = mark.get("smoothed", mark["gn_reading"])
        for ax, x, y in (
            (by_loss, mark["train_loss"], mark["gn_reading"]),
            (by_epoch, mark["epoch"], height),
        ):
            ax.plot(
                x, y, marker, ms=11, color=colour, mec="black", label=label, zorder=5
            )
    by_loss.legend(fontsize=8, loc="lower left")
    lines, names = by_epoch.get_legend_handles_labels()
    more_lines, more_names = loss_axis.get_legend_handles_labels()
    by_epoch.legend(lines[:2] + more_lines, names[:2] + more_names, fontsize=8)
    for ax in (by_loss, by_epoch):
        ax.grid(alpha=0.3)
    if probes:
        plot_curvature(eigen_axis, curvature_axis, probes, result)
    fig.suptitle(f"{title}\n{verdict(result)}", fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_curvature(
    eigen_axis, ratio_axis, probes: list[dict[str, Any]], result: dict[str, Any]
) -> None:
    """The Hessian's extreme eigenvalues and their ratio, under the reading."""
    epochs = [r["epoch"] + 1 for r in probes]
    lambda_min = np.array([r["lambda_min"] for r in probes])
    lambda_max = np.array([r["lambda_max"] for r in probes])
    eigen_axis.plot(epochs, lambda_max, "o-", ms=3, lw=1, label="lambda_max")
    eigen_axis.plot(epochs, -lambda_min, "o-", ms=3, lw=1, label="-lambda_min")
    eigen_axis.set(
        yscale="log",
        xlabel="epoch",
        ylabel="eigenvalue (log)",
        title="extreme Hessian eigenvalues (Lanczos, fixed batch)",
    )
    ratio_axis.plot(
        epochs, lambda_min / lambda_max, "o-", ms=3, lw=1, color="tab:purple"
    )
    ratio_axis.axhline(0.0, color="black", lw=0.8)
    ratio_axis.set(
        xlabel="epoch",
        ylabel="lambda_min / lambda_max",
        title="below 0: the loss is not convex there",
    )
    for ax in (eigen_axis, ratio_axis):
        for key, colour in (
            ("smoothed_peak", "tab:green"),
            ("algorithm1_swap", "tab:red"),
            ("default_swap", "tab:purple"),
        ):
            if result[key] is not None:
                ax.axvline(result[key]["epoch"], color=colour, ls=":", lw=1.5)
        ax.grid(alpha=0.3)
    eigen_axis.legend(fontsize=8)


def run_name(model: str, loss: str) -> str:
    """The model's name, with the loss where it is not the default head."""
    return model if loss == models.DEFAULT_LOSS else f"{model}-{loss}"


def run_one(args, dataset: str, model: str) -> dict[str, Any]:
    config = config_lib.Config.of(
        model=model,
        dataset=dataset,
        optimizer="adam",
        epochs=args.epochs[dataset],
        batch_size=args.batch_size,
        lr=args.lr,
        loss=args.loss,
        seed=args.seed,
        out=str(args.out / "runs" / dataset / run_name(model, args.loss)),
        data_dir=args.data_dir,
        resume=args.resume,
        progress=not args.no_progress,
        curvature_every=args.curvature_every,
    )
    rows = train_lib.train(config)
    result = analyse(rows, args.gn_factor)
    name = f"{dataset}-{run_name(model, args.loss)}"
    title = (
        f"{model} on {dataset}: Adam, batch {args.batch_size}, lr {args.lr}, "
        f"{args.loss}, seed {args.seed}"
    )
    plot(rows, result, title, args.out / f"{name}.png")
    keep = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "gn_reading")
    keep += ("lambda_min", "lambda_max") if args.curvature_every else ()
    record = {
        "model": model,
        "dataset": dataset,
        "optimizer": "adam",
        "batch_size": args.batch_size,
        "lr": args.lr,
        "loss": args.loss,
        "seed": args.seed,
        "epochs": len(rows),
        "verdict": verdict(result),
        **result,
        "rows": [
            {**{k: r.get(k) for k in keep}, "epoch": r["epoch"] + 1} for r in rows
        ],
    }
    (args.out / f"{name}.json").write_text(json.dumps(record, indent=1) + "\n")
    return record


def write_summary(out: pathlib.Path) -> str:
    """``<out>/summary.md`` from every run's JSON in ``out``."""
    records = [json.loads(p.read_text()) for p in sorted(out.glob("*.json"))]
    records.sort(key=lambda r: (r["dataset"], r["loss"] != models.DEFAULT_LOSS))
    lines = [
        "# The gradient-norm reading under Adam (the paper's Fig. 5)",
        "",
        "Adam, batch 512; one reading per epoch (the norm of "
        "the epoch's mean gradient, what `two_phase` reads). Epochs count from 1. "
        f"Smoothed: centred {SMOOTHING}-epoch mean. Rise: smoothed peak over the "
        "first smoothed reading; fall: last smoothed reading over the smoothed "
        "peak.",
        "",
        "| dataset | model | loss | epochs | first reading | "
        "peak: epoch, reading, loss | "
        "smoothed peak: epoch, loss | Algorithm 1 swap: epoch, loss | "
        "peak rule swap (defaults): epoch, loss | "
        "default rule swap (fit or plateau): epoch, loss | rise | fall | shape |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        peak, smooth = r["peak"], r["smoothed_peak"]
        swap_text = " | ".join(
            "none" if swap is None else f"{swap['epoch']}, {swap['train_loss']:.3g}"
            for swap in (
                r["algorithm1_swap"],
                r["default_swap"],
                r.get("default_rule_swap"),
            )
        )
        lines.append(
            f"| {r['dataset']} | {r['model']} | {r['loss']} | {r['epochs']} | "
            f"{r['first_reading']:.3g} | {peak['epoch']}, {peak['gn_reading']:.3g}, "
            f"{peak['train_loss']:.3g} | {smooth['epoch']}, "
            f"{smooth['train_loss']:.3g} | {swap_text} | {r['rise']:.2f}x | "
            f"{r['fall']:.2f} | {r['verdict']} |"
        )
    text = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(text)
    return text


def _epochs(text: str) -> dict[str, int]:
    """``150`` (every dataset) or ``digits=150,mnist5k=60``."""
    count = cli.integer(1)
    if "=" not in text:
        return dict.fromkeys(data_lib.DATASET_NAMES, count(text))
    try:
        pairs = [item.split("=") for item in text.split(",")]
        return {name: count(n) for name, n in pairs}
    except ValueError:  # not NAME=N
        raise argparse.ArgumentTypeError(
            f"must be N or DATASET=N,DATASET=M with N >= 1, got {text!r}"
        ) from None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--models", nargs="+", default=["vit-mlp", "vgg5"], choices=models.MODEL_NAMES
    )
    parser.add_argument(
        "--datasets",
        nargs="+",
        default=["digits", "mnist5k"],
        choices=data_lib.DATASET_NAMES,
    )
    parser.add_argument(
        "--epochs",
        type=_epochs,
        default="digits=150,mnist5k=80",
        help="epochs per run: N, or per dataset as digits=N,mnist5k=M",
    )
    config_lib.add_flag(parser, "batch_size")
    config_lib.add_flag(parser, "lr")
    config_lib.add_flag(parser, "loss")
    # The paper's threshold, read on raw readings (Algorithm 1).
    config_lib.add_flag(parser, "gn_factor", default=config_lib.PAPER_RULE["gn_factor"])
    config_lib.add_flag(
        parser,
        "curvature_every",
        help="every N epochs probe the Hessian's extreme eigenvalues on a fixed "
        "batch (Lanczos) and plot their ratio under the reading; 0: never",
    )
    config_lib.add_flag(parser, "seed")
    parser.add_argument(
        "--out",
        type=pathlib.Path,
        default=pathlib.Path("runs/fig5"),
        help="default: runs/fig5 (git ignores runs/); --out results/fig5 "
        "replaces the committed plots",
    )
    config_lib.add_flag(parser, "data_dir")
    config_lib.add_flag(parser, "resume")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke test: vit-mlp on digits for 4 epochs",
    )
    args = parser.parse_args(argv)
    if not any(
        (model in models.TEXT_VARIANTS) == (dataset in data_lib.TEXT_NAMES)
        for model in args.models
        for dataset in args.datasets
    ):
        parser.error(
            "argument --models: none of them takes the --datasets' input "
            f"(text models {tuple(models.TEXT_VARIANTS)} take pydoc-text)"
        )
    if args.quick:
        args.models, args.datasets = ["vit-mlp"], ["digits"]
        args.epochs = {"digits": 4}
    for dataset in args.datasets:
        if args.epochs.get(dataset, 0) < 1:
            parser.error(
                f"argument --epochs: give dataset {dataset!r} at least 1 epoch"
            )
    if not 0 < args.gn_factor < 1:
        parser.error(f"argument --gn-factor: must lie in (0, 1), got {args.gn_factor}")
    if args.curvature_every < 0:
        parser.error(
            f"argument --curvature-every: must be >= 0, got {args.curvature_every}"
        )
    if args.batch_size < 1:
        parser.error(f"argument --batch-size: must be >= 1, got {args.batch_size}")
    args.out.mkdir(parents=True, exist_ok=True)
    try:
        for dataset in args.datasets:
            text = dataset in data_lib.TEXT_NAMES
            # Each dataset with the models that take its kind of input.
            for model in args.models:
                if (model in models.TEXT_VARIANTS) == text:
                    run_one(args, dataset, model)
    except data_lib.DatasetUnavailableError as error:
        raise SystemExit(str(error)) from None
    print(write_summary(args.out))
    print(f"Plots and data in {args.out}/")


if __name__ == "__main__":
    main()
