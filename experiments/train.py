"""Trains one of the paper's models with Adam, two-phase, or CG; resumable.

    python -m experiments.train --model vit-mlp --dataset digits \\
        --optimizer two-phase --epochs 300 --out runs/digits/vit-mlp/two-phase

Every epoch appends one JSON line to ``<out>/metrics.jsonl`` and writes an
orbax checkpoint (atomically: orbax writes a temporary directory and renames
it). ``--resume`` continues from the last checkpoint and gives bit for bit the
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

A run can also start where another ended (``Config.prefix_run``): a
two-phase run is Adam up to its swap, so a study trains Adam once and starts
every second phase from the Adam run's checkpoint of the epoch before the
swap (``Config.keep_epochs`` keeps those; see ``experiments/study.py``). The
tail's metrics begin with the Adam run's rows, and its compute, time and
compile time include that prefix.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import pathlib
import shutil
import signal
import sys
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

import twophase_optax as tpo
from experiments import cli
from experiments import data as data_lib
from experiments import models
from experiments import sharding
from experiments.checkpoints import RunOutputError
from experiments.checkpoints import open_checkpoints
from experiments.checkpoints import restore_checkpoint
from experiments.checkpoints import save_checkpoint
from experiments.checkpoints import sync_hosts
from twophase_optax.two_phase import FALLBACKS

OPTIMIZERS = (
    "adam",
    "two-phase",
    "two-phase-fixed",
    "cg",
    "adam-lbfgs",
    "adam-cosine",
)
ADAM_OPTIMIZERS = ("adam", "adam-cosine")  # No second phase.
SPLIT_OPTIMIZERS = ("two-phase", "two-phase-fixed", "adam-lbfgs")  # two_phase
EVAL_BATCH = 2048
# --swap-rule: the tpo.swap rules and combinations the runs use, mapped onto
# tpo.swap objects by swap_rule() (--optimizer two-phase-fixed is
# tpo.swap.at_step).
SWAP_RULES = ("peak", "plateau", "peak-then-plateau", "fit", "fit-or-plateau")
DEFAULT_SWAP_RULE = "fit-or-plateau"  # tpo.swap.default
# --paper-rule: the peak settings of tpo.swap.PAPER, Algorithm 1 as printed.
PAPER_RULE = dict(
    swap_rule="peak", gn_factor=0.9, smoothing=1.0, patience=1, min_rise=1.0
)
VALUE, VALUE_AND_GRAD = 1.0, 3.0  # forward-pass equivalents
# Full-batch CG and L-BFGS evaluate the training set in chunks of at most this
# many images (twophase_optax.chunked_loss): chosen so that one full-batch value
# and gradient of every model needs at most 8 GiB of working memory at the
# paper's MNIST and CIFAR shapes (BENCHMARKS.md, "CG on a large training set").
DEFAULT_CG_CHUNK_SIZE = 2048


@dataclasses.dataclass
class Config:
    """One training run; the command-line flags map onto these fields."""

    model: str = "vit-mlp"
    dataset: str = "digits"
    optimizer: str = "two-phase"
    epochs: int = 100
    batch_size: int = 512
    cg_batch_size: int | None = None  # None: the whole training set.
    # CG and L-BFGS batches larger than this are evaluated in chunks of at most
    # this many images (twophase_optax.chunked_loss); 0: in one pass.
    cg_chunk_size: int = DEFAULT_CG_CHUNK_SIZE
    lr: float = 1e-3
    loss: str = models.DEFAULT_LOSS
    # two-phase: what decides the swap, one of SWAP_RULES, and the settings of
    # its tpo.swap parts (see swap_rule): the peak's,
    gn_factor: float = tpo.swap.DEFAULT_GN_FACTOR
    smoothing: float = tpo.swap.DEFAULT_SMOOTHING
    patience: int = tpo.swap.DEFAULT_PATIENCE
    min_rise: float = tpo.swap.DEFAULT_MIN_RISE
    swap_rule: str = DEFAULT_SWAP_RULE
    # the plateau's,
    plateau_rtol: float = tpo.swap.DEFAULT_RTOL
    plateau_patience: int = tpo.swap.DEFAULT_PLATEAU_PATIENCE
    plateau_smoothing: float = tpo.swap.DEFAULT_PLATEAU_SMOOTHING
    # and the fit rule's: the most training examples an epoch's steps may get
    # wrong, and such epochs in a row before the swap.
    fit_errors: int = tpo.swap.DEFAULT_MAX_ERRORS
    fit_patience: int = tpo.swap.DEFAULT_FIT_PATIENCE
    swap_epoch: int = 30
    fallback: str | None = None  # two_phase's fallback: None or "first".
    max_failures: int = 3
    seed: int = 0
    out: str = "runs/digits/vit-mlp/two-phase"
    data_dir: str | None = None
    resume: bool = False
    progress: bool = True
    label: str = ""  # A prefix for the progress bar ("run 2/10: ").
    curvature_every: int = 0  # Probe the Hessian every N epochs; 0: never.
    curvature_iterations: int = 20  # Lanczos steps (Hessian-vector products).
    curvature_batch: int = 512  # The fixed probe batch: the first N images.
    mesh: str | None = None  # "data=N[,model=M]"; None: data-parallel, all devices.
    distributed: bool = False  # Call jax.distributed.initialize() first.
    coordinator: str | None = None  # host:port; None: detected (SLURM, TPU, ...).
    num_processes: int | None = None
    process_id: int | None = None
    # Checkpoints kept for good (beside the last two) at these epochs, in
    # <out>/kept: the epochs a study starts its second phases from.
    keep_epochs: tuple[int, ...] = ()
    # Adam only: also keep the checkpoint of the epoch whose gradient-norm
    # reading makes the swap detector (gn_factor, smoothing, patience,
    # min_rise) fire, found by tpo.swap.replay on the readings so far.
    keep_detected: bool = False
    # Start from another run's kept checkpoint instead of from scratch: the
    # Adam run's directory and the epoch whose end state is taken; this run's
    # epochs from prefix_epoch + 1 on are its own (see Trainer.start_from).
    prefix_run: str | None = None
    prefix_epoch: int = -1

    def validate(self) -> None:
        checks = {
            "model": self.model in models.MODEL_NAMES
            and (self.model in models.TEXT_VARIANTS)
            == (self.dataset in data_lib.TEXT_NAMES),
            "dataset": self.dataset in data_lib.DATASET_NAMES,
            "optimizer": self.optimizer in OPTIMIZERS,
            "loss": self.loss in models.LOSSES,
            "epochs": self.epochs >= 1,
            "batch_size": self.batch_size >= 1,
            "cg_batch_size": self.cg_batch_size is None or self.cg_batch_size >= 1,
            "cg_chunk_size": self.cg_chunk_size >= 0,
            "lr": self.lr > 0,
            "swap_epoch": self.swap_epoch >= 0,
            "fallback": self.fallback in FALLBACKS,
            "max_failures": self.max_failures >= 1,
            "swap_rule": self.swap_rule in SWAP_RULES,
            "curvature_every": self.curvature_every >= 0,
            "curvature_iterations": self.curvature_iterations >= 1,
            "curvature_batch": self.curvature_batch >= 1,
            "keep_epochs": all(e >= 0 for e in self.keep_epochs),
            "keep_detected": not self.keep_detected or self.optimizer == "adam",
            "prefix_epoch": self.prefix_run is None
            or (
                self.optimizer in SPLIT_OPTIMIZERS
                and 0 <= self.prefix_epoch < self.epochs
                and (
                    self.optimizer == "two-phase"
                    or self.prefix_epoch + 1 == self.swap_epoch
                )
            ),
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"Invalid setting(s) {bad} in {self}.")
        swap_rule(self)  # The rule's settings: tpo.swap's factories check them.


def make_optimizer(
    config: Config, adam_steps_per_epoch: int, mini_batch_cg: bool = False
):
    """The optax transformation for ``config.optimizer``.

    CG on mini-batches searches with values only and keeps the previous
    gradient: a gradient stored by the line search belongs to the last batch,
    and the next step, on another batch, could not use it.
    """
    adam = optax.adam(config.lr)
    if config.optimizer == "adam":
        return adam
    if config.optimizer == "adam-cosine":
        steps = config.epochs * adam_steps_per_epoch
        return optax.adam(optax.cosine_decay_schedule(config.lr, steps))
    cg = tpo.conjugate_gradient(
        linesearch=tpo.slope_linesearch() if mini_batch_cg else None
    )
    if config.optimizer == "cg":
        return cg
    if config.optimizer in ("two-phase-fixed", "adam-lbfgs") and not config.prefix_run:
        rule = tpo.swap.at_step(config.swap_epoch * adam_steps_per_epoch)
    else:
        # A tail (prefix_run) starts in the second phase, where the rule plays
        # no part: with the detected swap's rule the tails of every budget
        # and the detected swap's are one program, compiled once.
        rule = swap_rule(config, adam_steps_per_epoch)
    return tpo.two_phase(
        adam,
        optax.lbfgs() if config.optimizer == "adam-lbfgs" else cg,
        swap=rule,
        fallback=config.fallback,
        max_failures=config.max_failures,
    )


def swap_rule(config: Config, steps_per_epoch: int | None = None) -> tpo.swap.SwapRule:
    """``config.swap_rule`` and its settings as a ``tpo.swap`` rule.

    Read once per epoch of ``steps_per_epoch`` steps; ``None``: the rule
    without its window, for :func:`tpo.swap.replay` on per-epoch rows. The
    one place where the command line's rules become ``tpo.swap`` objects.
    """
    return _swap_rule(
        config.swap_rule,
        (config.gn_factor, config.smoothing, config.patience, config.min_rise),
        (config.plateau_rtol, config.plateau_patience, config.plateau_smoothing),
        (config.fit_errors, config.fit_patience),
        steps_per_epoch,
    )


@functools.lru_cache(maxsize=32)
def _swap_rule(name, peak, plateau, fitted, steps_per_epoch) -> tpo.swap.SwapRule:
    # Cached: the same settings give the same rule object, whose replay
    # compiles once.
    gn_factor, smoothing, patience, min_rise = peak
    peak = tpo.swap.peak(
        gn_factor, smoothing=smoothing, patience=patience, min_rise=min_rise
    )
    rtol, patience, smoothing = plateau
    plateau = tpo.swap.plateau(rtol, patience=patience, smoothing=smoothing)
    fitted = tpo.swap.fitted(fitted[0], patience=fitted[1])
    rule = {
        "peak": peak,
        "plateau": plateau,
        "peak-then-plateau": tpo.swap.after(peak, plateau),
        "fit": fitted,
        "fit-or-plateau": tpo.swap.any_of(fitted, plateau),
    }[name]
    if steps_per_epoch is None:
        return rule
    return tpo.swap.per_window(rule, steps=steps_per_epoch)


def linesearch_forward_passes(linesearch_state: Any) -> jax.Array:
    """What a line search cost, in forward passes over its batch.

    A value is 1, a value and gradient 3: the slope search counts its trials
    with a gradient (``info.num_gradients``), optax's zoom search evaluates
    both at every trial, and the golden section only values.
    """
    info = linesearch_state.info
    if hasattr(info, "num_gradients"):
        values = info.num_evaluations - info.num_gradients
        return VALUE * values + VALUE_AND_GRAD * info.num_gradients
    if hasattr(info, "num_linesearch_steps"):  # optax's zoom search
        return VALUE_AND_GRAD * info.num_linesearch_steps
    return VALUE * info.num_evaluations


def rows_mask(mask: jax.Array, values: jax.Array) -> jax.Array:
    """``mask`` (one entry per example) shaped to multiply per-label ``values``."""
    return mask.reshape(mask.shape + (1,) * (values.ndim - 1))


def stores_gradient(opt_state: Any) -> bool:
    """Whether ``optax.value_and_grad_from_state`` can read ``opt_state``."""
    linesearch = tpo.find_linesearch_state(opt_state)
    return getattr(linesearch, "grad", None) is not None


def in_second_phase(config: Config, opt_state: Any) -> bool:
    """Whether the next step runs CG (read on the host, once per epoch)."""
    if config.optimizer in ADAM_OPTIMIZERS:
        return False
    if config.optimizer == "cg":
        return True
    return bool(opt_state.in_second_phase)


class Trainer:
    """Model, data, jitted steps and the resumable epoch loop of one run."""

    def __init__(self, config: Config):
        config.validate()
        self.config = config
        self.data = data_lib.load(config.dataset, config.data_dir)
        model = models.create_model(
            config.model,
            config.dataset,
            self.data.image_shape,
            self.data.num_classes,
            config.seed,
        )
        self.num_params = models.parameter_count(model)
        self.graphdef, params, self.rest = nnx.split(model, nnx.Param, ...)
        params = nnx.to_pure_dict(params)
        self.mesh = sharding.make_mesh(sharding.parse_mesh(config.mesh))
        self.data_parallel = self.mesh.shape["data"]
        params_shardings = sharding.params_shardings(self.mesh, params)
        self.params = jax.device_put(params, params_shardings)
        n_train = len(self.data.x_train)
        self.cg_batch_size = min(config.cg_batch_size or n_train, n_train)
        # Chunks split evenly over the data axis: a multiple of its devices.
        self.cg_chunk_size = config.cg_chunk_size and max(
            self.data_parallel,
            config.cg_chunk_size - config.cg_chunk_size % self.data_parallel,
        )
        self.adam_steps = data_lib.num_batches(n_train, config.batch_size)
        self.tx = make_optimizer(
            config, self.adam_steps, mini_batch_cg=self.cg_batch_size < n_train
        )
        # A full-batch CG step starts where the last line search ended, on the
        # same data: its value and gradient are in the state. On mini-batches
        # they belong to another batch, so every step computes its own.
        self.reuse_gradient = (
            config.optimizer not in ADAM_OPTIMIZERS
            and self.cg_batch_size == n_train
            and stores_gradient(self.tx.init(params))
        )
        state_shardings = sharding.state_shardings(self.mesh, self.tx, self.params)
        self.shardings = (params_shardings, state_shardings)
        self.opt_state = jax.device_put(self.tx.init(self.params), state_shardings)
        self.loss_fn = models.LOSSES[config.loss]
        # The state keeps its sharding: the outputs are pinned to the inputs'.
        replicated = sharding.replicated(self.mesh)
        out_shardings = (
            params_shardings,
            state_shardings,
            params_shardings,
            replicated,
        )
        # Adam epochs compute every gradient, exactly as the Adam run does (so
        # two-phase before the swap repeats it bit for bit); CG epochs take
        # the one the line search left, where there is one.
        self.train_step = jax.jit(
            functools.partial(self._train_step, reuse=False),
            out_shardings=out_shardings,
        )
        self.cg_train_step = jax.jit(
            functools.partial(
                self._train_step, reuse=self.reuse_gradient, chunked=True
            ),
            out_shardings=out_shardings,
        )
        self.compiled_steps = set()
        self.evaluate_batch = jax.jit(self._evaluate_batch)
        self.probe_curvature = jax.jit(self._probe_curvature)
        # Simulated CPU devices share a few cores; steps dispatched ahead of time
        # can starve the threads an all-reduce waits for (see docs/scaling.md).
        self.block_every_step = (
            jax.default_backend() == "cpu" and self.mesh.devices.size > 1
        )

    # -- the maths ---------------------------------------------------------
    def apply(self, params, images):
        model = nnx.merge(self.graphdef, nnx.State(params), self.rest)
        return model(images)

    def batch_loss(self, params, images, labels, mask=None):
        """The mean loss over the batch; ``mask`` marks real (not padding) rows."""
        outputs = self.apply(params, images)
        if mask is None:
            return self.loss_fn(outputs, labels)
        return jnp.sum(self._per_example(outputs, labels) * mask) / jnp.sum(mask)

    def batch_loss_and_errors(self, params, images, labels, mask=None):
        """The mean loss and how many examples the same forward pass gets wrong."""
        outputs = self.apply(params, images)
        wrong = jnp.argmax(outputs, -1) != labels
        if mask is None:
            return self.loss_fn(outputs, labels), jnp.sum(wrong, dtype=jnp.int32)
        loss = jnp.sum(self._per_example(outputs, labels) * mask) / jnp.sum(mask)
        return loss, jnp.sum(wrong * rows_mask(mask, wrong)).astype(jnp.int32)

    def _per_example(self, outputs, labels):
        return jax.vmap(lambda o, y: self.loss_fn(o[None], y[None]))(outputs, labels)

    def num_chunks(self, rows: int) -> int:
        """How many chunks a CG batch of ``rows`` images is evaluated in."""
        if not self.cg_chunk_size or rows <= self.cg_chunk_size:
            return 1
        return -(-rows // self.cg_chunk_size)

    def cg_loss(self, params, images, labels, mask=None):
        """:meth:`batch_loss` evaluated in chunks of at most ``cg_chunk_size``.

        The value ``value_fn`` of CG and L-BFGS steps: the same mean, with the
        activations of one chunk live at a time (``tpo.chunked_loss``). With a
        mask (several devices) each chunk sums its real rows' losses; the
        padding that :meth:`place` added, fewer than chunks x devices rows,
        is taken out of the mean.
        """
        rows = labels.shape[0]
        if self.num_chunks(rows) == 1:
            return self.batch_loss(params, images, labels, mask)
        if mask is None:
            return tpo.chunked_loss(self.batch_loss, self.cg_chunk_size)(
                params, images, labels
            )

        def loss_per_row(params, images, labels, mask):
            outputs = self.apply(params, images)
            losses = self._per_example(outputs, labels) * mask
            return jnp.sum(losses) / mask.shape[0]

        chunked = tpo.chunked_loss(loss_per_row, self.cg_chunk_size)
        return chunked(params, images, labels, mask) * rows / jnp.sum(mask)

    def place(self, images, labels, chunked=False):
        """A batch as global arrays split over the data axis, with its mask.

        With several data-parallel devices the batch is padded to a multiple of
        their number and the padding masked out, so every device count sees the
        same examples; on one device it goes as it is (``mask`` is ``None``).
        A ``chunked`` (CG) batch is padded to a multiple of chunks x devices,
        so that every device evaluates its own rows of each chunk.
        """
        mask = None
        if self.data_parallel > 1:
            multiple = self.data_parallel
            if chunked:
                multiple *= self.num_chunks(len(labels))
            n, pad = len(labels), -len(labels) % multiple
            images = np.concatenate(
                [images, np.zeros((pad, *images.shape[1:]), images.dtype)]
            )
            labels = np.concatenate(
                [labels, np.zeros((pad, *labels.shape[1:]), labels.dtype)]
            )
            mask = (np.arange(n + pad) < n).astype(np.float32)
            mask = sharding.global_batch(self.mesh, mask)
        return (
            sharding.global_batch(self.mesh, images),
            sharding.global_batch(self.mesh, labels),
            mask,
        )

    def zero_grad_sum(self):
        """The float32 sum of an epoch's gradients, before its first step."""
        return optax.tree.zeros_like(self.params, dtype=jnp.float32)

    def _train_step(
        self, params, opt_state, grad_sum, images, labels, mask, reuse, chunked=False
    ):
        # CG and L-BFGS steps evaluate large batches in chunks.
        value_fn = self.cg_loss if chunked else self.batch_loss
        if self.config.optimizer in SPLIT_OPTIMIZERS:
            ran_cg = opt_state.in_second_phase
        else:
            ran_cg = jnp.asarray(self.config.optimizer == "cg")
        if reuse:
            # The line search left the value and gradient at these params.
            stored = optax.tree.get(opt_state, "value")
            start_cost = jnp.where(jnp.isfinite(stored), 0.0, VALUE_AND_GRAD)
            value, grad = optax.value_and_grad_from_state(value_fn)(
                params, images, labels, mask, state=opt_state
            )
            errors = jnp.asarray(-1, jnp.int32)  # No forward pass of its own.
        elif chunked and self.num_chunks(labels.shape[0]) > 1:
            start_cost = jnp.asarray(VALUE_AND_GRAD, jnp.float32)
            value, grad = jax.value_and_grad(value_fn)(params, images, labels, mask)
            errors = jnp.asarray(-1, jnp.int32)  # Not counted in chunks.
        else:
            start_cost = jnp.asarray(VALUE_AND_GRAD, jnp.float32)
            (value, errors), grad = jax.value_and_grad(
                self.batch_loss_and_errors, has_aux=True
            )(params, images, labels, mask)
        updates, opt_state = self.tx.update(
            grad,
            opt_state,
            params,
            value=value,
            grad=grad,
            value_fn=value_fn,
            images=images,
            labels=labels,
            mask=mask,
            # The fit rules' count (two_phase's own argument); CG steps that
            # reuse the search's gradient count none.
            **(
                {"num_errors": jnp.maximum(errors, 0)}
                if self.config.optimizer in SPLIT_OPTIMIZERS
                else {}
            ),
        )
        linesearch = tpo.find_linesearch_state(opt_state)
        if linesearch is None:
            evaluations, step_size = (
                jnp.zeros((), jnp.int32),
                jnp.asarray(self.config.lr),
            )
            failed = jnp.asarray(False)
            gradients = jnp.zeros((), jnp.int32)
            cost = start_cost
        else:
            searched, with_grad = tpo.linesearch_evaluations(linesearch)
            evaluations = jnp.where(ran_cg, searched, 0)
            step_size = jnp.where(ran_cg, linesearch.learning_rate, self.config.lr)
            # After a fallback the fresh CG state reads "not failed": right, as
            # that step ran Adam.
            failed = ran_cg & tpo.linesearch_failed(linesearch, updates)
            gradients = jnp.where(ran_cg, with_grad, 0)
            cost = start_cost + jnp.where(
                ran_cg, linesearch_forward_passes(linesearch), 0.0
            )
        grad_sum = optax.tree.add(grad_sum, optax.tree.cast(grad, jnp.float32))
        stats = {
            "evaluations": evaluations,
            "gradients": gradients,
            "step_size": step_size,
            "failed": failed,
            "forward_passes": cost,
            "value": value,
            "errors": errors,
        }
        return optax.apply_updates(params, updates), opt_state, grad_sum, stats

    def _evaluate_batch(self, params, images, labels, mask):
        outputs = self.apply(params, images)
        hits = jnp.argmax(outputs, -1) == labels
        if mask is None:
            return self.loss_fn(outputs, labels) * len(labels), jnp.sum(hits)
        loss_sum = jnp.sum(self._per_example(outputs, labels) * mask)
        return loss_sum, jnp.sum(hits * rows_mask(mask, hits))

    def _probe_curvature(self, params, images, labels, mask):
        extremes = tpo.curvature.hessian_extremes(
            lambda p: self.batch_loss(p, images, labels, mask),
            params,
            self.config.curvature_iterations,
        )
        return extremes.lambda_min, extremes.lambda_max

    def curvature(self) -> dict[str, float]:
        """Extreme Hessian eigenvalues of the loss on the fixed probe batch.

        The probe batch is the first ``curvature_batch`` training images, the
        same at every probe, so that the estimates are comparable over time.
        """
        n = self.config.curvature_batch
        batch = self.place(self.data.x_train[:n], self.data.y_train[:n])
        lambda_min, lambda_max = self.probe_curvature(self.params, *batch)
        return {"lambda_min": float(lambda_min), "lambda_max": float(lambda_max)}

    def evaluate(self, x, y) -> tuple[float, float]:
        loss_sum, correct = 0.0, 0
        for start in range(0, len(x), EVAL_BATCH):
            batch = self.place(
                x[start : start + EVAL_BATCH], y[start : start + EVAL_BATCH]
            )
            batch_loss, batch_correct = self.evaluate_batch(self.params, *batch)
            loss_sum += float(batch_loss)
            correct += int(batch_correct)
        # The mean loss per example (per character for text, whose sequences
        # are all as long), and the fraction of labels predicted right.
        return loss_sum / len(x), correct / y.size

    def start_from(self, run: str, epoch: int, counters: dict[str, float]) -> None:
        """Takes the end of epoch ``epoch`` of the Adam run in ``run`` as the
        state before this run's swap.

        The parameters and the counters (compute, time, compile time) are the
        Adam run's; the state is the one a two-phase run with that Adam prefix
        holds when its second phase begins: the swap made at the end of that
        epoch, the second phase about to start from a fresh state. Nothing of
        the first phase's state is read after the swap, so the next steps are
        those of the uninterrupted two-phase run (see ``experiments/study.py``).
        """
        adam_like = (self.params, optax.adam(self.config.lr).init(self.params))
        manager = open_checkpoints(pathlib.Path(run).absolute(), KEPT, None)
        restored = restore_checkpoint(manager, adam_like, counters, epoch=epoch)
        manager.close()
        if restored is None:
            raise RunOutputError(
                f"The Adam run in {run} keeps no checkpoint of epoch {epoch} "
                f"(kept: {_kept_epochs(run)}). Train it again with that epoch "
                "in keep_epochs."
            )
        params = restored[1][0]
        swap_step = jnp.asarray((epoch + 1) * self.adam_steps, jnp.int32)
        state = self.tx.init(params)._replace(
            count=swap_step, in_second_phase=jnp.asarray(True), swap_step=swap_step
        )
        self.params, self.opt_state = jax.device_put((params, state), self.shardings)

    # -- one epoch ---------------------------------------------------------
    def compile_outside_the_clock(self, step, args) -> float:
        """Compiles ``step`` for ``args``' shapes the first time they come.

        One call whose results are discarded (the step is a pure function), so
        that the timed calls find it compiled; returns the seconds it took, to
        be taken off the epoch's time, or 0 when it was compiled before.
        """
        key = (step is self.cg_train_step, tuple(np.shape(a) for a in args[3:]))
        if key in self.compiled_steps:
            return 0.0
        start = time.perf_counter()
        jax.block_until_ready(step(*args))
        self.compiled_steps.add(key)
        return time.perf_counter() - start

    def _last_step_size(self, stats, epoch: int) -> float:
        if self.config.optimizer == "adam-cosine":  # The rate the schedule gave.
            steps = self.config.epochs * self.adam_steps
            schedule = optax.cosine_decay_schedule(self.config.lr, steps)
            return float(schedule((epoch + 1) * self.adam_steps - 1))
        return float(stats[-1]["step_size"])

    def run_epoch(self, epoch: int) -> dict[str, Any]:
        cg_epoch = in_second_phase(self.config, self.opt_state)
        batch_size = self.cg_batch_size if cg_epoch else self.config.batch_size
        n_train = len(self.data.x_train)
        grad_sum = self.zero_grad_sum()
        stats, sizes = [], []
        compile_seconds = 0.0
        start = time.perf_counter()
        for images, labels in data_lib.batches(
            self.data.x_train, self.data.y_train, batch_size, self.config.seed, epoch
        ):
            # Every host holds the whole batch and places its own shards.
            step = self.cg_train_step if cg_epoch else self.train_step
            batch = self.place(images, labels, chunked=cg_epoch)
            args = (self.params, self.opt_state, grad_sum, *batch)
            compile_seconds += self.compile_outside_the_clock(step, args)
            self.params, self.opt_state, grad_sum, step_stats = step(*args)
            if self.block_every_step:
                jax.block_until_ready(step_stats)
            _stop_if_requested(epoch)
            stats.append(step_stats)
            sizes.append(len(labels))
        stats = jax.device_get(stats)  # Waits for the last step.
        seconds = time.perf_counter() - start - compile_seconds
        # The reading is bookkeeping, outside the clock: its first eager norm
        # compiles a few small programs (1.5 s on vit-mlp), which would land
        # in the first epoch of every run.
        reading = float(optax.tree.norm(grad_sum)) / len(sizes)
        evaluations = np.array([s["evaluations"] for s in stats])
        step_costs = np.array([s["forward_passes"] for s in stats])
        forward_passes = float(np.sum(np.array(sizes) * step_costs) / n_train)
        values = np.array([s["value"] for s in stats], np.float64)
        errors = np.array([s["errors"] for s in stats])
        return {
            "phase": int(cg_epoch),
            "gn_reading": reading,
            "step_size": self._last_step_size(stats, epoch),
            "linesearch_evaluations": int(evaluations.sum()),
            "linesearch_gradients": int(sum(s["gradients"] for s in stats)),
            "linesearch_failures": int(sum(s["failed"] for s in stats)),
            "steps": len(sizes),
            # What the steps saw for free, before their updates: the mean batch
            # loss (the values two_phase receives) and, in Adam epochs, the
            # training examples their own forward passes got wrong.
            "batch_loss": float(np.sum(np.array(sizes) * values) / n_train),
            "batch_errors": None if (errors < 0).any() else int(errors.sum()),
            "epoch_forward_passes": forward_passes,
            "epoch_seconds": seconds,
            "epoch_compile_seconds": compile_seconds,
        }


