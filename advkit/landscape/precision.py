"""How precisely a surface is computed: "auto" measures bf16 autocast (then TF32, on CUDA)
against strict fp32 at this surface's own points, through its engine, and keeps the faster
precision only where it changes the loss by less than `AUTOCAST_TOLERANCE` relative at all of
them (`choose_surface_precision`). `choose_precision` is the older rule: the model's own weights only.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch
from torch import nn

from advkit._checks import check_int, check_number
from advkit._torch import check_precision, gpu_policy, loss_and_accuracy, model_device, resolve_precision

if TYPE_CHECKING:
    from advkit.landscape.engine import Engine

AUTOCAST_TOLERANCE = 1e-3  # largest relative change of the loss that a faster precision may cause


def autocast_error(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, precision: str = "bf16",
                   batch_size: int = 1024) -> float:
    """Relative change |L_bf16 - L_fp32| / L_fp32 of the mean cross-entropy under autocast.

    Runs on the model's device (CPU autocast included), at the model's own weights, in eval mode.
    """
    fp32 = loss_and_accuracy(model, x, y, batch_size=batch_size, precision="fp32").loss
    amp = loss_and_accuracy(model, x, y, batch_size=batch_size, precision=precision).loss
    return abs(amp - fp32) / max(abs(fp32), 1e-12)


def choose_precision(model: nn.Module, x: torch.Tensor, y: torch.Tensor, precision: str = "auto", *,
                     tolerance: float = AUTOCAST_TOLERANCE, check_on_cpu: bool = False,
                     n_check: int = 2048) -> tuple[str, float | None]:
    """Resolve `precision` at the model's own weights only (the centre of a surface); also return
    the measured bf16 error. Surfaces use `choose_surface_precision` (all probe points).

    "auto" uses bf16 autocast only under the GPU policy (`advkit._torch.gpu_policy`: on CUDA;
    `check_on_cpu` applies the rule on any device too) and only
    if it changes the loss on the first `n_check` examples by less than `tolerance` relative.
    """
    check_precision(precision)
    check_number("tolerance", tolerance, low_open=True)
    if precision in ("fp32", "tf32"):
        return resolve_precision(precision, model_device(model)), None
    if precision == "auto" and not gpu_policy(model_device(model)) and not check_on_cpu:
        return "fp32", None
    err = autocast_error(model, x[:n_check], y[:n_check])
    if precision == "bf16":
        return "bf16", err
    return ("bf16" if err < tolerance else "fp32"), err


def probe_points(coords: Sequence[np.ndarray], n_random: int = 2, seed: int = 0) -> np.ndarray:
    """Where "auto" checks a surface, shape (P, dims): the centre (all coefficients 0), the extreme
    points (corners of a grid, both ends of a line: the largest perturbations) and `n_random`
    seeded random grid points besides those (fewer if the grid has no more)."""
    check_int("n_random", n_random, minimum=0)
    rng = np.random.default_rng(seed)
    corners = itertools.product(*[(float(c[0]), float(c[-1])) for c in coords])
    points = dict.fromkeys([(0.0,) * len(coords), *corners])  # ordered, unique
    wanted = len(points) + n_random
    for _ in range(20 * n_random):
        if len(points) == wanted:
            break
        points.setdefault(tuple(float(rng.choice(c)) for c in coords))
    return np.array(list(points), dtype=np.float64)


class PrecisionChoice(NamedTuple):
    """The resolved precision, the largest relative loss change measured per candidate precision
    ({"bf16": ..., "tf32": ...}; empty when nothing was measured), and what it was measured on."""

    precision: str
    errors: dict[str, float]
    n_points: int
    n_images: int


def choose_surface_precision(engine: Engine, coeffs: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                             precision: str = "auto", *, tolerance: float = AUTOCAST_TOLERANCE,
                             check_on_cpu: bool = False, n_check: int = 2048) -> PrecisionChoice:
    """Resolve `precision` for the surface whose probe points (`probe_points`) are `coeffs`.

    The error of a precision p is max over the points of |L_p - L_fp32| / L_fp32 on the first
    `n_check` images, both through `engine.fixed` (strict fp32 as reference). "auto" takes bf16
    if its error is under `tolerance`, else on CUDA "tf32" under the same rule, else "fp32"; off
    the GPU policy (`advkit._torch.gpu_policy`) it is "fp32" unchecked unless `check_on_cpu`.
    "bf16"/"tf32" are kept (error measured, for the record; "tf32" is "fp32" off CUDA), "fp32"
    measures nothing.
    """
    check_precision(precision)
    check_number("tolerance", tolerance, low_open=True)
    check_int("n_check", n_check)
    cuda = engine.device.type == "cuda"  # TF32 is a CUDA feature: the only other candidate there
    resolved = precision if precision == "auto" else resolve_precision(precision, engine.device)
    if resolved == "fp32" or (resolved == "auto" and not gpu_policy(engine.device) and not check_on_cpu):
        return PrecisionChoice("fp32", {}, 0, 0)
    x, y = x[:n_check], y[:n_check]
    reference = _losses(engine, coeffs, x, y, "fp32")
    errors: dict[str, float] = {}

    def choice(p: str) -> PrecisionChoice:
        return PrecisionChoice(p, errors, len(coeffs), len(y))

    for candidate in (("bf16", "tf32") if cuda else ("bf16",)) if resolved == "auto" else (resolved,):
        changed = _losses(engine, coeffs, x, y, candidate)
        errors[candidate] = float(((changed - reference).abs() / reference.abs().clamp_min(1e-12)).max())
        if resolved != "auto" or errors[candidate] < tolerance:
            return choice(candidate)
    return choice("fp32")


def _losses(engine: Engine, coeffs: torch.Tensor, x: torch.Tensor, y: torch.Tensor, precision: str) -> torch.Tensor:
    """Summed loss at each point, in groups of the engine's points per forward (not compiled:
    the check needs no compiled graph of its own shapes)."""
    k = engine.points_per_forward
    return torch.cat([engine.fixed(coeffs[i:i + k], x, y, precision=precision, compiled=False)[0]
                      for i in range(0, len(coeffs), k)])
