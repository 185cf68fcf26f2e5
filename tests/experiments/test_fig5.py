"""The Fig. 5 script: peak, smoothed peak and Algorithm 1's swap, and its files."""

import json

import numpy as np
import pytest

pytest.importorskip("flax", reason="the Fig. 5 runs train the experiment models")
from experiments import analysis  # noqa: E402
from experiments import config as config_lib  # noqa: E402
from experiments import fig5  # noqa: E402
from experiments import run_records  # noqa: E402


def algorithm1_as_printed(readings, gn_factor):
    """The paper's loop in plain Python: the epoch after which CG starts."""
    gn_max = 0.0
    for epoch, gn in enumerate(readings):
        gn_max = max(gn, gn_max)
        if not gn > gn_max * gn_factor:
            return epoch
    return None


@pytest.mark.parametrize("seed", range(5))
def test_swap_replayed_through_the_library_equals_algorithm_1(seed):
    rng = np.random.default_rng(seed)
    # A noisy rise then fall, like the readings under Adam.
    t = np.arange(60)
    readings = (0.02 + 0.08 * np.exp(-(((t - 25) / 10) ** 2))) * rng.uniform(
        0.85, 1.15, 60
    )
    expected = algorithm1_as_printed(readings.astype(np.float32), 0.9)
    assert fig5.algorithm1_swap(readings, 0.9) == expected


def test_no_swap_while_the_readings_rise():
    assert fig5.algorithm1_swap(np.linspace(1.0, 2.0, 10), 0.9) is None


def test_analyse_marks_the_peak_the_smoothed_peak_and_the_shape():
    readings = [1.0, 1.0, 1.0, 2.0, 5.0, 3.0, 3.0, 3.0, 2.0, 1.0, 1.0, 0.5, 0.5]
    rows = [
        {"gn_reading": g, "train_loss": 1.0 / (i + 1)} for i, g in enumerate(readings)
    ]
    result = fig5.analyse(rows, 0.9)
    assert result["peak"] == {"epoch": 5, "train_loss": 1 / 5, "gn_reading": 5.0}
    smoothed = analysis.centred_average(np.array(readings))
    # Centred 5-epoch means: epoch 6 averages epochs 4..8 = (2+5+3+3+3)/5, and
    # epoch 7 ties with it; the first of equal maxima counts.
    assert smoothed[5] == pytest.approx(3.2) and smoothed[6] == pytest.approx(3.2)
    assert result["smoothed_peak"]["epoch"] == 6
    assert result["algorithm1_swap"]["epoch"] == 6  # 3.0 <= 0.9 * 5.0
    default = fig5.tpo.swap.replay(fig5.tpo.swap.peak(), grad_norm=readings)
    assert result["default_swap"]["epoch"] == default + 1
    # The ends average what there is: epoch 1 the first three readings.
    assert result["rise"] == pytest.approx(3.2 / 1.0)
    assert result["fall"] == pytest.approx((1.0 + 0.5 + 0.5) / 3 / 3.2)
    assert result["rise_then_fall"]
    flat = fig5.analyse([{"gn_reading": 1.0, "train_loss": 1.0}] * 6, 0.9)
    assert not flat["rise_then_fall"]
    assert fig5.verdict(flat).startswith("NO rise-then-fall")


def test_quick_mode_writes_the_plot_and_the_data_it_is_drawn_from(tmp_path, capsys):
    fig5.main(["--quick", "--out", str(tmp_path), "--no-progress"])
    png = tmp_path / "digits-vit-mlp.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    record = json.loads((tmp_path / "digits-vit-mlp.json").read_text())
    metrics = run_records.read_metrics(
        tmp_path / "runs" / "digits" / "vit-mlp" / "metrics.jsonl"
    )
    assert [r["gn_reading"] for r in record["rows"]] == [
        m["gn_reading"] for m in metrics
    ]
    assert [r["epoch"] for r in record["rows"]] == [1, 2, 3, 4]
    readings = [m["gn_reading"] for m in metrics]
    assert record["peak"]["epoch"] == int(np.argmax(readings)) + 1
    assert record["loss"] == "softmax_mse" and record["batch_size"] == 512
    summary = (tmp_path / "summary.md").read_text()
    assert "| digits | vit-mlp | softmax_mse | 4 |" in summary
    assert "| digits | vit-mlp | softmax_mse | 4 |" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, flag",
    [(["--epochs", "-3"], "--epochs"), (["--gn-factor", "1.5"], "--gn-factor")],
)
def test_bad_flags_are_one_line_errors(argv, flag, capsys):
    with pytest.raises(SystemExit) as exit_:
        fig5.main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("fig5.py: error: argument " + flag) or (
        "error: argument " + flag in err
    )


def test_analyse_marks_where_the_default_rule_swaps():
    # A loss that stops falling: the plateau (5 epochs within 10% of the best)
    # fires; the errors never reach 0, so the fit rule does not.
    losses = [1.0, 0.5, 0.3, 0.2] + [0.19] * 30
    rows = [
        {"gn_reading": 1.0, "train_loss": v, "batch_loss": v, "batch_errors": 3}
        for v in losses
    ]
    result = fig5.analyse(rows, 0.9)
    expected = run_records.replayed_swap(config_lib.Config(), rows)
    assert expected is not None and 4 <= expected < len(rows)
    assert result["default_rule_swap"]["epoch"] == expected + 1
    # Metrics written before the rows carried batch losses: no mark.
    old = fig5.analyse([{"gn_reading": 1.0, "train_loss": 1.0}] * 6, 0.9)
    assert old["default_rule_swap"] is None