# -- stopping on SIGTERM ---------------------------------------------------
STOP_REQUESTED = threading.Event()


class Interrupted(RuntimeError):
    """The run was asked to stop (SIGTERM) and stopped between two steps."""


def _request_stop(signum, frame) -> None:
    # Only a flag: the epoch loop stops at the next step, never in the middle
    # of writing a checkpoint or a metrics row.
    STOP_REQUESTED.set()


def _stop_if_requested(epoch: int) -> None:
    if STOP_REQUESTED.is_set():
        STOP_REQUESTED.clear()
        raise Interrupted(
            f"Stopped by SIGTERM during epoch {epoch}; the checkpoints written "
            "so far are intact. Continue with --resume."
        )


# -- metrics ------------------------------------------------------------
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


def train(config: Config) -> list[dict[str, Any]]:
    """Runs (or resumes) one training run; returns all its metrics rows.

    Across hosts (``config.distributed``) every process runs this with the same
    config and ``out`` on a shared file system; process 0 writes the metrics.
    """
    if config.distributed:
        jax.distributed.initialize(
            config.coordinator, config.num_processes, config.process_id
        )
    chief = jax.process_index() == 0
    out = pathlib.Path(config.out).absolute()
    trainer = Trainer(config)
    metrics_path = out / "metrics.jsonl"
    if chief:
        config_json = json.dumps(dataclasses.asdict(config), indent=2)
        try:
            out.mkdir(parents=True, exist_ok=True)
            (out / "config.json").write_text(config_json)
        except OSError as error:
            raise RunOutputError(
                f"Cannot write to the output directory {out}: {error}. Choose a "
                "writable --out."
            ) from error
        if not config.resume:
            # A fresh run replaces an earlier one in the same directory.
            shutil.rmtree(out / "checkpoints", ignore_errors=True)
            metrics_path.unlink(missing_ok=True)
    sync_hosts("cleared the run directory")
    manager = open_checkpoints(out)
    kept = open_checkpoints(out, KEPT, max_to_keep=None)
    counters = {"forward_passes": 0.0, "wall_time": 0.0, "compile_time": 0.0}
    first_epoch = 0
    if config.resume:
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
    if first_epoch == 0 and config.prefix_run is not None:
        # A second phase that starts from the Adam run's checkpoint: its rows
        # up to there are the Adam run's.
        trainer.start_from(config.prefix_run, config.prefix_epoch, counters)
        first_epoch = config.prefix_epoch + 1
        prefix = read_metrics(pathlib.Path(config.prefix_run) / "metrics.jsonl")
        rows = [r for r in prefix if r["epoch"] < first_epoch]
        if chief:
            metrics_path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    trainer.rows = read_metrics(metrics_path)
    trainer.detection = None

    bar = tqdm(
        range(first_epoch, config.epochs),
        initial=first_epoch,
        total=config.epochs,
        desc=f"{config.label}{config.model} {config.optimizer}",
        disable=not (config.progress and chief),
        file=sys.stderr,
    )
    try:
        for epoch in bar:
            _train_epoch(trainer, epoch, counters, manager, metrics_path, bar)
            if epoch in config.keep_epochs or detected_at(trainer, epoch):
                state = (trainer.params, trainer.opt_state)
                save_checkpoint(kept, epoch, state, counters)
    finally:
        bar.close()
    manager.close()
    kept.close()
    sync_hosts("wrote the last metrics")
    return read_metrics(metrics_path)


