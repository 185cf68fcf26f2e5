"""The budget sweep's engine: tails from shared Adam runs, and its tables.

A tail that starts from the Adam run's kept checkpoint must be the run it
stands for: the same metrics, bit for bit (the test-wide no-FMA flag makes
Adam inside two_phase round as Adam alone does), as a two-phase run trained
from scratch. And every number of the sweep's table must come from a run.
"""

import json
import pathlib

import numpy as np
import pytest

pytest.importorskip("flax", reason="the experiments need flax")
pytest.importorskip("orbax.checkpoint", reason="checkpoints need orbax")

from _runs import without_timers  # noqa: E402

import twophase_optax as tpo  # noqa: E402
from experiments import analysis  # noqa: E402
from experiments import budget_sweep  # noqa: E402
from experiments import checkpoints  # noqa: E402
from experiments import compare  # noqa: E402
from experiments import config as config_lib  # noqa: E402
from experiments import provenance  # noqa: E402
from experiments import run_records  # noqa: E402
from experiments import sweep_copies  # noqa: E402
from experiments import train  # noqa: E402
from experiments import variants  # noqa: E402

# The raw reading, swap on its first fall by 0.5%: on this model it rises for
# 4 epochs and dips in the fifth, so the swap comes within the test's budget.
RULE = dict(swap_rule="peak", gn_factor=0.995, smoothing=1.0, patience=1, min_rise=1.0)


@pytest.fixture(scope="module")
def adam_run(tmp_path_factory, small_sweep):
    """Adam for 7 epochs keeping epochs 1 and 2, and where ``RULE`` fires."""
    out = tmp_path_factory.mktemp("adam")
    config = config_lib.Config.of(
        **small_sweep,
        optimizer="adam",
        epochs=7,
        keep_epochs=(1, 2),
        keep_detected=True,
        out=str(out),
        **RULE,
    )
    return out, train.train(config)


@pytest.mark.parametrize("optimizer", ["two-phase-fixed", "adam-lbfgs"])
def test_a_tail_from_the_kept_checkpoint_is_the_fixed_split_run(
    optimizer, adam_run, tmp_path, monkeypatch, small_sweep
):
    adam_dir, adam_rows = adam_run
    monkeypatch.chdir(adam_dir.parent)  # A relative --out, as on the command line.
    common = dict(**small_sweep, optimizer=optimizer, epochs=5, swap_epoch=3)
    whole = train.train(config_lib.Config.of(**common, out=str(tmp_path / "whole")))
    tail = train.train(
        config_lib.Config.of(
            **common,
            out=str(tmp_path / "tail"),
            prefix_run=adam_dir.name,
            prefix_epoch=2,
        )
    )
    assert [r["phase"] for r in tail] == [0, 0, 0, 1, 1]
    assert without_timers(tail) == without_timers(whole)
    # The prefix is the Adam run's own rows, its time and compute included.
    assert tail[:3] == adam_rows[:3]
    assert tail[3]["wall_time"] > adam_rows[2]["wall_time"]


def test_a_tail_without_its_checkpoint_says_which_epochs_were_kept(
    adam_run, tmp_path, small_sweep
):
    adam_dir, _ = adam_run
    config = config_lib.Config.of(
        **small_sweep,
        optimizer="two-phase-fixed",
        epochs=5,
        swap_epoch=4,
        prefix_run=str(adam_dir),
        prefix_epoch=3,
        out=str(tmp_path),
    )
    with pytest.raises(
        checkpoints.RunOutputError, match=r"no checkpoint of epoch 3 \(kept"
    ):
        train.train(config)


def test_the_replayed_swap_is_the_live_detectors_and_its_tail_the_live_run(
    adam_run, tmp_path, small_sweep
):
    adam_dir, adam_rows = adam_run
    live = train.train(
        config_lib.Config.of(
            **small_sweep,
            optimizer="two-phase",
            epochs=7,
            out=str(tmp_path / "live"),
            **RULE,
        )
    )
    live_swap = analysis.Run("m", "two-phase", live).swap_epoch
    assert live_swap is not None and live_swap < 7  # The rule fires in time.
    sweep = budget_sweep.Sweep(
        models=[small_sweep["model"]],
        seeds={small_sweep["model"]: [0]},
        budgets=[7],
        detector=RULE,
    )
    detected = budget_sweep.detected_epoch(sweep, adam_rows)
    assert detected + 1 == live_swap
    # The Adam run kept that epoch's checkpoint as it passed it.
    assert detected in checkpoints.kept_epochs(str(adam_dir))
    tail = train.train(
        config_lib.Config.of(
            **small_sweep,
            optimizer="two-phase",
            epochs=7,
            out=str(tmp_path / "tail"),
            prefix_run=str(adam_dir),
            prefix_epoch=detected,
            **RULE,
        )
    )
    assert without_timers(tail) == without_timers(live)


