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
Hager-Zhang        :math:`\max(\beta^{N}, \eta_k)`, see :func:`hager_zhang`
=================  ============================================================

On a quadratic with exact line searches all six coincide. Hager-Zhang's
(CG_DESCENT's) rule gives descent directions,
:math:`g_k^\top d_k \le -\tfrac78 \|g_k\|^2`, whatever the line search, so
it tolerates inexact searches; it is :func:`twophase_optax.conjugate_gradient`'s
default. A zero denominator
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
from typing import NamedTuple

import jax
import jax.numpy as jnp

from twophase_optax import _protocol

BetaRule = Callable[[Any, Any, Any], jax.Array]
"""``beta(grad, grad_prev, dir_prev) -> scalar``."""


class DotProducts(NamedTuple):
    r"""The five inner products every rule here is a function of.

    With :math:`g = g_k`, :math:`p = g_{k-1}` and :math:`d = d_{k-1}`:

    Attributes:
      grad_sq: :math:`g^\top g`.
      grad_dot_prev: :math:`g^\top p`.
      prev_sq: :math:`p^\top p`.
      dir_dot_grad: :math:`d^\top g`.
      dir_dot_prev: :math:`d^\top p`.

    :func:`twophase_optax.conjugate_gradient` keeps the last three of the next
    step (and :math:`g_{k-1}^\top \tilde g_k` for the gradient its line search
    stores) instead of the previous gradient itself, when the rule is one of
    :data:`BETA_RULES`: one params-sized tree less.
    """

    grad_sq: jax.Array
    grad_dot_prev: jax.Array
    prev_sq: jax.Array
    dir_dot_grad: jax.Array
    dir_dot_prev: jax.Array
    dir_sq: jax.Array | None = None


def dot_products(grad: Any, grad_prev: Any, dir_prev: Any) -> DotProducts:
    """The :class:`DotProducts` of three trees, accumulated in float32 at least."""
    return DotProducts(
        grad_sq=_dot(grad, grad),
        grad_dot_prev=_dot(grad, grad_prev),
        prev_sq=_dot(grad_prev, grad_prev),
        dir_dot_grad=_dot(dir_prev, grad),
        dir_dot_prev=_dot(dir_prev, grad_prev),
        dir_sq=_dot(dir_prev, dir_prev),
    )


def _dot(x: Any, y: Any) -> jax.Array:
    return _protocol.vdot(x, y, _protocol.scalar_dtype(x))


def _fletcher_reeves(p: DotProducts) -> jax.Array:
    return p.grad_sq / p.prev_sq


def _polak_ribiere(p: DotProducts) -> jax.Array:
    return (p.grad_sq - p.grad_dot_prev) / p.prev_sq


def _polak_ribiere_plus(p: DotProducts) -> jax.Array:
    return jnp.maximum(_polak_ribiere(p), 0.0)


def _hestenes_stiefel(p: DotProducts) -> jax.Array:
    return (p.grad_sq - p.grad_dot_prev) / (p.dir_dot_grad - p.dir_dot_prev)


def _dai_yuan(p: DotProducts) -> jax.Array:
    return p.grad_sq / (p.dir_dot_grad - p.dir_dot_prev)


_HAGER_ZHANG_ETA = 0.01


def _hager_zhang(p: DotProducts) -> jax.Array:
    dir_dot_y = p.dir_dot_grad - p.dir_dot_prev
    y_sq = p.grad_sq - 2.0 * p.grad_dot_prev + p.prev_sq
    grad_dot_y = p.grad_sq - p.grad_dot_prev
    beta = (grad_dot_y - 2.0 * y_sq * p.dir_dot_grad / dir_dot_y) / dir_dot_y
    # The lower bound eta_k of CG_DESCENT, which keeps beta from growing
    # too negative where ||g_{k-1}|| is small.
    eta = -1.0 / (
        jnp.sqrt(p.dir_sq) * jnp.minimum(_HAGER_ZHANG_ETA, jnp.sqrt(p.prev_sq))
    )
    return jnp.maximum(beta, eta)


def fletcher_reeves(grad: Any, grad_prev: Any, dir_prev: Any) -> jax.Array:
    """Fletcher-Reeves: ``g.g / g_prev.g_prev``."""
    return _fletcher_reeves(dot_products(grad, grad_prev, dir_prev))


def polak_ribiere(grad: Any, grad_prev: Any, dir_prev: Any) -> jax.Array:
    """Polak-Ribiere: ``g.(g - g_prev) / g_prev.g_prev``."""
    return _polak_ribiere(dot_products(grad, grad_prev, dir_prev))


def polak_ribiere_plus(grad: Any, grad_prev: Any, dir_prev: Any) -> jax.Array:
    """Polak-Ribiere+: ``max(0, beta_PR)``, an automatic restart when PR < 0."""
    return _polak_ribiere_plus(dot_products(grad, grad_prev, dir_prev))


def hestenes_stiefel(grad: Any, grad_prev: Any, dir_prev: Any) -> jax.Array:
    """Hestenes-Stiefel: ``g.y / d_prev.y`` with ``y = g - g_prev``."""
    return _hestenes_stiefel(dot_products(grad, grad_prev, dir_prev))


def dai_yuan(grad: Any, grad_prev: Any, dir_prev: Any) -> jax.Array:
    """Dai-Yuan: ``g.g / d_prev.y`` with ``y = g - g_prev``."""
    return _dai_yuan(dot_products(grad, grad_prev, dir_prev))


def hager_zhang(grad: Any, grad_prev: Any, dir_prev: Any) -> jax.Array:
    r"""Hager-Zhang (CG_DESCENT): ``(y - 2 d |y|^2 / d.y) . g / d.y``, bounded below.

    .. math::
      \beta^{N} = \Big(y - 2 d_{k-1} \frac{\|y\|^2}{d_{k-1}^\top y}\Big)^\top
      \frac{g_k}{d_{k-1}^\top y}, \qquad
      \beta = \max\Big(\beta^{N},
      \frac{-1}{\|d_{k-1}\| \min(0.01, \|g_{k-1}\|)}\Big).

    References:
      Hager & Zhang, *A new conjugate gradient method with guaranteed descent
      and an efficient line search*, SIAM J. Optimization 16(1), 2005.
    """
    return _hager_zhang(dot_products(grad, grad_prev, dir_prev))


BETA_RULES: dict[str, BetaRule] = {
    "fletcher_reeves": fletcher_reeves,
    "polak_ribiere": polak_ribiere,
    "polak_ribiere_plus": polak_ribiere_plus,
    "hestenes_stiefel": hestenes_stiefel,
    "dai_yuan": dai_yuan,
    "hager_zhang": hager_zhang,
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


_FROM_PRODUCTS = {
    fletcher_reeves: _fletcher_reeves,
    polak_ribiere: _polak_ribiere,
    polak_ribiere_plus: _polak_ribiere_plus,
    hestenes_stiefel: _hestenes_stiefel,
    dai_yuan: _dai_yuan,
    hager_zhang: _hager_zhang,
}


def from_dot_products(rule: BetaRule) -> Callable[[DotProducts], jax.Array] | None:
    """The rule as a function of :class:`DotProducts` (rules of :data:`BETA_RULES`).

    ``None`` for any other function, which needs the trees themselves.
    """
    return _FROM_PRODUCTS.get(rule)
