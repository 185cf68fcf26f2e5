"""The documentation builds without warnings, lists every public name, and the
code passes the linter and the formatter the project configures."""

import pathlib
import re
import shutil
import subprocess
import sys

import pytest

import twophase_optax as tpo

ROOT = pathlib.Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"


def documented_names() -> set[str]:
    """The last component of every object the API page documents."""
    text = (DOCS / "api.md").read_text()
    targets = re.findall(
        r"^\.\. auto(?:function|class|data|module):: (\S+)", text, re.M
    )
    return {target.rsplit(".", 1)[-1] for target in targets}


def test_api_reference_has_an_entry_for_every_public_name():
    public = set(tpo.__all__)
    documented = documented_names()
    assert public - documented == set(), "public names without an API entry"
    # Whatever else the page documents lives in one of the package's modules.
    import importlib
    import pkgutil

    modules = [
        importlib.import_module(f"twophase_optax.{m.name}")
        for m in pkgutil.iter_modules(tpo.__path__)
    ]
    for extra in documented - public:
        assert any(hasattr(module, extra) for module in modules), extra


def test_docs_build_with_warnings_as_errors(tmp_path):
    pytest.importorskip("sphinx", reason="the docs extra: pip install -e '.[docs]'")
    pytest.importorskip("myst_nb", reason="the docs extra: pip install -e '.[docs]'")
    done = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html"]
        + [str(DOCS), str(tmp_path / "html")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-5000:]
    index = (tmp_path / "html" / "api.html").read_text()
    assert 'id="twophase_optax.two_phase"' in index


def ruff(*args: str) -> subprocess.CompletedProcess:
    executable = shutil.which("ruff", path=str(pathlib.Path(sys.executable).parent))
    if executable is None:
        pytest.skip("ruff is in the test extra: pip install -e '.[test]'")
    return subprocess.run(
        [executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )


def test_ruff_check_is_clean():
    done = ruff("check", ".")
    assert done.returncode == 0, done.stdout[-5000:]


def test_ruff_format_is_clean():
    done = ruff("format", "--check", ".")
    assert done.returncode == 0, done.stdout[-5000:]
