r"""A swap rule for classifiers: swap once the training examples are fitted.

Under a loss that saturates (softmax + MSE), CG converges to minima that keep
some training examples misclassified: a wrong example costs at most
:math:`2/(\text{classes} \cdot N)`, and its gradient shrinks as its softmax
saturates, so a full-batch method settles there while Adam's noise moves on.
This rule swaps only once the first phase has got every example right (or at
most ``fit_errors`` wrong) for ``fit_patience`` windows in a row.

The count comes from the caller, who has the outputs: pass the number of
misclassified examples in the step's batch, as seen by the forward pass that
computed the gradient, as ``update(..., num_errors=k)``. The rule sums it over
each window of ``window`` steps (an epoch, say) and costs nothing beyond it.

The functions are pure and jittable; :func:`replay` runs recorded counts
(one per window, the ``batch_errors`` of each epoch in a metrics file) through
the same code.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from twophase_optax import _protocol

DEFAULT_FIT_ERRORS = 0
DEFAULT_FIT_PATIENCE = 10


class FittedState(NamedTuple):
    """The misclassified examples per window, and fitted windows in a row.

    Attributes:
      window_errors: the current window's misclassified examples so far.
      window_count: steps accumulated in the current window.
      num_fitted: complete windows in a row with at most ``fit_errors``.
      fitted_step: the step whose window first met the criterion, -1 until
        then.

    All int32.
    """

    window_errors: jax.Array
    window_count: jax.Array
    num_fitted: jax.Array
    fitted_step: jax.Array


def check_hyperparameters(fit_errors: int, fit_patience: int) -> None:
    """Raises ``ValueError`` for settings the rule cannot use."""
    integer = lambda x: isinstance(x, int) and not isinstance(x, bool)  # noqa: E731
    if not (integer(fit_errors) and fit_errors >= 0):
        raise ValueError(
            "fit_errors must be an integer >= 0 (the most misclassified training "
            f"examples in a window that count as fitted), got {fit_errors!r}."
        )
    if not (integer(fit_patience) and fit_patience >= 1):
        raise ValueError(
            "fit_patience must be an integer >= 1 (fitted windows in a row "
            f"before the swap), got {fit_patience!r}."
        )


def init() -> FittedState:
    """The state before any step."""
    zero = jnp.asarray(0, jnp.int32)
    return FittedState(zero, zero, zero, jnp.asarray(-1, jnp.int32))


def update(
    state: FittedState,
    num_errors: jax.typing.ArrayLike,
    step: jax.Array,
    *,
    window: int,
    fit_errors: int = DEFAULT_FIT_ERRORS,
    fit_patience: int = DEFAULT_FIT_PATIENCE,
) -> tuple[FittedState, jax.Array]:
    """Adds one step's count; returns the new state and whether the rule holds.

    The signal is ``True`` on steps that complete a window once
    ``fit_patience`` windows in a row had at most ``fit_errors`` errors.
    """
    count = state.window_count + 1
    complete = count == window
    errors = state.window_errors + jnp.asarray(num_errors).astype(jnp.int32)
    fitted_now = errors <= fit_errors
    num_fitted = jnp.where(fitted_now, state.num_fitted + 1, 0)
    fitted = complete & (num_fitted >= fit_patience)
    new_state = FittedState(
        window_errors=jnp.where(complete, 0, errors),
        window_count=jnp.where(complete, 0, count),
        num_fitted=jnp.where(complete, num_fitted, state.num_fitted),
        fitted_step=jnp.where(
            fitted & (state.fitted_step < 0), step, state.fitted_step
        ),
    )
    return new_state, fitted


def replay(
    window_errors: jax.typing.ArrayLike,
    *,
    fit_errors: int = DEFAULT_FIT_ERRORS,
    fit_patience: int = DEFAULT_FIT_PATIENCE,
) -> list[bool]:
    """Per window: whether the rule holds there, on recorded counts.

    Example:
      >>> replay([40, 3, 0, 1, 0, 0, 0], fit_patience=2)
      [False, False, False, False, False, True, True]
    """
    check_hyperparameters(fit_errors, fit_patience)
    counts = jnp.asarray(window_errors, jnp.int32)

    rule = functools.partial(
        update, window=1, fit_errors=fit_errors, fit_patience=fit_patience
    )
    return _protocol.replay_windows(rule, init(), counts)
