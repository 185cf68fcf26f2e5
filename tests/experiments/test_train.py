"""The training script end to end on digits: metrics, CLI errors, resume."""

import dataclasses
import json
import pathlib
import subprocess
import sys

import chex
import jax
import numpy as np
import pytest

pytest.importorskip("flax", reason="the experiments need flax")
pytest.importorskip("orbax.checkpoint", reason="checkpoints need orbax")
import orbax.checkpoint as ocp  # noqa: E402
from _runs import checkpoint_leaves  # noqa: E402

from experiments import config as config_lib  # noqa: E402
from experiments import train  # noqa: E402
from experiments import trainer as trainer_lib  # noqa: E402

FIELDS = {
    "epoch",
    "train_loss",
    "train_acc",
    "val_loss",
    "val_acc",
    "phase",
    "gn_reading",
    "step_size",
    "linesearch_evaluations",
    "linesearch_gradients",
    "linesearch_failures",
    "steps",
    "forward_passes",
    "wall_time",
    "compile_time",
    "num_params",
    "batch_loss",
    "batch_errors",
}


@pytest.mark.parametrize("optimizer", config_lib.OPTIMIZERS)
def test_short_run_writes_valid_metrics(optimizer, tmp_path, small_run):
    config = config_lib.Config.of(
        **small_run,
        optimizer=optimizer,
        epochs=2,
        swap_epoch=1,
        lr=3e-3,
        out=str(tmp_path),
    )
    rows = train.train(config)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == rows
    assert [r["epoch"] for r in rows] == [0, 1]
    for row in rows:
        assert set(row) == FIELDS
        assert 0.0 <= row["train_acc"] <= 1.0 and 0.0 <= row["val_acc"] <= 1.0
        assert np.isfinite(
            [row["train_loss"], row["val_loss"], row["gn_reading"], row["batch_loss"]]
        ).all()
        # Counted by the steps' own forward passes: an Adam epoch's count,
        # none for a CG epoch that reused its line search's gradient.
        if row["phase"] == 0:
            assert 0 <= row["batch_errors"] <= 1437  # digits: 1,437 examples
    assert rows[1]["train_loss"] < rows[0]["train_loss"] or optimizer == "cg"
    phases = [r["phase"] for r in rows]
    cg_epochs = {"adam": [0, 0], "two-phase-fixed": [0, 1], "cg": [1, 1]}
    if optimizer in cg_epochs:
        assert phases == cg_epochs[optimizer]
    # The rate of the last step: cosine-decayed over 2 epochs of 3 steps.
    rates = {"adam-cosine": 3e-3 * (1 + np.cos(np.pi * np.array([2, 5]) / 6)) / 2}
    for row, rate in zip(rows, rates.get(optimizer, [3e-3, 3e-3]), strict=True):
        if row["phase"] == 0:  # Adam: 3 batches of 479, 3 passes each.
            assert row["steps"] == 3 and row["linesearch_evaluations"] == 0
            assert row["step_size"] == pytest.approx(rate, rel=1e-4)
        else:  # CG: one full-batch step plus its line search.
            assert row["steps"] == 1 and row["linesearch_evaluations"] >= 1
    # A value costs 1, a value and gradient 3. Full-batch CG reuses the
    # gradient its last line search left in the state: only its first step
    # computes one.
    expected_compute, in_cg = 0, False
    for r in rows:
        if r["phase"]:
            values = r["linesearch_evaluations"] - r["linesearch_gradients"]
            gradients = r["linesearch_gradients"]
            assert gradients >= 1  # the default search ends on a gradient
            expected_compute += (0 if in_cg else 3) + values + 3 * gradients
        else:
            expected_compute += 3
        in_cg = bool(r["phase"])
    assert rows[-1]["forward_passes"] == pytest.approx(expected_compute)
    assert rows[-1]["wall_time"] > rows[0]["wall_time"] > 0
    # Compiling is timed apart: in the first epoch, and again in the first
    # CG epoch (another step function), never in the time of the steps.
    assert rows[0]["compile_time"] > 0
    assert rows[-1]["compile_time"] >= rows[0]["compile_time"]


@pytest.mark.slow
def test_resume_in_the_cg_phase_is_bit_exact(tmp_path, small_run):
    common = dict(**small_run, optimizer="two-phase-fixed", swap_epoch=1, lr=3e-3)
    straight = tmp_path / "straight"
    rows = train.train(config_lib.Config.of(**common, epochs=4, out=str(straight)))
    resumed = tmp_path / "resumed"
    train.train(config_lib.Config.of(**common, epochs=2, out=str(resumed)))
    # Epoch 1 was the first CG epoch: the resume starts mid-phase.
    resumed_rows = train.train(
        config_lib.Config.of(**common, epochs=4, out=str(resumed), resume=True)
    )
    assert [r["phase"] for r in rows] == [0, 1, 1, 1]
    for a, b in zip(
        checkpoint_leaves(straight, 3), checkpoint_leaves(resumed, 3), strict=True
    ):
        np.testing.assert_array_equal(a, b)
    drop = lambda r: {
        k: v for k, v in r.items() if k not in ("wall_time", "compile_time")
    }  # noqa: E731
    assert [drop(r) for r in resumed_rows] == [drop(r) for r in rows]


