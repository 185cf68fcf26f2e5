"""First-phase time per epoch: ``tpo.fit`` against a hand-written loop and the Trainer.

    python -m experiments.benchmarks.fit_loop [--quick] [--models vit-mlp vgg5 mlp]
        [--epochs 12] [--out FILE.json]

On the offline digits (batch 64, the models of ``experiments/models.py``, the
experiments' loss) three loops run Adam epochs:

* ``hand``: the loop a JAX user writes, one jitted function per epoch that
  shuffles and runs ``optax.adam`` over the mini-batches in a ``lax.scan``;
* ``tpo.fit``: with ``tx=optax.adam(1e-3)`` (the loop alone), and with the
  default ``tx`` (``two_phase`` with ``tpo.swap.default``, reading the same
  forward pass's misclassified examples) before its swap;
* ``Trainer``: ``experiments.train.Trainer.run_epoch``, one Python dispatch
  per step, with its gradient-norm reading and per-step statistics;
* ``one jitted step per batch``: the Trainer's pattern without its
  bookkeeping, host batches fed to a jitted Adam step.

``mlp`` is a model whose step costs less than a dispatch: an MLP of 1,058
params on scikit-learn's breast cancer (569 examples, batch 16), where the
Trainer does not apply.

The loops are interleaved epoch by epoch (``tpo.fit``'s ``callback`` runs
one epoch of each other loop), so drifts of the machine hit them alike; each
``tpo.fit`` is compared with the hand-loop epochs run beside it. Medians over
the epochs after the first; compile time apart. ``tpo.fit`` and the hand loop
leave the last ``n % 64`` shuffled examples out of an epoch, the Trainer runs
them as a last, smaller batch (one step more); the table gives the steps.
``tpo.fit`` with ``optax.adam`` and the hand loop must end on the same params,
bit for bit (checked: they are the same computation).
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import statistics
import time

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

import twophase_optax as tpo
from experiments import config as config_lib
from experiments import data as data_lib
from experiments import trainer as trainer_lib
from experiments.benchmarks import timing

BATCH = 64
LR = 1e-3


def hand_loop(loss_fn, data, n: int, batch_size: int):
    """The hand-written Adam loop: one jitted shuffle-and-scan per epoch."""
    steps = n // batch_size
    tx = optax.adam(LR)

    def epoch(params, opt_state, key):
        order = jax.random.permutation(key, n)[: steps * batch_size]
        batches = jax.tree.map(
            lambda x: x[order].reshape(steps, batch_size, *x.shape[1:]), data
        )

        def step(carry, batch):
            params, opt_state = carry
            value, grad = jax.value_and_grad(loss_fn)(params, batch)
            updates, opt_state = tx.update(grad, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), value

        (params, opt_state), values = jax.lax.scan(step, (params, opt_state), batches)
        return params, opt_state, jnp.mean(values)

    return tx, jax.jit(epoch), steps


def per_step_loop(loss_fn):
    """The Trainer's pattern without its bookkeeping: one jitted step per batch."""
    tx = optax.adam(LR)

    @jax.jit
    def step(params, opt_state, batch):
        value, grad = jax.value_and_grad(loss_fn)(params, batch)
        updates, opt_state = tx.update(grad, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    return tx, step


class Interleaved:
    """The other loops, one epoch each per ``tpo.fit`` epoch (its callback)."""

    def __init__(
        self, params, loss_fn, data, n, key, trainer=None, per_step=False, batch=BATCH
    ):
        tx, self.epoch_fn, self.steps = hand_loop(loss_fn, data, n, batch)
        self.batch = batch
        self.params, self.state, self.key = params, tx.init(params), key
        self.trainer = trainer
        self.compiled = None
        self.compile_seconds = 0.0
        self.hand_seconds: list[float] = []
        self.trainer_seconds: list[float] = []
        self.trainer_compile_seconds = 0.0
        self.epoch = 0
        self.per_step = None
        if per_step:  # host batches, as the Trainer feeds them
            self.host_data = jax.tree.map(np.asarray, data)
            tx, self.step_fn = per_step_loop(loss_fn)
            self.per_step = (params, tx.init(params))
            self.per_step_seconds: list[float] = []
            self.n = n

    def _per_step_epoch(self) -> None:
        params, opt_state = self.per_step
        order = np.random.default_rng(self.epoch).permutation(self.n)
        start = time.perf_counter()
        for i in range(self.steps):
            rows = order[i * self.batch : (i + 1) * self.batch]
            batch = jax.tree.map(lambda x, rows=rows: x[rows], self.host_data)
            params, opt_state, value = self.step_fn(params, opt_state, batch)
        float(value)
        self.per_step_seconds.append(time.perf_counter() - start)
        self.per_step = (params, opt_state)

    def __call__(self, record: dict) -> None:
        args = (self.params, self.state, jax.random.fold_in(self.key, self.epoch))
        if self.compiled is None:
            start = time.perf_counter()
            self.compiled = self.epoch_fn.lower(*args).compile()
            self.compile_seconds = time.perf_counter() - start
        start = time.perf_counter()
        self.params, self.state, loss = self.compiled(*args)
        float(loss)  # waits for the epoch, as tpo.fit does
        self.hand_seconds.append(time.perf_counter() - start)
        if self.per_step is not None:
            if self.epoch == 0:  # compile outside the clock
                params, opt_state = self.per_step
                batch = jax.tree.map(lambda x: x[: self.batch], self.host_data)
                jax.block_until_ready(self.step_fn(params, opt_state, batch))
            self._per_step_epoch()
        if self.trainer is not None:
            row = self.trainer.run_epoch(self.epoch)
            self.trainer_seconds.append(row["epoch_seconds"])
            self.trainer_compile_seconds += row["epoch_compile_seconds"]
        self.epoch += 1


def _median_after_first(values: list[float]) -> float:
    return statistics.median(values[1:] if len(values) > 1 else values)


def measure(model: str, epochs: int, images: int | None) -> dict:
    """The four loops on one of the paper's models, digits, batch 64."""
    config = config_lib.Config.of(
        model=model, optimizer="adam", batch_size=BATCH, lr=LR, progress=False
    )
    trainer = trainer_lib.Trainer(config)
    if images is not None:
        trainer.data = dataclasses.replace(
            trainer.data,
            x_train=trainer.data.x_train[:images],
            y_train=trainer.data.y_train[:images],
        )
    data = {
        "x": jnp.asarray(trainer.data.x_train),
        "y": jnp.asarray(trainer.data.y_train),
    }

    def loss_and_errors(params, batch):
        return trainer.batch_loss_and_errors(params, batch["x"], batch["y"])

    return compare(model, trainer.params, loss_and_errors, data, BATCH, epochs, trainer)


def mlp_case(epochs: int) -> dict:
    """A model whose step costs less than its dispatch: an MLP on breast cancer."""
    from sklearn import datasets

    x, y = datasets.load_breast_cancer(return_X_y=True)
    data = {
        "x": jnp.asarray((x - x.mean(0)) / x.std(0), jnp.float32),
        "y": jnp.asarray(y, jnp.int32),
    }
    keys = jax.random.split(jax.random.key(0))
    params = [
        {"w": jax.random.normal(keys[0], (30, 32)) / 30**0.5, "b": jnp.zeros(32)},
        {"w": jax.random.normal(keys[1], (32, 2)) / 32**0.5, "b": jnp.zeros(2)},
    ]

    def loss_and_errors(params, batch):
        hidden = jnp.tanh(batch["x"] @ params[0]["w"] + params[0]["b"])
        logits = hidden @ params[1]["w"] + params[1]["b"]
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])
        wrong = jnp.argmax(logits, -1) != batch["y"]
        return jnp.mean(loss), jnp.sum(wrong, dtype=jnp.int32)

    return compare("mlp (breast cancer)", params, loss_and_errors, data, 16, epochs)


