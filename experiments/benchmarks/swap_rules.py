"""Swap rules side by side: where each swaps, and what its second phase reaches.

    python -m experiments.benchmarks.swap_rules --dataset digits \\
        --models vit-mlp vgg5 --seeds-for vit-mlp=3 vgg5=3 --budgets 20 50 150

Per model and seed one Adam run (the sweep's settings, ``experiments/budget_sweep.py``)
keeps the checkpoint of every epoch and records what a rule may read each
epoch for free: the gradient-norm reading, the mean of the batch losses the
steps saw (the ``value``s that ``two_phase`` receives) and the training
examples those forward passes got wrong. Every rule is replayed on these rows
(:func:`twophase_optax.swap.replay`, the code ``two_phase`` runs), which gives
the epoch after which a two-phase run with that rule swaps; one tail per
distinct swap epoch runs CG from that epoch's checkpoint to the longest budget
and is read at each budget (CG has no schedule, so a tail does not depend on
the budget). The payoff probe is replayed from short tails (a few CG epochs
from a checkpoint), and the compute of the probes that lost is added to its
run.

Per cell (model, seed, budget) and rule the table gives the swap epoch, Adam's
training loss there, and the final training loss at equal compute over

* the best swap in hindsight: the lowest final loss at equal compute over
  every swap epoch tried for that cell (the sweep's splits and every rule's);
* the better Adam baseline (constant or cosine-decayed rate, the lower loss
  at equal compute);
* constant Adam.

Cosine Adam runs are read from an existing sweep (``--baselines``) where they
exist, else trained. Everything is resumable.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import pathlib
import shlex
import sys
from typing import Any

import twophase_optax as tpo
from experiments import analysis
from experiments import budget_sweep
from experiments import cli
from experiments import models
from experiments import provenance
from experiments import run_records
from experiments.analysis import Run
from experiments.benchmarks import swap_rules_report as report


def train_adam(sweep: budget_sweep.Sweep, model: str, seed: int) -> Run:
    """The Adam run to the longest budget, every epoch's checkpoint kept."""
    epochs = max(sweep.budgets)
    config = sweep.config(
        model,
        seed,
        "adam",
        epochs,
        out=str(sweep.run_dir(model, seed, "adam")),
        keep_epochs=tuple(range(epochs)),
        label=f"{model} seed {seed} ",
    )
    return Run(model, "adam", budget_sweep.train_run(config, resume=True), seed)


def tail(
    sweep: budget_sweep.Sweep, model: str, seed: int, after: int, epochs: int
) -> Run:
    """CG on the full batch from the end of Adam's epoch ``after`` (0-based),
    to ``epochs`` epochs in all; its rows start with Adam's."""
    config = sweep.config(
        model,
        seed,
        "two-phase-fixed",
        epochs,
        out=str(sweep.run_dir(model, seed, f"swap{after}")),
        swap_epoch=after + 1,
        prefix_run=str(sweep.run_dir(model, seed, "adam")),
        prefix_epoch=after,
        label=f"{model} seed {seed} swap after {after} ",
    )
    return Run(
        model, "two-phase-fixed", budget_sweep.train_run(config, resume=True), seed
    )


def cosine_run(sweep, baselines: pathlib.Path | None, model, seed, budget) -> Run:
    """Cosine-decayed Adam at ``budget``: read from ``baselines`` (an earlier
    sweep's directory) where it finished there, else trained."""
    if baselines is not None:
        source = budget_sweep.Sweep(
            models=[model], seeds={}, budgets=[budget], out=baselines
        ).run_dir(model, seed, "adam-cosine", budget)
        rows = run_records.read_metrics(source / "metrics.jsonl")
        if len(rows) >= budget:
            return Run(model, "adam-cosine", rows[:budget], seed)
    out = sweep.run_dir(model, seed, "adam-cosine", budget)
    config = sweep.config(model, seed, "adam-cosine", budget, out=str(out))
    return Run(model, "adam-cosine", budget_sweep.train_run(config, resume=True), seed)


