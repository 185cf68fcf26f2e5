"""``tpo.fit``: one call from a loss and a dataset to a two-phase-trained model.

The two-phase method changes the data regime at the swap: the first phase
(Adam) steps through shuffled mini-batches, the second (CG) steps on the whole
training set, where its line search's value and gradient are reused from step
to step. :func:`fit` carries a run across that change:

* each first-phase epoch is one jitted ``jax.lax.scan`` over the epoch's
  mini-batches (no Python per step). The data are shuffled afresh every epoch
  and the last ``n % batch_size`` examples of the shuffled order are left out
  of that epoch (they are in the next one's batches with high probability);
* once the swap has fired, the remaining steps of that epoch are held (a swap
  rule that fires mid-epoch never runs CG on a mini-batch), and each later
  epoch is one full-batch second-phase step, evaluated in chunks through
  :func:`twophase_optax.chunked_loss` when ``chunk_size`` is set, with the value
  and gradient handed over by :func:`~twophase_optax.value_and_grad_from_state`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from twophase_optax import _protocol
from twophase_optax import swap as swap_lib
from twophase_optax.chunked_loss import chunked_loss
from twophase_optax.two_phase import TwoPhaseState
from twophase_optax.two_phase import two_phase
from twophase_optax.value_and_grad import value_and_grad_from_state

KEEP = ("last", "best")


class FitResult(NamedTuple):
    """What :func:`fit` returns.

    Attributes:
      params: the trained params (with ``keep="best"``, those of the epoch
        with the lowest validation loss).
      state: the optimizer state after the last epoch.
      history: one dict per epoch: ``epoch``, ``phase`` (1 or 2),
        ``train_loss`` (the epoch's mean mini-batch loss in the first phase,
        the full-batch loss before the step in the second),
        ``validation_loss`` (``None`` without ``validation``), ``metrics``
        (``metrics_fn``'s value on the validation data, or ``None``),
        ``num_errors`` (the first-phase epoch's misclassified examples, with
        ``num_errors``; else ``None``),
        ``forward_passes`` (forward-pass equivalents over the training set
        spent so far: a value and gradient is 3, a value 1), ``seconds`` (wall
        time of the epoch, compilation excluded), ``compile_seconds``, and
        ``final`` (the second phase can no longer lower the loss: its
        gradient is zero or its line search failed from the same point; no
        more steps are spent).
      swap_epoch: the first epoch run in the second phase, or ``None``.
      best_epoch: the epoch whose params were kept with ``keep="best"``,
        else ``None``.
    """

    params: Any
    state: Any
    history: list[dict]
    swap_epoch: int | None
    best_epoch: int | None


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(f"tpo.fit: {message}")


def _num_examples(data: Any, name: str) -> int:
    leaves = jax.tree.leaves(data)
    _check(bool(leaves), f"{name} holds no arrays.")
    lengths = {int(jnp.shape(x)[0]) if jnp.ndim(x) else 0 for x in leaves}
    _check(
        len(lengths) == 1 and 0 not in lengths,
        f"every leaf of {name} needs the same number of examples along axis "
        f"0; got lengths {sorted(lengths)}.",
    )
    return lengths.pop()


def _phase_state(opt_state: Any) -> TwoPhaseState | None:
    return _protocol.find_node(opt_state, lambda n: isinstance(n, TwoPhaseState))


def fit(
    loss_fn: Callable[..., Any],
    params: Any,
    data: Any,
    *,
    batch_size: int,
    epochs: int,
    key: jax.Array,
    tx: optax.GradientTransformation | None = None,
    has_aux: bool = False,
    loss_takes_key: bool = False,
    num_errors: Callable[[Any, Any], jax.Array] | None = None,
    validation: Any = None,
    keep: str = "last",
    chunk_size: int | None = None,
    metrics_fn: Callable[[Any, Any], Any] | None = None,
    callback: Callable[[dict], None] | None = None,
) -> FitResult:
    """Trains ``params`` on ``data`` with the two-phase method, one call.

    Args:
      loss_fn: ``loss_fn(params, batch)``, the mean loss over ``batch``;
        with ``has_aux``, ``(loss, aux)``.
      params: the initial params.
      data: the training set, a pytree of arrays with a leading example axis.
      batch_size: first-phase mini-batch size, 1 to the number of examples.
      epochs: epochs in all (first and second phase), >= 1.
      key: a ``jax.random`` key for the shuffling.
      tx: any optax transformation. ``None``:
        ``tpo.two_phase(optax.adam(1e-3), swap=tpo.swap.default(steps_per_epoch=S,
        epochs=epochs))`` with ``num_errors``, the plateau alone
        (``per_window(within(plateau(), windows=last_swap_epoch(epochs)), steps=S)``)
        without, ``S`` the number of mini-batches per epoch: no swap in the
        last fifth of the epochs. Plain
        ``optax.adam(1e-3)`` gives the Adam baseline through the same call.
        Where a state of about 23 times the params fits in memory,
        ``tpo.two_phase(optax.adam(1e-3), optax.lbfgs(), swap=...)`` reached
        lower training losses at equal compute than the default CG on the
        digits models (docs/cg.md, "Which second phase"); CG's state is twice
        the params.
      has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
      loss_takes_key: call ``loss_fn(params, batch, key)``, for models with
        dropout: each first-phase step gets a fresh key (split from ``key``),
        the second phase and the validation get ``key=None``, to which the
        loss must answer deterministically (dropout off), since the line
        search compares values of one function.
      num_errors: ``num_errors(aux, batch)``, the batch's misclassified
        examples, for swap rules that read them (``tpo.swap.fitted``); needs
        ``has_aux``. In the second phase ``tx`` gets 0: the rule's readings
        there are never used (a fallback restarts the rule).
      validation: held-out data of ``data``'s structure, evaluated once per
        epoch.
      keep: ``"last"`` returns the last params, ``"best"`` those with the
        lowest validation loss (needs ``validation``).
      chunk_size: evaluate the second phase's full-batch loss in chunks of
        at most this many examples (:func:`twophase_optax.chunked_loss`).
      metrics_fn: ``metrics_fn(params, validation)``, recorded per epoch.
      callback: called with each epoch's history record (a progress bar).

    Returns:
      A :class:`FitResult`.

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> import twophase_optax as tpo
      >>> x = jax.random.normal(jax.random.key(0), (256, 3))
      >>> data = {"x": x, "y": x @ jnp.array([1.0, -2.0, 0.5])}
      >>> loss = lambda w, b: jnp.mean((b["x"] @ w - b["y"]) ** 2)
      >>> tx = tpo.two_phase(optax.adam(0.1), swap=tpo.swap.at_step(40))
      >>> result = tpo.fit(loss, jnp.zeros(3), data, tx=tx, batch_size=32,
      ...                  epochs=8, key=jax.random.key(1))
      >>> result.swap_epoch  # 40 steps = 5 epochs of 8 mini-batches
      5
      >>> print(" ".join(f"{w:.3f}" for w in result.params))
      1.000 -2.000 0.500
    """
    n = _num_examples(data, "data")
    _check(
        isinstance(batch_size, int) and 1 <= batch_size <= n,
        f"batch_size must be an integer in [1, {n}] (the examples in data), "
        f"got {batch_size!r}.",
    )
    _check(
        isinstance(epochs, int) and epochs >= 1,
        f"epochs must be an integer >= 1, got {epochs!r}.",
    )
    _check(keep in KEEP, f"keep must be one of {KEEP}, got {keep!r}.")
    _check(
        keep != "best" or validation is not None,
        'keep="best" needs validation data to tell the best epoch.',
    )
    _check(
        num_errors is None or has_aux,
        "num_errors(aux, batch) reads loss_fn's aux: pass has_aux=True and "
        "return (loss, aux) from loss_fn.",
    )
    if validation is not None:
        _check(
            jax.tree.structure(validation) == jax.tree.structure(data),
            "validation must have data's structure, got "
            f"{jax.tree.structure(validation)} against {jax.tree.structure(data)}.",
        )
        _num_examples(validation, "validation")
    steps = n // batch_size
    if tx is None:
        last = swap_lib.last_swap_epoch(epochs)  # Not in the last fifth.
        rule = (
            swap_lib.default(steps_per_epoch=steps, epochs=epochs)
            if num_errors is not None
            else swap_lib.per_window(
                swap_lib.within(swap_lib.plateau(), windows=last), steps=steps
            )
        )
        tx = two_phase(optax.adam(1e-3), swap=rule)
    tx = optax.with_extra_args_support(tx)

    def loss_at(params: Any, batch: Any, step_key: jax.Array | None = None) -> Any:
        if loss_takes_key:
            return loss_fn(params, batch, step_key)
        return loss_fn(params, batch)

    def value_of(params: Any, batch: Any) -> jax.Array:
        out = loss_at(params, batch)
        return out[0] if has_aux else out

    full_value = value_of if chunk_size is None else chunked_loss(value_of, chunk_size)

    def in_second_phase(opt_state: Any) -> jax.Array:
        phase = _phase_state(opt_state)
        return jnp.asarray(False) if phase is None else phase.in_second_phase

    def error_kwargs(aux: Any, batch: Any) -> dict:
        if num_errors is None:
            return {}
        return {"num_errors": jnp.asarray(num_errors(aux, batch), jnp.int32)}

    @jax.jit
    def first_phase_epoch(params, opt_state, epoch):
        epoch_key = jax.random.fold_in(key, epoch)
        order = jax.random.permutation(epoch_key, n)[: steps * batch_size]
        batches = jax.tree.map(
            lambda x: x[order].reshape(steps, batch_size, *x.shape[1:]), data
        )
        step_keys = (
            jax.random.split(jax.random.fold_in(epoch_key, 1), steps)
            if loss_takes_key
            else jnp.zeros(steps)
        )

        def step(carry, inputs):
            params, opt_state = carry
            batch, step_key = inputs
            step_key = step_key if loss_takes_key else None

            def update(_):
                if has_aux:
                    (value, aux), grad = jax.value_and_grad(loss_at, has_aux=True)(
                        params, batch, step_key
                    )
                else:
                    value, grad = jax.value_and_grad(loss_at)(params, batch, step_key)
                    aux = None
                errors = error_kwargs(aux, batch)
                updates, state = tx.update(
                    grad,
                    opt_state,
                    params,
                    value=value,
                    grad=grad,
                    value_fn=value_of,
                    batch=batch,
                    **errors,
                )
                new_params = optax.apply_updates(params, updates)
                return (new_params, state), (
                    jnp.asarray(value, jnp.float32),
                    jnp.asarray(errors.get("num_errors", 0), jnp.int32),
                )

            def hold(_):
                # The swap fired earlier in this epoch: no CG on mini-batches.
                return (params, opt_state), (
                    jnp.asarray(jnp.nan, jnp.float32),
                    jnp.asarray(0, jnp.int32),
                )

            if _phase_state(opt_state) is None:  # no swap to wait for
                return update(None)
            return jax.lax.cond(in_second_phase(opt_state), hold, update, None)

        (params, opt_state), (values, errors) = jax.lax.scan(
            step, (params, opt_state), (batches, step_keys)
        )
        # What the host reads, fetched in one transfer.
        readings = (
            jnp.nanmean(values),
            jnp.sum(errors),
            jnp.sum(~jnp.isnan(values)),  # steps run (held ones cost nothing)
            in_second_phase(opt_state),
        )
        return params, opt_state, readings

    value_and_grad = value_and_grad_from_state(lambda p: full_value(p, data))

    def stores_gradient(opt_state: Any) -> bool:
        search = _protocol.find_linesearch_state(opt_state)
        return getattr(search, "grad", None) is not None

    @jax.jit
    def second_phase_step(params, opt_state):
        if stores_gradient(opt_state):
            stored = _protocol.find_linesearch_state(opt_state).value
            # The step's own value and gradient: 3 unless the search left them.
            start_cost = jnp.where(jnp.isfinite(stored), 0.0, 3.0)
            value, grad = value_and_grad(params, state=opt_state)
        else:
            start_cost = jnp.asarray(3.0)
            value, grad = jax.value_and_grad(full_value)(params, data)
        kwargs = {}
        if num_errors is not None:
            kwargs["num_errors"] = jnp.zeros((), jnp.int32)
        updates, new_state = tx.update(
            grad,
            opt_state,
            params,
            value=value,
            grad=grad,
            value_fn=full_value,
            batch=data,
            **kwargs,
        )
        search = _protocol.find_linesearch_state(new_state)
        phase = _phase_state(new_state)
        if phase is None:  # the second phase alone (a manual start's CG)
            evaluations, _ = _protocol.linesearch_evaluations(search)
            cost = _protocol.linesearch_cost(search)
        else:  # what two_phase counted: nothing where its guards ran no search
            before = _phase_state(opt_state)
            evaluations = phase.num_evaluations - before.num_evaluations
            gradients = phase.num_gradients - before.num_gradients
            cost = (evaluations + 2 * gradients).astype(jnp.float32)
        failed = jnp.asarray(getattr(getattr(search, "info", None), "failed", False))
        zero_gradient = optax.tree.norm(grad) == 0
        final = zero_gradient | (failed & (evaluations == 0))
        readings = (value, start_cost + cost, final)
        return optax.apply_updates(params, updates), new_state, readings

    @jax.jit
    def evaluate(params):
        loss = value_of(params, validation)
        metrics = None if metrics_fn is None else metrics_fn(params, validation)
        return loss, metrics

    opt_state = tx.init(params)
    history: list[dict] = []
    forward_passes = 0.0
    swap_epoch = None
    best = (jnp.inf, params, None)
    compiled: dict[str, Any] = {}  # each phase's step, compiled once
    final = False
    swapped = bool(in_second_phase(opt_state))  # True only for a manual start
    for epoch in range(epochs):
        second = swapped
        start = time.perf_counter()
        compile_seconds = 0.0
        if not second:
            args = (params, opt_state, np.int32(epoch))
            if "first" not in compiled:
                compiled["first"] = first_phase_epoch.lower(*args).compile()
                compile_seconds = time.perf_counter() - start
                start = time.perf_counter()
            params, opt_state, readings = compiled["first"](*args)
            train_loss, epoch_errors, steps_run, swapped = jax.device_get(readings)
            train_loss, swapped = float(train_loss), bool(swapped)
            # Steps held after a mid-epoch swap cost nothing.
            forward_passes += 3.0 * int(steps_run) * batch_size / n
        elif not final:
            if swap_epoch is None:
                swap_epoch = epoch
            if "second" not in compiled:
                compiled["second"] = second_phase_step.lower(
                    params, opt_state
                ).compile()
                compile_seconds = time.perf_counter() - start
                start = time.perf_counter()
            params, opt_state, readings = compiled["second"](params, opt_state)
            value, cost, final_now = jax.device_get(readings)
            forward_passes += float(cost)
            train_loss = float(value)
            final = bool(final_now)
        else:
            train_loss = history[-1]["train_loss"]
        if second:
            epoch_errors = None
        seconds = time.perf_counter() - start
        validation_loss, metrics = None, None
        if validation is not None:
            validation_loss, metrics = evaluate(params)
            validation_loss = float(validation_loss)
            metrics = jax.tree.map(lambda m: np.asarray(m).tolist(), metrics)
            if keep == "best" and validation_loss < best[0]:
                best = (validation_loss, params, epoch)
        record = {
            "epoch": epoch,
            "phase": 2 if second else 1,
            "train_loss": train_loss,
            "validation_loss": validation_loss,
            "metrics": metrics,
            "num_errors": None
            if num_errors is None or epoch_errors is None
            else int(epoch_errors),
            "forward_passes": forward_passes,
            "seconds": seconds,
            "compile_seconds": compile_seconds,
            "final": final,
        }
        history.append(record)
        if callback is not None:
            callback(record)
    if keep == "best":
        return FitResult(best[1], opt_state, history, swap_epoch, best[2])
    return FitResult(params, opt_state, history, swap_epoch, None)
