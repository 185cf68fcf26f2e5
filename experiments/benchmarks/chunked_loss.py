"""Full-batch CG in bounded memory: the chunked loss's memory and time.

    python -m experiments.benchmarks.chunked_loss [--quick] [--part memory time runs]
        [--models ...] [--chunks 1024 2048 4096 8192] [--time-models vit-mlp vgg5]
        [--time-chunks 256 512 1024 2048] [--out FILE.json]

**Memory.** For every model at the shapes of the paper's datasets (MNIST:
60,000 images of 28x28x1; CIFAR-10: 50,000 of 32x32x3; 10 classes; softmax
+ MSE, float32), the full-batch value and gradient that a CG step evaluates,
compiled on this machine's backend and not run: XLA's memory analysis of the
compiled program (``temp_size_in_bytes``, the working memory beyond the
arguments and outputs) in one pass and as :func:`twophase_optax.chunked_loss`
at each chunk size. The arguments (the images themselves) are reported apart.

**Time.** On the offline datasets (digits, 1,437 training images; mnist5k,
4,000), the full-batch value and gradient, and the value alone, evaluated
inside a ``jax.lax.while_loop`` as the line search runs them (``--trials``
evaluations per call, each at other parameters so that none is hoisted):
median seconds per evaluation over repeats after a warm-up, chunked over one
pass, measured side by side; compile times reported apart.

**Runs.** ``experiments.train``'s two-phase run with the paper's fixed split
(vgg5, Adam for ``--swap-epoch`` epochs, then full-batch CG), in one pass and
in chunks (``--run-chunks``, per dataset): the training loss of every epoch,
its forward passes and the seconds of its steps, side by side.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import twophase_optax as tpo
from experiments import config as config_lib
from experiments import data as data_lib
from experiments import models
from experiments import train as train_lib
from experiments.benchmarks import timing

# name: (training images, image shape, classes)
PAPER_SHAPES = {
    "mnist": (60_000, (28, 28, 1), 10),
    "cifar10": (50_000, (32, 32, 3), 10),
}
GIB = 2**30


def model_loss(model_name: str, dataset: str, image_shape, classes: int):
    """The trainer's mean loss over a batch (softmax + MSE), and the params."""
    model = models.create_model(model_name, dataset, image_shape, classes, seed=0)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    loss_fn = models.LOSSES[models.DEFAULT_LOSS]

    def loss(params, images, labels):
        outputs = nnx.merge(graphdef, nnx.State(params), rest)(images)
        return loss_fn(outputs, labels)

    return loss, nnx.to_pure_dict(params)


def value_and_grad_fn(loss, chunk_size: int | None):
    """The full-batch value and gradient, in one pass (``None``) or in chunks."""
    return jax.value_and_grad(
        loss if chunk_size is None else tpo.chunked_loss(loss, chunk_size)
    )


def memory(model_names, chunks) -> list[dict[str, Any]]:
    rows = []
    for dataset, (n, shape, classes) in PAPER_SHAPES.items():
        images = jax.ShapeDtypeStruct((n, *shape), jnp.float32)
        labels = jax.ShapeDtypeStruct((n,), jnp.int32)
        for name in model_names:
            loss, params = model_loss(name, dataset, shape, classes)
            for chunk in (None, *chunks):
                fn = value_and_grad_fn(loss, chunk)
                executable, seconds = timing.compiled(fn, params, images, labels)
                analysis = executable.memory_analysis()
                rows.append(
                    {
                        "dataset": dataset,
                        "model": name,
                        "chunk_size": chunk,
                        "temp_gib": analysis.temp_size_in_bytes / GIB,
                        "argument_gib": analysis.argument_size_in_bytes / GIB,
                        "compile_seconds": seconds,
                    }
                )
                print(
                    f"{dataset:8s} {name:22s} chunk {chunk or 'none':>5}: "
                    f"temp {rows[-1]['temp_gib']:7.2f} GiB "
                    f"(compiled in {seconds:.1f} s)",
                    flush=True,
                )
    return rows


def in_while_loop(evaluate, trials: int):
    """``trials`` evaluations at shifted parameters inside one while_loop."""

    def run(params, images, labels):
        def body(carry):
            i, total = carry
            shifted = optax.tree.add_scale(params, 1e-4 * i.astype(jnp.float32), params)
            out = evaluate(shifted, images, labels)
            if isinstance(out, tuple):  # The gradient is used, so it is computed.
                value, grad = out
                return i + 1, total + value + 1e-30 * optax.tree.norm(grad)
            return i + 1, total + out

        return jax.lax.while_loop(
            lambda carry: carry[0] < trials, body, (jnp.asarray(0), jnp.asarray(0.0))
        )[1]

    return run


def time_on(dataset: str, model_names, chunks, repeats: int, trials: int):
    data = data_lib.load(dataset)
    images, labels = jnp.asarray(data.x_train), jnp.asarray(data.y_train)
    n = len(labels)
    rows = []
    for name in model_names:
        loss, params = model_loss(name, dataset, data.image_shape, data.num_classes)
        for kind in ("value and gradient", "value"):
            candidates, compile_seconds = {}, {}
            for chunk in (None, *(c for c in chunks if c < n)):
                if kind == "value":
                    fn = loss if chunk is None else tpo.chunked_loss(loss, chunk)
                else:
                    fn = value_and_grad_fn(loss, chunk)
                executable, seconds = timing.compiled(
                    in_while_loop(fn, trials), params, images, labels
                )
                candidates[chunk] = (executable, (params, images, labels))
                compile_seconds[chunk] = seconds
            medians = timing.interleaved_medians(candidates, repeats, inner=1)
            for chunk, seconds in medians.items():
                rows.append(
                    {
                        "dataset": dataset,
                        "model": name,
                        "evaluation": kind,
                        "chunk_size": chunk,
                        "chunks": 1 if chunk is None else -(-n // chunk),
                        "seconds": seconds / trials,
                        "ratio": seconds / medians[None],
                        "compile_seconds": compile_seconds[chunk],
                    }
                )
                print(
                    f"{dataset:8s} {name:22s} {kind:18s} chunk {chunk or 'none':>5}: "
                    f"{seconds / trials * 1e3:8.1f} ms  x{rows[-1]['ratio']:.3f}",
                    flush=True,
                )
    return rows


def runs_on(dataset: str, chunk_sizes, swap_epoch: int, epochs: int, out: pathlib.Path):
    """The same two-phase run in one pass and in chunks; its rows per chunk size."""
    rows = {}
    for chunk_size in (0, *chunk_sizes):
        config = config_lib.Config.of(
            model="vgg5",
            dataset=dataset,
            optimizer="two-phase-fixed",
            swap_epoch=swap_epoch,
            epochs=epochs,
            cg_chunk_size=chunk_size,
            out=str(out / f"{dataset}-chunks-{chunk_size}"),
            label=f"{dataset} chunks of {chunk_size or 'all'}: ",
        )
        rows[chunk_size] = train_lib.train(config)
    return [
        {
            "dataset": dataset,
            "epoch": one["epoch"],
            "phase": one["phase"],
            "chunk_size": chunk_size,
            "train_loss": row["train_loss"],
            "one_pass_loss": one["train_loss"],
            "relative_difference": abs(row["train_loss"] / one["train_loss"] - 1),
            "forward_passes": row["forward_passes"],
            "one_pass_forward_passes": one["forward_passes"],
            "seconds": row["wall_time"],
            "one_pass_seconds": one["wall_time"],
        }
        for chunk_size in chunk_sizes
        for row, one in zip(rows[chunk_size], rows[0], strict=True)
    ]


def runs_table(rows) -> str:
    header = [
        "dataset",
        "chunk size",
        "epoch",
        "phase",
        "loss, one pass",
        "loss, chunks",
        "rel. difference",
        "forward passes (chunks / one pass)",
        "seconds (chunks / one pass)",
    ]
    table = [
        [
            r["dataset"],
            r["chunk_size"],
            r["epoch"],
            "CG" if r["phase"] else "Adam",
            f"{r['one_pass_loss']:.6e}",
            f"{r['train_loss']:.6e}",
            f"{r['relative_difference']:.1e}",
            f"{r['forward_passes']:.0f} / {r['one_pass_forward_passes']:.0f}",
            f"{r['seconds']:.1f} / {r['one_pass_seconds']:.1f}",
        ]
        for r in rows
    ]
    return timing.markdown_table(header, table)


def memory_table(rows, chunks) -> str:
    header = ["dataset", "model", "one pass", *(f"chunks of {c}" for c in chunks)]
    table = []
    for dataset in PAPER_SHAPES:
        for name in dict.fromkeys(r["model"] for r in rows):
            cells = {
                r["chunk_size"]: r["temp_gib"]
                for r in rows
                if r["dataset"] == dataset and r["model"] == name
            }
            if cells:
                table.append(
                    [dataset, name, *(f"{cells[c]:.2f} GiB" for c in (None, *chunks))]
                )
    return timing.markdown_table(header, table)


def time_table(rows) -> str:
    header = ["dataset", "model", "evaluation", "chunk size", "chunks", "ms", "ratio"]
    table = [
        [
            r["dataset"],
            r["model"],
            r["evaluation"],
            r["chunk_size"] or "one pass",
            r["chunks"],
            f"{r['seconds'] * 1e3:.1f}",
            f"{r['ratio']:.3f}",
        ]
        for r in rows
    ]
    return timing.markdown_table(header, table)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument(
        "--part",
        nargs="+",
        choices=("memory", "time", "runs"),
        default=["memory", "time"],
    )
    parser.add_argument("--models", nargs="+", choices=models.IMAGE_MODEL_NAMES)
    parser.add_argument("--chunks", nargs="+", type=int)
    parser.add_argument("--time-chunks", nargs="+", type=int)
    parser.add_argument("--time-models", nargs="+", choices=models.IMAGE_MODEL_NAMES)
    parser.add_argument("--datasets", nargs="+", default=["digits", "mnist5k"])
    parser.add_argument("--repeats", type=int)
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--swap-epoch", type=int, default=10)
    parser.add_argument("--run-epochs", type=int, default=14)
    parser.add_argument(
        "--run-dir", type=pathlib.Path, default=pathlib.Path("runs/chunked_loss")
    )
    parser.add_argument("--out", type=pathlib.Path)
    args = parser.parse_args(argv)
    for flag in ("chunks", "time_chunks"):
        if any(c < 1 for c in getattr(args, flag) or ()):
            parser.error(f"argument --{flag.replace('_', '-')}: sizes must be >= 1")
    model_names = args.models or (("vgg5",) if args.quick else models.IMAGE_MODEL_NAMES)
    time_models = args.time_models or (("vgg5",) if args.quick else ("vit-mlp", "vgg5"))
    chunks = args.chunks or (
        (1024, 8192)
        if args.quick
        else (512, 1024, config_lib.DEFAULT_CG_CHUNK_SIZE, 4096, 8192)
    )
    time_chunks = args.time_chunks or ((256,) if args.quick else (256, 512, 1024, 2048))
    repeats = args.repeats or (2 if args.quick else 5)
    result: dict[str, Any] = {"environment": timing.environment()}
    if "memory" in args.part:
        result["memory"] = memory(model_names, sorted(set(chunks)))
        print(memory_table(result["memory"], sorted(set(chunks))))
    if "time" in args.part:
        result["time"] = []
        for dataset in args.datasets:
            result["time"] += time_on(
                dataset, time_models, sorted(set(time_chunks)), repeats, args.trials
            )
        print(time_table(result["time"]))
    if "runs" in args.part:
        result["runs"] = []
        for dataset in args.datasets:
            # Chunks smaller than the training set (digits 1,437, mnist5k 4,000).
            chunk = 512 if dataset == "digits" else config_lib.DEFAULT_CG_CHUNK_SIZE
            result["runs"] += runs_on(
                dataset, (chunk,), args.swap_epoch, args.run_epochs, args.run_dir
            )
        print(runs_table(result["runs"]))
    timing.write_json(args.out, result)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
