"""tpo.fit with Flax NNX (docs/examples/fit_nnx.py), and the reused value and
gradient under nnx.Optimizer."""

import pathlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import twophase_optax as tpo

nnx = pytest.importorskip("flax.nnx", reason="the recipe is for Flax NNX")
pytest.importorskip("sklearn", reason="the example uses scikit-learn's bundled data")

EXAMPLES = pathlib.Path(__file__).parents[2] / "docs" / "examples"


@pytest.fixture(scope="module")
def example():
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(EXAMPLES))
        import fit_nnx

        result, model = fit_nnx.breast_cancer(epochs=30)
        from fit_sklearn import split
        from sklearn import datasets

        train, held_out = split(*datasets.load_breast_cancer(return_X_y=True))
    return result, model, train, held_out


def test_the_second_phase_sees_one_deterministic_full_batch_loss(example):
    result, _, _, _ = example
    assert result.swap_epoch is not None and result.swap_epoch < 30
    second = [r["train_loss"] for r in result.history if r["phase"] == 2]
    # Dropout off and BatchNorm on the whole training set: every step's line
    # search lowers the same function, so the recorded losses never rise.
    assert len(second) >= 2
    assert all(b <= a for a, b in zip(second[:-1], second[1:], strict=True))
    first = [r["train_loss"] for r in result.history if r["phase"] == 1]
    assert second[-1] < min(first)


def test_batchnorm_is_set_to_the_training_sets_statistics(example):
    _, model, train, held_out = example
    hidden = model.hidden(train["x"])
    np.testing.assert_allclose(model.norm.mean[...], hidden.mean(0), atol=1e-5)
    np.testing.assert_allclose(model.norm.var[...], hidden.var(0), rtol=1e-4)
    accuracy = jnp.mean(jnp.argmax(model(held_out["x"]), -1) == held_out["y"])
    assert accuracy > 0.9  # eval mode, with those statistics


def test_value_and_grad_from_state_reuses_under_nnx_optimizer():
    """optax's helper fails on nnx.Optimizer's wrapped state; ours reuses it."""

    class Linear(nnx.Module):
        def __init__(self, rngs):
            self.layer = nnx.Linear(3, 1, rngs=rngs)

        def __call__(self, x):
            return self.layer(x)

    x = jax.random.normal(jax.random.key(0), (32, 3))
    y = x @ jnp.array([[1.0], [-2.0], [0.5]])
    model = Linear(nnx.Rngs(0))
    tx = tpo.two_phase(optax.adam(0.1), swap=tpo.swap.at_step(2))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    graphdef, _, rest = nnx.split(model, nnx.Param, ...)

    def loss_fn(params, x, y):
        return jnp.mean((nnx.merge(graphdef, params, rest)(x) - y) ** 2)

    # A poisoned value_fn shows which branch ran: the stored value, once the
    # line search has stored one, else value_fn's.
    poisoned = tpo.value_and_grad_from_state(lambda p, x, y: 1e3 + loss_fn(p, x, y))
    true = jax.value_and_grad(loss_fn)

    @nnx.jit
    def step(model, optimizer, x, y):
        params = nnx.state(model, nnx.Param)
        reused = poisoned(params, x, y, state=optimizer.opt_state)
        loss, grads = true(params, x, y)
        optimizer.update(model, grads, value=loss, value_fn=loss_fn, x=x, y=y)
        return reused, (loss, grads)

    for i in range(5):
        (value, grad), (loss, grads) = step(model, optimizer, x, y)
        if i <= 2:  # Adam, then the first CG step: nothing stored yet
            assert float(value) == pytest.approx(1e3 + float(loss))
        else:
            assert float(value) == pytest.approx(float(loss), rel=1e-6)
            chex.assert_trees_all_close(grad, grads, rtol=1e-5, atol=1e-6)
