"""compare's table: equal epochs, compute and time, and its verdict line."""

import types

import numpy as np
import pytest

pytest.importorskip("matplotlib", reason="compare plots with matplotlib")
from experiments import analysis  # noqa: E402
from experiments import compare  # noqa: E402
from experiments import run_records  # noqa: E402
from experiments import tables  # noqa: E402


def rows(losses, forward_passes, wall_times):
    return [
        {
            "epoch": epoch,
            "train_loss": loss,
            "train_acc": 0.9,
            "val_loss": loss,
            "val_acc": 0.9,
            "phase": int(epoch > 0),
            "forward_passes": compute,
            "wall_time": seconds,
            "compile_time": 0.5,
            "num_params": 100,
        }
        for epoch, (loss, compute, seconds) in enumerate(
            zip(losses, forward_passes, wall_times, strict=True)
        )
    ]


RUNS = [
    analysis.Run("vgg5", "adam", rows([1.0, 0.5, 0.25], [3, 6, 9], [1, 2, 3])),
    analysis.Run("vgg5", "two-phase", rows([1.0, 0.4, 0.1], [3, 9, 20], [1, 3, 10])),
]


def test_verdict_compares_at_equal_epochs_compute_and_time():
    line = tables.verdict(RUNS, RUNS[1])
    # Epoch 2 against epoch 2; at compute 9 its epoch 1 against Adam's epoch
    # 2; at time 3 the same pair.
    assert line == (
        "vgg5, two-phase (detected swap) against Adam: "
        "equal epochs: two-phase (0.1 vs 0.25); "
        "equal compute: Adam (0.4 vs 0.25); "
        "equal time: Adam (0.4 vs 0.25)"
    )


def test_table_ends_with_the_verdict_and_says_what_it_counts(tmp_path):
    dataset = types.SimpleNamespace(
        name="digits", x_train=np.zeros((10, 1)), num_classes=10
    )
    compare.write_table(RUNS, dataset, tmp_path / "table.md", "softmax_mse")
    text = (tmp_path / "table.md").read_text()
    assert text.rstrip().splitlines()[-1] == "- " + tables.verdict(RUNS, RUNS[1])
    assert "compilation (compile s) is timed apart" in text
    assert "a value 1, a value and gradient 3" in text


def test_a_run_that_never_swapped_is_marked_as_adams(tmp_path):
    """Two-phase without a swap is Adam recompiled: its verdicts say so,
    those of a run that swapped do not."""
    import json

    unswapped = [
        {**row, "phase": 0} for row in rows([1.0, 0.45, 0.2], [3, 6, 9], [1, 2, 3])
    ]
    runs = [RUNS[0], analysis.Run("vit-mlp", "adam", RUNS[0].rows)]
    runs += [RUNS[1], analysis.Run("vit-mlp", "two-phase", unswapped)]
    dataset = types.SimpleNamespace(
        name="digits", x_train=np.zeros((10, 1)), num_classes=10
    )
    compare.write_table(runs, dataset, tmp_path / "table.md", "softmax_mse")
    text = (tmp_path / "table.md").read_text()
    no_swap = analysis.NO_SWAP
    assert (
        "| vit-mlp | two-phase (detected swap) | "
        "no swap: two-phase 1/1 (0.2 vs 0.25) | " in text
    )
    assert "| vgg5 | two-phase (detected swap) | two-phase 1/1 (0.1 vs 0.25) |" in text
    assert tables.verdict(runs, runs[3]).endswith(f"; {no_swap}")
    assert no_swap not in tables.verdict(runs, runs[2])
    cells = json.loads((tmp_path / "table.json").read_text())
    swapped = {c["model"]: c["swapped"] for c in cells if c["optimizer"] != "adam"}
    assert swapped == {"vgg5": 1, "vit-mlp": 0}


def study_runs():
    """Five optimizers, two seeds, on one model: every loss distinct."""
    runs = []
    for seed in (0, 1):
        for k, optimizer in enumerate(compare.STUDY_OPTIMIZERS):
            # Adam steady; the others faster per epoch, costlier per epoch.
            scale = 1.0 + 0.1 * seed
            losses = [scale * (1.0 - 0.3 * epoch * (1 + 0.1 * k)) for epoch in range(3)]
            cost = [3 * (epoch + 1) * (1 + k) for epoch in range(3)]
            runs.append(
                analysis.Run("vgg5", optimizer, rows(losses, cost, [1, 2, 3 + k]), seed)
            )
    return runs


