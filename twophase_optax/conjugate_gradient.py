"""Nonlinear conjugate gradient as an optax transformation.

This is the second phase of the two-phase method: once the loss is locally
convex, CG with a line search converges superlinearly where Adam crawls. It is
also a complete optimiser on its own for deterministic (full-batch) problems.
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
from twophase_optax import cg_directions
from twophase_optax.slope_linesearch import slope_linesearch


class ConjugateGradientInfo(NamedTuple):
    """Diagnostics of the last CG step.

    Attributes:
      beta: the ``beta`` used for the last direction, zero after a restart.
      restarted: whether the last direction was steepest descent ``-g``.
    """

    beta: jax.Array  # float
    restarted: jax.Array  # bool


class ConjugateGradientState(NamedTuple):
    """State of :func:`conjugate_gradient`.

    Attributes:
      count: number of updates made so far (int32).
      grad_prev: the gradient of the previous step, :math:`g_{k-1}`; ``None``
        where ``grad_prev_products`` stands in for it.
      dir_prev: the previous search direction, :math:`d_{k-1}`.
      grad_prev_products: where the line search stores the gradient at its
        accepted point (``slope_linesearch(store_grad=True)``, the default)
        and ``beta`` is one of
        :data:`twophase_optax.cg_directions.BETA_RULES`, the products of
        :math:`g_{k-1}` that the next ``beta`` needs, in place of
        :math:`g_{k-1}` itself (one params-sized tree less); ``None`` otherwise.
        A :class:`~twophase_optax.conjugate_gradient.PreviousGradientProducts`.
      linesearch_state: the state of the line search.
      num_failures: how many line searches in a row have failed, 0 after a
        success (int32). The next direction is steepest descent while it is
        positive; :func:`twophase_optax.two_phase` may fall back to its first
        phase once it reaches ``max_failures``.
      num_skipped: steps skipped because the loss or the gradient was not
        finite (int32); nothing else in the state changes on such a step.
      info: a :class:`ConjugateGradientInfo`.
      preconditioner: with ``precondition=True``, the diagonal :math:`P` (a
        tree of positive arrays shaped like the params) that the directions
        are preconditioned by; ones at ``init``. ``None`` otherwise.
    """

    count: jax.Array
    grad_prev: optax.Updates | None
    dir_prev: optax.Updates
    grad_prev_products: PreviousGradientProducts | None
    linesearch_state: optax.OptState
    num_failures: jax.Array
    num_skipped: jax.Array
    info: ConjugateGradientInfo
    preconditioner: optax.Updates | None = None


class PreviousGradientProducts(NamedTuple):
    r"""What the next ``beta`` needs of the previous gradient :math:`g_{k-1}`.

    Attributes:
      sq_norm: :math:`g_{k-1}^\top g_{k-1}`.
      dot_dir: :math:`g_{k-1}^\top d_{k-1}`.
      dot_stored: :math:`g_{k-1}^\top \tilde g_k`, with :math:`\tilde g_k`
        the gradient the line search stored at the new params. It stands for
        :math:`g_{k-1}^\top g_k`, so the next step's gradient must be that
        one (``optax.value_and_grad_from_state``) or equal to it within
        rounding; any other (another mini-batch) restarts the direction.
    """

    sq_norm: jax.Array
    dot_dir: jax.Array
    dot_stored: jax.Array


def linesearch_failed(linesearch_state: Any, step: optax.Updates) -> jax.Array:
    """Whether the line search that returned ``step`` failed.

    Reads the flag each line search documents: ``info.failed`` of
    :func:`twophase_optax.golden_section_linesearch`, a positive
    ``info.decrease_error`` (no sufficient decrease) of optax's zoom and
    backtracking searches. For any other line search a zero step counts as a
    failure.
    """
    info = getattr(linesearch_state, "info", None)
    if hasattr(info, "failed"):
        return jnp.asarray(info.failed)
    if hasattr(info, "decrease_error"):
        return jnp.asarray(info.decrease_error > 0)
    return optax.tree.norm(step) == 0


def stored_grad(linesearch_state: Any) -> optax.Updates | None:
    """The gradient a line search keeps at its accepted point, or ``None``.

    ``slope_linesearch(store_grad=True)`` and optax's searches with
    ``store_grad=True`` keep it in ``state.grad``.
    """
    return getattr(linesearch_state, "grad", None)


def _same_gradient(g: optax.Updates, stored: optax.Updates, dtype) -> jax.Array:
    """Whether ``g`` is ``stored`` up to rounding: relative distance <= sqrt(eps).

    ``stored`` is in optax's convention (conjugated where complex), as ``g``.
    """
    leaves = jax.tree.leaves(g)
    eps = max((float(jnp.finfo(x.dtype).eps) for x in leaves), default=0.0)
    distance = _protocol.vdot(*(2 * [optax.tree.sub(g, stored)]), dtype)
    return distance <= eps * _protocol.vdot(stored, stored, dtype)


def _stored_descent_gradient(linesearch_state: Any) -> optax.Updates | None:
    """The stored gradient in optax's convention (see ``descent_gradient``)."""
    stored = stored_grad(linesearch_state)
    return None if stored is None else _protocol.descent_gradient(stored)


