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

from experiments import data as data_lib
from experiments import models
from experiments import sharding
from experiments import steps
from experiments.checkpoints import KEPT
from experiments.checkpoints import RunOutputError
from experiments.checkpoints import kept_epochs
from experiments.checkpoints import open_checkpoints
from experiments.checkpoints import restore_checkpoint
from experiments.config import Config
from experiments.config import make_optimizer
from experiments.run_records import replayed_swap

EVAL_BATCH = 2048


def in_second_phase(config: Config, opt_state: Any) -> bool:
    """Whether the next step runs CG (read on the host, once per epoch)."""
    if not config.optimizer.variant.has_second_phase:
        return False
    if config.optimizer.variant.first is None:
        return True
    return bool(opt_state.in_second_phase)


class Trainer:
    """Model, data, jitted steps and the resumable epoch loop of one run."""

    def __init__(self, config: Config):
        config.validate()
        self.config = config
        self.data = data_lib.load(config.run.dataset, config.run.data_dir)
        model = models.create_model(
            config.run.model,
            config.run.dataset,
            self.data.image_shape,
            self.data.num_classes,
            config.run.seed,
        )
        self.num_params = models.parameter_count(model)
        self.graphdef, params, self.rest = nnx.split(model, nnx.Param, ...)
        params = nnx.to_pure_dict(params)
        self.mesh = sharding.make_mesh(sharding.parse_mesh(config.mesh.spec))
        self.data_parallel = self.mesh.shape["data"]
        params_shardings = sharding.params_shardings(self.mesh, params)
        self.params = jax.device_put(params, params_shardings)
        n_train = len(self.data.x_train)
        self.cg_batch_size = min(config.optimizer.cg_batch_size or n_train, n_train)
        # Chunks split evenly over the data axis: a multiple of its devices.
        self.cg_chunk_size = config.optimizer.cg_chunk_size and max(
            self.data_parallel,
            config.optimizer.cg_chunk_size
            - config.optimizer.cg_chunk_size % self.data_parallel,
        )
        self.adam_steps = data_lib.num_batches(n_train, config.run.batch_size)
        self.tx = make_optimizer(
            config, self.adam_steps, mini_batch_cg=self.cg_batch_size < n_train
        )
        # A full-batch CG step starts where the last line search ended, on the
        # same data: its value and gradient are in the state. On mini-batches
        # they belong to another batch, so every step computes its own.
        self.reuse_gradient = (
            config.optimizer.variant.has_second_phase
            and self.cg_batch_size == n_train
            and steps.stores_gradient(self.tx.init(params))
        )
        state_shardings = sharding.state_shardings(self.mesh, self.tx, self.params)
        self.shardings = (params_shardings, state_shardings)
        self.opt_state = jax.device_put(self.tx.init(self.params), state_shardings)
        self.losses = steps.ModelLoss(
            self.graphdef,
            self.rest,
            models.LOSSES[config.run.loss],
            self.cg_chunk_size,
        )
        # The losses' maths, as the Trainer's own (tests and benchmarks call them).
        self.apply = self.losses.apply
        self.batch_loss = self.losses.batch_loss
        self.batch_loss_and_errors = self.losses.batch_loss_and_errors
        self.cg_loss = self.losses.cg_loss
        self.num_chunks = self.losses.num_chunks
        # The state keeps its sharding: the outputs are pinned to the inputs'.
        replicated = sharding.replicated(self.mesh)
        out_shardings = (
            params_shardings,
            state_shardings,
            params_shardings,
            replicated,
        )
        step = functools.partial(
            steps.train_step,
            self.losses,
            self.tx,
            config.optimizer.variant,
            config.optimizer.lr,
        )
        # Adam epochs compute every gradient, exactly as the Adam run does (so
        # two-phase before the swap repeats it bit for bit); CG epochs take
        # the one the line search left, where there is one.
        self.train_step = jax.jit(
            functools.partial(step, reuse=False), out_shardings=out_shardings
        )
        self.cg_train_step = jax.jit(
            functools.partial(step, reuse=self.reuse_gradient, chunked=True),
            out_shardings=out_shardings,
        )
        self.compiled_steps = set()
        self.evaluate_batch = jax.jit(functools.partial(steps.eval_step, self.losses))
        self.probe_curvature = jax.jit(
            functools.partial(
                steps.probe_curvature, self.losses, config.probe.iterations
            )
        )
        # Simulated CPU devices share a few cores; steps dispatched ahead of time
        # can starve the threads an all-reduce waits for (see docs/scaling.md).
        self.block_every_step = (
            jax.default_backend() == "cpu" and self.mesh.devices.size > 1
        )
        # The run's metrics rows so far (the run loop appends each epoch's),
        # and the epoch after which the swap rule fires, once found.
        self.rows: list[dict[str, Any]] = []
        self.detection: int | None = None

    # -- data on the mesh ---------------------------------------------------
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

    def curvature(self) -> dict[str, float]:
        """Extreme Hessian eigenvalues of the loss on the fixed probe batch.

        The probe batch is the first ``curvature_batch`` training images, the
        same at every probe, so that the estimates are comparable over time.
        """
        n = self.config.probe.batch
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
        adam_like = (
            self.params,
            optax.adam(self.config.optimizer.lr).init(self.params),
        )
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
        if self.config.optimizer.variant.first == "adam-cosine":  # The schedule's rate.
            steps = self.config.run.epochs * self.adam_steps
            schedule = optax.cosine_decay_schedule(self.config.optimizer.lr, steps)
            return float(schedule((epoch + 1) * self.adam_steps - 1))
        return float(stats[-1]["step_size"])

    def detected_at(self, epoch: int) -> bool:
        """Whether ``config.keep_detected`` and epoch ``epoch`` is the one after
        which a two-phase run with the config's swap rule swaps
        (:func:`replayed_swap` on the run's rows so far)."""
        config = self.config
        if not config.run.keep_detected:
            return False
        if self.detection is not None:  # It fires once.
            return self.detection == epoch
        # One length for every call (the rows padded to the budget), so the
        # replay compiles once; rows after ``epoch`` cannot move an earlier swap.
        detection = replayed_swap(config, self.rows[: epoch + 1], config.run.epochs)
        if detection is not None and detection <= epoch:
            self.detection = detection
        return detection == epoch

    def run_epoch(self, epoch: int) -> dict[str, Any]:
        cg_epoch = in_second_phase(self.config, self.opt_state)
        batch_size = self.cg_batch_size if cg_epoch else self.config.run.batch_size
        n_train = len(self.data.x_train)
        grad_sum = self.zero_grad_sum()
        stats, sizes = [], []
        compile_seconds = 0.0
        start = time.perf_counter()
        for images, labels in data_lib.batches(
            self.data.x_train,
            self.data.y_train,
            batch_size,
            self.config.run.seed,
            epoch,
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
