"""A flat dict of scalars describing a two-phase run, for any logger."""

from __future__ import annotations

from typing import Any

import jax

from twophase_optax import _protocol
from twophase_optax.two_phase import TwoPhaseState


def two_phase_metrics(opt_state: Any) -> dict[str, float | int | bool]:
    """Reads a :func:`two_phase` state, wherever it sits in ``opt_state``.

    Works on the state of ``two_phase`` itself or of any chain or wrapper
    around it, and returns Python scalars, so the dict can go straight to a
    JSON file, TensorBoard or any other logger. Call it outside ``jit``.

    Keys: ``phase`` (0 first, 1 second), ``step``, ``swap_step`` and
    ``detect_step`` (-1 until they happen), ``gn_max``, ``gn_last``,
    ``gn_smoothed``, ``num_readings``; the loss plateau's ``plateau_step``
    (-1 until it holds), ``plateau_best``, ``plateau_smoothed`` and
    ``plateau_windows`` (windows without progress); the fit rule's
    ``fitted_step`` and ``fitted_windows`` (fitted windows in a row);
    ``num_skipped`` (non-finite steps),
    ``num_failures`` (failed second-phase steps in a row), ``num_fallbacks``;
    and, once the second phase has a line search, ``linesearch_learning_rate``,
    ``linesearch_value`` if recorded, and one ``linesearch_<field>`` per field
    of its info (for the default slope search: ``num_evaluations``,
    ``num_gradients``, ``slope``, ``failed``).

    Example:
      >>> import jax.numpy as jnp
      >>> import twophase_optax as tpo
      >>> opt = tpo.two_phase()
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
    detection = state.detection
    scalars = {
        "phase": state.in_second_phase.astype(int),
        "step": state.count,
        "swap_step": state.swap_step,
        "detect_step": detection.detect_step,
        "gn_max": detection.gn_max,
        "gn_last": detection.gn_last,
        "gn_smoothed": detection.gn_smoothed,
        "num_readings": detection.num_readings,
        "plateau_step": state.plateau.plateau_step,
        "plateau_best": state.plateau.best,
        "plateau_smoothed": state.plateau.smoothed,
        "plateau_windows": state.plateau.num_bad,
        "fitted_step": state.fitted.fitted_step,
        "fitted_windows": state.fitted.num_fitted,
        "num_skipped": state.num_skipped,
        "num_failures": state.num_failures,
        "num_fallbacks": state.num_fallbacks,
    }
    linesearch = _protocol.find_linesearch_state(state.second_state)
    if linesearch is not None:
        scalars["linesearch_learning_rate"] = linesearch.learning_rate
        if "value" in linesearch._fields:
            scalars["linesearch_value"] = linesearch.value
        for field, x in linesearch.info._asdict().items():
            scalars[f"linesearch_{field}"] = x
    return {key: jax.device_get(x).item() for key, x in scalars.items()}
