r"""A line search that uses the slope CG already knows, as an optax transformation.

Along the line :math:`\phi(\alpha) = f(w + \alpha d)` nonlinear CG knows more
than the value :math:`\phi(0)`: the gradient it already computed gives the
slope :math:`\phi'(0) = g \cdot d` for free. A parabola through
:math:`\phi(0)`, :math:`\phi'(0)` and one trial value :math:`\phi(a)`,

.. math::
  q(\alpha) = \phi(0) + \phi'(0) \alpha + c \alpha^2, \qquad
  c = \frac{\phi(a) - \phi(0) - \phi'(0) a}{a^2},

has its minimum at :math:`\alpha_q = -\phi'(0) / (2c)`; on a quadratic line it
is the exact minimum. The search evaluates a trial, moves to the parabola's
minimum (kept within ``[a / 10, 10 a]``; doubled where no positive curvature is
seen; cut to a quarter where the value is not finite), and stops once the
parabola's minimum lies within ``rtol`` of the trial it was built from: then
that trial is a line minimum to about ``rtol``. A smooth line needs 1 to 3
evaluations, a quadratic 2 (1 when the trial is already the minimum). The
first trial follows Nocedal & Wright's eq. (3.60),
:math:`a_1 = \alpha_{prev} \, \phi'_{prev}(0) / \phi'(0)`, which keeps
:math:`\alpha \phi'(0)` from step to step.

All of it runs in one ``jax.lax.while_loop``. The lowest finite value below
:math:`\phi(0)` is returned; if there is none, or the direction does not
descend (:math:`\phi'(0) \ge 0`), the step is zero and ``info.failed`` is set.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from twophase_optax import _protocol

_MIN_SHRINK, _MAX_GROW = 0.1, 10.0  # the safeguard around a trial
_GROW, _CUT = 2.0, 0.25  # no curvature seen / a non-finite value


class SlopeLinesearchInfo(NamedTuple):
    """Diagnostics of the last search.

    Attributes:
      num_evaluations: ``value_fn`` evaluations used (int32).
      slope: :math:`\\phi'(0) = g \\cdot d` of the search.
      failed: ``True`` when the direction did not descend or no finite value
        below :math:`\\phi(0)` was found; the step is then zero. A zero
        direction gives a zero step that is not a failure.
    """

    num_evaluations: jax.Array
    slope: jax.Array
    failed: jax.Array


class SlopeLinesearchState(NamedTuple):
    """State of :func:`slope_linesearch`.

    Attributes:
      learning_rate: the accepted step size (zero after a failure).
      value: ``value_fn`` at the accepted point (``phi(0)`` after a failure).
      info: a :class:`SlopeLinesearchInfo`; its ``slope`` also sets the next
        search's first trial.
    """

    learning_rate: jax.Array
    value: jax.Array
    info: SlopeLinesearchInfo


class _Search(NamedTuple):
    trial: jax.Array
    previous: jax.Array  # the trial before, 0 before the second evaluation
    f_previous: jax.Array
    best: jax.Array
    f_best: jax.Array
    done: jax.Array
    num_evaluations: jax.Array


def slope_linesearch(
    initial_step: float = 1.0,
    rtol: float = 0.1,
    max_evaluations: int = 20,
) -> optax.GradientTransformationExtraArgs:
    r"""An interpolating line search from :math:`\phi(0)`, :math:`\phi'(0)` and trials.

    Args:
      initial_step: the first trial of the first search, and after a failure.
      rtol: stop once the parabola's minimum lies within ``rtol`` (relative)
        of the trial it was built from.
      max_evaluations: budget of ``value_fn`` evaluations per search.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` called as
      ``update(d, state, params, value=f(params), grad=g, value_fn=f,
      **f_kwargs)``; ``grad`` (the gradient at ``params``) is required, for
      the slope.

    Example:
      >>> import jax
      >>> import jax.numpy as jnp
      >>> import twophase_optax as tpo
      >>> f = lambda w: jnp.sum((w - 3.0) ** 2)
      >>> w = jnp.zeros(2)
      >>> ls = tpo.slope_linesearch()
      >>> state = ls.init(w)
      >>> value, grad = jax.value_and_grad(f)(w)
      >>> step, state = ls.update(jnp.ones(2), state, w, value=value, grad=grad,
      ...                         value_fn=f)
      >>> float(state.learning_rate), int(state.info.num_evaluations)
      (3.0, 2)

    References:
      Nocedal & Wright, *Numerical Optimization*, 2nd ed., section 3.5
      (interpolation, eq. 3.58, and the initial step, eq. 3.60), 2006.
    """
    if not (isinstance(initial_step, (int, float)) and 0 < initial_step < float("inf")):
        raise ValueError(
            f"initial_step must be a positive finite number, got {initial_step!r}."
        )
    if not (isinstance(rtol, (int, float)) and 0 < rtol < 1):
        raise ValueError(f"rtol must lie in (0, 1), got {rtol!r}.")
    if not (isinstance(max_evaluations, int) and max_evaluations >= 1):
        raise ValueError(
            f"max_evaluations must be an integer >= 1, got {max_evaluations!r}."
        )

    def init_fn(params: optax.Params) -> SlopeLinesearchState:
        dtype = _protocol.scalar_dtype(params)
        return SlopeLinesearchState(
            learning_rate=jnp.zeros((), dtype),
            value=jnp.asarray(jnp.inf, dtype),
            info=SlopeLinesearchInfo(
                num_evaluations=jnp.asarray(0, jnp.int32),
                slope=jnp.zeros((), dtype),
                failed=jnp.asarray(False),
            ),
        )

    def update_fn(
        updates: optax.Updates,
        state: SlopeLinesearchState,
        params: optax.Params,
        *,
        value: jax.typing.ArrayLike | None = None,
        grad: optax.Updates | None = None,
        value_fn: Callable[..., jax.typing.ArrayLike] | None = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, SlopeLinesearchState]:
        _protocol.require_value_and_value_fn("slope_linesearch", value, value_fn)
        if grad is None:
            raise TypeError(
                "slope_linesearch.update needs grad=, the gradient at params: "
                "the search starts from the slope grad . updates. Call it as "
                "update(d, state, params, value=value, grad=grad, "
                "value_fn=loss_fn, **loss_fn_kwargs)."
            )
        loss = _protocol.bind_value_fn("slope_linesearch", value_fn, extra_args)
        dtype = state.learning_rate.dtype

        scaled, phi = _protocol.line(loss, params, updates, dtype)

        phi0 = jnp.asarray(value, dtype)
        slope = _protocol.vdot(grad, updates, dtype)
        d_dot_d = _protocol.vdot(updates, updates, dtype)
        descends = jnp.isfinite(phi0) & jnp.isfinite(slope) & (slope < 0)
        # Nocedal & Wright (3.60): keep alpha * phi'(0) from the last search.
        previous = (
            state.learning_rate * state.info.slope / jnp.where(descends, slope, 1.0)
        )
        usable = (state.learning_rate > 0) & jnp.isfinite(previous) & (previous > 0)
        first = jnp.where(usable, previous, jnp.asarray(initial_step, dtype))
        zero = jnp.zeros((), dtype)
        init_search = _Search(
            trial=first.astype(dtype),
            previous=zero,
            f_previous=jnp.asarray(jnp.inf, dtype),
            best=zero,
            f_best=phi0,
            done=~descends,
            num_evaluations=jnp.asarray(0, jnp.int32),
        )

        def cond_fn(s):
            return ~s.done & (s.num_evaluations < max_evaluations)

        def body_fn(s):
            a = s.trial
            f = phi(a)
            better = f < s.f_best
            curvature = (f - phi0 - slope * a) / (a * a)
            minimum = -slope / (2.0 * jnp.where(curvature > 0, curvature, 1.0))
            # With two trials, the cubic through phi(0), phi'(0) and both
            # (Nocedal & Wright eq. 3.59); exact on a cubic line.
            b = s.previous
            r_a = f - phi0 - slope * a
            r_b = s.f_previous - phi0 - slope * b
            denominator = a * a * b * b * (a - b)
            usable = jnp.isfinite(s.f_previous) & (b > 0) & (a != b)
            denominator = jnp.where(usable, denominator, 1.0)
            cubic_a = (b * b * r_a - a * a * r_b) / denominator
            cubic_b = (-b * b * b * r_a + a * a * a * r_b) / denominator
            discriminant = cubic_b * cubic_b - 3.0 * cubic_a * slope
            root = (-cubic_b + jnp.sqrt(jnp.maximum(discriminant, 0.0))) / (
                3.0 * jnp.where(cubic_a == 0, 1.0, cubic_a)
            )
            cubic_ok = (
                usable
                & (cubic_a != 0)
                & (discriminant >= 0)
                & jnp.isfinite(root)
                & (root > 0)
            )
            minimum = jnp.where(cubic_ok, root, minimum)
            shaped = cubic_ok | (curvature > 0)
            proposal = jnp.where(
                jnp.isfinite(f),
                jnp.where(shaped, minimum, _GROW * a),
                _CUT * a,
            )
            proposal = jnp.clip(proposal, _MIN_SHRINK * a, _MAX_GROW * a)
            best = jnp.where(better, a, s.best)
            f_best = jnp.where(better, f, s.f_best)
            # The trial is the parabola's minimum (to rtol) and lies below
            # phi(0): a line minimum.
            settled = (
                shaped
                & jnp.isfinite(f)
                & (jnp.abs(proposal - a) <= rtol * a)
                & (f_best < phi0)
            )
            return optax.tree.cast_like(
                _Search(
                    trial=proposal,
                    previous=a,
                    f_previous=f,
                    best=best,
                    f_best=f_best,
                    done=settled,
                    num_evaluations=s.num_evaluations + 1,
                ),
                s,
            )

        search = jax.lax.while_loop(cond_fn, body_fn, init_search)
        accepted = descends & (search.f_best < phi0) & (search.best > 0)
        alpha = jnp.where(accepted, search.best, zero)
        new_state = SlopeLinesearchState(
            learning_rate=alpha,
            value=jnp.where(accepted, search.f_best, phi0),
            info=SlopeLinesearchInfo(
                num_evaluations=search.num_evaluations,
                slope=jnp.where(descends, slope, zero),
                failed=~accepted & (d_dot_d != 0),
            ),
        )
        step = optax.tree.where(accepted, scaled(alpha), optax.tree.zeros_like(updates))
        return step, optax.tree.cast_like(new_state, state)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
