r"""Where the swap is decided: swap rules as small composable objects.

A swap rule reads what :func:`twophase_optax.two_phase` sees at every step of
the first phase (the loss, the gradient's norm, and, for classifiers, how
many examples of the batch the step's forward pass got wrong) and says when
the second phase should start. Like an optax transformation, a rule is a
pair of pure functions, ``init(params) -> state`` and
``update(reading, state) -> (reason, state)``, closed over hyperparameters
that the factory has checked; ``reason`` is 0 while the rule does not hold
and the rule's code in :data:`SWAP_REASONS` when it does.

The base rules are :func:`peak` (the gradient-norm peak of Algorithm 1),
:func:`plateau` (the loss has stopped falling), :func:`fitted` (the training
examples are fitted), :func:`at_step` (a fixed split) and :func:`manual`
(only :func:`twophase_optax.start_second_phase`). The first three read one
*reading* per window of steps (the paper reads once per epoch). The window is
one explicit choice, :func:`per_window`, which sums the steps' values once for
every rule below it; a rule that needs a window and has none is an error in
:func:`twophase_optax.two_phase`, so that an epoch is never silently taken for
a step. Combinators keep the tuple of their children's states, as
``optax.chain`` does: :func:`any_of` (whichever holds first), :func:`after`
(a rule counted once a trigger has held) and :func:`within` (a rule counted
only on the first N readings).

:func:`default` (fit or plateau, per epoch, not in a budget's last fifth)
is the rule to start from;
:data:`PAPER` is Algorithm 1 as printed. :func:`replay` and :func:`holds`
run recorded readings (a metrics file's epochs) through a rule's own code.

Example:
  >>> import twophase_optax as tpo
  >>> rule = tpo.swap.per_window(
  ...     tpo.swap.any_of(tpo.swap.fitted(), tpo.swap.plateau()), steps=23)
  >>> sorted(rule.reads), rule.window
  (['num_errors', 'value'], 23)
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from collections.abc import Sequence
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from twophase_optax import _protocol

SWAP_REASONS = ("none", "peak", "plateau", "fitted", "at_step", "manual")
"""What made a run swap, by the code a rule's ``update`` returns (0: nothing)."""
_PEAK, _PLATEAU, _FITTED, _AT_STEP, _MANUAL = 1, 2, 3, 4, 5
MANUAL_REASON = _MANUAL
"""The code :func:`twophase_optax.start_second_phase` records."""

STATISTICS = ("mean_grad", "mean_norm")


class Reading(NamedTuple):
    """What a rule reads at one step: :func:`twophase_optax.two_phase` makes
    one per step, :func:`per_window` one per window.

    Attributes:
      step: the step's index (int32).
      complete: whether the step completes a window; the peak, plateau and
        fit rules change their state only then.
      value: the loss, or the window's mean loss.
      grad_norm: the gradient's norm, or the mean of the window's norms.
      mean_grad_norm: the norm of the window's mean gradient.
      num_errors: misclassified examples, summed over the window, if passed.
      grad: the step's gradient (``None`` in a window's reading).
    """

    step: jax.Array
    complete: jax.Array
    value: jax.Array
    grad_norm: jax.Array
    mean_grad_norm: jax.Array
    num_errors: jax.Array | None
    grad: Any = None


class SwapRule(NamedTuple):
    """A swap rule: pure ``init`` and ``update`` and what they need.

    Attributes:
      init: ``params -> state``.
      update: ``(reading, state) -> (reason, state)``, jittable; ``reason``
        is an int32, 0 while the rule does not hold, else its
        :data:`SWAP_REASONS` code.
      reads: what it reads: ``"value"``, ``"mean_grad"``, ``"grad_norm"``,
        ``"num_errors"``.
      window: steps per reading of a :func:`per_window`, else ``None``.
      needs_window: whether it reads windows that nothing sums up.
      starts_second: whether it swaps before the first step.
      kind: the factory's name; ``children``: the rules it combines.
    """

    init: Callable[[Any], Any]
    update: Callable[[Reading, Any], tuple[jax.Array, Any]]
    reads: frozenset
    window: int | None = None
    needs_window: bool = False
    starts_second: bool = False
    kind: str = "custom"
    children: tuple = ()


# -- checks ------------------------------------------------------------------


def _is_real(x: Any) -> bool:
    return _is_int(x) or isinstance(x, (float, np.floating))


