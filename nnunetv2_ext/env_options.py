"""The package's numeric environment options, read and checked in one place.

A variable that is unset or empty gives the default. Any other value must parse and lie in the option's
range, or :class:`EnvOptionError` names the variable, the value and the valid range — so e.g.
``NNUNETV2_EXT_REFINE_BOX=nan`` stops ``nnUNetv2_predict`` with that message instead of silently writing
all-background segmentations. Standard library only.
"""
from __future__ import annotations

import math
import os


class EnvOptionError(ValueError):
    """An environment option holds an invalid value (message: variable, value, valid range, fix)."""


def _read(name: str, default, parse, valid, expected: str):
    """``parse($name)`` if it parses and ``valid(value)``; ``default`` if unset or empty; else an error."""
    raw = os.environ.get(name, '').strip()
    if not raw:
        return default
    try:
        value = parse(raw)
    except ValueError:
        value = None
    if value is None or not valid(value):
        raise EnvOptionError(f"environment variable {name}={raw!r} is invalid: expected {expected}. "
                             f"Set a valid value or unset it (unset {name}) for the default.")
    return value


def env_float(name: str, default: float, low: float, high: float) -> float:
    """``float($name)`` if it is finite and in ``[low, high]``; ``default`` if unset or empty.

    Raises :class:`EnvOptionError` for anything else (text, nan, inf, out of range).
    """
    return _read(name, default, float, lambda v: math.isfinite(v) and low <= v <= high,
                 f'a finite number in [{low:g}, {high:g}]')


def env_int(name: str, default: int, low: int, high: int, odd: bool = False) -> int:
    """``int($name)`` if it is in ``[low, high]`` (and odd, if ``odd``); ``default`` if unset or empty.

    Raises :class:`EnvOptionError` for anything else.
    """
    return _read(name, default, int, lambda v: low <= v <= high and not (odd and v % 2 == 0),
                 f"{'an odd' if odd else 'an'} integer in [{low}, {high}]")
