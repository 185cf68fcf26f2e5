r"""A swap rule that reads the loss: swap once Adam's loss has stopped falling.

The gradient-norm peak of Algorithm 1 says where the loss turns convex, not
where the second phase starts to pay: CG pays once the first phase has
little left to gain, which the loss itself shows. This rule reads the
``value``\ s that :func:`twophase_optax.two_phase` receives on every step,
averages them per window of ``window`` steps (an epoch, say), smooths the
window means with an exponential moving average
:math:`s_n = s_{n-1} + w (\bar v_n - s_{n-1})`, :math:`s_1 = \bar v_1`, and,
in the manner of ``optax.contrib.reduce_on_plateau``, counts the windows in a
row in which the smoothed loss stayed within ``rtol`` of its best without
improving on it by ``rtol``:

.. math::
  s_n < (1 - \text{rtol}) \, s_{best} &\Rightarrow s_{best} = s_n,\ k = 0
  \quad \text{(progress)};\\
  s_n > s_{best} / (1 - \text{rtol}) &\Rightarrow k = 0
  \quad \text{(a spike)};\\
  \text{else } &k \mathrel{+}= 1 \quad \text{(flat)}.

The swap comes on the window at which :math:`k` reaches ``patience``. A spike
(Adam's loss jumping up for a few epochs, which it does at constant rates)
is not a plateau: starting the second phase in one starts CG far from where
Adam had got. The state is scalars; the rule costs nothing beyond the values
the steps compute anyway.

The functions are pure and jittable; :func:`replay` runs recorded window means
(the ``batch_loss`` of each epoch in a metrics file) through the same code.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from twophase_optax import _protocol

DEFAULT_RTOL = 0.1
DEFAULT_PATIENCE = 5
DEFAULT_SMOOTHING = 0.3


class LossPlateauState(NamedTuple):
    """The windows' mean losses and the count since the last improvement.

    Attributes:
      best: the lowest smoothed window mean that counted as an improvement
        (``inf`` before the first window).
      smoothed: the exponential moving average of the window means (0 before
        the first).
      num_bad: windows in a row within ``rtol`` of the best without improving
        on it by ``rtol`` (int32).
      num_windows: complete windows so far (int32).
      window_count: steps accumulated in the current window (int32).
      window_sum: the sum of the current window's values.
      plateau_step: the step whose window first met the criterion, -1 until
        then (int32).
    """

    best: jax.Array
    smoothed: jax.Array
    num_bad: jax.Array
    num_windows: jax.Array
    window_count: jax.Array
    window_sum: jax.Array
    plateau_step: jax.Array


def check_hyperparameters(rtol: float, patience: int, smoothing: float) -> None:
    """Raises ``ValueError`` for settings the rule cannot use."""
    real = lambda x: isinstance(x, (int, float)) and not isinstance(x, bool)  # noqa: E731
    if not (real(rtol) and 0 <= rtol < 1):
        raise ValueError(
            "plateau_rtol must lie in [0, 1) (the relative fall per window that "
            f"counts as progress), got {rtol!r}."
        )
    if not (isinstance(patience, int) and patience >= 1):
        raise ValueError(
            "plateau_patience must be an integer >= 1 (windows without progress "
            f"before the swap), got {patience!r}."
        )
    if not (real(smoothing) and 0 < smoothing <= 1):
        raise ValueError(
            "plateau_smoothing must lie in (0, 1] (the weight of the newest "
            f"window mean; 1 is no smoothing), got {smoothing!r}."
        )


def init(params) -> LossPlateauState:
    """The state before any value has been seen."""
    dtype = _protocol.scalar_dtype(params)
    zero = jnp.zeros((), dtype)
    return LossPlateauState(
        best=jnp.asarray(jnp.inf, dtype),
        smoothed=zero,
        num_bad=jnp.asarray(0, jnp.int32),
        num_windows=jnp.asarray(0, jnp.int32),
        window_count=jnp.asarray(0, jnp.int32),
        window_sum=zero,
        plateau_step=jnp.asarray(-1, jnp.int32),
    )


def update(
    state: LossPlateauState,
    value: jax.typing.ArrayLike,
    step: jax.Array,
    *,
    window: int,
    rtol: float = DEFAULT_RTOL,
    patience: int = DEFAULT_PATIENCE,
    smoothing: float = DEFAULT_SMOOTHING,
) -> tuple[LossPlateauState, jax.Array]:
    """Adds one step's loss; returns the new state and whether the plateau holds.

    The signal is ``True`` from the step whose window first meets the
    criterion on (``plateau_step`` records it), and only on steps that
    complete a window.
    """
    dtype = state.best.dtype
    count = state.window_count + 1
    complete = count == window
    window_sum = state.window_sum + jnp.asarray(value).astype(dtype)
    mean = window_sum / window
    first = state.num_windows == 0
    smoothed = jnp.where(
        first, mean, state.smoothed + smoothing * (mean - state.smoothed)
    )
    improved = smoothed < (1 - rtol) * state.best
    spike = smoothed * (1 - rtol) > state.best
    best = jnp.where(improved, smoothed, state.best)
    num_bad = jnp.where(improved | spike, 0, state.num_bad + 1)
    plateau = complete & (num_bad >= patience)
    keep = lambda new, old: jnp.where(complete, new, old)  # noqa: E731
    new_state = LossPlateauState(
        best=keep(best, state.best),
        smoothed=keep(smoothed, state.smoothed),
        num_bad=keep(num_bad, state.num_bad),
        num_windows=keep(state.num_windows + 1, state.num_windows),
        window_count=jnp.where(complete, 0, count),
        window_sum=jnp.where(complete, 0.0, window_sum).astype(dtype),
        plateau_step=jnp.where(
            plateau & (state.plateau_step < 0), step, state.plateau_step
        ),
    )
    return new_state, plateau


def replay(
    window_means: jax.typing.ArrayLike,
    *,
    rtol: float = DEFAULT_RTOL,
    patience: int = DEFAULT_PATIENCE,
    smoothing: float = DEFAULT_SMOOTHING,
) -> list[bool]:
    """Per window: whether the plateau criterion holds there.

    Runs recorded window means (one per window, the ``batch_loss`` of each
    epoch in a metrics file) through :func:`update`, the code that
    :func:`twophase_optax.two_phase` runs in training.

    Example:
      >>> means = [1.0, 0.5, 0.25, 0.2, 0.19, 0.185, 0.184, 0.183, 0.182]
      >>> replay(means, rtol=0.1, patience=3, smoothing=1.0).index(True)
      6
    """
    check_hyperparameters(rtol, patience, smoothing)
    means = jnp.asarray(window_means, jnp.float32)

    rule = functools.partial(
        update, window=1, rtol=rtol, patience=patience, smoothing=smoothing
    )
    return _protocol.replay_windows(rule, init(means[0]), means)
