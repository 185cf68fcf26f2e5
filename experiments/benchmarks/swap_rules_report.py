"""The swap-rule study's report: its table (``table.md``, ``table.json``) and plot.

Formats what :mod:`experiments.benchmarks.swap_rules` measured.
"""

from __future__ import annotations

import json
import math
import pathlib
import textwrap

import numpy as np


def ratio(ours: float, theirs: float) -> float:
    """``ours / theirs``, where a loss of exactly 0 (cross-entropy underflows
    to 0 in float32) over 0 is 1 and anything else over 0 is infinite."""
    if theirs == 0:
        return 1.0 if ours == 0 else math.inf
    return ours / theirs


def cell_name(e) -> str:
    return f"{e['model']} s{e['seed']} {e['budget']}"


def fmt(x) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.2g}"


MARKERS = "os^vD<>Ph*Xdp8H"


def plot(entries, landscape, path: pathlib.Path, title: str) -> None:
    """Per model and seed: the final loss at equal compute over constant
    Adam's against the swap epoch, a line per budget, and where each rule
    swapped (a marker per rule on its budget's line)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pairs = list(dict.fromkeys((e["model"], e["seed"]) for e in landscape))
    cols = min(3, len(pairs))
    rows = math.ceil(len(pairs) / cols)
    rules = list(dict.fromkeys(e["rule"] for e in entries))
    # As many legend columns as the panels leave room for, and room below
    # them for the legend's rows and above for the wrapped caption.
    ncol = max(1, min(5, len(rules), 2 * cols))
    fig, axes = plt.subplots(
        rows,
        cols,
        figsize=(5 * cols, 3.8 * rows + 0.6 + 0.2 * math.ceil(len(rules) / ncol)),
        squeeze=False,
        constrained_layout=True,
    )
    for ax, (model, seed) in zip(axes.flat, pairs, strict=False):
        budgets = sorted({e["budget"] for e in landscape if e["model"] == model})
        for budget in budgets:
            points = sorted(
                (e["swap_epoch"], ratio(e["loss"], e["adam_loss"]), e)
                for e in landscape
                if (e["model"], e["seed"], e["budget"]) == (model, seed, budget)
            )
            if not points:
                continue
            x, y, found = zip(*points, strict=True)
            (line,) = ax.plot(
                x, np.clip(y, 1e-30, 1e30), "-", lw=1, label=f"{budget} epochs"
            )
            cosine = ratio(found[0]["cosine_loss"], found[0]["adam_loss"])
            ax.axhline(cosine, color=line.get_color(), ls=":", lw=0.8)
            for k, rule in enumerate(rules):
                cell = [
                    e
                    for e in entries
                    if (e["model"], e["seed"], e["budget"], e["rule"])
                    == (model, seed, budget, rule)
                    and e["swap_epoch"] is not None
                ]
                for e in cell:
                    ax.plot(
                        e["swap_epoch"],
                        min(max(e["vs_adam"], 1e-30), 1e30),
                        MARKERS[k % len(MARKERS)],
                        color=line.get_color(),
                        ms=6,
                        mfc="none",
                    )
        ax.axhline(1.0, color="black", lw=0.8, ls="--")
        ax.set(
            title=f"{model}, seed {seed}",
            xlabel="swap epoch",
            ylabel="final loss / constant Adam's",
            yscale="log",
        )
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower left")
    for ax in list(axes.flat)[len(pairs) :]:
        ax.axis("off")
    handles = [
        plt.Line2D(
            [],
            [],
            marker=MARKERS[k % len(MARKERS)],
            ls="",
            color="gray",
            mfc="none",
            label=rule,
        )
        for k, rule in enumerate(rules)
    ]
    fig.legend(handles=handles, loc="outside lower center", ncol=ncol, fontsize=8)
    caption = textwrap.fill(
        "final loss at equal compute against the swap epoch; dotted: cosine "
        "Adam; markers: where each rule swaps",
        width=60 * cols,
    )
    fig.suptitle(f"{title}\n{caption}", fontsize=10)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def validation(e) -> str:
    """A cell's validation accuracy at equal compute and constant Adam's."""
    if e.get("val_acc") is None:
        return "-"
    return f"{e['val_acc']:.3f} ({e['adam_val_acc']:.3f})"


def validation_tally(cells) -> str:
    """How the cells' validation accuracy at equal compute compares with
    constant Adam's, with each cell named."""
    known = [e for e in cells if e.get("val_acc") is not None]
    if not known:
        return "validation accuracy not recorded"
    sides = {"higher": [], "equal": [], "lower": []}
    for e in known:
        diff = round(e["val_acc"] - e["adam_val_acc"], 3)
        side = "higher" if diff > 0 else "lower" if diff < 0 else "equal"
        where = f" ({e['study']})" if "study" in e else ""
        sides[side].append(
            f"{cell_name(e)}{where} {e['val_acc']:.3f} vs {e['adam_val_acc']:.3f}"
        )
    return (
        f"validation accuracy at equal compute, in the {len(known)} cells where it "
        "swapped, against constant Adam's: "
        + "; ".join(
            f"{k} in {len(v)}" + (f" ({', '.join(v)})" if v else "")
            for k, v in sides.items()
        )
    )


