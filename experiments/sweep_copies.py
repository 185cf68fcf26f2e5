"""A budget sweep's files: where each run lives, the copy of a sweep's
tables and metrics into ``results/`` (``--copy-to``), reading such a copy
back (``--retable``), and the provenance of its runs.

The copy holds no checkpoints: ``metrics/<model>/seed<k>/<variant>.jsonl``
for the runs that span every budget (Adam's, the detected swap's) and
``<variant>-b<budget>.jsonl`` for the others, each beside its run's
``provenance.json`` as ``<same name>.provenance.json``.
"""

from __future__ import annotations

import json
import pathlib
import shutil

from experiments import provenance
from experiments import run_records
from experiments import variants as variant_registry
from experiments.analysis import Run
from experiments.budget_sweep import VARIANTS
from experiments.budget_sweep import Sweep

_ADAM = variant_registry.ADAM.name
# provenance.json's list of the per-run records a copy's summary counts.
RUN_FILES = "run_files"


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


def _seed_dirs(dest: pathlib.Path, models: list[str] | None):
    """``(model, seed, folder)`` per ``metrics/<model>/seed<k>`` of a copy,
    models in the order of ``models`` (all of them), else by name."""
    seed_dirs = sorted((pathlib.Path(dest) / "metrics").glob("*/seed*"))
    if models:
        seed_dirs.sort(key=lambda d: models.index(d.parent.name))
    for seed_dir in seed_dirs:
        yield seed_dir.parent.name, int(seed_dir.name[len("seed") :]), seed_dir


def read_copy(
    dest: pathlib.Path, budgets: list[int], models: list[str] | None = None
) -> dict[int, list[Run]]:
    """The runs of a copy written by :func:`copy_results`, per budget, as the
    sweep had them: Adam's run and the detected swap's cut to each budget (a
    detected swap with no file, or swapping only at the budget's end, is
    Adam's run), each tail and cosine Adam from its budget's file; models in
    the order of ``models`` (all of them), else by name."""
    by_budget: dict[int, list[Run]] = {b: [] for b in budgets}
    for model, seed, seed_dir in _seed_dirs(dest, models):

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
    run_files = set()
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
            if (source / provenance.FILE).exists():
                made = target.with_name(f"{name}.{provenance.FILE}")
                shutil.copy2(source / provenance.FILE, made)
                run_files.add(made.relative_to(dest).as_posix())
    # The sweep's summary covers exactly these runs: say which files it counts.
    summary = json.loads((sweep.out / provenance.FILE).read_text())
    summary[RUN_FILES] = sorted(run_files)
    (dest / provenance.FILE).write_text(json.dumps(summary, indent=2))


def copy_summary(dest: pathlib.Path) -> dict:
    """What made the runs of a copy, for ``--retable``: the summary it was
    copied with plus the records of every run copied into it since (a
    ``<name>.provenance.json`` beside the metrics that the summary's
    ``run_files`` does not list); for a copy made before runs recorded their
    provenance, :func:`provenance.committed`.

    The records of a run whose metrics were replaced stay counted: a copy
    only grows.
    """
    dest = pathlib.Path(dest)
    path = dest / provenance.FILE
    before = json.loads(path.read_text()) if path.exists() else {}
    if not before or "committed_in" in before:
        return provenance.committed(dest / "metrics")
    counted = set(before.get(RUN_FILES, []))
    files = {
        p.relative_to(dest).as_posix()
        for p in (dest / "metrics").rglob(f"*.{provenance.FILE}")
    }
    added = sorted(files - counted)
    records = [r for f in added for r in json.loads((dest / f).read_text())["records"]]
    made = provenance.merge(before, provenance.summarize(records))
    made[RUN_FILES] = sorted(counted | files)
    return made


def missing_runs(
    dest: pathlib.Path,
    budgets: list[int],
    models: list[str] | None = None,
    listed: list[dict] = (),
) -> list[tuple]:
    """``(model, seed, budget, variant)`` for each run a copy lacks, as the
    sweep lists them (models in the order of ``models``): a seed whose Adam
    run is shorter than a budget lacks ``"adam, so every variant"`` there; at
    a budget its Adam run reaches, a variant that another seed of the same
    model has there (a detected swap with no file never fired: not listed),
    and each run of ``listed`` (the copy's table.json ``missing``) whose file
    is still lacking, so a copy of one seed keeps the list it was made with."""
    per_budget = [
        v for v in VARIANTS if variant_registry.get(v).sweep in ("per-budget", "tail")
    ]

    def lacks(seed_dir, variant, budget):
        if variant_registry.get(variant).sweep == "detected-tail":
            return not (seed_dir / f"{variant}.jsonl").exists()
        rows = run_records.read_metrics(seed_dir / f"{variant}-b{budget}.jsonl")
        return len(rows) < budget

    others = [v for v in VARIANTS if v != _ADAM]
    found: dict[tuple, set[str] | None] = {}
    for model, seed, seed_dir in _seed_dirs(dest, models):
        adam = len(run_records.read_metrics(seed_dir / f"{_ADAM}.jsonl"))
        for budget in budgets:
            found[model, seed, budget] = (
                {v for v in others if not lacks(seed_dir, v, budget)}
                if adam >= budget
                else None
            )
    missing = []
    for (model, seed, budget), have in found.items():
        if have is None:
            missing.append((model, seed, budget, "adam, so every variant"))
            continue
        planned = {
            v
            for (m, _, b), v_have in found.items()
            if (m, b) == (model, budget) and v_have
            for v in v_have & set(per_budget)
        } | {
            e["variant"]
            for e in listed
            if (e["model"], e["seed"], e["budget"]) == (model, seed, budget)
        }
        missing += [(model, seed, budget, v) for v in others if v in planned - have]
    return missing


def header_note(table_md: str) -> str:
    """The note of a copy's ``table.md`` for ``--retable`` to keep: the lines
    between the title and the "Loss:" paragraph, less the provenance line,
    an earlier ``--retable`` command and the list of missing runs (both
    written again)."""
    lines = table_md.splitlines()
    end = next(k for k, line in enumerate(lines) if line.startswith("Loss: "))
    kept, in_missing = [], False
    for line in lines[1:end]:
        if line.startswith("**Missing**"):
            in_missing = True
        elif in_missing and (not line.strip() or line.startswith("- ")):
            continue
        else:
            in_missing = False
            retabled = line.startswith("Made with `") and "--retable" in line
            blank_again = not line.strip() and kept and not kept[-1].strip()
            if not line.startswith("Code: ") and not retabled and not blank_again:
                kept.append(line)
    return "\n".join(kept).strip()