def test_cli_missing_tfds_dataset_exits_with_instructions(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "experiments.train",
            "--dataset",
            "mnist",
            "--data-dir",
            str(tmp_path),
            "--epochs",
            "1",
            "--out",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=pathlib.Path(__file__).resolve().parents[2],
    )
    assert result.returncode != 0
    try:
        import tensorflow_datasets  # noqa: F401
    except ImportError:  # Then the message says how to install it.
        assert "pip install -e '.[experiments]'" in result.stderr
    else:
        assert "download_and_prepare" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_fresh_run_replaces_an_earlier_one_in_the_same_directory(tmp_path, small_run):
    config = config_lib.Config.of(
        **small_run, optimizer="adam", epochs=2, out=str(tmp_path)
    )
    first = train.train(config)
    second = train.train(
        dataclasses.replace(config, run=dataclasses.replace(config.run, epochs=1))
    )
    assert [r["epoch"] for r in second] == [0]
    drop = lambda r: {
        k: v for k, v in r.items() if k not in ("wall_time", "compile_time")
    }  # noqa: E731
    assert drop(second[0]) == drop(first[0])
    manager = ocp.CheckpointManager(tmp_path / "checkpoints")
    assert manager.all_steps() == [0]
    manager.close()


def test_invalid_config_raises_value_error(tmp_path, small_run):
    with pytest.raises(ValueError, match="epochs"):
        train.train(config_lib.Config.of(**small_run, epochs=0, out=str(tmp_path)))


def test_curvature_probe_records_the_extreme_eigenvalues_of_the_probe_batch(
    tmp_path,
    small_run,
):
    import twophase_optax as tpo

    config = config_lib.Config.of(
        **small_run,
        optimizer="adam",
        epochs=3,
        curvature_every=2,
        curvature_iterations=8,
        curvature_batch=64,
        out=str(tmp_path),
    )
    rows = train.train(config)
    probed = [r["epoch"] for r in rows if "lambda_min" in r]
    assert probed == [1]  # every 2nd epoch, counted from 1
    assert rows[1]["lambda_min"] <= rows[1]["lambda_max"]
    # The same probe on a trainer's params equals the library's Lanczos on
    # the loss of the first 64 training images.
    trainer = trainer_lib.Trainer(config)
    x, y = trainer.data.x_train[:64], trainer.data.y_train[:64]
    expected = tpo.curvature.hessian_extremes(
        lambda p: trainer.batch_loss(p, x, y), trainer.params, 8
    )
    probe = trainer.curvature()
    assert probe["lambda_min"] == pytest.approx(float(expected.lambda_min), rel=1e-4)
    assert probe["lambda_max"] == pytest.approx(float(expected.lambda_max), rel=1e-4)
    assert probe["lambda_max"] > 0


@pytest.mark.parametrize(
    "module, argv, message",
    [
        ("train", ["--epochs", "-3"], "argument --epochs: must be an integer >= 1"),
        ("compare", ["--epochs", "-3"], "argument --epochs: must be an integer >= 1"),
        ("train", ["--lr", "nan"], "argument --lr: must be a number in (0, inf)"),
        (
            "train",
            ["--batch-size", "x"],
            "argument --batch-size: must be an integer >= 1",
        ),
        ("fig5", ["--epochs", "0"], "argument --epochs: must be an integer >= 1"),
        (
            "train",
            ["--cg-chunk-size", "-1"],
            "argument --cg-chunk-size: must be an integer >= 0",
        ),
        ("train", ["--patience", "1.5"], "argument --patience: must be an integer"),
    ],
)
def test_cli_rejects_out_of_range_flags_in_one_line(module, argv, message, capsys):
    import importlib

    script = importlib.import_module(f"experiments.{module}")
    with pytest.raises(SystemExit) as exit_info:
        script.main(argv)
    assert exit_info.value.code == 2  # argparse's usage error
    errors = capsys.readouterr().err.strip().splitlines()
    assert errors[-1].endswith(f"error: {message}, got {argv[1]!r}")
    assert not any("Traceback" in line for line in errors)


@pytest.mark.parametrize(
    "module, argv, message",
    [
        (
            "train",
            ["--gn-factor", "1.5"],
            "--gn-factor: tpo.swap.peak: gn_factor must be a number in (0, 1), "
            "got 1.5.",
        ),
        ("fig5", ["--gn-factor", "1"], "--gn-factor: tpo.swap.peak: gn_factor"),
        (
            "train",
            ["--min-rise", "0.5"],
            "--min-rise: tpo.swap.peak: min_rise must be a number >= 1, got 0.5.",
        ),
        (
            "train",
            ["--plateau-patience", "0"],
            "--plateau-patience: tpo.swap.plateau: patience must be an integer "
            ">= 1, got 0.",
        ),
        (
            "train",
            ["--fit-errors", "-1"],
            "--fit-errors: tpo.swap.fitted: max_errors must be an integer >= 0, "
            "got -1.",
        ),
        (
            "train",
            ["--max-failures", "0"],
            "--max-failures: two_phase: max_failures must be an integer >= 1, got 0.",
        ),
    ],
)
def test_cli_reports_the_library_factorys_range_in_one_line(
    module, argv, message, capsys
):
    # The swap rule's and the fallback's ranges are the library's: the flag's
    # one-line error is the factory's own message.
    import importlib

    script = importlib.import_module(f"experiments.{module}")
    with pytest.raises(SystemExit) as exit_info:
        script.main(argv)
    assert exit_info.value.code == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert f"error: argument {message}" in errors[-1]
    assert not any("Traceback" in line for line in errors)


