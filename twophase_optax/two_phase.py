"""The two-phase combinator: Algorithm 1 of the paper as one optax transformation."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from twophase_optax import _protocol
from twophase_optax import swap as swap_lib
from twophase_optax.conjugate_gradient import ConjugateGradientState
from twophase_optax.conjugate_gradient import conjugate_gradient
from twophase_optax.conjugate_gradient import linesearch_failed
from twophase_optax.swap import SwapRule

FALLBACKS = (None, "first")
# The branches of the step's lax.switch.
_FIRST, _SECOND, _SKIP, _CONVERGED, _FALL_BACK = 0, 1, 2, 3, 4
_ADAM_EPS = 1e-8  # optax.adam's: the preconditioner's floor on sqrt(nu)


class _SharedBuffer:
    """Where a params-shaped part of the first phase's state lives in the second's.

    The two phases never run at once, and each starts from a fresh state: the
    second from ``second.init(params)`` at the swap, the first from
    ``first.init(params)`` after a fallback. So a params-shaped tree of
    ``first``'s state (an Adam moment) and one of ``second``'s with the same
    shapes and dtypes (a CG direction) can share their buffers. In
    :class:`TwoPhaseState` the buffers sit in ``second_state``, and
    ``first_state`` holds this placeholder, a pytree node without leaves that
    records which of ``second_state``'s params-shaped trees holds them.
    :meth:`TwoPhaseState.first_phase_state` puts them back.
    """

    __slots__ = ("path",)

    def __init__(self, path: tuple):
        self.path = path

    def __repr__(self) -> str:
        return f"_SharedBuffer(second_state{jax.tree_util.keystr(self.path)})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _SharedBuffer) and other.path == self.path

    def __hash__(self) -> int:
        return hash((_SharedBuffer, self.path))


jax.tree_util.register_pytree_node(
    _SharedBuffer, lambda s: ((), s.path), lambda path, _: _SharedBuffer(path)
)


def _is_shared(node: Any) -> bool:
    return isinstance(node, _SharedBuffer)


def _has_structure(treedef: Any) -> Callable[[Any], bool]:
    return lambda node: jax.tree.structure(node) == treedef


def _signature(node: Any) -> list[tuple]:
    return [(jnp.shape(x), jnp.result_type(x)) for x in jax.tree.leaves(node)]


def _worth_sharing(node: Any) -> bool:
    # Not scalars; a tree without leaves is optax.tree_map_params's placeholder
    # for the params, which must be laid out as the params would be.
    leaves = jax.tree.leaves(node)
    return not leaves or any(jnp.ndim(x) for x in leaves)


def _get(tree: Any, path: tuple) -> Any:
    for key in path:
        if isinstance(key, jax.tree_util.GetAttrKey):
            tree = getattr(tree, key.name)
        elif isinstance(key, jax.tree_util.DictKey):
            tree = tree[key.key]
        else:
            tree = tree[key.idx]
    return tree


def _set(tree: Any, path: tuple, value: Any) -> Any:
    if not path:
        return value
    key, rest = path[0], path[1:]
    if isinstance(key, jax.tree_util.GetAttrKey):
        new = _set(getattr(tree, key.name), rest, value)
        return tree._replace(**{key.name: new})
    if isinstance(key, jax.tree_util.DictKey):
        return {**tree, key.key: _set(tree[key.key], rest, value)}
    items = list(tree)
    items[key.idx] = _set(items[key.idx], rest, value)
    return type(tree)(items)


def _navigable(path: tuple) -> bool:
    keys = (jax.tree_util.GetAttrKey, jax.tree_util.DictKey, jax.tree_util.SequenceKey)
    return all(isinstance(key, keys) for key in path)


def _share(first_state: Any, second_state: Any, params: Any) -> Any:
    """``first_state`` with each params-shaped tree that has a twin in
    ``second_state`` (same shapes and dtypes, each twin used once) replaced
    by a :class:`_SharedBuffer` that names the twin's path."""
    is_params_shaped = _has_structure(jax.tree.structure(params))
    second_nodes, _ = jax.tree_util.tree_flatten_with_path(
        second_state, is_leaf=is_params_shaped
    )
    free = [
        (path, _signature(node))
        for path, node in second_nodes
        if is_params_shaped(node) and _worth_sharing(node) and _navigable(path)
    ]

    def share(node):
        if not is_params_shaped(node):
            return node
        match = next(
            (m for m, (_, sig) in enumerate(free) if sig == _signature(node)), None
        )
        return node if match is None else _SharedBuffer(free.pop(match)[0])

    return jax.tree.map(share, first_state, is_leaf=is_params_shaped)


