"""Correlation of robustness with flatness across models, with confidence intervals.

Pearson, Spearman and Kendall coefficients come from scipy.stats. Their confidence intervals
are, by default, analytic Fisher-z intervals (`ci="fisher"`): tanh(atanh(r) ± z·se) with
se = 1/sqrt(n-3) for Pearson (scipy's `pearsonr(...).confidence_interval()`), sqrt((1 + r²/2)/(n-3))
for Spearman and sqrt(0.437/(n-4)) for Kendall (Bonett & Wright 2000; Fieller et al. 1957).
They are smooth functions of the coefficient, so a last-bit change of the inputs (another
BLAS kernel on another CPU) moves them by a few ulps. BCa bootstrap intervals are not: with
the handful of models of a run, many resamples reproduce the estimate up to rounding, BCa's
bias correction counts those below it, and one ulp moved a bound from 0.973 to 0.981 (n = 6).
`ci="bootstrap"` gives a seeded paired percentile bootstrap instead (continuous in the data,
hence as stable), from `BOOTSTRAP_MIN_N` models on. Below each method's minimum n
(`min_pairs`) there is no interval (NaN, `ci_method="none"`), and `claims_summary` says so.
`correlation_table` makes one tidy DataFrame for a per-model table;
`claims_summary` turns it into a few plain sentences: which expected relations (`Claim`) the
numbers support, contradict or leave open, and how confidently.

The second half is notebook 05's report on the per-model table that `advkit.studies.zoo.flatness_table`
measures (measuring stays in `advkit.studies.zoo`; this module only reads tables): the headline columns
(`overview`), Stutz et al.'s Table 1 (`early_stopping_table`), the correlations over distinct
weights (`correlations`, `correlation_view`), Walter et al.'s confidence summary and the
plain-language `summary` of every seed claim.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pandas as pd
import scipy.stats

from advkit._checks import CI_METHODS, XU_ATTACKS
from advkit.runs.run import EARLY_SUFFIX, split_seed

METHODS = ("pearson", "spearman", "kendall")
BOOTSTRAP_MIN_N = 8   # fewer models give too few distinct resamples for a percentile interval


@dataclass(frozen=True)
class CorrelationResult:
    """A correlation coefficient, its p-value and confidence interval over n pairs (ci_method: how)."""

    method: str
    statistic: float
    pvalue: float
    ci_low: float
    ci_high: float
    n: int
    confidence_level: float
    ci_method: str


def _coefficient(method: str, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # constant input: scipy warns and returns nan
        if method == "pearson":
            res = scipy.stats.pearsonr(x, y)
        elif method == "spearman":
            res = scipy.stats.spearmanr(x, y)
        else:
            res = scipy.stats.kendalltau(x, y)
    return float(res.statistic), float(res.pvalue)


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"method={method!r}: choose one of {METHODS}")


def _pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    constant = (a.max(-1) == a.min(-1)) | (b.max(-1) == b.min(-1))   # exactly NaN, not a rounding residue
    a = a - a.mean(-1, keepdims=True)
    b = b - b.mean(-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (a * b).sum(-1) / np.sqrt((a * a).sum(-1) * (b * b).sum(-1))
    return np.where(constant, np.nan, r)


PAIR_BUDGET = 2 ** 20  # pair comparisons per chunk of resamples in `_kendall_tau_b`: 8 MiB per float64 array


def _kendall_tau_b(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Kendall's tau-b along the last axis, a chunk of the leading (resample) axes at a time: about
    `PAIR_BUDGET` pair signs per array, whatever the resamples (not R × n²); the same values as unchunked."""
    a, b = np.broadcast_arrays(a, b)
    lead, n = a.shape[:-1], a.shape[-1]
    a, b = a.reshape(-1, n), b.reshape(-1, n)
    out = np.empty(len(a))
    step = max(1, PAIR_BUDGET // max(n * n, 1))
    for i in range(0, len(a), step):
        sa = np.sign(a[i:i + step, :, None] - a[i:i + step, None, :])
        sb = np.sign(b[i:i + step, :, None] - b[i:i + step, None, :])
        with np.errstate(invalid="ignore", divide="ignore"):
            out[i:i + step] = (sa * sb).sum((-2, -1)) / np.sqrt((sa * sa).sum((-2, -1)) * (sb * sb).sum((-2, -1)))
    return out.reshape(lead)


def _vectorized(method: str):
    """Coefficient along the last axis (batched over resamples): same values as scipy's functions."""
    if method == "pearson":
        return lambda a, b, axis=-1: _pearson(np.moveaxis(a, axis, -1), np.moveaxis(b, axis, -1))
    if method == "spearman":
        return lambda a, b, axis=-1: _pearson(scipy.stats.rankdata(a, axis=axis), scipy.stats.rankdata(b, axis=axis))
    return lambda a, b, axis=-1: _kendall_tau_b(np.moveaxis(a, axis, -1), np.moveaxis(b, axis, -1))


def _bootstrap(data, statistic, *, seed: int, **kwargs):
    """scipy.stats.bootstrap seeded through `rng` (scipy >= 1.15) or `random_state` (older)."""
    try:
        return scipy.stats.bootstrap(data, statistic, rng=np.random.default_rng(seed), **kwargs)
    except TypeError:
        return scipy.stats.bootstrap(data, statistic, random_state=np.random.default_rng(seed), **kwargs)


def min_pairs(method: str, ci: str = "fisher") -> int:
    """Fewest pairs that get a confidence interval: Fisher z needs n - 3 > 0 (Kendall's se: n - 4 > 0);
    the percentile bootstrap `BOOTSTRAP_MIN_N`."""
    _check_method(method)
    _check_ci(ci)
    if ci == "bootstrap":
        return BOOTSTRAP_MIN_N
    return 5 if method == "kendall" else 4


def _check_ci(ci: str) -> None:
    if ci not in CI_METHODS:
        raise ValueError(f"ci={ci!r}: choose one of {CI_METHODS}")


def fisher_interval(method: str, statistic: float, n: int, confidence_level: float = 0.95) -> tuple[float, float]:
    """Analytic interval tanh(atanh(r) ± z·se) with the method's standard error of atanh(r) (Fisher 1921;
    Spearman: Bonett & Wright 2000, se² = (1 + r²/2)/(n-3); Kendall: Fieller et al. 1957, se² = 0.437/(n-4))."""
    _check_method(method)
    if n < min_pairs(method):
        raise ValueError(f"n={n}: a Fisher-z interval for {method} needs n >= {min_pairs(method)}")
    se = {"pearson": lambda: 1 / math.sqrt(n - 3),
          "spearman": lambda: math.sqrt((1 + statistic ** 2 / 2) / (n - 3)),
          "kendall": lambda: math.sqrt(0.437 / (n - 4))}[method]()
    z = scipy.stats.norm.ppf((1 + confidence_level) / 2) * se
    with np.errstate(divide="ignore"):
        centre = float(np.arctanh(np.clip(statistic, -1.0, 1.0)))
    return math.tanh(centre - z), math.tanh(centre + z)


def correlate(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray, method: str = "spearman", *,
              ci: str = "fisher", n_resamples: int = 2000, confidence_level: float = 0.95,
              seed: int = 0) -> CorrelationResult:
    """Correlation of paired samples x, y with a confidence interval that is stable in the inputs' last bits.

    `ci="fisher"`: analytic Fisher-z interval (`fisher_interval`); `ci="bootstrap"`: seeded paired
    percentile bootstrap with `n_resamples` (not BCa: see the module docstring). Needs >= 3 pairs for a
    coefficient and `min_pairs(method, ci)` for an interval (else NaN, `ci_method="none"`).
    """
    _check_method(method)
    _check_ci(ci)
    if isinstance(n_resamples, bool) or not isinstance(n_resamples, int) or n_resamples < 10:
        raise ValueError(f"n_resamples must be an integer >= 10, got {n_resamples!r}")
    if not 0 < confidence_level < 1:
        raise ValueError(f"confidence_level must be in (0, 1), got {confidence_level!r}")
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    if x.ndim != 1 or x.shape != y.shape:
        raise ValueError(f"x and y must be 1-d with equal length, got shapes {x.shape} and {y.shape}")
    n = len(x)
    nan = float("nan")
    if n < 3:
        return CorrelationResult(method, nan, nan, nan, nan, n, confidence_level, "none")
    stat, p = _coefficient(method, x, y)
    lo = hi = nan
    ci_method = "none"
    if n >= min_pairs(method, ci) and math.isfinite(stat):
        if ci == "fisher":
            lo, hi = fisher_interval(method, stat, n, confidence_level)
            ci_method = "fisher-z"
        else:
            lo, hi = _percentile_bootstrap(x, y, method, n_resamples, confidence_level, seed)
            ci_method = "percentile" if math.isfinite(lo) else "none"
    return CorrelationResult(method, stat, p, lo, hi, n, confidence_level, ci_method)


def _percentile_bootstrap(x: np.ndarray, y: np.ndarray, method: str, n_resamples: int, confidence_level: float,
                          seed: int) -> tuple[float, float]:
    """Percentiles of the finite resampled coefficients (scipy's paired bootstrap; NaN if under 10 are finite).

    Every resample's coefficient and the quantiles are continuous in the data, unlike BCa's bias
    correction, which counts resamples below the estimate."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = _bootstrap((x, y), _vectorized(method), paired=True, vectorized=True, n_resamples=n_resamples,
                         confidence_level=confidence_level, method="percentile", seed=seed)
    dist = res.bootstrap_distribution
    dist = dist[np.isfinite(dist)]
    if len(dist) < 10:
        return float("nan"), float("nan")
    alpha = (1 - confidence_level) / 2
    lo, hi = np.quantile(dist, [alpha, 1 - alpha])
    return float(lo), float(hi)


def correlation_table(table: pd.DataFrame, robustness: Sequence[str], flatness: Sequence[str], *,
                      methods: Sequence[str] = METHODS, ci: str = "fisher", n_resamples: int = 2000,
                      confidence_level: float = 0.95, seed: int = 0) -> pd.DataFrame:
    """Tidy correlations between robustness and flatness columns of a per-model table (one row per model).

    One row per (robustness, flatness, method): n, statistic, pvalue, ci_low, ci_high; pairs
    with a missing value are dropped pair by pair; a column is never paired with itself.
    """
    robustness, flatness = list(robustness), list(flatness)
    for name, cols in (("robustness", robustness), ("flatness", flatness)):
        if not cols:
            raise ValueError(f"{name} must name at least one column")
        missing = [c for c in cols if c not in table.columns]
        if missing:
            raise ValueError(f"{name}: columns {missing} not in the table; available: {list(table.columns)}")
    for m in methods:
        _check_method(m)
    _check_ci(ci)
    rows = []
    for r in robustness:
        for f in flatness:
            if f == r:
                continue
            pair = table[[r, f]].apply(pd.to_numeric, errors="coerce").dropna()
            for m in methods:
                res = correlate(pair[r].to_numpy(), pair[f].to_numpy(), m, ci=ci, n_resamples=n_resamples,
                                confidence_level=confidence_level, seed=seed)
                rows.append({"robustness": r, "flatness": f, **asdict(res)})
    cols = ["robustness", "flatness", "method", "n", "statistic", "pvalue", "ci_low", "ci_high",
            "confidence_level", "ci_method"]
    return pd.DataFrame(rows)[cols]


@dataclass(frozen=True)
class Claim:
    """An expected relation: `robustness` column vs `flatness` column should correlate with `sign`."""

    name: str
    robustness: str
    flatness: str
    sign: int = 1
    source: str = ""


# Column names are those notebook 05 is expected to use; pass your own claims otherwise.
SEED_CLAIMS = (
    Claim("flatter (avg-case) goes with a lower test robust loss", "robust_loss_test", "avg_case_flatness",
          +1, "Stutz et al. 2021, Fig. 1"),
    Claim("flatter (avg-case) goes with a smaller robust generalization gap", "robust_gap", "avg_case_flatness",
          +1, "Stutz et al. 2021"),
    Claim("flatter (worst-case) goes with a smaller robust generalization gap", "robust_gap",
          "worst_case_flatness", +1, "Stutz et al. 2021"),
    Claim("a sharper loss surface goes with a larger 1-SSIM of the augmentation attack", "one_minus_ssim",
          "surface_sharpness", +1, "Xu et al. 2019, Sec. 3.1"),
    Claim("the Hessian's top eigenvalue tracks the surface sharpness", "surface_sharpness", "hessian_top_eig",
          +1, "referee's cross-check"),
    Claim("the Hessian's trace tracks the surface sharpness", "surface_sharpness", "hessian_trace",
          +1, "referee's cross-check"),
)


def strength(r: float) -> str:
    """Conventional words for |r|: negligible < 0.1 <= weak < 0.3 <= moderate < 0.5 <= strong."""
    a = abs(r)
    return "negligible" if a < 0.1 else "weak" if a < 0.3 else "moderate" if a < 0.5 else "strong"


def claim_verdict(result: pd.Series | CorrelationResult, sign: int) -> str:
    """'supported' / 'contradicted': the interval excludes 0 on the expected / opposite side; else 'inconclusive'."""
    get = (lambda k: result[k]) if isinstance(result, pd.Series) else (lambda k: getattr(result, k))  # noqa: E731
    lo, hi = get("ci_low"), get("ci_high")
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return "inconclusive"
    if sign * lo > 0 and sign * hi > 0:
        return "supported"
    if sign * lo < 0 and sign * hi < 0:
        return "contradicted"
    return "inconclusive"


def claims_summary(table: pd.DataFrame, claims: Sequence[Claim] = SEED_CLAIMS, *, method: str = "spearman") -> str:
    """A short plain-language summary of `correlation_table` output for the given claims.

    One line per claim whose columns were correlated: verdict, coefficient with its
    confidence interval and n; claims without data are listed as not tested.
    """
    _check_method(method)
    symbol = {"pearson": "r", "spearman": "rho", "kendall": "tau"}[method]
    lines, untested = [], []
    sub = table[table["method"] == method]
    for c in claims:
        hit = sub[(sub["robustness"] == c.robustness) & (sub["flatness"] == c.flatness)]
        if hit.empty or not math.isfinite(hit.iloc[0]["statistic"]):
            untested.append(c.name)
            continue
        row = hit.iloc[0]
        v = claim_verdict(row, c.sign)
        level = int(round(100 * row["confidence_level"]))
        direction = "" if strength(row["statistic"]) == "negligible" else \
            " positive" if row["statistic"] > 0 else " negative"
        has_ci = math.isfinite(row["ci_low"]) and math.isfinite(row["ci_high"])
        ci = f"{level}% CI [{row['ci_low']:.2f}, {row['ci_high']:.2f}]" if has_ci else "no interval"
        text = (f"- {c.name}: {v.upper()} - {strength(row['statistic'])}{direction} association "
                f"({symbol} = {row['statistic']:.2f}, {ci}, n = {int(row['n'])} models")
        text += f"; {c.source})" if c.source else ")"
        if v == "inconclusive":
            text += ("; the interval includes 0, so the data neither confirm nor refute it" if has_ci else
                     f"; {int(row['n'])} models are too few for a confidence interval (see "
                     "advkit.studies.correlation.min_pairs), so the data neither confirm nor refute it")
        lines.append(text)
    kinds = sorted(set(sub["ci_method"]) - {"none"}) if "ci_method" in sub else []
    header = f"Correlations over models ({method}, {', '.join(kinds) or 'no'} intervals):"
    if not lines:
        header = "No claim could be tested: too few models or missing columns."
    out = [header, *lines]
    if untested:
        out.append("Not tested (missing columns or fewer than 3 models): " + "; ".join(untested) + ".")
    ns = sub["n"]
    if len(ns) and ns.max() < 8:
        out.append(f"Caution: at most {int(ns.max())} models; intervals are wide and a single model can flip "
                   "a verdict. Read these as indications, not evidence.")
    return "\n".join(out)


# --- notebook 05's report: what the per-model table says ----------------------------------------

# What notebook 05 correlates: robustness-side and flatness-side columns of `advkit.studies.zoo.flatness_table`.
ROBUSTNESS = ("robust_loss_test", "robust_gap", "robust_err", "robust_acc", "one_minus_ssim", "surface_sharpness")
FLATNESS = ("avg_case_flatness", "avg_case_flatness_train", "worst_case_flatness", "hessian_top_eig", "hessian_trace",
            "relative_flatness", "surface_sharpness")


def distinct_models(table: pd.DataFrame) -> pd.DataFrame:
    """`table` without the `<name>_early` rows whose early-stopping epoch is `<name>`'s final epoch:
    those are the same weights, and counting them twice would inflate n in a correlation."""
    same = [f"{name}{EARLY_SUFFIX}" for name in table.index
            if f"{name}{EARLY_SUFFIX}" in table.index and "epoch" in table.columns
            and table.at[f"{name}{EARLY_SUFFIX}", "epoch"] == table.at[name, "epoch"]]
    return table.drop(index=same)


def correlations(table: pd.DataFrame, robustness: Sequence[str] = ROBUSTNESS, flatness: Sequence[str] = FLATNESS,
                 **kwargs: Any) -> pd.DataFrame:
    """`correlation_table` over the columns of `table` that exist, each distinct set
    of weights once (`distinct_models`); kwargs: methods, ci, n_resamples, confidence_level, seed."""
    table = distinct_models(table)
    rob = [c for c in robustness if c in table.columns]
    flat = [c for c in flatness if c in table.columns]
    if not rob or not flat:
        raise ValueError(f"the table has none of the robustness columns {list(robustness)} or none of the "
                         f"flatness columns {list(flatness)}")
    return correlation_table(table, rob, flat, **kwargs)


def correlation_view(corr: pd.DataFrame, min_n: int = 3, decimals: int = 3) -> pd.DataFrame:
    """Wide view of `correlations`: one row per (robustness, flatness, n) pair with at least `min_n`
    models, columns (method, statistic / ci_low / ci_high), rounded."""
    sub = corr[corr["n"] >= min_n]
    methods = [m for m in ("pearson", "spearman", "kendall") if m in set(sub["method"])]
    stats = ["statistic", "ci_low", "ci_high"]
    wide = sub.set_index(["robustness", "flatness", "method"])[stats].unstack("method")
    wide = wide.swaplevel(0, 1, axis=1).reindex(columns=pd.MultiIndex.from_product([methods, stats]))
    pairs = pd.MultiIndex.from_frame(sub[["robustness", "flatness"]].drop_duplicates())
    wide = wide.reindex(pairs)
    wide.insert(0, ("", "n"), sub.groupby(["robustness", "flatness"])["n"].first().reindex(pairs).to_numpy())
    return wide.round(decimals)


def available_pairs(table: pd.DataFrame, pairs: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    """The (x, y) column pairs of `pairs` that at least one model has both values of (what can be plotted)."""
    return [(a, b) for a, b in pairs
            if a in table.columns and b in table.columns and table[[a, b]].notna().all(axis=1).any()]


def trajectories(table: pd.DataFrame) -> list[str]:
    """Families with checkpoints at two or more epochs (for Stutz et al.'s Fig. 5)."""
    rows = table.dropna(subset=["epoch"])
    return [f for f, g in rows.groupby("family") if g["epoch"].nunique() >= 2]


def overview(table: pd.DataFrame, decimals: int = 3) -> pd.DataFrame:
    """The headline columns of `flatness_table` (those present), rounded: what notebook 05 shows."""
    cols = ["epoch", "early_stopped", "clean_acc", "robust_acc", "robust_err", "robust_err_train",
            "robust_loss_train", "robust_loss_test", "robust_gap", "avg_case_flatness", "avg_case_flatness_train",
            "worst_case_flatness", "hessian_top_eig", "hessian_trace", "relative_flatness", "relative_flatness_adv",
            "one_minus_ssim", "surface_sharpness"]
    return table[[c for c in cols if c in table.columns]].round(decimals)


def early_stopping_table(table: pd.DataFrame, decimals: int = 3) -> pd.DataFrame:
    """Stutz et al. Table 1 for every model with early-stopped weights (`<name>` and `<name>_early`):
    test and train RErr and flatness in RLoss of the final weights, then RErr, RLoss and flatness
    after early stopping, and whether early stopping found a flatter minimum (their Sec. 4; NaN
    when the early-stopped epoch is the final one)."""
    rows = {}
    for name in table.index:
        early = f"{name}{EARLY_SUFFIX}"
        if early not in table.index:
            continue
        final, stopped = table.loc[name], table.loc[early]
        rows[name] = {"robust_err": final.get("robust_err"), "robust_err_train": final.get("robust_err_train"),
                      "avg_case_flatness": final.get("avg_case_flatness"),
                      "robust_loss_test": final.get("robust_loss_test"),
                      "early_epoch": stopped.get("epoch"), "early_robust_err": stopped.get("robust_err"),
                      "early_robust_loss_test": stopped.get("robust_loss_test"),
                      "early_avg_case_flatness": stopped.get("avg_case_flatness"),
                      # NaN when early stopping kept the final epoch (the same weights)
                      "early_flatter": (np.nan if stopped.get("epoch") == final.get("epoch") else
                                        bool(stopped.get("avg_case_flatness") < final.get("avg_case_flatness")))}
    out = pd.DataFrame.from_dict(rows, orient="index")
    out.index.name = "model"
    return out.round(decimals)


def _copies(table: pd.DataFrame) -> list[str]:
    """Models that are checkpoints of another model's training run: epoch checkpoints (their
    `family` is another model) and early-stopped weights."""
    family = table["family"] if "family" in table.columns else pd.Series(table.index, index=table.index)
    return [m for m in table.index if family[m] != m or m.endswith(EARLY_SUFFIX)]


def table_settings(table: pd.DataFrame) -> pd.Series:
    """The settings every row was computed with (one set; ValueError if rows disagree)."""
    keys = table["settings"].unique()
    if len(keys) != 1:
        raise ValueError(f"rows were computed with {len(keys)} different settings")
    return pd.Series(json.loads(keys[0]))


def confidently_wrong(table: pd.DataFrame, confident: float = 0.9) -> float:
    """Share of the inputs of a `confidence_flatness` table that are wrong with max softmax >= `confident`."""
    return float(((table["confidence"] >= confident) & ~table["correct"].astype(bool)).mean())


def confidence_summary(clean: pd.DataFrame, adversarial: pd.DataFrame,
                       confident: float = 0.9) -> pd.DataFrame:
    """Walter et al. 2025 in numbers: per input kind, accuracy, mean confidence, median relative
    flatness and the share of inputs that are confidently (max softmax >= `confident`) wrong.
    Inputs: `advkit.curvature.flatness.confidence_flatness` tables for clean and adversarial inputs."""
    rows = {}
    for kind, df in (("clean", clean), ("adversarial", adversarial)):
        rows[kind] = {"n": len(df), "accuracy": df["correct"].mean(), "mean_confidence": df["confidence"].mean(),
                      "median_relative_flatness": df["relative_flatness"].median(),
                      "confidently_wrong": confidently_wrong(df, confident)}
    return pd.DataFrame.from_dict(rows, orient="index")


def summary(table: pd.DataFrame, correlations: pd.DataFrame,
            confidence: tuple[pd.DataFrame, pd.DataFrame] | None = None, *,
            claims: Sequence[Claim] = SEED_CLAIMS, method: str = "spearman", base: str = "base",
            local: Sequence[str] = (), ordering: Sequence[str] = ()) -> str:
    """Plain-language summary of notebook 05 generated from the numbers.

    The cross-model claims (`claims_summary`), Xu et al.'s "adversarial
    fine-tuning sharpens the surface" as a count of fine-tunes sharper than `base`, and
    Walter et al.'s "adversarial examples sit in flat regions" from (clean, adversarial)
    `confidence_flatness` tables of one model (Mann-Whitney U test), then `local` (Walter et al.'s
    local-vs-global lines, `advkit.curvature.local_global.summary_lines`); `ordering`: "sharper" as a probability
    over direction (and training) seeds, after Xu et al.'s count (`advkit.landscape.replicates.summary_lines`).
    """
    n = len(table)
    lines = [f"{n} model{'s' if n != 1 else ''} measured ({', '.join(map(str, table.index))})."]
    if n < 3:
        lines.append("Correlations across models need at least 3 models (4 for a confidence interval); "
                     "this run has too few, so no cross-model claim can be tested. Add fine-tuned or "
                     "adversarially trained models (notebook 03).")
    else:
        lines.append(claims_summary(correlations, claims, method=method))
    lines += _xu_line(table, base)
    lines += list(ordering)  # Xu et al.'s "sharper" over replicates: advkit.landscape.replicates.summary_lines
    if confidence is not None:
        lines.append(_walter_line(*confidence))
    lines += list(local)  # Walter et al.'s local-vs-global lines: advkit.curvature.local_global.summary_lines
    if n >= 3:
        epochs = len(_copies(table))
        seeds = {seed for _, seed in map(split_seed, table.index)} - {None}
        lines.append(f"How far to trust this: {n} models from "
                     + (f"{len(seeds)} seeds" if len(seeds) > 1 else "one seed") + ", evaluated on one subset"
                     + (f"; {epochs} of them are checkpoints of another model's training run, so the models are "
                        "not independent" if epochs else "")
                     + "; several claims are tested at once without correction, so one SUPPORTED verdict among "
                       "them can be chance. Treat verdicts as hypotheses for the paper profile.")
    return "\n".join(lines)


def _xu_line(table: pd.DataFrame, base: str) -> list[str]:
    """How many of Xu et al.'s fine-tunes have a sharper surface than the base model (none if unknown).
    Each replicate counts once: `fgsm` and `fgsm_s<k>` (`runs.run.split_seed`) are fine-tunes with FGSM, and
    with replicates the line adds the count per attack; copies (`_early`, `_eNNN`) are not counted."""
    sharp = table["surface_sharpness"] if "surface_sharpness" in table.columns else pd.Series(dtype=float)
    if base not in sharp.index or not np.isfinite(sharp[base]):
        return []
    tuned = sorted((XU_ATTACKS.index(attack), -1 if seed is None else seed, name)
                   for name in sharp.index for attack, seed in [split_seed(name)]
                   if attack in XU_ATTACKS and np.isfinite(sharp[name]))
    if not tuned:
        return []
    sharper = [name for _, _, name in tuned if sharp[name] > sharp[base]]
    per_attack = ""
    if any(seed >= 0 for _, seed, _ in tuned):
        counts = {XU_ATTACKS[i]: [0, 0] for i, _, _ in tuned}
        for i, _, name in tuned:
            counts[XU_ATTACKS[i]][0] += name in sharper
            counts[XU_ATTACKS[i]][1] += 1
        per_attack = " [per attack: " + ", ".join(f"{a} {k}/{m}" for a, (k, m) in counts.items()) + "]"
    return [f"- Xu et al. 2019 (fine-tuning sharpens the landscape): {len(sharper)} of {len(tuned)} adversarially "
            f"fine-tuned models have a sharper clean-loss surface than {base} ({', '.join(sharper) or 'none'})"
            f"{per_attack}; one run, one direction pair: an indication only."]


def _walter_line(clean: pd.DataFrame, adv: pd.DataFrame) -> str:
    """Walter et al.'s claim for one model: is kappa smaller on adversarial than on clean inputs?"""
    flatter = scipy.stats.mannwhitneyu(adv["relative_flatness"], clean["relative_flatness"], alternative="less")
    sharper = scipy.stats.mannwhitneyu(adv["relative_flatness"], clean["relative_flatness"], alternative="greater")
    verdict = ("SUPPORTED" if flatter.pvalue < 0.05 else
               "CONTRADICTED (adversarial inputs sit in SHARPER regions)" if sharper.pvalue < 0.05 else
               "INCONCLUSIVE")
    wrong = confidently_wrong(adv)
    return (f"- Walter et al. 2025 (adversarial examples sit in flatter regions): {verdict} for one model - "
            f"median relative flatness {adv['relative_flatness'].median():.3g} on adversarial vs "
            f"{clean['relative_flatness'].median():.3g} on clean inputs (one-sided Mann-Whitney "
            f"p = {min(flatter.pvalue, sharper.pvalue):.2g}, n = {len(adv)} images); {100 * wrong:.0f}% of the "
            "adversarial inputs are confidently (>= 0.9) wrong, and kappa is small exactly where the model is "
            "confident, so this tracks how confident the attack leaves it.")
