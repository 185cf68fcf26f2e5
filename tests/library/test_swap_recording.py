"""Each swap rule of the 0.1 keywords, spelt with ``tpo.swap``, makes the same run.

``tests/library/data/swap_recording.npz`` holds the updates and swap steps of every
step of runs made by the code before the swap rules became objects (the
keyword spelling of each case is in ``tests/library/data/record_swap_recording.py``);
the new spelling must reproduce them bit for bit.
"""

import sys
from pathlib import Path

import numpy as np
import optax
import pytest

import twophase_optax as tpo
from twophase_optax import swap

sys.path.insert(0, str(Path(__file__).parent))
from _swap_recording import WINDOW  # noqa: E402
from _swap_recording import run  # noqa: E402

RECORDING = np.load(Path(__file__).parent / "data" / "swap_recording.npz")
ADAM = optax.adam(0.05)
FAILING = tpo.golden_section_linesearch(initial_step=100.0, max_evaluations=1)
PAPER_KEYWORDS = dict(gn_factor=0.9, smoothing=1.0, patience=1, min_rise=1.0)


def windowed(rule, steps=WINDOW):
    return swap.per_window(rule, steps=steps)


# name -> (two_phase keywords, run keywords); the old keywords in the comments.
CASES = {
    # window=W, swap_rule="peak"
    "peak": (dict(swap=windowed(swap.peak())), {}),
    # window=W, statistic="mean_norm", swap_rule="peak", patience=2
    "peak_mean_norm": (
        dict(swap=windowed(swap.peak(patience=2, statistic="mean_norm"))),
        {},
    ),
    # window=W, swap_rule="plateau", plateau_rtol=0.3, plateau_patience=3
    "plateau": (dict(swap=windowed(swap.plateau(0.3, patience=3))), {}),
    # ..., plateau_rtol=0.5, plateau_patience=2, plateau_smoothing=1.0
    "plateau_raw": (
        dict(swap=windowed(swap.plateau(0.5, patience=2, smoothing=1.0))),
        {},
    ),
    # window=W, swap_rule="peak-then-plateau", plateau_rtol=0.5, plateau_patience=3
    "peak_then_plateau": (
        dict(swap=windowed(swap.after(swap.peak(), swap.plateau(0.5, patience=3)))),
        {},
    ),
    # window=W, swap_rule="fit", fit_errors=2, fit_patience=3
    "fit": (dict(swap=windowed(swap.fitted(2, patience=3))), {}),
    # window=W, fit_errors=1, fit_patience=2 (the default rule)
    "fit_or_plateau": (
        dict(swap=windowed(swap.any_of(swap.fitted(1, patience=2), swap.plateau()))),
        {},
    ),
    # window=W, plateau_rtol=0.5, plateau_patience=3
    "fit_or_plateau_plateau_wins": (
        dict(swap=windowed(swap.any_of(swap.fitted(), swap.plateau(0.5, patience=3)))),
        {},
    ),
    # swap_rule="plateau", plateau_rtol=0.3, plateau_patience=3 (window 1)
    "plateau_step_window": (
        dict(swap=windowed(swap.plateau(0.3, patience=3), steps=1)),
        dict(pass_errors=False),
    ),
    # swap_rule="manual", start_second_phase before step 37
    "manual": (dict(swap=swap.manual()), dict(manual_at=37)),
    # swap_at=50
    "swap_at": (dict(swap=swap.at_step(50)), {}),
    # window=W, **PAPER_RULE
    "paper": (dict(swap=windowed(swap.PAPER)), {}),
    # window=W, swap_rule="plateau", min_windows=30, plateau_rtol=0.5,
    # plateau_patience=2
    "plateau_min_windows": (
        dict(swap=windowed(swap.plateau(0.5, patience=2, min_windows=30))),
        {},
    ),
    # CG whose searches fail, window=W, swap_rule="plateau", plateau_rtol=0.5,
    # plateau_patience=2, fallback="first", max_failures=3
    "fallback_plateau": (
        dict(
            second=tpo.conjugate_gradient(linesearch=FAILING),
            swap=windowed(swap.plateau(0.5, patience=2)),
            fallback="first",
            max_failures=3,
        ),
        {},
    ),
    # CG whose searches fail, window=W, swap_rule="peak", the paper's settings,
    # fallback="first", max_failures=2
    "fallback_peak": (
        dict(
            second=tpo.conjugate_gradient(linesearch=FAILING),
            swap=windowed(swap.peak(**PAPER_KEYWORDS)),
            fallback="first",
            max_failures=2,
        ),
        {},
    ),
}


def test_every_recorded_case_has_a_new_spelling():
    recorded = {key.split("/")[0] for key in RECORDING.files}
    assert recorded == set(CASES)


@pytest.mark.parametrize("name", sorted(CASES))
def test_new_spelling_reproduces_the_recorded_run(name):
    opt_kwargs, run_kwargs = CASES[name]
    opt = tpo.two_phase(ADAM, **opt_kwargs)
    updates, swap_steps, phases = run(opt, start=tpo.start_second_phase, **run_kwargs)
    np.testing.assert_array_equal(swap_steps, RECORDING[f"{name}/swap_step"])
    np.testing.assert_array_equal(phases, RECORDING[f"{name}/in_second_phase"])
    # Bit for bit: the same floats, not merely close ones.
    recorded = RECORDING[f"{name}/updates"]
    assert updates.dtype == recorded.dtype
    np.testing.assert_array_equal(updates.view(np.uint32), recorded.view(np.uint32))
