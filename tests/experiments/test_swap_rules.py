"""The swap rules in the experiments: replays on recorded metrics, live runs.

Before its swap a two-phase run is the Adam run, so a rule replayed on the Adam
run's rows must name the epoch after which the live run swaps, and the tail
from that epoch's checkpoint must be the live run. The benchmark's rules are
pinned on constructed rows.
"""

import json
import math
import pathlib
import shutil

import pytest

pytest.importorskip("flax", reason="the experiments need flax")
pytest.importorskip("orbax.checkpoint", reason="checkpoints need orbax")

from _runs import without_timers  # noqa: E402

import twophase_optax as tpo  # noqa: E402
from experiments import analysis  # noqa: E402
from experiments import budget_sweep  # noqa: E402
from experiments import checkpoints  # noqa: E402
from experiments import config as config_lib  # noqa: E402
from experiments import run_records  # noqa: E402
from experiments import train  # noqa: E402
from experiments.benchmarks import swap_rules  # noqa: E402
from experiments.benchmarks import swap_rules_report as report  # noqa: E402

EPOCHS = 7
# Each fires within 7 epochs on this model: the raw reading's first fall (after
# epoch 4), an epoch loss that does not fall by 30% in an epoch (after epoch 1,
# and again after epoch 4), the same once the peak has fired, and an epoch with
# at most 240 of 1,437 examples wrong.
RULES = {
    "peak": dict(gn_factor=0.995, smoothing=1.0, patience=1, min_rise=1.0),
    "plateau": dict(plateau_rtol=0.3, plateau_patience=1, plateau_smoothing=1.0),
    "peak-then-plateau": dict(
        gn_factor=0.995,
        smoothing=1.0,
        min_rise=1.0,
        plateau_rtol=0.3,
        plateau_patience=1,
        plateau_smoothing=1.0,
    ),
    "fit": dict(fit_errors=240, fit_patience=1),
    "fit-or-plateau": dict(
        fit_errors=240,
        fit_patience=2,
        plateau_rtol=0.3,
        plateau_patience=1,
        plateau_smoothing=1.0,
    ),
}


@pytest.fixture(scope="module")
def adam_run(tmp_path_factory, small_sweep):
    """Adam for 7 epochs, every epoch's checkpoint kept."""
    out = tmp_path_factory.mktemp("adam")
    config = config_lib.Config.of(
        **small_sweep,
        optimizer="adam",
        epochs=EPOCHS,
        keep_epochs=tuple(range(EPOCHS)),
        out=str(out),
    )
    return out, train.train(config)


def test_the_adam_run_records_what_the_rules_read(adam_run):
    _, rows = adam_run
    for r in rows:
        assert 0 <= r["batch_errors"] <= 1437
        # The mean batch loss is taken before each step's update: above the
        # loss after the epoch while Adam is falling fast.
        assert r["batch_loss"] > 0
    assert rows[-1]["batch_errors"] < rows[0]["batch_errors"]
    assert rows[0]["batch_loss"] > rows[0]["train_loss"]


@pytest.mark.parametrize("rule", list(RULES))
def test_a_replayed_rule_swaps_where_the_live_run_does(
    rule, adam_run, tmp_path, small_sweep
):
    adam_dir, adam_rows = adam_run
    settings = dict(swap_rule=rule, **RULES[rule])
    replayed = run_records.replayed_swap(config_lib.Config.of(**settings), adam_rows)
    assert replayed is not None and replayed + 1 < EPOCHS  # It fires in time.
    live = train.train(
        config_lib.Config.of(
            **small_sweep,
            optimizer="two-phase",
            epochs=EPOCHS,
            out=str(tmp_path / "live"),
            **settings,
        )
    )
    assert analysis.Run("m", "two-phase", live).swap_epoch == replayed + 1
    # And the sweep's tail from that epoch is the live run, bit for bit.
    sweep = budget_sweep.Sweep(
        models=[small_sweep["model"]],
        seeds={small_sweep["model"]: [0]},
        budgets=[EPOCHS],
        detector=settings,
    )
    assert budget_sweep.detected_epoch(sweep, adam_rows, EPOCHS) == replayed
    tail = train.train(
        config_lib.Config.of(
            **small_sweep,
            optimizer="two-phase",
            epochs=EPOCHS,
            out=str(tmp_path / "tail"),
            prefix_run=str(adam_dir),
            prefix_epoch=replayed,
            **settings,
        )
    )
    assert without_timers(tail) == without_timers(live)