def _strongly_typed(tree: Any) -> Any:
    """``tree`` with every weakly typed array leaf made strong, same dtype."""
    return jax.tree.map(
        lambda x: jnp.asarray(x, x.dtype) if getattr(x, "weak_type", False) else x,
        tree,
    )


def _shared_nodes(first_state: Any) -> list[_SharedBuffer]:
    marks = jax.tree.leaves(first_state, is_leaf=_is_shared)
    return [m for m in marks if _is_shared(m)]


def _unshare(first_state: Any, second_state: Any) -> Any:
    """The whole first state: placeholders filled from ``second_state``."""
    return jax.tree.map(
        lambda x: _get(second_state, x.path) if _is_shared(x) else x,
        first_state,
        is_leaf=_is_shared,
    )


def _reshare(
    new_first_state: Any, first_state: Any, second_state: Any, params: Any
) -> tuple[Any, Any]:
    """Stores ``new_first_state``'s shared trees in ``second_state``'s buffers.

    Returns the first state with placeholders and the second state whose
    shared trees now hold them; ``first_state`` gives the layout.
    """
    is_params_shaped = _has_structure(jax.tree.structure(params))
    marks, layout = jax.tree.flatten(
        first_state, is_leaf=lambda x: _is_shared(x) or is_params_shaped(x)
    )
    new_nodes = jax.tree.leaves(new_first_state, is_leaf=is_params_shaped)
    kept = []
    for mark, node in zip(marks, new_nodes, strict=True):
        if _is_shared(mark):
            second_state = _set(second_state, mark.path, node)
        kept.append(mark if _is_shared(mark) else node)
    return layout.unflatten(kept), second_state


def _combine(first_state: Any, second_state: Any, params: Any) -> dict[str, Any]:
    """Both states laid out to share buffers, ``first``'s values in them."""
    first_state, second_state = _reshare(
        first_state, _share(first_state, second_state, params), second_state, params
    )
    return dict(first_state=first_state, second_state=second_state)


class TwoPhaseState(NamedTuple):
    """State of :func:`two_phase`, an ordinary NamedTuple.

    ``optax.tree.get(state, name)`` finds its fields and those of the swap
    rule's state (``"in_second_phase"``, ``"swap_step"``, ``"gn_max"``,
    ``"plateau_step"``, ...), and key paths name them. Lookups of
    ``first``'s fields by name (``"mu"``, say) find placeholders where a
    buffer is shared with the second phase: :meth:`first_phase_state` gives
    the first phase's whole state.

    Attributes:
      count: the number of updates made so far; the next update is step
        ``count`` (int32).
      in_second_phase: the phase flag, ``False`` while ``first`` runs (the
        paper's ``adam``, negated).
      swap_step: the first step that ran ``second``, -1 until the swap and
        again after a fallback to ``first`` (int32).
      swap_reason: what made the swap, as a code of
        :data:`twophase_optax.swap.SWAP_REASONS` (``"plateau"``, ...; 0
        until the swap and after a fallback; int32).
      num_skipped: steps skipped because the loss or the gradient was not
        finite (int32). A skipped step changes nothing else.
      num_failures: second-phase steps in a row whose line search failed
        (see :func:`twophase_optax.linesearch_failed`), 0 after a success
        (int32).
      num_fallbacks: how often the second phase handed back to the first
        (int32).
      num_evaluations: the second phase's line searches' loss evaluations so
        far, those with a gradient included (int32).
      num_gradients: of these, the evaluations that also computed a gradient
        (int32): a loop can count the second phase's compute from the state.
      swap: the swap rule's state (see :mod:`twophase_optax.swap`).
      first_state: the state of ``first``, except that its params-sized
        leaves that have a twin in ``second``'s state (same shape and dtype:
        Adam's moments and CG's direction and stored gradient) are
        placeholders, their values kept in ``second_state``. Frozen after
        the swap, when the shared buffers belong to ``second``.
      second_state: the state of ``second``. Before the swap its shared leaves
        hold ``first``'s, and the rest is untouched; the second phase starts
        from ``second.init(params)`` (for CG a steepest-descent step).
    """

    count: jax.Array
    in_second_phase: jax.Array
    swap_step: jax.Array
    swap_reason: jax.Array
    num_skipped: jax.Array
    num_failures: jax.Array
    num_fallbacks: jax.Array
    num_evaluations: jax.Array
    num_gradients: jax.Array
    swap: Any
    first_state: optax.OptState
    second_state: optax.OptState

    def first_phase_state(self) -> optax.OptState:
        """The state of ``first`` with its shared leaves put back.

        Before the swap this is exactly the state ``first`` would have on its
        own; after it, the shared leaves hold the second phase's values.
        """
        return _unshare(self.first_state, self.second_state)


