"""Code blocks of the README and the docs, as the tests run them."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[2]
README = ROOT / "README.md"


def python_blocks(section: str, path: pathlib.Path = README) -> list[str]:
    """The Python code blocks under the heading ``section`` of ``path``."""
    text = path.read_text()
    body = text.split(f"# {section}\n", 1)[1]
    body = re.split(r"\n#{1,6} ", body, maxsplit=1)[0]
    return re.findall(r"```python\n(.*?)```", body, flags=re.S)
