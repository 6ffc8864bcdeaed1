"""The referee's question: does the ordering of models by sharpness survive another direction
normalization or another range? Surfaces of every model under every normalization and span,
and Kendall's tau of each setting's ordering against a reference setting."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
import xarray as xr
from torch import nn

from advkit._checks import DIRECTION_NORMS, check_choice, check_number, check_seed
from advkit._torch import Attack
from advkit.landscape.directions import BN_POLICIES, random_directions
from advkit.landscape.settings import SurfaceSettings, settings_with
from advkit.landscape.sharpness import mean_increase, quadratic_fit
from advkit.landscape.surfaces import grid, line
from advkit.runs.run import Run

METRICS = ("curvature", "mean_increase")
SensitivitySurfaces = Mapping[tuple[str, float, str], xr.Dataset]


@dataclass(frozen=True)
class SensitivitySettings:
    """The referee's sweep, checked on creation: every normalization of `norms` at each of `spans` (or
    {norm: its own spans}: unnormalized "none" Gaussian directions are far longer than the weights, so
    their informative range is far smaller), `dims`-D surfaces, one direction `seed` for all (each model
    sees the same raw direction), BatchNorm parameters perturbed or not (`bn`: "ignore" / "include")."""

    norms: Sequence[str] = ("filter", "layer", "none")
    spans: Sequence[float] | Mapping[str, Sequence[float]] = (0.25, 0.5, 1.0)
    dims: int = 1
    seed: int = 0
    bn: str = "ignore"

    def __post_init__(self) -> None:
        object.__setattr__(self, "norms", tuple(self.norms))
        check_choice("dims", self.dims, (1, 2))
        check_seed("seed", self.seed)
        check_choice("bn", self.bn, BN_POLICIES)
        for norm in self.norms:
            check_choice("norms entry", norm, DIRECTION_NORMS)
        if isinstance(self.spans, Mapping):
            missing = [n for n in self.norms if n not in self.spans]
            if missing:
                raise ValueError(f"spans has no entry for the normalization(s) {missing}; it has {sorted(self.spans)}")
        for n, values in self.span_lists().items():
            if not values:
                raise ValueError(f"spans for norm={n!r} must be a non-empty list of numbers > 0, got {values}")
            for s in values:
                check_number(f"spans entry for norm={n!r}", s, low_open=True)

    def span_lists(self) -> dict[str, list[float]]:
        """{norm: its spans}."""
        spans = self.spans
        return {n: [float(s) for s in (spans[n] if isinstance(spans, Mapping) else spans)] for n in self.norms}


def sensitivity_surfaces(models: Mapping[str, nn.Module], x: torch.Tensor, y: torch.Tensor,
                         run: Run | str | Path | None = None, settings: SurfaceSettings | None = None,
                         sensitivity: SensitivitySettings | None = None, *, attack: Attack | None = None,
                         bn_x: torch.Tensor | None = None, overwrite: bool = False, tag: str = ""
                         ) -> dict[tuple[str, float, str], xr.Dataset]:
    """Surfaces of every model under every normalization and span of `sensitivity`
    (`SensitivitySettings`); `settings` gives the rest (resolution, data_name, ...; its span is
    replaced by each of the spans). With a `run`, cached as `run.sensitivity_surface(model, norm, span,
    dims)` under the one cache policy; `overwrite` recomputes even matching files.

    `attack` (robust loss, re-run at every point) and `bn_x` (for `settings.bn_mode="recalibrate"`)
    extend the sweep (`advkit.landscape.replicates.sensitivity_replicates`); a non-default seed, `bn` or
    `bn_mode` is part of the cache file's name, so the variants never overwrite each other's files; so
    is `tag` (another study's files beside these).
    """
    settings = settings_with(settings)
    sens = sensitivity or SensitivitySettings()
    seed, bn, dims = sens.seed, sens.bn, sens.dims
    span_lists = sens.span_lists()
    run = None if run is None else Run.of(run)
    surface = line if dims == 1 else grid
    out = {}
    variant = "".join([tag, f"-s{seed}" if seed else "", f"-bn{bn}" if bn != "ignore" else "",
                       f"-{settings.bn_mode}" if settings.bn_mode != "eval" else "", "-robust" if attack else ""])
    for norm in sens.norms:
        for name, model in models.items():
            dirs = random_directions(model, dims, seed=seed, norm=norm, bn=bn)
            for span in span_lists[norm]:
                path = None if run is None else run.sensitivity_surface(name, norm + variant, span, dims)
                if overwrite and path is not None:
                    path.unlink(missing_ok=True)  # no exists() check: torchrun's ranks all remove it
                out[(norm, span, name)] = surface(model, dirs, x, y, settings.replace(span=span, model_name=name),
                                                  path=path, attack=attack, bn_x=bn_x)
    return out


def _metric(ds: xr.Dataset, metric: str, quantity: str, radius: float) -> float:
    if metric == "curvature":
        return quadratic_fit(ds, quantity, radius)["curvature_max"]
    return mean_increase(ds, quantity, radius)


def sensitivity_table(surfaces: SensitivitySurfaces, *, metric: str = "curvature", quantity: str = "loss",
                      radius_fraction: float = 0.2, reference: tuple[str, float] | None = None) -> pd.DataFrame:
    """Does the ordering of models hold across normalizations and spans?

    For every (norm, span): the metric per model (radius = radius_fraction * span), the
    ordering sharpest first, and Kendall's tau against the `reference` setting (default:
    filter normalization at the largest span). tau = 1 means the same ordering.
    """
    from scipy.stats import kendalltau

    check_choice("metric", metric, METRICS)
    check_number("radius_fraction", radius_fraction, low_open=True)
    settings = sorted({(n, s) for n, s, _ in surfaces}, key=lambda t: (t[0], t[1]))
    models = list(dict.fromkeys(m for _, _, m in surfaces))
    if reference is None:
        filt = [s for n, s in settings if n == "filter"]
        if not filt:
            raise ValueError("no 'filter' surfaces: give reference=(norm, span) explicitly")
        reference = ("filter", max(filt))
    if tuple(reference) not in settings:
        raise ValueError(f"reference={reference!r} is not among the settings {settings}")
    table = {(n, s): {m: _metric(surfaces[(n, s, m)], metric, quantity, radius_fraction * s)
                      for m in models if (n, s, m) in surfaces}
             for n, s in settings}
    ref = table[tuple(reference)]
    ref_order = sorted(ref, key=lambda m: -ref[m])
    rows = []
    for (n, s), vals in table.items():
        common = [m for m in models if m in vals and m in ref]
        tau = kendalltau([vals[m] for m in common], [ref[m] for m in common]).statistic \
            if len(common) > 1 else float("nan")
        order = sorted(vals, key=lambda m: -vals[m])
        same = [m for m in order if m in common] == [m for m in ref_order if m in common]
        rows.append({"norm": n, "span": s, **vals, "ordering": " > ".join(order),
                     "kendall_tau": float(tau), "same_ordering": same})
    out = pd.DataFrame(rows)
    out.attrs.update(metric=metric, quantity=quantity, radius_fraction=radius_fraction,
                     reference=f"{reference[0]} @ span {reference[1]:g}")
    return out


def sensitivity_summary(surfaces: SensitivitySurfaces, *, metrics: Sequence[str] = METRICS, quantity: str = "loss",
                        radius_fraction: float = 0.2, reference: tuple[str, float] | None = None) -> pd.DataFrame:
    """`sensitivity_table` for every metric, stacked with a leading `metric` column."""
    for m in metrics:
        check_choice("metrics entry", m, METRICS)
    tables = [sensitivity_table(surfaces, metric=m, quantity=quantity, radius_fraction=radius_fraction,
                                reference=reference) for m in metrics]
    for m, t in zip(metrics, tables):
        t.insert(0, "metric", m)
    out = pd.concat(tables, ignore_index=True)
    out.attrs.update({k: v for k, v in tables[0].attrs.items() if k != "metric"})
    return out


def sensitivity_analysis(models: Mapping[str, nn.Module], x: torch.Tensor, y: torch.Tensor,
                         run: Run | str | Path | None = None, settings: SurfaceSettings | None = None,
                         sensitivity: SensitivitySettings | None = None, *, metric: str = "curvature",
                         radius_fraction: float = 0.2, overwrite: bool = False) -> pd.DataFrame:
    """`sensitivity_surfaces` then `sensitivity_table`: one call for the referee's table."""
    check_choice("metric", metric, METRICS)
    surfaces = sensitivity_surfaces(models, x, y, run, settings, sensitivity, overwrite=overwrite)
    return sensitivity_table(surfaces, metric=metric, radius_fraction=radius_fraction)
