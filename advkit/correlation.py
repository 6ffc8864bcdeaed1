"""Correlation of robustness with flatness across models, with bootstrap confidence intervals.

Pearson, Spearman and Kendall coefficients come from scipy.stats; their confidence
intervals from a paired, seeded `scipy.stats.bootstrap` over models (BCa, falling back to
percentiles of the non-degenerate resamples when BCa is undefined, e.g. with few models
and ties). `correlation_table` makes one tidy DataFrame for a per-model table;
`summarize` turns it into a few plain sentences: which expected relations (`Claim`) the
numbers support, contradict or leave open, and how confidently.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
import scipy.stats

METHODS = ("pearson", "spearman", "kendall")


@dataclass(frozen=True)
class CorrelationResult:
    """A correlation coefficient, its p-value and bootstrap confidence interval over n pairs."""

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
    a = a - a.mean(-1, keepdims=True)
    b = b - b.mean(-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (a * b).sum(-1) / np.sqrt((a * a).sum(-1) * (b * b).sum(-1))


def _kendall_tau_b(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    sa = np.sign(a[..., :, None] - a[..., None, :])
    sb = np.sign(b[..., :, None] - b[..., None, :])
    with np.errstate(invalid="ignore", divide="ignore"):
        return (sa * sb).sum((-2, -1)) / np.sqrt((sa * sa).sum((-2, -1)) * (sb * sb).sum((-2, -1)))


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


def correlate(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray, method: str = "spearman", *,
              n_resamples: int = 2000, confidence_level: float = 0.95, seed: int = 0) -> CorrelationResult:
    """Correlation of paired samples x, y with a seeded paired-bootstrap confidence interval.

    Needs >= 3 pairs for a coefficient and >= 4 for an interval (else NaN).
    """
    _check_method(method)
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
    if n >= 4 and math.isfinite(stat):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = _bootstrap((x, y), _vectorized(method), paired=True, vectorized=True, n_resamples=n_resamples,
                             confidence_level=confidence_level, method="BCa", seed=seed)
        lo, hi = float(res.confidence_interval.low), float(res.confidence_interval.high)
        ci_method = "BCa"
        if not (math.isfinite(lo) and math.isfinite(hi)):
            dist = res.bootstrap_distribution
            dist = dist[np.isfinite(dist)]
            if len(dist) >= 10:
                alpha = (1 - confidence_level) / 2
                lo, hi = (float(v) for v in np.quantile(dist, [alpha, 1 - alpha]))
                ci_method = "percentile"
            else:
                lo = hi = nan
    return CorrelationResult(method, stat, p, lo, hi, n, confidence_level, ci_method)


def correlation_table(table: pd.DataFrame, robustness: Sequence[str], flatness: Sequence[str], *,
                      methods: Sequence[str] = METHODS, n_resamples: int = 2000, confidence_level: float = 0.95,
                      seed: int = 0) -> pd.DataFrame:
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
    rows = []
    for r in robustness:
        for f in flatness:
            if f == r:
                continue
            pair = table[[r, f]].apply(pd.to_numeric, errors="coerce").dropna()
            for m in methods:
                res = correlate(pair[r].to_numpy(), pair[f].to_numpy(), m, n_resamples=n_resamples,
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


def verdict(result: pd.Series | CorrelationResult, sign: int) -> str:
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


def summarize(table: pd.DataFrame, claims: Sequence[Claim] = SEED_CLAIMS, *, method: str = "spearman") -> str:
    """A short plain-language summary of `correlation_table` output for the given claims.

    One line per claim whose columns were correlated: verdict, coefficient with its
    bootstrap interval and n; claims without data are listed as not tested.
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
        v = verdict(row, c.sign)
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
                     "; a bootstrap interval needs at least 4 models, so the data neither confirm nor refute it")
        lines.append(text)
    header = f"Correlations over models ({method}, bootstrap intervals):"
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