def test_cosine_adam_decays_its_rate_to_zero_over_the_budget(tmp_path, small_sweep):
    config = config_lib.Config.of(
        **small_sweep, optimizer="adam-cosine", epochs=3, out=str(tmp_path)
    )
    rows = train.train(config)
    steps = rows[0]["steps"]
    total = 3 * steps
    # optax.cosine_decay_schedule: lr * (1 + cos(pi * t / T)) / 2 at step t.
    expected = [
        3e-3 * (1 + np.cos(np.pi * ((e + 1) * steps - 1) / total)) / 2 for e in range(3)
    ]
    np.testing.assert_allclose([r["step_size"] for r in rows], expected, rtol=1e-4)
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    # The optimizer itself: for a constant gradient Adam's normalised step is
    # 1 (to eps), so the update at step t is -lr_t, over 2 epochs of 5 steps.
    import jax.numpy as jnp

    config = config_lib.Config.of(optimizer="adam-cosine", epochs=2, lr=1e-2)
    tx = config_lib.make_optimizer(config, adam_steps_per_epoch=5)
    params, state, updates = jnp.zeros(()), tx.init(jnp.zeros(())), []
    for _ in range(10):
        update, state = tx.update(jnp.ones(()), state, params)
        updates.append(float(update))
    lr_t = [1e-2 * (1 + np.cos(np.pi * t / 10)) / 2 for t in range(10)]
    np.testing.assert_allclose(updates, -np.array(lr_t), rtol=1e-4)


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory, small_sweep):
    """The sweep's command line on a tiny setting: budgets 3 and 6 epochs."""
    out = tmp_path_factory.mktemp("sweep")
    argv = [
        "--dataset",
        "digits",
        "--sweep",
        "--models",
        small_sweep["model"],
        "--budgets",
        "3",
        "6",
        "--lr",
        "3e-3",
        "--no-progress",
        "--out",
        str(out),
    ]
    compare.main(argv)
    return out, argv


def metrics(path: pathlib.Path):
    return run_records.read_metrics(path / "metrics.jsonl")


