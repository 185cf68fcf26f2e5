"""The maths of a run: its losses, and the pure jitted steps built on them.

:class:`ModelLoss` is a model's loss on a batch (with a mask for the padding
that several devices add), the same loss chunked for full-batch CG, and the
count of wrong answers; :func:`train_step`, :func:`eval_step` and
:func:`probe_curvature` are pure functions of the parameters, the optimizer
state and one batch, which :class:`experiments.trainer.Trainer` jits with
their shardings. The step counts its compute as ``tpo.fit`` does: 3 forward
passes for a value and gradient, none where the line search left them
(``tpo.value_and_grad_from_state``), and the search's own cost
(``tpo.linesearch_cost``).

Example:
  >>> import jax.numpy as jnp
  >>> from flax import nnx
  >>> from experiments import models
  >>> model = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
  >>> graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  >>> losses = ModelLoss(graphdef, rest, models.LOSSES["xent"], cg_chunk_size=2)
  >>> params = nnx.to_pure_dict(params)
  >>> images, labels = jnp.ones((5, 2)), jnp.array([0, 1, 2, 0, 1])
  >>> whole = losses.batch_loss(params, images, labels)
  >>> bool(jnp.allclose(losses.cg_loss(params, images, labels), whole))  # 3 chunks
  True
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import twophase_optax as tpo
from experiments import variants

VALUE_AND_GRAD = 3.0  # forward-pass equivalents of a value and its gradient


def rows_mask(mask: jax.Array, values: jax.Array) -> jax.Array:
    """``mask`` (one entry per example) shaped to multiply per-label ``values``."""
    return mask.reshape(mask.shape + (1,) * (values.ndim - 1))


def stores_gradient(opt_state: Any) -> bool:
    """Whether ``tpo.value_and_grad_from_state`` can read ``opt_state``."""
    linesearch = tpo.find_linesearch_state(opt_state)
    return getattr(linesearch, "grad", None) is not None


@dataclasses.dataclass(frozen=True)
class ModelLoss:
    """A Flax NNX model's loss on batches of images, as pure functions of its
    parameters (``nnx.to_pure_dict``).

    ``loss_fn(outputs, labels)``: a mean over the batch (see
    :data:`experiments.models.LOSSES`). ``cg_chunk_size``: the most images
    :meth:`cg_loss` evaluates at once (0: all).
    """

    graphdef: Any
    rest: Any
    loss_fn: Callable[[jax.Array, jax.Array], jax.Array]
    cg_chunk_size: int = 0

    def apply(self, params, images):
        model = nnx.merge(self.graphdef, nnx.State(params), self.rest)
        return model(images)

    def batch_loss(self, params, images, labels, mask=None):
        """The mean loss over the batch; ``mask`` marks real (not padding) rows."""
        outputs = self.apply(params, images)
        if mask is None:
            return self.loss_fn(outputs, labels)
        return jnp.sum(self.per_example(outputs, labels) * mask) / jnp.sum(mask)

    def batch_loss_and_errors(self, params, images, labels, mask=None):
        """The mean loss and how many examples the same forward pass gets wrong."""
        outputs = self.apply(params, images)
        wrong = jnp.argmax(outputs, -1) != labels
        if mask is None:
            return self.loss_fn(outputs, labels), jnp.sum(wrong, dtype=jnp.int32)
        loss = jnp.sum(self.per_example(outputs, labels) * mask) / jnp.sum(mask)
        return loss, jnp.sum(wrong * rows_mask(mask, wrong)).astype(jnp.int32)

    def per_example(self, outputs, labels):
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
        padding, fewer than chunks x devices rows, is taken out of the mean.
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
            losses = self.per_example(outputs, labels) * mask
            return jnp.sum(losses) / mask.shape[0]

        chunked = tpo.chunked_loss(loss_per_row, self.cg_chunk_size)
        return chunked(params, images, labels, mask) * rows / jnp.sum(mask)


def train_step(
    losses: ModelLoss,
    tx: optax.GradientTransformationExtraArgs,
    variant: variants.Variant,
    lr: float,
    params,
    opt_state,
    grad_sum,
    images,
    labels,
    mask,
    *,
    reuse: bool,
    chunked: bool = False,
):
    """One optimizer step on one batch: ``(params, opt_state, grad_sum, stats)``.

    ``reuse``: take the value and gradient the line search left in the state
    (a full-batch second phase, which steps on the same data every time);
    ``chunked``: evaluate with :meth:`ModelLoss.cg_loss` (CG and L-BFGS
    steps). ``grad_sum`` adds up the epoch's gradients in float32, for the
    gradient-norm reading. ``stats``: the line search's evaluations (and those
    with a gradient), its step size, whether it failed, the step's
    forward-pass equivalents on its batch, the batch's value and the
    examples its forward pass got wrong (-1: not counted).
    """
    # CG and L-BFGS steps evaluate large batches in chunks.
    value_fn = losses.cg_loss if chunked else losses.batch_loss
    if variant.two_phases:
        ran_cg = opt_state.in_second_phase
    else:
        ran_cg = jnp.asarray(variant.first is None)
    if reuse:
        # The line search left the value and gradient at these params.
        stored = optax.tree.get(opt_state, "value")
        start_cost = jnp.where(jnp.isfinite(stored), 0.0, VALUE_AND_GRAD)
        value, grad = tpo.value_and_grad_from_state(value_fn)(
            params, images, labels, mask, state=opt_state
        )
        errors = jnp.asarray(-1, jnp.int32)  # No forward pass of its own.
    elif chunked and losses.num_chunks(labels.shape[0]) > 1:
        start_cost = jnp.asarray(VALUE_AND_GRAD, jnp.float32)
        value, grad = jax.value_and_grad(value_fn)(params, images, labels, mask)
        errors = jnp.asarray(-1, jnp.int32)  # Not counted in chunks.
    else:
        start_cost = jnp.asarray(VALUE_AND_GRAD, jnp.float32)
        (value, errors), grad = jax.value_and_grad(
            losses.batch_loss_and_errors, has_aux=True
        )(params, images, labels, mask)
    before = opt_state
    updates, opt_state = tx.update(
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
        **({"num_errors": jnp.maximum(errors, 0)} if variant.two_phases else {}),
    )
    linesearch = tpo.find_linesearch_state(opt_state)
    if variant.two_phases:
        # What two_phase counted for this step: its guards may have run no
        # search (a zero gradient) or rejected the one that ran.
        evaluations = opt_state.num_evaluations - before.num_evaluations
        gradients = opt_state.num_gradients - before.num_gradients
        step_size = jnp.where(ran_cg, linesearch.learning_rate, lr)
        failed = opt_state.num_failures > before.num_failures
        cost = start_cost + (evaluations + 2 * gradients).astype(jnp.float32)
    elif linesearch is None:
        evaluations, step_size = jnp.zeros((), jnp.int32), jnp.asarray(lr)
        failed = jnp.asarray(False)
        gradients = jnp.zeros((), jnp.int32)
        cost = start_cost
    else:
        searched, with_grad = tpo.linesearch_evaluations(linesearch)
        evaluations = jnp.where(ran_cg, searched, 0)
        step_size = jnp.where(ran_cg, linesearch.learning_rate, lr)
        # After a fallback the fresh CG state reads "not failed": right, as
        # that step ran Adam.
        failed = ran_cg & tpo.linesearch_failed(linesearch, updates)
        gradients = jnp.where(ran_cg, with_grad, 0)
        cost = start_cost + jnp.where(ran_cg, tpo.linesearch_cost(linesearch), 0.0)
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


def eval_step(losses: ModelLoss, params, images, labels, mask):
    """The batch's summed loss and how many labels it predicts right."""
    outputs = losses.apply(params, images)
    hits = jnp.argmax(outputs, -1) == labels
    if mask is None:
        return losses.loss_fn(outputs, labels) * len(labels), jnp.sum(hits)
    loss_sum = jnp.sum(losses.per_example(outputs, labels) * mask)
    return loss_sum, jnp.sum(hits * rows_mask(mask, hits))


def probe_curvature(losses: ModelLoss, iterations: int, params, images, labels, mask):
    """The extreme Hessian eigenvalues of the batch's loss (Lanczos)."""
    extremes = tpo.curvature.hessian_extremes(
        lambda p: losses.batch_loss(p, images, labels, mask), params, iterations
    )
    return extremes.lambda_min, extremes.lambda_max