def _underflow(verdict) -> str:
    """How many cells' ratios were exactly 0 (left out of the mean)."""
    n = verdict.get("vs_better_adam_underflow", 0)
    return f" ({n} at 0, underflow, left out)" if n else ""


def write(entries, verdicts, out: pathlib.Path, title: str, command: str, note=""):
    out.mkdir(parents=True, exist_ok=True)
    lines = [f"# {title}", "", f"Made with `{command}`.", ""]
    if note:
        lines += [note, ""]
    lines += [
        "Per rule over the cells (model, seed, budget): cells where it swapped; "
        "cells where it paid for a swap or probes and ended above 1.1x constant "
        "Adam's training loss at equal compute; cells at or past the sweep's "
        "crossover budget where it is not below both Adam baselines; the share "
        "of cells within one decade of the best swap in hindsight; and the "
        "geometric means of its loss over the best swap's and over the better "
        "Adam baseline's (all at equal compute; a ratio of exactly 0, a float32 "
        "loss that underflowed, is counted apart, not averaged).",
        "",
        "| rule | swapped | above 1.1x Adam | behind past the crossover | "
        "within a decade of hindsight | loss / hindsight | loss / better Adam |",
        "|---|---|---|---|---|---|---|",
    ]
    for rule, v in verdicts.items():
        worse = ", ".join(v["worse_than_adam"]) or "none"
        behind = ", ".join(v["behind_past_crossover"]) or "none"
        lines.append(
            f"| {rule} | {v['swapped']}/{v['cells']} | {worse} | "
            f"{behind} (of {v['past_crossover']}) | {v['within_decade']}/"
            f"{v['judged_against_hindsight']} | {fmt(v['regret_geomean'])} | "
            f"{fmt(v['vs_better_adam_geomean'])}{_underflow(v)} |"
        )
    lines += [
        "",
        "Per cell: the swap epoch (Adam epochs before CG; - for none within the "
        "budget), Adam's training loss there, probes that lost, the final "
        "training loss at equal compute, and its ratios to constant Adam's, to "
        "the better Adam baseline's and to the best swap in hindsight (whose "
        "epoch and loss close the row); where recorded, the validation accuracy "
        "at equal compute against constant Adam's there.",
        "",
        "| model | seed | budget | rule | swap epoch | Adam's loss there | lost "
        "probes | loss | / Adam | / better Adam | / hindsight | best swap | "
        "its loss | val acc (Adam's) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for e in entries:
        lines.append(
            f"| {e['model']} | {e['seed']} | {e['budget']} | {e['rule']} | "
            f"{e['swap_epoch'] or '-'} | {fmt(e['adam_loss_at_swap'])} | "
            f"{e['probes']} | {fmt(e['loss'])} | {fmt(e['vs_adam'])} | "
            f"{fmt(e['vs_better_adam'])} | {fmt(e['vs_hindsight'])} | "
            f"{e['best_split_epoch'] or '-'} | {fmt(e['best_split_loss'])} | "
            f"{validation(e)} |"
        )
    (out / "table.md").write_text("\n".join(lines) + "\n")
    (out / "table.json").write_text(
        json.dumps({"verdicts": verdicts, "cells": entries}, indent=1) + "\n"
    )


def record(entries, landscape, verdicts, out: pathlib.Path, title, command, note=""):
    """``table.md``, ``table.json``, ``landscape.json`` and ``swap_rules.png``."""
    write(entries, verdicts, out, title, command, note)
    (out / "landscape.json").write_text(json.dumps(landscape, indent=1) + "\n")
    plot(entries, landscape, out / "swap_rules.png", title)


# -- in-sample against out-of-sample ------------------------------------------
def pooled(verdicts: list[dict]) -> dict:
    """One rule's verdicts over several studies, as if judged together."""
    return {
        "cells": sum(v["cells"] for v in verdicts),
        "worse_than_adam": [c for v in verdicts for c in v["worse_than_adam"]],
        "past_crossover": sum(v["past_crossover"] for v in verdicts),
        "behind_past_crossover": [
            c for v in verdicts for c in v["behind_past_crossover"]
        ],
        "within_decade": sum(v["within_decade"] for v in verdicts),
        "judged": sum(v["judged_against_hindsight"] for v in verdicts),
    }


def selection(groups: dict[str, list[pathlib.Path]], missed: str | None = None):
    """The selection table: per rule, its three targets (cells above 1.1x
    constant Adam, cells past the crossover behind an Adam baseline, cells
    within a decade of the best swap in hindsight) in each group of studies
    (``table.json`` folders) side by side; then, for the rule ``missed``, the
    cells that miss a target, per group."""

    def tagged(d: pathlib.Path) -> dict:
        """A study's ``table.json``, each cell it names tagged with the
        study's folder (the same cell name recurs across losses)."""
        study = json.loads((d / "table.json").read_text())
        for v in study["verdicts"].values():
            for key in ("worse_than_adam", "behind_past_crossover"):
                v[key] = [f"{c} ({d.name})" for c in v[key]]
        for e in study["cells"]:
            e["study"] = d.name
        return study

    studies = {name: [tagged(d) for d in dirs] for name, dirs in groups.items()}
    judged = {
        name: [study["verdicts"] for study in found] for name, found in studies.items()
    }
    rules = [
        r
        for r in next(iter(judged.values()))[0]
        if all(r in v for vs in judged.values() for v in vs)
    ]
    names = list(groups)
    head = "| rule | " + " | ".join(
        f"{n}: above 1.1x Adam | {n}: behind past the crossover | "
        f"{n}: within a decade of hindsight"
        for n in names
    )
    lines = [head + " |", "|---" * (1 + 3 * len(names)) + "|"]
    for rule in rules:
        cells = []
        for name in names:
            v = pooled([study[rule] for study in judged[name]])
            cells += [
                f"{len(v['worse_than_adam'])}/{v['cells']}",
                f"{len(v['behind_past_crossover'])}/{v['past_crossover']}",
                f"{v['within_decade']}/{v['judged']}",
            ]
        lines.append(f"| {rule} | " + " | ".join(cells) + " |")
    if missed is not None:
        lines.append("")
        for name in names:
            v = pooled([study[missed] for study in judged[name]])
            worse = ", ".join(v["worse_than_adam"]) or "none"
            behind = ", ".join(v["behind_past_crossover"]) or "none"
            cells = [
                e
                for study in studies[name]
                for e in study["cells"]
                if e["rule"] == missed and e["swap_epoch"] is not None
            ]
            lines.append(
                f"- {missed}, {name}: above 1.1x Adam: {worse}; behind past the "
                f"crossover: {behind}; {validation_tally(cells)}."
            )
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    import argparse

    parser = argparse.ArgumentParser(
        description="The swap rules' selection table: groups of recorded studies "
        "(folders with table.json) side by side."
    )
    parser.add_argument(
        "--group",
        nargs="+",
        action="append",
        required=True,
        metavar=("NAME", "DIR"),
        help="a column group's name, then the study folders it pools",
    )
    parser.add_argument(
        "--missed", default=None, metavar="RULE", help="list this rule's misses"
    )
    args = parser.parse_args(argv)
    for group in args.group:
        if len(group) < 2:
            parser.error(f"--group {group[0]!r} names no study folder")
    groups = {g[0]: [pathlib.Path(d) for d in g[1:]] for g in args.group}
    print(selection(groups, args.missed), end="")


if __name__ == "__main__":
    main()
