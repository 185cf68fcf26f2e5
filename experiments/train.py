"""Trains one of the paper's models with Adam, two-phase, or CG; resumable.

    python -m experiments.train --model vit-mlp --dataset digits \\
        --optimizer two-phase --epochs 300 --out runs/digits/vit-mlp/two-phase

Every epoch appends one JSON line to ``<out>/metrics.jsonl`` and writes an
orbax checkpoint (atomically: orbax writes a temporary directory and renames
it; ``--checkpoint-every N``: every N epochs and after the last, where a
checkpoint costs more than an epoch, as for small models on a GPU).
``--resume`` continues from the last checkpoint, redoing the epochs after it,
and gives bit for bit the
result of an uninterrupted run, also in the middle of the CG phase: the batch
order depends only on (seed, epoch), and the full optimizer state, the
parameters and the counters are restored exactly.

Optimizers:

* ``adam``: ``optax.adam(lr)`` on mini-batches of ``--batch-size``.
* ``adam-cosine``: Adam whose learning rate decays from ``lr`` to 0 over the
  run's ``--epochs`` (``optax.cosine_decay_schedule``), the baseline a
  practitioner would pick for a final result; the schedule depends on the
  budget, so each budget is its own run.
* ``two-phase``: :func:`twophase_optax.two_phase` reading the gradient norm once
  per epoch (``window`` = batches per epoch); after the swap, CG runs on
  batches of ``--cg-batch-size`` (default: the whole training set).
* ``two-phase-fixed``: the paper's fixed split, CG from ``--swap-epoch`` on.
* ``cg``: CG from the start on ``--cg-batch-size`` batches.
* ``adam-lbfgs``: Adam until ``--swap-epoch``, then ``optax.lbfgs`` (its zoom
  line search) on the whole training set, the switch physics-informed and
  scientific ML make; the fixed split through :func:`twophase_optax.two_phase`.

Compute is counted in forward-pass equivalents over the training set: on a
batch of ``b`` samples a value costs ``b / n_train`` and a value and gradient
``3 b / n_train`` (forward 1, backward 2). A step pays for the gradient at its
start, unless a full-batch CG step finds it in the state of the line search
before it (``optax.value_and_grad_from_state``), and for its line search's
values and gradients. Evaluation passes are not counted; ``wall_time`` is the
cumulative time of the training steps alone, and ``compile_time`` that of
compiling them (each step function is compiled, and run once with its results
discarded, before the first timed step that needs it).

A run can also start where another ended (``config.run.prefix_run``): a
two-phase run is Adam up to its swap, so a budget sweep trains Adam once and starts
every second phase from the Adam run's checkpoint of the epoch before the
swap (``config.run.keep_epochs`` keeps those; see ``experiments/budget_sweep.py``). The
tail's metrics begin with the Adam run's rows, and its compute, time and
compile time include that prefix.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import shutil
import signal
import sys
from typing import Any

import jax
import numpy as np
from tqdm.auto import tqdm

from experiments import data as data_lib
from experiments import provenance
from experiments.checkpoints import KEPT
from experiments.checkpoints import RunOutputError
from experiments.checkpoints import open_checkpoints
from experiments.checkpoints import restore_checkpoint
from experiments.checkpoints import save_checkpoint
from experiments.checkpoints import sync_hosts
from experiments.config import Config
from experiments.config import parse_args
from experiments.run_records import append_metrics
from experiments.run_records import read_metrics
from experiments.trainer import Interrupted
from experiments.trainer import Trainer
from experiments.trainer import request_stop


def train(config: Config) -> list[dict[str, Any]]:
    """Runs (or resumes) one training run; returns all its metrics rows.

    Across hosts (``config.distributed``) every process runs this with the same
    config and ``out`` on a shared file system; process 0 writes the metrics.
    """
    if config.mesh.distributed:
        jax.distributed.initialize(
            config.mesh.coordinator, config.mesh.num_processes, config.mesh.process_id
        )
    chief = jax.process_index() == 0
    out = pathlib.Path(config.run.out).absolute()
    trainer = Trainer(config)
    metrics_path = out / "metrics.jsonl"
    if chief:
        config_json = json.dumps(dataclasses.asdict(config), indent=2)
        try:
            out.mkdir(parents=True, exist_ok=True)
            (out / "config.json").write_text(config_json)
            provenance.record_start(out, config, resumed=config.run.resume)
        except OSError as error:
            raise RunOutputError(
                f"Cannot write to the output directory {out}: {error}. Choose a "
                "writable --out."
            ) from error
        if not config.run.resume:
            # A fresh run replaces an earlier one in the same directory.
            shutil.rmtree(out / "checkpoints", ignore_errors=True)
            metrics_path.unlink(missing_ok=True)
    sync_hosts("cleared the run directory")
    manager = open_checkpoints(out)
    kept = open_checkpoints(out, KEPT, max_to_keep=None)
    counters = {"forward_passes": 0.0, "wall_time": 0.0, "compile_time": 0.0}
    first_epoch = 0
    if config.run.resume:
        restored = restore_checkpoint(
            manager, (trainer.params, trainer.opt_state), counters
        )
        if restored is not None:
            epoch, (trainer.params, trainer.opt_state) = restored
            first_epoch = epoch + 1
        # Rows written after the checkpoint belong to an epoch that is redone.
        rows = [r for r in read_metrics(metrics_path) if r["epoch"] < first_epoch]
        if chief:
            metrics_path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    if first_epoch == 0 and config.run.prefix_run is not None:
        # A second phase that starts from the Adam run's checkpoint: its rows
        # up to there are the Adam run's.
        trainer.start_from(config.run.prefix_run, config.run.prefix_epoch, counters)
        first_epoch = config.run.prefix_epoch + 1
        prefix = read_metrics(pathlib.Path(config.run.prefix_run) / "metrics.jsonl")
        rows = [r for r in prefix if r["epoch"] < first_epoch]
        if chief:
            metrics_path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    trainer.rows = read_metrics(metrics_path)

    bar = tqdm(
        range(first_epoch, config.run.epochs),
        initial=first_epoch,
        total=config.run.epochs,
        desc=f"{config.run.label}{config.run.model} {config.optimizer.name}",
        disable=not (config.run.progress and chief),
        file=sys.stderr,
    )
    try:
        for epoch in bar:
            _train_epoch(trainer, epoch, counters, manager, metrics_path, bar)
            if epoch in config.run.keep_epochs or trainer.detected_at(epoch):
                state = (trainer.params, trainer.opt_state)
                save_checkpoint(kept, epoch, state, counters)
    finally:
        bar.close()
    manager.close()
    kept.close()
    sync_hosts("wrote the last metrics")
    return read_metrics(metrics_path)


def _train_epoch(trainer, epoch, counters, manager, metrics_path, bar) -> None:
    """One epoch: the steps, the evaluation, a metrics row and a checkpoint."""
    row = trainer.run_epoch(epoch)
    counters["forward_passes"] += row.pop("epoch_forward_passes")
    counters["wall_time"] += row.pop("epoch_seconds")
    counters["compile_time"] += row.pop("epoch_compile_seconds")
    train_loss, train_acc = trainer.evaluate(trainer.data.x_train, trainer.data.y_train)
    val_loss, val_acc = trainer.evaluate(trainer.data.x_val, trainer.data.y_val)
    every = trainer.config.probe.every
    if every and (epoch + 1) % every == 0:
        row.update(trainer.curvature())
    row = {
        "epoch": epoch,
        "train_loss": train_loss,
        "train_acc": train_acc,
        "val_loss": val_loss,
        "val_acc": val_acc,
        **row,
        "forward_passes": counters["forward_passes"],
        "wall_time": counters["wall_time"],
        "compile_time": counters["compile_time"],
        "num_params": trainer.num_params,
    }
    if trainer.data.is_text and trainer.config.run.loss == "xent":
        # Bits per character: the cross-entropy per character in base 2.
        row["train_bpc"] = train_loss / np.log(2.0)
        row["val_bpc"] = val_loss / np.log(2.0)
    if jax.process_index() == 0:
        append_metrics(metrics_path, row)
    trainer.rows.append(row)
    run = trainer.config.run
    if (epoch + 1) % run.checkpoint_every == 0 or epoch == run.epochs - 1:
        save_checkpoint(manager, epoch, (trainer.params, trainer.opt_state), counters)
    bar.set_postfix(
        loss=f"{train_loss:.2e}", val_acc=f"{val_acc:.3f}", phase=row["phase"]
    )


def main(argv: list[str] | None = None) -> None:
    config = parse_args(argv)
    previous = signal.signal(signal.SIGTERM, request_stop)
    try:
        rows = train(config)
    except (data_lib.DatasetUnavailableError, RunOutputError) as error:
        raise SystemExit(str(error)) from None
    except Interrupted as error:
        print(error, file=sys.stderr)
        raise SystemExit(128 + signal.SIGTERM) from None
    finally:
        signal.signal(signal.SIGTERM, previous)
    last = rows[-1]
    print(
        f"{config.run.model} {config.optimizer.name}: "
        f"train loss {last['train_loss']:.4g}, "
        f"val acc {last['val_acc']:.3f} after {len(rows)} epochs; {config.run.out}"
    )


if __name__ == "__main__":
    main()
