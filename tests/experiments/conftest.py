"""The runs shared by the experiments' tests, as fixtures."""

import types

import pytest

# The smallest of the paper's models on the offline digits.
_SMALL_RUN = {"model": "vit-nomlp-wkewq-wvwo", "dataset": "digits", "progress": False}


@pytest.fixture(scope="session")
def small_run():
    """Settings of ``Config.of`` for the smallest of the paper's models on the
    offline digits, without a progress bar; read-only, so that module-scoped
    fixtures share it (``dict(**small_run, epochs=3)`` makes a run's own)."""
    return types.MappingProxyType(_SMALL_RUN)


@pytest.fixture(scope="session")
def small_sweep():
    """:func:`small_run` at a budget sweep's rate and batch size."""
    return types.MappingProxyType(dict(_SMALL_RUN, lr=3e-3, batch_size=64))
