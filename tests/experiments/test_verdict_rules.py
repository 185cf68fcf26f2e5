"""The rules a verdict at equal compute follows (no training: rows by hand).

* It needs a second-phase epoch inside the compared compute: a detected swap
  in Adam's last epoch compares Adam's rows with Adam's own.
* An exact 0 (float32 underflow) is named, and kept out of ratios and means.
* A statement that holds by majority lists every seed.
"""

import math
import types

import pytest

pytest.importorskip("flax", reason="the experiments need flax")

from experiments import analysis  # noqa: E402
from experiments import budget_sweep  # noqa: E402
from experiments import tables  # noqa: E402


def rows(losses, swap=None, cg_cost=3.0):
    """A run's rows: 3 forward passes per Adam epoch, ``cg_cost`` per epoch
    from ``swap`` on (phase 1)."""
    out, spent = [], 0.0
    for epoch, loss in enumerate(losses):
        phase = int(swap is not None and epoch >= swap)
        spent += cg_cost if phase else 3.0
        out.append(
            {
                "epoch": epoch,
                "forward_passes": spent,
                "wall_time": spent,
                "train_loss": loss,
                "val_acc": 0.9,
                "phase": phase,
            }
        )
    return out


ADAM = [2.0**-e for e in range(10)]


def cell(variant, *losses_per_seed, swap, cg_cost=3.0):
    runs = []
    for seed, losses in enumerate(losses_per_seed):
        runs += [
            analysis.Run("vgg5", "adam", rows(ADAM), seed),
            analysis.Run("vgg5", "adam-cosine", rows([2 * x for x in ADAM]), seed),
            analysis.Run("vgg5", variant, rows(losses, swap, cg_cost), seed),
        ]
    return runs


def test_a_swap_in_adams_last_epoch_gives_no_verdict():
    # The swap after epoch 8: its one CG epoch costs 20 forward passes, so
    # within Adam's 30 the run has only Adam's rows.
    runs = cell("two-phase", ADAM[:9] + [1e-9], swap=9, cg_cost=20.0)
    run = runs[-1]
    assert analysis.loss_ratio(runs, run) == analysis.NO_SECOND_PHASE
    assert analysis.wins_both(runs, run) is None
    [entry] = analysis.summary({10: runs})
    assert entry["wins"] is None and entry["ratio"] == analysis.NO_SECOND_PHASE
    assert analysis.crossover([entry], "vgg5", "two-phase") is None
    verdicts = analysis.cell_verdicts(runs, analysis.cells(runs)[-1])
    assert verdicts["compute"]["no_second_phase"] == 1
    assert verdicts["compute"]["wins"] == 0
    text = tables.verdict_cell(verdicts["compute"], "two-phase", swapped=1)
    assert analysis.NO_SECOND_PHASE in text
    line = budget_sweep.verdict_lines({10: runs})
    assert line.endswith(analysis.NO_SECOND_PHASE)
    # At equal epochs the CG epoch is inside: a verdict.
    assert analysis.wins_both(runs, run, "epoch") is True


def test_an_exact_zero_wins_but_is_kept_out_of_ratios_and_means():
    cheap = ADAM[:5] + [1e-3, 0.0, 0.0, 0.0, 0.0]
    dear = ADAM[:5] + [0.5] * 5
    runs = cell("two-phase-fixed", cheap, dear, swap=5)
    entries = analysis.summary({10: runs})
    assert [e["ratio"] for e in entries] == [analysis.UNDERFLOW, 0.5 / 2.0**-9]
    assert [e["wins"] for e in entries] == [True, False]
    ratios = [e["ratio"] for e in entries]
    assert analysis.geometric_mean(ratios) == pytest.approx(0.5 / 2.0**-9)
    assert analysis.excluded(ratios) == {analysis.UNDERFLOW: 1}
    assert math.isnan(analysis.geometric_mean([0.0, analysis.NO_SECOND_PHASE]))
    text = tables.ratio_text(ratios, [e["wins"] for e in entries])
    assert text == "2.6e+02 (1/2) [0 (underflow), 2.6e+02]"
    verdicts = analysis.cell_verdicts(runs, analysis.cells(runs)[-1])["compute"]
    assert tables.ratio_text([analysis.UNDERFLOW], [True]) == "0, underflow (1/1)"
    assert verdicts["underflow"] == 1 and verdicts["loss"] == 0.5  # 0 not averaged
    assert verdicts["per_seed"] == [[0.0, 2.0**-9], [0.5, 2.0**-9]]


def test_a_majority_statement_lists_every_seed():
    won = ADAM[:5] + [1e-6] * 5
    lost = ADAM[:5] + [0.5] * 5
    runs = cell("two-phase-fixed", won, won, lost, swap=5)
    line = budget_sweep.verdict_lines({10: runs})
    assert "WINS at equal compute in 2 of 3 seeds" in line
    assert line.endswith("ratio per seed 0.00051, 0.00051, 2.6e+02)")


def test_a_tie_at_underflow_is_named_not_counted_as_a_loss():
    # Seed 0 reaches 0 where cosine Adam also underflows to 0; seed 1 wins.
    tied = ADAM[:5] + [0.0] * 5
    runs = cell("adam-lbfgs", tied, ADAM[:5] + [1e-6] * 5, swap=5)
    for row in runs[1].rows[5:]:
        row["train_loss"] = 0.0
    assert [analysis.outcome(runs, r) for r in (runs[2], runs[5])] == ["tie", "win"]
    line = budget_sweep.verdict_lines({10: runs})
    assert "DOES NOT WIN at equal compute in 1 of 2 seeds, 1 tied" in line
    assert (
        budget_sweep.verdict_lines({10: runs[:3]})
        .split(": ")[1]
        .startswith("TIES at equal compute (")
    )
    # Above the better baseline in most seeds: a loss, ties named.
    lost = ADAM[:5] + [0.5] * 5
    runs = cell("adam-lbfgs", tied, lost, lost, swap=5)
    for row in runs[1].rows[5:]:
        row["train_loss"] = 0.0
    line = budget_sweep.verdict_lines({10: runs})
    assert "LOSES at equal compute in 0 of 3 seeds, 1 tied" in line


def test_a_model_without_tails_names_no_crossover(tmp_path):
    runs = cell("two-phase-fixed", ADAM[:5] + [1e-6] * 5, swap=5)
    for run in runs:
        for row in run.rows:
            row.update(train_acc=1.0, val_loss=0.002, compile_time=0.0, num_params=1)
    # vit-mlp: its Adam runs only, the second phases not run yet.
    runs += [analysis.Run("vit-mlp", r.optimizer, r.rows, 0) for r in runs[:2]]
    data = types.SimpleNamespace(name="digits", x_train=[0] * 8, num_classes=10)
    budget_sweep.write_sweep({10: runs}, data, tmp_path, "softmax_mse")
    table = (tmp_path / "table.md").read_text().splitlines()
    assert "| vgg5 | 10 epochs |" in "\n".join(table)
    assert any(line.startswith("| vit-mlp | - |") for line in table)
    assert not any(line.startswith("| vit-mlp | none up to") for line in table)


def test_table_1_layout_sets_the_papers_rows_beside_the_means_of_ours():
    runs = cell("two-phase-fixed", ADAM[:5] + [1e-6] * 5, ADAM[:5] + [3e-6] * 5, swap=5)
    for run in runs:
        for row in run.rows:
            row.update(train_acc=1.0, val_loss=0.002, val_acc=0.99)
    lines = tables.table_1_layout(runs, 10)
    [vgg5] = [line for line in lines if line.startswith("| vgg5 |")]
    cells = [c.strip() for c in vgg5.strip("|").split("|")]
    assert cells[1:3] == [".0001/1.0000/.0014/.9930", ".0001/1.0000/.0011/.9940"]
    adam, _, fixed = cells[3:6]
    assert adam == ".0020/1.0000/.0020/.9900 (2)"  # 2**-9, both seeds
    assert fixed == "2.0e-06/1.0000/.0020/.9900 (2)"  # the mean of 1e-6, 3e-6
    assert tables.paper_number(0.0) == "0 (underflow)"


def test_the_validation_tally_reads_each_run_at_adams_compute():
    won = ADAM[:5] + [1e-6] * 5
    lost = ADAM[:5] + [0.5] * 5
    runs = cell("two-phase-fixed", won, lost, swap=5)
    for run in runs:
        better = run.optimizer == "two-phase-fixed" and run.seed == 0
        for row in run.rows:
            row["val_acc"] = 0.95 if better and row["phase"] else 0.9
    tally = analysis.validation_tally({10: runs})["two-phase-fixed"]
    assert tally["won"] == {"higher": 1, "equal": 0, "lower": 0, "seeds": [0]}
    assert tally["lost"] == {"higher": 0, "equal": 1, "lower": 0, "seeds": [1]}
    lines = tables.validation_lines({"two-phase-fixed": tally})
    assert "| two-phase (fixed split) | beat both | 1 | 0 | 0 | 0 |" in lines
