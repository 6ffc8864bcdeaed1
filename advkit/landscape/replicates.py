"""Is "sharper" more than one draw? Sharpness of filter-normalized surfaces (Li et al. 2018; Xu et al.
2019, Eq. 5-6) replicated over direction seeds and, where a sweep made them (`<name>_s<k>`,
`runs.run.split_seed`), over training seeds; the ordering of two models as a probability with a bootstrap
interval, and how often other normalizations, BatchNorm choices, 2D surfaces and the robust loss
order the models as filter normalization does, across seeds."""

from __future__ import annotations

import itertools
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import xarray as xr
from torch import nn

from advkit._checks import check_choice, check_int, check_number
from advkit._torch import Attack
from advkit.landscape.directions import BN_POLICIES
from advkit.landscape.settings import SurfaceSettings, settings_with
from advkit.landscape.sharpness import quadratic_fit
from advkit.landscape.studies import SensitivitySettings, sensitivity_surfaces, sensitivity_table
from advkit.runs.run import Run, split_seed

BN_VARIANTS = (("ignore", "eval"), ("include", "eval"), ("ignore", "recalibrate"))
"""(bn, bn_mode): Li et al.'s default, BatchNorm parameters perturbed too, statistics recomputed."""
CHUNK = 1024
"""Bootstrap resamples evaluated at a time (memory: CHUNK x (models' seeds + direction seeds))."""


def variant_label(norm: str, bn: str = "ignore", bn_mode: str = "eval") -> str:
    """`filter`, or `filter, BN include` / `filter, BN recalibrate` for the BatchNorm variants."""
    return norm + (f", BN {bn}" if bn != "ignore" else "") + (f", BN {bn_mode}" if bn_mode != "eval" else "")


def final_models(models: Mapping[str, nn.Module]) -> dict[str, nn.Module]:
    """The models without the copies of another model's training run (`_early`, `_eNNN`), which
    would count one training run several times."""
    return {n: m for n, m in models.items() if not re.search(r"_(early|e\d+)$", n)}


def replicate_spans(norms: Sequence[str], radius: float, radii: Sequence[float],
                    none_radii: Sequence[float]) -> dict[str, float]:
    """{norm: span} of the replicate surfaces: `radius` for normalized directions; for unnormalized
    ("none") the entry of `none_radii` at `radius`'s place in `radii` (the sensitivity study's
    pairing; the first when `radius` is not among them)."""
    none = none_radii[list(radii).index(radius)] if radius in radii else none_radii[0]
    return {n: float(none if n == "none" else radius) for n in norms}


def merge(*replicates: Mapping) -> dict:
    """One replicate dict from several (`sensitivity_replicates` results): surfaces of a key united."""
    out: dict = {}
    for r in replicates:
        for key, surfaces in r.items():
            out.setdefault(key, {}).update(surfaces)
    return out


def sensitivity_replicates(models: Mapping[str, nn.Module], x: torch.Tensor, y: torch.Tensor,
                           run: Run | str | Path | None = None, settings: SurfaceSettings | None = None, *,
                           seeds: Sequence[int], spans: Mapping[str, float], dims: Sequence[int] = (1, 2),
                           bn_variants: Sequence[tuple[str, str]] = BN_VARIANTS, attack: Attack | None = None,
                           bn_x: torch.Tensor | None = None, overwrite: bool = False
                           ) -> dict[tuple[int, int, str], dict[tuple[str, float, str], xr.Dataset]]:
    """`sensitivity_surfaces` for every direction seed, dimension and BatchNorm variant, each
    normalization of `spans` ({norm: span}) at its one span; the BatchNorm variants for `filter`
    only. Returns {(seed, dims, "clean"|"robust"): {(variant label, span, model): surface}};
    with `attack` the surfaces carry the robust loss too (same files, key "robust")."""
    settings = settings_with(settings)
    if not seeds:
        raise ValueError("seeds must name at least one direction seed")
    for b, mode in bn_variants:
        check_choice("bn_variants bn", b, BN_POLICIES)
        check_choice("bn_variants bn_mode", mode, ("eval", "recalibrate"))
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for model in models.values() for m in model.modules()):
        bn_variants = [v for v in bn_variants if v == ("ignore", "eval")]  # no BatchNorm: nothing to vary
    out: dict = {}
    for seed, d in itertools.product(seeds, dims):
        check_int("seeds entry", seed, 0)
        found: dict = {}
        for b, mode in bn_variants:
            norms = list(spans) if (b, mode) == ("ignore", "eval") else ["filter"]
            if mode == "recalibrate" and bn_x is None:
                continue
            sweep = SensitivitySettings(norms=norms, spans={n: [spans[n]] for n in norms}, dims=d, seed=seed, bn=b)
            surf = sensitivity_surfaces(models, x, y, run, settings.replace(bn_mode=mode), sweep, attack=attack,
                                        bn_x=bn_x if mode == "recalibrate" else None, overwrite=overwrite,
                                        tag="-rep")
            found.update({(variant_label(n, b, mode), s, m): ds for (n, s, m), ds in surf.items()})
        out[(seed, d, "clean")] = found
        if attack is not None:
            out[(seed, d, "robust")] = found
    return out


