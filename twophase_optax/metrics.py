"""A flat dict of scalars describing a two-phase run, for any logger."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from twophase_optax import _protocol
from twophase_optax import swap
from twophase_optax.two_phase import TwoPhaseState


def two_phase_metrics(opt_state: Any) -> dict[str, float | int | bool]:
    """Reads a :func:`two_phase` state, wherever it sits in ``opt_state``.

    Works on the state of ``two_phase`` itself or of any chain or wrapper
    around it, and returns Python scalars, so the dict can go straight to a
    JSON file, TensorBoard or any other logger. Call it outside ``jit``.

    Keys: ``phase`` (0 first, 1 second), ``step``, ``swap_step`` (-1 until
    the swap), ``swap_reason`` (the rule that made it, a name of
    :data:`twophase_optax.swap.SWAP_REASONS`), ``num_skipped`` (non-finite
    steps), ``num_failures`` (failed second-phase steps in a row),
    ``num_fallbacks``, ``num_evaluations`` and ``num_gradients`` (the second
    phase's line-search evaluations so far, and those with a gradient); every
    scalar of the swap rule's state by its field's name (the peak's
    ``detect_step``, ``gn_max``, ``gn_last``, ...; the plateau's
    ``plateau_step``, ``loss_best``, ``num_flat``, ...; the fit rule's
    ``fitted_step`` and ``num_fitted``; see :mod:`twophase_optax.swap`); and,
    once the second phase has a line search,
    ``linesearch_learning_rate``, ``linesearch_value`` if recorded, and one
    ``linesearch_<field>`` per field of its info (for the default slope
    search: ``num_evaluations``, ``num_gradients``, ``slope``, ``failed``).

    Example:
      >>> import jax.numpy as jnp
      >>> import twophase_optax as tpo
      >>> opt = tpo.two_phase(swap=tpo.swap.per_window(tpo.swap.peak(), steps=4))
      >>> metrics = tpo.two_phase_metrics(opt.init(jnp.zeros(3)))
      >>> metrics["phase"], metrics["swap_step"], metrics["gn_max"]
      (0, -1, 0.0)
    """
    state = _protocol.find_node(opt_state, lambda n: isinstance(n, TwoPhaseState))
    if state is None:
        raise ValueError(
            "two_phase_metrics found no TwoPhaseState in the optimizer state; "
            "pass the state of an optimizer built with twophase_optax.two_phase."
        )
    scalars = {
        "phase": state.in_second_phase.astype(int),
        "step": state.count,
        "swap_step": state.swap_step,
        "num_skipped": state.num_skipped,
        "num_failures": state.num_failures,
        "num_fallbacks": state.num_fallbacks,
        "num_evaluations": state.num_evaluations,
        "num_gradients": state.num_gradients,
    }
    # The rule's scalars, each by its field's name (the first where two parts
    # of a combination share one).
    for path, x in jax.tree_util.tree_flatten_with_path(state.swap)[0]:
        if jnp.ndim(x) == 0 and isinstance(path[-1], jax.tree_util.GetAttrKey):
            scalars.setdefault(path[-1].name, x)
    linesearch = _protocol.find_linesearch_state(state.second_state)
    if linesearch is not None:
        scalars["linesearch_learning_rate"] = linesearch.learning_rate
        if "value" in linesearch._fields:
            scalars["linesearch_value"] = linesearch.value
        for field, x in linesearch.info._asdict().items():
            scalars[f"linesearch_{field}"] = x
    metrics = {key: jax.device_get(x).item() for key, x in scalars.items()}
    metrics["swap_reason"] = swap.SWAP_REASONS[int(state.swap_reason)]
    return metrics