@pytest.mark.slow
def test_every_table_cell_comes_from_a_runs_metrics(sweep_dir, small_sweep):
    out, _ = sweep_dir
    model = small_sweep["model"]
    runs_dir = out / "runs" / model / "seed0"
    table = json.loads((out / "table.json").read_text())
    adam = metrics(runs_dir / "adam")
    assert len(adam) == 6  # One Adam run, to the longest budget.
    assert sorted(p.name for p in (runs_dir / "adam" / "kept").iterdir()) == ["0", "1"]
    for budget in (3, 6):
        split = budget_sweep.split_epoch(budget)
        rows = {
            "adam": adam[:budget],
            "adam-cosine": metrics(runs_dir / "adam-cosine" / f"b{budget}"),
            "two-phase-fixed": metrics(runs_dir / "two-phase-fixed" / f"b{budget}"),
            "adam-lbfgs": metrics(runs_dir / "adam-lbfgs" / f"b{budget}"),
        }
        for name in ("two-phase-fixed", "adam-lbfgs"):
            assert rows[name][:split] == adam[:split]  # The shared prefix.
            assert [r["phase"] for r in rows[name]][split - 1 : split + 1] == [0, 1]
        cells = {c["optimizer"]: c for c in table["budgets"][str(budget)]}
        assert list(cells) == list(variants.SWEEP)
        for name, run_rows in rows.items():
            assert len(run_rows) == budget
            for key in ("train_loss", "val_acc", "forward_passes", "wall_time"):
                assert cells[name][key] == [run_rows[-1][key]]
        # The verdicts at equal compute, against each baseline, from the rows.
        for name in ("two-phase-fixed", "adam-lbfgs"):
            for baseline in variants.BASELINES:
                verdict = cells[name]["verdicts"][baseline]["compute"]
                ours, theirs = rows[name], rows[baseline]
                limit = min(ours[-1]["forward_passes"], theirs[-1]["forward_passes"])
                pick = [r for r in ours if r["forward_passes"] <= limit + 1e-9][-1]
                base = [r for r in theirs if r["forward_passes"] <= limit + 1e-9][-1]
                if pick["phase"] == 0:  # No second-phase epoch inside: no verdict.
                    assert verdict["no_second_phase"] == 1
                    assert verdict["loss"] is None and verdict["wins"] == 0
                    continue
                assert verdict["loss"] == pick["train_loss"]
                assert verdict["adam_loss"] == base["train_loss"]
                assert verdict["val_acc"] == pick["val_acc"]
                assert verdict["wins"] == int(pick["train_loss"] < base["train_loss"])
    # The crossover summary: each ratio is the tail's loss over the better
    # baseline's at equal compute, and the Adam loss at the swap Adam's own.
    judged = []
    for entry in table["summary"]:
        if entry["variant"] != "two-phase-fixed":
            continue
        budget = entry["budget"]
        cells = {c["optimizer"]: c for c in table["budgets"][str(budget)]}
        verdicts = cells["two-phase-fixed"]["verdicts"]
        split = budget_sweep.split_epoch(budget)
        assert entry["adam_loss_at_swap"] == adam[split - 1]["train_loss"]
        if verdicts["adam"]["compute"]["no_second_phase"]:
            assert entry["ratio"] == analysis.NO_SECOND_PHASE
            assert entry["wins"] is None
            continue
        judged.append(budget)
        ratio = max(
            verdicts[b]["compute"]["loss"] / verdicts[b]["compute"]["adam_loss"]
            for b in variants.BASELINES
        )
        assert entry["ratio"] == pytest.approx(ratio, rel=1e-12)
    # At 3 epochs the first CG epoch costs more than Adam's remaining two:
    # within Adam's compute there is no CG epoch to judge.
    assert judged == [6]
    text = (out / "table.md").read_text()
    assert "## 3 epochs" in text and "## 6 epochs" in text
    # What made the runs, first in the table and beside it: a record per
    # start of each run (Adam's run starts again for the longer budget).
    made = json.loads((out / "provenance.json").read_text())
    run_dirs = {p.parent for p in (out / "runs").rglob("metrics.jsonl")}
    starts = sum(len(provenance.read(d)) for d in run_dirs)
    assert made["records"] == starts > len(run_dirs) >= 7
    assert [c["version"] for c in made["code"]] == [tpo.__version__]
    assert text.splitlines()[2] == provenance.describe(made)
    assert (out / "crossover.png").stat().st_size > 0


@pytest.mark.slow
def test_a_resumed_sweep_reads_every_run_back_and_redo_tails_keeps_adam(
    sweep_dir, monkeypatch, small_sweep
):
    out, argv = sweep_dir
    table = (out / "table.json").read_text()
    trained = []
    original = train.train

    def record(config):
        trained.append((config.optimizer.name, config.run.epochs))
        return original(config)

    monkeypatch.setattr(train, "train", record)
    compare.main([*argv, "--resume"])
    assert trained == []
    assert (out / "table.json").read_text() == table
    # Read only, with a budget not yet run: nothing trains, and the table says
    # what is missing instead of inventing it.
    budgets = argv.index("--budgets")
    partial = [*argv[: budgets + 3], "9", *argv[budgets + 3 :]]
    compare.main([*partial, "--read-only"])
    assert trained == []
    missing = json.loads((out / "table.json").read_text())["missing"]
    assert missing == [
        {"model": small_sweep["model"], "seed": 0, "budget": 9, "variant": variant}
        for variant in ["adam, so every variant"]
    ]
    assert "adam, so every variant: 9 epochs" in (out / "table.md").read_text()
    # The record to commit: the table and every run's metrics, no checkpoints.
    record = out.parent / f"{out.name}-record"
    compare.main([*argv, "--resume", "--copy-to", str(record)])
    assert (record / "table.json").read_text() == table
    runs_dir = out / "runs" / small_sweep["model"] / "seed0"
    copied = record / "metrics" / small_sweep["model"] / "seed0"
    names = ["adam"] + [
        f"{v}-b{b}" for v in variants.SWEEP[1:] if v != "two-phase" for b in (3, 6)
    ]
    assert sorted(p.name for p in copied.iterdir()) == sorted(
        f"{name}{suffix}" for name in names for suffix in (".jsonl", ".provenance.json")
    )
    # Each run's records beside its metrics; the copy's summary counts them.
    made = json.loads((record / "provenance.json").read_text())
    assert len(made["run_files"]) == len(names)
    assert made["records"] == sum(
        len(json.loads((record / f).read_text())["records"]) for f in made["run_files"]
    )
    assert sweep_copies.copy_summary(record) == made
    assert metrics(runs_dir / "adam-lbfgs" / "b6") == run_records.read_metrics(
        copied / "adam-lbfgs-b6.jsonl"
    )
    assert not list(record.rglob("checkpoints"))
    # After a change to the second phase: only the tails run again, from the
    # kept checkpoints, and give the same rows.
    before = metrics(
        out / "runs" / small_sweep["model"] / "seed0" / "two-phase-fixed" / "b6"
    )
    compare.main([*argv, "--redo-tails"])
    assert sorted(trained) == [
        ("adam-lbfgs", 3),
        ("adam-lbfgs", 6),
        ("two-phase-fixed", 3),
        ("two-phase-fixed", 6),
    ]
    after = metrics(
        out / "runs" / small_sweep["model"] / "seed0" / "two-phase-fixed" / "b6"
    )
    assert without_timers(after) == without_timers(before)