def _is_int(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


# What a setting must be: a test and the words for it.
_COUNT = (lambda x: _is_int(x) and x >= 1, "an integer >= 1")
_FRACTION = (lambda x: _is_real(x) and 0 < x < 1, "a number in (0, 1)")
_WEIGHT = (lambda x: _is_real(x) and 0 < x <= 1, "a number in (0, 1] (1: raw)")


def _check(rule: str, **settings: tuple[Any, tuple[Callable, str]]) -> None:
    """Raises ``ValueError`` for the first setting that fails its test.

    A concrete scalar array is tested as the number it holds; a traced one
    cannot be read and is not tested.
    """
    for name, (value, (ok, what)) in settings.items():
        if isinstance(value, jax.core.Tracer) and jnp.ndim(value) == 0:
            continue
        number = value
        if isinstance(value, (np.ndarray, jax.Array)) and np.ndim(value) == 0:
            number = value.item()
        if not ok(number):
            raise ValueError(f"tpo.swap.{rule}: {name} must be {what}, got {number!r}.")


def _check_rule(rule: Any, where: str) -> None:
    if not isinstance(rule, SwapRule):
        raise ValueError(
            f"{where} takes swap rules (tpo.swap.peak(), tpo.swap.plateau(), "
            f"...), got {rule!r}."
        )


def _on_complete(complete: jax.Array, new: Any, old: Any) -> Any:
    return jax.tree.map(lambda n, o: jnp.where(complete, n, o), new, old)


def _code(holds: jax.Array, code: int) -> jax.Array:
    return jnp.where(holds, code, 0).astype(jnp.int32)


def _moving_average(first: jax.Array, average: jax.Array, new: jax.Array, weight):
    """The exponential moving average with ``new``; ``new`` itself at first."""
    return jnp.where(first, new, average + weight * (new - average))


def _first_step(holds: jax.Array, step: jax.Array, recorded: jax.Array) -> jax.Array:
    """The step at which a rule first held: ``recorded`` once set (-1: not)."""
    return jnp.where(holds & (recorded < 0), step, recorded).astype(jnp.int32)


# -- the gradient-norm peak ----------------------------------------------------

DEFAULT_GN_FACTOR = 0.5
DEFAULT_SMOOTHING = 0.3
DEFAULT_PATIENCE = 1
DEFAULT_MIN_RISE = 1.25


class PeakState(NamedTuple):
    """State of :func:`peak`.

    Attributes:
      gn_max: the largest smoothed reading so far (0 before the first).
      gn_last: the most recent reading (0 before the first).
      gn_smoothed: the exponential moving average of the readings, the
        statistic that is tested (0 before the first).
      gn_first: the first smoothed reading, for ``min_rise``.
      num_below: smoothed readings in a row at or below ``gn_factor * gn_max``
        since the maximum rose by ``min_rise`` (int32).
      num_readings: readings so far (int32).
      detect_step: the step whose reading first met the criterion, -1 until
        then (int32).
    """

    gn_max: jax.Array
    gn_last: jax.Array
    gn_smoothed: jax.Array
    gn_first: jax.Array
    num_below: jax.Array
    num_readings: jax.Array
    detect_step: jax.Array


def peak(
    gn_factor: float = DEFAULT_GN_FACTOR,
    *,
    smoothing: float = DEFAULT_SMOOTHING,
    patience: int = DEFAULT_PATIENCE,
    min_rise: float = DEFAULT_MIN_RISE,
    min_windows: int = 1,
    statistic: str = "mean_grad",
) -> SwapRule:
    r"""Holds once the gradient norm, read per window, has fallen from its peak.

    In a non-convex region the gradient norm tends to grow as the loss falls;
    in the convex neighbourhood of a minimum it shrinks. Algorithm 1 keeps
    the running maximum of the readings and swaps at the first reading

    .. math::
      s_n \le \text{gn\_factor} \cdot \max_{m \le n} s_m,

    where :math:`s_n = s_{n-1} + w (g_n - s_{n-1})`, :math:`s_1 = g_1`, is an
    exponential moving average of the readings :math:`g_n` (weight
    ``smoothing``). The rule holds on the ``patience``-th such reading in a
    row, and no fall counts before the maximum has risen ``min_rise``-fold
    over the first reading: single readings under mini-batch noise jitter by
    10% and more, and the raw rule fires on the first dip. With
    ``gn_factor=0.9, smoothing=1, patience=1, min_rise=1`` it is Algorithm 1
    as printed (:data:`PAPER`). The defaults were chosen by replaying
    recorded Adam runs (``experiments/benchmarks/detector.py``, BENCHMARKS.md
    section 8).

    Args:
      gn_factor: the fraction of the maximum, in (0, 1).
      smoothing: weight of the newest reading, in (0, 1]; 1 reads raw.
      patience: readings in a row at or below the threshold, >= 1.
      min_rise: how far the maximum must rise over the first reading, >= 1.
      min_windows: no swap before this many readings exist, >= 1.
      statistic: ``"mean_grad"``, the norm of the window's mean gradient (the
        best estimate of the full-data gradient norm; a params-sized sum in
        :func:`per_window` when the window has more than one step), or
        ``"mean_norm"``, the mean of the steps' norms (scalars only, but
        inflated by mini-batch noise).

    Returns:
      A :class:`SwapRule` that needs a :func:`per_window`.

    Example:
      >>> import twophase_optax as tpo
      >>> readings = [1.0, 2.0, 3.0, 2.6, 2.8, 2.0, 1.5, 1.0, 0.5, 0.4, 0.3]
      >>> tpo.swap.replay(tpo.swap.PAPER, grad_norm=readings)  # <= 0.9 * 3.0
      3
      >>> tpo.swap.replay(tpo.swap.peak(), grad_norm=readings)
      9
    """
    _check(
        "peak",
        gn_factor=(gn_factor, _FRACTION),
        smoothing=(smoothing, _WEIGHT),
        patience=(patience, _COUNT),
        min_rise=(min_rise, (lambda x: _is_real(x) and x >= 1, "a number >= 1")),
        min_windows=(min_windows, _COUNT),
        statistic=(statistic, (STATISTICS.__contains__, f"one of {STATISTICS}")),
    )
    use_mean_grad = statistic == "mean_grad"

    def init(params: Any) -> PeakState:
        zero = jnp.zeros((), _protocol.scalar_dtype(params))
        return PeakState(
            gn_max=zero,
            gn_last=zero,
            gn_smoothed=zero,
            gn_first=zero,
            num_below=jnp.asarray(0, jnp.int32),
            num_readings=jnp.asarray(0, jnp.int32),
            detect_step=jnp.asarray(-1, jnp.int32),
        )

    def update(reading: Reading, state: PeakState) -> tuple[jax.Array, PeakState]:
        dtype = state.gn_max.dtype
        norm = reading.mean_grad_norm if use_mean_grad else reading.grad_norm
        norm = jnp.asarray(norm).astype(dtype)
        first = state.num_readings == 0
        smoothed = _moving_average(first, state.gn_smoothed, norm, smoothing)
        gn_first = jnp.where(first, smoothed, state.gn_first)
        gn_max = jnp.maximum(state.gn_max, smoothed)
        risen = gn_max >= min_rise * gn_first
        below = risen & (smoothed <= gn_factor * gn_max)
        num_below = jnp.where(below, state.num_below + 1, 0)
        num_readings = state.num_readings + 1
        holds = (
            reading.complete & (num_readings >= min_windows) & (num_below >= patience)
        )
        new = PeakState(
            gn_max=gn_max,
            gn_last=norm,
            gn_smoothed=smoothed,
            gn_first=gn_first,
            num_below=num_below,
            num_readings=num_readings,
            detect_step=_first_step(holds, reading.step, state.detect_step),
        )
        return _code(holds, _PEAK), _on_complete(reading.complete, new, state)

    reads = frozenset({"mean_grad" if use_mean_grad else "grad_norm"})
    return SwapRule(init, update, reads, needs_window=True, kind="peak")


PAPER = peak(0.9, smoothing=1.0, patience=1, min_rise=1.0)
"""The rule of Algorithm 1 as printed, which swaps on the first raw reading at
or below 0.9 of the maximum. It reads one reading per epoch:
``tpo.swap.per_window(tpo.swap.PAPER, steps=steps_per_epoch)``."""


# -- the loss plateau ------------------------------------------------------------

DEFAULT_RTOL = 0.1
DEFAULT_PLATEAU_PATIENCE = 5
DEFAULT_PLATEAU_SMOOTHING = 0.3


class PlateauState(NamedTuple):
    """State of :func:`plateau`.

    Attributes:
      loss_best: the lowest smoothed reading that counted as progress
        (``inf`` before the first).
      loss_smoothed: the exponential moving average of the window means.
      num_flat: readings in a row within ``rtol`` of the best without
        improving on it by ``rtol`` (int32).
      num_windows: readings so far (int32).
      plateau_step: the step whose reading first met the criterion, -1 until
        then (int32).
    """

    loss_best: jax.Array
    loss_smoothed: jax.Array
    num_flat: jax.Array
    num_windows: jax.Array
    plateau_step: jax.Array


def plateau(
    rtol: float = DEFAULT_RTOL,
    *,
    patience: int = DEFAULT_PLATEAU_PATIENCE,
    smoothing: float = DEFAULT_PLATEAU_SMOOTHING,
    min_windows: int = 1,
) -> SwapRule:
    r"""Holds once the loss, read per window, has stopped falling.

    The gradient-norm peak says where the loss turns convex, not where the
    second phase starts to pay: CG pays once the first phase has little left
    to gain, which the loss itself shows. The rule smooths the window means
    :math:`\bar v_n` of the loss (:math:`s_n = s_{n-1} + w (\bar v_n -
    s_{n-1})`, :math:`s_1 = \bar v_1`) and, in the manner of
    ``optax.contrib.reduce_on_plateau``, counts the readings in a row in which
    the smoothed loss stayed within ``rtol`` of its best without improving on
    it by ``rtol``:

    .. math::
      s_n < (1 - \text{rtol}) \, s_{best} &\Rightarrow s_{best} = s_n,\ k = 0
      \quad \text{(progress)};\\
      s_n > s_{best} / (1 - \text{rtol}) &\Rightarrow k = 0
      \quad \text{(a spike)};\\
      \text{else } &k \mathrel{+}= 1 \quad \text{(flat)}.

    It holds from the reading at which :math:`k` reaches ``patience`` on. A
    spike (Adam's loss jumping up for a few epochs) is not a plateau.

    Args:
      rtol: the relative fall that counts as progress, in [0, 1).
      patience: readings in a row without progress, >= 1.
      smoothing: weight of the newest window mean, in (0, 1]; 1 reads raw.
      min_windows: no swap before this many readings exist, >= 1.

    Returns:
      A :class:`SwapRule` that needs a :func:`per_window`.

    Example:
      >>> import twophase_optax as tpo
      >>> means = [1.0, 0.5, 0.25, 0.2, 0.19, 0.185, 0.184, 0.183, 0.182]
      >>> tpo.swap.replay(tpo.swap.plateau(0.1, patience=3, smoothing=1.0),
      ...                 value=means)
      6
    """
    _check(
        "plateau",
        rtol=(rtol, (lambda x: _is_real(x) and 0 <= x < 1, "a number in [0, 1)")),
        patience=(patience, _COUNT),
        smoothing=(smoothing, _WEIGHT),
        min_windows=(min_windows, _COUNT),
    )

    def init(params: Any) -> PlateauState:
        dtype = _protocol.scalar_dtype(params)
        return PlateauState(
            loss_best=jnp.asarray(jnp.inf, dtype),
            loss_smoothed=jnp.zeros((), dtype),
            num_flat=jnp.asarray(0, jnp.int32),
            num_windows=jnp.asarray(0, jnp.int32),
            plateau_step=jnp.asarray(-1, jnp.int32),
        )

    def update(reading: Reading, state: PlateauState) -> tuple[jax.Array, PlateauState]:
        mean = jnp.asarray(reading.value).astype(state.loss_best.dtype)
        first = state.num_windows == 0
        smoothed = _moving_average(first, state.loss_smoothed, mean, smoothing)
        improved = smoothed < (1 - rtol) * state.loss_best
        spike = smoothed * (1 - rtol) > state.loss_best
        num_flat = jnp.where(improved | spike, 0, state.num_flat + 1)
        num_windows = state.num_windows + 1
        holds = reading.complete & (num_flat >= patience) & (num_windows >= min_windows)
        new = PlateauState(
            loss_best=jnp.where(improved, smoothed, state.loss_best),
            loss_smoothed=smoothed,
            num_flat=num_flat,
            num_windows=num_windows,
            plateau_step=_first_step(holds, reading.step, state.plateau_step),
        )
        return _code(holds, _PLATEAU), _on_complete(reading.complete, new, state)

    return SwapRule(
        init, update, frozenset({"value"}), needs_window=True, kind="plateau"
    )


# -- the training set fitted -----------------------------------------------------

DEFAULT_MAX_ERRORS = 0
DEFAULT_FIT_PATIENCE = 10


class FittedState(NamedTuple):
    """State of :func:`fitted`.

    Attributes:
      num_fitted: readings in a row with at most ``max_errors`` misclassified
        examples (int32).
      fitted_step: the step whose reading first met the criterion, -1 until
        then (int32).
    """

    num_fitted: jax.Array
    fitted_step: jax.Array


def fitted(
    max_errors: int = DEFAULT_MAX_ERRORS, *, patience: int = DEFAULT_FIT_PATIENCE
) -> SwapRule:
    r"""Holds once the first phase has got the training examples right.

    Under a loss that saturates (softmax + MSE), CG converges to minima that
    keep some training examples misclassified: a wrong example costs at most
    :math:`2/(\text{classes} \cdot N)`, and its gradient shrinks as its
    softmax saturates, so a full-batch method settles there while Adam's
    noise moves on. This rule holds once ``patience`` readings in a row had
    at most ``max_errors`` misclassified examples.

    The count comes from the caller, who has the outputs: pass the number of
    examples of the step's batch that the forward pass which computed the
    gradient got wrong, as ``update(..., num_errors=k)``;
    :func:`twophase_optax.two_phase` raises if it is missing.

    Args:
      max_errors: the most misclassified examples in a window that count as
        fitted, an integer >= 0.
      patience: fitted windows in a row before the swap, >= 1.

    Returns:
      A :class:`SwapRule` that needs a :func:`per_window`.

    Example:
      >>> import twophase_optax as tpo
      >>> tpo.swap.replay(tpo.swap.fitted(patience=2),
      ...                 num_errors=[40, 3, 0, 1, 0, 0, 0])
      5
    """
    _check(
        "fitted",
        max_errors=(max_errors, (lambda x: _is_int(x) and x >= 0, "an integer >= 0")),
        patience=(patience, _COUNT),
    )

    def init(params: Any) -> FittedState:
        del params
        return FittedState(jnp.asarray(0, jnp.int32), jnp.asarray(-1, jnp.int32))

    def update(reading: Reading, state: FittedState) -> tuple[jax.Array, FittedState]:
        errors = jnp.asarray(reading.num_errors).astype(jnp.int32)
        num_fitted = jnp.where(errors <= max_errors, state.num_fitted + 1, 0)
        holds = reading.complete & (num_fitted >= patience)
        new = FittedState(
            num_fitted=num_fitted,
            fitted_step=_first_step(holds, reading.step, state.fitted_step),
        )
        return _code(holds, _FITTED), _on_complete(reading.complete, new, state)

    return SwapRule(
        init, update, frozenset({"num_errors"}), needs_window=True, kind="fitted"
    )


# -- fixed and manual ------------------------------------------------------------


class AtStepState(NamedTuple):
    """State of :func:`at_step`: ``phase_steps``, the first-phase steps so far
    (since the start or the last fallback; int32)."""

    phase_steps: jax.Array


def at_step(n: int) -> SwapRule:
    """Holds after ``n`` first-phase steps: the fixed split of the paper's runs.

    Steps ``0 .. n-1`` run the first phase and the second runs from step
    ``n`` (``n = 0``: from the start). The count is of the current first
    phase: after a fallback (``two_phase(..., fallback="first")``) the next
    swap comes ``n`` steps after it. To let another rule decide after a
    fallback instead, combine: ``any_of(at_step(n), rule)``.

    Example:
      >>> import twophase_optax as tpo
      >>> tpo.swap.replay(tpo.swap.at_step(3), value=[1.0] * 5)  # after step 2
      2
    """
    _check("at_step", n=(n, (lambda x: _is_int(x) and x >= 0, "an integer >= 0")))

    def init(params: Any) -> AtStepState:
        del params
        return AtStepState(jnp.asarray(0, jnp.int32))

    def update(reading: Reading, state: AtStepState) -> tuple[jax.Array, AtStepState]:
        steps = state.phase_steps + 1
        return _code(steps == n, _AT_STEP), AtStepState(steps)

    return SwapRule(init, update, frozenset(), starts_second=n == 0, kind="at_step")


def manual() -> SwapRule:
    """Never holds: only :func:`twophase_optax.start_second_phase` swaps.

    After a fallback the run stays in the first phase until the caller calls
    it again.
    """

    def init(params: Any) -> optax.EmptyState:
        del params
        return optax.EmptyState()

    def update(reading: Reading, state: Any) -> tuple[jax.Array, Any]:
        return jnp.asarray(0, jnp.int32), state

    return SwapRule(init, update, frozenset(), kind="manual")


# -- the window ------------------------------------------------------------------


class WindowState(NamedTuple):
    """State of :func:`per_window`.

    Attributes:
      window_count: steps accumulated in the current window (int32).
      window_value_sum: the sum of the window's losses, where read.
      window_norm_sum: the sum of the window's gradient norms, where read.
      window_errors: the window's misclassified examples, where read (int32).
      window_grad_sum: the sum of the window's gradients, only where a rule
        reads the norm of the window's mean gradient and the window has more
        than one step (float32; float64 for float64 params).
      rule_state: the state of the rule that reads the windows.
    """

    window_count: jax.Array
    window_value_sum: jax.Array | None
    window_norm_sum: jax.Array | None
    window_errors: jax.Array | None
    window_grad_sum: Any
    rule_state: Any


def per_window(rule: SwapRule, *, steps: int) -> SwapRule:
    """``rule`` read once per window of ``steps`` steps (an epoch, say).

    Sums the steps' losses, gradient norms, error counts and, only where a
    rule reads the norm of the window's mean gradient and ``steps > 1``,
    gradients, once for every rule below it, and hands ``rule`` their means
    (the errors' sum) on the window's last step. ``steps=1`` reads every step.

    Args:
      rule: the rule, or combination of rules, to read per window.
      steps: steps per window, >= 1; the paper reads once per epoch.

    Example:
      >>> import jax.numpy as jnp
      >>> import twophase_optax as tpo
      >>> rule = tpo.swap.per_window(tpo.swap.peak(), steps=10)
      >>> state = rule.init({"w": jnp.zeros(1000)})
      >>> state.window_grad_sum["w"].shape  # the window's mean gradient
      (1000,)
      >>> rule = tpo.swap.per_window(tpo.swap.plateau(), steps=10)
      >>> rule.init({"w": jnp.zeros(1000)}).window_grad_sum is None
      True
    """
    _check_rule(rule, "tpo.swap.per_window")
    _check("per_window", steps=(steps, _COUNT))
    if _has_window(rule):
        raise ValueError(
            "tpo.swap.per_window: the rule already reads windows; wrap the "
            "combination once: per_window(any_of(a, b), steps=N)."
        )
    reads = rule.reads
    # The norm of a window's mean gradient needs the gradients' sum; that of
    # a one-step window is the step's norm, summed like "grad_norm".
    keep_grad_sum = "mean_grad" in reads and steps > 1
    keep_norm_sum = "grad_norm" in reads or ("mean_grad" in reads and steps == 1)

    def init(params: Any) -> WindowState:
        dtype = _protocol.scalar_dtype(params)
        zero = jnp.zeros((), dtype)
        return WindowState(
            window_count=jnp.asarray(0, jnp.int32),
            window_value_sum=zero if "value" in reads else None,
            window_norm_sum=zero if keep_norm_sum else None,
            window_errors=jnp.asarray(0, jnp.int32) if "num_errors" in reads else None,
            window_grad_sum=(
                optax.tree.zeros_like(params, dtype=dtype) if keep_grad_sum else None
            ),
            rule_state=rule.init(params),
        )

    def update(reading: Reading, state: WindowState) -> tuple[jax.Array, WindowState]:
        count = state.window_count + 1
        complete = count == steps

        def add(total, x):  # A sum that the rules below do not read stays None.
            return None if total is None else total + jnp.asarray(x).astype(total.dtype)

        def mean(total):
            return jnp.zeros(()) if total is None else total / steps

        value_sum = add(state.window_value_sum, reading.value)
        norm_sum = add(state.window_norm_sum, reading.grad_norm)
        errors = add(state.window_errors, reading.num_errors)
        mean_grad_norm = mean(norm_sum)  # One step's gradient: its norm.
        grad_sum = None
        if keep_grad_sum:
            grad = optax.tree.cast_like(reading.grad, state.window_grad_sum)
            grad_sum = optax.tree.add(state.window_grad_sum, grad)
            mean_grad_norm = optax.tree.norm(grad_sum) / steps
        window_reading = Reading(
            step=reading.step,
            complete=reading.complete & complete,
            value=mean(value_sum),
            grad_norm=mean(norm_sum),
            mean_grad_norm=mean_grad_norm,
            num_errors=jnp.zeros((), jnp.int32) if errors is None else errors,
        )
        reason, rule_state = rule.update(window_reading, state.rule_state)

        def restart(total):
            if total is None:
                return None
            return optax.tree.where(complete, optax.tree.zeros_like(total), total)

        new = WindowState(
            window_count=jnp.where(complete, 0, count).astype(jnp.int32),
            window_value_sum=restart(value_sum),
            window_norm_sum=restart(norm_sum),
            window_errors=restart(errors),
            window_grad_sum=restart(grad_sum),
            rule_state=rule_state,
        )
        return reason, optax.tree.cast_like(new, state)

    return SwapRule(
        init,
        update,
        reads,
        window=steps,
        needs_window=False,
        starts_second=rule.starts_second,
        kind="per_window",
        children=(rule,),
    )


def _has_window(rule: SwapRule) -> bool:
    return rule.kind == "per_window" or any(_has_window(c) for c in rule.children)


# -- combinators -----------------------------------------------------------------


def any_of(*rules: SwapRule) -> SwapRule:
    """Holds when any of ``rules`` holds; the reason is the first that does.

    The state is the tuple of the rules' states.

    Example:
      >>> import twophase_optax as tpo
      >>> rule = tpo.swap.any_of(tpo.swap.fitted(patience=2),
      ...                        tpo.swap.plateau(0.1, patience=3, smoothing=1.0))
      >>> tpo.swap.replay(rule, value=[1.0, 0.5, 0.48, 0.47, 0.46, 0.45],
      ...                 num_errors=[9, 5, 3, 2, 1, 1])
      4
    """
    if not rules:
        raise ValueError("tpo.swap.any_of needs at least one rule.")
    for rule in rules:
        _check_rule(rule, "tpo.swap.any_of")

    def init(params: Any) -> tuple:
        return tuple(rule.init(params) for rule in rules)

    def update(reading: Reading, state: tuple) -> tuple[jax.Array, tuple]:
        reason, new = jnp.asarray(0, jnp.int32), []
        for rule, rule_state in zip(rules, state, strict=True):
            code, rule_state = rule.update(reading, rule_state)
            reason = jnp.where(reason > 0, reason, code)
            new.append(rule_state)
        return reason, tuple(new)

    return SwapRule(
        init,
        update,
        frozenset().union(*(r.reads for r in rules)),
        needs_window=any(r.needs_window for r in rules),
        starts_second=any(r.starts_second for r in rules),
        kind="any_of",
        children=rules,
    )


class AfterState(NamedTuple):
    """State of :func:`after`: ``triggered`` (whether the trigger has held),
    and the trigger's and the rule's states."""

    triggered: jax.Array
    trigger_state: Any
    rule_state: Any


def after(trigger: SwapRule, rule: SwapRule) -> SwapRule:
    """Holds when ``rule`` holds once ``trigger`` has held (at this step or before).

    Both are read from the start; only ``rule``'s signal waits for the
    trigger. ``after(peak(), plateau())`` is the plateau counted once the
    gradient norm has peaked: the loss may stall on the way up to the peak,
    where the second phase does not pay.

    Example:
      >>> import twophase_optax as tpo
      >>> rule = tpo.swap.after(tpo.swap.at_step(4),
      ...                       tpo.swap.plateau(0.1, patience=1, smoothing=1.0))
      >>> tpo.swap.replay(rule, value=[1.0, 0.99, 0.98, 0.5, 0.49, 0.48])
      4
    """
    _check_rule(trigger, "tpo.swap.after")
    _check_rule(rule, "tpo.swap.after")

    def init(params: Any) -> AfterState:
        return AfterState(jnp.asarray(False), trigger.init(params), rule.init(params))

    def update(reading: Reading, state: AfterState) -> tuple[jax.Array, AfterState]:
        fired, trigger_state = trigger.update(reading, state.trigger_state)
        reason, rule_state = rule.update(reading, state.rule_state)
        triggered = state.triggered | (fired > 0)
        return jnp.where(triggered, reason, 0), AfterState(
            triggered, trigger_state, rule_state
        )

    return SwapRule(
        init,
        update,
        trigger.reads | rule.reads,
        needs_window=trigger.needs_window or rule.needs_window,
        starts_second=trigger.starts_second and rule.starts_second,
        kind="after",
        children=(trigger, rule),
    )


class WithinState(NamedTuple):
    """State of :func:`within`: ``num_readings``, the complete readings so
    far (int32), and the rule's state."""

    num_readings: jax.Array
    rule_state: Any


def within(rule: SwapRule, *, windows: int) -> SwapRule:
    """Holds where ``rule`` holds on one of the first ``windows`` complete
    readings (epochs, under a per-epoch :func:`per_window`), never later.

    The second phase has to win back what its first epochs cost; with only
    the last few epochs of a budget left it has no time to (in the swap-rule
    studies none of the swaps made in a budget's last fifth ended below
    Adam's loss), so :func:`default` given ``epochs`` stops there. ``rule``
    goes on reading after the limit; only its signal is dropped.

    Args:
      rule: the rule, or combination of rules, to limit.
      windows: the last reading on which a swap may come, >= 1.

    Example:
      >>> import twophase_optax as tpo
      >>> late = tpo.swap.plateau(0.1, patience=1, smoothing=1.0)
      >>> values = [1.0, 0.5, 0.25, 0.24, 0.23]
      >>> tpo.swap.replay(late, value=values)
      3
      >>> tpo.swap.replay(tpo.swap.within(late, windows=3), value=values) is None
      True
    """
    _check_rule(rule, "tpo.swap.within")
    _check("within", windows=(windows, _COUNT))
    if _has_window(rule):
        raise ValueError(
            "tpo.swap.within counts the readings of a window; limit the rule "
            "inside it: per_window(within(rule, windows=N), steps=S)."
        )

    def init(params: Any) -> WithinState:
        return WithinState(jnp.asarray(0, jnp.int32), rule.init(params))

    def update(reading: Reading, state: WithinState) -> tuple[jax.Array, WithinState]:
        reason, rule_state = rule.update(reading, state.rule_state)
        count = state.num_readings + reading.complete.astype(jnp.int32)
        return jnp.where(count <= windows, reason, 0), WithinState(count, rule_state)

    return SwapRule(
        init,
        update,
        rule.reads,
        needs_window=rule.needs_window,
        starts_second=rule.starts_second,
        kind="within",
        children=(rule,),
    )


def last_swap_epoch(epochs: int) -> int:
    """The last epoch after which :func:`default` may swap in a run of
    ``epochs``: ``epochs - epochs // 5``, so never in the run's last fifth.

    Args:
      epochs: the run's epochs, >= 1.

    Example:
      >>> import twophase_optax as tpo
      >>> tpo.swap.last_swap_epoch(150), tpo.swap.last_swap_epoch(4)
      (120, 4)
    """
    _check("last_swap_epoch", epochs=(epochs, _COUNT))
    return epochs - epochs // 5


def default(steps_per_epoch: int, *, epochs: int | None = None) -> SwapRule:
    """Fit or plateau, read once per epoch: the rule to start from.

    ``per_window(any_of(fitted(), plateau()), steps=steps_per_epoch)``: swap
    once ten epochs in a row got every training example right, or once the
    epoch's mean loss has not fallen by 10% for five epochs, whichever comes
    first. Given the run's ``epochs``, never in their last fifth
    (:func:`within` the first :func:`last_swap_epoch`), where the second
    phase has too little time left to pay; :func:`twophase_optax.fit` passes
    them. Chosen on the digits and mnist5k swap-rule studies (BENCHMARKS.md
    section 10), where it leaves short budgets to Adam. It reads
    ``num_errors``; for a loss without classes use
    ``per_window(plateau(), steps=steps_per_epoch)``.

    Args:
      steps_per_epoch: the first phase's steps per epoch, >= 1.
      epochs: the run's epochs, >= 1, or ``None`` for no last swap epoch.

    Example:
      >>> import twophase_optax as tpo
      >>> tpo.swap.default(steps_per_epoch=23).window
      23
      >>> flat = dict(value=[1.0] * 10, num_errors=[3] * 10)  # a plateau
      >>> tpo.swap.replay(tpo.swap.default(1), **flat)  # after reading 5
      5
      >>> tpo.swap.replay(tpo.swap.default(1, epochs=10), **flat)  # within 8
      5
      >>> tpo.swap.replay(tpo.swap.default(1, epochs=6), **flat) is None
      True
    """
    _check("default", steps_per_epoch=(steps_per_epoch, _COUNT))
    rule = any_of(fitted(), plateau())
    if epochs is not None:
        _check("default", epochs=(epochs, _COUNT))
        rule = within(rule, windows=last_swap_epoch(epochs))
    return per_window(rule, steps=steps_per_epoch)


# -- replay ----------------------------------------------------------------------


@functools.lru_cache(maxsize=64)
def _without_windows(rule: SwapRule) -> SwapRule:
    if rule.kind == "per_window":
        return _without_windows(rule.children[0])
    if rule.kind == "any_of":
        return any_of(*map(_without_windows, rule.children))
    if rule.kind == "after":
        return after(*map(_without_windows, rule.children))
    return rule


@functools.lru_cache(maxsize=64)
def _replayer(rule: SwapRule) -> Callable[[Reading], jax.Array]:
    # One compiled scan per rule (rules are hashable), so that replaying the
    # same rule on records of the same length compiles once.
    def read(state, reading):
        reason, state = rule.update(reading, state)
        return state, reason

    def run(readings: Reading) -> jax.Array:
        state = rule.init(jnp.zeros((), jnp.float32))
        return jax.lax.scan(read, state, readings)[1]

    return jax.jit(run)


def holds(
    rule: SwapRule,
    *,
    value: Sequence[float] | None = None,
    grad_norm: Sequence[float] | None = None,
    num_errors: Sequence[int] | None = None,
) -> list[bool]:
    """Per recorded reading, whether ``rule`` holds there (see :func:`replay`).

    Example:
      >>> import twophase_optax as tpo
      >>> tpo.swap.holds(tpo.swap.fitted(patience=2), num_errors=[3, 0, 0, 1, 0])
      [False, False, True, False, False]
    """
    _check_rule(rule, "tpo.swap.holds")
    rule = _without_windows(rule)
    given = {"value": value, "grad_norm": grad_norm, "num_errors": num_errors}
    lengths = {len(x) for x in given.values() if x is not None}
    if len(lengths) > 1:
        raise ValueError(
            f"tpo.swap.replay: the records differ in length ({sorted(lengths)})."
        )
    need = {"grad_norm" if r == "mean_grad" else r for r in rule.reads}
    missing = sorted(name for name in need if given[name] is None)
    if missing:
        raise ValueError(
            f"tpo.swap.replay: the rule reads {missing}; pass "
            + ", ".join(f"{name}=[...]" for name in missing)
            + " (one record per reading)."
        )
    if not lengths:
        raise ValueError(
            "tpo.swap.replay needs records: value=, grad_norm= or num_errors=."
        )
    (length,) = lengths
    if length == 0:
        return []

    def record(x, dtype):
        return jnp.zeros(length, dtype) if x is None else jnp.asarray(x, dtype)

    norms = record(grad_norm, jnp.float32)
    readings = Reading(
        step=jnp.arange(length, dtype=jnp.int32),
        complete=jnp.ones(length, bool),
        value=record(value, jnp.float32),
        grad_norm=norms,
        mean_grad_norm=norms,
        num_errors=record(num_errors, jnp.int32),
    )
    return [bool(r > 0) for r in np.asarray(_replayer(rule)(readings))]


def replay(
    rule: SwapRule,
    *,
    value: Sequence[float] | None = None,
    grad_norm: Sequence[float] | None = None,
    num_errors: Sequence[int] | None = None,
) -> int | None:
    """The index of the reading on which ``rule`` first holds, or ``None``.

    Runs recorded readings, one per window (the ``batch_loss``,
    ``gn_reading`` and ``batch_errors`` of each epoch in a metrics file, say),
    through the rule's own ``update``, in float32, so that a rule can be
    tried on a recorded run without training again. Each record is a whole
    reading: the rule's :func:`per_window` is read through, and
    :func:`at_step` counts readings. A gradient-norm record stands for both
    statistics of :func:`peak`. Before its swap a two-phase run is its first
    phase, so the index is the reading after which that run swaps.

    Args:
      rule: a :class:`SwapRule`.
      value: the readings' mean losses, where the rule reads them.
      grad_norm: the gradient-norm readings, where the rule reads them.
      num_errors: the readings' misclassified examples, where the rule reads
        them.

    Returns:
      The index (a window's, counting from 0) or ``None`` if the rule never
      holds.

    Example:
      >>> import twophase_optax as tpo
      >>> tpo.swap.replay(tpo.swap.default(steps_per_epoch=10),
      ...                 value=[2.0, 1.0, 0.5, 0.25, 0.2],
      ...                 num_errors=[50, 9, 0, 0, 0])
    """
    flags = holds(rule, value=value, grad_norm=grad_norm, num_errors=num_errors)
    return flags.index(True) if any(flags) else None
