"""Argument types that check a flag's range, for argparse.

A value out of range is a usage error, reported the way argparse reports an
unknown choice: one line that names the flag and the allowed range, exit 2.

Example:
  >>> import argparse
  >>> parser = argparse.ArgumentParser(prog="train")
  >>> _ = parser.add_argument("--epochs", type=integer(minimum=1))
  >>> parser.parse_args(["--epochs", "3"]).epochs
  3
  >>> integer(minimum=1)("-3")
  Traceback (most recent call last):
  ...
  argparse.ArgumentTypeError: must be an integer >= 1, got '-3'
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from collections.abc import Sequence
from typing import Any


def integer(minimum: int) -> Callable[[str], int]:
    """An integer at least ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(
                f"must be an integer >= {minimum}, got {text!r}"
            )
        return value

    parse.__name__ = f"integer >= {minimum}"
    return parse


def number(
    low: float = -math.inf,
    high: float = math.inf,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> Callable[[str], float]:
    """A finite float in the interval from ``low`` to ``high``.

    ``low_open`` / ``high_open`` exclude the ends.
    """
    left = "(" if low_open or low == -math.inf else "["
    right = ")" if high_open or high == math.inf else "]"
    interval = f"{left}{low:g}, {high:g}{right}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        inside = (
            math.isfinite(value)
            and (value > low if low_open else value >= low)
            and (value < high if high_open else value <= high)
        )
        if not inside:
            raise argparse.ArgumentTypeError(
                f"must be a number in {interval}, got {text!r}"
            )
        return value

    parse.__name__ = f"number in {interval}"
    return parse


POSITIVE = number(0.0, low_open=True)
FRACTION = number(0.0, 1.0, low_open=True, high_open=True)


def named(
    choices: Sequence[str], value: Callable[[str], Any]
) -> Callable[[str], tuple]:
    """``NAME=VALUE`` with ``NAME`` one of ``choices`` and ``VALUE`` parsed by
    ``value``, as a ``(name, value)`` pair.

    Example:
      >>> named(["vgg5"], integer(minimum=1))("vgg5=3")
      ('vgg5', 3)
      >>> named(["vgg5"], integer(minimum=1))("vgg5=0")
      Traceback (most recent call last):
      ...
      argparse.ArgumentTypeError: vgg5=0: must be an integer >= 1, got '0'
    """

    def parse(text: str) -> tuple:
        name, sep, raw = text.partition("=")
        if not sep or name not in choices:
            raise argparse.ArgumentTypeError(
                f"must be NAME=VALUE with NAME one of {', '.join(choices)}, "
                f"got {text!r}"
            )
        try:
            return name, value(raw)
        except argparse.ArgumentTypeError as error:
            raise argparse.ArgumentTypeError(f"{name}={raw}: {error}") from None

    parse.__name__ = f"NAME=VALUE with NAME one of {', '.join(choices)}"
    return parse
