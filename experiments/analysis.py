"""What the runs say: pure analysis of their metrics rows.

A :class:`Run` is one training run's per-epoch rows; a :class:`Cell` one model
and variant over its seeds. Everything here reads rows and returns numbers:
the baseline run of the same model and seed, the rows at equal epochs, compute
or time, per-cell verdicts, loss ratios to the better Adam baseline, the
crossover budget. No training, no files, no plots: the tables
(:mod:`experiments.tables`), the Table 1 study (:mod:`experiments.compare`)
and the budget sweep (:mod:`experiments.sweep`) build on it.

Example:
  >>> from experiments import analysis
  >>> rows = lambda losses: [
  ...     {"epoch": e, "forward_passes": 3.0 * (e + 1), "train_loss": v, "phase": 0}
  ...     for e, v in enumerate(losses)]
  >>> adam = analysis.Run("vgg5", "adam", rows([1.0, 0.5, 0.25]))
  >>> cg = analysis.Run("vgg5", "two-phase-fixed", rows([1.0, 0.1]))
  >>> ours, theirs = analysis.at_equal([adam, cg], cg, "forward_passes")
  >>> ours["train_loss"], theirs["train_loss"]  # both at 6 forward passes
  (0.1, 0.5)
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from experiments import variants


@dataclasses.dataclass
class Run:
    model: str
    optimizer: str
    rows: list[dict[str, Any]]
    seed: int = 0

    @property
    def last(self) -> dict[str, Any]:
        return self.rows[-1]

    @property
    def swap_epoch(self) -> int | None:
        return next((r["epoch"] for r in self.rows if r["phase"] == 1), None)


def baseline_run(
    runs: list[Run], run: Run, baseline: str = variants.ADAM.name
) -> Run | None:
    """The ``baseline`` run (Adam's, say) of the same model and seed."""
    return next(
        (
            r
            for r in runs
            if r.model == run.model and r.optimizer == baseline and r.seed == run.seed
        ),
        None,
    )


def at_equal(
    runs: list[Run], run: Run, key: str, baseline: str = variants.ADAM.name
) -> tuple[dict, dict] | None:
    """``run``'s and Adam's last rows within the smaller of their totals of ``key``.

    ``key`` is ``"epoch"``, ``"forward_passes"`` (compute) or ``"wall_time"``;
    Adam's run is the one of the same model and seed, or the ``baseline``
    optimizer's (``"adam-cosine"``).
    """
    adam = baseline_run(runs, run, baseline)
    if adam is None:
        raise ValueError(f"No {baseline} run for {run.model} seed {run.seed}.")
    budget = min(run.last[key], adam.last[key])
    pick = lambda rows: [r for r in rows if r[key] <= budget + 1e-9]  # noqa: E731
    ours, theirs = pick(run.rows), pick(adam.rows)
    return (ours[-1], theirs[-1]) if ours and theirs else None


COMPARISONS = (
    ("epoch", "epochs"),
    ("forward_passes", "compute"),
    ("wall_time", "time"),
)


# A run that never swapped is Adam's run, recompiled: XLA fuses Adam's
# arithmetic differently inside two_phase's lax.cond, and the last-bit
# differences grow over the epochs. Its verdict compares that noise.
NO_SWAP = "no swap: Adam's run up to rounding"


@dataclasses.dataclass
class Cell:
    """One model and optimizer over its seeds."""

    model: str
    optimizer: str
    runs: list[Run]

    def values(self, key: str) -> list[float]:
        return [r.last[key] for r in self.runs]

    def summary(self, key: str, fmt: str) -> str:
        """Mean over the seeds, and half the range where there are several."""
        v = np.asarray(self.values(key), float)
        if len(v) == 1:
            return format(v[0], fmt)
        return f"{format(v.mean(), fmt)} ± {format((v.max() - v.min()) / 2, '.1g')}"

    def best_val_acc(self) -> str:
        """The best validation accuracy along each run: the mean over the
        seeds (and half their range)."""
        best = np.asarray([max(r["val_acc"] for r in run.rows) for run in self.runs])
        if len(best) == 1:
            return f"{best[0]:.3f}"
        return f"{best.mean():.3f} ± {(best.max() - best.min()) / 2:.1g}"

    def swap_epochs(self) -> str:
        epochs = [r.swap_epoch for r in self.runs]
        return ", ".join("-" if e is None else str(e) for e in epochs)


def cells(runs: list[Run]) -> list[Cell]:
    keys = list(dict.fromkeys((r.model, r.optimizer) for r in runs))
    return [
        Cell(m, o, [r for r in runs if (r.model, r.optimizer) == (m, o)])
        for m, o in keys
    ]


def cell_verdicts(
    runs: list[Run], cell: Cell, baseline: str = variants.ADAM.name
) -> dict[str, dict[str, Any]]:
    """Per budget: in how many seeds the optimizer's training loss is below
    Adam's (or ``baseline``'s; and equal to it), both mean losses at that
    budget, and both mean validation accuracies there."""
    out = {}
    for key, name in COMPARISONS:
        pairs = [(run, at_equal(runs, run, key, baseline)) for run in cell.runs]
        known = [p for run, p in pairs if p is not None]
        # A verdict needs a second-phase epoch inside the compared budget.
        judged = [
            p for run, p in pairs if p is not None and second_phase_within(p[0], run)
        ]
        losses = [(p[0]["train_loss"], p[1]["train_loss"]) for p in judged]

        def average(values):
            return float(np.mean(values)) if values else None

        def mean(values):
            # Exact zeros (float32 underflow) are counted, not averaged.
            values = [v for v in values if v != 0]
            return float(np.mean(values)) if values else None

        out[name] = {
            "wins": sum(ours < adam for ours, adam in losses),
            "ties": sum(ours == adam for ours, adam in losses),
            "seeds": len(pairs),
            "no_second_phase": len(known) - len(judged),
            "underflow": sum(o == 0 for o, _ in losses),
            "per_seed": [[o, a] for o, a in losses],
            "loss": mean([o for o, _ in losses]),
            "adam_loss": mean([a for _, a in losses]),
            "val_acc": average([p[0]["val_acc"] for p in judged]),
            "adam_val_acc": average([p[1]["val_acc"] for p in judged]),
        }
    return out


def seeds_text(runs: list[Run]) -> str:
    """The seeds of the runs, per model where the models differ in them:
    ``"seeds 0, 1"`` or ``"seeds 0, 1, 2 for vit-mlp, vgg5; seed 0 for vit-nomlp"``."""
    by_model: dict[str, set[int]] = {}
    for run in runs:
        by_model.setdefault(run.model, set()).add(run.seed)
    groups: dict[tuple[int, ...], list[str]] = {}
    for model, seeds in by_model.items():
        groups.setdefault(tuple(sorted(seeds)), []).append(model)

    def seed_list(seeds: tuple[int, ...]) -> str:
        return ("seeds " if len(seeds) > 1 else "seed ") + ", ".join(map(str, seeds))

    if len(groups) == 1:
        return seed_list(next(iter(groups)))
    ordered = sorted(groups.items(), key=lambda g: -len(g[0]))
    return "; ".join(f"{seed_list(s)} for {', '.join(m)}" for s, m in ordered)


def cell_entry(cell: Cell) -> dict[str, Any]:
    """The cell's numbers for ``table.json``: the last row's, per seed."""
    return {
        "model": cell.model,
        "optimizer": cell.optimizer,
        "params": cell.runs[0].last["num_params"],
        "seeds": [r.seed for r in cell.runs],
        "swap_epochs": [r.swap_epoch for r in cell.runs],
        "swapped": sum(r.swap_epoch is not None for r in cell.runs),
        "best_val_acc": [max(row["val_acc"] for row in r.rows) for r in cell.runs],
        **{
            key: cell.values(key)
            for key in (
                "train_loss",
                "train_acc",
                "val_loss",
                "val_acc",
                "forward_passes",
                "wall_time",
                "compile_time",
            )
        },
    }


# Why a two-phase run's ratio to Adam is not a number (see loss_ratio).
NO_SECOND_PHASE = "no second-phase epoch within Adam's compute"
UNDERFLOW = "underflow"


def second_phase_within(ours: dict[str, Any], run: Run) -> bool:
    """Whether ``run``'s row ``ours`` lies after its swap: a verdict needs at
    least one second-phase epoch inside the compared compute (Adam's rows
    read against Adam's own are no verdict on the second phase)."""
    return run.swap_epoch is None or ours["epoch"] >= run.swap_epoch


def loss_ratio(runs: list[Run], run: Run, key: str = "forward_passes") -> float | str:
    """``run``'s training loss over the better Adam baseline's at equal ``key``
    (the lower of the two ratios' denominators; > 1: a baseline is ahead).

    Not a number where there is none to give: :data:`NO_SECOND_PHASE` when
    no second-phase epoch of ``run`` lies within the compared compute,
    :data:`UNDERFLOW` when a loss compared is exactly 0 (float32 underflow);
    ``inf`` when ``run``'s first epoch outlasts a baseline's whole run.
    """
    ratios = []
    for baseline in variants.BASELINES:
        pair = at_equal(runs, run, key, baseline)
        if pair is None:  # Its first epoch outlasts the baseline's run.
            return float("inf")
        ours, theirs = pair
        if not second_phase_within(ours, run):
            return NO_SECOND_PHASE
        if ours["train_loss"] == 0 or theirs["train_loss"] == 0:
            return UNDERFLOW
        ratios.append(ours["train_loss"] / theirs["train_loss"])
    return max(ratios)


def wins_both(runs: list[Run], run: Run, key: str = "forward_passes") -> bool | None:
    """Whether ``run``'s training loss is below both Adam baselines' at equal
    ``key`` (exact zeros compare as numbers: 0 beats a positive loss); None
    without a second-phase epoch in the compared compute."""
    found = outcome(runs, run, key)
    return None if found is None else found == "win"


def outcome(runs: list[Run], run: Run, key: str = "forward_passes") -> str | None:
    """``"win"`` (below both Adam baselines at equal ``key``), ``"tie"`` (equal
    to the lower of the two: both 0 after float32 underflow, say) or
    ``"loss"``; None without a second-phase epoch in the compared compute."""
    pairs = [at_equal(runs, run, key, b) for b in variants.BASELINES]
    if any(p is None for p in pairs):
        return "loss"
    if not second_phase_within(pairs[0][0], run):
        return None
    ours = pairs[0][0]["train_loss"]
    better = min(theirs["train_loss"] for _, theirs in pairs)
    return "win" if ours < better else "tie" if ours == better else "loss"


def has_baselines(runs: list[Run], run: Run) -> bool:
    """Whether both Adam baselines of ``run``'s model and seed are in ``runs``."""
    return all(baseline_run(runs, run, b) is not None for b in variants.BASELINES)


def summary(by_budget: dict[int, list[Run]]) -> list[dict[str, Any]]:
    """Per model, variant and budget: the loss ratios at equal compute, wins
    against both baselines, and Adam's training loss at the swap."""
    entries = []
    for budget, runs in by_budget.items():
        for run in runs:
            if run.optimizer not in variants.TWO_PHASE_SWEEP or not has_baselines(
                runs, run
            ):
                continue
            adam = baseline_run(runs, run)
            swap = run.swap_epoch
            entries.append(
                {
                    "model": run.model,
                    "variant": run.optimizer,
                    "budget": budget,
                    "seed": run.seed,
                    "swap_epoch": swap,
                    "adam_loss_at_swap": adam.rows[swap - 1]["train_loss"]
                    if swap
                    else None,
                    # A number, or why not (NO_SECOND_PHASE, UNDERFLOW).
                    "ratio": loss_ratio(runs, run),
                    "wins": wins_both(runs, run),  # None: no verdict.
                }
            )
    return entries


def validation_tally(by_budget: dict[int, list[Run]]) -> dict[str, dict[str, Any]]:
    """Does the second phase improve validation accuracy? Per two-phase
    variant, over every (budget, model, seed) run that swapped, split by
    whether its training loss beat both baselines at equal compute: how
    often its validation accuracy there was higher, equal or lower than
    Adam's (runs with no second-phase epoch in that compute are left out),
    and the seeds it rests on."""
    out: dict[str, dict[str, Any]] = {}
    for _, runs in sorted(by_budget.items()):
        for run in runs:
            if run.optimizer not in variants.TWO_PHASE_SWEEP or run.swap_epoch is None:
                continue
            if not has_baselines(runs, run):
                continue
            pair = at_equal(runs, run, "forward_passes")
            if pair is None or not second_phase_within(pair[0], run):
                continue
            ours, adam = pair[0]["val_acc"], pair[1]["val_acc"]
            outcome = "higher" if ours > adam else "lower" if ours < adam else "equal"
            won = "won" if wins_both(runs, run) else "lost"
            tally = out.setdefault(run.optimizer, {}).setdefault(
                won, {"higher": 0, "equal": 0, "lower": 0, "seeds": set()}
            )
            tally[outcome] += 1
            tally["seeds"].add(run.seed)
    for by_outcome in out.values():
        for tally in by_outcome.values():
            tally["seeds"] = sorted(tally["seeds"])
    return out


def crossover(entries: list[dict[str, Any]], model: str, variant: str):
    """The smallest budget at which ``variant`` beats both Adam baselines at
    equal compute in most seeds, or ``None``."""
    budgets = sorted({e["budget"] for e in entries})
    for budget in budgets:
        cell = [
            e
            for e in entries
            if (e["model"], e["variant"], e["budget"]) == (model, variant, budget)
        ]
        if cell and 2 * sum(e["wins"] is True for e in cell) > len(cell):
            return budget
    return None


def numeric(values) -> list[float]:
    """The values that are positive numbers: exact zeros (float32 underflow)
    and the reasons a ratio has none (:data:`NO_SECOND_PHASE`) left out."""
    return [
        float(v)
        for v in values
        if isinstance(v, (int, float, np.floating))
        and not isinstance(v, bool)
        and v > 0
    ]


def geometric_mean(values) -> float:
    """The geometric mean of the positive numbers among ``values`` (NaN if
    none): exact zeros and non-numbers are left out, not counted as 0;
    :func:`ratio_counts` says how many."""
    kept = numeric(values)
    if not kept:
        return float("nan")
    return float(np.exp(np.mean(np.log(kept))))


def excluded(values) -> dict[str, int]:
    """How many of ``values`` :func:`geometric_mean` left out, by reason."""
    out = {UNDERFLOW: 0, NO_SECOND_PHASE: 0}
    for v in values:
        if isinstance(v, str):
            out[v] = out.get(v, 0) + 1
        elif v == 0:
            out[UNDERFLOW] += 1
    return {k: n for k, n in out.items() if n}


CENTRED_WIDTH = 5  # epochs in the centred moving average of the readings


def centred_average(readings: np.ndarray, width: int = CENTRED_WIDTH) -> np.ndarray:
    """Centred moving average; near the ends it averages the readings there are.

    Example:
      >>> centred_average(np.array([1.0, 2.0, 3.0, 4.0, 5.0]), 3).tolist()
      [1.5, 2.0, 3.0, 4.0, 4.5]
    """
    half = width // 2
    sums = np.concatenate([[0.0], np.cumsum(readings)])
    index = np.arange(len(readings))
    lo, hi = np.maximum(index - half, 0), np.minimum(index + half + 1, len(readings))
    return (sums[hi] - sums[lo]) / (hi - lo)
