"""The per-model table of notebook 05: metrics, cache, merged columns, correlations, summary and figures."""

import json

import matplotlib
import numpy as np
import pandas as pd
import pytest
import torch

from advkit import zoo
from advkit.correlation import correlation_table
from advkit.models import get_model
from advkit.runs import save_model

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import advkit.plots  # noqa: E402

TINY = zoo.ZooSettings(dataset="digits", n_eval=24, pgd_eps=0.1, pgd_steps=2, pgd_alpha=None, pgd_restarts=1,
                       n_autoattack=24, aa_steps=5, flatness_samples=2, worst_steps=2, hessian_iters=3,
                       hessian_samples=3)


def save(run, name, seed, **extra):
    torch.manual_seed(seed)
    model = get_model("small_cnn", 10, 1, width=4)
    save_model(run / "models" / f"{name}.pt", model, {"seed": seed}, **extra)
    return model


@pytest.fixture()
def run(tmp_path):
    run = tmp_path / "run"
    save(run, "base", 0, epoch=15)
    save(run, "fgsm", 1, epoch=2)
    save(run, "pgd_at_e001", 2)
    return run


def test_empty_run_directory_is_a_clear_error(tmp_path, digits):
    with pytest.raises(ValueError, match="no models in .*empty"):
        zoo.flatness_table(tmp_path / "nothing", digits, TINY, progress=False)
    (tmp_path / "empty" / "models").mkdir(parents=True)
    with pytest.raises(ValueError, match="no models"):
        zoo.flatness_table(tmp_path / "empty", digits, TINY, progress=False)


