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

Mini-batch noise makes single readings jitter by 10% and more, so the raw
rule fires on the first dip, long before the peak. The default rule therefore
tests a smoothed reading and asks the fall to last:

* ``smoothing`` :math:`w`: an exponential moving average
  :math:`s_n = s_{n-1} + w (g_n - s_{n-1})`, :math:`s_1 = g_1`, replaces the
  reading, and :math:`g_{max}` is the maximum of :math:`s`;
* ``patience`` :math:`p`: the swap comes on the :math:`p`-th reading in a row
  with :math:`s_n \le \text{gn\_factor} \cdot g_{max}`;
* ``min_rise`` :math:`r`: no reading counts as a fall until
  :math:`g_{max} \ge r \, s_1`, so a reading that is largest at the start
  (a loss that is convex from the start, or a first epoch inflated by the
  large gradients of a random initialisation) is not taken for a peak.

``gn_factor=0.9, smoothing=1, patience=1, min_rise=1`` is Algorithm 1 as
printed (:data:`PAPER_RULE`). The defaults, ``gn_factor=0.5, smoothing=0.3,
patience=1, min_rise=1.25``, were chosen by replaying the readings of recorded
Adam runs (``experiments/benchmarks/detector.py``, BENCHMARKS.md section 8):
on vit-mlp / digits the smoothed reading has a first hump that falls to about
0.55 of its maximum before the real peak, after which it falls a hundredfold,
so a factor of 0.5 tells the two apart where 0.9 cannot.

The functions here are pure and jittable; :func:`twophase_optax.two_phase`
calls them on every step, and :func:`replay` runs recorded readings through
the same code.
"""

from __future__ import annotations

from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from twophase_optax import _protocol

STATISTICS = ("mean_grad", "mean_norm")
DEFAULT_GN_FACTOR = 0.5
DEFAULT_SMOOTHING = 0.3
DEFAULT_PATIENCE = 1
DEFAULT_MIN_RISE = 1.25
PAPER_RULE = {
    "swap_rule": "peak",
    "gn_factor": 0.9,
    "smoothing": 1.0,
    "patience": 1,
    "min_rise": 1.0,
}
"""The paper's Algorithm 1 as printed, the gradient-norm peak read raw, swapping
on the first reading at or below 0.9 of the maximum. Pass it as
``two_phase(..., **PAPER_RULE)``."""


class GradientNormPeakState(NamedTuple):
    """Readings of the gradient norm and the running maximum.

    Attributes:
      gn_max: the largest smoothed reading so far (0 before the first).
      gn_last: the most recent complete reading (0 before the first).
      gn_smoothed: the exponential moving average of the readings, the
        statistic that is tested (0 before the first).
      gn_first: the first smoothed reading, for ``min_rise`` (0 before it).
      num_below: smoothed readings in a row at or below ``gn_factor * gn_max``
        since the maximum rose by ``min_rise`` (int32).
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
    gn_smoothed: jax.Array
    gn_first: jax.Array
    num_below: jax.Array
    num_readings: jax.Array
    window_count: jax.Array
    window_grad_sum: Any
    window_norm_sum: jax.Array
    detect_step: jax.Array


