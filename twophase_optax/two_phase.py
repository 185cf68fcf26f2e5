"""The two-phase combinator: Algorithm 1 of the paper as one optax transformation."""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from twophase_optax import _protocol
from twophase_optax import fitted as fitted_lib
from twophase_optax import loss_plateau
from twophase_optax import packed_scalars
from twophase_optax import swap_detection
from twophase_optax.conjugate_gradient import conjugate_gradient
from twophase_optax.conjugate_gradient import linesearch_failed
from twophase_optax.fitted import FittedState
from twophase_optax.packed_scalars import PackedScalars

FALLBACKS = (None, "first")
SWAP_RULES = (
    "peak",
    "plateau",
    "peak-then-plateau",
    "fit",
    "fit-or-plateau",
    "manual",
)
"""The values of :func:`twophase_optax.two_phase`'s ``swap_rule``."""
DEFAULT_SWAP_RULE = "fit-or-plateau"
"""The rule :func:`twophase_optax.two_phase` swaps on by default, chosen on the
digits sweep's cells (BENCHMARKS.md section 10)."""
# The branches of the step's lax.switch.
_FIRST, _SECOND, _SKIP, _FALL_BACK = 0, 1, 2, 3


class SharedBuffer:
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
        return f"SharedBuffer(second_state{jax.tree_util.keystr(self.path)})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SharedBuffer) and other.path == self.path

    def __hash__(self) -> int:
        return hash((SharedBuffer, self.path))


jax.tree_util.register_pytree_node(
    SharedBuffer, lambda s: ((), s.path), lambda path, _: SharedBuffer(path)
)


def _is_shared(node: Any) -> bool:
    return isinstance(node, SharedBuffer)


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
    by a :class:`SharedBuffer` that names the twin's path."""
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
        return node if match is None else SharedBuffer(free.pop(match)[0])

    return jax.tree.map(share, first_state, is_leaf=is_params_shaped)


def _strongly_typed(tree: Any) -> Any:
    """``tree`` with every weakly typed array leaf made strong, same dtype."""
    return jax.tree.map(
        lambda x: jnp.asarray(x, x.dtype) if getattr(x, "weak_type", False) else x,
        tree,
    )


def _shared_nodes(first_state: Any) -> list[SharedBuffer]:
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


_FIELDS = (
    "count",
    "in_second_phase",
    "swap_step",
    "num_skipped",
    "num_failures",
    "num_fallbacks",
    "detection",
    "plateau",
    "fitted",
    "second_state",
)
# optax.value_and_grad_from_state looks the stored value up by this name.
_UNPACKED_NAMES = ("value",)


class _TwoPhaseStateLayout(NamedTuple):
    fields: PackedScalars
    first_state: optax.OptState