def sharpness_values(replicates: Mapping[tuple[int, int, str], Mapping[tuple[str, float, str], xr.Dataset]], *,
                     variant: str = "filter", radius_fraction: float = 1.0) -> pd.DataFrame:
    """Long table of the curvature of the quadratic fit within radius_fraction * span (the largest
    eigenvalue; `landscape.sharpness.quadratic_fit`) of every `variant` surface: one row per (quantity, dims,
    model, training seed, direction seed); `family` is the model's name without its seed suffix."""
    check_number("radius_fraction", radius_fraction, low_open=True)
    rows = []
    for (seed, d, kind), surfaces in replicates.items():
        quantity = "robust_loss" if kind == "robust" else "loss"
        for (label, span, model), ds in surfaces.items():
            if label != variant:
                continue
            family, training_seed = split_seed(model)
            rows.append({"quantity": quantity, "dims": d, "model": model, "family": family,
                         "training_seed": -1 if training_seed is None else training_seed, "direction_seed": seed,
                         "sharpness": quadratic_fit(ds, quantity, radius_fraction * span)["curvature_max"]})
    return pd.DataFrame(rows)


def _counts(rng: np.random.Generator, n: int, size: int) -> np.ndarray:
    """Multinomial counts of a resample with replacement of n items, `size` times: (size, n)."""
    return rng.multinomial(n, np.full(n, 1.0 / n), size=size).astype(float)


def probability_sharper(a: np.ndarray, b: np.ndarray, *, n_resamples: int = 2000, confidence_level: float = 0.95,
                        seed: int = 0) -> tuple[float, float, float, int]:
    """P(A sharper than B): the fraction of replicate pairs (direction seed d, training seeds i of A,
    j of B) with a[i, d] > b[j, d] (ties count as not sharper), and a seeded percentile bootstrap
    interval resampling direction seeds and each model's training seeds with replacement.

    `a`, `b`: (training seeds, direction seeds) arrays, columns paired by direction seed (1D: one
    training seed). Returns (p, low, high, pairs); the interval is NaN with a single replicate.
    Memory: CHUNK resamples at a time, whatever n_resamples.
    """
    a, b = np.atleast_2d(np.asarray(a, float)), np.atleast_2d(np.asarray(b, float))
    if a.shape[1] != b.shape[1] or a.shape[1] == 0:
        raise ValueError(f"a and b need the same direction seeds (columns), got shapes {a.shape} and {b.shape}")
    check_int("n_resamples", n_resamples, 10)
    check_number("confidence_level", confidence_level, 0, 1, low_open=True, high_open=True)
    wins = (a[:, None, :] > b[None, :, :]).astype(float)  # (na, nb, nd)
    p = float(wins.mean())
    n_pairs = wins.size
    if max(a.shape[1], a.shape[0], b.shape[0]) < 2 or (a.shape[1] < 2 and min(a.shape[0], b.shape[0]) < 2):
        return p, float("nan"), float("nan"), n_pairs
    rng = np.random.default_rng(seed)
    na, nb, nd = wins.shape
    stats = []
    for start in range(0, n_resamples, CHUNK):
        size = min(CHUNK, n_resamples - start)
        ca, cb, cd = _counts(rng, na, size), _counts(rng, nb, size), _counts(rng, nd, size)
        stats.append(np.einsum("ra,rb,rd,abd->r", ca, cb, cd, wins, optimize=True) / (na * nb * nd))
    stats = np.concatenate(stats)
    tail = (1 - confidence_level) / 2
    low, high = np.quantile(stats, [tail, 1 - tail])
    return p, float(low), float(high), n_pairs


