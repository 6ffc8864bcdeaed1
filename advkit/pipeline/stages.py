"""What notebooks 04 and 05 compute, built from their parameters: one function per notebook,
called by the notebook and by `python -m advkit.pipeline.distributed` (torchrun), so that both compute
with the same settings and the notebook finds complete the files the command wrote, and only plots.

`landscape_study(values)` (notebook 04: the comparison surfaces and the sensitivity study) and
`flatness_study(values)` (notebook 05: flatness.csv) read the parameters they need from `values`
(a notebook's `globals()` or a profile's values) by the names of the notebooks' `parameters`
cells. Under torchrun each rank computes on its own device (`advkit.ranks.device`).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch
import xarray as xr
from torch import nn

from advkit import ranks
from advkit._torch import Attack, to_float
from advkit.attacks.pgd import pgd
from advkit.data import Dataset, get_dataset, subset
from advkit.landscape.settings import SurfaceSettings
from advkit.landscape.studies import sensitivity_surfaces
from advkit.landscape.surfaces import model_surfaces
from advkit.runs.run import Run, load_models, resolve_device
from advkit.studies import zoo

LANDSCAPE_PARAMETERS = (
    "run", "dataset", "data_dir", "device", "seed", "n_images", "landscape_split", "direction_seed", "normalization",
    "span", "resolution", "line_resolution", "robust", "pgd_eps", "pgd_steps", "robust_n_images", "robust_resolution",
    "radius", "sensitivity_norms", "sensitivity_radii", "sensitivity_none_radii", "sensitivity_resolution", "overwrite")
"""Notebook 04's parameters that decide its surfaces (tests/test_distributed.py: all are in its `parameters` cell)."""

FLATNESS_PARAMETERS = (
    "run", "dataset", "data_dir", "device", "seed", "n_subset", "pgd_eps", "pgd_steps", "pgd_alpha", "pgd_restarts",
    "n_autoattack", "aa_steps", "aa_targets", "flatness_xi", "flatness_samples", "worst_xi", "worst_steps",
    "hessian_iters", "hessian_samples", "hessian_backend", "recompute")
"""Notebook 05's parameters that decide flatness.csv."""

ZOO_SETTINGS_PARAMETERS = {"n_eval": "n_subset", **{name: name for name in (
    "dataset", "pgd_eps", "pgd_steps", "pgd_alpha", "pgd_restarts", "n_autoattack", "aa_steps", "aa_targets",
    "flatness_xi", "flatness_samples", "worst_xi", "worst_steps", "hessian_iters", "hessian_samples", "hessian_backend",
    "seed")}}
"""{`advkit.studies.zoo.ZooSettings` field: the notebook 05 parameter that sets it}."""


def parameters(values: Mapping[str, Any], names: tuple[str, ...], notebook: str) -> dict[str, Any]:
    """{name: value} of `names` from `values`; a missing one is an error naming the notebook."""
    missing = [n for n in names if n not in values]
    if missing:
        raise KeyError(f"{notebook} needs the parameter(s) {missing}; got none of them")
    return {n: values[n] for n in names}


@dataclass
class LandscapeStudy:
    """Notebook 04's inputs: the run, its models on this rank's device, the first `n_images`
    images of `landscape_split`, the shared surface settings and the PGD re-run at every point."""

    parameters: dict[str, Any]
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
        return model_surfaces(
            self.models, self.x, self.y, self.run, self.settings, seed=p["direction_seed"], norm=p["normalization"],
            line_resolution=p["line_resolution"], attack=self.attack,
            attack_name=f"PGD-{p['pgd_steps']}, ε = {p['pgd_eps']:.3g}",
            robust_resolution=p["robust_resolution"] if p["robust"] else 0, robust_n=p["robust_n_images"],
            radius=p["radius"], overwrite=p["overwrite"])

    def sensitivity_surfaces(self) -> dict[tuple[str, float, str], xr.Dataset]:
        """The sensitivity study's lines (`advkit.landscape.studies.sensitivity_surfaces`), every normalization
        at its radii (unnormalized directions at `sensitivity_none_radii`)."""
        p = self.parameters
        spans = {n: p["sensitivity_none_radii"] if n == "none" else p["sensitivity_radii"]
                 for n in p["sensitivity_norms"]}
        return sensitivity_surfaces(
            self.models, self.x, self.y, self.run, self.settings.replace(resolution=p["sensitivity_resolution"]),
            norms=p["sensitivity_norms"], spans=spans, seed=p["direction_seed"], overwrite=p["overwrite"])


def landscape_study(values: Mapping[str, Any]) -> LandscapeStudy:
    """Notebook 04's inputs from its parameters (`LANDSCAPE_PARAMETERS`, read from `values`)."""
    p = parameters(values, LANDSCAPE_PARAMETERS, "notebook 04_visualize")
    if p["landscape_split"] not in ("test", "train"):
        raise ValueError(f"landscape_split={p['landscape_split']!r}: choose 'test' or 'train'")
    dev = ranks.device(resolve_device(p["device"]))
    run = Run.named(p["run"])
    data = get_dataset(p["dataset"], p["data_dir"])
    split = (data.x_train, data.y_train) if p["landscape_split"] == "train" else (data.x_test, data.y_test)
    x, y = subset(*split, p["n_images"])
    x = to_float(x)
    attack = functools.partial(pgd, eps=p["pgd_eps"], steps=p["pgd_steps"], seed=p["seed"]) if p["robust"] else None
    settings = SurfaceSettings(span=p["span"], resolution=p["resolution"],
                                 data_name=f"{p['dataset']} {p['landscape_split']}[:{len(y)}]")
    return LandscapeStudy(p, run, dev, load_models(run, device=dev), x, y, settings, attack)


@dataclass
class FlatnessStudy:
    """Notebook 05's inputs: the run, the dataset, the metrics' settings and this rank's device."""

    parameters: dict[str, Any]
    run: Run
    device: torch.device
    data: Dataset
    settings: zoo.ZooSettings

    def table(self, progress: bool = True) -> pd.DataFrame:
        """Every metric for every model (`advkit.studies.zoo.flatness_table`), cached in flatness.csv; the
        sharpness columns of notebook 04 may be missing."""
        return zoo.flatness_table(self.run, self.data, self.settings, device=self.device,
                                  recompute=self.parameters["recompute"], progress=progress, optional=["sharpness"])


def flatness_study(values: Mapping[str, Any]) -> FlatnessStudy:
    """Notebook 05's inputs from its parameters (`FLATNESS_PARAMETERS`, read from `values`)."""
    p = parameters(values, FLATNESS_PARAMETERS, "notebook 05_flatness_correlation")
    settings = zoo.ZooSettings(**{field: p[name] for field, name in ZOO_SETTINGS_PARAMETERS.items()})
    dev = ranks.device(resolve_device(p["device"]))
    return FlatnessStudy(p, Run.named(p["run"]), dev, get_dataset(p["dataset"], p["data_dir"]), settings)