KEPT = "kept"  # The directory of the checkpoints kept for good.


def _kept_epochs(run: str) -> list[int]:
    return sorted(int(p.name) for p in (pathlib.Path(run) / KEPT).glob("[0-9]*"))


# What tpo.swap.replay reads, and the metrics field that records it per epoch.
RECORDS = {
    "value": "batch_loss",
    "grad_norm": "gn_reading",
    "num_errors": "batch_errors",
}


def replayed_swap(
    config: Config, rows: list[dict[str, Any]], length: int | None = None
) -> int | None:
    """The epoch after which a two-phase run with ``config``'s swap rule swaps,
    replayed on an Adam run's metrics ``rows``; ``None`` if not within them.

    Before its swap a two-phase run is the Adam run, so its rule sees what
    the Adam run recorded: the gradient-norm readings, the mean batch losses
    and the training examples the steps got wrong, which
    :func:`tpo.swap.replay` runs through the rule's own code. ``length``
    pads the rows (with the last) to a fixed length, so the replay compiles
    once.
    """
    if length is not None:
        rows = rows + rows[-1:] * (length - len(rows))
    rule = swap_rule(config)
    return tpo.swap.replay(rule, **records(rule, rows))


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


def detected_at(trainer: Trainer, epoch: int) -> bool:
    """Whether ``config.keep_detected`` and epoch ``epoch`` is the one after
    which a two-phase run with the config's swap rule swaps
    (:func:`replayed_swap` on the run's rows so far)."""
    config = trainer.config
    if not config.keep_detected:
        return False
    if trainer.detection is not None:  # It fires once.
        return trainer.detection == epoch
    # One length for every call (the rows padded to the budget), so the
    # replay compiles once; rows after ``epoch`` cannot move an earlier swap.
    detection = replayed_swap(config, trainer.rows[: epoch + 1], config.epochs)
    if detection is not None and detection <= epoch:
        trainer.detection = detection
    return detection == epoch


