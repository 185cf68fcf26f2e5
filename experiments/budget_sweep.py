"""Budget sweeps built on shared Adam runs: when does the second phase pay?

A two-phase run is Adam up to its swap. So, per model and seed, a sweep trains
Adam once, to its longest budget, keeping the checkpoint of every epoch after
which some variant swaps; every second phase is a *tail* that starts from
such a checkpoint, and its metrics, compute and time include the Adam prefix
it reuses (see ``RunConfig.prefix_run`` in :mod:`experiments.config`):

* ``adam``: the long run, read at each budget (a constant rate does not
  depend on the budget);
* ``adam-cosine``: Adam with its rate cosine-decayed over the budget, one run
  per budget;
* ``two-phase-fixed`` and ``adam-lbfgs``: the paper's fixed split, 30% of the
  budget with Adam, then CG or ``optax.lbfgs`` on the full batch; one tail per
  budget;
* ``two-phase``: the detected swap (none in a budget's last fifth), from
  :func:`twophase_optax.swap.replay` of the live rule on Adam's readings;
  its checkpoint is kept as the run passes it, and one tail, read at each
  budget, runs from there.

Everything is resumable: a finished run is read back, an unfinished one
continues, and a longer budget extends the Adam run. With ``redo_tails`` the
tails are trained again from the kept checkpoints (after a change to CG, say)
while Adam and cosine Adam are read back. ``python -m experiments.compare
--sweep`` is the command line; :func:`write_sweep` the tables and the
crossover plot.

Example (the engine on a tiny setting: two budgets, 3 and 5 epochs):
  >>> import pathlib, tempfile
  >>> from experiments import budget_sweep
  >>> sweep = budget_sweep.Sweep(
  ...     models=["vit-nomlp-wkewq-wvwo"], seeds={"vit-nomlp-wkewq-wvwo": [0]},
  ...     budgets=[3, 5], variants=["adam", "two-phase-fixed"],
  ...     out=pathlib.Path(tempfile.mkdtemp()), progress=False)
  >>> runs = budget_sweep.run_sweep(sweep)
  >>> [(r.optimizer, len(r.rows), r.swap_epoch) for r in runs[5]]
  [('adam', 5, None), ('two-phase-fixed', 5, 2)]
  >>> runs[5][1].rows[1] == runs[5][0].rows[1]  # the prefix is Adam's own
  True
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any

import matplotlib
import matplotlib.ticker
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from experiments import analysis  # noqa: E402
from experiments import config as config_lib  # noqa: E402
from experiments import models  # noqa: E402
from experiments import run_records  # noqa: E402
from experiments import tables  # noqa: E402
from experiments import train as train_lib  # noqa: E402
from experiments import variants as variant_registry  # noqa: E402
from experiments.analysis import Run  # noqa: E402

SPLIT_FRACTION = 0.3  # The paper's 300 of 1000 epochs with Adam.
BASELINES = variant_registry.BASELINES
SPLITS = variant_registry.TAILS  # A tail per budget.
VARIANTS = variant_registry.SWEEP
TWO_PHASE = variant_registry.TWO_PHASE_SWEEP
_ADAM = variant_registry.ADAM.name  # every tail starts from its run


def split_epoch(budget: int) -> int:
    """The first second-phase epoch of the fixed split at ``budget`` epochs."""
    return max(1, round(SPLIT_FRACTION * budget))


@dataclasses.dataclass
class Sweep:
    """A budget sweep: models, seeds per model, budgets and variants."""

    models: list[str]
    seeds: dict[str, list[int]]
    budgets: list[int]
    variants: list[str] = dataclasses.field(default_factory=lambda: list(VARIANTS))
    dataset: str = "digits"
    batch_size: int = 64
    lr: float = 1e-3
    loss: str = models.DEFAULT_LOSS
    out: pathlib.Path = pathlib.Path("runs/sweep/digits")
    data_dir: str | None = None
    resume: bool = False
    redo_tails: bool = False
    progress: bool = True
    checkpoint_every: int = 1  # Each run's --checkpoint-every.
    # Train nothing: read finished runs back, list the rest in ``missing``.
    read_only: bool = False
    missing: list[tuple] = dataclasses.field(default_factory=list)
    # Budgets to extend the sweep to later: the Adam run keeps the checkpoints
    # their splits start from too, so that they need no new Adam run.
    later_budgets: list[int] = dataclasses.field(default_factory=list)
    # The swap rule and its settings (swap_rule, gn_factor, ...) as Config
    # takes them; empty: the defaults. **config_lib.PAPER_RULE: Algorithm 1.
    detector: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        self.out = pathlib.Path(self.out)
        self.budgets = sorted(set(self.budgets))
        if not self.budgets or self.budgets[0] < 2:
            raise ValueError(f"budgets must be integers >= 2, got {self.budgets}.")
        if unknown := set(self.variants) - set(VARIANTS):
            raise ValueError(f"Unknown variants {sorted(unknown)}; known: {VARIANTS}.")
        if _ADAM not in self.variants:
            self.variants = [_ADAM, *self.variants]  # Every tail starts from it.

    def run_dir(self, model: str, seed: int, variant: str, budget=None):
        """``<out>/runs/<model>/seed<k>/<variant>[/b<budget>]``."""
        path = self.out / "runs" / model / f"seed{seed}" / variant
        return path if budget is None else path / f"b{budget}"

    def config(self, model: str, seed: int, variant: str, budget: int, **kw):
        return config_lib.Config.of(
            model=model,
            dataset=self.dataset,
            optimizer=variant,
            epochs=budget,
            batch_size=self.batch_size,
            lr=self.lr,
            loss=self.loss,
            seed=seed,
            data_dir=self.data_dir,
            progress=self.progress,
            checkpoint_every=self.checkpoint_every,
            **self.detector,
            **kw,
        )


def _made_rows(config: config_lib.Config) -> list[dict[str, Any]]:
    """The rows already written for ``config``'s run (none for a tail made
    from another prefix: another split or detection is not this run)."""
    out = pathlib.Path(config.run.out)
    rows = run_records.read_metrics(out / "metrics.jsonl")
    if rows and config.run.prefix_run is not None:
        made = json.loads((out / "config.json").read_text())
        # Runs written before the config had sections hold it flat.
        made = made.get("run", made)
        if made.get("prefix_epoch") != config.run.prefix_epoch:
            return []
    return rows


def train_run(config: config_lib.Config, resume: bool) -> list[dict[str, Any]]:
    """The run's rows: read back if it is finished (and ``resume``), else
    trained or continued."""
    rows = _made_rows(config) if resume else []
    if len(rows) >= config.run.epochs:
        return rows[: config.run.epochs]
    config.run.resume = resume and bool(rows)
    return train_lib.train(config)[: config.run.epochs]


def detected_epoch(sweep: Sweep, rows: list[dict[str, Any]], budget=None) -> int | None:
    """The epoch after which the live two-phase run of ``budget`` epochs with
    the sweep's swap rule swaps (:func:`run_records.replayed_swap` on the
    Adam run's rows); ``None`` if it does not swap within ``rows``."""
    config = config_lib.Config.of(**sweep.detector)
    return run_records.replayed_swap(config, rows, budget=budget)


