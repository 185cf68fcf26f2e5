"""The docs' tpo.fit example (docs/examples/fit_sklearn.py), run as a reader would."""

import importlib.util
import pathlib

import numpy as np
import pytest

pytest.importorskip("sklearn", reason="the example uses scikit-learn's bundled data")

EXAMPLE = pathlib.Path(__file__).parents[2] / "docs" / "examples" / "fit_sklearn.py"


@pytest.fixture(scope="module")
def results():
    spec = importlib.util.spec_from_file_location("fit_sklearn", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main()


@pytest.mark.parametrize(
    "name, train_size", [("breast cancer", 455), ("diabetes", 353)]
)
def test_the_swap_happens_and_the_compute_is_counted_by_hand(results, name, train_size):
    result = results[name]
    assert result.swap_epoch is not None
    steps = train_size // 32
    first = result.swap_epoch * 3.0 * steps * 32 / train_size
    # The second phase: its first step's value and gradient (3), then what
    # two_phase's own totals say its line searches evaluated.
    state = result.state
    second = 3.0 + int(state.num_evaluations) + 2 * int(state.num_gradients)
    assert result.history[-1]["forward_passes"] == pytest.approx(first + second)


@pytest.mark.parametrize("name", ["breast cancer", "diabetes"])
def test_keep_best_returns_the_best_validation_epoch(results, name):
    result = results[name]
    losses = [r["validation_loss"] for r in result.history]
    assert result.best_epoch == int(np.argmin(losses))
    # The second phase drives the training loss far below where the best
    # validation epoch was: keeping the last params would keep the overfit.
    assert (
        result.history[-1]["train_loss"]
        < result.history[result.best_epoch]["train_loss"]
    )
