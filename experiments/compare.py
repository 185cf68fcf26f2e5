"""Adam against the two-phase method for each model: the paper's Table 1 and figures.

    python -m experiments.compare --dataset digits --study    # Table 1 study
    python -m experiments.compare --dataset digits --sweep --budgets 20 50 150

For every model and seed it trains Adam alone and each of ``--optimizers``
(default: the paper's fixed split, 30% of the epochs with Adam, and the
detected swap; ``--study`` adds CG from the start and Adam followed by
``optax.lbfgs``, with 3 seeds) for the same number of epochs, then writes to
``--out`` (default ``runs/<dataset>/``, a scratch folder git ignores; the
committed ``results/<dataset>/`` are written only when asked for with
``--out results/<dataset>``):

* ``table.md``: per model and optimizer the final train loss and accuracy,
  validation loss and accuracy (mean over the seeds ± half their range),
  parameter count, Q = samples * outputs / parameters, the swap epochs, the
  compute spent (forward-pass equivalents over the training set) and the wall
  time; then the verdicts against Adam of the same seed at equal epochs,
  equal compute and equal wall time; ``table.json`` holds every number;
* ``loss_vs_epoch.png``, ``loss_vs_time.png``, ``loss_vs_compute.png``: all
  optimizers on one plot per model, every seed drawn;
* ``gradnorm_vs_loss.png``: the gradient-norm reading against the training
  loss with the swap point marked (the paper's Figure 5).

Runs go to ``<out>/runs/<model>/<optimizer>/seed<k>`` with their metrics and
checkpoints; ``--resume`` reads finished runs back and continues unfinished
ones, so a study may be stopped and resumed.

``--sweep`` asks when the second phase pays: at each of ``--budgets`` it
compares Adam at a constant rate, Adam with a cosine-decayed rate, the fixed
split at 30% of the budget, the detected swap and Adam then L-BFGS, every
two-phase run a tail from the shared Adam run (:mod:`experiments.budget_sweep`). It
writes ``table.md`` (the crossover budgets, the loss ratios to the better
Adam baseline, and per budget the results and the verdicts against both
baselines), ``table.json``, ``crossover.png`` and the loss plots of each
budget, and prints one verdict line per budget, model and variant.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from experiments import analysis  # noqa: E402
from experiments import budget_sweep  # noqa: E402
from experiments import cli  # noqa: E402
from experiments import config as config_lib  # noqa: E402
from experiments import data as data_lib  # noqa: E402
from experiments import models  # noqa: E402
from experiments import provenance  # noqa: E402
from experiments import run_records  # noqa: E402
from experiments import sweep_copies  # noqa: E402
from experiments import tables  # noqa: E402
from experiments import train as train_lib  # noqa: E402
from experiments import variants  # noqa: E402

DEFAULT_MODELS = models.IMAGE_MODEL_NAMES  # on text: models.TEXT_VARIANTS
_ADAM = variants.ADAM.name  # every verdict is against it
DEFAULT_OPTIMIZERS = [_ADAM, variants.TWO_PHASE_FIXED.name, variants.TWO_PHASE.name]
STUDY_OPTIMIZERS = [*DEFAULT_OPTIMIZERS, variants.CG.name, variants.ADAM_LBFGS.name]


def run_all(args) -> list[analysis.Run]:
    """Trains every model, optimizer and seed; with ``--resume`` a finished run
    is read back, not trained again, and an unfinished one continues.

    ``args.seeds`` maps each model to its seeds.
    """
    runs = []
    total = len(args.optimizers) * sum(len(args.seeds[m]) for m in args.models)
    for model in args.models:
        for optimizer in args.optimizers:
            for seed in args.seeds[model]:
                out = args.out / "runs" / model / optimizer / f"seed{seed}"
                rows = run_records.read_metrics(out / "metrics.jsonl")
                if not (args.resume and len(rows) >= args.epochs):
                    config = config_lib.Config.of(
                        label=f"run {len(runs) + 1}/{total}: ",
                        model=model,
                        dataset=args.dataset,
                        optimizer=optimizer,
                        epochs=args.epochs,
                        batch_size=args.batch_size,
                        lr=args.lr,
                        loss=args.loss,
                        swap_epoch=args.swap_epoch,
                        seed=seed,
                        out=str(out),
                        data_dir=args.data_dir,
                        resume=args.resume,
                        progress=not args.no_progress,
                        checkpoint_every=args.checkpoint_every,
                    )
                    rows = train_lib.train(config)
                runs.append(analysis.Run(model, optimizer, rows[: args.epochs], seed))
    return runs


def write_table(
    runs: list[analysis.Run],
    dataset: data_lib.Dataset,
    path: pathlib.Path,
    loss: str,
    command: str | None = None,
):
    """``table.md`` and, beside it, ``table.json`` with every number of it.

    ``command``, where given, is the command line that made the runs; the
    table names it under its title.
    """
    n_train, outputs = len(dataset.x_train), dataset.num_classes
    lines = [
        f"# {dataset.name}: Adam against the two-phase method "
        f"({runs[0].last['epoch'] + 1} epochs, {analysis.seeds_text(runs)})",
        "",
    ]
    if command:
        lines += [f"Made with `{command}`.", ""]
    lines += [
        f"Loss: {loss}. Final values after the last epoch, the mean over the "
        "seeds ± half their range. Q = training samples * outputs / "
        "parameters. Compute is in forward-pass equivalents over the training "
        "set (a value 1, a value and gradient 3, also in the line search; a "
        "full-batch CG or L-BFGS step reuses the gradient its line search "
        "left). Wall s is the time of the training steps; compilation (compile "
        "s) is timed apart, and evaluation and checkpoints are not counted.",
        "",
        *tables.RESULT_HEADER,
    ]
    table_json = []
    for cell in analysis.cells(runs):
        lines.append(tables.result_line(cell, n_train * outputs))
        entry = analysis.cell_entry(cell)
        if cell.optimizer != _ADAM and all(
            analysis.baseline_run(runs, r) for r in cell.runs
        ):
            entry["verdicts"] = analysis.cell_verdicts(runs, cell)
        table_json.append(entry)
    lines += [
        "",
        "Verdicts on the training loss against Adam of the same seed, at equal "
        "epochs (the paper's comparison), equal compute and equal wall time: "
        "each run and Adam's at the largest epoch within the smaller of the "
        "two totals. The winner of most seeds, how many seeds the optimizer "
        "won, and the mean losses (it vs Adam). Where no seed swapped, the run "
        "is Adam's up to rounding (a differently compiled program): the cell "
        'starts with "no swap", and its verdict compares noise.',
        "",
        "| model | optimizer | equal epochs | equal compute | equal time |",
        "|---|---|---|---|---|",
    ]
    for entry in table_json:
        if "verdicts" in entry:
            v = entry["verdicts"]
            o = entry["optimizer"]
            lines.append(
                f"| {entry['model']} | {variants.get(o).label} | "
                + " | ".join(
                    tables.verdict_cell(v[name], o, entry["swapped"])
                    for _, name in analysis.COMPARISONS
                )
                + " |"
            )
    lines += ["", "Per run (training loss; lower wins):", ""]
    lines += [
        f"- {tables.verdict(runs, run)}" for run in runs if run.optimizer != _ADAM
    ]
    path.write_text("\n".join(lines) + "\n")
    path.with_suffix(".json").write_text(json.dumps(table_json, indent=1) + "\n")


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
    runs: list[analysis.Run], x_key: str, x_label: str, path: pathlib.Path, loss: str
):
    models_ = list(dict.fromkeys(r.model for r in runs))
    fig, axes = _grid(models_)
    first_seed = min(r.seed for r in runs)
    for run in runs:
        ax = axes[run.model]
        x = [r[x_key] + (1 if x_key == "epoch" else 0) for r in run.rows]
        colour = variants.get(run.optimizer).colour
        # Every seed is drawn; the first one labelled and stronger.
        main_seed = run.seed == first_seed
        name = variants.get(run.optimizer).label
        variant = variants.get(run.optimizer)
        if run.swap_epoch is None and variant.has_second_phase:
            # A run that never swapped is Adam's: drawn thin and dotted under
            # Adam's line, which stays visible, and named so in the legend.
            ax.plot(
                x,
                [r["train_loss"] for r in run.rows],
                color=colour,
                ls=":",
                lw=1.0,
                zorder=1,
                alpha=1.0 if main_seed else 0.35,
                label=f"{name}: no swap, Adam's run" if main_seed else None,
            )
            continue
        ax.plot(
            x,
            [r["train_loss"] for r in run.rows],
            color=colour,
            alpha=1.0 if main_seed else 0.35,
            zorder=3 if variant is variants.ADAM else 2,
            label=f"{name} train" if main_seed else None,
        )
        if main_seed:
            ax.plot(
                x,
                [r["val_loss"] for r in run.rows],
                color=colour,
                ls="--",
                lw=0.8,
                label=f"{name} val",
            )
        if main_seed and run.swap_epoch is not None and variant.has_second_phase:
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


def plot_gradnorm(runs: list[analysis.Run], path: pathlib.Path):
    first_seed = min(r.seed for r in runs)
    runs = [
        r
        for r in runs
        if r.seed == first_seed and variants.get(r.optimizer).first is not None
    ]
    models_ = list(dict.fromkeys(r.model for r in runs))
    fig, axes = _grid(models_)
    for run in runs:
        ax = axes[run.model]
        colour = variants.get(run.optimizer).colour
        loss = [r["train_loss"] for r in run.rows]
        ax.plot(
            loss,
            [r["gn_reading"] for r in run.rows],
            ".-",
            ms=3,
            lw=0.8,
            color=colour,
            label=variants.get(run.optimizer).label,
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
                label=f"swap ({variants.get(run.optimizer).label})",
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


def plot_budgets(by_budget: dict, out: pathlib.Path, loss: str) -> None:
    """A sweep's ``loss_vs_epoch_<budget>.png`` and ``loss_vs_compute_<budget>.png``."""
    for budget, runs in by_budget.items():
        if not runs:
            continue
        for x_key, x_label, name in (
            ("epoch", "epoch", "loss_vs_epoch"),
            ("forward_passes", "forward-pass equivalents", "loss_vs_compute"),
        ):
            plot_losses(runs, x_key, x_label, out / f"{name}_{budget}.png", loss)


