"""Range checks for every number a user can pass: CLI flags, config values, pipeline arguments.

A :class:`Range` says what a number may be (integer or not, bounds, a multiple); it checks a
value and raises :class:`RangeError` with one line naming the flag or config key, the allowed
range and the value given. ``nan`` and infinities are never allowed.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Mapping
from dataclasses import dataclass


class RangeError(ValueError):
    """A number outside its allowed range; the message names it, the range and the value."""


@dataclass(frozen=True)
class Range:
    """The numbers a flag or config value may take.

    Args:
        lo: Smallest allowed value (``None``: no lower bound).
        hi: Largest allowed value (``None``: no upper bound).
        integer: Only whole numbers.
        lo_open: ``lo`` itself is not allowed (``> lo``).
        multiple_of: The value must be a multiple of this.
    """

    lo: float | None = None
    hi: float | None = None
    integer: bool = False
    lo_open: bool = False
    multiple_of: int | None = None

    def describe(self) -> str:
        """``an integer >= 1``, ``a finite number in [0, 1]``, ..."""
        kind = "an integer" if self.integer else "a finite number"
        lo_sign = ">" if self.lo_open else ">="
        if self.lo is not None and self.hi is not None:
            text = f"{kind} in {'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}]"
        elif self.lo is not None:
            text = f"{kind} {lo_sign} {self.lo:g}"
        elif self.hi is not None:
            text = f"{kind} <= {self.hi:g}"
        else:
            text = kind
        return text + (f", a multiple of {self.multiple_of}" if self.multiple_of else "")

    def contains(self, value: float) -> bool:
        """Whether ``value`` is allowed."""
        if isinstance(value, bool) or not isinstance(value, int | float):
            return False
        if not math.isfinite(value) or (self.integer and value != int(value)):
            return False
        if self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo):
            return False
        if self.hi is not None and value > self.hi:
            return False
        return not (self.multiple_of and int(value) % self.multiple_of)

    def check(self, name: str, value: float) -> float:
        """Return ``value`` if allowed, else raise :class:`RangeError` naming ``name``."""
        if not self.contains(value):
            raise RangeError(f"{name} must be {self.describe()}, got {value!r}")
        return value

    def arg(self, text: str) -> int | float:
        """An ``argparse`` type: parse ``text`` and check it (argparse names the flag)."""
        try:
            value: float = int(text) if self.integer else float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {self.describe()}, got '{text}'") from None
        if not self.contains(value):
            raise argparse.ArgumentTypeError(f"must be {self.describe()}, got '{text}'")
        return value


POSITIVE_INT = Range(1, integer=True)
NONNEGATIVE_INT = Range(0, integer=True)
SEED = Range(0, 2**32 - 1, integer=True)
PROBABILITY = Range(0, 1)
POSITIVE = Range(0, lo_open=True)
NONNEGATIVE = Range(0)
IMAGE_SIDE = Range(64, integer=True, multiple_of=8)
"""A stored or trained image side (the VAE downsamples by 8)."""
GUIDANCE = Range(0)
"""Classifier-free guidance scale: 0 is the unconditional prediction, 1 no guidance."""
ETA = Range(0, 1)
"""DDIM eta (diffusers' DDIM variance takes a square root of a negative number above 1)."""


def check_ranges(prefix: str, values: Mapping[str, object], ranges: Mapping[str, Range]) -> None:
    """Check each ``values[name]`` that has a range (``None`` means "unset" and passes).

    A list or tuple is checked item by item.

    Args:
        prefix: Prepended to each name in the message: ``"model."``, ``"data."``, or ``"--"``,
            which also writes the name as a flag (``ft_steps`` -> ``--ft-steps``).
        values: The values, by name.
        ranges: The allowed range of each checked name.
    """
    for name, allowed in ranges.items():
        value = values.get(name)
        if value is not None:
            shown = name.replace("_", "-") if prefix == "--" else name
            for item in value if isinstance(value, list | tuple) else (value,):
                allowed.check(prefix + shown, item)  # type: ignore[arg-type]
