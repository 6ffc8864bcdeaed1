"""Surfaces: lines, grids, interpolations and planes of clean and robust loss, and the set of
surfaces notebook 04 compares (`model_surfaces`).

theta(alpha, beta) = theta* + alpha d1 + beta d2 (Li et al. 2018; Xu et al. 2019, Eq. 5-6).
Each surface is an xarray Dataset, written to its file after every row, so an interrupted
computation resumes where it stopped; a file made with other settings is recomputed and
replaced with a StaleCacheWarning (`advkit.runs.run.cache_is_current`). Under torchrun the rows are
shared out across the ranks (`advkit.ranks.in_rounds`: one row per rank and round, rank 0 writes
after each round): the same file, with bit for bit the values one process computes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
import xarray as xr
from torch import nn

from advkit import ranks
from advkit._checks import DIRECTION_NORMS, check_choice, check_int, check_seed
from advkit._torch import Attack, eval_mode, model_device, state_hash, tensors_hash, to_float
from advkit.landscape.directions import (
    Directions,
    architecture_mismatch,
    interpolation_directions,
    plane_directions,
    random_directions,
)
from advkit.landscape.engine import Engine
from advkit.landscape.files import cached_surface, write_surface
from advkit.landscape.precision import AUTOCAST_TOLERANCE, choose_surface_precision, probe_points
from advkit.landscape.settings import LONG_NAMES, SurfaceSettings, settings_with
from advkit.landscape.sharpness import check_radius
from advkit.progress import LoopProgress
from advkit.runs.run import Run

SURFACE_KINDS = ("grid", "line", "robust_grid", "interpolation")


def compute_surface(model: nn.Module, directions: Directions, x: torch.Tensor, y: torch.Tensor,
                    settings: SurfaceSettings | None = None, *, path: str | Path | None = None,
                    attack: Attack | None = None, x_adv: torch.Tensor | None = None,
                    bn_x: torch.Tensor | None = None, progress: bool = False,
                    callback: Callable[[int, int], None] | None = None, **overrides: Any) -> xr.Dataset:
    """Evaluate the settings' quantities at theta* + alpha d1 (+ beta d2) for every coordinate.

    `settings` (a `SurfaceSettings`; keyword `overrides` of its fields build or change it) is also
    the file's cache key. Robust quantities come from an `attack` re-run at each point
    (attack(model, x, y) -> x_adv) or from fixed adversarial examples `x_adv`; `bn_x`: the
    training images of bn_mode="recalibrate". With `path`, the surface is written after every
    row; a file with the same settings is resumed (or returned when complete), one with other
    settings recomputed and replaced with a StaleCacheWarning. `callback(done, total)` runs
    after each row is saved.
    """
    settings = settings_with(settings, overrides)
    if not isinstance(directions, Directions):
        raise ValueError("directions must be an advkit.landscape.directions.Directions, "
                         f"got {type(directions).__name__}")
    directions.check(model)
    if len(y) != len(x) or len(y) == 0:
        raise ValueError(f"x and y must be non-empty and of equal length, got {len(x)} and {len(y)}")
    if x_adv is not None and x_adv.shape != x.shape:
        raise ValueError(f"x_adv must have x's shape {tuple(x.shape)}, got {tuple(x_adv.shape)}")
    device = model_device(model)
    settings = settings.for_inputs(directions.ndim, device, attack=attack, x_adv=x_adv, n_images=len(y))
    if settings.bn_mode == "recalibrate" and (bn_x is None or len(bn_x) == 0):
        raise ValueError("bn_mode='recalibrate' needs bn_x: training images to recompute BatchNorm statistics on")
    with eval_mode(model):
        data = [None if t is None else to_float(t.to(device)) for t in (x, x_adv, bn_x)]
        if settings.channels_last and data[0].dim() == 4:
            data[:2] = [None if t is None else t.contiguous(memory_format=torch.channels_last) for t in data[:2]]
        x_dev, xa_dev, bn_dev = data
        y_dev = y.to(device)
        engine = Engine(model, directions, batch_size=settings.batch_size,
                        points_per_forward=settings.points_per_forward, precision="fp32",
                        channels_last=settings.channels_last, fold_bn=settings.fold_bn,
                        bn_mode=settings.bn_mode, bn_x=bn_dev, bn_batch_size=settings.bn_batch_size,
                        compile=settings.compile)
        # checked at this surface's own points; every rank computes with rank 0's choice (and so
        # agrees on the file's cache key)
        axes = [settings.alphas()] if directions.ndim == 1 else [settings.alphas(), settings.betas()]
        probes = torch.tensor(probe_points(axes), dtype=torch.float32, device=device)
        choice = ranks.broadcast(choose_surface_precision(engine, probes, x_dev, y_dev, settings.precision))
        settings = settings.replace(precision=choice.precision)
        engine.precision = choice.precision
        inputs = _inputs(model, directions, x, y, x_adv, bn_x, settings)
        old = cached_surface(path, {**settings.cache_key(), **inputs})
        # every rank computes the same surface into the same file, from the same resumed points
        computed = "none" if old is None else tensors_hash([("computed", torch.from_numpy(old["computed"].values))])
        ranks.agree(f"surface {'in memory' if path is None else Path(path).name}",
                    {**settings.cache_key(), **inputs, "file": None if path is None else Path(path).name,
                     "computed_points_sha256": computed})
        if old is not None and old["computed"].values.all():
            return old
        attrs = {
            **settings.as_attrs(), **inputs,
            "title": f"{directions.ndim}D loss landscape ({settings.kind}) of {settings.model_name} "
                     f"on {settings.data_name}",
            "directions_cosine": "none" if directions.cosine is None else directions.cosine,
            "directions_raw_cosine": "none" if directions.raw_cosine is None else directions.raw_cosine,
            "directions_note": directions.note or "none",
            "n_ignored_parameters": len(directions.ignored),
            "autocast_relative_error": choice.errors.get("bf16", "not measured"),  # max over the probe points
            "tf32_relative_error": choice.errors.get("tf32", "not measured"),
            "precision_probe_points": choice.n_points, "precision_check_images": choice.n_images,
            "precision_tolerance": AUTOCAST_TOLERANCE,
            "device": str(device), "fold_bn_pairs": len(engine.pairs), "fold_bn_static": int(engine.static_fold),
            "torch_version": str(torch.__version__),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "accuracy_unit": "fraction in [0, 1]",
            "elapsed_s": 0.0 if old is None else float(old.attrs.get("elapsed_s", 0.0)),
        }
        surface = _Surface(settings, directions.ndim, attrs, old)
        surface.fill(engine, x_dev, xa_dev, y_dev, attack, path, progress, callback)
        return surface.dataset()


def _inputs(model: nn.Module, directions: Directions, x: torch.Tensor, y: torch.Tensor,
            x_adv: torch.Tensor | None, bn_x: torch.Tensor | None, settings: SurfaceSettings) -> dict[str, Any]:
    """The identity of what a surface is computed on (hashes of weights, data, directions): with
    the settings, the file's cache key."""
    out = {"model_sha256": state_hash(model), "data_n": len(y), "data_sha256": tensors_hash([("x", x), ("y", y)]),
           **directions.settings()}
    if x_adv is not None:
        out["x_adv_sha256"] = tensors_hash([("x_adv", x_adv)])
    if settings.bn_mode == "recalibrate":
        out["bn_data_sha256"] = tensors_hash([("bn_x", bn_x)])
    return out