def retable(
    folder: pathlib.Path, dataset: data_lib.Dataset, loss: str, command: str
) -> None:
    """``--retable``: a copied sweep's table, plots and provenance written
    again from its metrics; the old header (the command that made it, its
    note) is kept beneath the new command, the runs still missing are listed
    again, and the provenance is the copy's own plus the runs copied in since
    (:func:`sweep_copies.copy_summary`)."""
    made_before = json.loads((folder / "table.json").read_text())
    budgets = sorted(int(b) for b in made_before["budgets"])
    models_ = list(dict.fromkeys(e["model"] for e in made_before["summary"]))
    note = sweep_copies.header_note((folder / "table.md").read_text())
    by_budget = sweep_copies.read_copy(folder, budgets, models_ or None)
    missing = sweep_copies.missing_runs(
        folder, budgets, models_ or None, made_before.get("missing", [])
    )
    # A detected swap with no file reads as Adam's run: not where it never ran.
    lacking = set(missing)
    by_budget = {
        b: [r for r in runs if (r.model, r.seed, b, r.optimizer) not in lacking]
        for b, runs in by_budget.items()
    }
    made = sweep_copies.copy_summary(folder)
    (folder / provenance.FILE).write_text(json.dumps(made, indent=2))
    budget_sweep.write_sweep(
        by_budget,
        dataset,
        folder,
        loss,
        command,
        note,
        missing,
        provenance.describe(made),
    )
    plot_budgets(by_budget, folder, loss)
    print(budget_sweep.verdict_lines(by_budget))


