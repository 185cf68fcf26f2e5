"""Adam against two-phase for each model: the paper's Table 1 and figures.

    python -m experiments.compare --dataset digits

For every model it trains Adam alone and two-phase (and, with ``--fixed``, the
paper's fixed split) for the same number of epochs, then writes to ``--out``
(default ``runs/<dataset>/``, a scratch folder git ignores; the committed
``results/<dataset>/`` are written only when asked for with
``--out results/<dataset>``):

* ``table.md``: final train loss and accuracy, validation loss and accuracy,
  parameter count, Q = samples * outputs / parameters, the swap epoch, the
  compute spent (forward-pass equivalents over the training set) and the wall
  time, and the same losses for Adam at the compute two-phase spent;
* ``loss_vs_epoch.png``, ``loss_vs_time.png``, ``loss_vs_compute.png``;
* ``gradnorm_vs_loss.png``: the gradient-norm reading against the training
  loss with the swap point marked (the paper's Figure 5).

Runs go to ``<out>/runs/<model>/<optimizer>`` with their metrics and
checkpoints; ``--resume`` continues unfinished ones.
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from experiments import cli  # noqa: E402
from experiments import data as data_lib  # noqa: E402
from experiments import models  # noqa: E402
from experiments import train as train_lib  # noqa: E402

LABELS = {
    "adam": "Adam",
    "two-phase": "two-phase (detected swap)",
    "two-phase-fixed": "two-phase (fixed split)",
}
COLOURS = {"adam": "tab:blue", "two-phase": "tab:red", "two-phase-fixed": "tab:green"}
DEFAULT_MODELS = models.MODEL_NAMES


@dataclasses.dataclass
class Run:
    model: str
    optimizer: str
    rows: list[dict[str, Any]]

    @property
    def last(self) -> dict[str, Any]:
        return self.rows[-1]

    @property
    def swap_epoch(self) -> int | None:
        return next((r["epoch"] for r in self.rows if r["phase"] == 1), None)


def run_all(args) -> list[Run]:
    runs = []
    optimizers = ["adam", "two-phase"] + (["two-phase-fixed"] if args.fixed else [])
    total = len(args.models) * len(optimizers)
    for model in args.models:
        for optimizer in optimizers:
            config = train_lib.Config(
                label=f"run {len(runs) + 1}/{total}: ",
                model=model,
                dataset=args.dataset,
                optimizer=optimizer,
                epochs=args.epochs,
                batch_size=args.batch_size,
                lr=args.lr,
                loss=args.loss,
                swap_epoch=args.swap_epoch,
                seed=args.seed,
                out=str(args.out / "runs" / model / optimizer),
                data_dir=args.data_dir,
                resume=args.resume,
                progress=not args.no_progress,
            )
            runs.append(Run(model, optimizer, train_lib.train(config)))
    return runs


def at_equal(runs: list[Run], run: Run, key: str) -> tuple[dict, dict] | None:
    """``run``'s and Adam's last rows within the smaller of their totals of ``key``.

    ``key`` is ``"epoch"``, ``"forward_passes"`` (compute) or ``"wall_time"``.
    """
    adam = next(r for r in runs if r.model == run.model and r.optimizer == "adam")
    budget = min(run.last[key], adam.last[key])
    pick = lambda rows: [r for r in rows if r[key] <= budget + 1e-9]  # noqa: E731
    ours, theirs = pick(run.rows), pick(adam.rows)
    return (ours[-1], theirs[-1]) if ours and theirs else None


def verdict(runs: list[Run], run: Run) -> str:
    """One line: who has the lower training loss at equal epochs, compute, time."""
    parts = []
    for key, name in (
        ("epoch", "epochs"),
        ("forward_passes", "compute"),
        ("wall_time", "time"),
    ):
        pair = at_equal(runs, run, key)
        if pair is None:  # Its first epoch outlasts Adam's whole run.
            parts.append(f"equal {name}: Adam (two-phase's first epoch exceeds it)")
            continue
        ours, adam = pair
        if ours["train_loss"] == adam["train_loss"]:
            winner = "tie"
        else:
            winner = "two-phase" if ours["train_loss"] < adam["train_loss"] else "Adam"
        parts.append(
            f"equal {name}: {winner} ({ours['train_loss']:.3g} vs "
            f"{adam['train_loss']:.3g})"
        )
    return f"{run.model}, {LABELS[run.optimizer]} against Adam: " + "; ".join(parts)


def write_table(
    runs: list[Run], dataset: data_lib.Dataset, path: pathlib.Path, loss: str
):
    n_train, outputs = len(dataset.x_train), dataset.num_classes
    lines = [
        f"# {dataset.name}: Adam against two-phase ({runs[0].last['epoch'] + 1} "
        "epochs each)",
        "",
        f"Loss: {loss}. Final values after the last epoch. "
        "Q = training samples * outputs / "
        "parameters. Compute is in forward-pass equivalents over the training "
        "set (a value 1, a value and gradient 3, also in the line search; a "
        "full-batch CG step reuses the gradient its line search left). Wall s "
        "is the time of the training steps, compilation included; evaluation "
        "and checkpoints are not counted.",
        "",
        "| model | params | Q | optimizer | swap epoch | train loss | train acc | "
        "val loss | val acc | compute | wall s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        last, params = run.last, run.last["num_params"]
        swap = "-" if run.swap_epoch is None else str(run.swap_epoch)
        lines.append(
            f"| {run.model} | {params} | {n_train * outputs / params:.3f} | "
            f"{LABELS[run.optimizer]} | {swap} | {last['train_loss']:.4g} | "
            f"{last['train_acc']:.3f} | {last['val_loss']:.4g} | "
            f"{last['val_acc']:.3f} | {last['forward_passes']:.0f} | "
            f"{last['wall_time']:.0f} |"
        )
    lines += [
        "",
        "At equal compute: both runs at the largest epoch whose cumulative compute "
        "does not exceed the smaller of the two totals.",
        "",
        "| model | optimizer | compute | its train loss | Adam's train loss | "
        "its val acc | Adam's val acc |",
        "|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        pair = (
            None if run.optimizer == "adam" else at_equal(runs, run, "forward_passes")
        )
        if pair is None:
            continue
        ours, adam = pair
        lines.append(
            f"| {run.model} | {LABELS[run.optimizer]} | "
            f"{ours['forward_passes']:.0f} / {adam['forward_passes']:.0f} | "
            f"{ours['train_loss']:.4g} | {adam['train_loss']:.4g} | "
            f"{ours['val_acc']:.3f} | {adam['val_acc']:.3f} |"
        )
    lines += ["", "Verdict (training loss; lower wins):", ""]
    lines += [f"- {verdict(runs, run)}" for run in runs if run.optimizer != "adam"]
    path.write_text("\n".join(lines) + "\n")


def _grid(models_: list[str]):
    cols = min(3, len(models_))
    rows = -(-len(models_) // cols)
    fig, axes = plt.subplots(
        rows,
        cols,
        figsize=(5 * cols, 3.8 * rows),
        squeeze=False,
        constrained_layout=True,
    )
    for ax in axes.flat[len(models_) :]:
        ax.axis("off")
    return fig, dict(zip(models_, axes.flat, strict=False))


def plot_losses(
    runs: list[Run], x_key: str, x_label: str, path: pathlib.Path, loss: str
):
    models_ = list(dict.fromkeys(r.model for r in runs))
    fig, axes = _grid(models_)
    for run in runs:
        ax = axes[run.model]
        x = [r[x_key] + (1 if x_key == "epoch" else 0) for r in run.rows]
        colour = COLOURS[run.optimizer]
        ax.plot(
            x,
            [r["train_loss"] for r in run.rows],
            color=colour,
            label=f"{LABELS[run.optimizer]} train",
        )
        ax.plot(
            x,
            [r["val_loss"] for r in run.rows],
            color=colour,
            ls="--",
            label=f"{LABELS[run.optimizer]} val",
        )
        if run.swap_epoch is not None and run.optimizer != "adam":
            swap = run.rows[run.swap_epoch - 1] if run.swap_epoch else run.rows[0]
            ax.axvline(
                swap[x_key] + (1 if x_key == "epoch" else 0), color=colour, ls=":", lw=1
            )
        ax.set(title=run.model, xlabel=x_label, ylabel=f"{loss} loss", yscale="log")
    for ax in axes.values():
        ax.grid(alpha=0.3)
    next(iter(axes.values())).legend(fontsize=7)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_gradnorm(runs: list[Run], path: pathlib.Path):
    models_ = list(dict.fromkeys(r.model for r in runs))
    fig, axes = _grid(models_)
    for run in runs:
        ax = axes[run.model]
        colour = COLOURS[run.optimizer]
        loss = [r["train_loss"] for r in run.rows]
        ax.plot(
            loss,
            [r["gn_reading"] for r in run.rows],
            ".-",
            ms=3,
            lw=0.8,
            color=colour,
            label=LABELS[run.optimizer],
        )
        if run.swap_epoch:
            # The reading of the epoch before the first CG epoch triggered it.
            trigger = run.rows[run.swap_epoch - 1]
            ax.plot(
                trigger["train_loss"],
                trigger["gn_reading"],
                "*",
                ms=14,
                color=colour,
                mec="black",
                label=f"swap ({LABELS[run.optimizer]})",
            )
        ax.set(
            title=run.model,
            xlabel="training loss (log)",
            ylabel="gradient-norm reading (log)",
            xscale="log",
            yscale="log",
        )
        ax.invert_xaxis()  # Training moves right: the loss falls.
        ax.grid(alpha=0.3)
    next(iter(axes.values())).legend(fontsize=7)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", default="digits", choices=data_lib.DATASET_NAMES)
    parser.add_argument(
        "--models", nargs="+", default=list(DEFAULT_MODELS), choices=models.MODEL_NAMES
    )
    parser.add_argument("--epochs", type=cli.integer(1), default=20)
    parser.add_argument(
        "--batch-size",
        type=cli.integer(1),
        default=None,
        help="Adam's batch size (default: 512 as in the paper; 64 for digits, whose "
        "1437 training images would give only 3 steps per epoch at 512)",
    )
    parser.add_argument("--lr", type=cli.POSITIVE, default=1e-3)
    train_lib.add_loss_argument(parser)
    parser.add_argument(
        "--fixed",
        action="store_true",
        help="also run the paper's fixed split (two-phase-fixed)",
    )
    parser.add_argument(
        "--swap-epoch",
        type=cli.integer(0),
        default=None,
        help="first CG epoch of the fixed split (default: 30%% of "
        "--epochs, as in the paper's 300 of 1000)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--out",
        type=pathlib.Path,
        default=None,
        help="where the table, plots and runs go (default: runs/DATASET; "
        "--out results/DATASET replaces the committed results)",
    )
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    args.out = args.out or pathlib.Path("runs") / args.dataset
    if args.batch_size is None:
        args.batch_size = 64 if args.dataset == "digits" else 512
    if args.swap_epoch is None:
        args.swap_epoch = max(1, round(0.3 * args.epochs))
    args.out.mkdir(parents=True, exist_ok=True)
    try:
        dataset = data_lib.load(args.dataset, args.data_dir)
    except data_lib.DatasetUnavailableError as error:
        raise SystemExit(str(error)) from None

    runs = run_all(args)
    write_table(runs, dataset, args.out / "table.md", args.loss)
    for x_key, x_label, name in (
        ("epoch", "epoch", "loss_vs_epoch.png"),
        ("wall_time", "training wall time (s)", "loss_vs_time.png"),
        ("forward_passes", "forward-pass equivalents", "loss_vs_compute.png"),
    ):
        plot_losses(runs, x_key, x_label, args.out / name, args.loss)
    plot_gradnorm(runs, args.out / "gradnorm_vs_loss.png")
    print((args.out / "table.md").read_text())
    print(f"Plots in {args.out}/")


if __name__ == "__main__":
    main()