def run_model(sweep: Sweep, model: str, seed: int, label: str = "") -> dict:
    """Every variant of one model and seed at every budget: ``{budget: [Run]}``.

    Budgets go from the shortest up, so an interrupted sweep has its short
    budgets complete, and the Adam run grows with them.
    """
    keep = tuple(
        sorted({split_epoch(b) - 1 for b in sweep.budgets + sweep.later_budgets})
    )
    tails_resume = sweep.resume and not sweep.redo_tails
    read_back = sweep.resume or sweep.redo_tails
    started: set[tuple] = set()  # Runs go on from one budget to the next.

    def run(variant, budget, long=False, prefix_epoch=None, resume=read_back):
        """``long``: one run for all budgets (Adam's, the detected swap's)."""
        key = (variant, None if long else budget)
        resume = resume or key in started
        started.add(key)
        kw: dict[str, Any] = dict(label=f"{label}b{budget} ")
        if prefix_epoch is not None:
            adam_dir = str(sweep.run_dir(model, seed, _ADAM))
            kw.update(prefix_run=adam_dir, prefix_epoch=prefix_epoch)
        if variant_registry.get(variant).sweep == "tail":
            kw["swap_epoch"] = split_epoch(budget)
        if variant_registry.get(variant).sweep == "long":  # Adam's run
            kw.update(
                keep_epochs=keep,
                keep_detected=any(
                    variant_registry.get(v).sweep == "detected-tail"
                    for v in sweep.variants
                ),
            )
        out = sweep.run_dir(model, seed, variant, None if long else budget)
        config = sweep.config(model, seed, variant, budget, out=str(out), **kw)
        if sweep.read_only:
            rows = _made_rows(config)
            if len(rows) < budget:
                sweep.missing.append((model, seed, budget, variant))
                return None
            return Run(model, variant, rows[:budget], seed)
        return Run(model, variant, train_run(config, resume), seed)

    by_budget: dict[int, list[Run]] = {}
    for budget in sweep.budgets:
        adam = run(_ADAM, budget, long=True)
        if adam is None:  # Every variant starts from it.
            sweep.missing[-1] = (model, seed, budget, "adam, so every variant")
            by_budget[budget] = []
            continue
        runs = [adam]
        for variant in sweep.variants:
            how = variant_registry.get(variant).sweep
            if how == "per-budget":
                runs.append(run(variant, budget))
            elif how == "tail":
                prefix = split_epoch(budget) - 1
                runs.append(
                    run(variant, budget, prefix_epoch=prefix, resume=tails_resume)
                )
            elif how == "detected-tail":
                detected = detected_epoch(sweep, adam.rows, budget)
                if detected is None or detected + 1 >= budget:
                    # No swap within the budget: the live run is Adam's.
                    runs.append(Run(model, variant, adam.rows, seed))
                else:
                    runs.append(
                        run(
                            variant,
                            budget,
                            long=True,
                            prefix_epoch=detected,
                            resume=tails_resume,
                        )
                    )
        by_budget[budget] = [r for r in runs if r is not None]
    return by_budget