def test_the_rules_differ_where_they_should(adam_run):
    _, rows = adam_run
    swaps = {
        rule: run_records.replayed_swap(config_lib.Config.of(swap_rule=rule, **s), rows)
        for rule, s in RULES.items()
    }
    peak = swaps["peak"]
    # The plateau alone fires before the peak; armed by it, on or after it.
    assert swaps["plateau"] < peak <= swaps["peak-then-plateau"]
    fit = next(i for i, r in enumerate(rows) if r["batch_errors"] <= 240)
    assert swaps["fit"] == fit
    either = min(swaps["plateau"], fit + 1)  # fit_patience 2
    assert swaps["fit-or-plateau"] == either
    strict = config_lib.Config.of(swap_rule="fit", fit_errors=0)
    assert run_records.replayed_swap(strict, rows) is None  # Nothing fits in 7 epochs.


def test_no_detected_swap_in_a_budgets_last_fifth_unless_late_swaps_are_asked(
    adam_run,
):
    _, rows = adam_run
    settings = dict(swap_rule="peak", **RULES["peak"])
    config = config_lib.Config.of(**settings)
    late = config_lib.Config.of(**settings, late_swap=True)
    found = run_records.replayed_swap(config, rows)
    assert found == 4  # So a run of 5 epochs may swap after 4 at the latest.
    for budget in range(found + 1, 4 * (found + 1)):
        in_time = found + 1 <= budget - budget // 5
        expected = found if in_time else None
        assert run_records.replayed_swap(config, rows, budget=budget) == expected
        assert run_records.replayed_swap(late, rows, budget=budget) == found
        # The live run's rule (tpo.swap.within) and the study's agree.
        rule = config.optimizer.swap.make(epochs=budget)
        assert tpo.swap.replay(rule, **run_records.records(rule, rows)) == expected
        if budget > found + 1:
            swap = swap_rules.Swap(found, cut=True)
            assert swap.within(budget) == in_time


def test_old_metrics_without_the_loss_say_to_train_again():
    rows = [{"epoch": 0, "gn_reading": 1.0, "train_loss": 0.1}]
    with pytest.raises(
        checkpoints.RunOutputError, match="'batch_loss'.*Train the Adam"
    ):
        run_records.replayed_swap(config_lib.Config.of(swap_rule="plateau"), rows)


def test_swap_rule_flags_are_checked():
    config = config_lib.parse_args(["--swap-rule", "fit", "--fit-errors", "3"])
    assert (config.optimizer.swap.rule, config.optimizer.swap.fit_errors) == ("fit", 3)
    with pytest.raises(SystemExit):
        config_lib.parse_args(["--plateau-rtol", "1.5"])
    with pytest.raises(ValueError, match="tpo.swap.plateau: patience"):
        config_lib.Config.of(plateau_patience=0).validate()


def test_each_swap_rule_flag_maps_onto_its_tpo_swap_rule():
    readings = [1.0, 2.0, 3.0, 2.6, 2.8, 2.0, 1.5, 1.0, 0.5, 0.4, 0.3]
    paper = config_lib.parse_args(["--paper-rule"])
    assert tpo.swap.replay(paper.optimizer.swap.make(), grad_norm=readings) == 3
    assert tpo.swap.replay(tpo.swap.PAPER, grad_norm=readings) == 3
    rule = config_lib.Config().optimizer.swap.make(steps_per_epoch=7)
    assert (rule.kind, rule.window, rule.children[0].kind) == (
        "per_window",
        7,
        "any_of",
    )
    kinds = {
        name: config_lib.Config.of(swap_rule=name).optimizer.swap.make().kind
        for name in config_lib.SWAP_RULES
    }
    assert kinds == {
        "peak": "peak",
        "plateau": "plateau",
        "peak-then-plateau": "after",
        "fit": "fitted",
        "fit-or-plateau": "any_of",
    }