class TwoPhaseState(_TwoPhaseStateLayout):
    """State of :func:`two_phase`.

    Build one with :meth:`TwoPhaseState.create`; ``state._replace(count=...)``
    takes the same names. Every scalar of the state except ``first_state``'s
    is stored in ``fields``, one array per dtype (a
    :class:`twophase_optax.packed_scalars.PackedScalars`), but for a line
    search's stored ``value``, which ``optax.value_and_grad_from_state`` looks
    up by name. A jitted step then passes one small array per dtype (three
    for Adam and CG) for some forty scalars, each of which would cost the
    call a few microseconds; the params-sized trees keep their places. The
    attributes below read the fields back, as new trees: change
    ``second_state`` with ``_replace``, not in place. ``first_state`` is
    stored as it is, so that
    ``state.first_state.hyperparams["learning_rate"] = ...`` works as with
    ``optax.inject_hyperparams`` alone. To find the line search's state, use
    :func:`twophase_optax.find_linesearch_state`, which reads through the
    packing.

    Attributes:
      count: the number of updates made so far; the next update is step
        ``count`` (int32).
      in_second_phase: the phase flag, ``False`` while ``first`` runs (the
        paper's ``adam``, negated). The swap is one-way.
      swap_step: the first step that ran ``second``, -1 until the swap and
        again after a fallback to ``first`` (int32).
      num_skipped: steps skipped because the loss or the gradient was not
        finite (int32). A skipped step changes nothing else, ``count``
        included.
      num_failures: second-phase steps in a row whose line search failed
        (see :func:`twophase_optax.linesearch_failed`), 0 after a success
        (int32).
      num_fallbacks: how often the second phase handed back to the first
        (``fallback="first"``; int32).
      detection: the gradient-norm readings, the running maximum ``gn_max``,
        the window accumulators and the step at which the peak criterion first
        held; a :class:`twophase_optax.swap_detection.GradientNormPeakState`.
      plateau: the window means of the loss values, their best and the
        windows since it improved; a
        :class:`twophase_optax.loss_plateau.LossPlateauState` (scalars).
      fitted: the misclassified examples per window (from ``num_errors``)
        and the fitted windows in a row; a
        :class:`twophase_optax.fitted.FittedState` (scalars).
      first_state: the state of ``first``, except that its params-sized
        leaves that have a twin in ``second``'s state (same shape and dtype:
        Adam's moments and CG's direction and stored gradient) are
        :class:`SharedBuffer` placeholders, their values kept in
        ``second_state``: :meth:`first_phase_state` gives the whole state.
        Frozen after the swap, when the shared buffers belong to ``second``.
      second_state: the state of ``second``. Before the swap its shared leaves
        hold ``first``'s, and the rest is untouched; the second phase starts
        from ``second.init(params)`` (for CG a steepest-descent step).
    """

    __slots__ = ()

    @classmethod
    def create(
        cls,
        *,
        count: jax.Array,
        in_second_phase: jax.Array,
        swap_step: jax.Array,
        num_skipped: jax.Array,
        num_failures: jax.Array,
        num_fallbacks: jax.Array,
        detection: swap_detection.GradientNormPeakState,
        plateau: loss_plateau.LossPlateauState,
        fitted: FittedState,
        first_state: optax.OptState,
        second_state: optax.OptState,
    ) -> TwoPhaseState:
        """The state with these fields, the scalars packed."""
        fields = packed_scalars.pack(
            dict(
                count=count,
                in_second_phase=in_second_phase,
                swap_step=swap_step,
                num_skipped=num_skipped,
                num_failures=num_failures,
                num_fallbacks=num_fallbacks,
                detection=detection,
                plateau=plateau,
                fitted=fitted,
                second_state=second_state,
            ),
            keep=_UNPACKED_NAMES,
        )
        return cls(fields, first_state)

    def _replace(self, **changes: Any) -> TwoPhaseState:
        """The state with the named fields (packed ones included) changed."""
        fields = {**self.fields.unpack(), "first_state": self.first_state}
        unknown = set(changes) - set(fields)
        if unknown:
            raise ValueError(f"TwoPhaseState has no fields {sorted(unknown)}.")
        return TwoPhaseState.create(**{**fields, **changes})

    def first_phase_state(self) -> optax.OptState:
        """The state of ``first`` with its shared leaves put back.

        Before the swap this is exactly the state ``first`` would have on its
        own; after it, the shared leaves hold the second phase's values.
        """
        return _unshare(self.first_state, self.second_state)


def _packed_field(name: str) -> property:
    return property(lambda self: self.fields.get(name))


for _name in _FIELDS:
    setattr(TwoPhaseState, _name, _packed_field(_name))