def ordering_verdict(p: float, low: float, high: float) -> str:
    """"sharper" when the interval lies above 1/2, "flatter" below it, "undecided" otherwise."""
    if not np.isfinite(low):
        return "one draw"
    return "sharper" if low > 0.5 else "flatter" if high < 0.5 else "undecided"


def ordering_probabilities(values: pd.DataFrame, *, n_resamples: int = 2000, confidence_level: float = 0.95,
                           seed: int = 0) -> pd.DataFrame:
    """For every quantity, dimension and pair of model families (A, B) in the order they appear:
    P(A sharper than B) over replicate pairs (`probability_sharper`), its bootstrap interval, the
    numbers of direction and training seeds, and the verdict. `values` is `sharpness_values`."""
    rows = []
    for (quantity, d), part in values.groupby(["quantity", "dims"], sort=False):
        wide = part.pivot_table(index=["family", "training_seed"], columns="direction_seed", values="sharpness")
        families = list(dict.fromkeys(part["family"]))
        for fa, fb in itertools.combinations(families, 2):
            a, b = wide.loc[fa].to_numpy(), wide.loc[fb].to_numpy()
            keep = np.isfinite(a).all(0) & np.isfinite(b).all(0)
            p, low, high, n = probability_sharper(a[:, keep], b[:, keep], n_resamples=n_resamples,
                                                  confidence_level=confidence_level, seed=seed)
            rows.append({"quantity": quantity, "dims": d, "a": fa, "b": fb, "p_a_sharper": p, "ci_low": low,
                         "ci_high": high, "n_pairs": n, "direction_seeds": int(keep.sum()),
                         "training_seeds_a": len(a), "training_seeds_b": len(b),
                         "verdict": ordering_verdict(p, low, high)})
    out = pd.DataFrame(rows)
    out.attrs.update(n_resamples=n_resamples, confidence_level=confidence_level, seed=seed)
    return out


def probability_matrix(table: pd.DataFrame, quantity: str = "loss", dims: int = 1,
                       column: str = "p_a_sharper") -> pd.DataFrame:
    """Square P(row sharper than column) for one quantity and dimension (diagonal NaN), or with
    `column` "ci_low"/"ci_high" its interval's bounds; the mirrored entry is 1 - p (bounds swapped),
    exact when no two replicates tie."""
    check_choice("column", column, ("p_a_sharper", "ci_low", "ci_high"))
    mirror = {"p_a_sharper": "p_a_sharper", "ci_low": "ci_high", "ci_high": "ci_low"}[column]
    part = table[(table["quantity"] == quantity) & (table["dims"] == dims)]
    names = list(dict.fromkeys([*part["a"], *part["b"]]))
    m = pd.DataFrame(np.nan, index=names, columns=names)
    for r in part.itertuples():
        m.loc[r.a, r.b], m.loc[r.b, r.a] = getattr(r, column), 1 - getattr(r, mirror)
    return m


