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
import numpy as np
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


def reject_masked_params(name: str, params: Any) -> None:
    """Raises a ``TypeError`` if ``params`` holds ``optax.MaskedNode`` leaves.

    Under ``optax.masked`` or ``optax.partition`` a transformation sees only
    its part of the params, the rest replaced by ``MaskedNode``: a line search
    would call ``value_fn`` on that, which cannot evaluate the loss.
    """
    masked = jax.tree.leaves(
        params, is_leaf=lambda node: isinstance(node, optax.MaskedNode)
    )
    if any(isinstance(node, optax.MaskedNode) for node in masked):
        raise TypeError(
            f"{name} evaluates value_fn, and inside optax.masked or "
            "optax.partition it would get only part of the params "
            "(optax.MaskedNode in place of the rest). Give the optimizer all "
            "the params and zero the gradient of those it must not move: "
            "optax.chain(optax.masked(optax.set_to_zero(), frozen_mask), "
            "tpo.conjugate_gradient())."
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
    r"""The inner product :math:`\operatorname{Re}\langle x, y\rangle` of two trees.

    Accumulated in ``dtype`` (see :func:`scalar_dtype`). On complex leaves it is
    :math:`\operatorname{Re}\sum \bar x y`, the Euclidean inner product of
    their (real, imaginary) pairs: complex params are optimised as the real
    params they stand for, as in optax. Complex leaves accumulate in the
    complex type of ``dtype``'s precision, so no imaginary part is dropped
    before the product. An empty tree gives zero.
    """
    if any(jnp.iscomplexobj(leaf) for leaf in jax.tree.leaves((x, y))):
        complex_dtype = jnp.promote_types(dtype, jnp.complex64)

        def cast(tree: Any) -> Any:
            return jax.tree.map(
                lambda a: jnp.asarray(
                    a, complex_dtype if jnp.iscomplexobj(a) else dtype
                ),
                tree,
            )

        return jnp.real(optax.tree.vdot(cast(x), cast(y))).astype(dtype)
    product = optax.tree.vdot(optax.tree.cast(x, dtype), optax.tree.cast(y, dtype))
    return jnp.asarray(product, dtype)


def descent_gradient(jax_grad: Any) -> Any:
    """The gradient in optax's convention from ``jax.grad``'s: conjugated.

    For a real loss of complex params ``jax.grad`` returns the conjugate of
    the gradient of the (real, imaginary) split, and optax's convention (as
    in its L-BFGS) is that callers conjugate it before handing it to an
    optimizer. Gradients this package computes itself (at a line search's
    trials) are conjugated the same way before they enter an inner product;
    the gradient a search stores for ``optax.value_and_grad_from_state`` is
    left as ``jax.grad`` returns it, since it stands in for that call. The
    identity on real leaves.
    """
    return optax.tree.conj(jax_grad)


def as_number(value: Any, *, integer: bool = False) -> int | float | None:
    """A hyperparameter as a Python number, or ``None`` if it is not one.

    Accepts Python numbers and concrete scalar arrays (NumPy's or JAX's), as
    ``optax.inject_hyperparams`` passes them; with ``integer``, only integer
    ones. Booleans are not numbers here.
    """
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return None if integer else value
    if isinstance(value, (np.ndarray, np.generic, jax.Array)) and np.ndim(value) == 0:
        dtype = np.dtype(value.dtype)
        kinds = (np.integer,) if integer else (np.integer, np.floating)
        if jnp.issubdtype(dtype, np.bool_) or not any(
            jnp.issubdtype(dtype, kind) for kind in kinds
        ):
            return None
        return value.item()
    return None


# What a hyperparameter must be: a test, the words for it, whether integer.
POSITIVE = (lambda x: 0 < x < float("inf"), "a positive finite number", False)
FRACTION = (lambda x: 0 < x < 1, "a number in (0, 1)", False)
COUNT = (lambda x: x >= 1, "an integer >= 1", True)


def check_hyperparameter(
    where: str,
    name: str,
    value: Any,
    test: Callable[[Any], bool],
    words: str,
    integer: bool = False,
) -> None:
    """Raises ``ValueError`` unless ``value`` is a number that passes ``test``.

    A number may arrive as a concrete scalar array (``optax.inject_hyperparams``
    hands the factory arrays). A traced value, as ``inject_hyperparams``
    passes inside a jitted ``update``, cannot be read and is not checked: it
    was checked when the state was made from the same value, outside the
    trace.
    """
    if isinstance(value, jax.core.Tracer) and jnp.ndim(value) == 0:
        return
    number = as_number(value, integer=integer)
    if number is None or not test(number):
        shown = value if number is None else number
        raise ValueError(f"{where}{name} must be {words}, got {shown!r}.")


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


def linesearch_cost(linesearch_state: Any) -> jax.Array:
    """What a line search cost, in forward-pass equivalents over its batch.

    A value costs 1 and a value with its gradient 3 (a forward pass and a
    backward pass of twice its cost), counted from
    :func:`linesearch_evaluations`; float32, jittable. Multiply by the batch's
    share of the training set to count epochs of compute.

    Example:
      >>> import jax.numpy as jnp
      >>> import twophase_optax as tpo
      >>> f = lambda w: jnp.sum((w - 1.0) ** 2)
      >>> opt = tpo.conjugate_gradient()
      >>> w = jnp.zeros(2)
      >>> _, state = opt.update(2 * (w - 1.0), opt.init(w), w, value=f(w), value_fn=f)
      >>> float(tpo.linesearch_cost(tpo.find_linesearch_state(state)))  # 1 + 3
      4.0
    """
    evaluations, gradients = linesearch_evaluations(linesearch_state)
    return (evaluations + 2 * gradients).astype(jnp.float32)
