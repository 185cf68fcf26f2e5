"""The benchmark scripts' --quick mode: well-formed tables with known memory ratios."""

import json

import numpy as np
import pytest

pytest.importorskip("flax", reason="the benchmarks use the experiment models")
from experiments.benchmarks import overhead  # noqa: E402


def test_overhead_quick_mode_writes_well_formed_results(tmp_path, capsys):
    result = overhead.main(["--quick", "--out", str(tmp_path / "overhead.json")])
    assert json.loads((tmp_path / "overhead.json").read_text()) == result
    cases = {t["case"] for t in result["timings"]}
    assert len(cases) == 3  # Two update-only sizes and one train step.
    for t in result["timings"]:
        assert t["seconds"] > 0 and t["compile_seconds"] > 0
        if t["optimizer"] == "optax.adam":
            assert t["ratio"] == 1.0
    multiples = {m["optimizer"]: m["multiple"] for m in result["memory"]}
    # Adam: two moments. CG: direction and the gradient its line search keeps
    # (three products stand in for the previous gradient). two_phase holds
    # Adam's moments and CG's two trees in the same two buffers, plus the
    # window sum for the peak's "mean_grad" with a window of several steps
    # (the default rule reads no gradient sum); a beta
    # function needs CG's previous gradient too, a third tree. The remaining
    # scalars are a few bytes against ~59 kB of params.
    assert multiples["optax.adam"] == pytest.approx(2.0, abs=5e-3)
    assert multiples["conjugate_gradient"] == pytest.approx(2.0, abs=5e-3)
    assert multiples["two_phase peak mean_grad"] == pytest.approx(3.0, abs=5e-3)
    assert multiples["two_phase peak mean_norm"] == pytest.approx(2.0, abs=5e-3)
    assert multiples["two_phase default"] == pytest.approx(2.0, abs=5e-3)
    assert multiples["two_phase at_step"] == pytest.approx(2.0, abs=5e-3)
    general = multiples["two_phase default, CG with a beta function"]
    assert general == pytest.approx(3.0, abs=5e-3)
    # Nothing params-sized is copied on the first phase's path.
    for t in result["timings"]:
        assert t["copies"]["first_phase"] == 0, t
    table = capsys.readouterr().out
    assert (
        "| case | optimizer | median ms | ratio to optax.adam | compile s "
        "| params-sized copies: first phase / all | minor page faults / call |" in table
    )
    assert all(t["minor_faults_per_call"] >= 0 for t in result["timings"])
    assert table.count("\n| update only") == 2 * len(overhead.optimizers())


@pytest.mark.skipif(
    not hasattr(__import__("os"), "fork"), reason="page faults are counted on Unix"
)
def test_page_faults_are_counted_per_call_for_memory_touched_afresh():
    from experiments.benchmarks import timing

    # 64 MiB is above glibc's largest mmap threshold: every call maps fresh
    # memory and writes all of it, at least 32 faults even where the kernel
    # maps 2 MiB huge pages (16,384 with 4 KiB pages); the other candidate
    # touches none.
    candidates = {
        "fresh": (lambda: np.ones(8 * 2**20), ()),
        "none": (lambda: 0.0, ()),
    }
    medians, faults = timing.interleaved_medians_and_faults(candidates, 3, 2)
    assert set(medians) == set(faults) == {"fresh", "none"}
    assert faults["fresh"] >= 32
    assert faults["none"] < 5