# -- the benchmark's rules on constructed rows ------------------------------
def rows_from(losses, errors=None, fwd_per_epoch=3.0):
    errors = errors or [5] * len(losses)
    return [
        {
            "epoch": i,
            "batch_loss": loss,
            "train_loss": loss,
            "gn_reading": 1.0,
            "batch_errors": e,
            "forward_passes": fwd_per_epoch * (i + 1),
            "wall_time": 0.1 * (i + 1),
        }
        for i, (loss, e) in enumerate(zip(losses, errors, strict=True))
    ]


def test_fit_rules_swap_after_the_first_fitted_epochs():
    rows = rows_from([1.0] * 8, errors=[9, 3, 0, 1, 0, 0, 0, 2])
    assert swap_rules.RULES["fit"](rows, None).after == 2
    # A constant loss: the plateau's fifth flat epoch comes first.
    either = swap_rules.RULES[swap_rules.FIT_OR_PLATEAU]
    assert either(rows, None).after == 5
    # The default: the same swap, none in a budget's last fifth.
    default = swap_rules.RULES[swap_rules.DEFAULT](rows, None)
    assert default.after == 5
    assert [default.within(b) for b in (6, 7, 8)] == [False, True, True]
    fit3 = swap_rules.replayed(tpo.swap.fitted(patience=3))
    assert fit3(rows, None).after == 6


def test_the_probe_swaps_where_cg_falls_faster_per_forward_pass():
    # Adam's loss halves every 5 epochs (log 2 / 15 per forward pass); CG
    # from epoch e falls by a factor f(e) over 3 epochs of 5 passes each.
    adam = rows_from([2.0 ** (-i / 5) for i in range(40)])
    rates = {15: 1.5, 20: 1.9, 25: 2.5}  # > 2 ** (15 / 15 * 1) beats Adam

    def probe(after, steps):
        fall = rates.get(after, 1.0)
        rows = adam[: after + 1]
        for k in range(1, steps + 1):
            rows.append(
                {
                    **rows[after],
                    "epoch": after + k,
                    "train_loss": rows[after]["train_loss"] / fall ** (k / steps),
                    "forward_passes": rows[after]["forward_passes"] + 5.0 * k,
                    "wall_time": rows[after]["wall_time"] + 0.2 * k,
                }
            )
        return rows

    rule = swap_rules.probe_rule(every=5, steps=3, window=5, arm="start")
    swap = rule(adam, probe)  # Probes at 5, 10, 15, ...
    # Adam's rate over 5 epochs: log 2 / 15; CG's at 25: log 2.5 / 15 beats it.
    assert swap.after == 25
    assert [p[0] for p in swap.probes] == [5, 10, 15, 20]
    assert all(math.isclose(p[1], 15.0) for p in swap.probes)
    # Lost probes cost compute from the epoch after them on.
    shifted = swap_rules.with_probes(adam, swap.probes, 30)
    assert shifted[5]["forward_passes"] == adam[5]["forward_passes"]
    assert shifted[6]["forward_passes"] == adam[6]["forward_passes"] + 15.0
    assert shifted[29]["forward_passes"] == adam[29]["forward_passes"] + 60.0


def test_judge_names_the_cells_that_miss_each_target():
    cell = dict(model="m", seed=0, rule="r", probes=0)
    entries = [
        {
            **cell,
            "budget": 20,
            "swap_epoch": 6,
            "vs_adam": 1.5,
            "vs_better_adam": 1.6,
            "vs_hindsight": 20.0,
        },
        {
            **cell,
            "budget": 50,
            "swap_epoch": None,
            "vs_adam": 1.0,
            "vs_better_adam": 1.2,
            "vs_hindsight": 3.0,
        },
        {
            **cell,
            "budget": 150,
            "swap_epoch": 40,
            "vs_adam": 0.1,
            "vs_better_adam": 0.2,
            "vs_hindsight": 1.0,
        },
    ]
    verdict = swap_rules.judge(entries, {"m": 50})["r"]
    assert verdict["worse_than_adam"] == ["m s0 20"]
    assert verdict["behind_past_crossover"] == ["m s0 50"]
    assert (verdict["within_decade"], verdict["judged_against_hindsight"]) == (2, 3)


