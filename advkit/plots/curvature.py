"""Figure of advkit.landscape.bridge: maps of the extreme Hessian eigenvalues over a landscape's plane
(Li et al. 2018's plot_hessian_eigen), for the clean and the robust loss, one row per model."""

from __future__ import annotations

from collections.abc import Mapping

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
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


def plot_bound(curves: dict[str, pd.DataFrame], paths: dict[str, pd.DataFrame] | None = None,
               path_eps: float | None = None):
    """Left: measured loss change and the flatness bound against eps, per model (log scale); middle: share
    of examples where the bound holds and robust accuracy; right: median kappa along the PGD path (at `path_eps`)."""
    import matplotlib.pyplot as plt

    ncols = 3 if paths else 2
    fig, axes = plt.subplots(1, ncols, figsize=(4.2 * ncols, 3.4))
    for i, (name, df) in enumerate(curves.items()):
        color = f"C{i}"
        axes[0].plot(df["eps"], df["loss_change"].clip(lower=1e-6), "o-", color=color, label=f"{name}: measured")
        axes[0].plot(df["eps"], df["bound"].clip(lower=1e-6), "s--", color=color, label=f"{name}: κ bound")
        axes[1].plot(df["eps"], df["bound_holds"], "o-", color=color, label=f"{name}: bound holds")
        axes[1].plot(df["eps"], df["robust_accuracy"], "^:", color=color, label=f"{name}: robust acc.")
    axes[0].set(xlabel="PGD budget ε (L∞)", ylabel="mean CE change over the images", xscale="log", yscale="log",
                title="loss change vs relative-flatness bound")
    axes[1].set(xlabel="PGD budget ε (L∞)", ylabel="share of test images", ylim=(-0.03, 1.03), xscale="log",
                title="where the bound holds")
    for i, (name, df) in enumerate((paths or {}).items()):
        axes[2].plot(df["step"], df["kappa_median"], "o-", color=f"C{i}", label=name)
        axes[2].set(xlabel="PGD iterate (0: random start)", ylabel="median κ over the images", yscale="log",
                    title="κ along the attack path" + (f" (ε = {path_eps:.3g})" if path_eps else ""))
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig
