"""tpo.fit with a Flax NNX model that has BatchNorm and Dropout.

    python docs/examples/fit_nnx.py

``nnx.split`` separates the trainable parameters from the rest of the model
(BatchNorm's running statistics, here); ``tpo.fit`` trains the parameters as a
plain pytree, and the loss rebuilds the model with ``nnx.merge``. What each
phase sees:

* Dropout: with ``loss_takes_key=True`` the loss gets a fresh key at every
  first-phase step and ``key=None`` in the second phase and on the validation
  data, where the model runs without dropout: the line search compares values
  of one deterministic function.
* BatchNorm: the loss runs it in training mode, so it normalises with the
  statistics of what it is given: each mini-batch in the first phase, the whole
  training set in the second (do not combine it with ``chunk_size``, which
  would normalise each chunk by itself), the validation set on the validation
  data. Its running averages are not trained; :func:`population_statistics`
  sets them afterwards to the training set's, the statistics the second phase
  trained with, for predictions in ``model.eval()`` mode.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from fit_sklearn import split  # docs/examples/fit_sklearn.py
from flax import nnx
from sklearn import datasets

import twophase_optax as tpo


class Net(nnx.Module):
    def __init__(self, features: int, rngs: nnx.Rngs):
        self.hidden = nnx.Linear(features, 32, rngs=rngs)
        self.norm = nnx.BatchNorm(32, rngs=rngs)
        self.drop = nnx.Dropout(0.2)
        self.out = nnx.Linear(32, 2, rngs=rngs)

    def __call__(self, x: jax.Array, key: jax.Array | None = None) -> jax.Array:
        x = jax.nn.relu(self.norm(self.hidden(x)))
        return self.out(self.drop(x, deterministic=key is None, rngs=key))


def population_statistics(model: Net, x: jax.Array) -> Net:
    """BatchNorm's running averages set to the statistics of ``x``."""
    momentum = model.norm.momentum
    model.norm.momentum = 0.0  # the new average is this pass's statistics
    model(x)
    model.norm.momentum = momentum
    model.eval()
    return model


def breast_cancer(epochs: int = 40) -> tuple[tpo.FitResult, Net]:
    train, held_out = split(*datasets.load_breast_cancer(return_X_y=True))
    model = Net(train["x"].shape[1], nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss_fn(params, batch, key):
        # copy=True: BatchNorm's update of its running statistics goes to a
        # copy made inside the trace, not to `rest`.
        logits = nnx.merge(graphdef, params, rest, copy=True)(batch["x"], key)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])
        return jnp.mean(loss), logits

    def num_errors(logits, batch):
        return jnp.sum(jnp.argmax(logits, -1) != batch["y"])

    result = tpo.fit(
        loss_fn,
        params,
        train,
        batch_size=32,
        epochs=epochs,
        key=jax.random.key(1),
        tx=tpo.two_phase(
            optax.adam(1e-2),
            swap=tpo.swap.default(steps_per_epoch=len(train["y"]) // 32, epochs=epochs),
        ),
        has_aux=True,
        loss_takes_key=True,
        num_errors=num_errors,
        validation=held_out,
    )
    nnx.update(model, result.params)
    return result, population_statistics(model, train["x"])


if __name__ == "__main__":
    result, model = breast_cancer()
    _, held_out = split(*datasets.load_breast_cancer(return_X_y=True))
    accuracy = jnp.mean(jnp.argmax(model(held_out["x"]), -1) == held_out["y"])
    print(
        f"swap before epoch {result.swap_epoch}, "
        f"train loss {result.history[-1]['train_loss']:.3g}, "
        f"held-out accuracy {float(accuracy):.3f}"
    )
