"""Cost of the CG phase: line-search evaluations and time per CG step.

    python -m experiments.benchmarks.cg_phase [--quick] [--out FILE.json]

vit-mlp on digits is first trained with Adam (batch 64) for ``--pretrain``
epochs, the start of the second phase in the paper's fixed split. From those
parameters, nonlinear CG (:func:`twophase_optax.conjugate_gradient`, full
batch, as the experiments run it) takes ``--steps`` steps with the
golden-section line search at its default tolerance 1e-2 and at 1e-3 and 1e-4.

Reported per tolerance: the line-search evaluations per step (median and
max), the time per CG step, and that time in units of one Adam step, both on
the same full batch and on the batch of 64 that the first phase uses. Times
are medians of interleaved repeats after a warm-up (each repeat runs the
``--steps`` steps from the same start); compile time is reported separately.
"""

from __future__ import annotations

import argparse
import pathlib
import statistics

import jax
import optax

import twophase_optax as tpo
from experiments import train as train_lib
from experiments.benchmarks import timing

DEFAULT_TOL = 1e-2


def pretrained_trainer(model: str, epochs: int) -> train_lib.Trainer:
    config = train_lib.Config(
        model=model, optimizer="adam", batch_size=64, epochs=epochs, progress=False
    )
    trainer = train_lib.Trainer(config)
    for epoch in range(epochs):
        trainer.run_epoch(epoch)
    return trainer


def make_step(trainer: train_lib.Trainer, tx: optax.GradientTransformationExtraArgs):
    """One jitted step of ``tx`` on a batch (value, gradient and update)."""

    def step(params, state, images, labels):
        value, grad = jax.value_and_grad(trainer.batch_loss)(params, images, labels)
        updates, state = tx.update(
            grad,
            state,
            params,
            value=value,
            grad=grad,
            value_fn=trainer.batch_loss,
            images=images,
            labels=labels,
        )
        return optax.apply_updates(params, updates), state

    return step


def run_steps(step, params, state, images, labels, num_steps):
    for _ in range(num_steps):
        params, state = step(params, state, images, labels)
    return params, state


def measure(
    model: str, pretrain: int, num_steps: int, images: int | None, repeats: int
):
    trainer = pretrained_trainer(model, pretrain)
    x, y = trainer.data.x_train[:images], trainer.data.y_train[:images]
    params = trainer.params
    adam = optax.adam(trainer.config.lr)
    adam_step = make_step(trainer, adam)
    adam_args = (params, adam.init(params))
    adam_full, full_seconds = timing.compiled(adam_step, *adam_args, x, y)
    adam_64, seconds_64 = timing.compiled(adam_step, *adam_args, x[:64], y[:64])
    # The candidates run num_steps steps from the same start in every repeat.
    candidates = {
        "adam, full batch": (
            lambda: run_steps(adam_full, *adam_args, x, y, num_steps),
            (),
        ),
        "adam, batch 64": (
            lambda: run_steps(adam_64, *adam_args, x[:64], y[:64], num_steps),
            (),
        ),
    }
    compiles = {"adam, full batch": full_seconds, "adam, batch 64": seconds_64}
    evaluations = {}
    for tol in (DEFAULT_TOL, 1e-3, 1e-4):
        name = f"cg, tol {tol:.0e}"
        cg = tpo.conjugate_gradient(linesearch=tpo.golden_section_linesearch(tol=tol))
        state = cg.init(params)
        cg_step, compiles[name] = timing.compiled(
            make_step(trainer, cg), params, state, x, y
        )
        evaluations[name] = []
        p, s = params, state
        for _ in range(num_steps):  # Also the warm-up; evaluations are exact.
            p, s = cg_step(p, s, x, y)
            evaluations[name].append(int(s.linesearch_state.info.num_evaluations))
        candidates[name] = (
            lambda cg_step=cg_step, state=state: run_steps(
                cg_step, params, state, x, y, num_steps
            ),
            (),
        )
    medians = timing.interleaved_medians(candidates, repeats, inner=1)
    per_step = {name: seconds / num_steps for name, seconds in medians.items()}
    rows = []
    for name, k in evaluations.items():
        rows.append(
            {
                "case": name,
                "tol": float(name.split()[-1]),
                "default_tol": name == f"cg, tol {DEFAULT_TOL:.0e}",
                "evaluations": k,
                "median_evaluations": statistics.median(k),
                "max_evaluations": max(k),
                "seconds_per_step": per_step[name],
                "in_adam_full_batch_steps": per_step[name]
                / per_step["adam, full batch"],
                "in_adam_batch_64_steps": per_step[name] / per_step["adam, batch 64"],
                "compile_seconds": compiles[name],
            }
        )
    adam_rows = [
        {
            "case": name,
            "seconds_per_step": per_step[name],
            "compile_seconds": compiles[name],
        }
        for name in ("adam, full batch", "adam, batch 64")
    ]
    return rows, adam_rows, len(x)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny run, smoke test")
    parser.add_argument("--pretrain", type=int, default=30, help="Adam epochs first")
    parser.add_argument("--steps", type=int, default=12, help="CG steps timed")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=pathlib.Path, default=None)
    args = parser.parse_args(argv)
    model, images = "vit-mlp", None
    if args.quick:
        model, images, args.pretrain, args.steps = "vit-nomlp-wkewq-wvwo", 128, 1, 2
    rows, adam_rows, num_images = measure(
        model, args.pretrain, args.steps, images, args.repeats
    )
    result = {
        **timing.environment(),
        "model": model,
        "images": num_images,
        "pretrain_epochs": args.pretrain,
        "steps": args.steps,
        "repeats": args.repeats,
        "cg": rows,
        "adam": adam_rows,
    }
    print(f"device: {result['device']} ({result['backend']}), jax {jax.__version__}")
    print(
        f"{model} on digits, {num_images} images (full batch), CG after "
        f"{args.pretrain} Adam epochs, {args.steps} CG steps\n"
    )
    print(format_table(rows, adam_rows))
    timing.write_json(args.out, result)
    return result


def format_table(rows: list[dict], adam_rows: list[dict]) -> str:
    table = [
        [
            r["case"] + (" (default)" if r["default_tol"] else ""),
            f"{r['median_evaluations']:g}",
            r["max_evaluations"],
            f"{1e3 * r['seconds_per_step']:.2f}",
            f"{r['in_adam_full_batch_steps']:.1f}",
            f"{r['in_adam_batch_64_steps']:.1f}",
            f"{r['compile_seconds']:.2f}",
        ]
        for r in rows
    ]
    table += [
        [
            r["case"],
            "",
            "",
            f"{1e3 * r['seconds_per_step']:.2f}",
            "",
            "",
            f"{r['compile_seconds']:.2f}",
        ]
        for r in adam_rows
    ]
    return timing.markdown_table(
        [
            "step",
            "line-search evals (median)",
            "max",
            "ms per step",
            "x Adam step (full batch)",
            "x Adam step (batch 64)",
            "compile s",
        ],
        table,
    )


if __name__ == "__main__":
    main()