# -- the rules, replayed on an Adam run's rows -----------------------------
@dataclasses.dataclass
class Swap:
    """Where a rule swaps: after Adam's epoch ``after`` (0-based; ``None``:
    never), and the probes it paid for that did not lead to the swap, as
    (epoch after which it ran, forward passes, seconds)."""

    after: int | None
    probes: list[tuple[int, float, float]] = dataclasses.field(default_factory=list)
    # Whether the rule stops before a budget's last fifth (tpo.swap.within).
    cut: bool = False

    def within(self, budget: int) -> bool:
        """Whether it swaps within ``budget`` epochs."""
        last = min(budget - 1, tpo.swap.last_swap_epoch(budget) if self.cut else budget)
        return self.after is not None and self.after < last


def replayed(rule: tpo.swap.SwapRule, cut: bool = False):
    """A ``tpo.swap`` rule, replayed on the Adam run's rows (no probes);
    ``cut``: with no swap in a budget's last fifth, as
    ``tpo.swap.default(..., epochs=budget)``."""
    return lambda rows, probe: Swap(
        tpo.swap.replay(rule, **run_records.records(rule, rows)), cut=cut
    )


def log(loss: float) -> float:
    """The log of a loss; -inf for exactly 0 (cross-entropy underflows to 0
    in float32), so a fall to 0 is infinite and a stay at 0 no fall (nan)."""
    return math.log(loss) if loss > 0 else -math.inf


def adam_rate(rows, epoch: int, window: int) -> float:
    """Adam's fall of the log batch loss per forward pass over ``window`` epochs."""
    start = max(0, epoch - window)
    fall = log(rows[start]["batch_loss"]) - log(rows[epoch]["batch_loss"])
    return fall / (rows[epoch]["forward_passes"] - rows[start]["forward_passes"])


def probe_rule(every: int = 5, steps: int = 3, window: int = 5, arm: str = "plateau"):
    """The payoff probe: from the epochs where ``arm`` holds (``"plateau"``,
    ``"peak"``: from the peak on, ``"start"``: always), at most every
    ``every`` epochs and not before ``window``, run
    ``steps`` CG epochs on the full batch; swap there if CG's fall of the log
    loss per forward pass beats Adam's over its last ``window`` epochs."""

    def rule(rows, probe):
        if arm == "start":
            armed = [True] * len(rows)
        else:
            trigger = tpo.swap.plateau() if arm == "plateau" else tpo.swap.peak()
            armed = tpo.swap.holds(trigger, **run_records.records(trigger, rows))
            if arm == "peak":  # From the peak on.
                armed = [any(armed[: i + 1]) for i in range(len(rows))]
        probes, last = [], -every
        for epoch, ready in enumerate(armed):
            if not ready or epoch - last < every or epoch < window:
                continue
            last = epoch
            cg = probe(epoch, steps)
            if cg is None:  # The probe would run past the budget.
                break
            end, start = cg[-1], cg[epoch]
            fall = log(start["train_loss"]) - log(end["train_loss"])
            cost = end["forward_passes"] - start["forward_passes"]
            if cost > 0 and fall / cost > adam_rate(rows, epoch, window):
                return Swap(epoch, probes)
            probes.append((epoch, cost, end["wall_time"] - start["wall_time"]))
        return Swap(None, probes)

    return rule


PEAK_THEN_PLATEAU = tpo.swap.after(tpo.swap.peak(), tpo.swap.plateau())
FIT_OR_PLATEAU = "fit 10, or plateau"
DEFAULT = "fit 10, or plateau, not in the last fifth (the default)"
# Studies recorded before the default stopped short of a budget's last fifth.
FORMER_NAMES = {"fit 10, or plateau (the default)": FIT_OR_PLATEAU}
RULES = {
    "peak (the former default)": replayed(tpo.swap.peak()),
    "paper": replayed(tpo.swap.PAPER),
    "plateau": replayed(tpo.swap.plateau()),
    "plateau, patience 10": replayed(tpo.swap.plateau(patience=10)),
    "peak, then plateau": replayed(PEAK_THEN_PLATEAU),
    "peak, then plateau 10": replayed(
        tpo.swap.after(tpo.swap.peak(), tpo.swap.plateau(patience=10))
    ),
    "fit": replayed(tpo.swap.fitted(patience=1)),
    "fit, or peak then plateau": replayed(
        tpo.swap.any_of(tpo.swap.fitted(patience=1), PEAK_THEN_PLATEAU)
    ),
    "fit 5, or peak then plateau": replayed(
        tpo.swap.any_of(tpo.swap.fitted(patience=5), PEAK_THEN_PLATEAU)
    ),
    "fit 10, or peak then plateau": replayed(
        tpo.swap.any_of(tpo.swap.fitted(patience=10), PEAK_THEN_PLATEAU)
    ),
    FIT_OR_PLATEAU: replayed(tpo.swap.default(steps_per_epoch=1)),
    "probe on plateau": probe_rule(),
    DEFAULT: replayed(tpo.swap.default(steps_per_epoch=1), cut=True),
}


