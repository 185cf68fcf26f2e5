"""What a run records: its ``metrics.jsonl``, and the swap replayed on it.

Every epoch appends one JSON row (:func:`append_metrics`, synced to disk);
:func:`read_metrics` reads them back, dropping a last line a crash cut short.
:func:`replayed_swap` runs a swap rule through ``tpo.swap.replay`` on an Adam
run's rows, which is where a two-phase run with that rule swaps.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any

import twophase_optax as tpo
from experiments.checkpoints import RunOutputError
from experiments.config import Config


def read_metrics(path: pathlib.Path) -> list[dict[str, Any]]:
    """The rows of ``metrics.jsonl``; a last line cut short by a crash is dropped."""
    if not path.exists():
        return []
    rows = []
    lines = path.read_text().splitlines()
    for i, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i < len(lines) - 1:
                raise
    return rows


def append_metrics(path: pathlib.Path, row: dict[str, Any]) -> None:
    """Appends one row and syncs it to disk; on failure the file is as it was."""
    with path.open("a") as f:
        size = f.tell()
        try:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())
        except OSError as error:
            f.truncate(size)
            raise RunOutputError(
                f"Could not append epoch {row['epoch']}'s metrics to {path}: "
                f"{error}. The rows already written are intact; free some space "
                "or fix the permissions, then run again with --resume."
            ) from error


# What tpo.swap.replay reads, and the metrics field that records it per epoch.
RECORDS = {
    "value": "batch_loss",
    "grad_norm": "gn_reading",
    "num_errors": "batch_errors",
}


def replayed_swap(
    config: Config,
    rows: list[dict[str, Any]],
    length: int | None = None,
    budget: int | None = None,
) -> int | None:
    """The epoch after which a two-phase run with ``config``'s swap rule swaps,
    replayed on an Adam run's metrics ``rows``; ``None`` if not within them,
    or, for a run of ``budget`` epochs, if after the rule's last swap epoch
    there (``SwapConfig.latest_swap``: none in the budget's last fifth).

    Before its swap a two-phase run is the Adam run, so its rule sees what
    the Adam run recorded: the gradient-norm readings, the mean batch losses
    and the training examples the steps got wrong, which
    :func:`tpo.swap.replay` runs through the rule's own code. ``length``
    pads the rows (with the last) to a fixed length, so the replay compiles
    once.
    """
    if length is not None:
        rows = rows + rows[-1:] * (length - len(rows))
    rule = config.optimizer.swap.make()
    found = tpo.swap.replay(rule, **records(rule, rows))
    swap = config.optimizer.swap
    if budget and found is not None and found + 1 > swap.latest_swap(budget):
        return None
    return found


def records(rule: tpo.swap.SwapRule, rows: list[dict[str, Any]]) -> dict[str, list]:
    """What ``rule`` reads, per epoch of metrics ``rows``, as
    :func:`tpo.swap.replay` takes it."""
    reads = sorted({"grad_norm" if r == "mean_grad" else r for r in rule.reads})
    if rows and (missing := [RECORDS[r] for r in reads if RECORDS[r] not in rows[0]]):
        raise RunOutputError(
            f"The metrics have no {missing[0]!r}, which the swap rule reads: they "
            "were written by an older version. Train the Adam run again."
        )
    return {r: [row[RECORDS[r]] for row in rows] for r in reads}