@pytest.mark.slow
def test_cg_phase_quick_mode_counts_every_forward_pass(tmp_path, capsys):
    from experiments.benchmarks import cg_phase

    result = cg_phase.main(["--quick", "--out", str(tmp_path / "cg_phase.json")])
    assert json.loads((tmp_path / "cg_phase.json").read_text()) == result
    (run,) = result["runs"]
    rows = {r["setting"]: r for r in run["rows"]}
    assert list(rows)[:-1] == list(cg_phase.QUICK_SETTINGS)
    golden = rows["cg golden tol 1e-2"]
    default = rows[cg_phase.DEFAULT]
    for r in (golden, default):
        assert len(r["costs"]) >= cg_phase.MIN_STEPS
        assert sum(r["costs"]) >= max(cg_phase.BUDGETS)
        # The last state within each budget is the one reported.
        for budget in cg_phase.BUDGETS:
            spent = [c for c in np_cumsum(r["costs"]) if c <= budget]
            assert r[f"loss_at_{budget}"] == r["curve"][len(spent)][1]
    # The golden section evaluates values only and reuses nothing: a gradient
    # (3) and its values (1 each) every step.
    assert golden["costs"] == [3 + k for k in golden["evaluations"]]
    assert set(golden["gradients"]) == {0}
    # The default: values 1, values with gradients 3, and the caller's
    # gradient only where the state held none (the first step, at least).
    extra = [
        c - (k - g) - 3 * g
        for c, k, g in zip(
            default["costs"], default["evaluations"], default["gradients"], strict=True
        )
    ]
    assert extra[0] == 3 and set(extra) <= {0, 3}
    assert default["mean_fpe_per_step"] < golden["mean_fpe_per_step"]
    adam = run["rows"][-1]
    assert adam["setting"].startswith("adam")
    assert adam["epochs"] * 3 >= max(cg_phase.BUDGETS)
    table = capsys.readouterr().out
    assert f"| {cg_phase.DEFAULT} |" in table
    assert table.count("\n| cg ") == 2


def np_cumsum(values):
    total, out = 0, []
    for v in values:
        total += v
        out.append(total)
    return out


@pytest.mark.slow
def test_solvers_quick_mode_agrees_with_the_known_minima(tmp_path, capsys):
    from experiments.benchmarks import solvers

    result = solvers.main(["--quick", "--out", str(tmp_path / "solvers.json")])
    assert json.loads((tmp_path / "solvers.json").read_text()) == result
    rows = [r for r in result["rows"] if r["installed"]]
    problems = {r["problem"] for r in result["rows"]}
    assert len(problems) == 6
    assert len(result["rows"]) == 6 * len(solvers.SOLVER_ORDER)
    for r in rows:
        assert r["f_evals"] >= 1 and r["g_evals"] >= 1 and r["iterations"] >= 1
        if r["success"]:
            assert r["final_grad_norm"] <= solvers.GTOL
            if r["f_star"] is not None:  # Rosenbrock 0, the quadratic's closed form.
                assert r["final_f"] == pytest.approx(r["f_star"], rel=1e-8, abs=1e-8)
    ours = [r for r in rows if r["solver"].startswith("ours")]
    assert len(ours) == 6 * 5
    # The default (slope, store_grad), the former one and zoom solve all six.
    # The value-only searches (golden, slope without gradients) solve all but the
    # ill-conditioned quadratic, where values stop resolving the decrease
    # (BENCHMARKS.md): there they need only make progress.
    steers_by_slopes = ("ours zoom", "ours slope, store_grad", "ours former default")
    for r in ours:
        if r["solver"] in steers_by_slopes or not r["problem"].startswith("quadratic"):
            assert r["success"], r
        else:
            assert r["final_f"] - r["f_star"] < 1e-6 * abs(r["f_star"])
    # The default within 1.2x SciPy's CG's cost (forward-pass equivalents)
    # in geometric mean, recomputed from the rows.
    by = {(r["problem"], r["solver"]): r for r in rows}
    logs = [
        np.log(
            solvers.forward_passes(by[(p, "ours slope, store_grad")])
            / solvers.forward_passes(by[(p, "scipy CG")])
        )
        for p in problems
    ]
    mean = next(
        r
        for r in result["cost_versus_scipy"]
        if r["problem"] == "geometric mean" and r["solver"] == "ours slope, store_grad"
    )
    assert mean["cost_ratio"] == pytest.approx(np.exp(np.mean(logs)), rel=1e-12)
    assert mean["cost_ratio"] <= 1.2 and mean["success"]
    # The golden section evaluates only f in its search: one gradient a step.
    for r in ours:
        if r["solver"] == "ours golden":
            assert r["g_evals"] == r["iterations"] + 1 < r["f_evals"]
    table = capsys.readouterr().out
    # One row per solver, and one per "ours" in the table of ratios.
    # ... and one in the table of costs over SciPy's.
    assert table.count("\n| Rosenbrock n=2 |") == len(solvers.SOLVER_ORDER) + 5 + 1
    assert "| problem | ours | f evals / best CG peer | time / best CG peer |" in table
    assert "\n| geometric mean |" in table


