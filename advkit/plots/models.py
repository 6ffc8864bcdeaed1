"""Figures of notebook 05's per-model tables: robustness against flatness per model (`model_scatter`),
flatness through training (Stutz et al. 2021, Fig. 5) and confidence against relative flatness
(Walter et al. 2025). Readable at zoo scale: at most `max_labels` names per panel, one colour per
variant (`runs.run.split_seed`: a sweep's replicates `<name>_s<k>` share `<name>`'s colour).
"""

from __future__ import annotations

import re

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from advkit.runs.run import split_seed

LABELS_05 = {"robust_loss_test": "test robust loss", "robust_loss_train": "train robust loss",
             "robust_gap": "robust gap (test − train RLoss)", "robust_acc": "robust accuracy",
             "avg_case_flatness": "avg-case flatness (RLoss)", "worst_case_flatness": "worst-case flatness (RLoss)",
             "hessian_top_eig": "Hessian top eigenvalue", "hessian_trace": "Hessian trace",
             "relative_flatness": "relative flatness κ", "surface_sharpness": "surface sharpness (curvature)",
             "one_minus_ssim": "1 − SSIM of the attack"}


def _family_colours(table: pd.DataFrame) -> dict:
    """{family: colour}, tab10 for up to 10 families, more distinct hues beyond; replicates of a variant
    (`<variant>_s<k>`) share its colour."""
    families = sorted(table["family"].unique()) if "family" in table.columns else []
    variants = list(dict.fromkeys(split_seed(str(f))[0] for f in families))
    palette = sns.color_palette("tab10" if len(variants) <= 10 else "husl", max(len(variants), 1))
    colour = dict(zip(variants, palette))
    return {f: colour[split_seed(str(f))[0]] for f in families}


def _legend_colours(colours: dict) -> dict:
    """{legend label: colour}: one entry per variant, its replicates as `<variant>_s*`."""
    out = {}
    for fam, c in colours.items():
        seed = split_seed(str(fam))[1]
        out[str(fam) if seed is None else re.sub(rf"_s{seed}(?=(_early|_e\d{{3}})?$)", "_s*", str(fam))] = c
    return out


MAX_LABELS = 12  # names per scatter panel: the quick profile's zoo is labelled in full


def labelled(x: pd.Series, y: pd.Series, max_labels: int = MAX_LABELS, always=()) -> list:
    """The points to name in a panel: all when at most `max_labels`; else those in `always`, then the
    extremes, spread around the cloud: in rank space (each axis's ranks scaled to [-0.5, 0.5]) the point
    farthest from the centre in each of 8 directions, then the next farthest in each, and so on, skipping
    a point whose name would overlap one already chosen (within 1/4 of the width and 1/20 of the height)."""
    if len(x) <= max_labels:
        return list(x.index)
    chosen = [m for m in always if m in x.index][:max_labels]
    rx, ry = x.rank(pct=True) - 0.5, y.rank(pct=True) - 0.5
    frame = pd.DataFrame({"distance": -(rx ** 2 + ry ** 2),
                          "sector": (8 * (np.arctan2(ry, rx) + np.pi) / (2 * np.pi)).astype(int) % 8})
    frame = frame.drop(index=chosen).sort_values("distance", kind="stable")
    frame["turn"] = frame.groupby("sector").cumcount()           # 0: the farthest of its direction
    sx, sy = ((v - v.min()) / ((v.max() - v.min()) or 1.0) for v in (x, y))
    for name in frame.sort_values(["turn", "distance"], kind="stable").index:
        if len(chosen) >= max_labels:
            break
        if not any(abs(sx[name] - sx[m]) < 0.25 and abs(sy[name] - sy[m]) < 0.05 for m in chosen):
            chosen.append(name)
    return chosen


