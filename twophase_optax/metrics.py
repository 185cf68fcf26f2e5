"""A flat dict of scalars describing a two-phase run, for any logger."""

from __future__ import annotations

from typing import Any

import jax

from twophase_optax import _protocol
from twophase_optax import swap
from twophase_optax.two_phase import TwoPhaseState

# Each rule's readings, where the rule has the part: metric -> state field.
_RULE_METRICS = {
    swap.PeakState: dict(
        detect_step="detect_step",
        gn_max="gn_max",
        gn_last="gn_last",
        gn_smoothed="gn_smoothed",
        num_readings="num_readings",
    ),
    swap.PlateauState: dict(
        plateau_step="plateau_step",
        plateau_best="loss_best",
        plateau_smoothed="loss_smoothed",
        plateau_windows="num_flat",
    ),
    swap.FittedState: dict(fitted_step="fitted_step", fitted_windows="num_fitted"),
}


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
    phase's line-search evaluations so far, and those with a gradient); the
    swap rule's readings where its parts exist: the peak's ``detect_step``,
    ``gn_max``, ``gn_last``, ``gn_smoothed`` and ``num_readings``; the
    plateau's ``plateau_step`` (-1 until it holds), ``plateau_best``,
    ``plateau_smoothed`` and ``plateau_windows`` (windows without progress);
    the fit rule's ``fitted_step`` and ``fitted_windows`` (fitted windows in
    a row); and, once the second phase has a line search,
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
    for state_type, fields in _RULE_METRICS.items():
        rule = _protocol.find_node(state.swap, lambda n, t=state_type: isinstance(n, t))
        if rule is not None:
            scalars.update({key: getattr(rule, f) for key, f in fields.items()})
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