@pytest.mark.slow
def test_time_to_loss_quick_mode_repeats_the_same_trajectory(tmp_path, capsys):
    from experiments.benchmarks import time_to_loss

    result = time_to_loss.main(["--quick", "--out", str(tmp_path / "ttl.json")])
    assert json.loads((tmp_path / "ttl.json").read_text()) == result
    by_name = {s["optimizer"]: s for s in result["optimizers"]}
    assert list(by_name) == list(time_to_loss.OPTIMIZERS)
    for summary in by_name.values():
        runs = summary["runs"]
        assert len(runs) == result["repeats"]
        # Each repeat restarts from the same parameters: the same losses.
        assert len({r["final_loss"] for r in runs}) == 1
        for target, hit in summary["targets"].items():
            if summary["median_final_loss"] > float(target):
                assert hit is None
    # The fixed split runs CG from the given epoch; Adam never swaps.
    assert by_name["two-phase-fixed"]["swap_epoch"] == result["swap_epoch"]
    assert by_name["adam"]["swap_epoch"] is None
    table = capsys.readouterr().out
    assert table.count("never") == sum(
        hit is None for s in result["optimizers"] for hit in s["targets"].values()
    )


def test_detector_quick_mode_replays_the_recorded_readings(tmp_path, capsys):
    from experiments.benchmarks import detector
    from twophase_optax import swap

    out = tmp_path / "detector.json"
    result = detector.main(
        [
            "--quick",
            "--out",
            str(out),
            "--runs",
            str(tmp_path / "runs"),
            "--no-progress",
        ]
    )
    assert json.loads(out.read_text()) == result
    (run,) = result["runs"]
    metrics = tmp_path / "runs" / "vit-mlp" / "b512" / "s0" / "adam" / "metrics.jsonl"
    readings = [
        json.loads(line)["gn_reading"] for line in metrics.read_text().splitlines()
    ]
    assert run["readings"] == readings and run["epochs"] == 6
    (cell,) = run["cells"]
    # The swap epochs are the library's detector on these readings, 1-based.
    paper = swap.replay(swap.PAPER, grad_norm=readings)
    default = swap.replay(swap.peak(0.9), grad_norm=readings)
    assert cell["paper"] == (None if paper is None else paper + 1)
    assert cell["default"] == (None if default is None else default + 1)
    smoothed = [
        sum(readings[max(0, i - 2) : i + 3]) / len(readings[max(0, i - 2) : i + 3])
        for i in range(6)
    ]
    assert run["smoothed_peak"] == smoothed.index(max(smoothed)) + 1
    table = capsys.readouterr().out
    assert table.count("\n| vit-mlp | 512 | 0 |") == 1


def test_conv_in_loop_quick_mode_computes_the_same_loss_everywhere(tmp_path, capsys):
    from experiments.benchmarks import conv_in_loop

    result = conv_in_loop.main(["--quick", "--out", str(tmp_path / "conv.json")])
    assert json.loads((tmp_path / "conv.json").read_text()) == result
    rows = {r["place"]: r for r in result["rows"]}
    assert list(rows) == list(conv_in_loop.PLACES)
    # The same parameters give the same loss with either convolution and in
    # every place but the batched sum (the loss of 128 images; 4 batches of
    # 32 summed, so 4 times the mean).
    full = rows["straight"]["values"]["nnx.Conv"]
    for place, row in rows.items():
        for value in row["values"].values():
            expected = 4 * full if place == "mini-batches" else full
            assert value == pytest.approx(expected, rel=1e-5)
        assert row["ratio"] == row["nnx_conv_seconds"] / row["matmul_seconds"]
    table = capsys.readouterr().out
    assert table.count("\n| in while_loop |") == 1