def handback_epoch(rows, after: int, window: int = 5) -> int | None:
    """The payoff test the other way, replayed on a tail: the first CG epoch
    whose fall of the log training loss per forward pass over its last
    ``window`` epochs is below Adam's over its last ``window`` epochs before
    the swap (the epoch a hand-back to Adam would come), or ``None``."""
    adam = adam_rate(rows, after, window)
    for epoch in range(after + window, len(rows)):
        start, end = rows[epoch - window], rows[epoch]
        fall = log(start["train_loss"]) - log(end["train_loss"])
        cost = end["forward_passes"] - start["forward_passes"]
        # Epochs that cost nothing (a gradient of exactly 0) have no rate.
        if cost > 0 and fall / cost < adam:
            return epoch
    return None


# -- the cells --------------------------------------------------------------
def with_probes(rows, probes, budget):
    """``rows`` with the compute and time of the probes run before them added."""
    rows = [dict(r) for r in rows[:budget]]
    for epoch, cost, seconds in probes:
        if epoch + 1 >= budget:
            continue
        for r in rows:
            if r["epoch"] > epoch:
                r["forward_passes"] += cost
                r["wall_time"] += seconds
    return rows


def at_equal_compute(
    run: Run, baseline: Run, key: str = "train_loss"
) -> tuple[float, float]:
    """``run``'s and ``baseline``'s row ``key`` (the training loss, or
    ``"val_acc"``) at equal compute."""
    pair = analysis.at_equal([baseline], run, "forward_passes", baseline.optimizer)
    if pair is None:
        worst = math.inf if key.endswith("loss") else -math.inf
        return worst, baseline.rows[0][key]
    return pair[0][key], pair[1][key]


def grid_points(budget: int, count: int) -> list[int]:
    """``count`` swap points spread evenly over ``budget`` epochs, as the last
    Adam epoch (0-based): after ``budget * k / (count + 1)`` epochs of Adam,
    rounded, for ``k = 1 .. count``."""
    return sorted(
        {max(0, round(budget * k / (count + 1)) - 1) for k in range(1, count + 1)}
    )


