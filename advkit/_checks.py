"""Argument checks: one family, one argument order `(name, value, ...)`, each raising ValueError
that names the parameter before any long computation starts.

Torch-free, so that `advkit.pipeline.params` checks a run's parameters in well under a second with the
very functions the library's dataclasses and functions use. The
library's torch-free facts (optimizer names, Xu et al.'s attacks, the seed range, the device rule,
the quadratic-fit point rule) are here too, for the same reason.
"""

from __future__ import annotations

import math
import reprlib
from collections.abc import Iterable, Sequence
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


# ---------------------------------------------------------------- the library's torch-free facts
# Kept here, torch-free, so that `advkit.pipeline.params` declares the notebooks' parameters from the library's own
# names and rules without importing torch; the modules named beside each use them from here.
OPTIMIZERS = ("sgd", "adam")                                 # advkit.training.fit.TrainConfig.optimizer
SCHEDULES = ("constant", "multistep", "cosine", "onecycle")  # advkit.training.fit.TrainConfig.schedule
RECIPES = ("paper", "fast")                                  # advkit.training.fit: as given, or FAST_RECIPE
# Xu et al. 2019's fine-tunes, named after their attack (advkit.attacks.evaluate.XU2019)
XU_ATTACKS = ("fgsm", "pgd", "stadv")
AUGMENT_MODES = ("static", "regenerate")            # advkit.training.augment.xu_finetune: fixed or regenerated
AUGMENT_DTYPES = ("uint8", "float32")               # advkit.training.augment.augmented_dataset's storage
DIRECTION_NORMS = ("filter", "layer", "weight", "none")  # advkit.landscape.directions (Li et al. 2018's filter)
HESSIAN_BACKENDS = ("forward", "reverse")           # advkit.curvature.operator.HessianOperator's products
CI_METHODS = ("fisher", "bootstrap")                # advkit.studies.correlation's confidence intervals
MAX_SEED = 2**32 - 1  # numpy's seeds are 32-bit; torch takes these too
QUADRATIC_FIT_POINTS = {1: 4, 2: 7}
"""Grid points within the radius that the sharpness's quadratic fit needs, 1D and 2D
(advkit.landscape.sharpness.check_radius)."""


def check_seed(name: str, value: Any) -> None:
    """A seed numpy and torch both take: an integer in [0, MAX_SEED]."""
    check_int(name, value, 0, MAX_SEED)


def check_device(name: str, value: Any) -> None:
    """A device name: auto, cpu, cuda or cuda:N."""
    if not (isinstance(value, str) and (value in ("auto", "cpu", "cuda")
                                        or (value.startswith("cuda:") and value[5:].isdigit()))):
        raise ValueError(f"{name}={shown(value)} is not a device: use auto, cpu, cuda or cuda:N")


def points_within(radius: float, coords: Sequence[float], dims: int) -> int:
    """Points of the grid `coords`^dims within `radius` of the centre: what the sharpness's quadratic
    fit has to work with (advkit.landscape.sharpness.check_radius)."""
    c = np.asarray(coords, dtype=float)
    if dims == 1:
        return int(np.sum(np.abs(c) <= radius + 1e-12))
    a, b = np.meshgrid(c, c)
    return int(np.sum(np.hypot(a, b) <= radius + 1e-12))