class _Surface:
    """The values and computed-points mask of one surface while it is being filled, row by row."""

    def __init__(self, settings: SurfaceSettings, dims: int, attrs: dict[str, Any], old: xr.Dataset | None):
        self.settings, self.attrs = settings, attrs
        self.coords = {"alpha": settings.alphas()} if dims == 1 else {"alpha": settings.alphas(),
                                                                     "beta": settings.betas()}
        shape = tuple(len(c) for c in self.coords.values())
        self.values = {q: np.full(shape, np.nan) for q in settings.quantities}
        self.mask = np.zeros(shape, dtype=bool)
        if old is not None:  # resume: same settings, so the same coordinates
            self.mask = old["computed"].values.astype(bool)
            for q in settings.quantities:
                self.values[q] = old[q].values.astype(np.float64)

    def dataset(self) -> xr.Dataset:
        dims = tuple(self.coords)
        data_vars = {q: (dims, v, {"long_name": _long_name(q, self.settings.robust)}) for q, v in self.values.items()}
        data_vars["computed"] = (dims, self.mask.astype(np.int8), {"long_name": "1 where the point is computed"})
        return xr.Dataset(data_vars, coords=self.coords, attrs=self.attrs)

    def fill(self, engine: Engine, x: torch.Tensor, x_adv: torch.Tensor | None, y: torch.Tensor,
             attack: Attack | None, path: str | Path | None, progress: bool,
             callback: Callable[[int, int], None] | None) -> None:
        """Compute the missing points in blocks of a row (2D) or 10 points (1D), one device->host
        transfer per block; write the file and call back after each round of blocks: one block
        alone, one per rank under torchrun (`advkit.ranks.in_rounds`; rank 0 writes)."""
        s, dims = self.settings, len(self.coords)
        points = np.stack(np.meshgrid(*self.coords.values(), indexing="ij"), -1).reshape(-1, dims)
        coeffs_all = torch.tensor(points, dtype=torch.float32, device=engine.device)
        k = engine.points_per_forward
        block = max(len(self.coords["beta"]), k) if dims == 2 else max(10, k)
        flat_mask = self.mask.reshape(-1)
        todo = [i for i in range(0, len(points), block) if not flat_mask[i:i + block].all()]
        total, done, n = self.mask.size, int(self.mask.sum()), len(y)
        bar = _progress(total, done, progress and ranks.is_writer(), f"{s.model_name} {s.kind}")
        per_row = len(self.coords["beta"]) if dims == 2 else 1  # the driver's log counts rows (2D) or points (1D)
        steps = LoopProgress(f"surface {s.model_name} {s.kind}", "row" if dims == 2 else "point",
                             total // per_row, done // per_row)

        def missing(first: int) -> np.ndarray:
            idx = np.arange(first, min(first + block, len(points)))
            return idx[~flat_mask[idx]]

        def compute(first: int) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
            idx = missing(first)
            results: dict[str, list[torch.Tensor]] = {q: [] for q in s.quantities}
            for g in range(0, len(idx), k):
                c = coeffs_all[idx[g:g + k]]
                measured = {}
                if "loss" in s.quantities or "accuracy" in s.quantities:
                    measured["loss"], measured["accuracy"] = engine.fixed(c, x, y)
                if x_adv is not None:
                    measured["robust_loss"], measured["robust_accuracy"] = engine.fixed(c, x_adv, y)
                elif attack is not None:
                    measured["robust_loss"], measured["robust_accuracy"] = engine.attacked(
                        c, x, y, attack, s.attack_batch_size or s.batch_size)
                for q in s.quantities:
                    results[q].append(measured[q] / n)
            # one device->host transfer per block; the coordinates let the receivers check the block
            return idx, points[idx], {q: torch.cat(results[q]).double().cpu().numpy() for q in s.quantities}

        start = time.perf_counter()
        for blocks in ranks.in_rounds(todo, compute):
            for sender, (first, block_values) in enumerate(blocks):  # the whole round, before any of it is kept
                _check_block(block_values, missing(first), points, s.quantities, sender)
            for _, (idx, _, values) in blocks:
                for q in s.quantities:
                    self.values[q].reshape(-1)[idx] = values[q]
                flat_mask[idx] = True
                done += len(idx)
                bar.update(len(idx))
            self.attrs["elapsed_s"] += time.perf_counter() - start
            start = time.perf_counter()
            if path is not None and ranks.is_writer():
                write_surface(self.dataset(), path)
            if ranks.is_writer():
                steps.step(done // per_row)
            if callback is not None:
                callback(done, total)
        bar.close()
        ranks.barrier()  # the file is complete before any rank reads it again


def _check_block(received: tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]], expected: np.ndarray,
                 points: np.ndarray, quantities: tuple[str, ...], sender: int) -> None:
    """Refuse a block whose points, coordinates or number of values are not the ones this
    surface's grid expects (a rank computing another grid): a ValueError, nothing written."""
    idx, coords, values = received
    lengths = {q: len(values.get(q, ())) for q in quantities}
    if (len(idx) != len(expected) or not np.array_equal(idx, expected) or not np.array_equal(coords, points[expected])
            or set(values) != set(quantities) or any(n != len(expected) for n in lengths.values())):
        first = lambda c: np.asarray(c)[:1].tolist()  # noqa: E731 (the block's first point)
        raise ValueError(f"rank {sender} sent {len(idx)} point(s) from {first(coords)} with {lengths} value(s) "
                         f"where this surface's grid has {len(expected)} from {first(points[expected])}: the ranks "
                         "compute different surfaces; this round is not written")


