"""README's quick start runs as written and fits its data."""

from _markdown import README
from _markdown import python_blocks


def test_quick_start_runs_and_fits_the_linear_data():
    fit, loop = python_blocks("Quick start")
    namespace: dict = {}
    exec(compile(fit, "README.md", "exec"), namespace)
    result, adam = namespace["result"], namespace["adam"]
    # What the text says: a swap after epoch 26, then a training loss 10x
    # below Adam's, and below it at Adam's compute too.
    assert abs(result.swap_epoch - 26) <= 2  # XLA may round otherwise elsewhere
    assert result.history[-1]["train_loss"] < 0.1 * adam.history[-1]["train_loss"]
    at_adams = [r for r in result.history if r["forward_passes"] <= 300.0][-1]
    assert at_adams["train_loss"] < 0.2 * adam.history[-1]["train_loss"]
    exec(compile(loop, "README.md", "exec"), namespace)
    # Exact linear data: 20 CG steps leave a tiny mean squared error.
    assert float(namespace["loss_fn"](namespace["params"], namespace["batch"])) < 1e-6


def test_readme_gives_the_ci_test_command():
    ci = (README.parent / ".ci" / "run").read_text()
    command = ci.strip().splitlines()[-1]
    assert command == "python -m pytest"
    assert f"&& {command}\n" in README.read_text()


def test_getting_started_shows_the_readmes_quick_start():
    guide = README.parent / "docs" / "getting_started.md"
    # The same tpo.fit block (run above), then a loop of one's own.
    assert python_blocks("Quick start", guide)[0] == python_blocks("Quick start")[0]