def _check_hyperparameters(
    linesearch: Any, restart_every: int | None, powell_threshold: float | None
) -> None:
    if not (hasattr(linesearch, "init") and hasattr(linesearch, "update")):
        raise ValueError(
            "linesearch must be an optax line-search transformation such as "
            "golden_section_linesearch() or optax.scale_by_zoom_linesearch(15), "
            f"got {linesearch!r}."
        )
    check = functools.partial(_protocol.check_hyperparameter, "conjugate_gradient: ")
    if restart_every is not None:
        check(
            "restart_every",
            restart_every,
            lambda x: x >= 1,
            "None or an integer >= 1",
            integer=True,
        )
    if powell_threshold is not None:
        check(
            "powell_threshold",
            powell_threshold,
            lambda x: 0 < x < float("inf"),
            "None or a positive number",
        )


DEFAULT_BETA = "hager_zhang"
"""The ``beta`` rule of :func:`conjugate_gradient` by default."""
DEFAULT_RTOL = 0.5
DEFAULT_MAX_EVALUATIONS = 8


def default_linesearch() -> optax.GradientTransformationExtraArgs:
    r"""The line search of :func:`conjugate_gradient` by default.

    ``slope_linesearch(rtol=0.5, max_evaluations=8, store_grad=True)``: a
    value at the first trial, a value and gradient at the parabola's minimum,
    accepted once the slope there has fallen to half of :math:`\phi'(0)`.
    Chosen on the CG-phase and solver benchmarks (BENCHMARKS.md sections 3
    and 4) together with the Hager-Zhang ``beta``, which keeps its directions
    descending under such loose searches.
    """
    return slope_linesearch(
        rtol=DEFAULT_RTOL, max_evaluations=DEFAULT_MAX_EVALUATIONS, store_grad=True
    )


