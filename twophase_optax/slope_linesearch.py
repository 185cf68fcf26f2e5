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

import functools
from collections.abc import Callable
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from twophase_optax import _protocol

_MIN_SHRINK, _MAX_GROW = 0.1, 10.0  # the safeguard around a trial
_GROW, _CUT = 2.0, 0.25  # no curvature seen / a non-finite value
_VALUE_EPSILON = 1e-6  # rounding allowance on phi(0) (Hager & Zhang's epsilon)


class SlopeLinesearchInfo(NamedTuple):
    """Diagnostics of the last search.

    Attributes:
      num_evaluations: ``value_fn`` evaluations used (int32), with or without
        its gradient.
      num_gradients: how many of them also computed the gradient (int32; 0
        unless ``store_grad``). In forward-pass equivalents the search cost
        ``num_evaluations + 2 * num_gradients``.
      slope: :math:`\\phi'(0) = g \\cdot d` of the search.
      failed: ``True`` when the direction did not descend or no finite value
        below :math:`\\phi(0)` was found; the step is then zero. A zero
        direction gives a zero step that is not a failure.
    """

    num_evaluations: jax.Array
    num_gradients: jax.Array
    slope: jax.Array
    failed: jax.Array


class SlopeLinesearchState(NamedTuple):
    r"""State of :func:`slope_linesearch`.

    Attributes:
      learning_rate: the accepted step size (zero after a failure).
      value: ``value_fn`` at the accepted point (``phi(0)`` after a failure).
        With ``store_grad``, ``+inf`` when the gradient there is not known, so
        that ``optax.value_and_grad_from_state`` computes both.
      grad: with ``store_grad``, the gradient at the accepted point (the
        gradient at ``params`` after a failure); ``None`` otherwise.
      info: a :class:`SlopeLinesearchInfo`.
      first_trial_scale: :math:`\alpha \phi'(0)` of the last search that
        found a step (0 before the first): the next search's first trial is
        this over its own :math:`\phi'(0)`. Kept through failures, so that a
        search after one starts at the scale of the last good step.
      retry_trial: after a failed search whose last trial had a finite value
        clearly above :math:`\phi(0)` (its steps were too long), the shorter
        trial it would have tried next; 0 otherwise. A search from the same
        :math:`\phi(0)` and :math:`\phi'(0)` (CG's restart after a failure)
        starts there instead of repeating the failed one, so that an optimal
        step many tenfold shrinks below the first trial is still found. A
        search that failed on values within rounding of :math:`\phi(0)`, or
        not finite, leaves 0, and its repeat fails at once without evaluating.
    """

    learning_rate: jax.Array
    value: jax.Array
    grad: optax.Updates | None
    info: SlopeLinesearchInfo
    first_trial_scale: jax.Array
    retry_trial: jax.Array


class _Bracket(NamedTuple):
    """What the trials with slopes tell about where the line minimum lies."""

    lo: jax.Array  # the lowest point known to descend: 0 at first
    f_lo: jax.Array
    slope_lo: jax.Array
    hi: jax.Array  # the nearest point known to lie past a minimum, or inf
    slope_hi: jax.Array  # NaN where not known (a value-only trial)
    last: jax.Array  # the last point with a slope: 0 at first
    slope_last: jax.Array


