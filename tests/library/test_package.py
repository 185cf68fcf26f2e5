"""The installed package: version, public API, and no experiment dependencies."""

import importlib.metadata
import subprocess
import sys

import twophase_optax as tpo


def test_version_matches_distribution_metadata():
    assert tpo.__version__ == importlib.metadata.version("twophase-optax")


def test_public_api_is_exported():
    for name in tpo.__all__:
        assert hasattr(tpo, name), name
    assert set(tpo.BETA_RULES) == {
        "fletcher_reeves",
        "polak_ribiere",
        "polak_ribiere_plus",
        "hestenes_stiefel",
        "dai_yuan",
        "hager_zhang",
    }


def test_library_imports_neither_flax_nor_datasets():
    code = (
        "import sys, twophase_optax; "
        "bad = {'flax', 'tensorflow', 'tensorflow_datasets', 'sklearn', "
        "'matplotlib'} & set(sys.modules); "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
