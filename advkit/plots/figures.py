"""Figures (matplotlib/seaborn): learning curves, attack results, landscapes, correlations.

Every figure function returns a matplotlib Figure; `save_figure` writes it as PNG and PDF
into `figures/`, the one place figures are written: byte-identical for the same figure (no dates,
no software versions in the PDF or PNG metadata), so an unchanged run leaves `git status` clean.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
import torch

from advkit.landscape.replicates import probability_matrix
from advkit.runs.run import figures_dir

if TYPE_CHECKING:
    import torch


def save_figure(fig: plt.Figure, name: str, folder: str | Path | None = None, dpi: int = 150) -> list[Path]:
    """Write `fig` as `<name>.png` and `<name>.pdf` into `folder` (default: figures/), reproducibly:
    the same figure gives the same bytes (no creation/modification dates or software versions)."""
    folder = Path(folder) if folder is not None else figures_dir()
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{name}.png", folder / f"{name}.pdf"]
    fig.savefig(paths[0], dpi=dpi, bbox_inches="tight", metadata={"Software": None})
    fig.savefig(paths[1], bbox_inches="tight",
                metadata={"CreationDate": None, "ModDate": None, "Producer": None, "Creator": None})
    return paths


def learning_curves(history: pd.DataFrame, title: str = "") -> plt.Figure:
    """Loss (train and test) and accuracy per epoch from a `fit` history."""
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(9, 3.2))
    loss_cols = [c for c in history.columns if c.endswith("loss")]
    acc_cols = [c for c in history.columns if c.endswith("acc")]
    long = history.melt(id_vars="epoch", value_vars=loss_cols + acc_cols)
    sns.lineplot(long[long.variable.isin(loss_cols)], x="epoch", y="value", hue="variable", marker="o", ax=ax_loss)
    sns.lineplot(long[long.variable.isin(acc_cols)], x="epoch", y="value", hue="variable", marker="o", ax=ax_acc)
    ax_loss.set(ylabel="cross-entropy", yscale="log")
    ax_acc.set(ylabel="accuracy")
    for ax in (ax_loss, ax_acc):
        ax.legend(title=None)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


# --- loss landscapes (advkit.landscape surfaces) ----------------------------------------------
# Surfaces are xarray Datasets with coordinates alpha (and beta) and one variable per quantity.
# Side-by-side figures share one colour scale (and contour levels) across models, so that a
# sharper-looking panel really is sharper (Xu et al. Fig. 1-2).

LANDSCAPE_KINDS = ("contour", "contourf", "heatmap", "surface")
QUANTITY_LABELS = {"loss": "loss", "accuracy": "accuracy", "robust_loss": "robust loss",
                   "robust_accuracy": "robust accuracy"}


def quantity_label(ds, quantity: str) -> str:
    """Axis label for a quantity; robust ones say whether the attack was re-run or fixed."""
    label = QUANTITY_LABELS.get(quantity, quantity.replace("_", " "))
    if quantity.startswith("robust") and ds.attrs.get("robust") == "fixed adversarial examples":
        label += " (fixed adv. examples)"
    return label


def axis_label(ds, name: str) -> str:
    if name == "alpha" and ds.attrs.get("kind") == "interpolation":
        a, arrow, _ = str(ds.attrs.get("model", "")).partition(" -> ")
        return f"t  (θ = (1-t) θ_{a} + t θ_model)" if arrow else "t  (θ = (1-t) θ_a + t θ_b)"
    return {"alpha": "α", "beta": "β"}.get(name, name)


def _grid_values(ds, quantity: str):
    """alpha, beta and the values as a (beta, alpha) array for matplotlib's (X, Y, Z) convention."""
    import numpy as np

    if quantity not in ds:
        raise ValueError(f"quantity={quantity!r} is not in this surface; it has {sorted(ds.data_vars)}")
    if "beta" not in ds[quantity].dims:
        raise ValueError(f"{quantity!r} is a 1D surface: use curves_1d for it")
    z = ds[quantity].transpose("beta", "alpha").values.astype(float)
    return ds["alpha"].values, ds["beta"].values, np.ma.masked_invalid(z)


