"""Test-wide settings.

Several tests assert that two differently structured programs give bit-identical
results (``two_phase`` before the swap against Adam alone). Where XLA fuses
``a * b + c`` it may emit a fused multiply-add, whose single rounding differs in
the last bit from a multiply and an add; across ``two_phase``'s ``lax.cond`` it
cannot fuse. Capping XLA's CPU instruction set below FMA makes every compiled
operation round exactly as IEEE arithmetic says, so such comparisons test the
maths rather than the fusion decisions. It must be set before JAX starts its
backend, hence here.
"""

import os
import pathlib

import pytest

_NO_FMA = "--xla_cpu_max_isa=AVX"
if "xla_cpu_max_isa" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_NO_FMA}".strip()

try:  # Property tests: reproducible by default, more and fresh examples on demand.
    from hypothesis import settings

    settings.register_profile("ci", max_examples=15, deadline=None, derandomize=True)
    settings.register_profile("thorough", max_examples=500, deadline=None)
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
except ImportError:
    pass


TESTS = pathlib.Path(__file__).resolve().parent
ROOT = TESTS.parent
AREAS = ("experiments", "docs")  # tests/<area>/, marked so: -m "not experiments"


def pytest_collection_modifyitems(config, items):
    """Marks every test by its area: ``tests/experiments`` and the doctests of
    ``experiments/`` are ``experiments``, ``tests/docs`` is ``docs``."""
    for item in items:
        path = pathlib.Path(str(item.fspath)).resolve()
        if path.is_relative_to(ROOT / "experiments"):
            item.add_marker(pytest.mark.experiments)
        elif path.is_relative_to(TESTS) and path.relative_to(TESTS).parts[0] in AREAS:
            item.add_marker(getattr(pytest.mark, path.relative_to(TESTS).parts[0]))
