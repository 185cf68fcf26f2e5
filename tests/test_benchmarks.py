"""The benchmark scripts' --quick mode: well-formed tables with known memory ratios."""

import json

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
    # Adam: two moments. CG: previous gradient and direction. two_phase adds
    # CG's two trees to Adam's two, plus the window sum for "mean_grad"; the
    # remaining scalars are a few bytes against ~59 kB of params.
    assert multiples["optax.adam"] == pytest.approx(2.0, abs=5e-3)
    assert multiples["conjugate_gradient"] == pytest.approx(2.0, abs=5e-3)
    assert multiples["two_phase mean_grad"] == pytest.approx(5.0, abs=5e-3)
    assert multiples["two_phase mean_norm"] == pytest.approx(4.0, abs=5e-3)
    table = capsys.readouterr().out
    assert "| case | optimizer | median ms | ratio to optax.adam | compile s |" in table
    assert table.count("\n| update only") == 6