def shared_norm(surfaces, quantity: str = "loss", *, log: bool = False, vmin: float | None = None,
                vmax: float | None = None):
    """One colour normalization covering `quantity` over all `surfaces` (computed points only)."""
    import numpy as np
    from matplotlib.colors import LogNorm, Normalize

    values = np.concatenate([np.ravel(ds[quantity].values) for ds in surfaces])
    values = values[np.isfinite(values) & ((values > 0) if log else True)]
    if values.size == 0:
        raise ValueError(f"no computed{' positive' if log else ''} values of {quantity!r} to scale colours by")
    lo = float(values.min()) if vmin is None else vmin
    hi = float(values.max()) if vmax is None else vmax
    if hi <= lo:
        hi = lo + (abs(lo) or 1.0) * 1e-6
    return LogNorm(lo, hi) if log else Normalize(lo, hi)


def _levels(norm, n: int):
    import numpy as np
    from matplotlib.colors import LogNorm

    if isinstance(norm, LogNorm):
        return np.geomspace(norm.vmin, norm.vmax, n)
    return np.linspace(norm.vmin, norm.vmax, n)


def _mark_models(ax, ds) -> None:
    """Mark the centre (and, for a plane, the three models) on a 2D panel."""
    if ds.attrs.get("kind") == "plane":
        for (a, b), name in (((0, 0), "a"), ((1, 0), "b"), ((0, 1), "c")):
            ax.plot(a, b, "w^", ms=6, mec="k")
            ax.annotate(name, (a, b), textcoords="offset points", xytext=(4, 4), color="w")
    else:
        ax.plot(0, 0, "wx", ms=7, mew=2)


def landscape_panel(ds, quantity: str = "loss", *, kind: str = "contourf", ax=None, norm=None,
                    log: bool = False, levels: int = 25, cmap: str = "viridis", title: str | None = None):
    """Draw one 2D surface on `ax` as a contour, filled contour, heatmap or 3D surface; returns the
    colour mappable. Pass a `norm` from `shared_norm` to compare panels honestly."""
    import numpy as np

    if kind not in LANDSCAPE_KINDS:
        raise ValueError(f"kind={kind!r} is not available; choose one of {list(LANDSCAPE_KINDS)}")
    a, b, z = _grid_values(ds, quantity)
    norm = norm or shared_norm([ds], quantity, log=log)
    if ax is None:
        fig = plt.figure(figsize=(4.2, 3.6))
        ax = fig.add_subplot(projection="3d" if kind == "surface" else None)
    if kind == "surface":
        aa, bb = np.meshgrid(a, b)
        zz = np.log10(z) if log else z
        m = ax.plot_surface(aa, bb, zz.filled(np.nan), cmap=cmap, norm=norm, linewidth=0,
                            antialiased=True, rcount=len(b), ccount=len(a))
        if log:  # faces are coloured by their mean height: map it back to the quantity's units
            m.set_array(10 ** np.asarray(m.get_array()))
        lim = (np.log10(norm.vmin), np.log10(norm.vmax)) if log else (norm.vmin, norm.vmax)
        ax.set_zlim(*lim)
        ax.set_zlabel(("log10 " if log else "") + quantity_label(ds, quantity))
    elif kind == "heatmap":
        m = ax.pcolormesh(a, b, z, cmap=cmap, norm=norm, shading="nearest")
    else:
        lv = _levels(norm, levels)
        if kind == "contourf":
            m = ax.contourf(a, b, z, levels=lv, cmap=cmap, norm=norm, extend="both")
        else:
            m = ax.contour(a, b, z, levels=lv, cmap=cmap, norm=norm, linewidths=1)
            ax.clabel(m, m.levels[::4], inline=True, fontsize=7, fmt="%.3g")
    if kind != "surface":
        ax.set_aspect("equal")
        _mark_models(ax, ds)
    ax.set_xlabel(axis_label(ds, "alpha"))
    ax.set_ylabel(axis_label(ds, "beta"))
    ax.set_title(title if title is not None else ds.attrs.get("model", ""))
    return m


