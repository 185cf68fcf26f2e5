"""The Lanczos curvature probe against numpy's eigenvalues of an explicit Hessian."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from twophase_optax import curvature


def small_network_loss(params):
    """A non-convex loss of a 2-layer tanh network on fixed data (pytree params)."""
    x = jnp.sin(jnp.arange(120.0)).reshape(40, 3)
    y = jnp.sin(x.sum(axis=1, keepdims=True))
    h = jnp.tanh(x @ params["w1"] + params["b1"])
    return jnp.mean((h @ params["w2"] - y) ** 2)


def small_params(dtype):
    k1, k2 = jax.random.split(jax.random.key(3))
    return {
        "w1": jax.random.normal(k1, (3, 4), dtype),
        "b1": jnp.full((4,), 0.1, dtype),
        "w2": jax.random.normal(k2, (4, 1), dtype),
    }


def explicit_spectrum(loss_fn, params):
    flat, unravel = ravel_pytree(params)
    hessian = jax.hessian(lambda x: loss_fn(unravel(x)))(flat)
    return np.linalg.eigvalsh(np.asarray(hessian, np.float64))


def test_full_lanczos_reproduces_numpys_spectrum_in_float64():
    with jax.enable_x64(True):
        params = small_params(jnp.float64)
        spectrum = explicit_spectrum(small_network_loss, params)
        assert spectrum[0] < 0 < spectrum[-1]  # a non-convex point
        result = curvature.hessian_extremes(small_network_loss, params, 20)
        # The network's Hessian has a repeated eigenvalue (0, from its
        # symmetries), so Lanczos meets an invariant subspace after as many
        # steps as there are distinct eigenvalues: it finds every one of them,
        # and the rows after it hold values inside the spectrum.
        ritz = np.asarray(result.ritz_values)
        nearest = np.abs(spectrum[:, None] - ritz[None, :]).min(axis=1)
        assert nearest.max() < 1e-9
        assert spectrum[0] - 1e-9 <= ritz.min() and ritz.max() <= spectrum[-1] + 1e-9
        assert float(result.lambda_min) == pytest.approx(spectrum[0], rel=1e-9)
        assert float(result.lambda_max) == pytest.approx(spectrum[-1], rel=1e-9)


def test_few_iterations_bound_the_extremes_from_inside_in_float32():
    params = small_params(jnp.float32)
    spectrum = explicit_spectrum(small_network_loss, params)
    result = jax.jit(lambda p: curvature.hessian_extremes(small_network_loss, p, 10))(
        params
    )
    scale = spectrum[-1] - spectrum[0]
    # Ritz values lie inside the spectrum and the extremes converge first.
    assert spectrum[0] - 1e-4 * scale <= float(result.lambda_min)
    assert float(result.lambda_max) <= spectrum[-1] + 1e-4 * scale
    assert float(result.lambda_max) == pytest.approx(spectrum[-1], rel=1e-3)
    assert result.lambda_min.dtype == jnp.float32


def test_an_invariant_subspace_ends_the_iteration_without_spurious_values():
    # The Hessian is diag(2, 2, 2, 6): from a start vector Lanczos sees two
    # distinct eigenvalues and stops; the extremes must still be 2 and 6.
    loss = lambda w: jnp.sum(w[:3] ** 2) + 3.0 * w[3] ** 2  # noqa: E731
    result = curvature.hessian_extremes(loss, jnp.ones(4), 4)
    assert float(result.lambda_min) == pytest.approx(2.0, rel=1e-5)
    assert float(result.lambda_max) == pytest.approx(6.0, rel=1e-5)


def test_hessian_vector_product_matches_the_explicit_hessian():
    params = small_params(jnp.float32)
    flat, unravel = ravel_pytree(params)
    hessian = jax.hessian(lambda x: small_network_loss(unravel(x)))(flat)
    vector = jax.random.normal(jax.random.key(5), flat.shape)
    product = curvature.hessian_vector_product(
        small_network_loss, params, unravel(vector)
    )
    np.testing.assert_allclose(
        ravel_pytree(product)[0], hessian @ vector, rtol=1e-4, atol=1e-5
    )


def test_the_probe_compiles_once_for_new_parameters():
    @jax.jit
    @chex.assert_max_traces(n=1)
    def probe(params):
        return curvature.hessian_extremes(small_network_loss, params, 5)

    probe(small_params(jnp.float32))
    probe(jax.tree.map(lambda x: x + 1.0, small_params(jnp.float32)))


@pytest.mark.parametrize("bad", [0, 21, 2.5])
def test_bad_iteration_counts_raise(bad):
    with pytest.raises(ValueError, match="num_iterations"):
        curvature.hessian_extremes(small_network_loss, small_params(jnp.float32), bad)
