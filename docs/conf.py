"""Sphinx configuration: MyST Markdown guides, autodoc API, notebooks unexecuted."""

from __future__ import annotations

import pathlib
import shutil
import sys

DOCS = pathlib.Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(ROOT))

# The notebooks live in notebooks/; the pages render copies, not executed here
# (tests/docs/test_notebooks.py executes them).
(DOCS / "notebooks").mkdir(exist_ok=True)
for notebook in sorted((ROOT / "notebooks").glob("*.ipynb")):
    shutil.copy2(notebook, DOCS / "notebooks" / notebook.name)

project = "twophase_optax"
author = "the twophase_optax authors"
copyright = "2026, the twophase_optax authors"

extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
]
source_suffix = {".md": "myst-nb", ".ipynb": "myst-nb"}
exclude_patterns = ["_build", "**.ipynb_checkpoints"]
nb_execution_mode = "off"
myst_enable_extensions = ["colon_fence", "dollarmath"]
myst_heading_anchors = 3

autodoc_member_order = "bysource"
autodoc_typehints = "description"
napoleon_google_docstring = True
napoleon_numpy_docstring = False

html_theme = "sphinx_book_theme"
html_title = "twophase_optax"
html_theme_options = {"show_toc_level": 2}
# A reference to a name of ours that does not exist is an error.
nitpicky = True
# Types from other packages: no intersphinx (the build runs offline).
nitpick_ignore_regex = [
    (r"py:.*", r"(jax|jaxlib|optax|chex|numpy|collections|typing|types|builtins)\..*"),
]
napoleon_use_ivar = True  # NamedTuple fields are documented once, as fields.