def compare(name, params, loss_and_errors, data, batch, epochs, trainer=None) -> dict:
    """tpo.fit (adam and default two_phase) against the hand loops, interleaved."""
    n = len(data["y"])
    key = jax.random.key(0)

    def loss_fn(params, batch):
        return loss_and_errors(params, batch)[0]

    kwargs = dict(batch_size=batch, epochs=epochs, key=key)
    # Pass 1: tpo.fit's default two_phase, the hand loops and the Trainer.
    beside_default = Interleaved(
        params, loss_fn, data, n, key, trainer, per_step=True, batch=batch
    )
    default = tpo.fit(
        loss_and_errors,
        params,
        data,
        has_aux=True,
        num_errors=lambda errors, batch: errors,
        callback=beside_default,
        **kwargs,
    )
    # Pass 2: tpo.fit with optax.adam and the hand loop: the same computation.
    beside_adam = Interleaved(params, loss_fn, data, n, key, batch=batch)
    adam = tpo.fit(
        loss_fn, params, data, tx=optax.adam(LR), callback=beside_adam, **kwargs
    )
    chex.assert_trees_all_equal(adam.params, beside_adam.params)

    def fit_row(result) -> tuple[float, float, int]:
        first = [r for r in result.history if r["phase"] == 1]
        return (
            _median_after_first([r["seconds"] for r in first]),
            sum(r["compile_seconds"] for r in result.history),
            len(first),
        )

    hand_1 = _median_after_first(beside_default.hand_seconds)
    hand_2 = _median_after_first(beside_adam.hand_seconds)
    default_s, default_compile, default_epochs = fit_row(default)
    adam_s, adam_compile, _ = fit_row(adam)
    per_step_s = _median_after_first(beside_default.per_step_seconds)
    seconds = {
        "hand (beside tpo.fit adam)": hand_2,
        "tpo.fit adam": adam_s,
        "hand (beside tpo.fit default)": hand_1,
        "tpo.fit default two_phase": default_s,
        "hand, one jitted step per batch": per_step_s,
    }
    compile_seconds = {
        "hand": beside_adam.compile_seconds,
        "tpo.fit adam": adam_compile,
        "tpo.fit default two_phase": default_compile,
    }
    ratios = {
        "tpo.fit adam / hand": adam_s / hand_2,
        "tpo.fit default / hand": default_s / hand_1,
        "per step / hand": per_step_s / hand_1,
        "per step / tpo.fit default": per_step_s / default_s,
    }
    steps = {"hand": beside_adam.steps}
    if trainer is not None:
        trainer_s = _median_after_first(beside_default.trainer_seconds)
        seconds["Trainer"] = trainer_s
        compile_seconds["Trainer"] = beside_default.trainer_compile_seconds
        ratios["Trainer / hand"] = trainer_s / hand_1
        ratios["Trainer / tpo.fit default"] = trainer_s / default_s
        steps["trainer"] = data_lib.num_batches(n, batch)
    return {
        "model": name,
        "examples": n,
        "batch_size": batch,
        "epochs": epochs,
        "first_phase_epochs_of_default": default_epochs,
        "steps": steps,
        "seconds_per_epoch": seconds,
        "compile_seconds": compile_seconds,
        "ratios": ratios,
        "bit_identical_to_hand": True,  # asserted above
    }