def conjugate_gradient(
    beta: str | cg_directions.BetaRule = DEFAULT_BETA,
    linesearch: optax.GradientTransformationExtraArgs | None = None,
    restart_every: int | None = None,
    powell_threshold: float | None = None,
    precondition: bool = False,
) -> optax.GradientTransformationExtraArgs:
    r"""Nonlinear conjugate gradient with a line search.

    .. math::
      d_k = -g_k + \beta_k d_{k-1}, \qquad
      w_{k+1} = w_k + \alpha_k d_k, \quad
      \alpha_k \approx \operatorname{argmin}_{\alpha > 0} f(w_k + \alpha d_k).

    The direction restarts as steepest descent, :math:`d_k = -g_k`, on the
    first step and whenever

    * :math:`d_k` is not a descent direction, :math:`g_k^\top d_k \ge 0`;
    * optionally, Powell's criterion holds,
      :math:`|g_k^\top g_{k-1}| \ge \text{powell\_threshold}\,\|g_k\|^2`
      (0.2 is Powell's value): successive gradients are far from orthogonal,
      so conjugacy is lost;
    * ``beta`` is not finite (a zero denominator);
    * the previous line search failed (see :func:`linesearch_failed`); the
      count of failures in a row is ``state.num_failures``;
    * optionally, every ``restart_every`` steps.

    A step whose loss ``value`` or gradient holds a NaN or an infinity is
    skipped: the update is zero and the state is left as it was, except for
    ``num_skipped``, so the run continues as if the step had never happened.

    With the default line search (``conjugate_gradient.default_linesearch()``, a
    ``slope_linesearch`` with ``store_grad=True``), the
    gradient at the new params is in the state after each step, and
    ``optax.value_and_grad_from_state(f)(params, state=state)`` hands it over
    instead of computing it (on the first step it computes). A step then costs
    its line search alone: typically one value and one value and gradient,
    about 4 forward passes, against 3 for a plain gradient step. Reusing is
    right only while ``value_fn`` stays the same function of the params (the
    same data). The state then keeps three products of the previous gradient
    instead of the gradient itself (2 params-sized trees, the direction and
    the stored gradient), and the next ``beta`` takes the stored gradient to
    be the next one: a gradient that differs from it by more than rounding
    (another mini-batch) restarts the direction as steepest descent. On
    changing mini-batches use ``slope_linesearch()`` without ``store_grad``,
    which keeps the previous gradient and needs no gradients at its trials.

    Args:
      beta: the rule for :math:`\beta_k`: one of ``"hager_zhang"`` (the
        default), ``"fletcher_reeves"``, ``"polak_ribiere"``,
        ``"polak_ribiere_plus"``, ``"hestenes_stiefel"``, ``"dai_yuan"``, or
        any function ``beta(grad, grad_prev, dir_prev)`` (see
        :mod:`twophase_optax.cg_directions`). Hager and Zhang's rule keeps
        the direction descending under inexact line searches, which lets the
        default search stop at half the slope (BENCHMARKS.md, section 3,
        compares the rules).
      linesearch: an optax line-search transformation that scales the
        direction; defaults to ``conjugate_gradient.default_linesearch()``
        (:func:`twophase_optax.slope_linesearch` with ``rtol=0.5``,
        ``max_evaluations=8``, ``store_grad=True``). The paper's
        :func:`golden_section_linesearch` needs no gradients at its trials but
        about 14 values a step.
        ``optax.scale_by_zoom_linesearch(..., curv_rtol=0.1)`` works too (the
        strong Wolfe constant 0.1 keeps CG conjugate; optax's default 0.9 is
        meant for quasi-Newton methods). ``optax.scale_by_backtracking_linesearch``
        fits as well, but its Armijo steps leave successive gradients far from
        orthogonal: CG loses conjugacy (and with ``powell_threshold=0.2``
        restarts nearly every step, becoming steepest descent).
      restart_every: restart every this many steps; ``None`` never does
        (the usual choice is the number of parameters, or never for large
        models).
      powell_threshold: Powell's 0.2, or ``None`` (the default) for no
        Powell restarts: Polak-Ribiere+ restarts on its own where ``beta``
        would turn negative, and the Hager-Zhang rule bounds ``beta`` below
        (BENCHMARKS.md, sections 3 and 4, measure what the restarts cost).
      precondition: keep a diagonal preconditioner :math:`P` in the state
        (``state.preconditioner``, ones at ``init``; one params-sized tree
        more) and search along :math:`d_k = -P g_k + \beta_k d_{k-1}`, with
        ``beta`` and the restart tests in the metric of :math:`P` (CG on
        :math:`z` with :math:`p = P^{1/2} z`). Set :math:`P` with
        ``state._replace(preconditioner=P)``; inside
        :func:`twophase_optax.two_phase` it is set at the swap from the first
        phase's Adam second moment, :math:`P = 1/(\sqrt{\nu} + 10^{-8})`.

    Returns:
      An ``optax.GradientTransformationExtraArgs``, called as
      ``update(grads, state, params, value=f(params), value_fn=f, **f_kwargs)``.
      ``grad`` may be given too; it defaults to ``grads`` and is handed to the
      line search (optax's zoom search needs it).

    Example:
      >>> import jax
      >>> import jax.numpy as jnp
      >>> import optax
      >>> import twophase_optax as tpo
      >>> A = jnp.diag(jnp.array([1.0, 10.0, 100.0]))
      >>> f = lambda w: 0.5 * w @ A @ w - w.sum()
      >>> opt = tpo.conjugate_gradient(
      ...     linesearch=tpo.slope_linesearch(rtol=1e-3, store_grad=True))
      >>> value_and_grad = optax.value_and_grad_from_state(f)
      >>> w = jnp.zeros(3)
      >>> state = opt.init(w)
      >>> for _ in range(4):
      ...     value, grad = value_and_grad(w, state=state)  # reused after step 1
      ...     updates, state = opt.update(
      ...         grad, state, w, value=value, grad=grad, value_fn=f)
      ...     w = optax.apply_updates(w, updates)
      >>> print(" ".join(f"{x:.2f}" for x in w))  # the minimum A^-1 1
      1.00 0.10 0.01

    References:
      Nocedal & Wright, *Numerical Optimization*, 2nd ed., chapter 5, 2006.
      Powell, *Restart procedures for the conjugate gradient method*,
      Mathematical Programming 12, 1977.
    """
    beta_fn = cg_directions.resolve_beta(beta)
    if linesearch is None:
        linesearch = default_linesearch()
    _check_hyperparameters(linesearch, restart_every, powell_threshold)
    beta_from_products = cg_directions.from_dot_products(beta_fn)

    def keeps_products(linesearch_state: Any) -> bool:
        # Static: whether the products of g_{k-1} replace the tree.
        stores = stored_grad(linesearch_state) is not None
        return beta_from_products is not None and stores

    def init_fn(params: optax.Params) -> ConjugateGradientState:
        dtype = _protocol.scalar_dtype(params)
        linesearch_state = linesearch.init(params)
        zero = jnp.zeros((), dtype)
        products = keeps_products(linesearch_state)
        return ConjugateGradientState(
            count=jnp.asarray(0, jnp.int32),
            grad_prev=None if products else optax.tree.zeros_like(params),
            dir_prev=optax.tree.zeros_like(params),
            grad_prev_products=(
                PreviousGradientProducts(zero, zero, zero) if products else None
            ),
            linesearch_state=linesearch_state,
            num_failures=jnp.asarray(0, jnp.int32),
            num_skipped=jnp.asarray(0, jnp.int32),
            info=ConjugateGradientInfo(beta=zero, restarted=jnp.asarray(True)),
            preconditioner=(optax.tree.ones_like(params) if precondition else None),
        )

    def update_fn(
        updates: optax.Updates,
        state: ConjugateGradientState,
        params: optax.Params,
        *,
        value: jax.typing.ArrayLike | None = None,
        grad: optax.Updates | None = None,
        value_fn: Callable[..., jax.typing.ArrayLike] | None = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, ConjugateGradientState]:
        _protocol.require_value_and_value_fn("conjugate_gradient", value, value_fn)
        g = updates
        products = state.grad_prev_products is not None

        def take_step(_):
            # From the params: optax.tree.set may have put a float in the state.
            dtype = _protocol.scalar_dtype(params)
            # P g, and the products in P's metric (CG on z, p = P^(1/2) z:
            # g_z = P^(1/2) g, d_z = P^(-1/2) d); P = I without a preconditioner.
            pre = state.preconditioner
            pg = g if pre is None else optax.tree.cast_like(optax.tree.mul(pre, g), g)
            steepest = optax.tree.scale(-1.0, pg)
            g_dot_g = _protocol.vdot(g, pg, dtype)
            restart = (state.count == 0) | (state.num_failures > 0)
            if products:
                # g . g_{k-1} is known through the gradient the last search
                # stored; a different gradient (another batch) restarts.
                prev = state.grad_prev_products
                stored = _stored_descent_gradient(state.linesearch_state)
                restart |= ~_same_gradient(g, stored, dtype)
                dir_over_pre = (
                    state.dir_prev
                    if pre is None
                    else optax.tree.div(state.dir_prev, pre)
                )
                dots = cg_directions.DotProducts(
                    grad_sq=g_dot_g,
                    grad_dot_prev=prev.dot_stored,
                    prev_sq=prev.sq_norm,
                    dir_dot_grad=_protocol.vdot(state.dir_prev, g, dtype),
                    dir_dot_prev=prev.dot_dir,
                    dir_sq=_protocol.vdot(state.dir_prev, dir_over_pre, dtype),
                )
                beta_k = jnp.asarray(beta_from_products(dots), dtype)
            elif pre is None:
                beta_k = jnp.asarray(beta_fn(g, state.grad_prev, state.dir_prev), dtype)
            else:
                root = jax.tree.map(jnp.sqrt, pre)
                beta_k = jnp.asarray(
                    beta_fn(
                        optax.tree.mul(root, g),
                        optax.tree.mul(root, state.grad_prev),
                        optax.tree.div(state.dir_prev, root),
                    ),
                    dtype,
                )
            conjugate = optax.tree.cast_like(
                optax.tree.add_scale(steepest, beta_k, state.dir_prev), g
            )
            restart |= ~jnp.isfinite(beta_k) | (
                _protocol.vdot(g, conjugate, dtype) >= 0
            )
            if powell_threshold is not None:
                g_dot_prev = (
                    dots.grad_dot_prev
                    if products
                    else _protocol.vdot(pg, state.grad_prev, dtype)
                )
                restart |= jnp.abs(g_dot_prev) >= powell_threshold * g_dot_g
            if restart_every is not None:
                restart |= state.count % restart_every == 0
            direction = optax.tree.where(restart, steepest, conjugate)
            step, linesearch_state = linesearch.update(
                direction,
                state.linesearch_state,
                params,
                value=value,
                grad=g if grad is None else grad,
                value_fn=value_fn,
                **extra_args,
            )
            failed = linesearch_failed(linesearch_state, step)
            new_state = ConjugateGradientState(
                count=state.count + 1,
                grad_prev=None if products else g,
                dir_prev=direction,
                grad_prev_products=(
                    PreviousGradientProducts(
                        sq_norm=g_dot_g,
                        dot_dir=_protocol.vdot(g, direction, dtype),
                        dot_stored=_protocol.vdot(
                            pg, _stored_descent_gradient(linesearch_state), dtype
                        ),
                    )
                    if products
                    else None
                ),
                linesearch_state=linesearch_state,
                num_failures=jnp.where(failed, state.num_failures + 1, 0),
                num_skipped=state.num_skipped,
                info=ConjugateGradientInfo(
                    beta=jnp.where(restart, 0.0, beta_k),
                    restarted=restart,
                ),
                preconditioner=state.preconditioner,
            )
            return step, optax.tree.cast_like(new_state, state)

        def skip(_):
            skipped = state._replace(num_skipped=state.num_skipped + 1)
            return optax.tree.zeros_like(g), skipped

        # A non-finite loss or gradient: as if the step had never happened.
        finite = _protocol.all_finite(value, g, grad)
        return jax.lax.cond(finite, take_step, skip, None)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