def _train_epoch(trainer, epoch, counters, manager, metrics_path, bar) -> None:
    """One epoch: the steps, the evaluation, a metrics row and a checkpoint."""
    row = trainer.run_epoch(epoch)
    counters["forward_passes"] += row.pop("epoch_forward_passes")
    counters["wall_time"] += row.pop("epoch_seconds")
    counters["compile_time"] += row.pop("epoch_compile_seconds")
    train_loss, train_acc = trainer.evaluate(trainer.data.x_train, trainer.data.y_train)
    val_loss, val_acc = trainer.evaluate(trainer.data.x_val, trainer.data.y_val)
    every = trainer.config.curvature_every
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
    if trainer.data.is_text and trainer.config.loss == "xent":
        # Bits per character: the cross-entropy per character in base 2.
        row["train_bpc"] = train_loss / np.log(2.0)
        row["val_bpc"] = val_loss / np.log(2.0)
    if jax.process_index() == 0:
        append_metrics(metrics_path, row)
    trainer.rows.append(row)
    save_checkpoint(manager, epoch, (trainer.params, trainer.opt_state), counters)
    bar.set_postfix(
        loss=f"{train_loss:.2e}", val_acc=f"{val_acc:.3f}", phase=row["phase"]
    )


def add_loss_argument(parser: argparse.ArgumentParser) -> None:
    """``--loss``, shared by the scripts that train."""
    parser.add_argument(
        "--loss",
        default=models.DEFAULT_LOSS,
        choices=tuple(models.LOSSES),
        help="softmax_mse (default): MSE of the softmax outputs against one-hot "
        "targets; mse: MSE of the raw outputs; xent: cross-entropy",
    )