def model_scatter(table: pd.DataFrame, pairs, *, annotate: bool = True, log=(), title: str = "",
                  ncols: int | None = None, max_labels: int = MAX_LABELS, always=("base",)) -> plt.Figure:
    """One panel per (x, y) column pair of a one-row-per-model table: a point per model, coloured
    by `family` (replicates by variant), named if among `labelled(..., max_labels, always)` (the panel
    says how many of how many); the panel title gives Spearman's rho over the models with both values.
    Columns named in `log` get a log axis; a panel without data says so."""
    import scipy.stats

    pairs = list(pairs)
    ncols = ncols or min(len(pairs), 3)
    nrows = -(-len(pairs) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.0 * ncols, 3.4 * nrows), squeeze=False,
                             layout="constrained")
    colours = _family_colours(table)
    for ax, (xc, yc) in zip(axes.flat, pairs):
        cols = [c for c in (xc, yc) if c in table.columns]
        sub = table[cols].apply(pd.to_numeric, errors="coerce").dropna() if len(cols) == 2 else table.iloc[:0]
        ax.set(xlabel=LABELS_05.get(xc, xc), ylabel=LABELS_05.get(yc, yc))
        if sub.empty:
            ax.text(0.5, 0.5, "no models with both values", ha="center", va="center", transform=ax.transAxes)
            continue
        families = table.loc[sub.index, "family"] if "family" in table.columns else sub.index.to_series()
        ax.scatter(sub[xc], sub[yc], color=[colours.get(f, "C0") for f in families], s=36 if len(sub) <= 50 else 14,
                   zorder=3)
        names = labelled(sub[xc], sub[yc], max_labels, always) if annotate else []
        # a zoo's extremes are named inwards (left of points in the right 40 %); a full set as always, to the right
        span = (sub[xc].max() - sub[xc].min()) or 1.0
        right = (sub[xc] - sub[xc].min()) / span > 0.6 if len(names) < len(sub) else pd.Series(False, index=sub.index)
        for name in names:
            ax.annotate(str(name), (sub.at[name, xc], sub.at[name, yc]), textcoords="offset points", fontsize=7,
                        xytext=(-4, 3) if right[name] else (4, 3), ha="right" if right[name] else "left")
        if annotate and len(names) < len(sub):
            ax.text(0.99, 0.01, f"named: {len(names)} of {len(sub)} (the most extreme)", transform=ax.transAxes,
                    ha="right", va="bottom", fontsize=6, color="0.4")
        for c, axis in ((xc, "x"), (yc, "y")):
            if c in log and (sub[c] > 0).all():
                getattr(ax, f"set_{axis}scale")("log")
            else:
                getattr(ax, f"{axis}axis").set_major_locator(plt.MaxNLocator(5))
        if len(sub) >= 3:
            rho = scipy.stats.spearmanr(sub[xc], sub[yc]).statistic
            ax.set_title(f"Spearman ρ = {rho:.2f} (n = {len(sub)})", fontsize=9)
        else:
            ax.set_title(f"n = {len(sub)}: too few models for a correlation", fontsize=9)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(pairs):]:
        ax.set_axis_off()
    entries = _legend_colours(colours)
    if len(entries) > 1:
        handles = [plt.Line2D([], [], color=c, marker="o", ls="", label=f) for f, c in entries.items()]
        if len(handles) <= 12:
            fig.legend(handles=handles, loc="outside right upper", fontsize=8, title="family")
        else:  # a zoo's variants: below the panels, as wide as the figure
            fig.legend(handles=handles, loc="outside lower center", fontsize=7, title="family",
                       ncols=max(1, int(fig.get_size_inches()[0] // 2.4)))
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def flatness_through_training(table: pd.DataFrame, histories: dict[str, pd.DataFrame] | None = None,
                              flatness=("avg_case_flatness", "worst_case_flatness")) -> plt.Figure:
    """Stutz et al. Fig. 5: robust loss and flatness against the epoch, for every family of models
    with checkpoints at two or more epochs (`table` with columns family, epoch). Lines from
    `histories` (per-epoch train/test robust loss of `fit`) where given; markers: the measured
    checkpoints (filled: test RLoss, open: train RLoss)."""
    rows = table.dropna(subset=["epoch"])
    families = [f for f, g in rows.groupby("family") if g["epoch"].nunique() >= 2]
    if not families:
        raise ValueError("no family of models has checkpoints at two or more epochs")
    colours = _family_colours(table)
    panels = ["robust_loss"] + [f for f in flatness if f in table.columns]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.0 * len(panels), 3.3), squeeze=False,
                             layout="constrained")
    for fam in families:
        g = rows[rows["family"] == fam].sort_values("epoch")
        c = colours.get(fam, "C0")
        ax = axes[0, 0]
        hist = (histories or {}).get(fam)
        if hist is not None:
            for col, ls in (("test_robust_loss", "-"), ("train_robust_loss", "--")):
                if col in hist.columns:
                    ax.plot(hist["epoch"], hist[col], ls, color=c, alpha=0.6, lw=1)
        ax.plot(g["epoch"], g["robust_loss_test"], "o", color=c, label=fam)
        ax.plot(g["epoch"], g["robust_loss_train"], "o", color=c, mfc="none")
        for ax, col in zip(axes[0, 1:], panels[1:]):
            ax.plot(g["epoch"], g[col], "o-", color=c, label=fam)
    axes[0, 0].set(ylabel="robust loss", title="filled, solid: test; open, dashed: train")
    for ax, col in zip(axes[0, 1:], panels[1:]):
        ax.set(ylabel=LABELS_05.get(col, col))
    for ax in axes[0]:
        ax.set(xlabel="epoch")
        ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[0, -1].legend(fontsize=8)
    return fig


def confidence_flatness_plot(clean: pd.DataFrame, adversarial: pd.DataFrame, title: str = "") -> plt.Figure:
    """Walter et al. 2025: confidence (max softmax) against relative flatness per input, clean vs
    adversarial, coloured by correctness; adversarial examples cluster flat and confidently wrong."""
    fig, axes = plt.subplots(1, 2, figsize=(8.5, 3.4), sharex=True, sharey=True, layout="constrained")
    for ax, (kind, df) in zip(axes, (("clean", clean), ("adversarial", adversarial))):
        for ok, colour, label in ((True, "tab:green", "correct"), (False, "tab:red", "wrong")):
            d = df[df["correct"] == ok]
            ax.scatter(d["relative_flatness"].clip(lower=1e-12), d["confidence"], s=8, alpha=0.6, color=colour,
                       label=f"{label} ({len(d)})")
        ax.set(xscale="log", xlabel="relative flatness κ (per input, log)", title=f"{kind} inputs")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower left")
    axes[0].set(ylabel="confidence (max softmax)")
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


