r"""Where the swap is decided: the gradient-norm peak of Algorithm 1.

In a non-convex region the gradient norm tends to grow as the loss falls; in
the convex neighbourhood of a minimum it shrinks. Algorithm 1 of the paper
takes one gradient-norm reading per epoch, keeps the running maximum
:math:`g_{max}`, and swaps from Adam to CG at the first reading

.. math::
  g_n \le \text{gn\_factor} \cdot g_{max}.

Here a reading covers ``window`` steps (set it to the number of steps in an
epoch) and is one of two statistics of the window's gradients
:math:`g_1, \dots, g_W`:

* ``"mean_grad"``: :math:`\|\tfrac1W \sum_i g_i\|`, the best estimate of the
  full-data gradient norm; needs one params-sized accumulator.
* ``"mean_norm"``: :math:`\tfrac1W \sum_i \|g_i\|`; scalar state only, but
  mini-batch noise inflates it, so the peak is flatter.

The functions here are pure and jittable; :func:`twophase_optax.two_phase`
calls them on every step.
"""

from __future__ import annotations

from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from twophase_optax import _protocol

STATISTICS = ("mean_grad", "mean_norm")


class GradientNormPeakState(NamedTuple):
    """Readings of the gradient norm and the running maximum.

    Attributes:
      gn_max: the largest reading so far (0 before the first).
      gn_last: the most recent complete reading (0 before the first).
      num_readings: how many readings have completed (int32).
      window_count: steps accumulated in the current window (int32).
      window_grad_sum: ``"mean_grad"``: the sum of the window's gradients, in
        float32 (float64 for float64 params); ``None`` for ``"mean_norm"`` and
        for ``window=1``, where both statistics are the step's gradient norm.
      window_norm_sum: ``"mean_norm"``: the sum of the window's gradient norms;
        stays 0 for ``"mean_grad"``.
      detect_step: the step whose reading first met the swap criterion, -1
        until then (int32).
    """

    gn_max: jax.Array
    gn_last: jax.Array
    num_readings: jax.Array
    window_count: jax.Array
    window_grad_sum: Any
    window_norm_sum: jax.Array
    detect_step: jax.Array


def check_detection_hyperparameters(
    gn_factor: float, window: int, statistic: str, min_windows: int
) -> None:
    """Raises ``ValueError`` for hyperparameters Algorithm 1 cannot use."""
    if not (isinstance(gn_factor, (int, float)) and 0 < gn_factor < 1):
        raise ValueError(
            f"gn_factor must lie in (0, 1) (the paper uses 0.9), got {gn_factor!r}."
        )
    if not (isinstance(window, int) and window >= 1):
        raise ValueError(
            f"window must be an integer >= 1 (steps per reading), got {window!r}."
        )
    if statistic not in STATISTICS:
        raise ValueError(f"statistic must be one of {STATISTICS}, got {statistic!r}.")
    if not (isinstance(min_windows, int) and min_windows >= 1):
        raise ValueError(f"min_windows must be an integer >= 1, got {min_windows!r}.")


def _needs_grad_sum(statistic: str, window: int) -> bool:
    # With one step per window both statistics are that step's gradient norm.
    return statistic == "mean_grad" and window > 1


def init(params: Any, statistic: str, window: int = 1) -> GradientNormPeakState:
    """The state before any gradient has been seen."""
    dtype = _protocol.scalar_dtype(params)
    zero = jnp.zeros((), dtype)
    grad_sum = (
        optax.tree.zeros_like(params, dtype=dtype)
        if _needs_grad_sum(statistic, window)
        else None
    )
    return GradientNormPeakState(
        gn_max=zero,
        gn_last=zero,
        num_readings=jnp.asarray(0, jnp.int32),
        window_count=jnp.asarray(0, jnp.int32),
        window_grad_sum=grad_sum,
        window_norm_sum=zero,
        detect_step=jnp.asarray(-1, jnp.int32),
    )


def update(
    state: GradientNormPeakState,
    grads: Any,
    step: jax.Array,
    *,
    gn_factor: float,
    window: int,
    statistic: str,
    min_windows: int,
    armed: jax.Array | bool = True,
) -> tuple[GradientNormPeakState, jax.Array]:
    """Adds one step's gradient; returns the new state and whether to swap.

    The swap signal is ``True`` only on the step whose reading first meets the
    criterion, and only while ``armed`` (the first phase is running).

    Args:
      state: the detector state.
      grads: this step's gradient.
      step: this step's index, recorded in ``detect_step``.
      gn_factor: the reading must fall to ``gn_factor * gn_max`` or below.
      window: steps per reading.
      statistic: ``"mean_grad"`` or ``"mean_norm"``.
      min_windows: no swap before this many readings exist.
      armed: whether a swap may be signalled now.

    Returns:
      ``(new_state, swap)``.
    """
    dtype = state.gn_max.dtype
    count = state.window_count + 1
    complete = count == window
    if _needs_grad_sum(statistic, window):
        grad_sum = optax.tree.add(state.window_grad_sum, optax.tree.cast(grads, dtype))
        reading = optax.tree.norm(grad_sum) / window
        norm_sum = state.window_norm_sum
    else:
        grad_sum = None
        norm_sum = state.window_norm_sum + optax.tree.norm(grads).astype(dtype)
        reading = norm_sum / window

    gn_max = jnp.where(complete, jnp.maximum(state.gn_max, reading), state.gn_max)
    num_readings = state.num_readings + complete.astype(jnp.int32)
    swap = (
        armed
        & complete
        & (state.detect_step < 0)
        & (num_readings >= min_windows)
        & (reading <= gn_factor * gn_max)
    )
    new_state = GradientNormPeakState(
        gn_max=gn_max,
        gn_last=jnp.where(complete, reading, state.gn_last),
        num_readings=num_readings,
        window_count=jnp.where(complete, 0, count),
        window_grad_sum=(
            None
            if grad_sum is None
            else optax.tree.where(complete, optax.tree.zeros_like(grad_sum), grad_sum)
        ),
        window_norm_sum=jnp.where(complete, 0.0, norm_sum),
        detect_step=jnp.where(swap, step, state.detect_step),
    )
    return optax.tree.cast_like(new_state, state), swap