def test_study_table_has_every_cell_and_its_numbers_come_from_the_runs(tmp_path):
    import json

    runs = study_runs()
    dataset = types.SimpleNamespace(
        name="digits", x_train=np.zeros((10, 1)), num_classes=10
    )
    compare.write_table(runs, dataset, tmp_path / "table.md", "softmax_mse")
    cells = json.loads((tmp_path / "table.json").read_text())
    assert [c["optimizer"] for c in cells] == compare.STUDY_OPTIMIZERS
    for cell in cells:
        mine = [r for r in runs if r.optimizer == cell["optimizer"]]
        assert cell["seeds"] == [0, 1]
        assert cell["train_loss"] == [r.last["train_loss"] for r in mine]
        assert cell["forward_passes"] == [r.last["forward_passes"] for r in mine]
        if cell["optimizer"] == "adam":
            assert "verdicts" not in cell
            continue
        # Equal epochs: every optimizer's last loss is below Adam's of the
        # same seed. Equal compute: Adam's total (9) buys the others only
        # their first epoch (loss 1.0 * scale) against Adam's last (0.4 *
        # scale).
        epochs, compute = cell["verdicts"]["epochs"], cell["verdicts"]["compute"]
        assert (epochs["wins"], epochs["seeds"]) == (2, 2)
        adam_last = [r.last["train_loss"] for r in runs if r.optimizer == "adam"]
        assert epochs["adam_loss"] == pytest.approx(np.mean(adam_last))
        assert epochs["loss"] == pytest.approx(np.mean(cell["train_loss"]))
        assert compute["wins"] == 0
    text = (tmp_path / "table.md").read_text()
    table = [line for line in text.splitlines() if line.startswith("| vgg5 |")]
    # Five result rows and four verdict rows, one per optimizer against Adam.
    assert len(table) == 5 + 4
    assert "| vgg5 | CG from the start | cg 2/2 (" in text
    assert "seeds 0, 1" in text.splitlines()[0]
    # Mean ± half the range over the seeds: Adam's final losses 0.4 and 0.44.
    assert "| 0.42 ± 0.02 |" in text


def test_a_finished_run_is_read_back_not_trained_again(tmp_path, monkeypatch):
    import json

    out = tmp_path / "runs" / "vgg5" / "adam" / "seed0"
    out.mkdir(parents=True)
    finished = rows([1.0, 0.5], [3, 6], [1, 2])
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in finished))

    def no_training(config):
        raise AssertionError(f"trained {config.run.out} again")

    monkeypatch.setattr(compare.train_lib, "train", no_training)
    args = types.SimpleNamespace(
        models=["vgg5"],
        optimizers=["adam"],
        seeds={"vgg5": [0]},
        epochs=2,
        out=tmp_path,
        resume=True,
    )
    (run,) = compare.run_all(args)
    assert run.rows == finished and run.seed == 0


def test_seeds_for_gives_named_models_their_own_seeds(tmp_path, monkeypatch):
    """--seeds-for: three seeds for one model, --seeds' one for the other,
    and the table's title and seeds column say which."""
    import json

    trained = []

    def fake_train(config):
        trained.append((config.run.model, config.optimizer.name, config.run.seed))
        loss = 0.5 if config.optimizer.name == "adam" else 0.4 + config.run.seed / 100
        return [{**row, "gn_reading": 1.0} for row in rows([1.0, loss], [3, 6], [1, 2])]

    monkeypatch.setattr(compare.train_lib, "train", fake_train)
    compare.main(
        [
            "--seeds",
            "1",
            "--seeds-for",
            "vit-mlp=3",
            "--models",
            "vgg5",
            "vit-mlp",
            "--optimizers",
            "two-phase",
            "--epochs",
            "2",
            "--out",
            str(tmp_path),
            "--no-progress",
        ]
    )
    assert trained == [
        ("vgg5", "adam", 0),
        ("vgg5", "two-phase", 0),
        *[("vit-mlp", "adam", s) for s in (0, 1, 2)],
        *[("vit-mlp", "two-phase", s) for s in (0, 1, 2)],
    ]
    title = (tmp_path / "table.md").read_text().splitlines()[0]
    assert title.endswith("(2 epochs, seeds 0, 1, 2 for vit-mlp; seed 0 for vgg5)")
    cells = json.loads((tmp_path / "table.json").read_text())
    assert [(c["model"], c["seeds"]) for c in cells] == [
        ("vgg5", [0]),
        ("vgg5", [0]),
        ("vit-mlp", [0, 1, 2]),
        ("vit-mlp", [0, 1, 2]),
    ]
    assert cells[3]["train_loss"] == [0.4 + s / 100 for s in (0, 1, 2)]
    assert cells[3]["verdicts"]["epochs"]["wins"] == 3


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["--seeds-for", "vgg5=0"],
            "argument --seeds-for: vgg5=0: must be an integer >= 1",
        ),
        (
            ["--seeds-for", "vgg6=2"],
            "argument --seeds-for: must be NAME=VALUE with NAME one of",
        ),
        (
            ["--seeds-for", "vgg5=2", "--models", "vit-mlp"],
            "argument --seeds-for: vgg5 not among --models",
        ),
    ],
)
def test_seeds_for_mistakes_are_one_line_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        compare.main(argv)
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert ": error: " + message in error