def _next_trial_from_slopes(
    bracket: _Bracket, a: jax.Array, f: jax.Array, slope_a: jax.Array, with_grad
) -> tuple[_Bracket, jax.Array]:
    r"""The bracket after the trial ``a`` and, if it had a slope, the next trial.

    The next trial is the zero of the secant of :math:`\phi'` through the
    last two points with slopes (exact on a quadratic line, and it takes no
    differences of values, which cancel near a minimum), kept 10% of the
    bracket's width inside it, or, past the last descending point, at least
    10% and at most tenfold beyond it. Where that secant is not defined it
    takes the secant through the bracket's ends, bisects, or doubles; after
    a value that is not finite it cuts the bracket to a quarter.
    """
    b = bracket
    finite = jnp.isfinite(f)
    known = with_grad & finite
    # Values within rounding of lo's (Hager & Zhang's epsilon) do not count
    # as higher: near a minimum they are noise, and the slope decides.
    higher = f > b.f_lo + _VALUE_EPSILON * jnp.abs(b.f_lo)
    descends = known & (slope_a < 0) & ~higher
    # Every trial lies beyond lo; a higher value or a rising slope puts a
    # minimum between them.
    past = ~descends & (~finite | higher | (known & (slope_a >= 0)))
    nearer = past & (a < b.hi)
    new = _Bracket(
        lo=jnp.where(descends, a, b.lo),
        f_lo=jnp.where(descends, f, b.f_lo),
        slope_lo=jnp.where(descends, slope_a, b.slope_lo),
        hi=jnp.where(nearer, a, b.hi),
        slope_hi=jnp.where(nearer, jnp.where(known, slope_a, jnp.nan), b.slope_hi),
        last=jnp.where(known, a, b.last),
        slope_last=jnp.where(known, slope_a, b.slope_last),
    )

    def secant(x0, s0, x1, s1):
        ok = jnp.isfinite(s0) & jnp.isfinite(s1) & (s1 != s0)
        zero = x1 - s1 * (x1 - x0) / jnp.where(ok, s1 - s0, 1.0)
        return jnp.where(ok & jnp.isfinite(zero), zero, jnp.nan)

    recent = secant(b.last, b.slope_last, a, slope_a)
    bracketed = jnp.isfinite(new.hi)
    width = new.hi - new.lo
    ends = secant(new.lo, new.slope_lo, new.hi, new.slope_hi)
    fallback = jnp.where(jnp.isnan(ends), new.lo + 0.5 * width, ends)
    low = jnp.where(bracketed, new.lo + 0.1 * width, 1.1 * a)
    high = jnp.where(bracketed, new.hi - 0.1 * width, _MAX_GROW * a)
    usable = known & (recent >= low) & (recent <= high)
    guess = jnp.where(bracketed, fallback, _GROW * a)
    # A value that is not finite (an overflow far along the line) says
    # nothing about where the minimum lies but that it is much nearer: cut
    # to a quarter of the bracket, as the value-only proposal does, rather
    # than bisect.
    guess = jnp.where(finite, guess, new.lo + _CUT * width)
    return new, jnp.clip(jnp.where(usable, recent, guess), low, high)


class _Search(NamedTuple):
    trial: jax.Array
    previous: jax.Array  # the trial before, 0 before the second evaluation
    f_previous: jax.Array
    bracket: _Bracket | None  # with store_grad
    best: jax.Array
    f_best: jax.Array
    grad_best: Any  # with store_grad: the gradient at best, if known
    best_has_grad: jax.Array
    done: jax.Array
    num_evaluations: jax.Array
    num_gradients: jax.Array