def test_two_phase_before_the_swap_repeats_the_adam_run_bit_for_bit(
    tmp_path, small_run
):
    common = dict(**small_run, epochs=2, lr=3e-3)
    adam = train.train(
        config_lib.Config.of(**common, optimizer="adam", out=str(tmp_path / "a"))
    )
    ours = train.train(
        config_lib.Config.of(
            **common, optimizer="two-phase-fixed", swap_epoch=5, out=str(tmp_path / "b")
        )
    )
    keys = ("train_loss", "val_loss", "gn_reading", "forward_passes")
    assert [[r[k] for k in keys] for r in ours] == [[r[k] for k in keys] for r in adam]


@pytest.mark.parametrize("optimizer", ["two-phase-fixed", "adam-lbfgs"])
def test_chunked_second_phase_gives_the_losses_of_one_pass(
    optimizer, tmp_path, small_run
):
    common = dict(**small_run, optimizer=optimizer, swap_epoch=1, epochs=3, lr=3e-3)
    runs = {}
    for chunk_size in (0, 500):  # One pass; 3 chunks of 479 rows.
        config = config_lib.Config.of(
            **common, cg_chunk_size=chunk_size, out=str(tmp_path / str(chunk_size))
        )
        trainer = trainer_lib.Trainer(config)
        assert trainer.num_chunks(1437) == (3 if chunk_size else 1)
        runs[chunk_size] = train.train(config)
    one_pass, chunked = runs[0], runs[500]
    assert [r["phase"] for r in chunked] == [0, 1, 1]
    for a, b in zip(chunked, one_pass, strict=True):
        # The same line-search trials, counted the same; losses to rounding.
        assert a["linesearch_evaluations"] == b["linesearch_evaluations"]
        assert a["forward_passes"] == b["forward_passes"]
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
    assert chunked[-1]["train_loss"] < chunked[0]["train_loss"]  # It descended.


def test_cg_loss_in_chunks_equals_the_batch_loss(small_run):
    trainer = trainer_lib.Trainer(
        config_lib.Config.of(**small_run, cg_chunk_size=300, out="unused")
    )
    x, y = trainer.data.x_train, trainer.data.y_train
    batch = trainer.place(x, y, chunked=True)
    whole = jax.value_and_grad(trainer.batch_loss)(trainer.params, *batch)
    chunked = jax.jit(jax.value_and_grad(trainer.cg_loss))(trainer.params, *batch)
    assert trainer.num_chunks(len(y)) == 5
    chex.assert_trees_all_close(chunked, whole, rtol=2e-5, atol=1e-9)


@pytest.mark.parametrize("optimizer", ["cg", "two-phase"])
def test_mini_batch_cg_keeps_the_previous_gradient(optimizer):
    # On mini-batches the next gradient is another batch's, so the line search
    # stores none and CG keeps g_{k-1} itself; on the full batch the stored
    # gradient is reused and three products stand in for g_{k-1}.
    import jax.numpy as jnp

    import twophase_optax as tpo

    config = config_lib.Config.of(optimizer=optimizer)
    params = {"w": jnp.zeros(3)}
    for mini_batch, keeps_tree in ((True, True), (False, False)):
        tx = config_lib.make_optimizer(config, 10, mini_batch_cg=mini_batch)
        state = tx.init(params)
        cg = state if optimizer == "cg" else state.second_state
        assert isinstance(cg, tpo.ConjugateGradientState)
        assert (cg.grad_prev is not None) == keeps_tree
        assert (tpo.find_linesearch_state(cg).grad is None) == keeps_tree


def test_every_flag_is_a_config_field_that_round_trips():
    # The parser is made from the fields: each flag sets its field, and the
    # flat names of Config.of are the flags' own.
    config = config_lib.parse_args(
        ["--epochs", "7", "--swap-rule", "fit", "--fit-errors", "2", "--mesh", "data=1"]
        + ["--curvature-every", "3", "--optimizer", "adam", "--no-progress"]
    )
    assert config.run.epochs == 7 and not config.run.progress
    assert config.optimizer.name == "adam"
    assert (config.optimizer.swap.rule, config.optimizer.swap.fit_errors) == ("fit", 2)
    assert (config.mesh.spec, config.probe.every) == ("data=1", 3)
    assert config_lib.Config.of(**config.flat()) == config
    with pytest.raises(ValueError, match="Unknown setting"):
        config_lib.Config.of(epoch=3)
