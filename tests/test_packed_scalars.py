"""Scalars packed into one array per dtype read back exactly, in and out of jit."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import twophase_optax as tpo
from twophase_optax import packed_scalars


def fields():
    return {
        "count": jnp.asarray(7, jnp.int32),
        "flag": jnp.asarray(True),
        "pair": (jnp.asarray(0.25, jnp.float32), jnp.asarray(-3, jnp.int32)),
        "nested": {"x": jnp.asarray(1.5, jnp.float32), "v": jnp.arange(4.0)},
        "nothing": None,
    }


def assert_same(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(x, y)


def test_every_field_reads_back_with_its_dtype_and_structure():
    packed = packed_scalars.pack(fields())
    for name, value in fields().items():
        assert_same(packed.get(name), value)
    assert_same(packed.unpack(), fields())


def test_one_array_per_dtype_and_other_leaves_kept_apart():
    packed = packed_scalars.pack(fields())
    # int32 (count, pair[1]), bool (flag), float32 (pair[0], nested.x)
    assert sorted((str(a.dtype), a.shape) for a in packed.arrays) == [
        ("bool", (1,)),
        ("float32", (2,)),
        ("int32", (2,)),
    ]
    assert [x.shape for x in jax.tree.leaves(packed.rest)] == [(4,)]
    assert len(jax.tree.leaves(packed)) == 4


def test_packing_inside_jit_matches_and_round_trips_through_the_boundary():
    @jax.jit
    def bump(packed):
        f = packed.unpack()
        f["count"] = f["count"] + 1
        return packed_scalars.pack(f)

    packed = packed_scalars.pack(fields())
    bumped = bump(packed)
    assert int(bumped.get("count")) == 8
    assert_same(bumped.get("nested"), fields()["nested"])
    assert jax.tree.structure(bumped) == jax.tree.structure(packed)


def test_two_phase_passes_its_scalars_as_one_array_per_dtype():
    params = {"w": jnp.zeros(5), "b": jnp.zeros(())}
    state = tpo.two_phase().init(params)
    leaves = jax.tree.leaves(state)
    # int32, bool, float32; the line search's stored value (looked up by
    # name); Adam's count; Adam's two moments of w, shared with CG's
    # direction and gradient (b's, scalars, are packed too).
    packed = jax.tree.leaves(state.fields.arrays)
    assert sorted(str(x.dtype) for x in packed) == ["bool", "float32", "int32"]
    assert len(leaves) == 3 + 1 + 1 + 2
    unpacked = jax.tree.leaves(
        [getattr(state, name) for name in ("count", "detection", "second_state")]
    )
    assert any(x.ndim == 0 for x in unpacked)  # read back as scalars
    assert int(state.swap_step) == -1 and not bool(state.in_second_phase)


def test_replace_changes_only_the_named_fields():
    state = tpo.two_phase().init(jnp.zeros(3))
    changed = state._replace(count=jnp.asarray(5, jnp.int32))
    assert int(changed.count) == 5 and int(state.count) == 0
    assert_same(changed.detection, state.detection)
    assert_same(changed.second_state, state.second_state)
    assert changed.first_state is state.first_state
    with pytest.raises(ValueError, match="no fields"):
        state._replace(gn_max=1.0)


def test_value_and_grad_from_state_still_finds_the_stored_gradient():
    # optax's lookup walks the NamedTuple fields down to the line search.
    f = lambda w: jnp.sum((w - 2.0) ** 2)  # noqa: E731
    opt = tpo.two_phase(swap_at=0)
    w, state = jnp.zeros(3), opt.init(jnp.zeros(3))
    value_and_grad = optax.value_and_grad_from_state(f)
    value, grad = value_and_grad(w, state=state)
    updates, state = opt.update(grad, state, w, value=value, value_fn=f)
    w = optax.apply_updates(w, updates)
    stored = optax.tree.get(state, "value")
    assert float(stored) == pytest.approx(float(f(w)))
    np.testing.assert_allclose(optax.tree.get(state, "grad"), jax.grad(f)(w))


def test_a_params_shaped_tree_in_a_packed_field_stays_visible_to_tree_map_params():
    # "mean_grad" over a window keeps the window's gradient sum in the
    # detector's state: it must stay where optax's placeholder marks params.
    params = {"w": jnp.zeros(5), "b": jnp.zeros((2, 3))}
    tx = tpo.two_phase(statistic="mean_grad", window=10)
    state = tx.init(params)
    marked = optax.tree_utils.tree_map_params(
        tx, lambda x: x + 1.0, state, transform_non_params=lambda x: x
    )
    grad_sum = marked.detection.window_grad_sum
    assert jax.tree.structure(grad_sum) == jax.tree.structure(params)
    assert all(bool(jnp.all(x == 1.0)) for x in jax.tree.leaves(grad_sum))
    assert_same(marked.plateau, state.plateau)
