"""The Trainer: model, data, jitted steps and one epoch of a run.

:class:`Trainer` builds one run's model and optimizer from a
:class:`~experiments.config.Config`, places the data on its mesh (padding and
masks on several devices, chunks for full-batch CG), runs an epoch of jitted
steps with their forward-pass accounting, and evaluates. The epoch loop that
resumes, keeps checkpoints and writes metrics is :func:`experiments.train.train`.
"""

from __future__ import annotations

import functools
import pathlib
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import twophase_optax as tpo
from experiments import data as data_lib
from experiments import models
from experiments import sharding
from experiments.checkpoints import KEPT
from experiments.checkpoints import RunOutputError
from experiments.checkpoints import kept_epochs
from experiments.checkpoints import open_checkpoints
from experiments.checkpoints import restore_checkpoint
from experiments.config import Config
from experiments.config import make_optimizer
from experiments.run_records import replayed_swap

EVAL_BATCH = 2048


VALUE, VALUE_AND_GRAD = 1.0, 3.0  # forward-pass equivalents


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
    if not config.variant.has_second_phase:
        return False
    if config.variant.first is None:
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
            config.variant.has_second_phase
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
        # The run's metrics rows so far (the run loop appends each epoch's),
        # and the epoch after which the swap rule fires, once found.
        self.rows: list[dict[str, Any]] = []
        self.detection: int | None = None

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
        if self.config.variant.two_phases:
            ran_cg = opt_state.in_second_phase
        else:
            ran_cg = jnp.asarray(self.config.variant.first is None)
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
                if self.config.variant.two_phases
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
        those of the uninterrupted two-phase run (see ``experiments/budget_sweep.py``).
        """
        adam_like = (self.params, optax.adam(self.config.lr).init(self.params))
        manager = open_checkpoints(pathlib.Path(run).absolute(), KEPT, None)
        restored = restore_checkpoint(manager, adam_like, counters, epoch=epoch)
        manager.close()
        if restored is None:
            raise RunOutputError(
                f"The Adam run in {run} keeps no checkpoint of epoch {epoch} "
                f"(kept: {kept_epochs(run)}). Train it again with that epoch "
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
        if self.config.variant.first == "adam-cosine":  # The schedule's rate.
            steps = self.config.epochs * self.adam_steps
            schedule = optax.cosine_decay_schedule(self.config.lr, steps)
            return float(schedule((epoch + 1) * self.adam_steps - 1))
        return float(stats[-1]["step_size"])

    def detected_at(self, epoch: int) -> bool:
        """Whether ``config.keep_detected`` and epoch ``epoch`` is the one after
        which a two-phase run with the config's swap rule swaps
        (:func:`replayed_swap` on the run's rows so far)."""
        config = self.config
        if not config.keep_detected:
            return False
        if self.detection is not None:  # It fires once.
            return self.detection == epoch
        # One length for every call (the rows padded to the budget), so the
        # replay compiles once; rows after ``epoch`` cannot move an earlier swap.
        detection = replayed_swap(config, self.rows[: epoch + 1], config.epochs)
        if detection is not None and detection <= epoch:
            self.detection = detection
        return detection == epoch

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
            stop_if_requested(epoch)
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


def request_stop(signum, frame) -> None:
    # Only a flag: the epoch loop stops at the next step, never in the middle
    # of writing a checkpoint or a metrics row.
    STOP_REQUESTED.set()


def stop_if_requested(epoch: int) -> None:
    if STOP_REQUESTED.is_set():
        STOP_REQUESTED.clear()
        raise Interrupted(
            f"Stopped by SIGTERM during epoch {epoch}; the checkpoints written "
            "so far are intact. Continue with --resume."
        )