def test_a_recorded_study_judged_again_gives_its_committed_verdicts(tmp_path):
    root = pathlib.Path(__file__).resolve().parents[2]
    folder = tmp_path / "digits-xent"
    shutil.copytree(root / "results" / "swap_rules" / "digits-xent", folder)
    committed = json.loads((folder / "table.json").read_text())["verdicts"]
    verdicts = swap_rules.rejudge(
        folder, root / "results" / "sweep" / "digits-xent", "python -m rejudge"
    )
    assert json.loads(json.dumps(verdicts)) == committed
    default = verdicts[swap_rules.DEFAULT]
    # The cell whose loss reached exactly 0 is counted, not averaged as 0.
    assert default["vs_better_adam_underflow"] == 1
    assert default["vs_better_adam_geomean"] > 0
    table = (folder / "table.md").read_text()
    assert table.count("Made with `python -m experiments.benchmarks.swap_rules") == 1
    assert "Made with `python -m rejudge`." in table


def test_grid_points_spread_evenly_over_the_budget():
    assert swap_rules.grid_points(50, 10) == [4, 8, 13, 17, 22, 26, 31, 35, 40, 44]
    assert len(swap_rules.grid_points(150, 10)) == 10
    assert swap_rules.grid_points(4, 2) == [0, 2]


def test_the_hindsight_grid_adds_swaps_each_run_to_its_own_budget(
    tmp_path, small_sweep
):
    model = small_sweep["model"]
    out, record = tmp_path / "runs", tmp_path / "record"
    swap_rules.main(
        [
            "--models", model, "--first-seed", "1", "--budgets", "4", "7",
            "--grid", "2", "--rules", "fit", "--out", str(out),
            "--record", str(record),
        ]
    )  # fmt: skip
    cells = json.loads((record / "table.json").read_text())["cells"]
    landscape = json.loads((record / "landscape.json").read_text())
    assert {(e["seed"], e["budget"]) for e in cells} == {(1, 4), (1, 7)}
    tried = {
        b: {e["swap_epoch"] for e in landscape if e["budget"] == b} for b in (4, 7)
    }
    splits = {budget_sweep.split_epoch(b) for b in (4, 7)}
    # Budget 7: its own grid (after 2 and 5 Adam epochs) and the splits.
    assert tried[7] == {2, 5} | {s for s in splits if s < 7}
    # Budget 4: its own grid (after 1 and 3), and the tails to 7 that swap
    # before 4; its own tails stop at 4, so they are not tried at 7.
    assert tried[4] == {1, 3} | {s for s in tried[7] if s < 4}
    sweep = budget_sweep.Sweep(models=[model], seeds={}, budgets=[7], out=out)
    adam = run_records.read_metrics(sweep.run_dir(model, 1, "adam") / "metrics.jsonl")
    # After 2 Adam epochs is budget 4's grid alone: its tail stops at budget
    # 4, or earlier once it has Adam's compute there.
    rows = run_records.read_metrics(sweep.run_dir(model, 1, "swap2") / "metrics.jsonl")
    assert len(rows) <= 4
    assert rows[-1]["forward_passes"] >= adam[3]["forward_passes"] or len(rows) == 4
    best = {e["budget"]: e["best_split_loss"] for e in cells}
    for b in (4, 7):
        assert best[b] == min(e["loss"] for e in landscape if e["budget"] == b)
    # The table states what made its runs, from their own records.
    made = json.loads((record / "provenance.json").read_text())
    assert made["records"] >= 1 + len(tried[4] | tried[7])
    assert (record / "table.md").read_text().splitlines()[4].startswith("Code: ")


def test_every_rule_has_its_own_marker_in_the_plot():
    assert len(set(report.MARKERS[: len(swap_rules.RULES)])) == len(swap_rules.RULES)


def test_the_selection_table_pools_studies_rule_by_rule():
    root = pathlib.Path(__file__).resolve().parents[2] / "results" / "swap_rules"
    studies = [root / "digits-xent", root / "mnist5k"]
    verdicts = [json.loads((d / "table.json").read_text())["verdicts"] for d in studies]
    default = swap_rules.DEFAULT
    table = report.selection({"in": [root / "digits"], "out": studies}, missed=default)
    row = next(line for line in table.splitlines() if line.startswith(f"| {default}"))
    pooled = [sum(len(v[default][k]) for v in verdicts) for k in ("worse_than_adam",)]
    cells = sum(v[default]["cells"] for v in verdicts)
    near = sum(v[default]["within_decade"] for v in verdicts)
    assert row.split(" | ")[4] == f"{pooled[0]}/{cells}"
    assert row.split(" | ")[6].rstrip(" |") == f"{near}/{cells}"
    assert f"- {default}, out: above 1.1x Adam:" in table