def run_sweep(args, dataset: data_lib.Dataset, command: str) -> None:
    """``--sweep``: the budgets' runs, their tables, plots and verdicts."""
    sweep = budget_sweep.Sweep(
        models=args.models,
        seeds=args.seeds,
        budgets=args.budgets or [args.epochs],
        variants=args.optimizers,
        dataset=args.dataset,
        batch_size=args.batch_size,
        lr=args.lr,
        loss=args.loss,
        out=args.out,
        data_dir=args.data_dir,
        resume=args.resume,
        redo_tails=args.redo_tails,
        progress=not args.no_progress,
        later_budgets=args.later_budgets,
        read_only=args.read_only,
        checkpoint_every=args.checkpoint_every,
    )
    by_budget = budget_sweep.run_sweep(sweep)
    note_path = args.out / "NOTE.md"
    note = note_path.read_text().strip() if note_path.exists() else None
    made_by = sweep_copies.record_provenance(sweep, by_budget)
    budget_sweep.write_sweep(
        by_budget, dataset, args.out, args.loss, command, note, sweep.missing, made_by
    )
    plot_budgets(by_budget, args.out, args.loss)
    if args.copy_to:
        sweep_copies.copy_results(sweep, by_budget, args.copy_to)
    print((args.out / "table.md").read_text())
    print(budget_sweep.verdict_lines(by_budget))
    print(f"Plots in {args.out}/")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", default="digits", choices=data_lib.DATASET_NAMES)
    parser.add_argument(
        "--models",
        nargs="+",
        default=None,
        choices=models.MODEL_NAMES,
        help="default: the five image models, or the two text models on text",
    )
    config_lib.add_flag(parser, "epochs", default=20)
    parser.add_argument(
        "--batch-size",
        type=cli.integer(1),
        default=None,
        help="Adam's batch size (default: 512 as in the paper; 64 for digits, whose "
        "1437 training images would give only 3 steps per epoch at 512)",
    )
    config_lib.add_flag(parser, "lr")
    config_lib.add_flag(parser, "loss")
    parser.add_argument(
        "--optimizers",
        nargs="+",
        default=None,
        choices=config_lib.OPTIMIZERS,
        help=f"default: {' '.join(DEFAULT_OPTIMIZERS)}; --study: "
        f"{' '.join(STUDY_OPTIMIZERS)}",
    )
    parser.add_argument(
        "--fixed",
        action="store_true",
        help="also run the paper's fixed split (two-phase-fixed)",
    )
    parser.add_argument(
        "--seeds",
        type=cli.integer(1),
        default=None,
        help="runs per model and optimizer, seeds --seed, --seed + 1, ... "
        "(default 1; 3 with --study)",
    )
    parser.add_argument(
        "--seeds-for",
        nargs="+",
        default=[],
        metavar="MODEL=N",
        type=cli.named(models.MODEL_NAMES, cli.integer(1)),
        help="runs per model and optimizer for these models, in place of "
        "--seeds (e.g. --seeds 1 --seeds-for vit-mlp=3 vgg5=3)",
    )
    parser.add_argument(
        "--study",
        action="store_true",
        help="the five optimizers of the Table 1 study (see docs/experiments.md), "
        "3 seeds unless --seeds says otherwise",
    )
    parser.add_argument(
        "--swap-epoch",
        type=cli.integer(0),
        default=None,
        help="first CG epoch of the fixed split (default: 30%% of "
        "--epochs, as in the paper's 300 of 1000)",
    )
    parser.add_argument(
        "--sweep",
        action="store_true",
        help="a budget sweep from shared Adam runs (experiments/budget_sweep.py): "
        "Adam, cosine Adam, the fixed split at 30%% of each budget, the "
        "detected swap and Adam then L-BFGS at each of --budgets",
    )
    parser.add_argument(
        "--budgets",
        nargs="+",
        type=cli.integer(2),
        default=None,
        metavar="EPOCHS",
        help="--sweep: the budgets in epochs (default: --epochs)",
    )
    parser.add_argument(
        "--later-budgets",
        nargs="+",
        type=cli.integer(2),
        default=[],
        metavar="EPOCHS",
        help="--sweep: longer budgets to extend the sweep to later; the Adam "
        "runs keep the checkpoints their splits start from",
    )
    parser.add_argument(
        "--copy-to",
        type=pathlib.Path,
        default=None,
        metavar="DIR",
        help="--sweep: also copy the table, the plots and every run's metrics "
        "(no checkpoints) to DIR, e.g. results/sweep/digits",
    )
    parser.add_argument(
        "--read-only",
        action="store_true",
        help="--sweep: train nothing; read finished runs back and list the "
        "missing ones in the table",
    )
    parser.add_argument(
        "--retable",
        type=pathlib.Path,
        default=None,
        metavar="DIR",
        help="--sweep: train nothing; write DIR's table, plots and "
        "provenance.json again from the metrics a --copy-to left there (its "
        "header kept), under this version's verdict rules; the provenance adds "
        "the records of runs copied in since (<name>.provenance.json)",
    )
    parser.add_argument(
        "--redo-tails",
        action="store_true",
        help="--sweep: train the second phases again from the kept Adam "
        "checkpoints; Adam and cosine Adam are read back",
    )
    config_lib.add_flag(parser, "seed")
    parser.add_argument(
        "--out",
        type=pathlib.Path,
        default=None,
        help="where the table, plots and runs go (default: runs/DATASET; "
        "--out results/DATASET replaces the committed results)",
    )
    config_lib.add_flag(parser, "data_dir")
    config_lib.add_flag(parser, "resume")
    config_lib.add_flag(parser, "checkpoint_every")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.sweep and args.study:
        parser.error("argument --sweep: not allowed with argument --study")
    if args.optimizers is None and args.sweep:
        args.optimizers = list(variants.SWEEP)
    elif args.sweep and (bad := set(args.optimizers) - set(variants.SWEEP)):
        parser.error(
            f"argument --optimizers: {', '.join(sorted(bad))} not in a sweep "
            f"(choose from {', '.join(variants.SWEEP)})"
        )
    if args.models is None:
        text = args.dataset in data_lib.TEXT_NAMES
        args.models = list(models.TEXT_VARIANTS if text else DEFAULT_MODELS)
    for model in args.models:
        config_lib.check_model_fits_dataset(parser, model, args.dataset, "--models")
    if args.optimizers is None:
        args.optimizers = list(STUDY_OPTIMIZERS if args.study else DEFAULT_OPTIMIZERS)
    if args.fixed and variants.TWO_PHASE_FIXED.name not in args.optimizers:
        args.optimizers.append(variants.TWO_PHASE_FIXED.name)
    if _ADAM not in args.optimizers:
        args.optimizers.insert(0, _ADAM)  # Every verdict is against Adam.
    if args.seeds is None:
        args.seeds = 3 if args.study else 1
    seeds_for = dict(args.seeds_for)
    if unknown := [m for m in seeds_for if m not in args.models]:
        parser.error(
            f"argument --seeds-for: {', '.join(unknown)} not among --models "
            f"({' '.join(args.models)})"
        )
    args.seeds = {
        model: [args.seed + k for k in range(seeds_for.get(model, args.seeds))]
        for model in args.models
    }
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

    argv = sys.argv[1:] if argv is None else argv
    command = " ".join(["python -m experiments.compare", *map(str, argv)])
    if args.retable:
        if not args.sweep:
            parser.error("argument --retable: only with argument --sweep")
        if not (args.retable / "metrics").is_dir():
            parser.error(f"argument --retable: no metrics/ in {args.retable}")
        return retable(args.retable, dataset, args.loss, command)
    if args.sweep:
        return run_sweep(args, dataset, command)
    runs = run_all(args)
    write_table(
        runs,
        dataset,
        args.out / "table.md",
        args.loss,
        command=command,
    )
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