def _long_name(q: str, robust: str) -> str:
    name = LONG_NAMES[q]
    if q.startswith("robust") and robust == "fixed adversarial examples":
        name += " (fixed adversarial examples, not re-attacked at each point)"
    elif q.startswith("robust"):
        name += " (attack re-run at each point)"
    return name


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, initial: int, enabled: bool, desc: str):
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="pt")


# --- the four kinds of surface ------------------------------------------------------------------


def _check_dims(directions: Directions, dims: int) -> None:
    if isinstance(directions, Directions) and directions.ndim != dims:
        raise ValueError(f"a {dims}-D surface needs {dims} direction(s); directions has {directions.ndim}")


def line(model: nn.Module, directions: Directions, x: torch.Tensor, y: torch.Tensor,
         settings: SurfaceSettings | None = None, **kwargs: Any) -> xr.Dataset:
    """1D landscape theta* + alpha d along one direction (Li et al. 2018, Fig. 1-style curves);
    keywords as `compute_surface` (e.g. span, resolution, path, attack)."""
    _check_dims(directions, 1)
    return compute_surface(model, directions, x, y, settings, **kwargs)


def grid(model: nn.Module, directions: Directions, x: torch.Tensor, y: torch.Tensor,
         settings: SurfaceSettings | None = None, **kwargs: Any) -> xr.Dataset:
    """2D landscape theta* + alpha d1 + beta d2 over a grid (Xu et al. Fig. 1-2); keywords as
    `compute_surface` (beta_span, beta_resolution: beta's axis, default alpha's)."""
    _check_dims(directions, 2)
    return compute_surface(model, directions, x, y, settings, **kwargs)


