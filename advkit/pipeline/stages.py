"""What notebooks 04 and 05 compute, built from their parameters: one function per notebook,
called by the notebook and by `python -m advkit.pipeline.distributed` (torchrun), so that both compute
with the same settings and the notebook finds complete the files the command wrote, and only plots.

`landscape_study(LandscapeParameters(...))` (notebook 04: the comparison surfaces and the sensitivity study)
and `flatness_study(FlatnessParameters(...))` (notebook 05: flatness.csv) take typed settings whose fields are
the notebooks' `parameters` of the same names: the notebook builds them from its parameter variables, the
command from a profile's values (`from_values`). Under torchrun each rank computes on its own device
(`advkit.ranks.device`).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import pandas as pd
import torch
import xarray as xr
from torch import nn

from advkit import ranks
from advkit._torch import Attack, to_float
from advkit.attacks.pgd import pgd
from advkit.data import Dataset, get_dataset, subset
from advkit.landscape.settings import SurfaceSettings
from advkit.landscape.studies import SensitivitySettings, sensitivity_surfaces
from advkit.landscape.surfaces import ComparisonSettings, model_surfaces
from advkit.runs.run import Run, load_models, resolve_device
from advkit.studies import zoo

Parameters = TypeVar("Parameters", bound="NotebookParameters")


def parameters(values: Mapping[str, Any], names: tuple[str, ...], notebook: str) -> dict[str, Any]:
    """{name: value} of `names` from `values`; a missing one is an error naming the notebook."""
    missing = [n for n in names if n not in values]
    if missing:
        raise KeyError(f"{notebook} needs the parameter(s) {missing}; got none of them")
    return {n: values[n] for n in names}


class NotebookParameters:
    """Typed settings named as a notebook's `parameters` cell (`NOTEBOOK`): built from a profile's values."""

    NOTEBOOK = ""

    @classmethod
    def from_values(cls: type[Parameters], values: Mapping[str, Any]) -> Parameters:
        """The settings from {parameter: value} (a profile's values); a missing parameter is an error."""
        names = tuple(f.name for f in dataclasses.fields(cls))
        return cls(**parameters(values, names, f"notebook {cls.NOTEBOOK}"))


@dataclass(frozen=True)
class LandscapeParameters(NotebookParameters):
    """Notebook 04's parameters that decide its surfaces (tests/pipeline/test_distributed.py: all are in its
    `parameters` cell, with the meanings its comments give)."""

    NOTEBOOK = "04_visualize"

    run: str
    dataset: str
    data_dir: str | None
    device: str
    seed: int
    n_images: int
    landscape_split: str
    direction_seed: int
    normalization: str
    span: float
    resolution: int
    line_resolution: int
    robust: bool
    pgd_eps: float
    pgd_steps: int
    robust_n_images: int | None
    robust_resolution: int
    radius: float
    sensitivity_norms: list
    sensitivity_radii: list
    sensitivity_none_radii: list
    sensitivity_resolution: int
    overwrite: bool


@dataclass(frozen=True)
class FlatnessParameters(NotebookParameters):
    """Notebook 05's parameters that decide flatness.csv (all in its `parameters` cell)."""

    NOTEBOOK = "05_flatness_correlation"

    run: str
    dataset: str
    data_dir: str | None
    device: str
    seed: int
    n_subset: int
    pgd_eps: float
    pgd_steps: int
    pgd_alpha: float | None
    pgd_restarts: int
    n_autoattack: int
    aa_steps: int
    aa_targets: int
    flatness_xi: float
    flatness_samples: int
    worst_xi: float
    worst_steps: int
    hessian_iters: int
    hessian_samples: int
    hessian_backend: str
    recompute: bool


LANDSCAPE_PARAMETERS = tuple(f.name for f in dataclasses.fields(LandscapeParameters))
"""Notebook 04's parameters that decide its surfaces: `LandscapeParameters`' fields."""

FLATNESS_PARAMETERS = tuple(f.name for f in dataclasses.fields(FlatnessParameters))
"""Notebook 05's parameters that decide flatness.csv: `FlatnessParameters`' fields."""

ZOO_SETTINGS_PARAMETERS = {"n_eval": "n_subset", **{name: name for name in (
    "dataset", "pgd_eps", "pgd_steps", "pgd_alpha", "pgd_restarts", "n_autoattack", "aa_steps", "aa_targets",
    "flatness_xi", "flatness_samples", "worst_xi", "worst_steps", "hessian_iters", "hessian_samples", "hessian_backend",
    "seed")}}
"""{`advkit.studies.zoo.ZooSettings` field: the notebook 05 parameter that sets it}."""


@dataclass
class LandscapeStudy:
    """Notebook 04's inputs: the run, its models on this rank's device, the first `n_images`
    images of `landscape_split`, the shared surface settings and the PGD re-run at every point."""

    parameters: LandscapeParameters
    run: Run
    device: torch.device
    models: dict[str, nn.Module]
    x: torch.Tensor
    y: torch.Tensor
    settings: SurfaceSettings
    attack: Attack | None

    def surfaces(self) -> dict[str, dict[str, xr.Dataset]]:
        """The comparison surfaces (`advkit.landscape.surfaces.model_surfaces`: grid, line, robust grid,
        interpolations), cached in the run's landscapes/."""
        p = self.parameters
        comparison = ComparisonSettings(
            seed=p.direction_seed, norm=p.normalization, line_resolution=p.line_resolution,
            robust_resolution=p.robust_resolution if p.robust else 0, robust_n=p.robust_n_images, radius=p.radius)
        return model_surfaces(self.models, self.x, self.y, self.run, self.settings, comparison, attack=self.attack,
                              attack_name=f"PGD-{p.pgd_steps}, ε = {p.pgd_eps:.3g}", overwrite=p.overwrite)

    def sensitivity_surfaces(self) -> dict[tuple[str, float, str], xr.Dataset]:
        """The sensitivity study's lines (`advkit.landscape.studies.sensitivity_surfaces`), every normalization
        at its radii (unnormalized directions at `sensitivity_none_radii`)."""
        p = self.parameters
        spans = {n: p.sensitivity_none_radii if n == "none" else p.sensitivity_radii for n in p.sensitivity_norms}
        sweep = SensitivitySettings(norms=p.sensitivity_norms, spans=spans, seed=p.direction_seed)
        return sensitivity_surfaces(self.models, self.x, self.y, self.run,
                                    self.settings.replace(resolution=p.sensitivity_resolution), sweep,
                                    overwrite=p.overwrite)


def landscape_study(p: LandscapeParameters) -> LandscapeStudy:
    """Notebook 04's inputs from its parameters."""
    if p.landscape_split not in ("test", "train"):
        raise ValueError(f"landscape_split={p.landscape_split!r}: choose 'test' or 'train'")
    dev = ranks.device(resolve_device(p.device))
    run = Run.named(p.run)
    data = get_dataset(p.dataset, p.data_dir)
    split = (data.x_train, data.y_train) if p.landscape_split == "train" else (data.x_test, data.y_test)
    x, y = subset(*split, p.n_images)
    x = to_float(x)
    attack = functools.partial(pgd, eps=p.pgd_eps, steps=p.pgd_steps, seed=p.seed) if p.robust else None
    settings = SurfaceSettings(span=p.span, resolution=p.resolution,
                               data_name=f"{p.dataset} {p.landscape_split}[:{len(y)}]")
    return LandscapeStudy(p, run, dev, load_models(run, device=dev), x, y, settings, attack)


@dataclass
class FlatnessStudy:
    """Notebook 05's inputs: the run, the dataset, the metrics' settings and this rank's device."""

    parameters: FlatnessParameters
    run: Run
    device: torch.device
    data: Dataset
    settings: zoo.ZooSettings

    def table(self, progress: bool = True) -> pd.DataFrame:
        """Every metric for every model (`advkit.studies.zoo.flatness_table`), cached in flatness.csv; the
        sharpness columns of notebook 04 may be missing."""
        return zoo.flatness_table(self.run, self.data, self.settings, device=self.device,
                                  recompute=self.parameters.recompute, progress=progress, optional=["sharpness"])


def flatness_study(p: FlatnessParameters) -> FlatnessStudy:
    """Notebook 05's inputs from its parameters."""
    settings = zoo.ZooSettings(**{field: getattr(p, name) for field, name in ZOO_SETTINGS_PARAMETERS.items()})
    dev = ranks.device(resolve_device(p.device))
    return FlatnessStudy(p, Run.named(p.run), dev, get_dataset(p.dataset, p.data_dir), settings)
