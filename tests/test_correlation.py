"""Correlation helpers: scipy's numbers, seeded bootstrap intervals that contain them, a readable summary."""

import math

import numpy as np
import pandas as pd
import pytest
import scipy.stats

from advkit.correlation import METHODS, Claim, correlate, correlation_table, summarize, verdict

SCIPY = {"pearson": scipy.stats.pearsonr, "spearman": scipy.stats.spearmanr, "kendall": scipy.stats.kendalltau}


@pytest.fixture(scope="module")
def pairs():
    rng = np.random.default_rng(0)
    x = rng.normal(size=25)
    return x, 0.8 * x + 0.5 * rng.normal(size=25)


@pytest.mark.parametrize("method", METHODS)
def test_reproduces_scipy_and_interval_contains_it(pairs, method):
    x, y = pairs
    res = correlate(x, y, method, n_resamples=500, seed=1)
    ref = SCIPY[method](x, y)
    assert res.statistic == pytest.approx(ref.statistic, rel=1e-12)
    assert res.pvalue == pytest.approx(ref.pvalue, rel=1e-9)
    assert res.ci_low < res.statistic < res.ci_high
    assert 0 < res.ci_low and res.ci_high <= 1 and res.n == 25 and res.ci_method == "BCa"
    assert correlate(x, y, method, n_resamples=500, seed=1) == res                    # seeded
    assert correlate(x, y, method, n_resamples=500, seed=2).ci_low != res.ci_low


def test_interval_matches_scipy_bootstrap(pairs):
    x, y = pairs
    res = correlate(x, y, "pearson", n_resamples=300, confidence_level=0.9, seed=5)
    ref = scipy.stats.bootstrap((x, y), lambda a, b: scipy.stats.pearsonr(a, b).statistic, paired=True,
                                vectorized=False, n_resamples=300, confidence_level=0.9,
                                rng=np.random.default_rng(5))
    assert res.ci_low == pytest.approx(ref.confidence_interval.low, rel=1e-9)
    assert res.ci_high == pytest.approx(ref.confidence_interval.high, rel=1e-9)


def test_few_and_degenerate_samples():
    nan = correlate([1.0, 2.0], [2.0, 1.0])
    assert math.isnan(nan.statistic) and math.isnan(nan.ci_low) and nan.n == 2
    ties = correlate([1, 2, 3, 4, 5], [1, 1, 1, 1, 2], "spearman", n_resamples=200)
    assert ties.statistic == pytest.approx(scipy.stats.spearmanr([1, 2, 3, 4, 5], [1, 1, 1, 1, 2]).statistic)
    assert ties.ci_method == "percentile" and ties.ci_low <= ties.statistic <= ties.ci_high


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
    assert "- avg: INCONCLUSIVE" in text and "no interval, n = 3 models" in text and "at least 4 models" in text
    assert "nan" not in text