def interpolation(model_a: nn.Module, model_b: nn.Module, x: torch.Tensor, y: torch.Tensor,
                  settings: SurfaceSettings | None = None, *, path: str | Path | None = None,
                  **overrides: Any) -> xr.Dataset:
    """1D interpolation theta = (1 - t) theta_a + t theta_b (BatchNorm statistics interpolated too;
    with bn_mode="recalibrate" they are recomputed instead). alpha is t; default span (0, 1)."""
    settings = settings_with(settings, overrides, kind="interpolation", span=(0.0, 1.0))
    return compute_surface(model_a, interpolation_directions(model_a, model_b), x, y, settings, path=path)


def plane(model_a: nn.Module, model_b: nn.Module, model_c: nn.Module, x: torch.Tensor, y: torch.Tensor,
          settings: SurfaceSettings | None = None, *, path: str | Path | None = None,
          **overrides: Any) -> xr.Dataset:
    """The plane through three models: a + alpha (b - a) + beta (c - a); a at (0, 0), b at (1, 0),
    c at (0, 1). Default span (-0.25, 1.25) on both axes, resolution 31."""
    settings = settings_with(settings, overrides, kind="plane", span=(-0.25, 1.25), resolution=31)
    return compute_surface(model_a, plane_directions(model_a, model_b, model_c), x, y, settings, path=path)


# --- the set of surfaces a notebook compares --------------------------------------------------------


def interpolation_pairs(models: Mapping[str, nn.Module], reference: str | None = "base"
                        ) -> tuple[list[str], dict[str, str]]:
    """The models that can be interpolated from `reference` (same architecture: one parameter
    space), and {model: why not} for the others (e.g. a ResNet-18 AT model beside a ResNet-32 base)."""
    if reference is None or reference not in models:
        return [], {}
    ok, skipped = [], {}
    for name, model in models.items():
        if name == reference:
            continue
        reason = architecture_mismatch(models[reference], model)
        if reason is None:
            ok.append(name)
        else:
            skipped[name] = reason
    return ok, skipped


@dataclass(frozen=True)
class ComparisonSettings:
    """Which surfaces `model_surfaces` compares and how, checked on creation: the direction `seed` and
    normalization `norm` every model shares; the 1D line's `line_resolution` (None: the grid's);
    `robust_resolution` points per axis of a 2D robust grid (0: none) and `robust_n`, the first images the
    attacks run on (None: all); the `reference` the other models are interpolated from, t over
    `interpolation_span`; and the sharpness `radius` the grid and line must hold (None: unchecked)."""

    seed: int = 0
    norm: str = "filter"
    line_resolution: int | None = None
    robust_resolution: int = 0
    robust_n: int | None = None
    reference: str | None = "base"
    interpolation_span: tuple[float, float] = (0.0, 1.0)
    radius: float | None = None

    def __post_init__(self) -> None:
        check_seed("seed", self.seed)
        check_choice("norm", self.norm, DIRECTION_NORMS)
        if self.line_resolution is not None:
            check_int("line_resolution", self.line_resolution, minimum=2)
        check_int("robust_resolution", self.robust_resolution, minimum=0)
        if self.robust_resolution == 1:
            raise ValueError("robust_resolution must be 0 (no 2D robust surface) or >= 2, got 1")
        if self.robust_n is not None:
            check_int("robust_n", self.robust_n)