def _is_cg_state(node: Any) -> bool:
    return isinstance(node, ConjugateGradientState)


def _with_adam_preconditioner(
    second_state: Any, state: TwoPhaseState, starting: jax.Array
) -> Any:
    r"""``second_state`` whose CG preconditioner (``precondition=True``) is set,
    on the second phase's first step, from the first phase's Adam second
    moment: :math:`P = 1/(\sqrt{\nu} + 10^{-8})`. Unchanged where CG keeps
    no preconditioner or the first phase has no ``nu``."""
    cg = _protocol.find_node(second_state, _is_cg_state)
    if cg is None or cg.preconditioner is None:
        return second_state
    first = _unshare(state.first_state, state.second_state)
    adam = _protocol.find_node(
        first, lambda n: hasattr(n, "nu") and hasattr(n, "mu") and hasattr(n, "count")
    )
    if adam is None or jax.tree.structure(adam.nu) != jax.tree.structure(
        cg.preconditioner
    ):
        return second_state
    moment = jax.tree.map(
        lambda v, p: (1.0 / (jnp.sqrt(jnp.abs(v)) + _ADAM_EPS)).astype(p.dtype),
        adam.nu,
        cg.preconditioner,
    )
    preconditioner = optax.tree.where(starting, moment, cg.preconditioner)
    return jax.tree.map(
        lambda n: n._replace(preconditioner=preconditioner) if _is_cg_state(n) else n,
        second_state,
        is_leaf=_is_cg_state,
    )


def _check_num_errors(num_errors: Any) -> jax.Array:
    shape = jnp.shape(num_errors)
    dtype = jnp.result_type(num_errors)
    if shape != () or not jnp.issubdtype(dtype, jnp.integer):
        raise ValueError(
            "two_phase: num_errors must be an integer scalar, the number of "
            "examples of the batch that the step's forward pass got wrong, "
            "e.g. jnp.sum(jnp.argmax(logits, -1) != labels); got "
            f"{jnp.dtype(dtype).name}{list(shape)}."
        )
    return jnp.asarray(num_errors)


def two_phase(
    first: optax.GradientTransformation | None = None,
    second: optax.GradientTransformation | None = None,
    *,
    swap: SwapRule | None = None,
    fallback: str | None = None,
    max_failures: int = 3,
) -> optax.GradientTransformationExtraArgs:
    r"""Runs ``first`` until the swap rule holds, then ``second``.

    The convexity-dependent two-phase method (Algorithm 1 of Hrycej et al.):
    Adam while the loss is non-convex, nonlinear CG near a minimum, where it
    converges far faster. ``swap`` decides the moment. The rule to start from,
    :func:`twophase_optax.swap.default`, reads the first phase once per epoch
    of ``W`` steps and swaps at the first epoch :math:`n` at which

    .. math::
      \#\{\text{fitted epochs in a row}\} \ge 10
      \quad\text{or}\quad
      \#\{\text{epochs in a row with } s_m \ge 0.9\, s_{best}\} \ge 5,

    where an epoch is fitted when its steps got every training example right
    (``num_errors``) and :math:`s_m` is a moving average of the epoch's mean
    loss. The paper's rule, the gradient norm's fall from its peak, is
    ``tpo.swap.per_window(tpo.swap.PAPER, steps=W)``; see
    :mod:`twophase_optax.swap` for the others and how to combine them.

    A reading completes with the last step of its window. That step's
    update still comes from ``first``; ``second`` runs from the next step on,
    as in Algorithm 1, where the epoch whose reading triggers the swap was an
    Adam epoch. Each step a jitted ``lax.switch`` runs exactly one of the two
    phases. The swap is one-way unless the second phase gets stuck (see
    ``fallback``), and ``second`` starts from the parameters ``first`` left,
    with a fresh state (for CG: a steepest-descent step).

    Neither phase reads the other's state, so they share its params-sized
    buffers (Adam's moments, CG's direction and stored gradient): the default
    state is twice the params plus scalars, as for ``optax.adam``.

    A step whose loss ``value`` or gradient holds a NaN or an infinity (or a
    gradient whose sum of squares overflows) is skipped, in either phase, the
    way ``optax.apply_if_finite`` skips: the update is zero and the state
    stays as it was except for ``num_skipped``.

    Two guards keep the second phase (any ``second``) from spending or
    diverging after it has converged. A second-phase step whose line search
    reports a value above the one it started from (or one that is not a
    number) is rejected: the update is zero, the step counts as a failed one
    (``num_failures``, which ``fallback`` reads), and the second phase starts
    afresh from the same params. A second-phase step whose gradient is
    exactly zero runs no line search: the update is zero and it costs no
    evaluation (``num_evaluations`` does not grow).

    Args:
      first: the optimiser of the non-convex phase; default ``optax.adam(1e-3)``.
      second: the optimiser of the convex phase; default
        :func:`twophase_optax.conjugate_gradient`.
      swap: the swap rule, a :class:`twophase_optax.swap.SwapRule`; required.
        ``tpo.swap.default(steps_per_epoch=W)`` for classifiers,
        ``tpo.swap.per_window(tpo.swap.plateau(), steps=W)`` for other
        losses, ``tpo.swap.at_step(n)`` for a fixed split,
        ``tpo.swap.manual()`` to swap only by :func:`start_second_phase`.
        Rules that read windows (peak, plateau, fitted) must sit under a
        :func:`twophase_optax.swap.per_window`.
      fallback: what to do when the second phase is stuck, that is after
        ``max_failures`` steps in a row whose line search failed (each failure
        already restarts CG with steepest descent). ``None`` (the default)
        stays in the second phase, as Algorithm 1 does. ``"first"`` returns to
        ``first`` with a fresh state (new moments) and a fresh swap rule
        state; the rule then decides the next swap as from the start
        (``at_step(n)``: ``n`` steps after the fallback; ``manual()``: the
        next :func:`start_second_phase`). When falling back pays and when it
        throws a converged run off its minimum: BENCHMARKS.md section 7.
      max_failures: failed line searches in a row that count as stuck (>= 1).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` called as
      ``update(grads, state, params, value=loss, value_fn=loss_fn,
      num_errors=k, **loss_fn_kwargs)``:

      * ``value`` and ``value_fn`` are always required, also before the swap:
        both branches are compiled into the same program.
      * ``num_errors``: an integer scalar, how many examples of the batch the
        step's forward pass got wrong; required where the rule reads it
        (:func:`twophase_optax.swap.fitted`, and so the default rule), never
        passed on to ``value_fn``.
      * ``grad`` may be given; the rule then reads it instead of the incoming
        updates (so that clipping in front of ``two_phase`` does not cap the
        readings), and the second phase hands it to its line search.
      * ``first`` receives all other keyword arguments if it accepts extra
        arguments.

      With the default ``second``, ``optax.value_and_grad_from_state(loss_fn)(
      params, state=state)`` computes the value and gradient in the first
      phase and hands over the ones the line search left in the second: use
      it where the second phase runs on a fixed (full) batch.

    Example:
      >>> import jax
      >>> import jax.numpy as jnp
      >>> import optax
      >>> import twophase_optax as tpo
      >>> f = lambda w: jnp.sum(jnp.log(jnp.cosh(w - 2.0)))  # convex near w = 2
      >>> opt = tpo.two_phase(optax.adam(0.1), swap=tpo.swap.at_step(10))
      >>> w = jnp.array([-3.0, 6.0])
      >>> state = opt.init(w)
      >>> for _ in range(30):
      ...     value, grad = jax.value_and_grad(f)(w)
      ...     updates, state = opt.update(grad, state, w, value=value, value_fn=f)
      ...     w = optax.apply_updates(w, updates)
      >>> int(state.swap_step), [round(float(x), 3) for x in w]
      (10, [2.0, 2.0])

    References:
      Hrycej, Bermeitinger, Pavone, Wiegand, Handschuh, *A Convexity-dependent
      Two-Phase Training Algorithm for Deep Neural Networks*, KDIR 2025,
      arXiv:2510.25366.
    """
    first = optax.adam(1e-3) if first is None else first
    second = conjugate_gradient() if second is None else second
    for name, tx in (("first", first), ("second", second)):
        if not (hasattr(tx, "init") and hasattr(tx, "update")):
            raise ValueError(f"{name} must be an optax transformation, got {tx!r}.")
    if swap is None:
        raise ValueError(
            "two_phase needs a swap rule, read per epoch of the first phase: "
            "two_phase(first, second, swap=tpo.swap.default(steps_per_epoch=N)) "
            "(fit or plateau), or swap=tpo.swap.at_step(n), or swap=tpo.swap.manual()."
        )
    if not isinstance(swap, SwapRule):
        raise ValueError(
            "two_phase: swap must be a rule of tpo.swap, e.g. "
            f"swap=tpo.swap.default(steps_per_epoch=N); got {swap!r}."
        )
    if swap.needs_window:
        raise ValueError(
            f"two_phase: the swap rule ({swap.kind}) reads one reading per window "
            "of steps; say how many steps a window has: "
            "swap=tpo.swap.per_window(rule, steps=steps_per_epoch) "
            "(steps=1 reads every step)."
        )
    if fallback not in FALLBACKS:
        raise ValueError(f"fallback must be one of {FALLBACKS}, got {fallback!r}.")
    _protocol.check_hyperparameter(
        "two_phase: ", "max_failures", max_failures, *_protocol.COUNT
    )
    first_takes_extra_args = isinstance(first, optax.GradientTransformationExtraArgs)
    reads_errors = "num_errors" in swap.reads
    at_start = swap.starts_second
    at_step_reason = swap_lib.SWAP_REASONS.index("at_step")

    def init_fn(params: optax.Params) -> TwoPhaseState:
        # Strong dtypes throughout: a weakly typed leaf in an init state (as
        # optax.lbfgs's scalars are) would come back strong from the first
        # update and make the second call compile again.
        zero = jnp.asarray(0, jnp.int32)
        return _strongly_typed(
            TwoPhaseState(
                count=zero,
                in_second_phase=jnp.asarray(at_start),
                swap_step=jnp.asarray(0 if at_start else -1, jnp.int32),
                swap_reason=jnp.asarray(at_step_reason if at_start else 0, jnp.int32),
                num_skipped=zero,
                num_failures=zero,
                num_fallbacks=zero,
                num_evaluations=zero,
                num_gradients=zero,
                swap=swap.init(params),
                **_combine(first.init(params), second.init(params), params),
            )
        )

    def update_fn(
        updates: optax.Updates,
        state: TwoPhaseState,
        params: optax.Params | None = None,
        *,
        value: jax.typing.ArrayLike | None = None,
        grad: optax.Updates | None = None,
        value_fn: Callable[..., jax.typing.ArrayLike] | None = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, TwoPhaseState]:
        _protocol.require_value_and_value_fn("two_phase", value, value_fn)
        # The fit rule's count is two_phase's own: value_fn never sees it.
        num_errors = extra_args.pop("num_errors", None)
        if reads_errors and num_errors is None:
            raise ValueError(
                "two_phase: the swap rule counts misclassified examples "
                "(tpo.swap.fitted, part of tpo.swap.default); pass them: "
                "update(grads, state, params, value=loss, value_fn=loss_fn, "
                "num_errors=k). For a loss without classes use "
                "swap=tpo.swap.per_window(tpo.swap.plateau(), steps=N)."
            )
        if num_errors is not None:
            num_errors = _check_num_errors(num_errors)
        kwargs = dict(value=value, value_fn=value_fn, **extra_args)
        if grad is not None:
            kwargs["grad"] = grad

        def first_update(first_state):
            if first_takes_extra_args:
                return first.update(updates, first_state, params, **kwargs)
            return first.update(updates, first_state, params)

        no_failure = jnp.asarray(False)
        # What the second phase's line search evaluated this step (none in the
        # other branches), read before a rejected step's restart.
        no_search = (jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32))

        def run_first(_):
            # Reads and writes the shared buffers in place of first's leaves;
            # second's other leaves are scalars (for Adam and CG), so nothing
            # params-sized passes through unchanged.
            first_state = _unshare(state.first_state, state.second_state)
            new_updates, first_state = first_update(first_state)
            first_state, second_state = _reshare(
                first_state, state.first_state, state.second_state, params
            )
            return new_updates, first_state, second_state, no_failure, no_search

        def run_second(_):
            # The first step of a second phase starts from a fresh state: the
            # shared buffers still hold first's leaves.
            starting = state.count == state.swap_step
            second_state = state.second_state
            marks = _shared_nodes(state.first_state)
            if marks:
                fresh = second.init(params)
                for mark in marks:
                    stored = _get(second_state, mark.path)
                    start = optax.tree.where(starting, _get(fresh, mark.path), stored)
                    second_state = _set(second_state, mark.path, start)
            second_state = _with_adam_preconditioner(second_state, state, starting)
            new_updates, new_state = second.update(
                updates, second_state, params, **kwargs
            )
            linesearch = _protocol.find_linesearch_state(new_state)
            failed = linesearch_failed(linesearch, new_updates)
            spent = _protocol.linesearch_evaluations(linesearch)
            # A step to a higher loss than its start (or to one that is not a
            # number) is rejected: no update, a failure, and the second phase
            # starts afresh from these params (CG: steepest descent; L-BFGS:
            # an empty memory), since its state describes the rejected point.
            reached = getattr(linesearch, "value", None)
            if reached is None:
                return new_updates, state.first_state, new_state, failed, spent
            (reached,) = jax.tree.leaves(reached)  # unwraps wrapped leaves
            worse = ~(reached <= jnp.asarray(value, reached.dtype))
            # A conditional, not a select: the fresh state (for L-BFGS ten
            # params-sized pairs) is built only on a rejected step.
            new_updates, new_state = jax.lax.cond(
                worse,
                lambda: (
                    optax.tree.zeros_like(new_updates),
                    optax.tree.cast_like(second.init(params), new_state),
                ),
                lambda: (new_updates, new_state),
            )
            return new_updates, state.first_state, new_state, failed | worse, spent

        def skip(_):
            zero = optax.tree.zeros_like(updates)
            return zero, state.first_state, state.second_state, no_failure, no_search

        def converged(_):
            # A gradient of exactly zero: no direction to search along, so the
            # second phase spends nothing (no line search) until it changes.
            zero = optax.tree.zeros_like(updates)
            return zero, state.first_state, state.second_state, no_failure, no_search

        def fall_back(_):
            new_updates, first_state = first_update(first.init(params))
            fresh = _combine(first_state, second.init(params), params)
            first_state, second_state = fresh["first_state"], fresh["second_state"]
            return new_updates, first_state, second_state, no_failure, no_search

        # One read of the gradient gives both its norm, for the rule, and
        # whether it is finite (a square sum that overflows counts as not).
        readings_grad = updates if grad is None else grad
        dtype = _protocol.scalar_dtype(readings_grad if params is None else params)
        grad_sq_norm = _protocol.vdot(readings_grad, readings_grad, dtype)
        others = (value,) if readings_grad is updates else (value, updates)
        finite = jnp.isfinite(grad_sq_norm) & _protocol.all_finite(*others)
        # The second phase stuck after max_failures failed searches: this step
        # is the first of a fresh first phase.
        fall_back_now = (
            finite & state.in_second_phase & (state.num_failures >= max_failures)
            if fallback == "first"
            else jnp.asarray(False)
        )
        in_second_phase = state.in_second_phase & ~fall_back_now
        # A zero gradient spends nothing, past the second phase's first step
        # (which sets up its state in the shared buffers).
        converged_now = (grad_sq_norm == 0) & (state.count != state.swap_step)
        # One conditional runs the phase, falls back, or skips a step whose
        # loss or gradient is not finite, as if it had never happened.
        branch = jnp.select(
            [~finite, fall_back_now, in_second_phase & converged_now],
            [_SKIP, _FALL_BACK, _CONVERGED],
            jnp.where(in_second_phase, _SECOND, _FIRST),
        )
        # Without a fallback its branch is never taken: not compiled at all.
        branches = (run_first, run_second, skip, converged)
        if fallback == "first":
            branches += (fall_back,)
        new_updates, first_state, second_state, failed, spent = jax.lax.switch(
            branch, branches, None
        )
        num_failures = jnp.where(
            finite, jnp.where(failed, state.num_failures + 1, 0), state.num_failures
        )
        evaluations, gradients = spent

        grad_norm = jnp.sqrt(grad_sq_norm)
        reading = swap_lib.Reading(
            step=state.count,
            complete=jnp.asarray(True),
            value=jnp.asarray(value),
            grad_norm=grad_norm,
            mean_grad_norm=grad_norm,
            num_errors=num_errors,
            grad=readings_grad,
        )
        # A fallback starts the rule afresh (fall_back_now is False without one).
        fresh = swap.init(params) if fallback == "first" else state.swap
        swap_state = optax.tree.where(fall_back_now, fresh, state.swap)
        reason, swap_state = swap.update(reading, swap_state)
        swap_state = optax.tree.where(finite, swap_state, state.swap)
        swap_now = (reason > 0) & finite & ~in_second_phase
        swap_step = jnp.where(fall_back_now, -1, state.swap_step)
        swap_reason = jnp.where(fall_back_now, 0, state.swap_reason)
        new_state = TwoPhaseState(
            count=state.count + finite.astype(jnp.int32),
            in_second_phase=in_second_phase | swap_now,
            swap_step=jnp.where(swap_now, state.count + 1, swap_step),
            swap_reason=jnp.where(swap_now, reason, swap_reason),
            num_skipped=state.num_skipped + (~finite).astype(jnp.int32),
            num_failures=num_failures,
            num_fallbacks=state.num_fallbacks + fall_back_now.astype(jnp.int32),
            num_evaluations=state.num_evaluations + evaluations,
            num_gradients=state.num_gradients + gradients,
            swap=swap_state,
            first_state=first_state,
            second_state=second_state,
        )
        return new_updates, optax.tree.cast_like(new_state, state)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def start_second_phase(state: TwoPhaseState) -> TwoPhaseState:
    """``state`` with the swap made now: the next update runs ``second``.

    The way to swap on a criterion that :func:`two_phase` cannot evaluate
    inside ``update``: a payoff probe that runs a few CG steps on the full
    batch, say. Jittable; a state already in the second phase is returned as
    it is. The second phase starts, as after any swap, from
    ``second.init(params)`` at the current parameters, and ``swap_reason``
    reads ``"manual"``.

    Example:
      >>> import jax
      >>> import jax.numpy as jnp
      >>> import optax
      >>> import twophase_optax as tpo
      >>> f = lambda w: jnp.sum((w - 1.0) ** 2)
      >>> opt = tpo.two_phase(optax.adam(0.1), swap=tpo.swap.manual())
      >>> w = jnp.zeros(2)
      >>> state = opt.init(w)
      >>> for step in range(6):
      ...     if step == 3:  # whatever the caller decides
      ...         state = tpo.start_second_phase(state)
      ...     g = jax.grad(f)(w)
      ...     u, state = opt.update(g, state, w, value=f(w), value_fn=f)
      ...     w = optax.apply_updates(w, u)
      >>> int(state.swap_step), [round(float(x), 4) for x in w]
      (3, [1.0, 1.0])
    """
    starting = ~state.in_second_phase
    return state._replace(
        in_second_phase=jnp.asarray(True),
        swap_step=jnp.where(starting, state.count, state.swap_step).astype(jnp.int32),
        swap_reason=jnp.where(
            starting, swap_lib.MANUAL_REASON, state.swap_reason
        ).astype(jnp.int32),
    )