def parse_args(argv: list[str] | None = None) -> Config:
    defaults = Config()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=defaults.model, choices=models.MODEL_NAMES)
    parser.add_argument(
        "--dataset", default=defaults.dataset, choices=data_lib.DATASET_NAMES
    )
    parser.add_argument("--optimizer", default=defaults.optimizer, choices=OPTIMIZERS)
    parser.add_argument("--epochs", type=cli.integer(1), default=defaults.epochs)
    parser.add_argument(
        "--batch-size", type=cli.integer(1), default=defaults.batch_size
    )
    parser.add_argument(
        "--cg-batch-size",
        type=cli.integer(1),
        default=None,
        help="batch size of the CG phase (default: the whole training set)",
    )
    parser.add_argument(
        "--cg-chunk-size",
        type=cli.integer(0),
        default=defaults.cg_chunk_size,
        help="CG and L-BFGS evaluate batches larger than this in chunks of at "
        f"most this many images, in bounded memory (default "
        f"{DEFAULT_CG_CHUNK_SIZE}: at most 8 GiB for every model on MNIST and "
        "CIFAR); 0: in one pass",
    )
    parser.add_argument("--lr", type=cli.POSITIVE, default=defaults.lr)
    add_loss_argument(parser)
    parser.add_argument(
        "--gn-factor",
        type=cli.FRACTION,
        default=defaults.gn_factor,
        help="two-phase: swap once the smoothed reading falls to this fraction "
        "of its maximum, in (0, 1) (the paper's 0.9 is for raw readings)",
    )
    parser.add_argument(
        "--smoothing",
        type=cli.number(0.0, 1.0, low_open=True),
        default=defaults.smoothing,
        help="two-phase: weight of the newest reading in the moving average, "
        "in (0, 1]; 1 tests the raw reading",
    )
    parser.add_argument(
        "--patience",
        type=cli.integer(1),
        default=defaults.patience,
        help="two-phase: readings in a row below the threshold before the swap",
    )
    parser.add_argument(
        "--min-rise",
        type=cli.number(1.0),
        default=defaults.min_rise,
        help="two-phase: no fall counts before the maximum is this multiple of "
        "the first reading (>= 1)",
    )
    parser.add_argument(
        "--paper-rule",
        action="store_true",
        help="two-phase: Algorithm 1 as printed (same as --swap-rule peak "
        "--gn-factor 0.9 --smoothing 1 --patience 1 --min-rise 1)",
    )
    parser.add_argument(
        "--swap-rule",
        default=defaults.swap_rule,
        choices=SWAP_RULES,
        help="two-phase: what decides the swap: the gradient-norm peak, the "
        "loss plateau, the plateau once the peak has fired, fit (epochs whose "
        "steps got at most --fit-errors training examples wrong), or fit or "
        "the plateau, whichever comes first",
    )
    parser.add_argument(
        "--plateau-rtol",
        type=cli.number(0.0, 1.0, high_open=True),
        default=defaults.plateau_rtol,
        help="two-phase, plateau rules: the relative fall of the smoothed "
        "epoch loss that counts as progress, in [0, 1)",
    )
    parser.add_argument(
        "--plateau-patience",
        type=cli.integer(1),
        default=defaults.plateau_patience,
        help="two-phase, plateau rules: epochs without progress before the swap",
    )
    parser.add_argument(
        "--plateau-smoothing",
        type=cli.number(0.0, 1.0, low_open=True),
        default=defaults.plateau_smoothing,
        help="two-phase, plateau rules: weight of the newest epoch's mean loss "
        "in the moving average, in (0, 1]",
    )
    parser.add_argument(
        "--fit-errors",
        type=cli.integer(0),
        default=defaults.fit_errors,
        help="two-phase, fit rule: the most training examples an epoch may get "
        "wrong (0: all right)",
    )
    parser.add_argument(
        "--fit-patience",
        type=cli.integer(1),
        default=defaults.fit_patience,
        help="two-phase, fit rules: fitted epochs in a row before the swap",
    )
    parser.add_argument(
        "--swap-epoch",
        type=cli.integer(0),
        default=defaults.swap_epoch,
        help="first CG epoch of two-phase-fixed",
    )
    parser.add_argument(
        "--fallback",
        default="none",
        choices=("none", "first"),
        help="two-phase: after --max-failures failed line searches in a row, "
        "stay in CG ('none', the default) or return to Adam ('first')",
    )
    parser.add_argument(
        "--max-failures", type=cli.integer(1), default=defaults.max_failures
    )
    parser.add_argument(
        "--curvature-every",
        type=cli.integer(0),
        default=0,
        help="every N epochs record the smallest and largest Hessian "
        "eigenvalue of the loss on a fixed probe batch (Lanczos); 0: never",
    )
    parser.add_argument(
        "--curvature-iterations",
        type=cli.integer(1),
        default=defaults.curvature_iterations,
        help="Lanczos steps (Hessian-vector products) per curvature probe",
    )
    parser.add_argument(
        "--curvature-batch",
        type=cli.integer(1),
        default=defaults.curvature_batch,
        help="images in the fixed curvature probe batch",
    )
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--out", default=None, help="default: runs/DATASET/MODEL/OPT")
    parser.add_argument("--data-dir", default=None, help="TFDS data directory")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    parser.add_argument(
        "--mesh",
        default=None,
        help="device mesh 'data=N[,model=M]' (default: data-parallel over all "
        "devices); the model axis splits parameters along their last dimension",
    )
    parser.add_argument(
        "--distributed",
        action="store_true",
        help="multi-host: call jax.distributed.initialize() first (one process "
        "per host; see docs/scaling.md)",
    )
    parser.add_argument(
        "--coordinator",
        default=None,
        help="with --distributed: process 0's host:port (default: detected from "
        "the cluster environment, e.g. SLURM or a TPU pod)",
    )
    parser.add_argument("--num-processes", type=cli.integer(1), default=None)
    parser.add_argument("--process-id", type=cli.integer(0), default=None)
    args = vars(parser.parse_args(argv))
    check_model_fits_dataset(parser, args["model"], args["dataset"])
    args["fallback"] = None if args["fallback"] == "none" else args["fallback"]
    if args.pop("paper_rule"):
        args.update(PAPER_RULE)
    if args["out"] is None:
        args["out"] = f"runs/{args['dataset']}/{args['model']}/{args['optimizer']}"
    return Config(**args)


def check_model_fits_dataset(
    parser, model: str, dataset: str, flag: str = "--model"
) -> None:
    """A text model on images, or an image model on text, is a usage error."""
    text = dataset in data_lib.TEXT_NAMES
    if (model in models.TEXT_VARIANTS) != text:
        choices = models.TEXT_VARIANTS if text else models.IMAGE_MODEL_NAMES
        parser.error(
            f"argument {flag}: {model!r} does not fit --dataset {dataset!r}; "
            f"choose one of {tuple(choices)}"
        )


def main(argv: list[str] | None = None) -> None:
    config = parse_args(argv)
    previous = signal.signal(signal.SIGTERM, _request_stop)
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
        f"{config.model} {config.optimizer}: train loss {last['train_loss']:.4g}, "
        f"val acc {last['val_acc']:.3f} after {len(rows)} epochs; {config.out}"
    )


if __name__ == "__main__":
    main()
