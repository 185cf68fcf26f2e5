"""A budget sweep's files: where each run lives, the copy of a sweep's
tables and metrics into ``results/`` (``--copy-to``), reading such a copy
back (``--retable``), and the provenance of its runs.

The copy holds no checkpoints: ``metrics/<model>/seed<k>/<variant>.jsonl``
for the runs that span every budget (Adam's, the detected swap's) and
``<variant>-b<budget>.jsonl`` for the others.
"""

from __future__ import annotations

import pathlib
import shutil

from experiments import provenance
from experiments import run_records
from experiments import variants as variant_registry
from experiments.analysis import Run
from experiments.budget_sweep import VARIANTS
from experiments.budget_sweep import Sweep

_ADAM = variant_registry.ADAM.name


def run_source(sweep: Sweep, run: Run, budget: int) -> pathlib.Path | None:
    """The directory that holds ``run`` at ``budget`` (None for a detected
    swap that never fired: its rows are Adam's run)."""
    long = variant_registry.get(run.optimizer).sweep in ("long", "detected-tail")
    source = sweep.run_dir(run.model, run.seed, run.optimizer, None if long else budget)
    return source if (source / "metrics.jsonl").exists() else None


def record_provenance(sweep: Sweep, by_budget: dict[int, list[Run]]) -> str:
    """``provenance.json`` in the sweep's folder: what made its runs (their
    own records, :mod:`experiments.provenance`); returns the line for the
    table."""
    dirs = {
        source
        for budget, runs in by_budget.items()
        for run in runs
        if (source := run_source(sweep, run, budget)) is not None
    }
    return provenance.write_summary(sweep.out, sorted(dirs))


def read_copy(
    dest: pathlib.Path, budgets: list[int], models: list[str] | None = None
) -> dict[int, list[Run]]:
    """The runs of a copy written by :func:`copy_results`, per budget, as the
    sweep had them: Adam's run and the detected swap's cut to each budget (a
    detected swap with no file, or swapping only at the budget's end, is
    Adam's run), each tail and cosine Adam from its budget's file; models in
    the order of ``models`` (all of them), else by name."""
    by_budget: dict[int, list[Run]] = {b: [] for b in budgets}
    seed_dirs = sorted((pathlib.Path(dest) / "metrics").glob("*/seed*"))
    if models:
        seed_dirs.sort(key=lambda d: models.index(d.parent.name))
    for seed_dir in seed_dirs:
        model, seed = seed_dir.parent.name, int(seed_dir.name[len("seed") :])

        def rows(name, seed_dir=seed_dir):
            return run_records.read_metrics(seed_dir / f"{name}.jsonl")

        adam = rows(_ADAM)
        for budget in budgets:
            if len(adam) < budget:
                continue
            runs = [Run(model, _ADAM, adam[:budget], seed)]
            for variant in VARIANTS:
                how = variant_registry.get(variant).sweep
                if how in ("per-budget", "tail"):
                    found = rows(f"{variant}-b{budget}")
                    if len(found) >= budget:
                        runs.append(Run(model, variant, found[:budget], seed))
                elif how == "detected-tail":
                    found = rows(variant)[:budget]
                    swapped = any(r["phase"] == 1 for r in found)
                    chosen = found if swapped and len(found) == budget else adam
                    runs.append(Run(model, variant, chosen[:budget], seed))
            by_budget[budget] += runs
    return by_budget


def copy_results(sweep: Sweep, by_budget: dict[int, list[Run]], dest: pathlib.Path):
    """The table, its plots and the metrics of every run in it, into ``dest``
    (``metrics/<model>/seed<k>/<variant>[-b<budget>].jsonl``), for a record
    that holds no checkpoints."""
    dest.mkdir(parents=True, exist_ok=True)
    for path in [sweep.out / "table.md", sweep.out / "table.json"]:
        shutil.copy2(path, dest / path.name)
    for path in sweep.out.glob("*.png"):
        shutil.copy2(path, dest / path.name)
    shutil.copy2(sweep.out / provenance.FILE, dest / provenance.FILE)
    for budget, runs in by_budget.items():
        for run in runs:
            source = run_source(sweep, run, budget)
            if source is None:
                continue  # The detected swap that never fired: Adam's run.
            long = source == sweep.run_dir(run.model, run.seed, run.optimizer)
            name = run.optimizer if long else f"{run.optimizer}-b{budget}"
            target = dest / "metrics" / run.model / f"seed{run.seed}" / f"{name}.jsonl"
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source / "metrics.jsonl", target)