def test_settings_are_checked_and_keyed():
    for bad in ({"n_eval": 0}, {"pgd_steps": 1.5}, {"pgd_eps": -0.1}, {"pgd_eps": 2.0}, {"flatness_xi": -1},
                {"hessian_backend": "fast"}, {"seed": -1}, {"flatness_samples": True}, {"trace_method": "exact"}):
        name = next(iter(bad))
        with pytest.raises(ValueError, match=name):
            zoo.ZooSettings(**bad)
    with pytest.raises(ValueError, match="hessian_samples"):
        zoo.ZooSettings(hessian_samples=2)
    assert zoo.ZooSettings(hessian_samples=2, trace_method="hutchinson").hessian_samples == 2
    assert zoo.ZooSettings().key() == zoo.ZooSettings().key()
    assert zoo.ZooSettings().key() != zoo.ZooSettings(worst_steps=3).key()
    assert json.loads(TINY.key())["version"] == zoo.ZOO_VERSION
    for bad in ({"pgd_restarts": 0}, {"n_autoattack": -1}, {"pgd_alpha": 0.0}, {"aa_steps": 0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            zoo.ZooSettings(**bad)


def test_default_settings_are_stutz_et_al_evaluation():
    """RLoss: PGD-20, step 0.007, 10 restarts at 8/255 on the first 1000 images (STUTZ2021 preset); RErr: AutoAttack."""
    from advkit.evaluate import STUTZ2021

    s = zoo.ZooSettings()
    pgd = STUTZ2021.attacks["pgd"].params
    assert s.attack().keywords == {"eps": pgd["eps"], "alpha": pgd["alpha"], "steps": pgd["steps"],
                                   "restarts": pgd["restarts"], "seed": 0}
    assert s.attack(restarts=1).keywords["restarts"] == 1  # what flatness re-runs at perturbed weights
    assert s.n_eval == STUTZ2021.n_test == s.n_autoattack
    assert s.robust_error_attack().func.__name__ == "autoattack"


def test_more_restarts_never_weaken_the_robust_loss_attack(trained_cnn, digits_test):
    x, y = digits_test[0][:64], digits_test[1][:64]
    one = zoo.ZooSettings(pgd_eps=0.1, pgd_steps=3, pgd_alpha=None, pgd_restarts=1).attack()
    three = zoo.ZooSettings(pgd_eps=0.1, pgd_steps=3, pgd_alpha=None, pgd_restarts=3).attack()
    wrong1 = (trained_cnn(one(trained_cnn, x, y)).argmax(1) != y).sum()
    wrong3 = (trained_cnn(three(trained_cnn, x, y)).argmax(1) != y).sum()
    assert wrong3 >= wrong1


def test_split_name():
    assert zoo.split_name("pgd_at_e002") == ("pgd_at", 2)
    assert zoo.split_name("pgd_at") == ("pgd_at", None)
    assert zoo.split_name("base") == ("base", None)
    assert zoo.split_name("model_e12") == ("model_e12", None)
    assert zoo.split_name("pgd_at_early") == ("pgd_at_early", None)  # a model of its own, not an epoch


def test_early_stopped_models_are_zoo_members(run, digits):
    from advkit.runs import list_models

    save(run, "pgd_at", 3, epoch=6)
    save(run, "pgd_at_early", 4, epoch=3, early_stopped=True, select="val_robust_loss")
    assert list_models(run) == ["base", "fgsm", "pgd_at", "pgd_at_early"]
    table = zoo.flatness_table(run, digits, TINY, progress=False, models=["pgd_at", "pgd_at_early", "pgd_at_e001"])
    assert table.loc["pgd_at_early", ["family", "epoch", "early_stopped"]].tolist() == ["pgd_at_early", 3, True]
    assert not table.loc["pgd_at", "early_stopped"]
    assert zoo.trajectories(table) == ["pgd_at"]  # pgd_at_e001 and the final pgd_at (epoch 6); early apart
    paired = zoo.early_stopping_table(table)
    assert list(paired.index) == ["pgd_at"] and paired.at["pgd_at", "early_epoch"] == 3
    assert paired.at["pgd_at", "early_avg_case_flatness"] == round(table.at["pgd_at_early", "avg_case_flatness"], 3)
    assert paired.at["pgd_at", "early_flatter"] == (table.at["pgd_at_early", "avg_case_flatness"]
                                                    < table.at["pgd_at", "avg_case_flatness"])
    same = table.assign(epoch=[6 if n.startswith("pgd_at") else e for n, e in zip(table.index, table["epoch"])])
    assert np.isnan(zoo.early_stopping_table(same).at["pgd_at", "early_flatter"])  # early stopping kept the last epoch


def test_table_metrics_are_consistent(run, digits):
    table = zoo.flatness_table(run, digits, TINY, progress=False)
    assert list(table.index) == ["base", "fgsm", "pgd_at_e001"]
    assert table.loc["pgd_at_e001", ["family", "epoch"]].tolist() == ["pgd_at", 1]
    assert table.loc["base", "epoch"] == 15
    assert (table["robust_loss_test"] >= table["clean_loss_test"]).all()
    np.testing.assert_allclose(table["robust_gap"], table["robust_loss_test"] - table["robust_loss_train"])
    # the average-case reference loss is the same PGD on the same images: the test RLoss
    np.testing.assert_allclose(table["avg_case_flatness_loss"], table["robust_loss_test"], rtol=1e-5)
    assert (table["avg_case_flatness_attack"].str.contains("pgd")).all()
    assert (table["avg_case_flatness_n_data"] == 24).all() and (table["hessian_trace_n_samples"] == 3).all()
    assert (table["hessian_trace_method"] == "hutchpp").all() and (table["hessian_top_eig_iters"] == 3).all()
    assert (table["robust_acc"] <= table["clean_acc"]).all()
    # RErr: AutoAttack on all 24 images can only add errors to the clean ones
    assert ((table["robust_err"] >= 1 - table["clean_acc"] - 1e-9) & (table["robust_err"] <= 1)).all()
    assert ((table["robust_err_train"] >= 1 - table["clean_acc_train"] - 1e-9)).all()
    # flatness on train and test subsets (Stutz et al. Fig. 7): both measured, on different images
    assert table["avg_case_flatness_train"].notna().all()
    assert (table["avg_case_flatness_train"] != table["avg_case_flatness"]).any()
    assert table["one_minus_ssim"].isna().all() and table["surface_sharpness"].isna().all()
    on_disk = pd.read_csv(run / "flatness.csv", index_col="model")
    assert list(on_disk.index) == list(table.index) and "settings" in on_disk


def test_cache_recomputes_only_what_changed(run, digits, monkeypatch):
    first = zoo.flatness_table(run, digits, TINY, progress=False)
    calls = []
    original = zoo.model_metrics

    def counting(model, train, test, settings):
        calls.append(settings)
        return original(model, train, test, settings)

    monkeypatch.setattr(zoo, "model_metrics", counting)
    again = zoo.flatness_table(run, digits, TINY, progress=False)
    assert calls == []
    pd.testing.assert_frame_equal(again, first, check_dtype=False)
    save(run, "fgsm", 5, epoch=2)                                  # retrained: new checkpoint hash
    changed = zoo.flatness_table(run, digits, TINY, progress=False)
    assert len(calls) == 1
    assert changed.at["fgsm", "robust_loss_test"] != first.at["fgsm", "robust_loss_test"]
    assert changed.at["base", "robust_loss_test"] == first.at["base", "robust_loss_test"]
    other = zoo.ZooSettings(**{**vars(TINY), "worst_steps": 1})
    zoo.flatness_table(run, digits, other, progress=False, models=["base"])
    assert len(calls) == 2
    on_disk = pd.read_csv(run / "flatness.csv", index_col="model")
    assert list(on_disk.index) == ["base", "fgsm", "pgd_at_e001"]   # rows not asked for are kept
    zoo.flatness_table(run, digits, TINY, progress=False, recompute=True)
    assert len(calls) == 5
    with pytest.raises(ValueError, match="not in"):
        zoo.flatness_table(run, digits, TINY, progress=False, models=["nope"])
    with pytest.raises(ValueError, match="dataset"):
        zoo.flatness_table(run, digits, zoo.ZooSettings(dataset="cifar10"), progress=False)


def test_attach_run_results(run):
    table = pd.DataFrame({"robust_loss_test": [1.0, 2.0, 3.0, 4.0]},
                         index=pd.Index(["base", "fgsm", "fgsm_e001", "trades"], name="model"))
    bare = zoo.attach_run_results(table, run)
    assert bare[list(zoo.MERGED)].isna().all().all()
    (run / "attacks").mkdir()
    pd.DataFrame({"fgsm": [0.2], "pgd": [0.1], "stadv": [0.3]},
                 index=pd.Index(["base"], name="model")).to_csv(run / "attacks" / "table2_ssim_distance.csv")
    (run / "landscapes").mkdir()
    pd.DataFrame({"surface_sharpness": [1.0, 2.5], "loss_mean_increase": [0.1, 0.4]},
                 index=pd.Index(["base", "fgsm"], name="model")).to_csv(run / "landscapes" / "sharpness.csv")
    full = zoo.attach_run_results(bare, run)
    assert full["one_minus_ssim"].tolist()[1:3] == [0.2, 0.2]
    assert np.isnan(full.at["base", "one_minus_ssim"]) and np.isnan(full.at["trades", "one_minus_ssim"])
    assert full["surface_sharpness"].tolist()[:2] == [1.0, 2.5] and np.isnan(full.at["trades", "surface_sharpness"])
    assert full.at["fgsm", "surface_mean_increase"] == 0.4 and full["robust_surface_sharpness"].isna().all()
    assert list(full.index) == list(table.index)


def model_table(n=10, seed=0):
    rng = np.random.default_rng(seed)
    flat = rng.uniform(0.5, 2.0, n)
    names = ["base", "fgsm", "pgd", "stadv"] + [f"pgd_at_e{e:03d}" for e in range(1, n - 3)]
    table = pd.DataFrame({
        "family": [zoo.split_name(m)[0] for m in names], "epoch": [15, 2, 2, 2] + list(range(1, n - 3)),
        "robust_loss_test": 1 + flat + 0.05 * rng.normal(size=n), "robust_loss_train": 1 + 0.5 * flat,
        "avg_case_flatness": flat, "worst_case_flatness": rng.normal(size=n), "hessian_top_eig": rng.normal(size=n),
        "surface_sharpness": [1.0, 2.0, 0.5, 3.0] + [np.nan] * (n - 4),
        "one_minus_ssim": [np.nan, 0.2, 0.1, 0.3] + [np.nan] * (n - 4),
    }, index=pd.Index(names, name="model"))
    table["robust_gap"] = table["robust_loss_test"] - table["robust_loss_train"]
    return table


def test_correlations_and_view():
    table = model_table()
    corr = zoo.correlations(table, n_resamples=200)
    assert not ((corr["robustness"] == corr["flatness"]).any())             # never with itself
    assert set(corr["robustness"]) == {"robust_loss_test", "robust_gap", "one_minus_ssim", "surface_sharpness"}
    ref = correlation_table(table, ["robust_loss_test"], ["avg_case_flatness"], n_resamples=200)
    got = corr[(corr.robustness == "robust_loss_test") & (corr.flatness == "avg_case_flatness")]
    np.testing.assert_allclose(got["statistic"], ref["statistic"])
    view = zoo.correlation_view(corr)
    assert (view[("", "n")] >= 3).all()
    assert view.loc[("robust_loss_test", "avg_case_flatness"), ("spearman", "statistic")] == pytest.approx(
        round(float(got[got.method == "spearman"]["statistic"].iloc[0]), 3))
    assert ("one_minus_ssim", "surface_sharpness") in view.index                 # 3 fine-tunes: a coefficient
    assert np.isnan(view.loc[("one_minus_ssim", "surface_sharpness"), ("spearman", "ci_low")])  # but no interval
    assert zoo.correlation_view(corr, min_n=100).empty
    with pytest.raises(ValueError, match="robustness columns"):
        zoo.correlations(table[["avg_case_flatness"]])


def test_available_pairs():
    table = model_table()
    table["hessian_trace"] = np.nan
    pairs = [("one_minus_ssim", "surface_sharpness"), ("surface_sharpness", "hessian_trace"), ("nope", "epoch")]
    assert zoo.available_pairs(table, pairs) == [("one_minus_ssim", "surface_sharpness")]
    assert zoo.available_pairs(table.iloc[[0]], pairs) == []                   # base has no 1 - SSIM


def test_trajectories_and_histories(tmp_path):
    table = model_table()
    assert zoo.trajectories(table) == ["pgd_at"]
    assert zoo.trajectories(table.head(5)) == []
    (tmp_path / "history").mkdir()
    pd.DataFrame({"epoch": [1, 2], "test_robust_loss": [1.0, 1.1]}).to_csv(tmp_path / "history" / "pgd_at.csv")
    assert list(zoo.read_histories(tmp_path, ["pgd_at", "trades"])) == ["pgd_at"]


def confidence_tables():
    clean = pd.DataFrame({"confidence": [0.6, 0.7, 0.95, 0.8], "correct": [True, True, True, False],
                          "relative_flatness": [3.0, 2.0, 1.0, 4.0]})
    adv = pd.DataFrame({"confidence": [0.99, 0.95, 0.5, 0.97], "correct": [False, False, True, False],
                        "relative_flatness": [0.01, 0.02, 2.0, 0.03]})
    return clean, adv


def test_confidence_summary():
    table = zoo.confidence_summary(*confidence_tables())
    assert table.loc["clean", "accuracy"] == 0.75 and table.loc["adversarial", "accuracy"] == 0.25
    assert table.loc["adversarial", "confidently_wrong"] == 0.75 and table.loc["clean", "confidently_wrong"] == 0
    assert table.loc["adversarial", "median_relative_flatness"] == pytest.approx(0.025)


def corr_none():
    return correlation_table(model_table().head(1), ["robust_gap"], ["avg_case_flatness"], n_resamples=20)


def test_summary_is_honest_about_few_models():
    table = model_table()
    text = zoo.summary(table, zoo.correlations(table, n_resamples=500), confidence_tables())
    assert text.startswith("10 models measured")
    assert "lower test robust loss: SUPPORTED" in text                         # built in: RLoss grows with flat
    assert "2 of 3 adversarially fine-tuned models have a sharper clean-loss surface than base (fgsm, stadv)" in text
    assert "Walter et al. 2025" in text and "75% of the adversarial inputs" in text
    assert "How far to trust this: 10 models" in text and "6 of them are checkpoints" in text
    clean, adv = (pd.concat([t] * 5, ignore_index=True) for t in confidence_tables())
    assert "flatter regions): SUPPORTED" in zoo.summary(table.head(1), corr_none(), (clean, adv))
    assert "flatter regions): CONTRADICTED" in zoo.summary(table.head(1), corr_none(), (adv, clean))
    assert "flatter regions): INCONCLUSIVE" in zoo.summary(table.head(1), corr_none(), (clean, clean))
    one = table.head(1)
    text = zoo.summary(one, correlation_table(one, ["robust_gap"], ["avg_case_flatness"], n_resamples=20))
    assert "1 model measured" in text and "too few" in text and "SUPPORTED" not in text


def test_figures():
    table = model_table()
    fig = advkit.plots.model_scatter(table, [("avg_case_flatness", "robust_loss_test"),
                                             ("one_minus_ssim", "surface_sharpness"), ("nope", "robust_gap")])
    titles = [ax.get_title() for ax in fig.axes[:3]]
    assert titles[0].startswith("Spearman ρ = ") and "(n = 10)" in titles[0]
    assert "(n = 3)" in titles[1]
    assert fig.axes[2].texts[0].get_text() == "no models with both values"
    fig = advkit.plots.flatness_through_training(table, {"pgd_at": pd.DataFrame(
        {"epoch": [1, 2, 3], "train_robust_loss": [1, 0.9, 0.8], "test_robust_loss": [1.1, 1.0, 1.05]})})
    assert len(fig.axes) == 3 and fig.axes[1].get_xlabel() == "epoch"
    with pytest.raises(ValueError, match="two or more epochs"):
        advkit.plots.flatness_through_training(table.head(4))
    fig = advkit.plots.confidence_flatness_plot(*confidence_tables())
    assert [ax.get_title() for ax in fig.axes] == ["clean inputs", "adversarial inputs"]
    plt.close("all")


def test_early_weights_equal_to_the_final_ones_count_once_in_correlations():
    """`trades_early` stopped at trades' last epoch: the same weights, so one point, not two."""
    rng = np.random.default_rng(0)
    names = ["base", "pgd", "pgd_at", "pgd_at_early", "trades", "trades_early"]
    epochs = [15, 3, 10, 6, 10, 10]
    table = pd.DataFrame({"epoch": epochs, "robust_loss_test": rng.random(6), "avg_case_flatness": rng.random(6)},
                         index=pd.Index(names, name="model"))
    kept = zoo.distinct_models(table)
    assert list(kept.index) == ["base", "pgd", "pgd_at", "pgd_at_early", "trades"]
    corr = zoo.correlations(table, robustness=["robust_loss_test"], flatness=["avg_case_flatness"],
                            methods=("spearman",))
    assert set(corr["n"]) == {5}
