"""Argument types that check a flag's range, for argparse.

A value out of range is a usage error, reported the way argparse reports an
unknown choice: one line that names the flag and the allowed range, exit 2.
Each type also has ``check(value)``, the same test on a value already parsed
(raising ``ValueError``), which :meth:`experiments.config.Config.validate`
applies to settings made in Python; :func:`checked_by` makes a type whose
range is a library factory's.

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

    def check(value: Any) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"must be an integer >= {minimum}, got {value!r}")

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
    parse.check = check
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

    def inside(value: float) -> bool:
        return (
            math.isfinite(value)
            and (value > low if low_open else value >= low)
            and (value < high if high_open else value <= high)
        )

    def check(value: Any) -> None:
        if not isinstance(value, (int, float)) or not inside(value):
            raise ValueError(f"must be a number in {interval}, got {value!r}")

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not inside(value):
            raise argparse.ArgumentTypeError(
                f"must be a number in {interval}, got {text!r}"
            )
        return value

    parse.__name__ = f"number in {interval}"
    parse.check = check
    return parse


def checked_by(
    parse: Callable[[str], Any], check: Callable[[Any], Any]
) -> Callable[[str], Any]:
    """``parse`` (``int``, ``float``, ...), then ``check``: a factory that
    raises ``ValueError`` on a value out of its range, whose message becomes
    the flag's.

    Example:
      >>> import twophase_optax as tpo
      >>> patience = checked_by(int, lambda n: tpo.swap.plateau(patience=n))
      >>> patience("5")
      5
      >>> try:
      ...     patience("0")
      ... except argparse.ArgumentTypeError as error:
      ...     print(error)
      tpo.swap.plateau: patience must be an integer >= 1, got 0.
    """

    def checked(text: str) -> Any:
        try:
            value = parse(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"must be {'an integer' if parse is int else 'a number'}, got {text!r}"
            ) from None
        try:
            check(value)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None
        return value

    checked.__name__ = parse.__name__
    checked.check = check
    return checked


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
