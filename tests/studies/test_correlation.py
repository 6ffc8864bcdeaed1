"""Correlation helpers: scipy's numbers, intervals that contain them and stay put under last-bit changes of the
inputs, explicit small-n behaviour, a readable summary; then notebook 05's report on the per-model table
(correlations over distinct weights, Stutz et al.'s Table 1, Walter et al.'s confidence summary, the summary)."""

import json
import math

import matplotlib
import numpy as np
import pandas as pd
import pytest
import scipy.stats

from advkit.studies import correlation as report
from advkit.studies.correlation import (
    BOOTSTRAP_MIN_N,
    METHODS,
    Claim,
    claim_verdict,
    claims_summary,
    correlate,
    correlation_table,
    fisher_interval,
    min_pairs,
)

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from advkit.plots.models import confidence_flatness_plot, flatness_through_training, model_scatter

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
    text = claims_summary(tab, claims)
    lines = text.splitlines()
    assert any(line.startswith("- avg: SUPPORTED - strong positive") and "Stutz" in line for line in lines)
    assert any(line.startswith("- worst: CONTRADICTED - strong negative") for line in lines)
    assert any(line.startswith("- eig: INCONCLUSIVE") and "includes 0" in line for line in lines)
    assert "Not tested" in text and "ssim" in text.split("Not tested")[1]
    assert "n = 12 models" in text
    small = correlation_table(df.head(5), ["robust_gap"], ["avg_case_flatness"], n_resamples=200)
    assert "Caution: at most 5 models" in claims_summary(small, claims)
    row = tab[(tab.flatness == "avg_case_flatness") & (tab.method == "spearman")].iloc[0]
    assert claim_verdict(row, +1) == "supported" and claim_verdict(row, -1) == "contradicted"


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
    text = claims_summary(tab, [Claim("avg", "robust_gap", "avg_case_flatness", +1)])
    assert "- avg: INCONCLUSIVE" in text and "no interval, n = 3 models" in text and "3 models are too few" in text
    assert "nan" not in text


# --- notebook 05's report ------------------------------------------------------------------------


def model_table(n=10, seed=0):
    rng = np.random.default_rng(seed)
    flat = rng.uniform(0.5, 2.0, n)
    names = ["base", "fgsm", "pgd", "stadv"] + [f"pgd_at_e{e:03d}" for e in range(1, n - 3)]
    table = pd.DataFrame({
        "family": [m.rsplit("_e", 1)[0] if "_e0" in m else m for m in names],
        "epoch": [15, 2, 2, 2] + list(range(1, n - 3)),
        "robust_loss_test": 1 + flat + 0.05 * rng.normal(size=n), "robust_loss_train": 1 + 0.5 * flat,
        "avg_case_flatness": flat, "worst_case_flatness": rng.normal(size=n), "hessian_top_eig": rng.normal(size=n),
        "surface_sharpness": [1.0, 2.0, 0.5, 3.0] + [np.nan] * (n - 4),
        "one_minus_ssim": [np.nan, 0.2, 0.1, 0.3] + [np.nan] * (n - 4),
    }, index=pd.Index(names, name="model"))
    table["robust_gap"] = table["robust_loss_test"] - table["robust_loss_train"]
    return table


def test_correlations_and_view():
    table = model_table()
    corr = report.correlations(table, n_resamples=200)
    assert not ((corr["robustness"] == corr["flatness"]).any())             # never with itself
    assert set(corr["robustness"]) == {"robust_loss_test", "robust_gap", "one_minus_ssim", "surface_sharpness"}
    ref = correlation_table(table, ["robust_loss_test"], ["avg_case_flatness"], n_resamples=200)
    got = corr[(corr.robustness == "robust_loss_test") & (corr.flatness == "avg_case_flatness")]
    np.testing.assert_allclose(got["statistic"], ref["statistic"])
    view = report.correlation_view(corr)
    assert (view[("", "n")] >= 3).all()
    assert view.loc[("robust_loss_test", "avg_case_flatness"), ("spearman", "statistic")] == pytest.approx(
        round(float(got[got.method == "spearman"]["statistic"].iloc[0]), 3))
    assert ("one_minus_ssim", "surface_sharpness") in view.index                 # 3 fine-tunes: a coefficient
    assert np.isnan(view.loc[("one_minus_ssim", "surface_sharpness"), ("spearman", "ci_low")])  # but no interval
    assert report.correlation_view(corr, min_n=100).empty
    with pytest.raises(ValueError, match="robustness columns"):
        report.correlations(table[["avg_case_flatness"]])


def test_available_pairs():
    table = model_table()
    table["hessian_trace"] = np.nan
    pairs = [("one_minus_ssim", "surface_sharpness"), ("surface_sharpness", "hessian_trace"), ("nope", "epoch")]
    assert report.available_pairs(table, pairs) == [("one_minus_ssim", "surface_sharpness")]
    assert report.available_pairs(table.iloc[[0]], pairs) == []                   # base has no 1 - SSIM


def test_trajectories():
    table = model_table()
    assert report.trajectories(table) == ["pgd_at"]
    assert report.trajectories(table.head(5)) == []


