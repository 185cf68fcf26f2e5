"""The value and gradient a line search already computed, for the next step.

A line search that ends on a trial it evaluated with the gradient (this
package's slope search, optax's zoom search with ``store_grad=True``) stores
that value and gradient in its state; they are the next step's, so the next
step need not compute them again. :func:`value_and_grad_from_state` is
``optax.value_and_grad_from_state`` that also works where optax's does not:

* the state is wrapped leaf by leaf, as ``flax.nnx.Optimizer`` wraps it (each
  array in an ``OptArray`` variable), where optax's version fails with "cond
  branch outputs must have the same pytree structure";
* the search sits anywhere in the state: in :func:`~twophase_optax.two_phase`'s
  second phase, in a chain, beside other states with a ``value`` field.

The stored gradient is handed back in the structure of ``params``, so both
branches of its conditional agree whatever wraps the state.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from twophase_optax import _protocol


def value_and_grad_from_state(
    value_fn: Callable[..., jax.Array],
) -> Callable[..., tuple[jax.Array, Any]]:
    """``jax.value_and_grad(value_fn)`` that reuses what the line search stored.

    Args:
      value_fn: the loss, ``value_fn(params, *args, **kwargs)`` -> scalar.

    Returns:
      ``value_and_grad(params, *args, state, **kwargs)`` -> ``(value, grad)``:
      the value and gradient stored by the line search in ``state`` when it
      holds a finite value (the search's last trial is ``params``), else
      ``jax.value_and_grad(value_fn)(params, *args, **kwargs)``, chosen by a
      ``jax.lax.cond`` (jittable). ``grad`` has the structure of ``params``.

    Raises:
      ValueError: ``state`` holds no line search that stores its gradient.

    Example:
      >>> import jax.numpy as jnp
      >>> import twophase_optax as tpo
      >>> loss = lambda x: jnp.sum((x - 1.0) ** 2)
      >>> opt = tpo.conjugate_gradient()
      >>> params = jnp.zeros(2)
      >>> state = opt.init(params)
      >>> value_and_grad = tpo.value_and_grad_from_state(loss)
      >>> for _ in range(2):
      ...     value, grad = value_and_grad(params, state=state)
      ...     updates, state = opt.update(grad, state, params, value=value,
      ...                                 grad=grad, value_fn=loss)
      ...     params = params + updates
      >>> print(params)
      [1. 1.]
    """
    compute = jax.value_and_grad(value_fn)

    def value_and_grad(params: Any, *args: Any, state: Any, **kwargs: Any):
        search = _protocol.find_linesearch_state(state)
        stored = getattr(search, "grad", None)
        if search is None or stored is None:
            raise ValueError(
                "value_and_grad_from_state: the state holds no line search "
                "that stores its gradient. Pass the state of "
                "tpo.conjugate_gradient(), of tpo.two_phase(...), or of a "
                "chain with optax.scale_by_zoom_linesearch(..., "
                "store_grad=True), as value_and_grad(params, state=state)."
            )
        (value,) = jax.tree.leaves(search.value)  # unwraps wrapped leaves
        structure = jax.tree.structure(params)
        leaves = jax.tree.leaves(stored)
        if len(leaves) != structure.num_leaves:
            raise ValueError(
                "value_and_grad_from_state: the stored gradient has "
                f"{len(leaves)} arrays, params {structure.num_leaves}; pass "
                "the params the state was made for."
            )
        grad = jax.tree.unflatten(structure, leaves)
        return jax.lax.cond(
            jnp.isfinite(value),
            lambda p, a, kw: (jnp.asarray(value), grad),
            lambda p, a, kw: compute(p, *a, **kw),
            params,
            args,
            kwargs,
        )

    return value_and_grad
