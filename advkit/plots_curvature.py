"""Figure of advkit.curvature: maps of the extreme Hessian eigenvalues over a landscape's plane
(Li et al. 2018's plot_hessian_eigen), for the clean and the robust loss, one row per model."""

from __future__ import annotations

from collections.abc import Mapping

import matplotlib.pyplot as plt
import numpy as np
import xarray as xr
from matplotlib.colors import Normalize, SymLogNorm

PANELS = (("lambda_max", "λmax", "viridis"), ("lambda_min", "λmin", "magma"),
          ("ratio", "|λmin / λmax|", "cividis"))


def eigen_map_figure(maps: Mapping[str, Mapping[str, xr.Dataset]]) -> plt.Figure:
    """maps[model][loss] (loss "clean" / "robust") from `hessian_eigen_map`: one row per model, columns
    λmax, λmin, |λmin/λmax| for each loss; one colour scale per column, so rows compare directly.
    The white cross marks the trained weights; each map's `converged` flags stay in the Datasets."""
    losses = list(dict.fromkeys(k for m in maps.values() for k in m))
    cols = [(loss, *p) for loss in losses for p in PANELS]
    fig, axes = plt.subplots(len(maps), len(cols), figsize=(2.3 * len(cols), 2.1 * len(maps) + 0.6),
                             squeeze=False, constrained_layout=True)
    for c, (loss, key, label, cmap) in enumerate(cols):
        vals = np.concatenate([m[loss][key].values.ravel() for m in maps.values() if loss in m])
        lo, hi = float(np.nanmin(vals)), float(np.nanmax(vals))
        if key == "ratio":
            norm = Normalize(0, max(hi, 1e-12))
        elif key == "lambda_min":
            norm = SymLogNorm(max(abs(lo), abs(hi), 1e-12) * 1e-2, vmin=lo, vmax=max(hi, lo + 1e-12))
        else:
            norm = SymLogNorm(max(abs(hi), 1e-12) * 1e-2, vmin=min(lo, 0.0), vmax=hi)
        for r, (name, per_loss) in enumerate(maps.items()):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            if loss not in per_loss:
                ax.set_axis_off()
                continue
            ds = per_loss[loss]
            a, b = ds["alpha"].values, ds["beta"].values
            mesh = ax.pcolormesh(a, b, ds[key].transpose("beta", "alpha").values, cmap=cmap, norm=norm,
                                 shading="nearest")
            ax.plot(0, 0, "w+", ms=9, mew=2)
            ax.set_aspect("equal")
            if r == 0:
                ax.set_title(f"{loss}: {label}", fontsize=9)
            if r == len(maps) - 1:
                ax.set_xticks([a[0], 0, a[-1]])
                ax.set_xlabel("α (d1)", fontsize=8)
            if c == 0:
                ax.set_yticks([b[0], 0, b[-1]])
                ax.set_ylabel(f"{name}\nβ (d2)", fontsize=9)
            ax.tick_params(labelsize=7)
        fig.colorbar(mesh, ax=axes[:, c], location="bottom", shrink=0.9, pad=0.02)
    steps = next(iter(next(iter(maps.values())).values())).attrs.get("steps", "?")
    fig.suptitle(f"Hessian eigenvalues over the landscape plane ({steps} Lanczos steps per point; "
                 "robust: Danskin, attack re-run at each point)", fontsize=10)
    return fig
