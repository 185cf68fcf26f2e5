"""The experiments' persistent compilation cache: where it is, and that a
second process reads what the first compiled instead of compiling again."""

import os
import pathlib
import subprocess
import sys

import pytest

import experiments

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    "setting, expected",
    [
        ("off", None),
        ("/some/where", pathlib.Path("/some/where")),
        ("", pathlib.Path("/xdg/twophase_optax/jax")),
    ],
)
def test_the_cache_directory_follows_the_variable(setting, expected, monkeypatch):
    monkeypatch.setenv(experiments.CACHE_VARIABLE, setting)
    monkeypatch.setenv("XDG_CACHE_HOME", "/xdg")
    assert experiments.compilation_cache_dir() == expected


COMPILE = """
import jax, jax.numpy as jnp
import experiments
from jax._src import monitoring
hits = []
monitoring.register_event_listener(
    lambda event, **kw: hits.append(event) if "cache_hits" in event else None
)
f = jax.jit(lambda x: jnp.sin(x) @ jnp.cos(x).T)
print(float(f(jnp.ones((64, 64))).sum()), len(hits))
"""


def test_a_second_process_reads_the_compiled_program_back(tmp_path):
    env = {
        **os.environ,
        experiments.CACHE_VARIABLE: str(tmp_path),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    }
    env.pop("JAX_COMPILATION_CACHE_DIR", None)

    def run():
        out = subprocess.run(
            [sys.executable, "-c", COMPILE],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        )
        value, hits = out.stdout.split()
        return value, int(hits)

    first_value, first_hits = run()
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files and first_hits == 0
    second_value, second_hits = run()
    assert second_value == first_value and second_hits >= 1
    assert sorted(p.name for p in tmp_path.iterdir()) == files  # Nothing new.
