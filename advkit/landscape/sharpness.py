"""Numbers for "sharper": curvature of a quadratic fit and mean loss increase near the centre of
a surface (Xu et al. 2019 compare sharpness by eye; these put numbers on it)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd
import xarray as xr

from advkit._checks import QUADRATIC_FIT_POINTS, check_choice, check_number, points_within
from advkit.landscape.settings import coordinates


def _points(ds: xr.Dataset, quantity: str, radius: float) -> tuple[np.ndarray, np.ndarray]:
    """Coordinates (n, dims) and values of the computed points within `radius` of the centre."""
    if quantity not in ds:
        raise ValueError(f"quantity={quantity!r} is not in this surface; it has {sorted(ds.data_vars)}")
    check_number("radius", radius, low_open=True)
    v = ds[quantity]
    if "beta" in v.dims:
        a, b = np.meshgrid(ds["alpha"].values, ds["beta"].values, indexing="ij")
        xy = np.stack([a.ravel(), b.ravel()], 1)
        vals = v.transpose("alpha", "beta").values.ravel()
    else:
        xy = ds["alpha"].values[:, None]
        vals = v.values.ravel()
    keep = (np.linalg.norm(xy, axis=1) <= radius + 1e-12) & np.isfinite(vals)
    return xy[keep], vals[keep]


def quadratic_fit(ds: xr.Dataset, quantity: str = "loss", radius: float = 0.2) -> dict[str, float]:
    """Least-squares fit L ~ c + g.x + x^T H x / 2 on the points within `radius` of the centre.

    Returns the fitted centre value, gradient norm and the curvature: the eigenvalues of H
    (2D; `curvature_max`, `curvature_min`) or L'' (1D; both equal) in units of the
    direction's scale, and H's entries `curvature_aa`, `curvature_bb`, `curvature_ab` (1D: aa),
    estimates of d1ᵀHd1, d2ᵀHd2, d1ᵀHd2 (`advkit.landscape.bridge` computes them exactly).
    """
    xy, vals = _points(ds, quantity, radius)
    d = xy.shape[1]
    if d == 1:
        a = xy[:, 0]
        design = np.stack([np.ones_like(a), a, a ** 2], 1)
    else:
        a, b = xy[:, 0], xy[:, 1]
        design = np.stack([np.ones_like(a), a, b, a ** 2, a * b, b ** 2], 1)
    if len(vals) < design.shape[1] + 1:
        raise ValueError(f"radius={radius} holds only {len(vals)} computed points; a quadratic fit in "
                         f"{d}D needs at least {design.shape[1] + 1}: increase radius or resolution")
    coef, *_ = np.linalg.lstsq(design, vals, rcond=None)
    if d == 1:
        eig = np.array([2 * coef[2]])
        grad = abs(coef[1])
        entries = {"curvature_aa": float(2 * coef[2])}
    else:
        hess = np.array([[2 * coef[3], coef[4]], [coef[4], 2 * coef[5]]])
        eig = np.linalg.eigvalsh(hess)
        grad = float(np.hypot(coef[1], coef[2]))
        entries = {"curvature_aa": float(hess[0, 0]), "curvature_bb": float(hess[1, 1]),
                   "curvature_ab": float(hess[0, 1])}
    return {"centre_fit": float(coef[0]), "gradient_norm": float(grad),
            "curvature_max": float(eig.max()), "curvature_min": float(eig.min()), **entries,
            "n_points": int(len(vals))}


def check_radius(radius: float, span: float, resolution: int, dims: int = 2) -> int:
    """Number of grid points within `radius` of the centre of a [-span, span]^dims grid; ValueError
    if fewer than `quadratic_fit` needs (1D: 4, 2D: 7), so a bad choice fails before computing."""
    check_number("radius", radius, low_open=True)
    check_choice("dims", dims, tuple(QUADRATIC_FIT_POINTS))
    n = points_within(radius, coordinates(span, resolution), dims)
    need = QUADRATIC_FIT_POINTS[dims]
    if n < need:
        raise ValueError(f"radius={radius} holds only {n} point(s) of a {dims}D grid of resolution {resolution} "
                         f"over [-{span:g}, {span:g}]; the quadratic fit needs {need}: increase radius or "
                         f"resolution")
    return n


def centre_value(ds: xr.Dataset, quantity: str = "loss") -> float:
    """The quantity at alpha = beta = 0 (linearly interpolated if 0 is not a grid coordinate)."""
    at = {"alpha": 0.0} if "beta" not in ds[quantity].dims else {"alpha": 0.0, "beta": 0.0}
    return float(ds[quantity].interp(at).values)


def mean_increase(ds: xr.Dataset, quantity: str = "loss", radius: float = 0.2) -> float:
    """Mean of L(point) - L(centre) over the computed points within `radius` of the centre."""
    _, vals = _points(ds, quantity, radius)
    if len(vals) == 0:
        raise ValueError(f"no computed point within radius={radius}")
    return float(np.mean(vals) - centre_value(ds, quantity))


def half_span(ds: xr.Dataset) -> float:
    """Half the alpha range of a surface: s for coordinates over [-s, s]."""
    return float(np.ptp(ds["alpha"].values)) / 2


def sharpness_table(surfaces: Mapping[str, xr.Dataset], quantity: str = "loss",
                    radius: float = 0.2) -> pd.DataFrame:
    """One row per surface: centre value, curvature of the quadratic fit, mean increase within r."""
    rows = []
    for name, ds in surfaces.items():
        fit = quadratic_fit(ds, quantity, radius)
        rows.append({"model": name, "quantity": quantity, "centre": centre_value(ds, quantity),
                     "curvature_max": fit["curvature_max"], "curvature_min": fit["curvature_min"],
                     "mean_increase": mean_increase(ds, quantity, radius), "radius": radius,
                     "n_points": fit["n_points"], "norm": ds.attrs.get("direction_norm", "?"),
                     "span": half_span(ds), "robust": ds.attrs.get("robust", "none")})
    return pd.DataFrame(rows).set_index("model")


def sharpness_summary(clean: Mapping[str, xr.Dataset], robust: Mapping[str, xr.Dataset] | None = None, *,
                      radius: float = 0.2) -> pd.DataFrame:
    """One row per model: the numbers behind "sharper" for the clean loss (on `clean` surfaces)
    and the robust loss (on `robust` surfaces, 1D or 2D): value at the centre, curvature of
    the quadratic fit within `radius` (largest and smallest eigenvalue; equal in 1D) and the
    mean loss increase within `radius`. `surface_sharpness` repeats the clean loss's
    largest curvature, the column notebook 05 correlates with robustness."""
    groups = [("loss", clean)] + ([("robust_loss", robust)] if robust else [])
    frames = []
    for quantity, surfaces in groups:
        table = sharpness_table(surfaces, quantity, radius)
        part = table[["centre", "curvature_max", "curvature_min", "mean_increase"]]
        part = part.rename(columns=lambda c: f"{quantity}_{c}")
        part[f"{quantity}_dims"] = [2 if "beta" in surfaces[m].dims else 1 for m in table.index]
        frames.append(part)
    out = pd.concat(frames, axis=1)
    out.insert(0, "surface_sharpness", out["loss_curvature_max"])
    first = next(iter(clean.values())).attrs
    out["radius"] = radius
    out["norm"] = first.get("direction_norm", "?")
    out["span"] = [half_span(clean[m]) for m in out.index]
    out["direction_seed"] = first.get("direction_seed", "?")
    out["n_images"] = [int(clean[m].attrs.get("data_n", -1)) for m in out.index]
    out["robust"] = next(iter(robust.values())).attrs.get("attack", "none") if robust else "none"
    out.index.name = "model"
    return out