def slope_linesearch(
    initial_step: float = 1.0,
    rtol: float = 0.1,
    max_evaluations: int = 20,
    store_grad: bool = False,
    first_trial_grad: bool = False,
    first_rtol: float | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""An interpolating line search from :math:`\phi(0)`, :math:`\phi'(0)` and trials.

    Args:
      initial_step: the first trial of the first search, and after a failure.
      rtol: stop once the parabola's minimum lies within ``rtol`` (relative)
        of the trial it was built from.
      max_evaluations: budget of ``value_fn`` evaluations per search.
      store_grad: evaluate the gradient too at every trial after the first,
        and keep the one at the accepted point in ``state.grad``, so that
        ``optax.value_and_grad_from_state`` hands it to the next step instead
        of a new forward and backward pass. A trial with a gradient is
        accepted once its slope has fallen to ``rtol`` of the first,
        :math:`|\phi'(a)| \le \text{rtol}\,|\phi'(0)|` (on a quadratic line:
        ``a`` within ``rtol`` of the minimum, the test without gradients). A
        typical search is then one value and one value-and-gradient, about 4
        forward-pass equivalents in all, where a value-only search of two
        trials plus the next step's gradient costs 5.
      first_trial_grad: with ``store_grad``, evaluate the gradient at the
        first trial too, so that a search whose first trial is accepted costs
        one value and gradient (3 forward-pass equivalents) and one that is
        not costs at least two (6). Cheaper than the value-first search only
        where the first trial is accepted more than 2/3 of the time, and the
        first trial is a guess, not a line minimum: on the CG-phase benchmark
        (BENCHMARKS.md section 3) it lowers the cost per step but converges
        far more slowly per forward pass, so it is not the default.
      first_rtol: with ``first_trial_grad``, the slope tolerance for
        accepting the first trial, :math:`|\phi'(a)| \le
        \text{first\_rtol}\,|\phi'(0)|` (Hager & Zhang's approximate Wolfe
        conditions are about 0.8 to 0.9); ``rtol`` when ``None``. Later trials
        use ``rtol``.

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
    check = functools.partial(_protocol.check_hyperparameter, "slope_linesearch: ")
    check("initial_step", initial_step, *_protocol.POSITIVE)
    check("rtol", rtol, *_protocol.FRACTION)
    check("max_evaluations", max_evaluations, *_protocol.COUNT)
    if not isinstance(store_grad, bool):
        raise ValueError(f"store_grad must be a bool, got {store_grad!r}.")
    if not isinstance(first_trial_grad, bool):
        raise ValueError(f"first_trial_grad must be a bool, got {first_trial_grad!r}.")
    if first_trial_grad and not store_grad:
        raise ValueError(
            "first_trial_grad=True needs store_grad=True: the first trial's "
            "gradient is kept for the next step only with store_grad."
        )
    if first_rtol is not None and not first_trial_grad:
        raise ValueError(
            "first_rtol applies only with first_trial_grad=True, got "
            f"first_rtol={first_rtol!r} without it."
        )
    if first_rtol is not None:
        check("first_rtol", first_rtol, *_protocol.FRACTION)
    rtol_first = rtol if first_rtol is None else first_rtol

    def init_fn(params: optax.Params) -> SlopeLinesearchState:
        dtype = _protocol.scalar_dtype(params)
        return SlopeLinesearchState(
            learning_rate=jnp.zeros((), dtype),
            value=jnp.asarray(jnp.inf, dtype),
            grad=optax.tree.zeros_like(params) if store_grad else None,
            info=SlopeLinesearchInfo(
                num_evaluations=jnp.asarray(0, jnp.int32),
                num_gradients=jnp.asarray(0, jnp.int32),
                slope=jnp.zeros((), dtype),
                failed=jnp.asarray(False),
            ),
            first_trial_scale=jnp.zeros((), dtype),
            retry_trial=jnp.zeros((), dtype),
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
        _protocol.reject_masked_params("slope_linesearch", params)
        loss = _protocol.bind_value_fn("slope_linesearch", value_fn, extra_args)
        # From the params, not the state: optax.tree.set may have written a
        # Python float into it.
        dtype = _protocol.scalar_dtype(params)

        scaled, phi = _protocol.line(loss, params, updates, dtype)
        zero_grad = optax.tree.zeros_like(params) if store_grad else None

        def evaluate(a, with_grad):
            """``phi(a)`` and, if ``with_grad``, the gradient at ``a``."""
            if not store_grad:
                return phi(a), None

            def value_and_grad(a):
                f, g = jax.value_and_grad(loss)(optax.apply_updates(params, scaled(a)))
                f = jnp.asarray(f, dtype)
                f = jnp.where(jnp.isfinite(f) & _protocol.all_finite(g), f, jnp.inf)
                return f, optax.tree.cast_like(g, zero_grad)

            return jax.lax.cond(
                with_grad, value_and_grad, lambda a: (phi(a), zero_grad), a
            )

        phi0 = jnp.asarray(value, dtype)
        slope = _protocol.vdot(grad, updates, dtype)
        d_dot_d = _protocol.vdot(updates, updates, dtype)
        descends = jnp.isfinite(phi0) & jnp.isfinite(slope) & (slope < 0)
        # Nocedal & Wright (3.60): keep alpha * phi'(0) from the last search.
        previous = state.first_trial_scale / jnp.where(descends, slope, 1.0)
        usable = jnp.isfinite(previous) & (previous > 0)
        first = jnp.where(usable, previous, jnp.asarray(initial_step, dtype))
        # The last search failed from the same phi(0) and phi'(0). Where it
        # ended on values clearly above phi(0) its steps were too long, and
        # this one goes on from the shorter trial it would have tried next
        # (the optimal step may lie many tenfold shrinks below the first
        # trial: mean((1e4 x)^2)). Where it ended within rounding of phi(0),
        # the line is flat at that scale and a repeat would only repeat it
        # evaluation for evaluation: fail at once.
        repeat = state.info.failed & (state.value == phi0) & (state.info.slope == slope)
        resume = repeat & (state.retry_trial > 0)
        first = jnp.where(resume, state.retry_trial, first)
        repeat &= ~resume
        zero = jnp.zeros((), dtype)
        init_search = _Search(
            trial=first.astype(dtype),
            previous=zero,
            f_previous=jnp.asarray(jnp.inf, dtype),
            bracket=_Bracket(
                lo=zero,
                f_lo=phi0,
                slope_lo=slope,
                hi=jnp.asarray(jnp.inf, dtype),
                slope_hi=jnp.asarray(jnp.nan, dtype),
                last=zero,
                slope_last=slope,
            )
            if store_grad
            else None,
            best=zero,
            f_best=phi0,
            grad_best=zero_grad,
            best_has_grad=jnp.asarray(False),
            done=~descends | repeat,
            num_evaluations=jnp.asarray(0, jnp.int32),
            num_gradients=jnp.asarray(0, jnp.int32),
        )

        def cond_fn(s):
            return ~s.done & (s.num_evaluations < max_evaluations)

        def body_fn(s):
            a = s.trial
            # With store_grad every trial after the first computes the gradient
            # (and the first too with first_trial_grad).
            with_grad = jnp.asarray(store_grad) & (
                (s.num_evaluations > 0) | first_trial_grad
            )
            f, g = evaluate(a, with_grad)
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
            sqrt_discriminant = jnp.sqrt(jnp.maximum(discriminant, 0.0))
            # The root in the form that does not cancel: a nearly quadratic
            # line has cubic_a ~ 0 and cubic_b > 0.
            root = jnp.where(
                cubic_b > 0,
                -slope / jnp.where(cubic_b > 0, cubic_b + sqrt_discriminant, 1.0),
                (sqrt_discriminant - cubic_b)
                / (3.0 * jnp.where(cubic_a == 0, 1.0, cubic_a)),
            )
            cubic_ok = (
                usable
                & ((cubic_a != 0) | (cubic_b > 0))
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
            if store_grad:
                slope_a = _protocol.vdot(_protocol.descent_gradient(g), updates, dtype)
                bracket, proposal_with_slope = _next_trial_from_slopes(
                    s.bracket, a, f, slope_a, with_grad
                )
                proposal = jnp.where(with_grad, proposal_with_slope, proposal)
                # The slope at the trial has fallen to rtol of phi'(0), and the
                # value is not above phi(0) beyond rounding (Hager & Zhang's
                # approximate Wolfe conditions): near a minimum the decrease
                # can be too small for the values to show, the slope is not.
                tolerance = jnp.where(s.num_evaluations == 0, rtol_first, rtol)
                settled = (
                    with_grad
                    & jnp.isfinite(f)
                    & (jnp.abs(slope_a) <= tolerance * jnp.abs(slope))
                    & (f <= phi0 + _VALUE_EPSILON * jnp.abs(phi0))
                )
                take = better | settled
                best = jnp.where(take, a, s.best)
                f_best = jnp.where(take, f, s.f_best)
                grad_best = optax.tree.where(take, g, s.grad_best)
                best_has_grad = jnp.where(take, with_grad, s.best_has_grad)
            else:
                bracket = s.bracket
                best = jnp.where(better, a, s.best)
                f_best = jnp.where(better, f, s.f_best)
                grad_best, best_has_grad = None, s.best_has_grad
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
                    bracket=bracket,
                    best=best,
                    f_best=f_best,
                    grad_best=grad_best,
                    best_has_grad=best_has_grad,
                    done=settled,
                    num_evaluations=s.num_evaluations + 1,
                    num_gradients=s.num_gradients + with_grad.astype(jnp.int32),
                ),
                s,
            )

        search = jax.lax.while_loop(cond_fn, body_fn, init_search)
        # A lower value, or (store_grad) a trial that settled on its slope.
        settled = descends & search.done & ~repeat
        accepted = descends & ((search.f_best < phi0) | settled) & (search.best > 0)
        alpha = jnp.where(accepted, search.best, zero)
        value_next = jnp.where(accepted, search.f_best, phi0)
        grad_next = None
        if store_grad:
            # The gradient at the new params, where known: the accepted trial's,
            # or the given one at params after a failure.
            grad_next = optax.tree.where(
                accepted,
                search.grad_best,
                # Stored as jax.grad returns it (value_and_grad_from_state).
                optax.tree.cast_like(_protocol.descent_gradient(grad), zero_grad),
            )
            known = jnp.where(accepted, search.best_has_grad, True)
            known &= _protocol.all_finite(grad_next)
            value_next = jnp.where(known, value_next, jnp.inf)
        failed = ~accepted & (d_dot_d != 0)
        # The steps were too long where the last trial's value was finite and
        # clearly above phi(0); the next trial, already computed, is shorter.
        # (Non-finite values to the end: nothing says a shorter step helps.)
        f_last = search.f_previous
        too_long = jnp.isfinite(f_last) & (
            f_last > phi0 + _VALUE_EPSILON * jnp.abs(phi0)
        )
        retry = failed & descends & too_long & jnp.isfinite(search.trial)
        new_state = SlopeLinesearchState(
            learning_rate=alpha,
            value=value_next,
            grad=grad_next,
            info=SlopeLinesearchInfo(
                num_evaluations=search.num_evaluations,
                num_gradients=search.num_gradients,
                slope=jnp.where(descends, slope, zero),
                failed=failed,
            ),
            first_trial_scale=jnp.where(
                accepted, alpha * slope, state.first_trial_scale
            ),
            retry_trial=jnp.where(retry & (search.trial > 0), search.trial, zero),
        )
        step = optax.tree.where(accepted, scaled(alpha), optax.tree.zeros_like(updates))
        return step, optax.tree.cast_like(new_state, state)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