def study_model(sweep, baselines, model: str, seed: int, rules: dict, grid: int = 0):
    """Every rule on one model and seed at every budget: one entry per cell
    and rule, and the landscape: per budget and swap epoch tried, the final
    training loss at equal compute. ``grid`` adds that many swap epochs per
    budget to the best swap in hindsight (:func:`grid_points`)."""
    adam = train_adam(sweep, model, seed)
    longest = max(sweep.budgets)
    tails: dict[int, Run] = {}

    def get_tail(after: int, epochs: int) -> Run:
        made = tails.get(after)
        if made is None or len(made.rows) < epochs:
            tails[after] = tail(sweep, model, seed, after, epochs)
        return tails[after]

    def full_tail(after: int, budget: int = longest) -> Run:
        """The tail to ``budget`` epochs or to Adam's compute there."""
        target = adam.rows[budget - 1]["forward_passes"]
        epochs = min(
            budget,
            after + 1 + math.ceil((target - adam.rows[after]["forward_passes"]) / 5),
        )
        run = get_tail(after, epochs)
        while run.last["forward_passes"] < target and len(run.rows) < budget:
            more = math.ceil((target - run.last["forward_passes"]) / 3) + 1
            run = get_tail(after, min(budget, len(run.rows) + more))
        return run

    def probe(after: int, steps: int):
        if after + 1 + steps > longest:
            return None
        return get_tail(after, after + 1 + steps).rows

    swaps = {name: rule(adam.rows, probe) for name, rule in rules.items()}
    splits = {budget_sweep.split_epoch(b) - 1 for b in sweep.budgets}
    points = splits | {s.after for s in swaps.values() if s.after is not None}
    for after in sorted(points):
        if after + 1 < longest:
            full_tail(after)
    # The hindsight grid: per budget, ``grid`` more swap epochs spread evenly
    # over it, each tail run to that budget (a tail to a shorter budget does
    # not count at a longer one).
    reaches = {after: longest for after in points}
    for budget in sorted(sweep.budgets, reverse=True):
        for after in grid_points(budget, grid):
            if after not in reaches:
                full_tail(after, budget)
                reaches[after] = budget
    entries, landscape = [], []
    for budget in sweep.budgets:
        adam_b = Run(model, "adam", adam.rows[:budget], seed)
        cosine = cosine_run(sweep, baselines, model, seed, budget)
        hindsight = {
            after + 1: at_equal_compute(
                Run(model, "tail", tails[after].rows[:budget], seed), adam_b
            )[0]
            for after in sorted(reaches)
            if after + 1 < budget and reaches[after] >= budget
        }
        best = min(hindsight.values()) if hindsight else math.nan
        landscape += [
            {
                "model": model,
                "seed": seed,
                "budget": budget,
                "swap_epoch": epoch,
                "loss": loss,
                "adam_loss": adam_b.last["train_loss"],
                "cosine_loss": at_equal_compute(adam_b, cosine)[1],
            }
            for epoch, loss in hindsight.items()
        ]
        for name, swap in swaps.items():
            swapped = swap.within(budget)
            rows = tails[swap.after].rows if swapped else adam.rows
            run = Run(model, name, with_probes(rows, swap.probes, budget), seed)
            ours, theirs = at_equal_compute(run, adam_b)
            ours_c, theirs_c = at_equal_compute(run, cosine)
            handback = None
            if swapped:
                handback = handback_epoch(run.rows, swap.after)
            entries.append(
                {
                    "model": model,
                    "seed": seed,
                    "budget": budget,
                    "rule": name,
                    "swap_epoch": swap.after + 1 if swapped else None,
                    "adam_loss_at_swap": adam.rows[swap.after]["train_loss"]
                    if swapped
                    else None,
                    "probes": sum(p[0] + 1 < budget for p in swap.probes),
                    "loss": ours,
                    "adam_loss": theirs,
                    "cosine_loss": theirs_c,
                    "vs_adam": report.ratio(ours, theirs),
                    "vs_better_adam": max(
                        report.ratio(ours, theirs), report.ratio(ours_c, theirs_c)
                    ),
                    "best_split_epoch": min(hindsight, key=hindsight.get)
                    if hindsight
                    else None,
                    "best_split_loss": best,
                    "vs_hindsight": report.ratio(ours, best) if hindsight else math.nan,
                    # Where a hand-back to Adam would come, and how far CG's
                    # loss fell after it by the end of the budget.
                    "handback_epoch": handback,
                    "cg_fall_after_handback": report.ratio(
                        run.rows[handback]["train_loss"], run.last["train_loss"]
                    )
                    if handback is not None
                    else None,
                    # Validation accuracy at equal compute, and Adam's there.
                    **dict(
                        zip(
                            ("val_acc", "adam_val_acc"),
                            at_equal_compute(run, adam_b, "val_acc"),
                            strict=True,
                        )
                    ),
                    "compute": run.last["forward_passes"],
                    "adam_compute": adam_b.last["forward_passes"],
                }
            )
    return entries, landscape


# -- the record ---------------------------------------------------------------
def crossover_budget(table_json: pathlib.Path, model: str) -> int | None:
    """The sweep's crossover budget of the fixed split for ``model``."""
    if not table_json.exists():
        return None
    return (
        json.loads(table_json.read_text())["crossover"]
        .get(model, {})
        .get("two-phase-fixed")
    )


