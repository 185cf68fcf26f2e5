"""compare's table: equal epochs, compute and time, and its verdict line."""

import types

import numpy as np
import pytest

pytest.importorskip("matplotlib", reason="compare plots with matplotlib")
from experiments import compare  # noqa: E402


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
            "num_params": 100,
        }
        for epoch, (loss, compute, seconds) in enumerate(
            zip(losses, forward_passes, wall_times, strict=True)
        )
    ]


RUNS = [
    compare.Run("vgg5", "adam", rows([1.0, 0.5, 0.25], [3, 6, 9], [1, 2, 3])),
    compare.Run("vgg5", "two-phase", rows([1.0, 0.4, 0.1], [3, 9, 20], [1, 3, 10])),
]


def test_verdict_compares_at_equal_epochs_compute_and_time():
    line = compare.verdict(RUNS, RUNS[1])
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
    assert text.rstrip().splitlines()[-1] == "- " + compare.verdict(RUNS, RUNS[1])
    assert "compilation included; evaluation and checkpoints are not counted" in text
    assert "a value 1, a value and gradient 3" in text