def confidence_tables():
    clean = pd.DataFrame({"confidence": [0.6, 0.7, 0.95, 0.8], "correct": [True, True, True, False],
                          "relative_flatness": [3.0, 2.0, 1.0, 4.0]})
    adv = pd.DataFrame({"confidence": [0.99, 0.95, 0.5, 0.97], "correct": [False, False, True, False],
                        "relative_flatness": [0.01, 0.02, 2.0, 0.03]})
    return clean, adv


def test_confidence_summary():
    table = report.confidence_summary(*confidence_tables())
    assert table.loc["clean", "accuracy"] == 0.75 and table.loc["adversarial", "accuracy"] == 0.25
    assert table.loc["adversarial", "confidently_wrong"] == 0.75 and table.loc["clean", "confidently_wrong"] == 0
    assert table.loc["adversarial", "median_relative_flatness"] == pytest.approx(0.025)


def corr_none():
    return correlation_table(model_table().head(1), ["robust_gap"], ["avg_case_flatness"], n_resamples=20)


def test_summary_is_honest_about_few_models():
    table = model_table()
    text = report.summary(table, report.correlations(table, n_resamples=500), confidence_tables())
    assert text.startswith("10 models measured")
    assert "lower test robust loss: SUPPORTED" in text                         # built in: RLoss grows with flat
    assert "2 of 3 adversarially fine-tuned models have a sharper clean-loss surface than base (fgsm, stadv)" in text
    assert "Walter et al. 2025" in text and "75% of the adversarial inputs" in text
    assert "How far to trust this: 10 models" in text and "6 of them are checkpoints" in text
    clean, adv = (pd.concat([t] * 5, ignore_index=True) for t in confidence_tables())
    assert "flatter regions): SUPPORTED" in report.summary(table.head(1), corr_none(), (clean, adv))
    assert "flatter regions): CONTRADICTED" in report.summary(table.head(1), corr_none(), (adv, clean))
    assert "flatter regions): INCONCLUSIVE" in report.summary(table.head(1), corr_none(), (clean, clean))
    one = table.head(1)
    text = report.summary(one, correlation_table(one, ["robust_gap"], ["avg_case_flatness"], n_resamples=20))
    assert "1 model measured" in text and "too few" in text and "SUPPORTED" not in text


def test_figures():
    table = model_table()
    fig = model_scatter(table, [("avg_case_flatness", "robust_loss_test"),
                                             ("one_minus_ssim", "surface_sharpness"), ("nope", "robust_gap")])
    titles = [ax.get_title() for ax in fig.axes[:3]]
    assert titles[0].startswith("Spearman ρ = ") and "(n = 10)" in titles[0]
    assert "(n = 3)" in titles[1]
    assert fig.axes[2].texts[0].get_text() == "no models with both values"
    fig = flatness_through_training(table, {"pgd_at": pd.DataFrame(
        {"epoch": [1, 2, 3], "train_robust_loss": [1, 0.9, 0.8], "test_robust_loss": [1.1, 1.0, 1.05]})})
    assert len(fig.axes) == 3 and fig.axes[1].get_xlabel() == "epoch"
    with pytest.raises(ValueError, match="two or more epochs"):
        flatness_through_training(table.head(4))
    fig = confidence_flatness_plot(*confidence_tables())
    assert [ax.get_title() for ax in fig.axes] == ["clean inputs", "adversarial inputs"]
    plt.close("all")


def test_early_weights_equal_to_the_final_ones_count_once_in_correlations():
    """`trades_early` stopped at trades' last epoch: the same weights, so one point, not two."""
    rng = np.random.default_rng(0)
    names = ["base", "pgd", "pgd_at", "pgd_at_early", "trades", "trades_early"]
    epochs = [15, 3, 10, 6, 10, 10]
    table = pd.DataFrame({"epoch": epochs, "robust_loss_test": rng.random(6), "avg_case_flatness": rng.random(6)},
                         index=pd.Index(names, name="model"))
    kept = report.distinct_models(table)
    assert list(kept.index) == ["base", "pgd", "pgd_at", "pgd_at_early", "trades"]
    corr = report.correlations(table, robustness=["robust_loss_test"], flatness=["avg_case_flatness"],
                            methods=("spearman",))
    assert set(corr["n"]) == {5}


