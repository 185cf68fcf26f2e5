"""VGG5's value and gradient, ``nnx.Conv`` against matrix products, in and out of loops.

    python -m experiments.benchmarks.conv_in_loop [--quick] [--out FILE.json]

CG's line search evaluates the loss and its gradient inside a
``jax.lax.while_loop``, and ``two_phase`` runs each phase inside a
``jax.lax.cond``. XLA's CPU backend runs the gradient of a convolution several
times slower inside such a body than in straight-line code
(jax-ml/jax#12868). This script times, for VGG5 on the digits' training set,
one value and gradient of the softmax + MSE loss computed four ways:

* ``straight``: at the top level of a jitted function;
* ``in while_loop``: as the body of a one-trip ``while_loop``;
* ``in cond``: as the taken branch of a ``cond``;
* ``mini-batches``: at the top level, on batches of 64, summed over the
  epoch's batches (what Adam pays per epoch for its gradients);

and each with the convolutions of ``nnx.Conv`` (XLA's convolution) and of
:func:`experiments.models.conv_as_matmul` (the nine shifted inputs times the
reshaped kernel, which VGG5 uses). Times are medians of ``--repeats`` calls,
round-robin, after a warm-up; compile time is reported apart. The last column
divides ``nnx.Conv``'s time by the matrix product's.
"""

from __future__ import annotations

import argparse
import pathlib

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from experiments import data as data_lib
from experiments import models
from experiments.benchmarks import timing

CONVOLUTIONS = ("nnx.Conv", "matmul")
PLACES = ("straight", "in while_loop", "in cond", "mini-batches")


class XlaConvVGG5(models.VGG5):
    """VGG5 with the same parameters, its convolutions through ``nnx.Conv``."""

    def convolve(self, conv: nnx.Conv, x: jax.Array) -> jax.Array:
        return conv(x)


def loss_and_params(convolution: str, dataset: data_lib.Dataset):
    cls = XlaConvVGG5 if convolution == "nnx.Conv" else models.VGG5
    model = cls(dataset.image_shape, dataset.num_classes, rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(params, images, labels):
        outputs = nnx.merge(graphdef, params, rest)(images)
        return models.softmax_mse_loss(outputs, labels)

    return loss, params


def candidates(convolution: str, dataset: data_lib.Dataset, images, labels, batch):
    """The four places, each a function and its arguments."""
    loss, params = loss_and_params(convolution, dataset)
    value_and_grad = jax.value_and_grad(loss)

    def in_while_loop(params, images, labels):
        def body(carry):
            trips = carry[0]
            return trips + 1, *value_and_grad(params, images, labels)

        zero = (jnp.zeros((), jnp.float32), optax.tree.zeros_like(params))
        return jax.lax.while_loop(lambda c: c[0] < 1, body, (0, *zero))[1:]

    def in_cond(params, images, labels, take):
        zero = (jnp.zeros((), jnp.float32), optax.tree.zeros_like(params))
        return jax.lax.cond(
            take,
            lambda p: value_and_grad(p, images, labels),
            lambda p: zero,
            params,
        )

    n = len(labels) // batch * batch
    batched_images = images[:n].reshape(-1, batch, *images.shape[1:])
    batched_labels = labels[:n].reshape(-1, batch)

    def batches(params, batched_images, batched_labels):
        # One value and gradient per batch, both summed and returned (so that
        # no gradient is left for XLA to drop); the per-batch calls stay at
        # the top level (a Python loop, unrolled).
        total = (jnp.zeros((), jnp.float32), optax.tree.zeros_like(params))
        for k in range(batched_images.shape[0]):
            value, grad = value_and_grad(params, batched_images[k], batched_labels[k])
            total = (total[0] + value, optax.tree.add(total[1], grad))
        return total

    return {
        "straight": (value_and_grad, (params, images, labels)),
        "in while_loop": (in_while_loop, (params, images, labels)),
        "in cond": (in_cond, (params, images, labels, jnp.asarray(True))),
        "mini-batches": (batches, (params, batched_images, batched_labels)),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny run, smoke test")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", type=pathlib.Path, default=None)
    args = parser.parse_args(argv)
    data = data_lib.load("digits")
    images, labels = jnp.asarray(data.x_train), jnp.asarray(data.y_train)
    batch = 64
    if args.quick:
        images, labels, batch, args.repeats = images[:128], labels[:128], 32, 2
    funcs, compile_s, values = {}, {}, {}
    for convolution in CONVOLUTIONS:
        places = candidates(convolution, data, images, labels, batch)
        for place, (fn, fn_args) in places.items():
            executable, seconds = timing.compiled(fn, *fn_args)
            funcs[(convolution, place)] = (executable, fn_args)
            compile_s[(convolution, place)] = seconds
            out = executable(*fn_args)
            values[(convolution, place)] = float(jax.tree.leaves(out)[0])
    medians = timing.interleaved_medians(
        {f"{c}|{p}": funcs[(c, p)] for c, p in funcs}, args.repeats, inner=1
    )
    rows, table = [], []
    for place in PLACES:
        xla, matmul = (medians[f"{c}|{place}"] for c in CONVOLUTIONS)
        rows.append(
            {
                "place": place,
                "nnx_conv_seconds": xla,
                "matmul_seconds": matmul,
                "ratio": xla / matmul,
                "compile_seconds": {c: compile_s[(c, place)] for c in CONVOLUTIONS},
                "values": {c: values[(c, place)] for c in CONVOLUTIONS},
            }
        )
        table.append(
            [
                place,
                f"{xla * 1e3:.1f}",
                f"{matmul * 1e3:.1f}",
                f"{xla / matmul:.2f}",
                f"{compile_s[('nnx.Conv', place)]:.1f} / "
                f"{compile_s[('matmul', place)]:.1f}",
            ]
        )
    result = {
        **timing.environment(),
        "images": len(labels),
        "batch": batch,
        "repeats": args.repeats,
        "rows": rows,
    }
    print(f"device: {result['device']} ({result['backend']}), jax {jax.__version__}")
    print(
        f"VGG5 value and gradient on {len(labels)} digits images (mini-batches "
        f"of {batch}); medians of {args.repeats} calls\n"
    )
    print(
        timing.markdown_table(
            [
                "where",
                "nnx.Conv ms",
                "matmul ms",
                "nnx.Conv / matmul",
                "compile s (nnx.Conv / matmul)",
            ],
            table,
        )
    )
    timing.write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
