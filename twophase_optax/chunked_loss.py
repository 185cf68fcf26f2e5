"""A full-data mean loss evaluated in chunks, in bounded memory.

CG's line search evaluates the loss, and its gradient, on the whole training
set. In one pass that needs memory for the activations of every example at
once; :func:`chunked_loss` evaluates the same mean as a ``jax.lax.map`` over
chunks of the leading axis, each chunk's loss under ``jax.checkpoint``, so
that the backward pass recomputes one chunk's activations at a time.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp


def chunked_loss(
    loss_fn: Callable[..., jax.Array], chunk_size: int
) -> Callable[..., jax.Array]:
    """``loss_fn``'s mean over the whole batch, evaluated ``chunk_size`` rows at a time.

    ``loss_fn(params, *args, **kwargs)`` must return the mean loss over the
    examples of its batch; the batch is every array in ``args`` and ``kwargs``
    (at any depth of their pytrees) whose leading axis has the length of the
    first such array's. The returned function has the same signature and
    returns the same mean: the chunks' means weighted by their sizes, the
    last chunk as long as what is left, so the result is exact (no padding).
    Its gradient is the full-batch gradient, each chunk rematerialised.

    Args:
      loss_fn: the per-batch mean loss, ``params`` first.
      chunk_size: rows per chunk, an integer >= 1.

    Returns:
      A function with ``loss_fn``'s signature, for ``value_fn`` of
      :func:`twophase_optax.conjugate_gradient`, :func:`twophase_optax.two_phase`
      and the line searches, or for ``jax.value_and_grad``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> import twophase_optax as tpo
      >>> loss = lambda w, x, y: jnp.mean((x @ w - y) ** 2)
      >>> x = jax.random.normal(jax.random.key(0), (1000, 3))
      >>> y = x @ jnp.array([1.0, -2.0, 0.5])
      >>> w = jnp.zeros(3)
      >>> whole = loss(w, x, y)
      >>> chunked = tpo.chunked_loss(loss, chunk_size=256)(w, x, y)  # 3 x 256 + 232
      >>> bool(jnp.allclose(chunked, whole, rtol=1e-6))
      True
    """
    if not (
        isinstance(chunk_size, int)
        and not isinstance(chunk_size, bool)
        and chunk_size >= 1
    ):
        raise ValueError(
            f"chunk_size must be an integer >= 1 (rows per chunk), got {chunk_size!r}."
        )
    rematerialised = jax.checkpoint(loss_fn)

    def chunked(params: Any, *args: Any, **kwargs: Any) -> jax.Array:
        leaves, treedef = jax.tree.flatten((args, kwargs))
        sizes = [jnp.shape(x)[0] for x in leaves if jnp.ndim(x) >= 1]
        if not sizes:
            raise ValueError(
                "chunked_loss found no batch: pass the examples as arrays whose "
                "leading axis runs over them."
            )
        n = sizes[0]
        batched = [jnp.ndim(x) >= 1 and jnp.shape(x)[0] == n for x in leaves]
        num_full, rest = divmod(n, chunk_size)

        def loss_of(rows: list[Any]) -> jax.Array:
            it = iter(rows)
            filled = [
                next(it) if b else x for x, b in zip(leaves, batched, strict=True)
            ]
            chunk_args, chunk_kwargs = jax.tree.unflatten(treedef, filled)
            return rematerialised(params, *chunk_args, **chunk_kwargs)

        parts = [x for x, b in zip(leaves, batched, strict=True) if b]
        sums = []  # Each part's loss summed over its rows.
        if num_full:
            full = [
                x[: num_full * chunk_size].reshape(num_full, chunk_size, *x.shape[1:])
                for x in parts
            ]
            sums.append((jax.lax.map(loss_of, full), chunk_size))
        if rest:
            sums.append((loss_of([x[num_full * chunk_size :] for x in parts]), rest))
        dtype = sums[0][0].dtype
        # bfloat16 and float16 losses add up in float32, float64 in float64.
        acc = jnp.promote_types(dtype, jnp.float32)
        total = sum(jnp.sum(m.astype(acc)) * rows for m, rows in sums)
        return (total / n).astype(dtype)

    return chunked
