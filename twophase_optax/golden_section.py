"""Golden-section line search as an optax transformation.

The CG phase of the two-phase method needs a line search with "no
meta-parameters except a line-search tolerance"; the paper names golden section
search (Numerical Recipes' ``mnbrak`` + ``golden``). This module implements it
with optax's line-search calling convention, entirely inside one
``jax.lax.while_loop``, so it can be jitted, vmapped and composed like any
optax line search.
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

GOLDEN_RATIO = (1.0 + 5.0**0.5) / 2.0
# The golden-section point of [lo, hi] lies a fraction 1/phi^2 ~ 0.382 in from
# an end. Using it both to shrink and to section means that the point we keep
# is always already at a golden position of the bracket we end up with.
_GOLDEN_FRACTION = 1.0 / GOLDEN_RATIO**2

# Stages of the inner loop.
_SHRINKING = 0  # No point below phi(0) yet: step back towards 0.
_EXPANDING = 1  # phi still falling: step out by the golden ratio.
_SECTIONING = 2  # lo < mid < hi with phi(mid) lowest: golden-section reduction.
_DONE = 3


class GoldenSectionInfo(NamedTuple):
    """Diagnostics of the last golden-section search.

    Attributes:
      num_evaluations: number of ``value_fn`` evaluations the search used (the
        value at the current params is given, not evaluated).
      bracket_width: width ``hi - lo`` of the final bracket, in units of the
        step size. When the expansion limit ends the search before the minimum
        is bracketed, it is the width of the last expansion step.
      failed: ``True`` when no finite value below ``phi(0)`` was found along
        a non-zero direction; the step is then zero. A zero direction gives
        a zero step that is not a failure.
    """

    num_evaluations: jax.Array  # int32
    bracket_width: jax.Array  # float
    failed: jax.Array  # bool


class GoldenSectionLinesearchState(NamedTuple):
    """State of :func:`golden_section_linesearch`.

    Attributes:
      learning_rate: the accepted step size ``alpha`` (zero after a failure).
        The next search starts from it. The name matches optax's line searches,
        so ``optax.tree.get(state, "learning_rate")`` reads it from this state
        or a chain holding it; inside ``two_phase`` whose first phase has a
        ``learning_rate`` of its own (``optax.inject_hyperparams``) the name
        is ambiguous, and ``optax.tree.get`` needs a filter (docs/cg.md).
      value: ``value_fn`` at the new params ``params + alpha * d``, so a
        training loop can log the loss without another forward pass.
      info: a :class:`GoldenSectionInfo`.
    """

    learning_rate: jax.Array
    value: jax.Array
    info: GoldenSectionInfo


class _Search(NamedTuple):
    """Carry of the inner ``while_loop``: a bracket ``lo < mid < hi``."""

    stage: jax.Array
    trial: jax.Array
    lo: jax.Array
    mid: jax.Array
    hi: jax.Array
    f_lo: jax.Array
    f_mid: jax.Array
    f_hi: jax.Array
    num_evaluations: jax.Array
    num_expansions: jax.Array


def _check_hyperparameters(
    initial_step: float, tol: float, max_evaluations: int, max_expansions: int
) -> None:
    check = functools.partial(
        _protocol.check_hyperparameter, "golden_section_linesearch: "
    )
    check("initial_step", initial_step, *_protocol.POSITIVE)
    check("tol", tol, lambda x: 0 < x < 1, "a relative bracket width in (0, 1)")
    check("max_evaluations", max_evaluations, *_protocol.COUNT)
    check(
        "max_expansions",
        max_expansions,
        lambda x: x >= 0,
        "an integer >= 0",
        integer=True,
    )


def golden_section_linesearch(
    initial_step: float = 1.0,
    tol: float = 1e-2,
    max_evaluations: int = 30,
    max_expansions: int = 20,
) -> optax.GradientTransformationExtraArgs:
    r"""Golden-section line search: minimises the loss along the given direction.

    With :math:`\phi(\alpha) = f(w + \alpha d)` for the params :math:`w` and the
    incoming updates :math:`d`, it returns :math:`\alpha^* d` where

    .. math::
      \alpha^* \approx \operatorname{argmin}_{\alpha > 0} \phi(\alpha),
      \qquad \phi(\alpha^*) < \phi(0).

    1. Bracket: start from the previous accepted step (``initial_step`` at
       first). While :math:`\phi(\alpha) \ge \phi(0)`, shrink
       :math:`\alpha \leftarrow \alpha/\varphi^2`; while :math:`\phi` keeps
       falling, expand the step by the golden ratio :math:`\varphi`.
    2. Section: shrink the bracket ``lo < mid < hi`` by golden section until
       ``hi - lo <= tol * mid`` or ``max_evaluations`` is spent.

    Each iteration of the single ``jax.lax.while_loop`` evaluates ``value_fn``
    exactly once and reuses the interior point. A point whose value is NaN or
    inf, or not below :math:`\phi(0)`, is never accepted: the step is then zero
    and ``info.failed`` is set.

    The search needs values only, no gradients. Step sizes are kept in float32
    (float64 for float64 params), also for bfloat16 params.

    Args:
      initial_step: first trial step, used until a step has been accepted and
        after a failed search.
      tol: relative width of the final bracket, ``(hi - lo) / alpha``. Golden
        section locates a smooth minimum only to about ``sqrt(eps)``, so values
        below ``1e-7`` (float32) or ``1e-15`` (float64) buy nothing.
      max_evaluations: budget of ``value_fn`` evaluations per search.
      max_expansions: how often the step may grow by the golden ratio within
        one search (``initial_step * 1.618**max_expansions`` at most).

    Returns:
      An ``optax.GradientTransformationExtraArgs``. Its ``update`` is called as
      ``update(d, state, params, value=f(params), value_fn=f, **f_kwargs)``;
      ``grad`` is accepted and ignored, and the remaining keyword arguments are
      passed on to ``value_fn``.

    Example:
      >>> import jax.numpy as jnp
      >>> import optax
      >>> import twophase_optax as tpo
      >>> f = lambda w: jnp.sum((w - 3.0) ** 2)
      >>> w = jnp.zeros(2)
      >>> ls = tpo.golden_section_linesearch(tol=1e-4)
      >>> state = ls.init(w)
      >>> d = jnp.ones(2)  # search along (1, 1): the minimum is at alpha = 3
      >>> step, state = ls.update(d, state, w, value=f(w), value_fn=f)
      >>> print(f"{float(state.learning_rate):.3f}")
      3.000

    References:
      Press et al., *Numerical Recipes*, 3rd ed., section 10.2 (golden section
      search and ``mnbrak``), 2007.
    """
    _check_hyperparameters(initial_step, tol, max_evaluations, max_expansions)

    def init_fn(params: optax.Params) -> GoldenSectionLinesearchState:
        dtype = _protocol.scalar_dtype(params)
        return GoldenSectionLinesearchState(
            learning_rate=jnp.asarray(initial_step, dtype),
            value=jnp.asarray(jnp.inf, dtype),
            info=GoldenSectionInfo(
                num_evaluations=jnp.asarray(0, jnp.int32),
                bracket_width=jnp.asarray(0.0, dtype),
                failed=jnp.asarray(False),
            ),
        )

    def update_fn(
        updates: optax.Updates,
        state: GoldenSectionLinesearchState,
        params: optax.Params,
        *,
        value: jax.typing.ArrayLike | None = None,
        grad: optax.Updates | None = None,
        value_fn: Callable[..., jax.typing.ArrayLike] | None = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, GoldenSectionLinesearchState]:
        del grad  # Derivative-free.
        _protocol.require_value_and_value_fn(
            "golden_section_linesearch", value, value_fn
        )
        _protocol.reject_masked_params("golden_section_linesearch", params)
        loss = _protocol.bind_value_fn(
            "golden_section_linesearch", value_fn, extra_args
        )
        # From the params: optax.tree.set may have put a float in the state.
        dtype = _protocol.scalar_dtype(params)

        scaled, phi = _protocol.line(loss, params, updates, dtype)

        phi0 = jnp.asarray(value, dtype)
        zero, inf = jnp.zeros((), dtype), jnp.full((), jnp.inf, dtype)
        d_dot_d = _protocol.vdot(updates, updates, dtype)
        nothing_to_do = ~jnp.isfinite(phi0) | ~jnp.isfinite(d_dot_d) | (d_dot_d == 0)
        start = jnp.where(state.learning_rate > 0, state.learning_rate, initial_step)
        init_search = _Search(
            stage=jnp.where(nothing_to_do, _DONE, _SHRINKING).astype(jnp.int32),
            trial=start.astype(dtype),
            lo=zero,
            mid=zero,
            hi=inf,
            f_lo=phi0,
            f_mid=phi0,
            f_hi=inf,
            num_evaluations=jnp.asarray(0, jnp.int32),
            num_expansions=jnp.asarray(0, jnp.int32),
        )

        def cond_fn(s: _Search) -> jax.Array:
            return (s.stage != _DONE) & (s.num_evaluations < max_evaluations)

        def body_fn(s: _Search) -> _Search:
            f = phi(s.trial)
            s = s._replace(num_evaluations=s.num_evaluations + 1)
            s = jax.lax.switch(
                s.stage, (_shrink, _expand, _section, lambda s, f: s), s, f
            )
            return optax.tree.cast_like(s, init_search)

        def _start_sectioning(s: _Search) -> _Search:
            """Places the next trial in the larger half, or stops if narrow."""
            right_larger = (s.hi - s.mid) > (s.mid - s.lo)
            trial = jnp.where(
                right_larger,
                s.mid + _GOLDEN_FRACTION * (s.hi - s.mid),
                s.mid - _GOLDEN_FRACTION * (s.mid - s.lo),
            )
            narrow = (s.hi - s.lo) <= tol * s.mid
            return s._replace(
                stage=jnp.where(narrow, _DONE, _SECTIONING).astype(jnp.int32),
                trial=trial,
            )

        def _start_expanding(s: _Search) -> _Search:
            return s._replace(
                stage=jnp.asarray(_EXPANDING, jnp.int32),
                trial=s.mid + GOLDEN_RATIO * (s.mid - s.lo),
            )

        def _shrink(s: _Search, f: jax.Array) -> _Search:
            def found(s):
                s = s._replace(mid=s.trial, f_mid=f)
                # If a too-long step came first, [0, trial, hi] is a bracket.
                return jax.lax.cond(
                    jnp.isfinite(s.hi), _start_sectioning, _start_expanding, s
                )

            def step_back(s):
                return s._replace(hi=s.trial, f_hi=f, trial=s.trial * _GOLDEN_FRACTION)

            return jax.lax.cond(f < s.f_lo, found, step_back, s)

        def _expand(s: _Search, f: jax.Array) -> _Search:
            def closed(s):
                return _start_sectioning(s._replace(hi=s.trial, f_hi=f))

            def step_out(s):
                s = s._replace(
                    lo=s.mid,
                    f_lo=s.f_mid,
                    mid=s.trial,
                    f_mid=f,
                    num_expansions=s.num_expansions + 1,
                )
                s = _start_expanding(s)
                return s._replace(
                    stage=jnp.where(
                        s.num_expansions >= max_expansions, _DONE, _EXPANDING
                    ).astype(jnp.int32)
                )

            return jax.lax.cond(f >= s.f_mid, closed, step_out, s)

        def _section(s: _Search, f: jax.Array) -> _Search:
            x, right = s.trial, s.trial > s.mid
            better = f < s.f_mid
            s = s._replace(
                lo=jnp.where(
                    better & right, s.mid, jnp.where(~better & ~right, x, s.lo)
                ),
                f_lo=jnp.where(
                    better & right, s.f_mid, jnp.where(~better & ~right, f, s.f_lo)
                ),
                hi=jnp.where(
                    better & ~right, s.mid, jnp.where(~better & right, x, s.hi)
                ),
                f_hi=jnp.where(
                    better & ~right, s.f_mid, jnp.where(~better & right, f, s.f_hi)
                ),
                mid=jnp.where(better, x, s.mid),
                f_mid=jnp.where(better, f, s.f_mid),
            )
            return _start_sectioning(s)

        search = jax.lax.while_loop(cond_fn, body_fn, init_search)

        # mid always holds the lowest value seen; f_mid < phi0 implies finite.
        accepted = (search.f_mid < phi0) & (search.mid > 0)
        alpha = jnp.where(accepted, search.mid, zero)
        width = jnp.where(
            jnp.isfinite(search.hi), search.hi - search.lo, search.mid - search.lo
        )
        new_state = GoldenSectionLinesearchState(
            learning_rate=alpha,
            value=jnp.where(accepted, search.f_mid, phi0),
            info=GoldenSectionInfo(
                num_evaluations=search.num_evaluations,
                bracket_width=width,
                # A zero direction (a zero gradient) leaves nothing to search.
                failed=~accepted & (d_dot_d != 0),
            ),
        )
        # A select, not alpha * d: 0 * NaN would leak a non-finite direction.
        step = optax.tree.where(accepted, scaled(alpha), optax.tree.zeros_like(updates))
        return step, optax.tree.cast_like(new_state, state)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
