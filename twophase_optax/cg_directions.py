r"""The ``beta`` rules of nonlinear conjugate gradient.

A nonlinear CG direction is :math:`d_k = -g_k + \beta_k d_{k-1}`. Each rule
below is a plain function ``beta(grad, grad_prev, dir_prev) -> scalar`` of the
current gradient :math:`g_k`, the previous gradient :math:`g_{k-1}` and the
previous direction :math:`d_{k-1}`, with :math:`y = g_k - g_{k-1}`:

=================  ============================================================
rule               :math:`\beta_k`
=================  ============================================================
Fletcher-Reeves    :math:`g_k^\top g_k / g_{k-1}^\top g_{k-1}`
Polak-Ribiere      :math:`g_k^\top y / g_{k-1}^\top g_{k-1}`
Polak-Ribiere+     :math:`\max(0, \beta^{PR})`
Hestenes-Stiefel   :math:`g_k^\top y / d_{k-1}^\top y`
Dai-Yuan           :math:`g_k^\top g_k / d_{k-1}^\top y`
=================  ============================================================

On a quadratic with exact line searches all five coincide. A zero denominator
gives a non-finite ``beta``, which :func:`twophase_optax.conjugate_gradient`
treats as a restart. Dot products are accumulated in float32 at least.

Example:
  >>> import jax.numpy as jnp
  >>> from twophase_optax import cg_directions
  >>> g, g_prev = jnp.array([1.0, 2.0]), jnp.array([2.0, 0.0])
  >>> d_prev = jnp.array([-2.0, 0.0])
  >>> float(cg_directions.fletcher_reeves(g, g_prev, d_prev))
  1.25
  >>> float(cg_directions.polak_ribiere(g, g_prev, d_prev))  # (1*-1 + 2*2) / 4
  0.75
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from twophase_optax import _protocol

BetaRule = Callable[[Any, Any, Any], jax.Array]
"""``beta(grad, grad_prev, dir_prev) -> scalar``."""


def _dot(x: Any, y: Any) -> jax.Array:
    return _protocol.vdot(x, y, _protocol.scalar_dtype(x))


def _diff(x: Any, y: Any) -> Any:
    dtype = _protocol.scalar_dtype(x)
    return optax.tree.sub(optax.tree.cast(x, dtype), optax.tree.cast(y, dtype))


def fletcher_reeves(grad: Any, grad_prev: Any, dir_prev: Any) -> jax.Array:
    """Fletcher-Reeves: ``g.g / g_prev.g_prev``."""
    del dir_prev
    return _dot(grad, grad) / _dot(grad_prev, grad_prev)


def polak_ribiere(grad: Any, grad_prev: Any, dir_prev: Any) -> jax.Array:
    """Polak-Ribiere: ``g.(g - g_prev) / g_prev.g_prev``."""
    del dir_prev
    return _dot(grad, _diff(grad, grad_prev)) / _dot(grad_prev, grad_prev)


def polak_ribiere_plus(grad: Any, grad_prev: Any, dir_prev: Any) -> jax.Array:
    """Polak-Ribiere+: ``max(0, beta_PR)``, an automatic restart when PR < 0."""
    return jnp.maximum(polak_ribiere(grad, grad_prev, dir_prev), 0.0)


def hestenes_stiefel(grad: Any, grad_prev: Any, dir_prev: Any) -> jax.Array:
    """Hestenes-Stiefel: ``g.y / d_prev.y`` with ``y = g - g_prev``."""
    y = _diff(grad, grad_prev)
    return _dot(grad, y) / _dot(dir_prev, y)


def dai_yuan(grad: Any, grad_prev: Any, dir_prev: Any) -> jax.Array:
    """Dai-Yuan: ``g.g / d_prev.y`` with ``y = g - g_prev``."""
    return _dot(grad, grad) / _dot(dir_prev, _diff(grad, grad_prev))


BETA_RULES: dict[str, BetaRule] = {
    "fletcher_reeves": fletcher_reeves,
    "polak_ribiere": polak_ribiere,
    "polak_ribiere_plus": polak_ribiere_plus,
    "hestenes_stiefel": hestenes_stiefel,
    "dai_yuan": dai_yuan,
}
"""The rules by name, for :func:`twophase_optax.conjugate_gradient`."""


def resolve_beta(beta: str | BetaRule) -> BetaRule:
    """Returns the rule named ``beta``, or ``beta`` itself if it is callable."""
    if callable(beta):
        return beta
    try:
        return BETA_RULES[beta]
    except (KeyError, TypeError):
        raise ValueError(
            f"Unknown beta rule {beta!r}; choose one of {sorted(BETA_RULES)} "
            "or pass a function beta(grad, grad_prev, dir_prev) -> scalar."
        ) from None
