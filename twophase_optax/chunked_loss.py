"""A full-data mean loss evaluated in chunks, in bounded memory.

CG's line search evaluates the loss, and its gradient, on the whole training
set. In one pass that needs memory for the activations of every example at
once; :func:`chunked_loss` evaluates the same mean as a ``jax.lax.map`` over
chunks of the leading axis, each chunk's loss under ``jax.checkpoint``, so
that the backward pass recomputes one chunk's activations at a time.

A chunk takes every ``k``-th row (``k`` the number of chunks), not ``k``
consecutive ones: on a batch sharded over a data axis, each device then holds
its own share of every chunk, and evaluates its own rows chunk by chunk, with
no data moved between devices.
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
    returns the same mean, and its gradient is the full-batch gradient.

    A batch of ``n`` rows is cut into ``k = ceil(n / chunk_size)`` chunks of
    ``n // k`` rows (at most ``chunk_size``), chunk ``j`` holding rows ``j,
    j + k, j + 2k, ...``; the ``n % k`` rows left over (fewer than ``k``) are
    one more, smaller evaluation. The chunks' means are weighted by their
    rows, so the mean is exact, with no padding. Each chunk is rematerialised
    in the backward pass (``jax.checkpoint``), so the activations of one chunk
    are live at a time. Losses in bfloat16 or float16 are summed in float32.

    On a batch sharded over a data axis of ``d`` devices, each device
    evaluates its own rows of every chunk when ``n`` is a multiple of ``k *
    d`` (no data moves; the result equals the unsharded one to rounding);
    otherwise it is still exact, and XLA moves the rows it needs.

    Args:
      loss_fn: the per-batch mean loss, ``params`` first.
      chunk_size: the most rows per chunk, an integer >= 1.

    Returns:
      A function with ``loss_fn``'s signature, for ``value_fn`` of
      :func:`twophase_optax.conjugate_gradient`, :func:`twophase_optax.two_phase`
      and the line searches, or for ``jax.value_and_grad``.

    Raises:
      ValueError: for a ``chunk_size`` that is not an integer >= 1, or, when
        called, for arguments with no array to chunk.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> import twophase_optax as tpo
      >>> loss = lambda w, x, y: jnp.mean((x @ w - y) ** 2)
      >>> x = jax.random.normal(jax.random.key(0), (1000, 3))
      >>> y = x @ jnp.array([1.0, -2.0, 0.5])
      >>> w = jnp.zeros(3)
      >>> whole = jax.value_and_grad(loss)(w, x, y)
      >>> chunked = jax.value_and_grad(tpo.chunked_loss(loss, 256))(w, x, y)
      >>> bool(jnp.allclose(chunked[0], whole[0], rtol=1e-6))  # 4 chunks of 250
      True
      >>> bool(jnp.allclose(chunked[1], whole[1], rtol=1e-5))
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
        num_chunks = -(-n // chunk_size)
        rows, rest = divmod(n, num_chunks)

        def loss_on(params: Any, parts: list[Any]) -> jax.Array:
            it = iter(parts)
            filled = [
                next(it) if b else x for x, b in zip(leaves, batched, strict=True)
            ]
            chunk_args, chunk_kwargs = jax.tree.unflatten(treedef, filled)
            return loss_fn(params, *chunk_args, **chunk_kwargs)

        batch = [x for x, b in zip(leaves, batched, strict=True) if b]

        # Row i * num_chunks + j is row i of chunk j.
        if rest:
            # Gathered from the whole batch: slicing off the rest first would
            # copy it.
            def rows_of(x: jax.Array, j: jax.Array) -> jax.Array:
                index = j + num_chunks * jnp.arange(rows)
                return jnp.take(x, index, axis=0, indices_are_sorted=True)

            source = batch
        else:
            # A view of each array; sharded, each device holds its own rows.
            def rows_of(x: jax.Array, j: jax.Array) -> jax.Array:
                return jax.lax.dynamic_index_in_dim(x, j, 1, keepdims=False)

            source = [x.reshape(rows, num_chunks, *x.shape[1:]) for x in batch]

        @jax.checkpoint
        def chunk_loss(params: Any, source: list[Any], j: jax.Array) -> jax.Array:
            return loss_on(params, [rows_of(x, j) for x in source])

        means = jax.lax.map(
            lambda j: chunk_loss(params, source, j), jnp.arange(num_chunks)
        )
        dtype = means.dtype
        # bfloat16 and float16 losses add up in float32, float64 in float64.
        acc = jnp.promote_types(dtype, jnp.float32)
        total = jnp.sum(means.astype(acc)) * rows
        if rest:
            last = jax.checkpoint(loss_on)(
                params, [x[rows * num_chunks :] for x in batch]
            )
            total = total + last.astype(acc) * rest
        return (total / n).astype(dtype)

    return chunked