@pytest.mark.slow
def test_quick_study_table_holds_every_run_and_nothing_else(tmp_path):
    """The study command end to end on a tiny budget: five optimizers really
    trained, and every number of the table read back from the runs' metrics."""
    import json

    model = "vit-nomlp-wkewq-wvwo"  # the smallest model compiles fastest
    compare.main(
        [
            "--dataset",
            "digits",
            "--study",
            "--seeds",
            "1",
            "--epochs",
            "2",
            "--swap-epoch",
            "1",
            "--models",
            model,
            "--out",
            str(tmp_path),
            "--no-progress",
        ]
    )
    cells = json.loads((tmp_path / "table.json").read_text())
    assert [c["optimizer"] for c in cells] == compare.STUDY_OPTIMIZERS
    metrics = {
        c["optimizer"]: run_records.read_metrics(
            tmp_path / "runs" / model / c["optimizer"] / "seed0" / "metrics.jsonl"
        )
        for c in cells
    }
    # Which epochs ran CG (or L-BFGS): none for Adam, all for CG from the
    # start, from --swap-epoch for the fixed splits.
    phases = {name: [r["phase"] for r in rows] for name, rows in metrics.items()}
    assert phases["adam"] == [0, 0]
    assert phases["cg"] == [1, 1]
    assert phases["two-phase-fixed"] == phases["adam-lbfgs"] == [0, 1]
    for cell in cells:
        last = metrics[cell["optimizer"]][-1]
        assert cell["seeds"] == [0]
        for key in ("train_loss", "val_acc", "forward_passes", "wall_time"):
            assert cell[key] == [last[key]]
        if cell["optimizer"] == "adam":
            continue
        adam_rows = metrics["adam"]
        for budget, key in (("epochs", "epoch"), ("compute", "forward_passes")):
            # Recomputed here: both runs at their last epoch within the
            # smaller of the two totals.
            limit = min(last[key], adam_rows[-1][key])
            ours = [r for r in metrics[cell["optimizer"]] if r[key] <= limit]
            adams = [r for r in adam_rows if r[key] <= limit]
            v = cell["verdicts"][budget]
            if not ours:
                assert v["loss"] is None
                continue
            rows = metrics[cell["optimizer"]]
            swap = next((r["epoch"] for r in rows if r["phase"]), None)
            if swap is not None and ours[-1]["epoch"] < swap:
                # No second-phase epoch inside the compared budget: no verdict.
                assert v["no_second_phase"] == 1
                assert v["loss"] is None and v["wins"] == 0
                continue
            assert v["loss"] == ours[-1]["train_loss"]
            assert v["adam_loss"] == adams[-1]["train_loss"]
            assert v["wins"] == int(ours[-1]["train_loss"] < adams[-1]["train_loss"])
    # CG from the start costs more than Adam's 3 per epoch: its first step
    # evaluates the gradient and then searches the line.
    assert metrics["cg"][0]["forward_passes"] > metrics["adam"][0]["forward_passes"]
    table = (tmp_path / "table.md").read_text()
    assert sum(line.startswith(f"| {model} |") for line in table.splitlines()) == 5 + 4
    assert "Made with `python -m experiments.compare --dataset digits --study " in table
    for name in ("loss_vs_epoch", "loss_vs_compute", "loss_vs_time"):
        assert (tmp_path / f"{name}.png").stat().st_size > 0
