"""Argument checks: one family, one argument order `(name, value, ...)`, each raising ValueError
that names the parameter before any long computation starts.

Torch-free, so that `advkit.params` checks a run's parameters in well under a second with the
very functions the library's dataclasses and functions use; `advkit._torch` re-exports them.
"""

from __future__ import annotations

import math
import reprlib
from collections.abc import Iterable
from typing import Any

import numpy as np

MAX_SHOWN = 200  # characters of a value quoted in a message
_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxlist, _REPR.maxtuple, _REPR.maxdict, _REPR.maxset = 4, 16, 16, 16, 16
_REPR.maxstring = _REPR.maxother = MAX_SHOWN


def shown(value: Any) -> str:
    """`repr(value)` cut to MAX_SHOWN characters (and its nesting and list lengths), so that a message
    quoting a hostile value stays one short line."""
    text = _REPR.repr(value)
    return text if len(text) <= MAX_SHOWN else text[:MAX_SHOWN - 3] + "..."


def check_choice(name: str, value: Any, allowed: Iterable[Any]) -> None:
    """`value` is one of `allowed`."""
    allowed = tuple(allowed)
    if value not in allowed:
        raise ValueError(f"{name}={shown(value)} is not available; choose one of {list(allowed)}")


def check_int(name: str, value: Any, minimum: int = 1, maximum: int | None = None) -> None:
    """An integer (not a bool) in [minimum, maximum]."""
    ok = not isinstance(value, bool) and isinstance(value, (int, np.integer))
    if not ok or value < minimum or (maximum is not None and value > maximum):
        bound = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise ValueError(f"{name} must be an integer {bound}, got {shown(value)}")


def check_number(name: str, value: Any, low: float = 0.0, high: float = math.inf, *,
                 low_open: bool = False, high_open: bool = False) -> None:
    """A finite real number in [low, high] (open at either end with `low_open`, `high_open`)."""
    ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
    ok = ok and math.isfinite(value) and (value > low if low_open else value >= low)
    ok = ok and (value < high if high_open else value <= high)
    if not ok:
        bound = f"> {low:g}" if low_open else f">= {low:g}"
        bound += f" and {'<' if high_open else '<='} {high:g}" if math.isfinite(high) else ""
        raise ValueError(f"{name} must be a finite number {bound}, got {shown(value)}")
