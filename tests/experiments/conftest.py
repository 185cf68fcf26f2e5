"""The runs shared by the experiments' tests, as fixtures."""

import pytest

# The smallest of the paper's models on the offline digits.
_SMALL_RUN = {"model": "vit-nomlp-wkewq-wvwo", "dataset": "digits", "progress": False}


@pytest.fixture
def small_run():
    """Settings of ``Config.of`` for the smallest of the paper's models on the
    offline digits, without a progress bar; a fresh dict for every test."""
    return dict(_SMALL_RUN)


@pytest.fixture
def small_sweep():
    """:func:`small_run` at a budget sweep's rate and batch size."""
    return dict(_SMALL_RUN, lr=3e-3, batch_size=64)
