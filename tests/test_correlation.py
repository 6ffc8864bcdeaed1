"""Correlation helpers: scipy's numbers, intervals that contain them and stay put under last-bit changes of the
inputs, explicit small-n behaviour, a readable summary."""

import math

import numpy as np
import pandas as pd
import pytest
import scipy.stats

from advkit.correlation import (BOOTSTRAP_MIN_N, METHODS, Claim, correlate, correlation_table, fisher_interval,
                                min_pairs, summarize, verdict)

SCIPY = {"pearson": scipy.stats.pearsonr, "spearman": scipy.stats.spearmanr, "kendall": scipy.stats.kendalltau}


@pytest.fixture(scope="module")
def pairs():
    rng = np.random.default_rng(0)
    x = rng.normal(size=25)
    return x, 0.8 * x + 0.5 * rng.normal(size=25)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("ci", ["fisher", "bootstrap"])
def test_reproduces_scipy_and_interval_contains_it(pairs, method, ci):
    x, y = pairs
    res = correlate(x, y, method, ci=ci, n_resamples=500, seed=1)
    ref = SCIPY[method](x, y)
    assert res.statistic == pytest.approx(ref.statistic, rel=1e-12)
    assert res.pvalue == pytest.approx(ref.pvalue, rel=1e-9)
    assert res.ci_low < res.statistic < res.ci_high
    assert 0 < res.ci_low and res.ci_high <= 1 and res.n == 25
    assert res.ci_method == {"fisher": "fisher-z", "bootstrap": "percentile"}[ci]
    assert correlate(x, y, method, ci=ci, n_resamples=500, seed=1) == res                    # seeded
    if ci == "bootstrap":
        assert correlate(x, y, method, ci=ci, n_resamples=500, seed=2).ci_low != res.ci_low


def test_fisher_interval_is_scipys_for_pearson(pairs):
    x, y = pairs
    res = correlate(x, y, "pearson", confidence_level=0.9)
    ref = scipy.stats.pearsonr(x, y).confidence_interval(0.9)
    assert (res.ci_low, res.ci_high) == pytest.approx((ref.low, ref.high), rel=1e-12)


@pytest.mark.parametrize("method", METHODS)
def test_fisher_interval_covers_the_true_coefficient(method):
    """About 95% of the 95% intervals contain the population coefficient (bivariate normal, rho = 0.6, n = 12):
    the Bonett-Wright / Fieller standard errors are the right size for rank correlations too."""
    rho, n, trials = 0.6, 12, 400
    truth = {"pearson": rho, "spearman": 6 / math.pi * math.asin(rho / 2), "kendall": 2 / math.pi * math.asin(rho)}
    rng = np.random.default_rng(7)
    cov = [[1, rho], [rho, 1]]
    hits = 0
    for _ in range(trials):
        x, y = rng.multivariate_normal([0, 0], cov, size=n).T
        res = correlate(x, y, method)
        hits += res.ci_low <= truth[method] <= res.ci_high
    assert 0.91 <= hits / trials <= 0.99


def test_percentile_interval_matches_scipy_bootstrap(pairs):
    x, y = pairs
    res = correlate(x, y, "pearson", ci="bootstrap", n_resamples=300, confidence_level=0.9, seed=5)
    ref = scipy.stats.bootstrap((x, y), lambda a, b: scipy.stats.pearsonr(a, b).statistic, paired=True,
                                vectorized=False, n_resamples=300, confidence_level=0.9, method="percentile",
                                rng=np.random.default_rng(5))
    assert res.ci_low == pytest.approx(ref.confidence_interval.low, rel=1e-9)
    assert res.ci_high == pytest.approx(ref.confidence_interval.high, rel=1e-9)


