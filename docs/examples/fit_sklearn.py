"""tpo.fit on scikit-learn's breast cancer and diabetes data: an MLP, one call each.

    python docs/examples/fit_sklearn.py

Breast cancer is a classification (cross-entropy, the default fit-or-plateau
swap rule, which counts misclassified examples); diabetes a regression (mean
squared error on standardised targets, the plateau rule). Each keeps the
params with the lowest validation loss.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn import datasets

import twophase_optax as tpo


def split(x: np.ndarray, y: np.ndarray, seed: int = 0):
    """Standardised features; 80% to train, 20% held out."""
    order = np.random.default_rng(seed).permutation(len(x))
    x = (x - x.mean(0)) / x.std(0)
    cut = int(0.8 * len(x))
    train, held_out = order[:cut], order[cut:]
    return (
        {"x": jnp.asarray(x[train], jnp.float32), "y": jnp.asarray(y[train])},
        {"x": jnp.asarray(x[held_out], jnp.float32), "y": jnp.asarray(y[held_out])},
    )


def mlp(key: jax.Array, sizes: list[int]) -> list[dict]:
    keys = jax.random.split(key, len(sizes) - 1)
    return [
        {"w": jax.random.normal(k, (m, n)) / np.sqrt(m), "b": jnp.zeros(n)}
        for k, m, n in zip(keys, sizes[:-1], sizes[1:], strict=True)
    ]


def forward(params: list[dict], x: jax.Array) -> jax.Array:
    for layer in params[:-1]:
        x = jnp.tanh(x @ layer["w"] + layer["b"])
    return x @ params[-1]["w"] + params[-1]["b"]


def breast_cancer(epochs: int = 60) -> tpo.FitResult:
    train, held_out = split(*datasets.load_breast_cancer(return_X_y=True))

    def loss_fn(params, batch):
        logits = forward(params, batch["x"])
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])
        return jnp.mean(loss), logits

    def num_errors(logits, batch):
        return jnp.sum(jnp.argmax(logits, -1) != batch["y"])

    return tpo.fit(
        loss_fn,
        mlp(jax.random.key(0), [30, 32, 2]),
        train,
        batch_size=32,
        epochs=epochs,
        key=jax.random.key(1),
        tx=tpo.two_phase(
            optax.adam(1e-2),
            swap=tpo.swap.default(steps_per_epoch=len(train["y"]) // 32, epochs=epochs),
        ),
        has_aux=True,
        num_errors=num_errors,
        validation=held_out,
        keep="best",
    )


def diabetes(epochs: int = 60) -> tpo.FitResult:
    x, y = datasets.load_diabetes(return_X_y=True)
    train, held_out = split(x, (y - y.mean()) / y.std())

    def loss_fn(params, batch):
        return jnp.mean((forward(params, batch["x"])[:, 0] - batch["y"]) ** 2)

    return tpo.fit(
        loss_fn,
        mlp(jax.random.key(0), [10, 32, 1]),
        train,
        batch_size=32,
        epochs=epochs,
        key=jax.random.key(1),
        tx=tpo.two_phase(
            optax.adam(1e-2),
            swap=tpo.swap.per_window(tpo.swap.plateau(), steps=len(train["y"]) // 32),
        ),
        validation=held_out,
        keep="best",
    )


def main() -> dict[str, tpo.FitResult]:
    results = {"breast cancer": breast_cancer(), "diabetes": diabetes()}
    for name, result in results.items():
        last = result.history[-1]
        best = result.history[result.best_epoch]
        print(
            f"{name}: swap before epoch {result.swap_epoch}, "
            f"train loss {last['train_loss']:.3g}, "
            f"best validation loss {best['validation_loss']:.3g} "
            f"(epoch {result.best_epoch}), "
            f"{last['forward_passes']:.0f} forward-pass equivalents"
        )
    return results


if __name__ == "__main__":
    main()
