"""The chunked loss on a batch sharded over 8 devices; prints a JSON summary.

Started by tests/library/test_chunked_loss.py in a subprocess whose XLA_FLAGS simulate
8 CPU devices. For each chunk size it compares the sharded chunked value and
gradient with the single-device one-pass ones (float64), and reports whether
the compiled program gathers the batch (it should not where the rows are a
multiple of chunks x devices).
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec

import twophase_optax as tpo


def loss(params, images, labels):
    hidden = jnp.tanh(images @ params["w1"] + params["b1"])
    return jnp.mean((hidden @ params["w2"] - labels) ** 2)


def relative_error(a, b):
    a, b = jax.tree.leaves(a), jax.tree.leaves(b)
    return max(
        float(jnp.max(jnp.abs(x - y)) / jnp.max(jnp.abs(y)))
        for x, y in zip(a, b, strict=True)
    )


def main():
    # In main, not at import: the test run imports every module for doctests.
    jax.config.update("jax_enable_x64", True)
    devices = jax.devices()
    mesh = Mesh(np.asarray(devices), ("data",))
    rng = np.random.default_rng(0)
    n = 960
    images = rng.normal(size=(n, 12))
    labels = np.sin(images[:, :3])
    params = {
        "w1": rng.normal(size=(12, 24)) / 12**0.5,
        "b1": np.zeros(24),
        "w2": rng.normal(size=(24, 3)) / 24**0.5,
    }
    whole = jax.jit(jax.value_and_grad(loss))(params, images, labels)
    batch = NamedSharding(mesh, PartitionSpec("data"))
    sharded_images = jax.device_put(images, batch)
    sharded_labels = jax.device_put(labels, batch)
    cases = []
    # Aligned (rows = chunks x 8 x m): 120 (8 chunks of 120), 64 (15 of 64),
    # 100 (10 of 96). Not aligned: 15 (64 chunks of 15), 7 (138 of 6, rest 12).
    for chunk_size in (120, 64, 100, 15, 7):
        num_chunks = -(-n // chunk_size)
        f = jax.jit(jax.value_and_grad(tpo.chunked_loss(loss, chunk_size)))
        compiled = f.lower(params, sharded_images, sharded_labels).compile()
        value, grad = f(params, sharded_images, sharded_labels)
        cases.append(
            {
                "chunk_size": chunk_size,
                "aligned": n % (num_chunks * len(devices)) == 0,
                "value_rel_err": relative_error(value, whole[0]),
                "grad_rel_err": relative_error(grad, whole[1]),
                "batch_sharded": len(sharded_images.sharding.device_set) == 8,
                "all_gather": "all-gather" in compiled.as_text(),
            }
        )
    print(json.dumps({"devices": len(devices), "cases": cases}))


if __name__ == "__main__":
    main()