def run_sweep(sweep: Sweep) -> dict[int, list[Run]]:
    """Every model, seed and budget: ``{budget: [Run, ...]}``, model by model."""
    by_budget: dict[int, list[Run]] = {b: [] for b in sweep.budgets}
    pairs = [(m, s) for m in sweep.models for s in sweep.seeds[m]]
    for k, (model, seed) in enumerate(pairs):
        label = f"{k + 1}/{len(pairs)} {model} seed {seed} "
        for budget, runs in run_model(sweep, model, seed, label).items():
            by_budget[budget] += runs
    return by_budget


FLOOR = 1e-30  # Where the plot draws a ratio of 0 (a loss of exactly 0).


def plot_crossover(entries: list[dict[str, Any]], path: pathlib.Path, title: str):
    """Loss ratio to the better Adam baseline at equal compute, per budget."""
    shown = [v for v in TWO_PHASE if any(e["variant"] == v for e in entries)]
    if not shown:  # No run with both baselines (cosine Adam missing, say).
        return
    fig, axes = plt.subplots(
        1,
        len(shown),
        figsize=(5 * len(shown), 4),
        squeeze=False,
        constrained_layout=True,
    )
    models_ = list(dict.fromkeys(e["model"] for e in entries))
    budgets_all = sorted({e["budget"] for e in entries})
    for ax, variant in zip(axes[0], shown, strict=True):
        for model in models_:
            cells: dict[int, list[dict]] = {}
            for e in entries:
                if (e["model"], e["variant"]) == (model, variant):
                    cells.setdefault(e["budget"], []).append(e)
            swapped = [
                b for b in sorted(cells) if any(e["swap_epoch"] for e in cells[b])
            ]
            # The geometric mean over the seeds, each seed a faint dot; a
            # budget whose seeds all ended at exactly 0 is drawn at FLOOR, one
            # with no second-phase epoch within Adam's compute not at all.
            swapped = [
                b
                for b in swapped
                if any(e["ratio"] != analysis.NO_SECOND_PHASE for e in cells[b])
            ]
            means = []
            for b in swapped:
                mean = analysis.geometric_mean([e["ratio"] for e in cells[b]])
                means.append(FLOOR if mean != mean else max(mean, FLOOR))
            (line,) = ax.plot(swapped, means, "o-", label=model)
            for b in swapped:
                ratios = [
                    FLOOR if e["ratio"] == analysis.UNDERFLOW else e["ratio"]
                    for e in cells[b]
                    if e["ratio"] != analysis.NO_SECOND_PHASE
                ]
                ax.plot(
                    [b] * len(ratios), ratios, ".", color=line.get_color(), alpha=0.4
                )
            # No swap within the budget: the run is Adam's, marked on the line 1.
            idle = [b for b in sorted(cells) if b not in swapped]
            ax.plot(idle, [1.0] * len(idle), "x", color=line.get_color(), ms=8)
        ax.axhline(1.0, color="black", lw=0.8, ls="--")
        ax.set(
            title=variant_registry.get(variant).label,
            xlabel="budget (epochs)",
            ylabel="train loss / better Adam baseline's, equal compute",
            xscale="log",
            yscale="log",
        )
        ax.set_xticks(budgets_all, [str(b) for b in budgets_all])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.grid(alpha=0.3, which="both")
        ax.text(
            0.02,
            0.02,
            "below 1: two-phase wins; x: no swap within the budget;\n"
            f"a loss of 0 (float32 underflow) is drawn at {FLOOR:g},\n"
            "and left out of the line's geometric mean",
            transform=ax.transAxes,
            fontsize=7,
        )
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_sweep(
    by_budget: dict[int, list[Run]],
    dataset,
    out: pathlib.Path,
    loss: str,
    command: str | None = None,
    note: str | None = None,
    missing: list[str] = (),
    made_by: str | None = None,
) -> list[dict[str, Any]]:
    """``table.md``, ``table.json`` and ``crossover.png`` in ``out``.

    The table starts with the crossover budgets and the loss ratios per
    budget, then per budget the results of every variant and the verdicts
    against constant and cosine Adam at equal epochs, compute and time.
    Returns the summary entries (one per two-phase run).
    """
    out.mkdir(parents=True, exist_ok=True)
    budgets = sorted(by_budget)
    entries = analysis.summary(by_budget)
    all_runs = [r for b in budgets for r in by_budget[b]]
    models_ = list(dict.fromkeys(r.model for r in all_runs))
    shown = [v for v in TWO_PHASE if any(e["variant"] == v for e in entries)]
    lines = [
        f"# {dataset.name}: when the second phase pays, budgets "
        f"{', '.join(map(str, budgets))} epochs ({analysis.seeds_text(all_runs)})",
        "",
    ]
    if made_by:
        lines += [made_by, ""]
    if command:
        lines += [f"Made with `{command}`.", ""]
    if note:
        lines += [note, ""]
    if missing:
        grouped: dict[tuple, list[int]] = {}
        for model, seed, budget, variant in missing:
            grouped.setdefault((model, seed, variant), []).append(budget)
        lines += [
            "**Missing** (not run, or not finished, when the table was written):",
            "",
            *[
                f"- {model} seed {seed}, {variant}: {', '.join(map(str, b))} epochs"
                for (model, seed, variant), b in grouped.items()
            ],
            "",
        ]
    lines += [
        f"Loss: {loss}. Every two-phase run reuses the Adam run of its seed up "
        f"to its swap (the fixed split after {SPLIT_FRACTION:.0%} of the "
        "budget, the detected swap where the detector replayed on Adam's "
        "readings fires), and its compute and time include that prefix. "
        "Compute is in forward-pass equivalents over the training set (a value "
        "1, a value and gradient 3); wall s is the time of the training steps, "
        "compilation (compile s) timed apart.",
        "",
        "## Crossover",
        "",
        "The smallest budget at which the variant's training loss is below "
        "both constant Adam's and cosine Adam's at equal compute, in most "
        "seeds; and Adam's training loss at the fixed split's swap in the "
        "cells it wins and loses.",
        "",
        "| model | "
        + " | ".join(f"crossover, {variant_registry.get(v).label}" for v in shown)
        + " | Adam's loss at the swap, fixed split winning | losing |",
        "|---|" + "---|" * (len(shown) + 2),
    ]
    crossovers = {}
    for model in models_:
        crossovers[model] = {v: analysis.crossover(entries, model, v) for v in shown}
        fixed = [
            e
            for e in entries
            if e["model"] == model
            and e["variant"] == variant_registry.TWO_PHASE_FIXED.name
        ]

        def losses(won, fixed=fixed):
            found = sorted(e["adam_loss_at_swap"] for e in fixed if e["wins"] == won)
            return f"{found[0]:.2g} to {found[-1]:.2g} ({len(found)})" if found else "-"

        def text(v, model=model):
            if not any((e["model"], e["variant"]) == (model, v) for e in entries):
                return "-"  # Not run (or no baselines yet): no crossover to name.
            c = crossovers[model][v]
            return f"none up to {budgets[-1]}" if c is None else f"{c} epochs"

        lines.append(
            f"| {model} | "
            + " | ".join(text(v) for v in shown)
            + f" | {losses(True)} | {losses(False)} |"
        )
    lines += [
        "",
        "Training loss over the better Adam baseline's at equal compute "
        "(geometric mean over the seeds; below 1 the variant wins), and in how "
        "many seeds it beat both:",
        "",
        "| model | variant | " + " | ".join(f"{b} epochs" for b in budgets) + " |",
        "|---|---|" + "---|" * len(budgets),
    ]
    for model in models_:
        for variant in shown:
            cell = []
            for budget in budgets:
                found = [
                    e
                    for e in entries
                    if (e["model"], e["variant"], e["budget"])
                    == (model, variant, budget)
                ]
                if not found:
                    cell.append("-")
                elif all(e["swap_epoch"] is None for e in found):
                    cell.append("no swap")
                else:
                    cell.append(
                        tables.ratio_text(
                            [e["ratio"] for e in found], [e["wins"] for e in found]
                        )
                    )
            lines.append(
                f"| {model} | {variant_registry.get(variant).label} | "
                + " | ".join(cell)
                + " |"
            )
    table_json: dict[str, Any] = {"budgets": {}, "summary": entries}
    table_json["missing"] = [
        dict(zip(("model", "seed", "budget", "variant"), m, strict=True))
        for m in missing
    ]
    table_json["crossover"] = crossovers
    n_train, outputs = len(dataset.x_train), dataset.num_classes
    for budget in budgets:
        runs = by_budget[budget]
        lines += [
            "",
            f"## {budget} epochs",
            "",
            *tables.RESULT_HEADER,
        ]
        cells_json = []
        verdict_lines = []
        for cell in analysis.cells(runs):
            lines.append(tables.result_line(cell, n_train * outputs))
            entry = analysis.cell_entry(cell)
            if cell.optimizer in TWO_PHASE and all(
                analysis.has_baselines(runs, r) for r in cell.runs
            ):
                entry["verdicts"] = {
                    b: analysis.cell_verdicts(runs, cell, b) for b in BASELINES
                }
                verdict_lines.append(
                    f"| {cell.model} | {variant_registry.get(cell.optimizer).label} | "
                    + " | ".join(
                        tables.verdict_cell(
                            entry["verdicts"][b][name],
                            cell.optimizer,
                            entry["swapped"],
                            baseline=variant_registry.get(b).short_label,
                            accuracy=True,
                        )
                        for b in BASELINES
                        for _, name in analysis.COMPARISONS
                    )
                    + " |"
                )
            cells_json.append(entry)
        lines += [
            "",
            "Verdicts on the training loss (winner of most seeds, seeds won, "
            "mean losses, and the validation accuracies there):",
            "",
            "| model | variant | "
            + " | ".join(
                f"vs {'Adam' if b == 'adam' else 'cosine Adam'}, equal {name}"
                for b in BASELINES
                for _, name in analysis.COMPARISONS
            )
            + " |",
            "|---|---|" + "---|" * 6,
            *verdict_lines,
        ]
        table_json["budgets"][str(budget)] = cells_json
    tally = analysis.validation_tally(by_budget)
    table_json["validation"] = tally
    lines += ["", *tables.validation_lines(tally)]
    lines += ["", *tables.table_1_layout(by_budget[budgets[-1]], budgets[-1])]
    (out / "table.md").write_text("\n".join(lines) + "\n")
    (out / "table.json").write_text(json.dumps(table_json, indent=1) + "\n")
    plot_crossover(
        entries, out / "crossover.png", f"{dataset.name}: when the second phase pays"
    )
    return entries