def _ulp_neighbours(v: np.ndarray):
    """v with one entry moved by 1 or 2 ulps up or down: what another CPU's BLAS kernel does to a fitted value."""
    for i in range(len(v)):
        for direction in (np.inf, -np.inf):
            w = v.copy()
            w[i] = np.nextafter(w[i], direction)
            yield w
            w[i] = np.nextafter(w[i], direction)
            yield w


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("ci", ["fisher", "bootstrap"])
def test_interval_is_stable_under_ulp_perturbations(method, ci):
    """Issue 9: with n = 6 models an ulp moved a BCa bound from 0.973 to 0.981 on another CPU. Now the bounds
    move by rounding only, for the smallest n each method gives an interval at."""
    n = min_pairs(method, ci) + 2
    rng = np.random.default_rng(11)
    x = rng.normal(size=n)
    y = 0.9 * x + 0.3 * rng.normal(size=n)          # strong correlation, bounds near 1: where BCa was chaotic
    ref = correlate(x, y, method, ci=ci, n_resamples=2000, seed=0)
    assert math.isfinite(ref.ci_low) and math.isfinite(ref.ci_high)
    for y2 in _ulp_neighbours(y):
        res = correlate(x, y2, method, ci=ci, n_resamples=2000, seed=0)
        assert res.ci_low == pytest.approx(ref.ci_low, abs=1e-12)
        assert res.ci_high == pytest.approx(ref.ci_high, abs=1e-12)
    for x2 in _ulp_neighbours(x):
        res = correlate(x2, y, method, ci=ci, n_resamples=2000, seed=0)
        assert (res.ci_low, res.ci_high) == pytest.approx((ref.ci_low, ref.ci_high), abs=1e-12)


def test_small_n_is_explicit():
    assert [min_pairs(m) for m in METHODS] == [4, 4, 5]
    assert all(min_pairs(m, "bootstrap") == BOOTSTRAP_MIN_N for m in METHODS)
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=10), rng.normal(size=10)
    for method in METHODS:
        for ci in ("fisher", "bootstrap"):
            k = min_pairs(method, ci)
            below = correlate(x[:k - 1], y[:k - 1], method, ci=ci, n_resamples=200)
            at = correlate(x[:k], y[:k], method, ci=ci, n_resamples=200)
            assert math.isfinite(below.statistic) and below.ci_method == "none"
            assert math.isnan(below.ci_low) and math.isnan(below.ci_high)
            assert at.ci_method != "none" and at.ci_low <= at.statistic <= at.ci_high
    with pytest.raises(ValueError, match="n >= 5"):
        fisher_interval("kendall", 0.5, 4)
    perfect = correlate([1, 2, 3, 4, 5], [2, 4, 5, 7, 9], "spearman")       # rho = 1: degenerate, not NaN
    assert (perfect.statistic, perfect.ci_low, perfect.ci_high) == pytest.approx((1, 1, 1), abs=1e-12)


def test_few_and_degenerate_samples():
    nan = correlate([1.0, 2.0], [2.0, 1.0])
    assert math.isnan(nan.statistic) and math.isnan(nan.ci_low) and nan.n == 2
    xs, ys = [1, 2, 3, 4, 5, 6, 7, 8], [1, 1, 1, 1, 1, 1, 1, 2]
    ties = correlate(xs, ys, "spearman", ci="bootstrap", n_resamples=200)
    assert ties.statistic == pytest.approx(scipy.stats.spearmanr(xs, ys).statistic)
    assert ties.ci_method == "percentile" and -1 <= ties.ci_low <= ties.ci_high <= 1   # over the finite resamples
    constant = correlate(xs, [3.0] * 8, "pearson")
    assert math.isnan(constant.statistic) and constant.ci_method == "none"


def test_bad_input(pairs):
    x, y = pairs
    with pytest.raises(ValueError, match="method"):
        correlate(x, y, "cosine")
    with pytest.raises(ValueError, match="equal length"):
        correlate(x, y[:-1])
    with pytest.raises(ValueError, match="n_resamples"):
        correlate(x, y, n_resamples=0)
    with pytest.raises(ValueError, match="confidence_level"):
        correlate(x, y, confidence_level=95)
    with pytest.raises(ValueError, match=r"ci='bca'.*fisher"):
        correlate(x, y, ci="bca")
    with pytest.raises(ValueError, match=r"flatness: columns \['sharp'\]"):
        correlation_table(pd.DataFrame({"a": x}), ["a"], ["sharp"])