def test_a_loss_that_underflows_to_zero_is_no_hand_back():
    # Adam falls 10x per epoch (5 forward passes each); CG then reaches 0.
    adam = [{"batch_loss": 10.0**-e, "forward_passes": 5 * e} for e in range(6)]
    rows = [dict(r, train_loss=r["batch_loss"]) for r in adam]
    rows += [
        {"batch_loss": 0.0, "train_loss": 0.0, "forward_passes": 25 + 5 * e}
        for e in range(1, 9)
    ]
    assert swap_rules.log(0.0) == -math.inf
    assert swap_rules.handback_epoch(rows, after=5) is None
    # Once there, its epochs cost nothing (the gradient is 0): still none.
    for r in rows[8:]:
        r["forward_passes"] = rows[7]["forward_passes"]
    assert swap_rules.handback_epoch(rows, after=5) is None


def test_the_validation_tally_names_each_cell_on_its_side():
    cell = dict(model="m", seed=3, rule="r")
    cells = [
        {**cell, "budget": 50, "val_acc": 0.9614, "adam_val_acc": 0.9611},
        {**cell, "budget": 150, "val_acc": 0.95, "adam_val_acc": 0.97},
    ]
    tally = report.validation_tally(cells)
    assert "in the 2 cells" in tally
    assert "higher in 0; equal in 1 (m s3 50 0.961 vs 0.961)" in tally
    assert "lower in 1 (m s3 150 0.950 vs 0.970)" in tally
    assert report.validation_tally([cell]) == "validation accuracy not recorded"


def test_the_defaults_cells_follow_from_the_rule_it_stops_short():
    base = dict(model="m", seed=0, rule=swap_rules.FIT_OR_PLATEAU, probes=0)
    cell = dict(base, adam_loss_at_swap=1e-3, handback_epoch=None)
    cells = [
        # A swap after 46 of 50 epochs: in the last fifth, so left to Adam.
        dict(cell, budget=50, swap_epoch=46, loss=2e-3, adam_loss=1e-3,
             cosine_loss=5e-4, vs_adam=2.0, vs_better_adam=4.0,
             best_split_loss=1e-4, vs_hindsight=20.0, val_acc=0.9,
             adam_val_acc=0.95, compute=160.0, adam_compute=150.0),
        # The same swap in a run of 150 epochs stays.
        dict(cell, budget=150, swap_epoch=46, loss=1e-9, adam_loss=1e-5,
             cosine_loss=2e-5, vs_adam=1e-4, vs_better_adam=1e-4,
             best_split_loss=1e-9, vs_hindsight=1.0, val_acc=0.97,
             adam_val_acc=0.96, compute=460.0, adam_compute=450.0),
    ]  # fmt: skip
    landscape = [
        dict(model="m", seed=0, budget=50, adam_loss=1e-3, cosine_loss=4e-4),
        dict(model="m", seed=0, budget=150, adam_loss=1e-5, cosine_loss=2e-5),
    ]
    late, kept = swap_rules.cut_cells(cells, landscape)
    assert late["rule"] == kept["rule"] == swap_rules.DEFAULT
    assert late["swap_epoch"] is None and late["loss"] == 1e-3
    assert (late["vs_adam"], late["vs_better_adam"]) == (1.0, 2.5)  # cosine: 4e-4
    assert late["vs_hindsight"] == pytest.approx(10.0)
    assert (late["val_acc"], late["compute"]) == (0.95, 150.0)
    assert kept == dict(cells[1], rule=swap_rules.DEFAULT)
    verdict = swap_rules.judge([*cells, late, kept], {"m": 50})
    assert verdict[swap_rules.FIT_OR_PLATEAU]["worse_than_adam"] == ["m s0 50"]
    assert verdict[swap_rules.DEFAULT]["worse_than_adam"] == []
    assert verdict[swap_rules.DEFAULT]["behind_past_crossover"] == ["m s0 50"]
