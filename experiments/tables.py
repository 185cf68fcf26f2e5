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
    "train acc | val loss | val acc | best val acc | compute | wall s | compile s |",
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
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
        f"{cell.best_val_acc()} | "
        f"{cell.summary('forward_passes', '.0f')} | "
        f"{cell.summary('wall_time', '.1f')} | "
        f"{cell.summary('compile_time', '.1f')} |"
    )


def ratio_text(ratios: list[float | str], wins: list[bool | None]) -> str:
    """The geometric mean of a cell's ratios, how many seeds beat both
    baselines (``wins``, None: no verdict) and, with several seeds, each
    seed's ratio: an exact 0 (float32 underflow) and a run with no
    second-phase epoch within Adam's compute are named, never averaged."""
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


# The paper's Table 1 on MNIST (1000 epochs, batch 512, softmax + MSE): train
# loss, train accuracy, validation loss, validation accuracy; Adam, then Adam
# for 300 epochs and CG for 700 (../shared/PAPER.md).
PAPER_TABLE_1 = {
    "vit-mlp": ((0.0008, 0.995, 0.0061, 0.965), (0.0001, 1.000, 0.0044, 0.974)),
    "vit-nomlp": ((0.0003, 0.998, 0.0064, 0.963), (0.0002, 0.999, 0.0053, 0.969)),
    "vit-nomlp-wkewq": ((0.0004, 0.998, 0.0057, 0.967), (0.0002, 0.999, 0.0048, 0.971)),
    "vit-nomlp-wkewq-wvwo": (
        (0.0016, 0.990, 0.0073, 0.955),
        (0.0006, 0.996, 0.0063, 0.962),
    ),
    "vgg5": ((0.0001, 1.000, 0.0014, 0.993), (0.0001, 1.000, 0.0011, 0.994)),
}


def paper_number(x: float) -> str:
    """As the paper prints them (``.0008``), or in scientific notation below
    1e-4, where the paper's four decimals would read 0."""
    if x == 0:
        return "0 (underflow)"
    if abs(x) < 1e-4:
        return f"{x:.1e}"
    return f"{x:.4f}".lstrip("0") if x < 1 else f"{x:.4f}"


def table_1_layout(runs: list[analysis.Run], budget: int) -> list[str]:
    """The paper's Table 1 rows (MNIST) beside ours at ``budget`` epochs, in
    its layout: train loss / train acc / val loss / val acc at the end of the
    budget, the mean over the seeds, per model and variant."""
    lines = [
        f"## Table 1's layout, {budget} epochs",
        "",
        "train loss / train acc / val loss / val acc at the end of the budget, "
        "means over the seeds (the paper: MNIST, 1000 epochs, batch 512, Adam "
        "for 300 epochs then CG for 700; ours: the dataset above, each run "
        "beside it):",
        "",
        "| model | paper: Adam | paper: Adam -> CG | "
        + " | ".join(variants.get(v).label for v in variants.SWEEP)
        + " |",
        "|---|---|---|" + "---|" * len(variants.SWEEP),
    ]
    for model in dict.fromkeys(r.model for r in runs):
        paper = PAPER_TABLE_1.get(model)
        row = [model]
        row += ["/".join(map(paper_number, p)) for p in paper] if paper else ["-", "-"]
        for variant in variants.SWEEP:
            found = [r for r in runs if (r.model, r.optimizer) == (model, variant)]
            if not found:
                row.append("-")
                continue
            means = [
                float(sum(r.last[k] for r in found) / len(found))
                for k in ("train_loss", "train_acc", "val_loss", "val_acc")
            ]
            row.append("/".join(map(paper_number, means)) + f" ({len(found)})")
        lines.append("| " + " | ".join(row) + " |")
    return lines


def validation_lines(tally: dict[str, dict[str, Any]]) -> list[str]:
    """The answer to "does the second phase improve validation accuracy?"
    (:func:`experiments.analysis.validation_tally`) as a table."""
    lines = [
        "## Validation accuracy at equal compute",
        "",
        "Over every budget, model and seed where the variant swapped, its "
        "validation accuracy at Adam's compute against Adam's there: higher, "
        "equal, lower; split by whether its training loss beat both baselines.",
        "",
        "| variant | training loss | higher | equal | lower | seeds |",
        "|---|---|---|---|---|---|",
    ]
    for variant, by_outcome in tally.items():
        for won in ("won", "lost"):
            if won in by_outcome:
                t = by_outcome[won]
                lines.append(
                    f"| {variants.get(variant).label} | "
                    f"{'beat both' if won == 'won' else 'did not'} | {t['higher']} | "
                    f"{t['equal']} | {t['lower']} | {', '.join(map(str, t['seeds']))} |"
                )
    return lines