def table_of_models():
    rng = np.random.default_rng(3)
    n = 12
    gap = rng.uniform(0.1, 0.5, n)
    return pd.DataFrame({
        "model": [f"m{i}" for i in range(n)],
        "robust_gap": gap,
        "avg_case_flatness": 3 * gap + 0.05 * rng.normal(size=n),       # supports the claim
        "worst_case_flatness": -2 * gap + 0.05 * rng.normal(size=n),    # contradicts it
        "hessian_top_eig": rng.normal(size=n),                           # no relation
        "surface_sharpness": [np.nan, np.nan] + list(rng.normal(size=n - 2)),
    })


def test_tidy_table():
    df = table_of_models()
    tab = correlation_table(df, ["robust_gap", "surface_sharpness"],
                            ["avg_case_flatness", "worst_case_flatness", "hessian_top_eig"], n_resamples=200)
    assert len(tab) == 2 * 3 * 3
    assert list(tab.columns[:8]) == ["robustness", "flatness", "method", "n", "statistic", "pvalue", "ci_low",
                                     "ci_high"]
    assert set(tab.loc[tab.robustness == "surface_sharpness", "n"]) == {10}      # NaN rows dropped pairwise
    row = tab[(tab.robustness == "robust_gap") & (tab.flatness == "avg_case_flatness") & (tab.method == "kendall")]
    assert row.iloc[0]["statistic"] == pytest.approx(
        scipy.stats.kendalltau(df.robust_gap, df.avg_case_flatness).statistic)


def test_summary_states_verdicts():
    df = table_of_models()
    tab = correlation_table(df, ["robust_gap", "surface_sharpness"],
                            ["avg_case_flatness", "worst_case_flatness", "hessian_top_eig"], n_resamples=500)
    claims = [Claim("avg", "robust_gap", "avg_case_flatness", +1, "Stutz"),
              Claim("worst", "robust_gap", "worst_case_flatness", +1),
              Claim("eig", "robust_gap", "hessian_top_eig", +1),
              Claim("ssim", "one_minus_ssim", "surface_sharpness", +1)]
    text = summarize(tab, claims)
    lines = text.splitlines()
    assert any(line.startswith("- avg: SUPPORTED - strong positive") and "Stutz" in line for line in lines)
    assert any(line.startswith("- worst: CONTRADICTED - strong negative") for line in lines)
    assert any(line.startswith("- eig: INCONCLUSIVE") and "includes 0" in line for line in lines)
    assert "Not tested" in text and "ssim" in text.split("Not tested")[1]
    assert "n = 12 models" in text
    small = correlation_table(df.head(5), ["robust_gap"], ["avg_case_flatness"], n_resamples=200)
    assert "Caution: at most 5 models" in summarize(small, claims)
    row = tab[(tab.flatness == "avg_case_flatness") & (tab.method == "spearman")].iloc[0]
    assert verdict(row, +1) == "supported" and verdict(row, -1) == "contradicted"


def test_a_column_is_never_correlated_with_itself():
    df = table_of_models()
    tab = correlation_table(df, ["robust_gap", "surface_sharpness"], ["surface_sharpness", "hessian_top_eig"],
                            methods=["spearman"], n_resamples=50)
    pairs = list(zip(tab["robustness"], tab["flatness"]))
    assert pairs == [("robust_gap", "surface_sharpness"), ("robust_gap", "hessian_top_eig"),
                     ("surface_sharpness", "hessian_top_eig")]


def test_summary_without_an_interval_says_so():
    df = table_of_models().head(3)
    tab = correlation_table(df, ["robust_gap"], ["avg_case_flatness"], n_resamples=50)
    text = summarize(tab, [Claim("avg", "robust_gap", "avg_case_flatness", +1)])
    assert "- avg: INCONCLUSIVE" in text and "no interval, n = 3 models" in text and "3 models are too few" in text
    assert "nan" not in text