def test_early_stopping_table_by_hand():
    """Stutz et al. Table 1 from four made-up rows: pgd_at stopped at epoch 3 with flatness 0.8 < 1.2 (flatter),
    trades at epoch 4 with 0.9 > 0.7 (sharper), mart's early copy is its last epoch (the same weights: NaN)."""
    names = ["base", "pgd_at", "pgd_at_early", "trades", "trades_early", "mart", "mart_early"]
    table = pd.DataFrame({"epoch": [15, 10, 3, 10, 4, 10, 10],
                          "robust_err": [0.9, 0.6, 0.5, 0.55, 0.52, 0.7, 0.7],
                          "robust_err_train": [0.9, 0.2, 0.4, 0.3, 0.35, 0.5, 0.5],
                          "robust_loss_test": [3.0, 2.0, 1.5, 1.8, 1.7, 2.2, 2.2],
                          "avg_case_flatness": [0.1, 1.2, 0.8, 0.7, 0.9, 0.5, 0.5]},
                         index=pd.Index(names, name="model"))
    paired = report.early_stopping_table(table)
    assert list(paired.index) == ["pgd_at", "trades", "mart"]
    assert paired.loc["pgd_at"].to_dict() == {
        "robust_err": 0.6, "robust_err_train": 0.2, "avg_case_flatness": 1.2, "robust_loss_test": 2.0,
        "early_epoch": 3, "early_robust_err": 0.5, "early_robust_loss_test": 1.5, "early_avg_case_flatness": 0.8,
        "early_flatter": True}
    assert paired.at["trades", "early_flatter"] == False  # noqa: E712 (a numpy/pandas bool, not None or NaN)
    assert paired.at["trades", "early_epoch"] == 4 and paired.at["trades", "early_robust_err"] == 0.52
    assert np.isnan(paired.at["mart", "early_flatter"])
    assert list(report.distinct_models(table).index) == names[:-1]          # mart_early is mart's weights


def test_overview_and_settings():
    table = model_table().assign(settings=json.dumps({"n_eval": 24, "version": 2}), clean_acc=0.123456)
    view = report.overview(table)
    assert list(view.columns[:2]) == ["epoch", "clean_acc"] and "family" not in view.columns
    assert view["clean_acc"].eq(0.123).all()
    assert report.table_settings(table).to_dict() == {"n_eval": 24, "version": 2}
    table.loc["base", "settings"] = json.dumps({"n_eval": 12, "version": 2})
    with pytest.raises(ValueError, match="2 different settings"):
        report.table_settings(table)


# --- zoo scale (issue 13) --------------------------------------------------------------------------


def _kendall_unchunked(a, b):
    """The bootstrap's Kendall tau-b before it was chunked: all resamples' pair signs at once."""
    sa, sb = np.sign(a[..., :, None] - a[..., None, :]), np.sign(b[..., :, None] - b[..., None, :])
    with np.errstate(invalid="ignore", divide="ignore"):
        return (sa * sb).sum((-2, -1)) / np.sqrt((sa * sa).sum((-2, -1)) * (sb * sb).sum((-2, -1)))


@pytest.mark.parametrize("budget", [report.PAIR_BUDGET, 100, 1])
def test_chunked_bootstrap_gives_the_same_interval_as_before(monkeypatch, budget):
    """The same seed gives bit for bit the interval of the unchunked bootstrap, whatever the chunk."""
    monkeypatch.setattr(report, "PAIR_BUDGET", budget)
    rng = np.random.default_rng(3)
    x = rng.normal(size=40)
    y = 0.5 * x + rng.normal(size=40)
    y[:5] = np.round(y[:5])                                                        # ties
    res = correlate(x, y, "kendall", ci="bootstrap", n_resamples=500, seed=7)
    assert (res.ci_low, res.ci_high) == (0.11874942276181898, 0.5117245260392985)  # as computed before chunking
    a, b = rng.normal(size=(2, 37, 12)).round(1)
    np.testing.assert_array_equal(report._kendall_tau_b(a, b), _kendall_unchunked(a, b))
    assert report._kendall_tau_b(a[0], b[0]) == _kendall_unchunked(a[0], b[0])


def test_bootstrap_memory_is_bounded_at_300_models():
    """Unchunked, 60 resamples of 300 models held 3 × 60 × 300² float64 pair signs (130 MB)."""
    import tracemalloc

    rng = np.random.default_rng(0)
    x = rng.normal(size=300)
    y = x + rng.normal(size=300)
    tracemalloc.start()
    try:
        res = correlate(x, y, "kendall", ci="bootstrap", n_resamples=60)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert res.ci_low < res.statistic < res.ci_high
    assert peak < 40 * 2 ** 20, f"peak {peak / 2 ** 20:.0f} MiB"


def test_replicates_of_xu_fine_tunes_count_each():
    """`fgsm_s1` is replicate 1 of the FGSM fine-tune: every replicate counts, copies do not."""
    sharp = {"base": 1.0, "fgsm_s0": 2.0, "fgsm_s1": 0.5, "pgd_s0": 3.0, "stadv_s0": 0.2, "fgsm_s1_early": 9.0,
             "pgd_at_s0": 5.0}
    table = pd.DataFrame({"surface_sharpness": sharp.values()}, index=pd.Index(sharp.keys(), name="model"))
    line = report._xu_line(table, "base")[0]
    assert "2 of 4 adversarially fine-tuned models have a sharper clean-loss surface than base " \
           "(fgsm_s0, pgd_s0) [per attack: fgsm 1/2, pgd 1/1, stadv 0/1]" in line
    plain = report._xu_line(model_table(), "base")[0]                       # plain names: as before
    assert "2 of 3 adversarially fine-tuned models have a sharper clean-loss surface than base (fgsm, stadv);" in plain
    text = report.summary(table.assign(robust_loss_test=range(7), avg_case_flatness=range(7)),
                          report.correlations(table.assign(robust_loss_test=range(7), avg_case_flatness=range(7))))
    assert "7 models from 2 seeds" in text