def check_detection_hyperparameters(
    gn_factor: float,
    window: int,
    statistic: str,
    min_windows: int,
    smoothing: float = DEFAULT_SMOOTHING,
    patience: int = DEFAULT_PATIENCE,
    min_rise: float = DEFAULT_MIN_RISE,
) -> None:
    """Raises ``ValueError`` for hyperparameters the detector cannot use."""
    real = lambda x: isinstance(x, (int, float)) and not isinstance(x, bool)  # noqa: E731
    if not (real(gn_factor) and 0 < gn_factor < 1):
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
    if not (real(smoothing) and 0 < smoothing <= 1):
        raise ValueError(
            "smoothing must lie in (0, 1] (the weight of the newest reading; 1 "
            f"is no smoothing), got {smoothing!r}."
        )
    if not (isinstance(patience, int) and patience >= 1):
        raise ValueError(
            "patience must be an integer >= 1 (readings in a row below the "
            f"threshold; 1 is the paper's rule), got {patience!r}."
        )
    if not (real(min_rise) and min_rise >= 1):
        raise ValueError(
            "min_rise must be a number >= 1 (how far the maximum must rise over "
            f"the first reading; 1 is the paper's rule), got {min_rise!r}."
        )


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
        gn_smoothed=zero,
        gn_first=zero,
        num_below=jnp.asarray(0, jnp.int32),
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
    smoothing: float = DEFAULT_SMOOTHING,
    patience: int = DEFAULT_PATIENCE,
    min_rise: float = DEFAULT_MIN_RISE,
    armed: jax.Array | bool = True,
    grad_norm: jax.Array | None = None,
) -> tuple[GradientNormPeakState, jax.Array]:
    """Adds one step's gradient; returns the new state and whether to swap.

    The swap signal is ``True`` only on the step whose reading first meets the
    criterion, and only while ``armed`` (the first phase is running).

    Args:
      state: the detector state.
      grads: this step's gradient.
      step: this step's index, recorded in ``detect_step``.
      gn_factor: the smoothed reading must fall to ``gn_factor * gn_max`` or
        below.
      window: steps per reading.
      statistic: ``"mean_grad"`` or ``"mean_norm"``.
      min_windows: no swap before this many readings exist.
      smoothing: weight of the newest reading in the moving average.
      patience: smoothed readings in a row at or below the threshold.
      min_rise: the maximum must reach ``min_rise`` times the first reading.
      armed: whether a swap may be signalled now.
      grad_norm: the norm of ``grads``, where the caller has it already.

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
        if grad_norm is None:
            grad_norm = optax.tree.norm(grads)
        norm_sum = state.window_norm_sum + jnp.asarray(grad_norm).astype(dtype)
        reading = norm_sum / window

    first = state.num_readings == 0
    smoothed = jnp.where(
        first, reading, state.gn_smoothed + smoothing * (reading - state.gn_smoothed)
    )
    gn_first = jnp.where(first, smoothed, state.gn_first)
    gn_max = jnp.maximum(state.gn_max, smoothed)
    risen = gn_max >= min_rise * gn_first
    below = risen & (smoothed <= gn_factor * gn_max)
    num_below = jnp.where(below, state.num_below + 1, 0)
    num_readings = state.num_readings + 1
    swap = (
        armed
        & complete
        & (state.detect_step < 0)
        & (num_readings >= min_windows)
        & (num_below >= patience)
    )
    keep = lambda new, old: jnp.where(complete, new, old)  # noqa: E731
    new_state = GradientNormPeakState(
        gn_max=keep(gn_max, state.gn_max),
        gn_last=keep(reading, state.gn_last),
        gn_smoothed=keep(smoothed, state.gn_smoothed),
        gn_first=keep(gn_first, state.gn_first),
        num_below=keep(num_below, state.num_below),
        num_readings=keep(num_readings, state.num_readings),
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


def replay(
    readings: jax.typing.ArrayLike,
    *,
    gn_factor: float = DEFAULT_GN_FACTOR,
    smoothing: float = DEFAULT_SMOOTHING,
    patience: int = DEFAULT_PATIENCE,
    min_rise: float = DEFAULT_MIN_RISE,
    min_windows: int = 1,
    swap_rule: str = "peak",
) -> int | None:
    """The index of the reading on which the detector signals the swap.

    Runs recorded readings (one per window, say the ``gn_reading`` of each
    epoch in a metrics file) through :func:`update`, the code that
    :func:`twophase_optax.two_phase` runs in training, so a rule can be tried
    on a recorded run without training again. Returns ``None`` if the swap
    never comes.

    Example:
      >>> readings = [1.0, 2.0, 3.0, 2.6, 2.8, 2.0, 1.5, 1.0, 0.5, 0.4, 0.3]
      >>> replay(readings, **PAPER_RULE)  # the first reading <= 0.9 * 3.0
      3
      >>> replay(readings)  # the smoothed reading halves from its maximum
      9
    """
    check_detection_hyperparameters(
        gn_factor, 1, "mean_grad", min_windows, smoothing, patience, min_rise
    )
    if swap_rule != "peak":  # Taken so that **PAPER_RULE fits.
        raise ValueError(
            f"replay runs the gradient-norm peak rule, got swap_rule={swap_rule!r}; "
            "the loss plateau and the fit rules have their own: "
            "loss_plateau.replay, fitted.replay."
        )
    readings = jnp.asarray(readings, jnp.float32)
    settings = dict(
        gn_factor=gn_factor,
        window=1,
        statistic="mean_grad",
        min_windows=min_windows,
        smoothing=smoothing,
        patience=patience,
        min_rise=min_rise,
    )

    def read(state, step_and_reading):
        step, reading = step_and_reading
        # With one reading per window the reading is the "gradient's" norm.
        return update(state, reading, step, **settings)

    steps = jnp.arange(readings.shape[0], dtype=jnp.int32)
    state = init(readings[0], "mean_grad", window=1)
    state, _ = jax.lax.scan(read, state, (steps, readings))
    detect = int(state.detect_step)
    return None if detect < 0 else detect
