"""The settings of one surface: what `compute_surface` is asked for, frozen.

A `SurfaceSettings` is at once the call's options, the surface file's cache key
(`cache_key`: every setting that changes the values) and the file's netCDF attributes
(`as_attrs` / `from_attrs`), so the three cannot drift apart. Options that change only the
speed (batch sizes, points per forward, memory layout, BatchNorm folding, compilation) are recorded in the
file but are not part of the key: a file resumes under other speed options.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from advkit._checks import check_choice, check_int
from advkit._torch import check_precision, gpu_policy
from advkit.runs.run import describe_callable

QUANTITIES = ("loss", "accuracy", "robust_loss", "robust_accuracy")
BN_MODES = ("eval", "recalibrate")
ROBUST_MODES = ("none", "attack re-run at each point", "fixed adversarial examples")

LONG_NAMES = {
    "loss": "cross-entropy loss",
    "accuracy": "accuracy (fraction correct)",
    "robust_loss": "cross-entropy loss on adversarial examples",
    "robust_accuracy": "robust accuracy (fraction correct on adversarial examples)",
}

Span = tuple[float, float]


def coordinates(span: Span | float = (-1.0, 1.0), resolution: int = 51) -> np.ndarray:
    """`resolution` evenly spaced values over `span` (a number s means (-s, s))."""
    low, high = _span("span", span)
    check_int("resolution", resolution, minimum=2)
    return np.linspace(low, high, int(resolution))


def _span(name: str, span: Any) -> Span:
    """(low, high) with finite low < high; a number s means (-s, s)."""
    if isinstance(span, (int, float, np.integer, np.floating)) and not isinstance(span, bool):
        span = (-float(span), float(span))
    try:
        low, high = (float(v) for v in span)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be (low, high) or a number s > 0 for (-s, s), got {span!r}") from None
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise ValueError(f"{name} must be (low, high) with finite low < high, got {span!r}")
    return low, high


KNOB = {"key": False}  # field metadata: recorded in the file, not part of its cache key

IMAGE_FORWARDS_PER_LAUNCH = 16_384  # what one forward should carry on a GPU (points x images)
MAX_POINTS_PER_FORWARD = 16


def auto_points_per_forward(device: torch.device | str, n_images: int, batch_size: int, bn_mode: str = "eval") -> int:
    """Points per forward for points_per_forward=None: 1 for bn_mode="recalibrate" and off the GPU
    policy (`advkit._torch.gpu_policy`: on CUDA); under it enough that points x images per batch
    reach about IMAGE_FORWARDS_PER_LAUNCH (1,000 images: 16 points; 10,000: 1), at most
    MAX_POINTS_PER_FORWARD."""
    check_int("n_images", n_images)
    check_int("batch_size", batch_size)
    if not gpu_policy(device) or bn_mode == "recalibrate":
        return 1
    per_batch = min(n_images, batch_size)
    return max(1, min(MAX_POINTS_PER_FORWARD, IMAGE_FORWARDS_PER_LAUNCH // per_batch))



@dataclass(frozen=True)
class SurfaceSettings:
    """Everything that decides a surface (Li et al. 2018; Xu et al. Eq. 5-6), validated on creation.

    - `span`, `resolution`: alpha's coordinates (a number s means (-s, s)); `beta_span`,
      `beta_resolution`: beta's, for 2D surfaces (default: alpha's).
    - `kind`: "line" / "grid" by the number of directions unless given ("interpolation", "plane", ...).
    - `model_name`, `data_name`: labels stored in the file (attributes `model`, `data`).
    - `quantities`: default loss and accuracy, plus the robust ones when an attack or x_adv is given.
    - `robust`, `attack_name`: how robust quantities were made; `compute_surface` sets `robust`
      from its inputs and `attack_name` (attribute `attack`) defaults to a description of the attack.
    - `bn_mode`: "eval" keeps the stored BatchNorm statistics (Li et al.), "recalibrate" recomputes
      them at every point on training images, in batches of `bn_batch_size`.
    - `precision`: "auto", "bf16", "tf32" or "fp32"; the file records what "auto" resolved to
      (`advkit.landscape.precision.choose_surface_precision`: checked at the surface's own points).
    - speed only (not in the cache key): `batch_size` (None: 10,000 under the GPU policy, i.e. on
      CUDA, 1024 elsewhere), `attack_batch_size` (None: `batch_size`), `points_per_forward` (vmap;
      None: `auto_points_per_forward`, 1 off the GPU policy), `channels_last` (None: under it), `fold_bn` (fold
      eval-mode BatchNorm into the convolutions), `compile` (`torch.compile` the per-point forward).
    """

    span: Span | float = (-1.0, 1.0)
    resolution: int = 51
    beta_span: Span | float | None = None
    beta_resolution: int | None = None
    kind: str | None = None
    model_name: str = field(default="model", metadata={"attr": "model"})
    data_name: str = field(default="data", metadata={"attr": "data"})
    quantities: tuple[str, ...] | None = field(default=None, metadata={"decode": lambda s: tuple(s.split(","))})
    robust: str = "none"
    attack_name: str | None = field(default=None, metadata={"attr": "attack"})
    bn_mode: str = "eval"
    bn_batch_size: int = 256
    precision: str = "auto"
    batch_size: int | None = field(default=None, metadata=KNOB)
    attack_batch_size: int | None = field(default=None, metadata=KNOB)
    points_per_forward: int | None = field(default=None, metadata=KNOB)
    channels_last: bool | None = field(default=None, metadata={**KNOB, "decode": bool})
    fold_bn: bool = field(default=True, metadata={**KNOB, "decode": bool})
    compile: bool = field(default=False, metadata={**KNOB, "decode": bool})

    def __post_init__(self) -> None:
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen)
        set_("span", _span("span", self.span))
        check_int("resolution", self.resolution, minimum=2)
        if self.beta_span is not None:
            set_("beta_span", _span("beta_span", self.beta_span))
        if self.beta_resolution is not None:
            check_int("beta_resolution", self.beta_resolution, minimum=2)
        for name in ("kind", "model_name", "data_name", "attack_name"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"{name} must be a non-empty string, got {value!r}")
        if self.quantities is not None:
            quantities = (self.quantities,) if isinstance(self.quantities, str) else tuple(self.quantities)
            if not quantities:
                raise ValueError("quantities must name at least one quantity (None: the defaults)")
            for q in quantities:
                check_choice("quantities entry", q, QUANTITIES)
            set_("quantities", quantities)
        check_choice("robust", self.robust, ROBUST_MODES)
        check_choice("bn_mode", self.bn_mode, BN_MODES)
        check_int("bn_batch_size", self.bn_batch_size)
        check_precision(self.precision)
        for name in ("batch_size", "attack_batch_size", "points_per_forward"):
            if getattr(self, name) is not None:
                check_int(name, getattr(self, name))
        for name in ("channels_last", "fold_bn", "compile"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), (bool, np.bool_)):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")

    def replace(self, **changes: Any) -> SurfaceSettings:
        """A copy with `changes` (field names), validated again."""
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise ValueError(f"unknown surface setting(s) {unknown}; SurfaceSettings has "
                             f"{[f.name for f in dataclasses.fields(self)]}")
        return dataclasses.replace(self, **changes)

    # -- coordinates --
    def alphas(self) -> np.ndarray:
        return coordinates(self.span, self.resolution)

    def betas(self) -> np.ndarray:
        return coordinates(self.beta_span or self.span, self.beta_resolution or self.resolution)

    # -- what a call resolves before computing --
    def for_inputs(self, dims: int, device: torch.device, *, attack: Any = None, x_adv: Any = None,
                   n_images: int | None = None) -> SurfaceSettings:
        """The settings a `dims`-D surface of `n_images` images on `device` is computed and recorded
        with: defaults filled in, `robust` and `attack_name` from the attack (re-run at each point)
        or fixed examples `x_adv`."""
        if attack is not None and x_adv is not None:
            raise ValueError("give either attack (re-run at every point) or x_adv (fixed adversarial examples), "
                             "not both")
        if self.attack_name is not None and attack is None:
            raise ValueError(f"attack_name={self.attack_name!r} names an attack, but no attack=... was given")
        if dims == 1 and (self.beta_span is not None or self.beta_resolution is not None):
            raise ValueError("beta_span and beta_resolution are for 2-D surfaces; this one has 1 direction")
        robust = ROBUST_MODES[1] if attack is not None else ROBUST_MODES[2] if x_adv is not None else ROBUST_MODES[0]
        quantities = self.quantities or (("loss", "accuracy") + (("robust_loss", "robust_accuracy")
                                                                 if robust != "none" else ()))
        if robust == "none" and any(q.startswith("robust") for q in quantities):
            raise ValueError("robust quantities need attack=... (re-run at each point) or x_adv=... (fixed examples)")
        gpu = gpu_policy(device)
        batch_size = self.batch_size or (10_000 if gpu else 1024)
        ppf = self.points_per_forward or auto_points_per_forward(device, n_images or batch_size, batch_size,
                                                                 self.bn_mode)
        return self.replace(
            kind=self.kind or ("line" if dims == 1 else "grid"), quantities=quantities, robust=robust,
            attack_name=(self.attack_name or describe_callable(attack)) if attack is not None else None,
            beta_span=(self.beta_span or self.span) if dims == 2 else None,
            beta_resolution=(self.beta_resolution or self.resolution) if dims == 2 else None,
            batch_size=batch_size,
            channels_last=gpu if self.channels_last is None else bool(self.channels_last),
            fold_bn=bool(self.fold_bn) and self.bn_mode == "eval",
            points_per_forward=1 if self.bn_mode == "recalibrate" else ppf)

    # -- the file's attributes and cache key --
    def as_attrs(self) -> dict[str, str | int | float | list[float]]:
        """netCDF attributes: None -> "none", booleans -> 0/1, quantities -> "loss,accuracy"."""
        return {_attr(f): _encode(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_attrs(cls, attrs: Mapping[str, Any]) -> SurfaceSettings:
        """The settings recorded in a surface file's attributes (`as_attrs` read back); a speed
        option an older file does not record takes its default."""
        missing = [_attr(f) for f in dataclasses.fields(cls) if _attr(f) not in attrs and f.metadata.get("key", True)]
        if missing:
            raise ValueError(f"these surface attributes record no settings {missing}: not written by this advkit")
        values = {}
        for f in dataclasses.fields(cls):
            if _attr(f) not in attrs:
                continue
            value = plain(attrs[_attr(f)])
            none = value == "none" and f.default is None  # "none" is also a value of `robust`
            values[f.name] = None if none else f.metadata.get("decode", _identity)(value)
        return cls(**values)

    def cache_key(self) -> dict[str, Any]:
        """The attributes that decide the values: a file is reused only when all of them match."""
        return {_attr(f): _encode(getattr(self, f.name)) for f in dataclasses.fields(self)
                if f.metadata.get("key", True)}


def settings_with(settings: SurfaceSettings | None, overrides: Mapping[str, Any] | None = None,
                  **defaults: Any) -> SurfaceSettings:
    """`settings` (None: SurfaceSettings(**defaults)) with keyword `overrides` of its fields; a
    given `settings` without a kind takes the default `kind`."""
    if settings is not None and not isinstance(settings, SurfaceSettings):
        raise ValueError("settings must be an advkit.landscape.settings.SurfaceSettings, "
                         f"got {type(settings).__name__}")
    if settings is None:
        settings = SurfaceSettings(**defaults)
    elif settings.kind is None and "kind" in defaults:
        settings = settings.replace(kind=defaults["kind"])
    return settings.replace(**overrides) if overrides else settings


def _attr(f: dataclasses.Field) -> str:
    return f.metadata.get("attr", f.name)


def _identity(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def _encode(value: Any) -> str | int | float | list[float]:
    if value is None:
        return "none"
    if isinstance(value, (bool, np.bool_)):
        return int(value)
    if isinstance(value, Sequence) and not isinstance(value, str):
        return ",".join(value) if all(isinstance(v, str) for v in value) else [float(v) for v in value]
    return value


def plain(value: Any) -> Any:
    """An attribute value as read from netCDF (numpy scalars and arrays) as plain Python."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value.item() if isinstance(value, np.generic) else value