def agreement_table(replicates: Mapping[tuple[int, int, str], Mapping[tuple[str, float, str], xr.Dataset]], *,
                    radius_fraction: float = 1.0, reference: str = "filter") -> tuple[pd.DataFrame, pd.DataFrame]:
    """`sensitivity_table` (curvature) for every seed, dimension and quantity against the `reference`
    variant of the same seed, and how often each variant orders the models as the reference does:
    (per-seed rows, agreement: share of seeds with the same ordering and mean Kendall's tau)."""
    frames = []
    for (seed, d, kind), surfaces in replicates.items():
        spans = [s for label, s, _ in surfaces if label == reference]
        if not spans:
            raise ValueError(f"no {reference!r} surfaces for direction seed {seed}, {d}D")
        t = sensitivity_table(surfaces, quantity="robust_loss" if kind == "robust" else "loss",
                              radius_fraction=radius_fraction, reference=(reference, spans[0]))
        frames.append(t[["norm", "span", "ordering", "kendall_tau", "same_ordering"]]
                      .assign(direction_seed=seed, dims=d, quantity=t.attrs["quantity"]))
    per_seed = pd.concat(frames, ignore_index=True).rename(columns={"norm": "variant"})
    per_seed = per_seed[per_seed["variant"] != reference]
    agree = (per_seed.groupby(["quantity", "dims", "variant"], sort=False)
             .agg(seeds=("direction_seed", "nunique"), same_ordering=("same_ordering", "mean"),
                  mean_tau=("kendall_tau", "mean"), min_tau=("kendall_tau", "min")).reset_index())
    return per_seed, agree


def training_seed_note(values: pd.DataFrame) -> str:
    """One line: the training-seed replicates behind the probabilities, or that there are none."""
    seeded = values[values["training_seed"] >= 0].groupby("family")["training_seed"].nunique()
    if seeded.empty:
        return ("no training-seed replicates in this run (a sweep's <name>_s<k> models, `python -m advkit sweep "
                "-g seed=0,1,2`): the probabilities are over direction seeds only")
    return "training-seed replicates: " + ", ".join(f"{f} {n}" for f, n in seeded.items())


def ordering_lines(table: pd.DataFrame, *, quantity: str = "loss", dims: int | None = None,
                   reference: str = "base") -> list[str]:
    """Summary lines: for every model against `reference`, P(model sharper than reference) with its
    interval and the verdict (notebook 05's summary; `correlation.summary(ordering=...)`)."""
    part = table[table["quantity"] == quantity]
    if dims is not None:
        part = part[part["dims"] == dims]
    lines = []
    for r in part.itertuples():
        if reference not in (r.a, r.b):
            continue
        other, p, low, high = ((r.b, r.p_a_sharper, r.ci_low, r.ci_high) if r.a == reference else
                               (r.a, r.p_a_sharper, r.ci_low, r.ci_high))
        if r.a == reference:
            p, low, high = 1 - p, 1 - high, 1 - low
        lines.append(f"{other} sharper than {reference} ({r.dims}D): P = {p:.2f} "
                     f"[{low:.2f}, {high:.2f}] over {r.n_pairs} replicate pairs: {ordering_verdict(p, low, high)}")
    return lines


def summary_lines(run: Run | str | Path, reference: str = "base") -> list[str]:
    """Notebook 05's lines on Xu et al.'s "fine-tuning sharpens the landscape" over replicates, from
    notebook 04's `landscape_table("sharpness_ordering")`: per model and quantity, P(sharper than
    `reference`) with its interval; one line saying so when notebook 04 wrote no such table."""
    run = Run.of(run)
    path = run.landscape_table("sharpness_ordering")
    if not path.exists():
        return ["- Sharper over replicates: no landscapes/sharpness_ordering.csv (notebook 04's replicate cells "
                "did not run), so the ordering above rests on one direction pair."]
    table = run.read_table(path)
    lines = []
    for quantity, label in (("loss", "clean"), ("robust_loss", "robust")):
        found = ordering_lines(table, quantity=quantity, reference=reference)
        if found:
            n = int(table["direction_seeds"].max())
            counts = {v: sum(line.endswith(f": {v}") for line in found) for v in ("sharper", "flatter", "undecided")}
            lines.append(f"- Sharper than {reference} over replicates ({label} loss, {n} direction seeds; 'sharper' "
                         "when the 95% bootstrap interval of P(model sharper) lies above 1/2): "
                         + ", ".join(f"{k} {v}" for k, v in counts.items()) + f" of {len(found)} - "
                         + "; ".join(found))
    return lines