def model_surfaces(models: Mapping[str, nn.Module], x: torch.Tensor, y: torch.Tensor,
                   run: Run | str | Path | None = None, settings: SurfaceSettings | None = None,
                   comparison: ComparisonSettings | None = None, *, attack: Attack | None = None,
                   attack_name: str | None = None, overwrite: bool = False) -> dict[str, dict[str, xr.Dataset]]:
    """Every model's comparison surfaces, all with the same direction seed (Xu et al. Fig. 1-2):

    - "grid": 2D clean loss/accuracy over the settings' [-span, span]^2 at their resolution;
    - "line": 1D along the grid's first direction, with the robust loss/accuracy when an `attack` is
      given, re-run at every point (Stutz et al. Fig. 4);
    - "robust_grid": 2D robust loss/accuracy (with `comparison.robust_resolution` > 0; needs `attack`);
      "line" and "robust_grid" use the first `comparison.robust_n` images (attacks are the expensive part);
    - "interpolation": (1 - t) theta_reference + t theta_model for every other model of the
      reference's architecture (`interpolation_pairs` says which are skipped and why).

    `settings` holds what every surface shares (span, resolution, data_name, bn_mode, precision,
    speed options), `comparison` which surfaces are compared (`ComparisonSettings`). Returns
    {kind: {model: Dataset}}. With a `run`, each surface is cached as `run.surface(model, kind)` under
    the one cache policy; `overwrite` recomputes even matching files.
    """
    settings = settings_with(settings)
    c = comparison or ComparisonSettings()
    if not models:
        raise ValueError("models is empty: give a mapping name -> model")
    if settings.kind is not None or settings.attack_name is not None or settings.beta_span is not None:
        raise ValueError("model_surfaces chooses each surface's kind and beta axis; give attack_name= to it, "
                         f"not in settings (got kind={settings.kind!r}, attack_name={settings.attack_name!r}, "
                         f"beta_span={settings.beta_span!r})")
    low, span = settings.span
    if low != -span:
        raise ValueError(f"model_surfaces needs a span centred on the model, (-s, s); got {settings.span}")
    line_resolution = c.line_resolution or settings.resolution
    if c.robust_resolution and attack is None:
        raise ValueError("robust_resolution > 0 needs attack=... (re-run at every point of the 2D grid)")
    if c.radius is not None:
        check_radius(c.radius, span, settings.resolution, dims=2)
        check_radius(c.radius, span, line_resolution, dims=1)
    reference = c.reference
    if reference is not None and reference not in models and len(models) > 1:
        raise ValueError(f"reference={reference!r} is not among the models {list(models)}")
    x_r, y_r = (x, y) if c.robust_n is None or attack is None else (x[:c.robust_n], y[:c.robust_n])
    robust_data = settings.data_name if len(y_r) == len(y) else f"{settings.data_name}, first {len(y_r)}"
    robust = {"attack_name": attack_name} if attack is not None else {}
    run = None if run is None else Run.of(run)

    def path(name: str, kind: str) -> Path | None:
        p = None if run is None else run.surface(name, kind)
        if overwrite and p is not None:
            p.unlink(missing_ok=True)  # every rank, before any rank can write it again
        return p

    out: dict[str, dict[str, xr.Dataset]] = {k: {} for k in SURFACE_KINDS}
    interpolated = set(interpolation_pairs(models, reference)[0])
    for name, model in models.items():
        own = settings.replace(model_name=name)
        d2 = random_directions(model, 2, seed=c.seed, norm=c.norm)
        d1 = random_directions(model, 1, seed=c.seed, norm=c.norm)  # = d2's first direction
        out["grid"][name] = grid(model, d2, x, y, own, path=path(name, "grid"))
        out["line"][name] = line(model, d1, x_r, y_r, own.replace(resolution=line_resolution, data_name=robust_data,
                                                                  **robust), path=path(name, "line"), attack=attack)
        if c.robust_resolution:
            out["robust_grid"][name] = grid(
                model, d2, x_r, y_r, own.replace(resolution=c.robust_resolution, data_name=robust_data,
                                                 quantities=("robust_loss", "robust_accuracy"), **robust),
                path=path(name, "robust_grid"), attack=attack)
        if name in interpolated:
            out["interpolation"][name] = interpolation(
                models[reference], model, x, y, settings.replace(
                    kind="interpolation", span=c.interpolation_span, resolution=line_resolution,
                    model_name=f"{reference} -> {name}"), path=path(name, "interpolation"))
    return {k: v for k, v in out.items() if v}