def colour_mappables(fig) -> list:
    """The colour-mapped artists of a figure's panels (not of its colorbars)."""
    out = []
    for ax in fig.axes:
        if hasattr(ax, "add_colorbar"):
            continue
        out += [c for c in list(ax.collections) + list(ax.images)
                if getattr(c, "norm", None) is not None and c.get_array() is not None]
    return out


MAX_COLUMNS = 8              # panels per row of `compare_surfaces` when the caller does not say
MAX_FIGURE_INCHES = (30, 50)  # (width, height): more panels are drawn smaller, not wider


def panel_grid(n: int, ncols: int | None = None, panel: tuple[float, float] = (3.4, 3.3),
               extra_width: float = 0.8) -> tuple[int, int, tuple[float, float]]:
    """(rows, columns, figure size) for n panels: up to 4 in a row, then two rows up to 2 × `MAX_COLUMNS`
    (5-6 models: 3 x 2, 7-8: 4 x 2), then rows of `MAX_COLUMNS`; panels shrink to keep the figure
    within `MAX_FIGURE_INCHES`."""
    ncols = ncols or min(MAX_COLUMNS, n if n <= 4 else -(-n // 2))
    nrows = -(-n // ncols)
    width, height = panel[0] * ncols + extra_width, panel[1] * nrows
    scale = min(1.0, MAX_FIGURE_INCHES[0] / width, MAX_FIGURE_INCHES[1] / height)
    return nrows, ncols, (width * scale, height * scale)


def compare_surfaces(surfaces, quantity: str = "loss", *, kind: str = "contourf", log: bool = False,
                     vmin: float | None = None, vmax: float | None = None, levels: int = 25,
                     cmap: str = "viridis", ncols: int | None = None, title: str | None = None) -> plt.Figure:
    """Side-by-side 2D surfaces of several models with ONE colour scale (and contour levels),
    optionally logarithmic: base vs FGSM vs PGD as in Xu et al. Fig. 1-2; a grid of at most
    `MAX_COLUMNS` columns within `MAX_FIGURE_INCHES` (`panel_grid`) for a zoo."""
    if kind not in LANDSCAPE_KINDS:
        raise ValueError(f"kind={kind!r} is not available; choose one of {list(LANDSCAPE_KINDS)}")
    surfaces = dict(surfaces)
    if not surfaces:
        raise ValueError("surfaces is empty: give a mapping name -> surface Dataset")
    norm = shared_norm(surfaces.values(), quantity, log=log, vmin=vmin, vmax=vmax)
    n = len(surfaces)
    nrows, ncols, size = panel_grid(n, ncols)
    fig = plt.figure(figsize=size, layout="constrained")
    axes = [fig.add_subplot(nrows, ncols, i + 1, projection="3d" if kind == "surface" else None)
            for i in range(n)]
    mappable = None
    for ax, (name, ds) in zip(axes, surfaces.items()):
        mappable = landscape_panel(ds, quantity, kind=kind, ax=ax, norm=norm, levels=levels,
                                   cmap=cmap, title=name, log=log)
    first = next(iter(surfaces.values()))
    add_colorbar(fig, mappable, axes, quantity_label(first, quantity), log, pad=0.12 if kind == "surface" else 0.05)
    fig.suptitle(title if title is not None else f"{quantity_label(first, quantity)}: {_describe(first)}",
                 fontsize=11, wrap=True)
    return fig


def add_colorbar(fig, mappable, axes, label: str, log: bool, cax=None, pad: float = 0.05):
    from matplotlib import ticker

    # 3D panels draw their z label outside the axes box: give them a larger pad
    kw = {"cax": cax} if cax is not None else {"ax": axes, "shrink": 0.85, "pad": pad}
    cbar = fig.colorbar(mappable, label=label + (" (log scale)" if log else ""), **kw)
    if log:
        cbar.ax.yaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
        cbar.ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        cbar.ax.yaxis.set_minor_formatter(ticker.NullFormatter())
    return cbar


def _describe(ds, robust: bool = True) -> str:
    """What a surface shows, from its attributes: directions, data and (if `robust`) robust mode."""
    a = ds.attrs
    if a.get("kind") == "interpolation" and " -> " in str(a.get("model", "")):
        dirs = f"linear interpolation from {a['model'].partition(' -> ')[0]}"
    elif a.get("direction_kind") == "random":
        dirs = f"{a.get('direction_norm')}-normalized random directions (seed {a.get('direction_seed')})"
    else:
        dirs = {"interpolation": "interpolation", "plane": "plane through three models"}.get(
            a.get("kind"), f"{a.get('direction_kind', 'given')} directions")
    robust = a.get("robust", "none") if robust else "none"
    if robust == "attack re-run at each point" and a.get("attack"):
        robust = f"{a['attack']} re-run at each point"
    return ", ".join(x for x in (dirs, a.get("data", ""), "" if robust == "none" else robust) if x)


def curves_1d(surfaces, quantities=("loss", "accuracy"), *, log: bool = False, ax=None,
              title: str | None = None) -> plt.Figure:
    """1D landscapes (lines or interpolations) of several models: loss-type quantities solid on
    the left axis, accuracy-type dashed on the right axis (Li et al. 2018 Fig. 1 style)."""
    if hasattr(surfaces, "data_vars"):
        surfaces = {surfaces.attrs.get("model", "model"): surfaces}
    surfaces = dict(surfaces)
    if ax is None:
        fig, ax = plt.subplots(figsize=(5.2, 3.4), layout="constrained")
    else:
        fig = ax.figure
    losses = [q for q in quantities if "accuracy" not in q]
    accs = [q for q in quantities if "accuracy" in q]
    ax_acc = ax.twinx() if accs and losses else None
    colors = sns.color_palette("tab10", len(surfaces))
    handles = []
    for color, (name, ds) in zip(colors, surfaces.items()):
        x = ds["alpha"].values
        for q in quantities:
            if q not in ds:
                continue
            target = ax_acc if (ax_acc is not None and q in accs) else ax
            style = {"loss": "-", "robust_loss": "-.", "accuracy": "--", "robust_accuracy": ":"}.get(q, "-")
            (h,) = target.plot(x, ds[q].values, style, color=color, label=f"{name}: {quantity_label(ds, q)}")
            handles.append(h)
    first = next(iter(surfaces.values()))
    ax.set_xlabel(axis_label(first, "alpha"))
    ax.set_ylabel(" / ".join(quantity_label(first, q) for q in (losses or accs)))
    if log and losses:
        ax.set_yscale("log")
    if ax_acc is not None:
        ax_acc.set_ylabel(" / ".join(quantity_label(first, q) for q in accs))
        ax_acc.set_ylim(-0.02, 1.02)
    title = title if title is not None else _describe(first)
    if len(handles) > 4:
        fig.legend(handles=handles, fontsize=7, loc="outside right upper")
        fig.suptitle(title, fontsize=9)
    else:
        ax.legend(handles=handles, fontsize=7, loc="upper center")
        ax.set_title(title, fontsize=9)
    return fig


def compare_curves(surfaces, panels=("loss", "accuracy"), *, robust: bool = True, log: bool = False,
                   title: str | None = None) -> plt.Figure:
    """1D landscapes of several models, one panel per quantity and one colour per model; the
    robust counterpart (robust_loss, robust_accuracy) dashed in the same panel when present
    (clean vs robust loss along the same direction, as Stutz et al. Fig. 4)."""
    from matplotlib.lines import Line2D

    for q in panels:
        if q not in ("loss", "accuracy"):
            raise ValueError(f"panels entry {q!r} is not available; choose from ['loss', 'accuracy']")
    surfaces = dict(surfaces)
    if not surfaces:
        raise ValueError("surfaces is empty: give a mapping name -> 1D surface Dataset")
    first = next(iter(surfaces.values()))
    fig, axes = plt.subplots(1, len(panels), figsize=(3.9 * len(panels) + 1.9, 3.3), layout="constrained",
                             squeeze=False)
    # interpolations leave out the reference model (listed first elsewhere): skip its colour so
    # every model keeps the colour it has in the other figures
    skip = 1 if first.attrs.get("kind") == "interpolation" else 0
    colors = sns.color_palette("tab10", len(surfaces) + skip)[skip:]
    any_robust = False
    for ax, q in zip(axes[0], panels):
        for color, (name, ds) in zip(colors, surfaces.items()):
            if "beta" in ds.dims:
                raise ValueError(f"surface {name!r} is 2D: compare_curves draws 1D surfaces")
            ax.plot(ds["alpha"].values, ds[q].values, "-", color=color, lw=1.6)
            if robust and f"robust_{q}" in ds:
                ax.plot(ds["alpha"].values, ds[f"robust_{q}"].values, "--", color=color, lw=1.6)
                any_robust = True
        for x0 in ((0, 1) if first.attrs.get("kind") == "interpolation" else (0,)):
            ax.axvline(x0, color="0.75", lw=0.8, zorder=0)
        ax.set_xlabel(axis_label(first, "alpha"))
        ax.set_ylabel(QUANTITY_LABELS[q])
        if q == "accuracy":
            ax.set_ylim(-0.02, 1.02)
        elif log:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    handles = [Line2D([], [], color=c, lw=2, label=n) for c, n in zip(colors, surfaces)]
    if any_robust:
        attack = next((ds.attrs["attack"] for ds in surfaces.values() if ds.attrs.get("attack", "none") != "none"),
                      "attack")
        handles += [Line2D([], [], color="k", ls="-", label="clean"),
                    Line2D([], [], color="k", ls="--", label=f"robust: {attack}\n(re-run at each point)")]
    fig.legend(handles=handles, loc="outside right upper", fontsize=8)
    fig.suptitle(title if title is not None else _describe(first, robust=False), fontsize=10)  # attack: legend
    return fig


def sensitivity_figure(table: pd.DataFrame, *, log: bool = True) -> plt.Figure:
    """The sensitivity analysis as a figure: the sharpness metric against the span, one panel per
    normalization, one line per model; titles give Kendall's tau against the reference ordering.
    A `metric` column (tables of several metrics concatenated) gives one row of panels per metric."""
    from matplotlib import ticker

    fixed = {"metric", "norm", "span", "ordering", "kendall_tau", "same_ordering"}
    models = [c for c in table.columns if c not in fixed]
    norms = list(dict.fromkeys(table["norm"]))
    if "metric" in table.columns:
        metrics = list(dict.fromkeys(table["metric"]))
        parts = [table[table["metric"] == m] for m in metrics]
    else:
        metrics, parts = [table.attrs.get("metric", "metric")], [table]
    labels = {"curvature": "curvature at the centre", "mean_increase": "mean loss increase within r"}
    fig, axes = plt.subplots(len(metrics), len(norms), figsize=(3.3 * len(norms) + 1.6, 2.9 * len(metrics)),
                             layout="constrained", squeeze=False)
    colors = dict(zip(models, sns.color_palette("tab10", len(models))))
    radius = table.attrs.get("radius_fraction")
    xlabel = "radius r (α in [-r, r])" if radius == 1 else "span of α (± range)"
    for row, (metric, part) in zip(axes, zip(metrics, parts)):
        for ax, norm in zip(row, norms):
            sub = part[part["norm"] == norm].sort_values("span")
            for m in models:
                ax.plot(sub["span"], sub[m], "o-", color=colors[m], label=m)
            taus = ", ".join("–" if pd.isna(t) else f"{t:.2f}" for t in sub["kendall_tau"])
            ax.set_title(f"{'no' if norm == 'none' else norm} normalization\nKendall τ vs reference: {taus}",
                         fontsize=9)
            ax.set(xlabel=xlabel, ylabel=labels.get(metric, metric))
            values = sub[models].to_numpy()
            if log and (values > 0).all():
                ax.set_xscale("log")
                ax.set_xticks(sub["span"].to_numpy())
                axes_to_format = [ax.xaxis]
                if values.max() / values.min() > 10:  # within one decade a log axis shows ~1 tick
                    ax.set_yscale("log")
                    ax.yaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
                    axes_to_format.append(ax.yaxis)
                for axis in axes_to_format:
                    axis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
                    axis.set_minor_formatter(ticker.NullFormatter())
            ax.grid(alpha=0.3)
    handles = [plt.Line2D([], [], color=colors[m], marker="o", label=m) for m in models]
    fig.legend(handles=handles, loc="outside right upper", fontsize=8)
    reference = str(table.attrs.get("reference", ""))
    if radius == 1:
        reference = reference.replace(" @ span ", " normalization, r = ")
    extra = f"; r = {radius:g} × span" if radius not in (None, 1) else ""
    fig.suptitle(f"Does the ordering of models hold? Reference: {reference}{extra}", fontsize=10)
    return fig


# --- attacks (notebook 02) -----------------------------------------------------------------


def _image(ax, img, title: str = "", cmap=None) -> None:
    img = img.detach().cpu().float()
    if img.shape[0] == 1:
        ax.imshow(img[0].numpy(), cmap=cmap or "gray", vmin=0, vmax=1, interpolation="nearest")
    else:
        ax.imshow(img.permute(1, 2, 0).clamp(0, 1).numpy(), interpolation="nearest")
    ax.set_title(title, fontsize=8)
    ax.set_axis_off()


ZERO_PERTURBATION = 1e-6  # max |δ| below this (a 4000th of a grey level) is drawn and labelled as no change


def amplified_perturbation(delta: torch.Tensor, name: str = "") -> tuple[torch.Tensor, str]:
    """δ scaled to fill the grey range around 0.5 for display, and its panel title: "<name> δ ×k", or
    "<name> δ = 0" when max |δ| < ZERO_PERTURBATION (then drawn unamplified, i.e. flat grey)."""
    top = float(delta.abs().max()) if delta.numel() else 0.0
    prefix = f"{name} δ" if name else "δ"
    if top < ZERO_PERTURBATION:
        return 0.5 + delta, f"{prefix} = 0" if top == 0 else f"{prefix} ≈ 0"
    gain = 0.5 / top
    return 0.5 + gain * delta, f"{prefix} ×{gain:.0f}" if gain >= 10 else f"{prefix} ×{gain:.1f}"


def attack_gallery(x, adversarial: dict, flow=None, labels=None, n: int = 4) -> plt.Figure:
    """Per example: the clean image, each attack's adversarial image and its perturbation
    (amplified to the full grey range), and the stAdv flow field as arrows over the image."""
    n = min(n, len(x))
    cols = 1 + 2 * len(adversarial) + (flow is not None)
    fig, axes = plt.subplots(n, cols, figsize=(1.6 * cols, 1.7 * n), squeeze=False)
    for i in range(n):
        _image(axes[i, 0], x[i], "clean" + (f" ({labels[i]})" if labels is not None else ""))
        for j, (name, x_adv) in enumerate(adversarial.items()):
            _image(axes[i, 1 + 2 * j], x_adv[i], name)
            _image(axes[i, 2 + 2 * j], *amplified_perturbation((x_adv[i] - x[i]).detach().cpu(), name))
        if flow is not None:
            ax = axes[i, -1]
            _image(ax, x[i], "stAdv flow")
            f = flow[i].detach().cpu()
            h, w = f.shape[1:]
            yy, xx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
            ax.quiver(xx, yy, f[0], f[1], color="red", angles="xy", scale_units="xy",
                      scale=float(f.abs().max().clamp_min(1e-12)) * 1.5, width=0.02)
    fig.tight_layout()
    return fig


def robustness_curves(table: pd.DataFrame, title: str = "") -> plt.Figure:
    """Robust accuracy against the budget, one curve per attack (columns: attack, eps, accuracy)."""
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    sns.lineplot(table, x="eps", y="accuracy", hue="attack", marker="o", ax=ax)
    ax.set(xlabel="ε (pixel scale, 1 = full range)", ylabel="robust accuracy", ylim=(0, 1), title=title)
    fig.tight_layout()
    return fig


# --- robust overfitting (notebook 03) -------------------------------------------------------


def robust_overfitting_curves(histories: dict[str, pd.DataFrame], best_epochs: dict[str, int] | None = None
                              ) -> plt.Figure:
    """Train vs test robust loss (RLoss) and robust error (RErr) per epoch, one colour per model
    (Stutz et al. 2021, Fig. 2); a dotted line marks the early-stopping epoch."""
    fig, (ax_loss, ax_err) = plt.subplots(1, 2, figsize=(9, 3.3))
    colours = sns.color_palette(n_colors=max(len(histories), 1))
    for colour, (name, h) in zip(colours, histories.items()):
        for split, style in (("train", "--"), ("test", "-")):
            ax_loss.plot(h.epoch, h[f"{split}_robust_loss"], style, color=colour, label=f"{name} {split}")
            ax_err.plot(h.epoch, h[f"{split}_robust_err"], style, color=colour, label=f"{name} {split}")
        if best_epochs and best_epochs.get(name):
            for ax in (ax_loss, ax_err):
                ax.axvline(best_epochs[name], color=colour, linestyle=":", linewidth=1)
    ax_loss.set(xlabel="epoch", ylabel="robust loss (RLoss)")
    ax_err.set(xlabel="epoch", ylabel="robust error (RErr)", ylim=(0, 1))
    ax_err.legend(fontsize=7, ncol=2)
    fig.suptitle("robust overfitting: train (dashed) vs test (solid); dotted: early stopping")
    fig.tight_layout()
    return fig


def ordering_figure(table: pd.DataFrame, values: pd.DataFrame | None = None):
    """Heatmaps of P(row sharper than column), one panel per quantity and dimension, annotated
    with p when there are at most 12 models."""
    import matplotlib.pyplot as plt

    keys = list(dict.fromkeys(zip(table["quantity"], table["dims"])))
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys) + 1, 4.6), squeeze=False,
                             constrained_layout=True)
    image = None
    for ax, (quantity, d) in zip(axes[0], keys):
        m = probability_matrix(table, quantity, d)
        image = ax.imshow(m.to_numpy(float), vmin=0, vmax=1, cmap="RdBu_r")
        ax.set_xticks(range(len(m)), m.columns, rotation=60, ha="right", fontsize=8)
        ax.set_yticks(range(len(m)), m.index, fontsize=8)
        label = "robust loss" if quantity == "robust_loss" else "clean loss"
        ax.set_title(f"{label}, {d}D", fontsize=10)
        ax.set_xlabel("than (column)", fontsize=8)
        ax.set_ylabel("sharper model (row)", fontsize=8)
        low, high = (probability_matrix(table, quantity, d, c) for c in ("ci_low", "ci_high"))
        if len(m) <= 12:
            for i, j in itertools.product(range(len(m)), repeat=2):
                if i != j:
                    v = m.iat[i, j]
                    text = f"{v:.2f}" + (f"\n[{low.iat[i, j]:.1f}, {high.iat[i, j]:.1f}]"
                                         if len(m) <= 8 and np.isfinite(low.iat[i, j]) else "")
                    ax.text(j, i, text, ha="center", va="center", fontsize=6.5,
                            color="white" if abs(v - 0.5) > 0.35 else "black")
    n_seeds = int(table["direction_seeds"].max()) if len(table) else 0
    fig.suptitle(f"P(row sharper than column) over {n_seeds} direction seeds, with "
                 f"{100 * table.attrs.get('confidence_level', 0.95):.0f}% bootstrap intervals\n"
                 "(filter-normalized surfaces, curvature of the quadratic fit)", fontsize=10)
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8, label="P(row sharper)")
    return fig