def two_phase(
    first: optax.GradientTransformation | None = None,
    second: optax.GradientTransformation | None = None,
    *,
    gn_factor: float = swap_detection.DEFAULT_GN_FACTOR,
    window: int = 1,
    statistic: str = "mean_grad",
    min_windows: int = 1,
    smoothing: float = swap_detection.DEFAULT_SMOOTHING,
    patience: int = swap_detection.DEFAULT_PATIENCE,
    min_rise: float = swap_detection.DEFAULT_MIN_RISE,
    swap_rule: str = DEFAULT_SWAP_RULE,
    plateau_rtol: float = loss_plateau.DEFAULT_RTOL,
    plateau_patience: int = loss_plateau.DEFAULT_PATIENCE,
    plateau_smoothing: float = loss_plateau.DEFAULT_SMOOTHING,
    fit_errors: int = fitted_lib.DEFAULT_FIT_ERRORS,
    fit_patience: int = fitted_lib.DEFAULT_FIT_PATIENCE,
    swap_at: int | None = None,
    fallback: str | None = None,
    max_failures: int = 3,
) -> optax.GradientTransformationExtraArgs:
    r"""Runs ``first`` until the gradient norm has peaked, then ``second``.

    The convexity-dependent two-phase method (Algorithm 1 of Hrycej et al.):
    Adam while the loss is non-convex, nonlinear CG once the gradient norm,
    read once per ``window`` steps, has fallen from its running maximum,

    .. math::
      \text{swap at the first reading } g_n \le \text{gn\_factor} \cdot
      \max_{m \le n} g_m \quad (\text{and } n \ge \text{min\_windows}).

    That is the rule as printed (``**swap_detection.PAPER_RULE``). By default
    the test reads an exponential moving average of the readings
    (``smoothing``), needs ``patience`` readings in a row below the threshold,
    and counts no fall before the maximum has risen ``min_rise``-fold over the
    first reading: single readings under mini-batch noise jitter by 10% and
    more, and the raw rule fires on the first dip (see
    :mod:`twophase_optax.swap_detection`).

    A reading completes with the last gradient of its window. That step's
    update still comes from ``first``; ``second`` runs from the next step on,
    as in Algorithm 1, where the epoch whose reading triggers the swap was an
    Adam epoch. With ``swap_at=N`` steps ``0 .. N-1`` run ``first`` and
    ``second`` runs from step ``N``, the fixed split of the paper's
    experiments; detection is then only recorded.

    Each step a jitted ``lax.switch`` runs exactly one of the two. The swap
    is one-way unless the second phase gets stuck (see ``fallback``), and
    ``second`` starts from the parameters ``first`` left with a fresh state
    (for CG: a steepest-descent step).

    Since neither phase reads the other's state, they share its params-sized
    buffers: Adam's two moments before the swap and CG's direction and stored
    gradient after it are the same two trees (see :class:`SharedBuffer`). The
    default state is twice the params plus scalars, as for ``optax.adam``,
    and the first phase's branch copies nothing params-sized. Trees without
    a twin of the same shapes and dtypes (a CG ``beta`` function, which needs
    the previous gradient, or Adam with ``mu_dtype``) are kept apart and
    passed through by the branch that does not use them.

    A step whose loss ``value`` or gradient holds a NaN or an infinity (or a
    gradient whose sum of squares overflows) is skipped, in either phase, the
    way ``optax.apply_if_finite`` skips: the update is zero and the state
    stays as it was (moments, readings, CG direction, ``count``) except for
    ``num_skipped``, so every later update equals that of a run that never
    saw the step.

    Args:
      first: the optimiser of the non-convex phase; default ``optax.adam(1e-3)``.
      second: the optimiser of the convex phase; default
        :func:`twophase_optax.conjugate_gradient`.
      gn_factor: swap once the (smoothed) reading is at most this fraction of
        its maximum; the paper's ``gnfact`` is 0.9, for raw readings.
      window: steps per gradient-norm reading; the paper reads once per epoch,
        so set it to the number of steps in an epoch.
      statistic: ``"mean_grad"`` (norm of the window's mean gradient, one
        params-sized accumulator when ``window > 1``) or ``"mean_norm"`` (mean
        of the per-step norms, scalar state); the two coincide for
        ``window=1``. See :mod:`twophase_optax.swap_detection`.
      min_windows: no swap before this many readings exist.
      smoothing: weight of the newest reading in the exponential moving
        average that is tested, in (0, 1]; 1 tests the raw reading.
      patience: smoothed readings in a row at or below ``gn_factor`` times
        the maximum before the swap; 1 swaps on the first.
      min_rise: no reading counts as a fall until the maximum is at least
        this multiple of the first reading (>= 1; 1 counts every fall).
      swap_rule: what decides the swap. ``"peak"``: the gradient-norm peak
        above (``gn_factor``, ``smoothing``, ``patience``, ``min_rise``).
        ``"plateau"``: the loss ``value``\ s, averaged per window and smoothed,
        have not fallen by ``plateau_rtol`` for ``plateau_patience`` windows
        (:mod:`twophase_optax.loss_plateau`). ``"peak-then-plateau"``: the
        plateau, counted once the peak has fired. ``"fit"``: ``fit_patience``
        windows in a row with at most ``fit_errors`` misclassified examples,
        counted from ``update(..., num_errors=k)`` (:mod:`twophase_optax.fitted`).
        ``"fit-or-plateau"`` (the default): whichever of the two comes first,
        the plateau alone where ``num_errors`` is not passed.
        ``"manual"``: only ``swap_at`` or :func:`start_second_phase`. The
        readings and the plateau are recorded in the state whatever the rule.
      plateau_rtol: the relative fall of the smoothed window mean that counts
        as progress, in [0, 1).
      plateau_patience: windows in a row without progress before the swap.
      plateau_smoothing: weight of the newest window mean in the moving
        average, in (0, 1]; 1 reads the raw window means.
      fit_errors: the fit rules: the most misclassified examples in a window
        that count as fitted.
      fit_patience: the fit rules: fitted windows in a row before the swap.
      swap_at: if set, swap at this step regardless of ``swap_rule``.
      fallback: what to do when the second phase is stuck, that is after
        ``max_failures`` steps in a row whose line search failed (each failure
        already restarts CG with steepest descent). ``None`` (the default)
        stays in the second phase, as Algorithm 1 does. ``"first"`` returns to
        ``first`` with a fresh state (new moments) and re-armed detection; the
        next swap is then the detector's, also with ``swap_at``. Measured
        (``experiments/benchmarks/fallback.py``): where CG stalls away from a
        minimum (bfloat16 params, a loss without a minimum) falling back
        reaches far lower losses at half the compute; but at a minimum that
        CG has resolved to float precision its searches fail too, and each
        fallback's first Adam step throws the params off it by about the
        learning rate before the next swap finds it again.
      max_failures: failed line searches in a row that count as stuck; 3
        tolerates a single unlucky mini-batch at the cost of two more searches
        in a deterministic run.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` called as
      ``update(grads, state, params, value=loss, value_fn=loss_fn,
      **loss_fn_kwargs)``. ``value`` and ``value_fn`` are always required, also
      before the swap: both branches are compiled into the same program.
      ``grad`` may be given; the readings then use it instead of the incoming
      updates (so that clipping in front of ``two_phase`` does not cap them),
      and the second phase hands it to its line search. ``first`` receives all
      keyword arguments if it accepts extra arguments.

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
      >>> opt = tpo.two_phase(optax.adam(0.1), swap_at=10)
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
    swap_detection.check_detection_hyperparameters(
        gn_factor, window, statistic, min_windows, smoothing, patience, min_rise
    )
    if swap_rule not in SWAP_RULES:
        raise ValueError(f"swap_rule must be one of {SWAP_RULES}, got {swap_rule!r}.")
    loss_plateau.check_hyperparameters(
        plateau_rtol, plateau_patience, plateau_smoothing
    )
    fitted_lib.check_hyperparameters(fit_errors, fit_patience)
    if swap_at is not None and not (isinstance(swap_at, int) and swap_at >= 0):
        raise ValueError(f"swap_at must be None or an integer >= 0, got {swap_at!r}.")
    if fallback not in FALLBACKS:
        raise ValueError(f"fallback must be one of {FALLBACKS}, got {fallback!r}.")
    if not (isinstance(max_failures, int) and max_failures >= 1):
        raise ValueError(f"max_failures must be an integer >= 1, got {max_failures!r}.")
    first_takes_extra_args = isinstance(first, optax.GradientTransformationExtraArgs)

    def init_fn(params: optax.Params) -> TwoPhaseState:
        # Strong dtypes throughout: a weakly typed leaf in an init state (as
        # optax.lbfgs's scalars are) would come back strong from the first
        # update and make the second call compile again.
        return _strongly_typed(
            TwoPhaseState.create(
                count=jnp.asarray(0, jnp.int32),
                in_second_phase=jnp.asarray(swap_at == 0),
                swap_step=jnp.asarray(0 if swap_at == 0 else -1, jnp.int32),
                num_skipped=jnp.asarray(0, jnp.int32),
                num_failures=jnp.asarray(0, jnp.int32),
                num_fallbacks=jnp.asarray(0, jnp.int32),
                detection=swap_detection.init(params, statistic, window),
                plateau=loss_plateau.init(params),
                fitted=fitted_lib.init(),
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
        # Read the packed fields back once; every use below reads these.
        packed_state = state
        state = types.SimpleNamespace(
            **packed_state.fields.unpack(), first_state=packed_state.first_state
        )
        # The fit rules' count is two_phase's own: value_fn never sees it.
        num_errors = extra_args.pop("num_errors", None)
        if swap_rule == "fit" and num_errors is None:
            raise ValueError(
                "two_phase(swap_rule='fit') reads how many examples of the batch "
                "the step's forward pass got wrong: call update(grads, state, "
                "params, value=loss, value_fn=loss_fn, num_errors=k)."
            )
        kwargs = dict(value=value, value_fn=value_fn, **extra_args)
        if grad is not None:
            kwargs["grad"] = grad

        def first_update(first_state):
            if first_takes_extra_args:
                return first.update(updates, first_state, params, **kwargs)
            return first.update(updates, first_state, params)

        no_failure = jnp.asarray(False)

        def run_first(_):
            # Reads and writes the shared buffers in place of first's leaves;
            # second's other leaves are scalars (for Adam and CG), so nothing
            # params-sized passes through unchanged.
            first_state = _unshare(state.first_state, state.second_state)
            new_updates, first_state = first_update(first_state)
            first_state, second_state = _reshare(
                first_state, state.first_state, state.second_state, params
            )
            return new_updates, first_state, second_state, no_failure

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
            new_updates, second_state = second.update(
                updates, second_state, params, **kwargs
            )
            linesearch = _protocol.find_linesearch_state(second_state)
            failed = linesearch_failed(linesearch, new_updates)
            return new_updates, state.first_state, second_state, failed

        def skip(_):
            zero = optax.tree.zeros_like(updates)
            return zero, state.first_state, state.second_state, no_failure

        def fall_back(_):
            new_updates, first_state = first_update(first.init(params))
            fresh = _combine(first_state, second.init(params), params)
            return new_updates, fresh["first_state"], fresh["second_state"], no_failure

        # One read of the gradient gives both its norm, for the readings, and
        # whether it is finite (a square sum that overflows counts as not).
        readings_grad = updates if grad is None else grad
        dtype = state.detection.gn_max.dtype
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
        # One conditional runs the phase, falls back, or skips a step whose
        # loss or gradient is not finite, as if it had never happened.
        branch = jnp.select(
            [~finite, fall_back_now, in_second_phase],
            [_SKIP, _FALL_BACK, _SECOND],
            _FIRST,
        )
        # Without a fallback its branch is never taken: not compiled at all.
        branches = (run_first, run_second, skip)
        if fallback == "first":
            branches += (fall_back,)
        new_updates, first_state, second_state, failed = jax.lax.switch(
            branch, branches, None
        )
        num_failures = jnp.where(
            finite, jnp.where(failed, state.num_failures + 1, 0), state.num_failures
        )

        detection = optax.tree.where(
            fall_back_now,
            swap_detection.init(params, statistic, window),
            state.detection,
        )
        detection, detected = swap_detection.update(
            detection,
            readings_grad,
            state.count,
            gn_factor=gn_factor,
            window=window,
            statistic=statistic,
            min_windows=min_windows,
            smoothing=smoothing,
            patience=patience,
            min_rise=min_rise,
            armed=~in_second_phase,
            grad_norm=jnp.sqrt(grad_sq_norm),
        )
        detection = optax.tree.where(finite, detection, state.detection)
        plateau = optax.tree.where(
            fall_back_now, loss_plateau.init(params), state.plateau
        )
        plateau, flat = loss_plateau.update(
            plateau,
            value,
            state.count,
            window=window,
            rtol=plateau_rtol,
            patience=plateau_patience,
            smoothing=plateau_smoothing,
        )
        plateau = optax.tree.where(finite, plateau, state.plateau)
        flat &= plateau.num_windows >= min_windows
        fitted_state, fit = state.fitted, jnp.asarray(False)
        if num_errors is not None:
            fitted_state = optax.tree.where(
                fall_back_now, fitted_lib.init(), fitted_state
            )
            fitted_state, fit = fitted_lib.update(
                fitted_state,
                num_errors,
                state.count,
                window=window,
                fit_errors=fit_errors,
                fit_patience=fit_patience,
            )
            fitted_state = optax.tree.where(finite, fitted_state, state.fitted)
        if swap_rule == "peak":
            ruled = detected
        elif swap_rule == "plateau":
            ruled = flat
        elif swap_rule == "peak-then-plateau":
            ruled = flat & (detection.detect_step >= 0)
        elif swap_rule == "fit":
            ruled = fit
        elif swap_rule == "fit-or-plateau":
            ruled = fit | flat
        else:  # "manual": start_second_phase, or swap_at.
            ruled = jnp.asarray(False)
        num_fallbacks = state.num_fallbacks + fall_back_now.astype(jnp.int32)
        if swap_at is None:
            swap_now = ruled
        else:  # The fixed split; after a fallback the detector decides.
            swap_now = jnp.where(num_fallbacks > 0, ruled, state.count + 1 == swap_at)
        swap_now &= finite & ~in_second_phase
        swap_step = jnp.where(fall_back_now, -1, state.swap_step)
        new_state = TwoPhaseState.create(
            count=state.count + finite.astype(jnp.int32),
            in_second_phase=in_second_phase | swap_now,
            swap_step=jnp.where(swap_now, state.count + 1, swap_step),
            num_skipped=state.num_skipped + (~finite).astype(jnp.int32),
            num_failures=num_failures,
            num_fallbacks=num_fallbacks,
            detection=detection,
            plateau=plateau,
            fitted=fitted_state,
            first_state=first_state,
            second_state=second_state,
        )
        return new_updates, optax.tree.cast_like(new_state, packed_state)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def start_second_phase(state: TwoPhaseState) -> TwoPhaseState:
    """``state`` with the swap made now: the next update runs ``second``.

    The way to swap on a criterion that :func:`two_phase` cannot evaluate
    inside ``update``: the training set fitted, say, or a payoff probe that
    runs a few CG steps on the full batch. Jittable; a state already in the
    second phase is returned as it is. The second phase starts, as after any
    swap, from ``second.init(params)`` at the current parameters.

    Example:
      >>> import jax
      >>> import jax.numpy as jnp
      >>> import optax
      >>> import twophase_optax as tpo
      >>> f = lambda w: jnp.sum((w - 1.0) ** 2)
      >>> opt = tpo.two_phase(optax.adam(0.1), swap_rule="manual")
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
    )