OUTCOMES = ("win", "tie", "loss")


def verdict_lines(by_budget: dict[int, list[Run]]) -> str:
    """One line per budget, model and two-phase variant: does it beat both
    Adam baselines at equal compute, and by how much."""
    lines = []
    for budget, runs in by_budget.items():
        for cell in analysis.cells(runs):
            if cell.optimizer not in TWO_PHASE:
                continue
            if not all(analysis.has_baselines(runs, r) for r in cell.runs):
                continue
            if all(r.swap_epoch is None for r in cell.runs):
                lines.append(
                    f"{budget} epochs, {cell.model}, "
                    f"{variant_registry.get(cell.optimizer).label}"
                    ": no swap within the budget (Adam's run)"
                )
                continue
            outcomes = [analysis.outcome(runs, run) for run in cell.runs]
            judged = [
                (r, o)
                for r, o in zip(cell.runs, outcomes, strict=True)
                if o is not None
            ]
            head = (
                f"{budget} epochs, {cell.model}, "
                f"{variant_registry.get(cell.optimizer).label}: "
            )
            if not judged:
                lines.append(head + analysis.NO_SECOND_PHASE)
                continue
            n = len(judged)
            count = {o: sum(x == o for _, x in judged) for o in OUTCOMES}
            seeds = f" in {count['win']} of {n} seeds" if n > 1 else ""
            verb = "WINS" if 2 * count["win"] > n else "LOSES"
            if verb == "LOSES" and count["tie"] and 2 * count["loss"] <= n:
                # Ties (both 0, say) and no majority of losses: not a loss.
                verb = "TIES" if n == 1 else "DOES NOT WIN"
            if count["tie"] and n > 1:
                seeds += f", {count['tie']} tied with the better baseline"
            versus = []
            for baseline in BASELINES:
                pairs = [
                    analysis.at_equal(runs, r, "forward_passes", baseline)
                    for r, _ in judged
                ]
                ours = [p[0]["train_loss"] for p in pairs if p]
                theirs = [p[1]["train_loss"] for p in pairs if p]
                name = variant_registry.get(baseline).short_label
                versus.append(f"{_mean_text(ours)} vs {name}'s {_mean_text(theirs)}")
            if len(cell.runs) > 1:
                ratios = [analysis.loss_ratio(runs, run) for run in cell.runs]
                versus.append(
                    "ratio per seed " + ", ".join(map(tables.ratio_entry, ratios))
                )
            lines.append(f"{head}{verb} at equal compute{seeds} ({'; '.join(versus)})")
    return "\n".join(lines)


def _mean_text(losses: list[float]) -> str:
    """The mean of the losses that are not exactly 0, and how many are."""
    kept = [x for x in losses if x != 0]
    text = f"{np.mean(kept):.2g}" if kept else "0"
    zeros = len(losses) - len(kept)
    return text + (f" ({zeros} at 0, underflow)" if zeros and kept else "")
