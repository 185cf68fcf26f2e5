"""Text for the tables: result rows, verdict cells and lines.

Formats what :mod:`experiments.analysis` computes, for the Table 1 study's
``table.md`` (:mod:`experiments.compare`) and the budget sweep's
(:mod:`experiments.sweep`).
"""

from __future__ import annotations

from typing import Any

from experiments import analysis
from experiments import variants


def verdict(runs: list[analysis.Run], run: analysis.Run) -> str:
    """One line: who has the lower training loss at equal epochs, compute, time."""
    parts = []
    for key, name in analysis.COMPARISONS:
        pair = analysis.at_equal(runs, run, key)
        if pair is None:  # Its first epoch outlasts Adam's whole run.
            parts.append(
                f"equal {name}: Adam ({run.optimizer}'s first epoch exceeds it)"
            )
            continue
        ours, adam = pair
        if ours["train_loss"] == adam["train_loss"]:
            winner = "tie"
        else:
            winner = (
                run.optimizer if ours["train_loss"] < adam["train_loss"] else "Adam"
            )
        parts.append(
            f"equal {name}: {winner} ({ours['train_loss']:.3g} vs "
            f"{adam['train_loss']:.3g})"
        )
    seed = f" (seed {run.seed})" if run.seed else ""
    line = (
        f"{run.model}, {variants.get(run.optimizer).label} against Adam{seed}: "
        + "; ".join(parts)
    )
    if run.swap_epoch is None:
        line += f"; {analysis.NO_SWAP}"
    return line


def verdict_cell(
    v: dict[str, Any],
    optimizer: str,
    swapped: int,
    baseline: str = "Adam",
    accuracy: bool = False,
) -> str:
    """``swapped``: how many of the cell's runs left Adam; ``accuracy``: add
    both validation accuracies."""
    prefix = "no swap: " if swapped == 0 else ""
    skipped = v.get("no_second_phase", 0)
    if skipped and skipped == v["seeds"]:
        return f"{prefix}none ({analysis.NO_SECOND_PHASE})"
    underflow = v.get("underflow", 0)
    if v["loss"] is None and not underflow:
        return f"{prefix}{baseline} (no epoch of {optimizer} fits)"
    losses = v["seeds"] - v["wins"] - v["ties"] - skipped
    if v["ties"] == v["seeds"]:
        who = "tie"
    elif v["wins"] > losses:
        who = optimizer
    elif v["wins"] < losses:
        who = baseline
    else:
        who = "split"
    acc = f"; val acc {v['val_acc']:.3f} vs {v['adam_val_acc']:.3f}" if accuracy else ""
    ours = "0 (underflow)" if v["loss"] is None else f"{v['loss']:.3g}"
    theirs = "0 (underflow)" if v["adam_loss"] is None else f"{v['adam_loss']:.3g}"
    notes = ""
    if underflow and v["loss"] is not None:
        notes += f"; {underflow} at exactly 0 (underflow), not in the mean"
    if skipped:
        notes += f"; {skipped} with {analysis.NO_SECOND_PHASE}"
    return (
        f"{prefix}{who} {v['wins']}/{v['seeds'] - skipped} "
        f"({ours} vs {theirs}{acc}{notes})"
    )


RESULT_HEADER = [
    "| model | params | Q | optimizer | seeds | swap epoch | train loss | "
    "train acc | val loss | val acc | compute | wall s | compile s |",
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
]


def result_line(cell: analysis.Cell, samples_times_outputs: int) -> str:
    """The cell's row of the results table (see :data:`RESULT_HEADER`)."""
    params = cell.runs[0].last["num_params"]
    return (
        f"| {cell.model} | {params} | {samples_times_outputs / params:.3f} | "
        f"{variants.get(cell.optimizer).label} | {len(cell.runs)} | "
        f"{cell.swap_epochs()} | "
        f"{cell.summary('train_loss', '.3g')} | "
        f"{cell.summary('train_acc', '.3f')} | "
        f"{cell.summary('val_loss', '.3g')} | {cell.summary('val_acc', '.3f')} | "
        f"{cell.summary('forward_passes', '.0f')} | "
        f"{cell.summary('wall_time', '.1f')} | "
        f"{cell.summary('compile_time', '.1f')} |"
    )


def ratio_text(ratios: list[float | str], wins: list[bool | None] | None = None) -> str:
    """The geometric mean of a cell's ratios, how many seeds beat both
    baselines (``wins``, else ratio < 1) and, with several seeds, each seed's
    ratio: an exact 0 (float32 underflow) and a run with no second-phase
    epoch within Adam's compute are named, never averaged."""
    if wins is None:
        wins = [r < 1 if not isinstance(r, str) else None for r in ratios]
    judged = [w for w in wins if w is not None]
    mean = analysis.geometric_mean(ratios)
    # NaN: no number to average; all exact zeros read as such.
    if mean == mean:
        head = f"{mean:.2g}"
    elif all(r == analysis.UNDERFLOW for r in ratios):
        return f"0, underflow ({sum(w is True for w in judged)}/{len(judged)})"
    else:
        head = "-"
    text = f"{head} ({sum(w is True for w in judged)}/{len(judged)})"
    if len(ratios) > 1 or isinstance(ratios[0], str):
        text += " [" + ", ".join(ratio_entry(r) for r in ratios) + "]"
    return text


def ratio_entry(r: float | str) -> str:
    """One seed's ratio: its value, ``0 (underflow)`` or ``no CG epoch``."""
    if r == analysis.UNDERFLOW:
        return "0 (underflow)"
    if r == analysis.NO_SECOND_PHASE:
        return "no CG epoch"
    return f"{r:.2g}"