def judge(entries, crossovers: dict[str, int | None]) -> dict[str, dict[str, Any]]:
    """Per rule, the issue's three targets over the cells."""
    verdicts = {}
    for rule in dict.fromkeys(e["rule"] for e in entries):
        cells = [e for e in entries if e["rule"] == rule]
        swapped = [e for e in cells if e["swap_epoch"] is not None]
        # Probes that lost cost compute even without a swap.
        paid = [e for e in cells if e["swap_epoch"] is not None or e["probes"]]
        worse = [e for e in paid if e["vs_adam"] > 1.1]
        past = [
            e
            for e in cells
            if crossovers.get(e["model"]) is not None
            and e["budget"] >= crossovers[e["model"]]
        ]
        behind = [e for e in past if not e["vs_better_adam"] < 1]
        judged = [e for e in cells if not math.isnan(e["vs_hindsight"])]
        near = [e for e in judged if e["vs_hindsight"] <= 10]
        verdicts[rule] = {
            "cells": len(cells),
            "swapped": len(swapped),
            "worse_than_adam": [report.cell_name(e) for e in worse],
            "past_crossover": len(past),
            "behind_past_crossover": [report.cell_name(e) for e in behind],
            "within_decade": len(near),
            "judged_against_hindsight": len(judged),
            "share_within_decade": len(near) / len(judged) if judged else math.nan,
            "regret_geomean": analysis.geometric_mean(
                [e["vs_hindsight"] for e in judged]
            ),
            "vs_better_adam_geomean": analysis.geometric_mean(
                [e["vs_better_adam"] for e in cells]
            ),
            # Ratios of exactly 0 (float32 underflow) are left out of the means.
            "vs_better_adam_underflow": analysis.excluded(
                [e["vs_better_adam"] for e in cells]
            ).get(analysis.UNDERFLOW, 0),
        }
    return verdicts


DERIVED = (
    f"The cells of {DEFAULT!r} are derived from those of {FIT_OR_PLATEAU!r}, "
    "which it stops before a budget's last fifth: the same swap before it, "
    "else the cell left to Adam (Adam's run, constant and cosine Adam at its "
    "compute); no run was needed."
)


def cut_cells(cells: list[dict], landscape: list[dict]) -> list[dict]:
    """The default's cells from those of the rule it limits (:data:`DERIVED`)."""
    at_end = {(e["model"], e["seed"], e["budget"]): e for e in landscape}
    derived = []
    for e in (e for e in cells if e["rule"] == FIT_OR_PLATEAU):
        budget, swap = e["budget"], e["swap_epoch"]
        if swap is not None and swap > tpo.swap.last_swap_epoch(budget):
            if e["compute"] < e["adam_compute"]:
                raise ValueError(f"{report.cell_name(e)}: Adam read before its end")
            adam = at_end[e["model"], e["seed"], budget]
            e = dict(
                e,
                **dict.fromkeys(("swap_epoch", "adam_loss_at_swap", "handback_epoch")),
                cg_fall_after_handback=None,
                probes=0,
                loss=adam["adam_loss"],
                adam_loss=adam["adam_loss"],
                cosine_loss=adam["cosine_loss"],
                vs_adam=1.0,
                vs_better_adam=max(
                    1.0, report.ratio(adam["adam_loss"], adam["cosine_loss"])
                ),
                vs_hindsight=report.ratio(adam["adam_loss"], e["best_split_loss"]),
                val_acc=e.get("adam_val_acc"),
                compute=e["adam_compute"],
            )
        derived.append(dict(e, rule=DEFAULT))
    return derived