def table(results: list[dict]) -> str:
    rows = []
    for r in results:
        s, c, q = r["seconds_per_epoch"], r["compile_seconds"], r["ratios"]
        steps = r["steps"]
        rows += [
            [r["model"], "hand-written scan, optax.adam (beside the next)",
             steps["hand"], f"{1e3 * s['hand (beside tpo.fit adam)']:.3g}", "1",
             f"{c['hand']:.2f}"],
            [r["model"], "tpo.fit, tx=optax.adam", steps["hand"],
             f"{1e3 * s['tpo.fit adam']:.3g}", f"{q['tpo.fit adam / hand']:.3f}",
             f"{c['tpo.fit adam']:.2f}"],
            [r["model"], "hand-written scan, optax.adam (beside the next three)",
             steps["hand"], f"{1e3 * s['hand (beside tpo.fit default)']:.3g}", "1", ""],
            [r["model"], "tpo.fit, default two_phase", steps["hand"],
             f"{1e3 * s['tpo.fit default two_phase']:.3g}",
             f"{q['tpo.fit default / hand']:.3f}",
             f"{c['tpo.fit default two_phase']:.2f}"],
            [r["model"], "hand-written, one jitted step per batch", steps["hand"],
             f"{1e3 * s['hand, one jitted step per batch']:.3g}",
             f"{q['per step / hand']:.3f}", ""],
        ]  # fmt: skip
        if "Trainer" in s:
            rows.append(
                [r["model"], "Trainer.run_epoch, adam", steps["trainer"],
                 f"{1e3 * s['Trainer']:.3g}", f"{q['Trainer / hand']:.3f}",
                 f"{c['Trainer']:.2f}"]
            )  # fmt: skip
    header = [
        "model",
        "loop",
        "steps/epoch",
        "ms/epoch (median)",
        "x hand",
        "compile s",
    ]
    lines = [timing.markdown_table(header, rows), ""]
    for r in results:
        q = r["ratios"]
        against = [f"one jitted step per batch {q['per step / tpo.fit default']:.2f}x"]
        if "Trainer / tpo.fit default" in q:
            against.append(f"the Trainer {q['Trainer / tpo.fit default']:.2f}x")
        lines.append(
            f"{r['model']}: per epoch, against tpo.fit's default: "
            + ", ".join(against)
            + "; tpo.fit with optax.adam ends on the hand loop's params bit for bit."
        )
    return "\n".join(lines)


def _positive(text: str) -> int:
    value = int(text)
    if value < 2:
        raise argparse.ArgumentTypeError(f"must be an integer >= 2, got {value}")
    return value


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, smoke test")
    parser.add_argument(
        "--models",
        nargs="+",
        default=["vit-mlp", "vgg5", "mlp"],
        help="the paper's models on digits, and mlp: an MLP on breast cancer",
    )
    parser.add_argument("--epochs", type=_positive, default=12, help="epochs, >= 2")
    parser.add_argument("--out", type=pathlib.Path, default=None)
    args = parser.parse_args(argv)
    epochs, images = (2, 128) if args.quick else (args.epochs, None)
    models = args.models[:1] if args.quick else args.models
    # Compile times as a first run pays them: no persistent cache.
    cache = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    try:
        results = [
            mlp_case(epochs) if model == "mlp" else measure(model, epochs, images)
            for model in models
        ]
    finally:
        jax.config.update("jax_enable_compilation_cache", cache)
    print(table(results))
    result = {"environment": timing.environment(), "results": results}
    timing.write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