def test_sweep_mistakes_are_one_line_usage_errors(capsys):
    with pytest.raises(SystemExit) as error:
        compare.main(["--sweep", "--budgets", "1"])
    assert error.value.code == 2
    assert (
        "argument --budgets: must be an integer >= 2, got '1'"
        in capsys.readouterr().err
    )
    with pytest.raises(SystemExit):
        compare.main(["--sweep", "--optimizers", "cg"])
    assert "argument --optimizers: cg not in a sweep" in capsys.readouterr().err


def test_a_retabled_copy_lists_the_runs_it_still_lacks_and_keeps_its_note(tmp_path):
    def write(seed, name, epochs):
        path = tmp_path / "metrics" / "vgg5" / f"seed{seed}" / f"{name}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps({"epoch": e}) + "\n" for e in range(epochs)))

    for seed in (0, 1):
        write(seed, "adam", 6)
        write(seed, "two-phase-fixed-b6", 6)
    write(0, "adam-lbfgs-b6", 6)
    write(1, "adam-lbfgs-b6", 4)  # Stopped before its budget.
    write(2, "adam", 3)  # Stopped before the budget: so is every variant.
    assert sweep_copies.missing_runs(tmp_path, [3, 6]) == [
        ("vgg5", 1, 6, "adam-lbfgs"),
        ("vgg5", 2, 6, "adam, so every variant"),
    ]
    # A copy of one seed has no other seed to infer from: what its table
    # listed stays listed while its file is lacking, in the sweep's order.
    listed = [
        {"model": "vgg5", "seed": 0, "budget": 6, "variant": v}
        for v in ("two-phase", "adam-cosine", "two-phase-fixed")
    ]
    assert sweep_copies.missing_runs(tmp_path, [6], None, listed) == [
        ("vgg5", 0, 6, "adam-cosine"),
        ("vgg5", 0, 6, "two-phase"),
        ("vgg5", 1, 6, "adam-lbfgs"),
        ("vgg5", 2, 6, "adam, so every variant"),
    ]
    write(0, "two-phase", 6)  # The detected swap, copied in since.
    assert ("vgg5", 0, 6, "two-phase") not in sweep_copies.missing_runs(
        tmp_path, [6], None, listed
    )
    table = "\n".join(
        [
            "# digits: when the second phase pays",
            "",
            "Code: twophase_optax at commit abc1234 (clean). (provenance.json)",
            "",
            "Made with `python -m experiments.compare --sweep`.",
            "",
            "Made with `python -m experiments.compare --retable DIR`.",
            "",
            "Run on one core; one run copied in later (`--retable`).",
            "",
            "**Missing** (not run, or not finished, when the table was written):",
            "",
            "- vgg5 seed 1, adam-lbfgs: 6 epochs",
            "",
            "Loss: xent.",
        ]
    )
    assert sweep_copies.header_note(table) == (
        "Made with `python -m experiments.compare --sweep`.\n\n"
        "Run on one core; one run copied in later (`--retable`)."
    )


def test_a_sweep_without_cosine_adam_writes_its_table_and_no_crossover_plot(tmp_path):
    # No entry has both baselines yet: nothing to plot, and no error.
    budget_sweep.plot_crossover([], tmp_path / "crossover.png", "no baselines")
    assert not (tmp_path / "crossover.png").exists()
