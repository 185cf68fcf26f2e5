"""A full-data mean loss evaluated in chunks, in bounded memory.

CG's line search evaluates the loss, and its gradient, on the whole training
set. In one pass that needs memory for the activations of every example at
once; :func:`chunked_loss` evaluates the same mean in a ``jax.lax.scan`` over
chunks of the leading axis. Its derivative (a custom JVP) runs each chunk's
forward and backward pass together and adds up the gradients, so one chunk's
activations are live at a time and a value and gradient costs what it costs
in one pass: nothing is recomputed, as it would be under ``jax.checkpoint``.

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
from jax.custom_derivatives import SymbolicZero


def _directional_derivative(jax_grad: jax.Array, tangent: jax.Array) -> jax.Array:
    r"""The change of a real loss along ``tangent`` from ``jax.grad``'s gradient.

    ``jnp.vdot(g, t)`` for real leaves; for complex ones
    :math:`\operatorname{Re}\sum g t`, since ``jax.grad`` returns the conjugate
    of the gradient of the (real, imaginary) split.
    """
    if jnp.iscomplexobj(jax_grad) or jnp.iscomplexobj(tangent):
        return jnp.real(jnp.sum(jax_grad * tangent))
    return jnp.vdot(jax_grad, tangent)


def chunked_loss(
    loss_fn: Callable[..., jax.Array], chunk_size: int
) -> Callable[..., jax.Array]:
    """``loss_fn``'s mean over the whole batch, evaluated ``chunk_size`` rows at a time.

    ``loss_fn(params, *args, **kwargs)`` must return the mean loss over the
    examples of its batch; the batch is every array in ``args`` and ``kwargs``
    (at any depth of their pytrees) whose leading axis has the length of the
    first such array's. The returned function has the same signature and
    returns the same mean, and its gradient with respect to ``params`` is the
    full-batch gradient (``jax.grad``, ``jax.jvp`` and their compositions,
    such as Hessian-vector products, work; differentiating with respect to
    the other arguments raises ``ValueError``).

    A batch of ``n`` rows is cut into ``k = ceil(n / chunk_size)`` chunks of
    ``n // k`` rows (at most ``chunk_size``), chunk ``j`` holding rows ``j,
    j + k, j + 2k, ...``; the ``n % k`` rows left over (fewer than ``k``) are
    one more, smaller evaluation. The chunks' means are weighted by their
    rows, so the mean is exact, with no padding. Differentiated, each chunk's
    value and gradient are computed together and summed in the loop, so the
    activations of one chunk are live at a time. Losses and gradients in
    bfloat16 or float16 are summed in float32.

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
        batch = [x for x, b in zip(leaves, batched, strict=True) if b]
        others = [x for x, b in zip(leaves, batched, strict=True) if not b]

        def loss_on(params: Any, parts: list[Any], others: list[Any]) -> jax.Array:
            parts_it, others_it = iter(parts), iter(others)
            filled = [next(parts_it) if b else next(others_it) for b in batched]
            chunk_args, chunk_kwargs = jax.tree.unflatten(treedef, filled)
            return loss_fn(params, *chunk_args, **chunk_kwargs)

        # Row i * num_chunks + j is row i of chunk j.
        if rest:
            # Gathered from the whole batch: slicing off the rest first would
            # copy it.
            def rows_of(x: jax.Array, j: jax.Array) -> jax.Array:
                index = j + num_chunks * jnp.arange(rows)
                return jnp.take(x, index, axis=0, indices_are_sorted=True)

            def layout(batch: list[Any]) -> list[Any]:
                return batch
        else:
            # A view of each array; sharded, each device holds its own rows.
            def rows_of(x: jax.Array, j: jax.Array) -> jax.Array:
                return jax.lax.dynamic_index_in_dim(x, j, 1, keepdims=False)

            def layout(batch: list[Any]) -> list[Any]:
                return [x.reshape(rows, num_chunks, *x.shape[1:]) for x in batch]

        def chunks_of(batch: list[Any]):
            """Each chunk's rows (a function of j), and the rest's."""
            source = layout(batch)
            return (
                lambda j: [rows_of(x, j) for x in source],
                [x[rows * num_chunks :] for x in batch],
            )

        dtype = jax.eval_shape(loss_on, params, [x[:rows] for x in batch], others).dtype
        # bfloat16 and float16 losses add up in float32, float64 in float64.
        acc = jnp.promote_types(dtype, jnp.float32)

        @jax.custom_jvp
        def mean(params: Any, batch: list[Any], others: list[Any]) -> jax.Array:
            chunk, last = chunks_of(batch)

            def add(total: jax.Array, j: jax.Array):
                value = loss_on(params, chunk(j), others)
                return total + value.astype(acc), None

            total = jax.lax.scan(add, jnp.zeros((), acc), jnp.arange(num_chunks))[0]
            total = total * rows
            if rest:
                total = total + loss_on(params, last, others).astype(acc) * rest
            return (total / n).astype(dtype)

        def mean_jvp(primals, tangents):
            params, batch, others = primals
            params_tangent, batch_tangent, others_tangent = tangents
            if not all(
                isinstance(t, SymbolicZero)
                for t in jax.tree.leaves((batch_tangent, others_tangent))
            ):
                raise ValueError(
                    "chunked_loss differentiates with respect to params only; "
                    "differentiate loss_fn itself for gradients with respect to "
                    "its other arguments."
                )
            chunk, last = chunks_of(batch)
            value_and_grad = jax.value_and_grad(loss_on)
            grad_dtypes = jax.tree.map(
                lambda p: jnp.promote_types(jnp.result_type(p), jnp.float32), params
            )

            def add(carry, j: jax.Array):
                total, grad_sum = carry
                value, grad = value_and_grad(params, chunk(j), others)
                grad_sum = jax.tree.map(
                    lambda s, g: s + g.astype(s.dtype), grad_sum, grad
                )
                return (total + value.astype(acc), grad_sum), None

            zeros = jax.tree.map(
                lambda p, d: jnp.zeros(jnp.shape(p), d), params, grad_dtypes
            )
            total, grad_sum = jax.lax.scan(
                add, (jnp.zeros((), acc), zeros), jnp.arange(num_chunks)
            )[0]
            total = total * rows
            grad_sum = jax.tree.map(lambda g: g * rows, grad_sum)
            if rest:
                value, grad = value_and_grad(params, last, others)
                total = total + value.astype(acc) * rest
                grad_sum = jax.tree.map(
                    lambda s, g: s + g.astype(s.dtype) * rest, grad_sum, grad
                )
            grad = jax.tree.map(
                lambda g, p: (g / n).astype(jnp.result_type(p)), grad_sum, params
            )
            slope = sum(
                (
                    _directional_derivative(g, t).astype(acc)
                    for g, t in zip(
                        jax.tree.leaves(grad),
                        jax.tree.leaves(params_tangent),
                        strict=True,
                    )
                    if not isinstance(t, SymbolicZero)
                ),
                jnp.zeros((), acc),
            )
            return (total / n).astype(dtype), slope.astype(dtype)

        mean.defjvp(mean_jvp, symbolic_zeros=True)
        return mean(params, batch, others)

    return chunked
