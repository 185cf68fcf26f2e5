"""Made tests/library/data/swap_recording.npz with the code of commit e189cd7.

Kept for the record: it spells each case with the keywords ``two_phase`` took
before the swap rules became objects (``tpo.swap``), so it runs only on that
commit: ``git checkout e189cd7``, then, with no fused multiply-adds as in
the tests (see ``tests/conftest.py``),
``XLA_FLAGS=--xla_cpu_max_isa=AVX PYTHONPATH=. python \
tests/library/data/record_swap_recording.py``.
``tests/library/test_swap_recording.py`` holds the new spellings.
"""

import sys

import numpy as np
import optax

import twophase_optax as tpo


def main():
    sys.path.insert(0, "tests/library")
    from _swap_recording import WINDOW
    from _swap_recording import run

    adam = optax.adam(0.05)
    FAILING = tpo.golden_section_linesearch(initial_step=100.0, max_evaluations=1)
    W = WINDOW
    cases = {
        "peak": dict(opt=tpo.two_phase(adam, window=W, swap_rule="peak")),
        "peak_mean_norm": dict(
            opt=tpo.two_phase(
                adam, window=W, statistic="mean_norm", swap_rule="peak", patience=2
            )
        ),
        "plateau": dict(
            opt=tpo.two_phase(
                adam,
                window=W,
                swap_rule="plateau",
                plateau_rtol=0.3,
                plateau_patience=3,
            )
        ),
        "plateau_raw": dict(
            opt=tpo.two_phase(
                adam,
                window=W,
                swap_rule="plateau",
                plateau_rtol=0.5,
                plateau_patience=2,
                plateau_smoothing=1.0,
            )
        ),
        "peak_then_plateau": dict(
            opt=tpo.two_phase(
                adam,
                window=W,
                swap_rule="peak-then-plateau",
                plateau_rtol=0.5,
                plateau_patience=3,
            )
        ),
        "fit": dict(
            opt=tpo.two_phase(
                adam, window=W, swap_rule="fit", fit_errors=2, fit_patience=3
            )
        ),
        "fit_or_plateau": dict(
            opt=tpo.two_phase(adam, window=W, fit_errors=1, fit_patience=2)
        ),
        "fit_or_plateau_plateau_wins": dict(
            opt=tpo.two_phase(adam, window=W, plateau_rtol=0.5, plateau_patience=3)
        ),
        "plateau_step_window": dict(
            opt=tpo.two_phase(
                adam, swap_rule="plateau", plateau_rtol=0.3, plateau_patience=3
            ),
            pass_errors=False,
        ),
        "manual": dict(opt=tpo.two_phase(adam, swap_rule="manual"), manual_at=37),
        "swap_at": dict(opt=tpo.two_phase(adam, swap_at=50)),
        "paper": dict(
            opt=tpo.two_phase(adam, window=W, **tpo.swap_detection.PAPER_RULE)
        ),
        "plateau_min_windows": dict(
            opt=tpo.two_phase(
                adam,
                window=W,
                swap_rule="plateau",
                min_windows=30,
                plateau_rtol=0.5,
                plateau_patience=2,
            )
        ),
        "fallback_plateau": dict(
            opt=tpo.two_phase(
                adam,
                tpo.conjugate_gradient(linesearch=FAILING),
                window=W,
                swap_rule="plateau",
                plateau_rtol=0.5,
                plateau_patience=2,
                fallback="first",
                max_failures=3,
            )
        ),
        "fallback_peak": dict(
            opt=tpo.two_phase(
                adam,
                tpo.conjugate_gradient(linesearch=FAILING),
                window=W,
                swap_rule="peak",
                fallback="first",
                max_failures=2,
                **{
                    k: v
                    for k, v in tpo.swap_detection.PAPER_RULE.items()
                    if k != "swap_rule"
                },
            )
        ),
    }
    out = {}
    for name, c in cases.items():
        opt = c.pop("opt")
        u, s, p = run(opt, start=tpo.start_second_phase, **c)
        first = [i for i in range(len(s)) if i == 0 or s[i] != s[i - 1]]
        print(
            f"{name:30s} swaps {[(i, int(s[i])) for i in first]}",
            f"second-phase steps {int(p.sum())}",
        )
        out[f"{name}/updates"] = u
        out[f"{name}/swap_step"] = s
        out[f"{name}/in_second_phase"] = p
    np.savez_compressed("tests/library/data/swap_recording.npz", **out)


if __name__ == "__main__":
    main()
