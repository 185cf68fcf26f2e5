"""Shared plumbing for optax's line-search calling convention.

optax's line searches are called as
``update(updates, state, params, value=..., grad=..., value_fn=..., **extra)``
where ``extra`` holds the keyword arguments of ``value_fn`` (a batch, say).
The helpers here check that call and bind those arguments once, so that every
transformation of this package reports a missing argument the same way.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax


def require_value_and_value_fn(
    name: str, value: Any, value_fn: Callable[..., Any] | None
) -> None:
    """Raises a ``TypeError`` that shows the right call if an argument is missing."""
    missing = [
        arg
        for arg, given in (("value", value), ("value_fn", value_fn))
        if given is None
    ]
    if missing:
        raise TypeError(
            f"{name}.update needs the keyword argument(s) {', '.join(missing)}. "
            "It follows optax's line-search convention; call it as\n"
            "  value, grad = jax.value_and_grad(loss_fn)(params, batch)\n"
            "  updates, state = opt.update(grad, state, params, value=value, "
            "grad=grad, value_fn=loss_fn, batch=batch)\n"
            "where loss_fn(params, **kwargs) returns a scalar and the remaining "
            "keyword arguments (here `batch`) are passed on to loss_fn."
        )


def bind_value_fn(
    name: str, value_fn: Callable[..., Any], extra_args: dict[str, Any]
) -> Callable[[Any], jax.Array]:
    """Returns ``params -> value_fn(params, **kwargs)`` with the kwargs it accepts.

    Mirrors optax's line searches: every extra argument must be consumed by
    ``value_fn``, so that a misspelt batch argument is an error rather than a
    silently ignored input.
    """
    try:
        signature = inspect.signature(value_fn)
    except (TypeError, ValueError):  # Builtins and some C callables.
        return functools.partial(value_fn, **extra_args)
    parameters = signature.parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return functools.partial(value_fn, **extra_args)
    accepted = {p.name for p in parameters}
    unused = sorted(set(extra_args) - accepted)
    if unused:
        raise TypeError(
            f"Unexpected keyword arguments passed to `{name}.update`: {unused}. "
            "Every extra keyword argument is passed on to `value_fn`, which does "
            "not accept these."
        )
    return functools.partial(value_fn, **extra_args)


def line(
    loss: Callable[[Any], jax.Array], params: Any, direction: Any, dtype: jnp.dtype
) -> tuple[Callable[[jax.Array], Any], Callable[[jax.Array], jax.Array]]:
    """The step ``alpha -> alpha * d`` and the line ``alpha -> loss(params + step)``.

    The line evaluates exactly the params that ``optax.apply_updates`` makes of
    the step (rounded like the direction), so that the value a line search
    accepts is the value the caller gets, also for half-precision params. A
    NaN or infinite value reads as ``+inf``: simply "worse".
    """

    def step(alpha: jax.Array) -> Any:
        return optax.tree.cast_like(optax.tree.scale(alpha, direction), direction)

    def phi(alpha: jax.Array) -> jax.Array:
        f = jnp.asarray(loss(optax.apply_updates(params, step(alpha))), dtype)
        return jnp.where(jnp.isfinite(f), f, jnp.inf)

    return step, phi


def scalar_dtype(params: Any) -> jnp.dtype:
    """Dtype for step sizes and values: float64 for float64 params, else float32.

    Half-precision params still get float32 scalars: bfloat16 has an 8-bit
    mantissa, too coarse to shrink a golden-section bracket or to form a CG
    ``beta`` from dot products without losing it to rounding.
    """
    leaves = jax.tree.leaves(params)
    dtype = jnp.result_type(*leaves) if leaves else jnp.float32
    return jnp.promote_types(jnp.real(jnp.empty((), dtype)).dtype, jnp.float32)


def vdot(x: Any, y: Any, dtype: jnp.dtype) -> jax.Array:
    """Tree inner product accumulated in ``dtype`` (see :func:`scalar_dtype`)."""
    return optax.tree.vdot(optax.tree.cast(x, dtype), optax.tree.cast(y, dtype))


def all_finite(*trees: Any) -> jax.Array:
    """Whether every leaf of every tree is finite (``None`` trees are skipped).

    One boolean for the step: a loss value and its gradient, say. Integer
    leaves are always finite.

    Each leaf is checked through its largest magnitude, which is finite only
    if every element is (a NaN or an infinity carries through ``max``): one
    float reduction. ``jnp.all(jnp.isfinite(x))`` gives the same answer, but
    XLA's CPU backend writes its params-sized mask of booleans to memory
    first; inside CG's line search that mask and the buffers it kept apart
    were 1.25 params-sized arrays of scratch memory (BENCHMARKS.md section 1).
    """
    leaves = [x for tree in trees if tree is not None for x in jax.tree.leaves(tree)]
    parts = []
    for x in leaves:
        x = jnp.asarray(x)
        if jnp.issubdtype(x.dtype, jnp.complexfloating):
            parts += [x.real, x.imag]
        elif jnp.issubdtype(x.dtype, jnp.inexact):
            parts.append(x)
    checks = [jnp.isfinite(jnp.max(jnp.abs(part), initial=0)) for part in parts]
    return jnp.all(jnp.stack(checks)) if checks else jnp.asarray(True)


def find_node(tree: Any, predicate: Callable[[Any], bool]) -> Any | None:
    """The first node of ``tree`` (depth first) for which ``predicate`` holds.

    Finds a transformation's state inside a chain or wrapper around it.
    """
    for node in jax.tree.leaves(tree, is_leaf=predicate):
        if predicate(node):
            return node
    return None


def is_linesearch_state(node: Any) -> bool:
    """Whether ``node`` is a line search's state (ours or optax's).

    optax's line-search states and ours share the fields ``learning_rate`` and
    ``info``.
    """
    fields = getattr(node, "_fields", ())
    return "learning_rate" in fields and "info" in fields


def find_linesearch_state(opt_state: Any) -> Any | None:
    """The first line-search state inside ``opt_state``, or ``None``.

    Finds the state of this package's line searches or of optax's
    zoom and backtracking searches (they share the fields ``learning_rate``
    and ``info``), wherever it sits: in a :func:`~twophase_optax.conjugate_gradient`
    state, in the second phase of :func:`~twophase_optax.two_phase`, or in a
    chain around either.

    Example:
      >>> import jax.numpy as jnp
      >>> import optax
      >>> import twophase_optax as tpo
      >>> opt = optax.chain(optax.clip(1.0), tpo.two_phase(swap=tpo.swap.manual()))
      >>> state = tpo.find_linesearch_state(opt.init(jnp.zeros(2)))
      >>> type(state).__name__, float(state.value)  # inf: nothing stored yet
      ('SlopeLinesearchState', inf)
    """
    return find_node(opt_state, is_linesearch_state)


def linesearch_evaluations(linesearch_state: Any) -> tuple[jax.Array, jax.Array]:
    """How many trials a line search evaluated, and how many with the gradient.

    Reads this package's searches (``info.num_evaluations``, and the slope
    search's ``info.num_gradients``) and optax's zoom search, which evaluates
    both at every trial; ``(0, 0)`` for ``None`` or a search it does not know.
    Jittable; :func:`twophase_optax.two_phase` sums them in its state.

    Example:
      >>> import jax.numpy as jnp
      >>> import optax
      >>> import twophase_optax as tpo
      >>> f = lambda w: jnp.sum((w - 1.0) ** 2)
      >>> opt = tpo.conjugate_gradient()
      >>> w = jnp.zeros(2)
      >>> _, state = opt.update(2 * (w - 1.0), opt.init(w), w, value=f(w), value_fn=f)
      >>> [int(n) for n in tpo.linesearch_evaluations(tpo.find_linesearch_state(state))]
      [2, 1]
    """
    zero = jnp.asarray(0, jnp.int32)
    info = getattr(linesearch_state, "info", None)
    if hasattr(info, "num_linesearch_steps"):  # optax's zoom search
        steps = jnp.asarray(info.num_linesearch_steps, jnp.int32)
        return steps, steps
    if hasattr(info, "num_evaluations"):
        gradients = getattr(info, "num_gradients", zero)
        return (
            jnp.asarray(info.num_evaluations, jnp.int32),
            jnp.asarray(gradients, jnp.int32),
        )
    return zero, zero
