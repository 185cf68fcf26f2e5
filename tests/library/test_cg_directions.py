"""Each beta rule equals its textbook formula, also on pytrees."""

import jax.numpy as jnp
import numpy as np
import pytest

import twophase_optax as tpo
from twophase_optax import cg_directions

RNG = np.random.default_rng(0)
G, G_PREV, D_PREV = (RNG.standard_normal(7) for _ in range(3))
Y = G - G_PREV

EXPECTED = {
    "fletcher_reeves": G @ G / (G_PREV @ G_PREV),
    "polak_ribiere": G @ Y / (G_PREV @ G_PREV),
    "polak_ribiere_plus": max(G @ Y / (G_PREV @ G_PREV), 0.0),
    "hestenes_stiefel": G @ Y / (D_PREV @ Y),
    "dai_yuan": G @ G / (D_PREV @ Y),
    # Hager & Zhang (2005), eq. (1.2) and their lower bound eta_k (eq. 1.6).
    "hager_zhang": max(
        (Y - 2 * D_PREV * (Y @ Y) / (D_PREV @ Y)) @ G / (D_PREV @ Y),
        -1 / (np.linalg.norm(D_PREV) * min(0.01, np.linalg.norm(G_PREV))),
    ),
}


def as_tree(x):
    """Splits a vector into a nested dict/tuple pytree."""
    return {"a": jnp.asarray(x[:3]), "b": (jnp.asarray(x[3:5]), jnp.asarray(x[5:]))}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_beta_matches_formula(name):
    beta = tpo.BETA_RULES[name](
        jnp.asarray(G), jnp.asarray(G_PREV), jnp.asarray(D_PREV)
    )
    assert float(beta) == pytest.approx(EXPECTED[name], rel=1e-5)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_beta_on_pytree_equals_beta_on_flat_vector(name):
    rule = tpo.BETA_RULES[name]
    flat = rule(jnp.asarray(G), jnp.asarray(G_PREV), jnp.asarray(D_PREV))
    tree = rule(as_tree(G), as_tree(G_PREV), as_tree(D_PREV))
    assert float(tree) == pytest.approx(float(flat), rel=1e-6)


def test_polak_ribiere_plus_clips_negative_beta_to_zero():
    g, g_prev = jnp.array([1.0, 0.0]), jnp.array([2.0, 0.0])  # PR = -1/4
    assert float(tpo.polak_ribiere(g, g_prev, g_prev)) == -0.25
    assert float(tpo.polak_ribiere_plus(g, g_prev, g_prev)) == 0.0


def test_hager_zhang_is_bounded_below_by_eta():
    # d_prev.y = -0.001 makes the unbounded beta about -4e6; the bound
    # eta = -1 / (|d_prev| min(0.01, |g_prev|)) = -1 / (0.01 |d_prev|) binds.
    g, g_prev = jnp.array([1.0, 0.0]), jnp.array([0.0, 1.0])
    d_prev = jnp.array([1.0, 1.001])
    y = g - g_prev
    unbounded = (y - 2 * d_prev * (y @ y) / (d_prev @ y)) @ g / (d_prev @ y)
    eta = float(-1 / (0.01 * jnp.linalg.norm(d_prev)))
    assert unbounded < eta
    assert float(tpo.hager_zhang(g, g_prev, d_prev)) == pytest.approx(eta, rel=1e-6)


def test_hager_zhang_directions_descend_under_any_step():
    # Hager & Zhang's theorem 1.1: g.d <= -7/8 |g|^2 whenever d_prev.y != 0.
    rng = np.random.default_rng(1)
    for _ in range(200):
        g, g_prev, d_prev = (jnp.asarray(rng.standard_normal(5)) for _ in range(3))
        d = -g + tpo.hager_zhang(g, g_prev, d_prev) * d_prev
        assert float(g @ d) <= -0.875 * float(g @ g) + 1e-5


def test_resolve_beta_by_name_and_callable():
    assert cg_directions.resolve_beta("dai_yuan") is tpo.dai_yuan
    custom = lambda g, gp, dp: jnp.asarray(0.5)  # noqa: E731
    assert cg_directions.resolve_beta(custom) is custom


def test_unknown_beta_name_raises_value_error_listing_the_choices():
    with pytest.raises(ValueError, match="polak_ribiere_plus"):
        tpo.conjugate_gradient(beta="polak-ribière")