def rejudge(folder: pathlib.Path, baselines: pathlib.Path | None, command: str):
    """``--rejudge``: a recorded study's verdicts and tables again from its
    cells (``table.json``, ``landscape.json``), under this version's rules
    (the default's cells derived where the study predates it, :func:`cut_cells`);
    the old header (its command, provenance and note) is kept."""
    made = json.loads((folder / "table.json").read_text())
    landscape = json.loads((folder / "landscape.json").read_text())
    old = (folder / "table.md").read_text().splitlines()
    end = next(k for k, line in enumerate(old) if line.startswith("Per rule over"))
    note = "\n".join(line for line in old[1:end] if "--rejudge" not in line).strip()
    for e in made["cells"]:
        e["rule"] = FORMER_NAMES.get(e["rule"], e["rule"])
    if not any(e["rule"] == DEFAULT for e in made["cells"]):
        made["cells"] += cut_cells(made["cells"], landscape)
        note = f"{note}\n\n{DERIVED}".strip()
    models_ = list(dict.fromkeys(e["model"] for e in made["cells"]))
    crossovers = {}
    if baselines is not None:
        crossovers = {m: crossover_budget(baselines / "table.json", m) for m in models_}
    verdicts = judge(made["cells"], crossovers)
    title = old[0].removeprefix("# ")
    report.record(made["cells"], landscape, verdicts, folder, title, command, note)
    return verdicts


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--loss", default=models.DEFAULT_LOSS)
    parser.add_argument("--models", nargs="+", default=["vit-mlp", "vgg5"])
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--seeds-for", nargs="*", default=[], metavar="MODEL=N")
    parser.add_argument(
        "--first-seed",
        type=cli.integer(0),
        default=0,
        help="the first seed: seeds FIRST to FIRST+N-1 (for cells never used to "
        "choose a rule)",
    )
    parser.add_argument("--budgets", type=int, nargs="+", default=[20, 50, 150])
    parser.add_argument(
        "--grid",
        type=cli.integer(0),
        default=0,
        metavar="N",
        help="per budget, N more swap epochs spread evenly over it for the best "
        "swap in hindsight (the sweep's splits and the rules' swaps are always in)",
    )
    parser.add_argument("--rules", nargs="+", choices=list(RULES), default=None)
    parser.add_argument("--out", type=pathlib.Path)
    parser.add_argument(
        "--baselines",
        type=pathlib.Path,
        help="an earlier sweep's directory to read cosine Adam's runs from",
    )
    parser.add_argument("--record", type=pathlib.Path, help="table.md's folder")
    parser.add_argument("--note", type=pathlib.Path, help="text under the title")
    parser.add_argument(
        "--rejudge",
        type=pathlib.Path,
        default=None,
        metavar="DIR",
        help="train nothing: judge a recorded study (--record DIR) again from "
        "its cells, with --baselines the sweep's copy whose crossovers it uses",
    )
    args = parser.parse_args(argv)
    command = "python -m experiments.benchmarks.swap_rules " + shlex.join(
        argv if argv is not None else sys.argv[1:]
    )
    if args.rejudge is not None:
        for rule, v in rejudge(args.rejudge, args.baselines, command).items():
            print(rule, json.dumps(v))
        return
    out = args.out or pathlib.Path("runs/rules") / args.dataset
    first = args.first_seed
    seeds = {m: list(range(first, first + args.seeds)) for m in args.models}
    for item in args.seeds_for:
        model, n = item.split("=")
        seeds[model] = list(range(first, first + int(n)))
    sweep = budget_sweep.Sweep(
        models=args.models,
        seeds=seeds,
        budgets=args.budgets,
        dataset=args.dataset,
        loss=args.loss,
        out=out,
        progress=False,
    )
    rules = {name: RULES[name] for name in (args.rules or RULES)}
    entries, landscape = [], []
    for model in args.models:
        for seed in seeds[model]:
            found, points = study_model(
                sweep, args.baselines, model, seed, rules, args.grid
            )
            entries += found
            landscape += points
            print(f"{model} seed {seed}: done", flush=True)
    crossovers = {}
    if args.baselines is not None:
        crossovers = {
            m: crossover_budget(args.baselines / "table.json", m) for m in args.models
        }
    verdicts = judge(entries, crossovers)
    note = args.note.read_text().strip() if args.note else ""
    record_dir = args.record or out
    # What made the runs, from their own records, first under the command.
    run_dirs = sorted(
        path.parent
        for model in args.models
        for seed in seeds[model]
        for path in (out / "runs" / model / f"seed{seed}").glob("**/provenance.json")
    )
    made_by = provenance.write_summary(record_dir, run_dirs)
    note = f"{made_by}\n\n{note}".strip()
    title = f"Swap rules on {args.dataset}, {args.loss}"
    report.record(entries, landscape, verdicts, record_dir, title, command, note)
    for rule, v in verdicts.items():
        print(rule, json.dumps(v))


if __name__ == "__main__":
    main()