def test_chunked_loss_quick_mode_bounds_the_memory_by_the_chunk(tmp_path, capsys):
    from experiments.benchmarks import chunked_loss

    out = tmp_path / "chunked.json"
    result = chunked_loss.main(["--quick", "--datasets", "digits", "--out", str(out)])
    assert json.loads(out.read_text()) == result
    for dataset in ("mnist", "cifar10"):
        temp = {
            r["chunk_size"]: r["temp_gib"]
            for r in result["memory"]
            if r["dataset"] == dataset
        }
        # vgg5's working memory grows with the rows a chunk holds (1024 and
        # 8192), far below the one pass over 60,000 or 50,000 images.
        assert 4 < temp[8192] / temp[1024] < 9
        assert temp[8192] < temp[None] / 4
    kinds = {(r["evaluation"], r["chunk_size"]): r for r in result["time"]}
    assert set(kinds) == {
        (kind, chunk)
        for kind in ("value", "value and gradient")
        for chunk in (None, 256)
    }
    assert kinds[("value", 256)]["chunks"] == 6  # 1,437 digits in chunks of 240.
    assert all(r["seconds"] > 0 and r["ratio"] > 0 for r in result["time"])
    assert "| mnist | vgg5 |" in capsys.readouterr().out


def test_complex_cg_quick_mode_reaches_the_real_splits_loss(tmp_path, capsys):
    from experiments.benchmarks import complex_cg

    result = complex_cg.main(["--quick", "--out", str(tmp_path / "complex.json")])
    assert json.loads((tmp_path / "complex.json").read_text()) == result
    complex_run, real_run = result["complex64"], result["float32 split"]
    # Complex params are optimised as their real split: the same loss to
    # float32 rounding after the same number of steps.
    np.testing.assert_allclose(
        complex_run["final_value"], real_run["final_value"], rtol=1e-4
    )
    assert complex_run["final_value"] < 99.0  # 2n - 1 = 99 at the start, zero
    assert "| complex64 |" in capsys.readouterr().out


@pytest.mark.slow
def test_fit_loop_quick_mode_times_the_same_computation(tmp_path, capsys):
    from experiments.benchmarks import fit_loop

    result = fit_loop.main(["--quick", "--out", str(tmp_path / "fit_loop.json")])
    assert json.loads((tmp_path / "fit_loop.json").read_text()) == result
    (row,) = result["results"]
    # tpo.fit with optax.adam ended on the hand loop's params bit for bit
    # (asserted inside); both ran every epoch in the first phase.
    assert row["bit_identical_to_hand"] and row["first_phase_epochs_of_default"] == 2
    assert row["steps"] == {"hand": 128 // 64, "trainer": 2}
    assert all(s > 0 for s in row["seconds_per_epoch"].values())
    assert all(s > 0 for s in row["compile_seconds"].values())
    assert "tpo.fit, default two_phase" in capsys.readouterr().out


@pytest.mark.slow
def test_second_phase_quick_mode_measures_every_variant_from_one_checkpoint(
    tmp_path, capsys
):
    from experiments.benchmarks import second_phase

    out = tmp_path / "second_phase.json"
    argv = ["--quick", "--runs", str(tmp_path / "runs"), "--out", str(out)]
    result = second_phase.main(argv)
    runs = {r["variant"]: r for r in result["runs"]}
    assert set(runs) == set(second_phase.QUICK_VARIANTS)
    # One Adam checkpoint for all: every variant starts from its loss.
    assert len({r["start_loss"] for r in runs.values()}) == 1
    for r in runs.values():
        spent = [point[0] for point in r["curve"]]
        assert spent == sorted(spent)
        # Until the budget, or a step that evaluates nothing (a zero gradient).
        assert spent[-1] >= result["budget"] or spent[-1] == spent[-2]
        assert r["loss_at"]["30"] <= r["start_loss"]  # no second phase goes up
    # CG's state is its direction and stored gradient; the preconditioner
    # adds one diagonal; L-BFGS keeps 10 pairs.
    assert runs["cg"]["state_over_params"] == pytest.approx(2.0, abs=0.05)
    assert runs["cg, Adam-preconditioned"]["state_over_params"] == pytest.approx(
        3.0, abs=0.05
    )
    assert runs["L-BFGS"]["state_over_params"] > 20
    # Resumed: the finished entries are read back, not run again.
    again = second_phase.main(argv)
    assert again["runs"] == json.loads(out.read_text())["runs"]
    assert "within 10x" in capsys.readouterr().out
