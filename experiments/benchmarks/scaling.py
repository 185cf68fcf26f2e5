"""Step time of data-parallel training on 1, 2, 4 and 8 devices.

    python -m experiments.benchmarks.scaling [--quick] [--out FILE.json]

Times the jitted train step of ``experiments.train`` (two-phase, vit-mlp on
digits) on meshes ``data=1, 2, 4, 8``: an Adam-phase step on a batch of 512
and a CG-phase step on the whole training set (1437 images, padded to a
multiple of the device count and masked). Each figure is the median of
interleaved repeats after a warm-up; every step is waited for, as the training
loop does on CPU meshes.

On a machine with one CPU the devices are simulated: this module asks XLA for
8 host devices before JAX starts, so all of them share the same cores and the
rows show the cost of the collectives and of splitting the work, not a
speed-up. On a machine with several accelerators the rows are real.
"""

from __future__ import annotations

import os
import sys

if "jax" not in sys.modules:  # Must happen before JAX initialises.
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count=8"

import argparse  # noqa: E402
import pathlib  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

from experiments import config as config_lib  # noqa: E402
from experiments import trainer as trainer_lib  # noqa: E402
from experiments.benchmarks import timing  # noqa: E402


def step_candidates(model: str, data: int, batch: int, cg_batch: int | None):
    """Adam- and CG-phase steps as callables, warm-up seconds, training-set size."""
    config = config_lib.Config.of(
        model=model, optimizer="two-phase", mesh=f"data={data}", progress=False
    )
    trainer = trainer_lib.Trainer(config)
    x, y = trainer.data.x_train, trainer.data.y_train
    grad_sum = trainer.zero_grad_sum()
    adam_state = trainer.opt_state
    cg_state = adam_state._replace(in_second_phase=np.bool_(True))
    cg_state = jax.device_put(cg_state, jax.tree.map(lambda a: a.sharding, adam_state))
    batches = {
        "adam": trainer.place(x[:batch], y[:batch]),
        "cg": trainer.place(x[:cg_batch], y[:cg_batch]),
    }
    states = {"adam": adam_state, "cg": cg_state}
    calls, compiles = {}, {}
    for phase in ("adam", "cg"):
        args = (trainer.params, states[phase], grad_sum, *batches[phase])
        start = time.perf_counter()
        jax.block_until_ready(trainer.train_step(*args))
        compiles[phase] = time.perf_counter() - start

        def call(args=args):
            return jax.block_until_ready(trainer.train_step(*args))

        calls[phase] = call
    return calls, compiles, len(x)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small model, smoke test")
    parser.add_argument("--out", type=pathlib.Path, default=None)
    args = parser.parse_args(argv)
    model, counts, batch, cg_batch = "vit-mlp", (1, 2, 4, 8), 512, None
    repeats, inner = 5, 3
    if args.quick:
        model, counts, batch, cg_batch = "vit-nomlp-wkewq-wvwo", (1, 2), 64, 128
        repeats, inner = 5, 1
    counts = [n for n in counts if n <= jax.device_count()]
    candidates, compiles = {}, {}
    for n in counts:
        calls, seconds, num_train = step_candidates(model, n, batch, cg_batch)
        for phase, call in calls.items():
            candidates[(n, phase)] = (call, ())
            compiles[(n, phase)] = seconds[phase]
    medians = timing.interleaved_medians(candidates, repeats, inner)
    simulated = jax.default_backend() == "cpu"
    rows = [
        {
            "devices": n,
            "phase": phase,
            "seconds": medians[(n, phase)],
            "ratio_to_one_device": medians[(n, phase)] / medians[(1, phase)],
            "warm_up_seconds": compiles[(n, phase)],
        }
        for n in counts
        for phase in ("adam", "cg")
    ]
    result = {
        **timing.environment(),
        "simulated": simulated,
        "cpu_cores": os.cpu_count(),
        "model": model,
        "adam_batch": batch,
        "cg_batch": cg_batch or num_train,
        "repeats": repeats,
        "inner": inner,
        "rows": rows,
    }
    label = (
        f"{jax.device_count()} simulated CPU devices on {os.cpu_count()} cores"
        if simulated
        else f"{jax.device_count()} x {result['device']}"
    )
    print(f"{label}, jax {jax.__version__}; {model} on digits\n")
    print(
        timing.markdown_table(
            ["devices", "step", "median ms", "x 1 device", "warm-up s"],
            [
                [
                    f"{r['devices']}" + (" (simulated)" if simulated else ""),
                    f"Adam phase, batch {batch}"
                    if r["phase"] == "adam"
                    else f"CG, batch {result['cg_batch']}",
                    f"{1e3 * r['seconds']:.1f}",
                    f"{r['ratio_to_one_device']:.2f}",
                    f"{r['warm_up_seconds']:.1f}",
                ]
                for r in rows
            ],
        )
    )
    timing.write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
