r"""A curvature probe: the extreme Hessian eigenvalues by Lanczos iteration.

Is the gradient-norm peak a convexity signal? A minimum's neighbourhood is
convex where the Hessian :math:`H` of the loss is positive definite, that is
where its smallest eigenvalue :math:`\lambda_{min} > 0`. The Hessian of a
network is far too large to form, but Lanczos iteration finds its extreme
eigenvalues from a few Hessian-vector products,

.. math::
  H v = \frac{d}{dt} \nabla f(x + t v) \big|_{t=0},

each computed as ``jax.jvp`` of ``jax.grad`` at the cost of about two
gradients. After :math:`k` steps the extreme eigenvalues of the
:math:`k \times k` tridiagonal matrix that Lanczos builds (its Ritz values)
approximate :math:`\lambda_{min}` and :math:`\lambda_{max}` from inside the
spectrum; with :math:`k` equal to the number of parameters they are exact.
The basis is re-orthogonalised on every step (Gram-Schmidt twice), which keeps
the Ritz values free of the spurious copies that plain Lanczos produces in
floating point; it costs :math:`k` params-sized vectors of memory.

The probe is pure and jittable, and knows nothing of models or data: pass a
loss function of the parameters alone (close over a fixed probe batch).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree


class HessianExtremes(NamedTuple):
    """Ritz estimates of the Hessian's extreme eigenvalues.

    Attributes:
      lambda_min: the smallest Ritz value, an upper bound on the smallest
        eigenvalue (exact when ``num_iterations`` is the number of parameters).
      lambda_max: the largest Ritz value, a lower bound on the largest one.
      ritz_values: all ``num_iterations`` Ritz values, in ascending order
        (if the iteration found an invariant subspace early, the rows after
        it repeat the start vector's Rayleigh quotient).
    """

    lambda_min: jax.Array
    lambda_max: jax.Array
    ritz_values: jax.Array


def hessian_vector_product(
    loss_fn: Callable[[Any], jax.Array], params: Any, vector: Any
) -> Any:
    """:math:`H v` for the Hessian of ``loss_fn`` at ``params`` (forward over reverse).

    Example:
      >>> import jax.numpy as jnp
      >>> f = lambda w: w[0] ** 2 + 3.0 * w[0] * w[1]
      >>> hessian_vector_product(f, jnp.zeros(2), jnp.array([1.0, 0.0])).tolist()
      [2.0, 3.0]
    """
    return jax.jvp(jax.grad(loss_fn), (params,), (vector,))[1]


def hessian_extremes(
    loss_fn: Callable[[Any], jax.Array],
    params: Any,
    num_iterations: int = 20,
    *,
    key: jax.Array | None = None,
) -> HessianExtremes:
    """Estimates the smallest and largest Hessian eigenvalue of ``loss_fn``.

    Args:
      loss_fn: the loss as a function of the parameters alone (a pytree).
      params: where to take the Hessian.
      num_iterations: Lanczos steps ``k`` (Hessian-vector products), at least
        1 and at most the number of parameters. The extreme Ritz values
        converge first; 20 to 40 usually pin them to a few per cent.
      key: random key for the start vector (default ``jax.random.key(0)``).

    Returns:
      A :class:`HessianExtremes`, computed in the params' dtype (float32 for
      half-precision params).

    Example:
      >>> import jax.numpy as jnp
      >>> f = lambda w: 0.5 * (4.0 * w[0] ** 2 - w[1] ** 2 + 2.0 * w[2] ** 2)
      >>> result = hessian_extremes(f, jnp.ones(3), num_iterations=3)
      >>> round(float(result.lambda_min), 4), round(float(result.lambda_max), 4)
      (-1.0, 4.0)
    """
    flat, unravel = ravel_pytree(params)
    size = flat.size
    if not (isinstance(num_iterations, int) and 1 <= num_iterations <= size):
        raise ValueError(
            f"num_iterations must be an integer in [1, {size}] (the number of "
            f"parameters), got {num_iterations!r}."
        )
    dtype = jnp.promote_types(flat.dtype, jnp.float32)
    flat = flat.astype(dtype)
    key = jax.random.key(0) if key is None else key

    def hvp(v):
        product = hessian_vector_product(
            lambda x: loss_fn(unravel(x)), flat, v.astype(flat.dtype)
        )
        return product.astype(dtype)

    start = jax.random.normal(key, (size,), dtype)
    start = start / jnp.linalg.norm(start)
    basis = jnp.zeros((num_iterations, size), dtype).at[0].set(start)
    alphas = jnp.zeros(num_iterations, dtype)
    betas = jnp.zeros(num_iterations, dtype)  # betas[i] couples q_i and q_{i+1}

    def step(i, carry):
        basis, alphas, betas = carry
        q = basis[i]
        w = hvp(q)
        alpha = jnp.vdot(w, q)
        # Full re-orthogonalisation against every vector so far (rows past i
        # are zero), twice: "twice is enough" (Giraud et al. 2005).
        for _ in range(2):
            w = w - basis.T @ (basis @ w)
        beta = jnp.linalg.norm(w)
        # An invariant subspace (beta ~ 0) ends the recurrence: the remaining
        # rows stay zero (see below).
        tiny = beta <= jnp.finfo(dtype).eps * jnp.maximum(jnp.abs(alpha), 1.0)
        next_q = jnp.where(tiny, jnp.zeros_like(w), w / jnp.where(tiny, 1.0, beta))
        basis = jax.lax.cond(
            i + 1 < num_iterations,
            lambda b: b.at[i + 1].set(next_q),
            lambda b: b,
            basis,
        )
        return (
            basis,
            alphas.at[i].set(alpha),
            betas.at[i].set(jnp.where(tiny, 0.0, beta)),
        )

    basis, alphas, betas = jax.lax.fori_loop(
        0, num_iterations, step, (basis, alphas, betas)
    )
    # Rows whose Lanczos vector is zero lie past an invariant subspace (the
    # start vector had no component along the rest of the spectrum). They
    # are decoupled; giving them the Rayleigh quotient of the start vector,
    # which lies between the other Ritz values, keeps them off the extremes.
    used = jnp.linalg.norm(basis, axis=1) > 0.5
    coupling = betas[:-1] * used[1:]
    tridiagonal = (
        jnp.diag(jnp.where(used, alphas, alphas[0]))
        + jnp.diag(coupling, 1)
        + jnp.diag(coupling, -1)
    )
    ritz = jnp.linalg.eigvalsh(tridiagonal)
    return HessianExtremes(lambda_min=ritz[0], lambda_max=ritz[-1], ritz_values=ritz)
