"""The per-model table of notebook 05 (measuring): metrics, the one cache policy, merged columns from
other notebooks. The report on it (correlations, tables, summary) is tested in test_correlation.py."""

import json
import math
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from advkit.models import get_model
from advkit.runs.artifacts import CorruptArtifactError
from advkit.runs.checkpoints import save_model
from advkit.runs.run import Run, StaleCacheWarning
from advkit.studies import correlation, zoo

TINY = zoo.ZooSettings(dataset="digits", n_eval=24, pgd_eps=0.1, pgd_steps=2, pgd_alpha=None, pgd_restarts=1,
                       n_autoattack=24, aa_steps=5, flatness_samples=2, worst_steps=2, hessian_iters=3,
                       hessian_samples=3)
NO_RESULTS = tuple(zoo.RUN_RESULTS)  # runs without notebooks 02 and 04: their columns may be empty


def save(run, name, seed, **extra):
    torch.manual_seed(seed)
    model = get_model("small_cnn", 10, 1, width=4)
    save_model(Run.of(run).model(name), model, {"seed": seed}, **extra)
    return model


def table_of(run, data, settings=TINY, **kwargs):
    return zoo.flatness_table(run, data, settings, progress=False, optional=NO_RESULTS, **kwargs)


@pytest.fixture()
def run(tmp_path):
    run = Run(tmp_path / "run")
    save(run, "base", 0, epoch=15)
    save(run, "fgsm", 1, epoch=2)
    save(run, "pgd_at_e001", 2)
    return run


def test_empty_run_directory_is_a_clear_error(tmp_path, digits):
    with pytest.raises(ValueError, match="no models in .*empty"):
        table_of(tmp_path / "nothing", digits)
    (tmp_path / "empty" / "models").mkdir(parents=True)
    with pytest.raises(ValueError, match="no models"):
        table_of(tmp_path / "empty", digits)


def test_settings_are_checked_and_keyed():
    for bad in ({"n_eval": 0}, {"pgd_steps": 1.5}, {"pgd_eps": -0.1}, {"pgd_eps": 2.0}, {"flatness_xi": -1},
                {"hessian_backend": "fast"}, {"seed": -1}, {"flatness_samples": True}, {"trace_method": "exact"},
                {"pgd_restarts": 0}, {"n_autoattack": -1}, {"pgd_alpha": 0.0}, {"aa_steps": 0},
                {"worst_xi": math.inf}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            zoo.ZooSettings(**bad)
    with pytest.raises(ValueError, match="hessian_samples"):
        zoo.ZooSettings(hessian_samples=2)
    assert zoo.ZooSettings(hessian_samples=2, trace_method="hutchinson").hessian_samples == 2
    assert zoo.ZooSettings(n_autoattack=0).n_autoattack == 0                      # 0: no AutoAttack
    assert zoo.ZooSettings().key() == zoo.ZooSettings().key()
    assert zoo.ZooSettings().key() != zoo.ZooSettings(worst_steps=3).key()
    assert json.loads(TINY.key()) == TINY.as_dict() and TINY.as_dict()["version"] == zoo.ZOO_VERSION


def test_default_settings_are_stutz_et_al_evaluation():
    """Stutz et al. 2021, Sec. 3 and App. B, by their printed numbers: RLoss with PGD-20, step 0.007, 10 random
    restarts at eps 8/255 on the first 1000 test images; RErr from AutoAttack (100 iterations, 9 targets) on them."""
    s = zoo.ZooSettings()
    assert s.attack().func.__name__ == "pgd"
    assert s.attack().keywords == {"eps": pytest.approx(8 / 255), "alpha": 0.007, "steps": 20, "restarts": 10,
                                   "seed": 0}
    assert s.attack(restarts=1).keywords["restarts"] == 1  # what flatness re-runs at perturbed weights
    assert (s.n_eval, s.n_autoattack, s.flatness_xi, s.worst_xi) == (1000, 1000, 0.5, 0.003)
    aa = s.robust_error_attack()
    assert aa.func.__name__ == "autoattack" and (aa.keywords["steps"], aa.keywords["n_target_classes"]) == (100, 9)


def test_more_restarts_never_weaken_the_robust_loss_attack(trained_cnn, digits_test):
    x, y = digits_test[0][:64], digits_test[1][:64]
    one = zoo.ZooSettings(pgd_eps=0.1, pgd_steps=3, pgd_alpha=None, pgd_restarts=1).attack()
    three = zoo.ZooSettings(pgd_eps=0.1, pgd_steps=3, pgd_alpha=None, pgd_restarts=3).attack()
    wrong1 = (trained_cnn(one(trained_cnn, x, y)).argmax(1) != y).sum()
    wrong3 = (trained_cnn(three(trained_cnn, x, y)).argmax(1) != y).sum()
    assert wrong3 >= wrong1


def test_metrics_of_a_constant_classifier_are_known_by_hand(digits):
    """A linear model with W = 0 and b = (2, 0, ..., 0) gives every image p = softmax(b): the input gradient is 0,
    so no attack changes a prediction, and every number follows from the labels and pixels alone.
    Loss = mean_i -log p_{y_i}; accuracy = share of label 0; RErr = 1 - that share; relative flatness 0 (W = 0);
    the Hessian of the mean CE w.r.t. (W, b) is E[x~ x~^T] kron (diag p - p p^T), x~ = (x, 1), so its top
    eigenvalue is the product of the two factors' top eigenvalues."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    with torch.no_grad():
        model[1].weight.zero_()
        model[1].bias.copy_(torch.tensor([2.0] + [0.0] * 9))
    settings = zoo.ZooSettings(**{**vars(TINY), "hessian_iters": 10})
    train, test = zoo.eval_subsets(digits, 24)
    row = zoo.model_metrics(model, train, test, settings)
    p = np.exp([2.0] + [0.0] * 9) / (np.exp(2.0) + 9)
    for split, suffix, (x, y) in (("train", "_train", train), ("test", "", test)):
        y = y.numpy()
        loss = np.mean(-np.log(p[y]))
        assert row[f"clean_loss_{split}"] == pytest.approx(loss, rel=1e-6)
        assert row[f"robust_loss_{split}"] == pytest.approx(loss, rel=1e-6)
        assert row[f"clean_acc{suffix}"] == row[f"robust_acc{suffix}"] == np.mean(y == 0)
        assert row[f"robust_err{suffix}"] == pytest.approx(1 - np.mean(y == 0))
    assert row["clean_acc"] == 3 / 24 and row["clean_acc_train"] == 1 / 24     # labels 0 among the first 24
    assert row["robust_gap"] == pytest.approx(np.mean(-np.log(p[test[1].numpy()]))
                                              - np.mean(-np.log(p[train[1].numpy()])), rel=1e-5)
    assert row["relative_flatness"] == row["relative_flatness_adv"] == 0.0
    x = test[0].flatten(1).double().numpy()
    x = np.hstack([x, np.ones((len(x), 1))])
    top = np.linalg.eigvalsh(x.T @ x / len(x))[-1] * np.linalg.eigvalsh(np.diag(p) - np.outer(p, p))[-1]
    assert row["hessian_top_eig"] == pytest.approx(top, rel=1e-4)


def test_split_name():
    assert zoo.split_name("pgd_at_e002") == ("pgd_at", 2)
    assert zoo.split_name("pgd_at") == ("pgd_at", None)
    assert zoo.split_name("base") == ("base", None)
    assert zoo.split_name("model_e12") == ("model_e12", None)
    assert zoo.split_name("pgd_at_early") == ("pgd_at_early", None)  # a model of its own, not an epoch


@pytest.mark.slow
def test_early_stopped_models_are_zoo_members(run, digits):
    save(run, "pgd_at", 3, epoch=6)
    save(run, "pgd_at_early", 4, epoch=3, early_stopped=True, select="val_robust_loss")
    assert run.models() == ["base", "fgsm", "pgd_at", "pgd_at_early"]
    table = table_of(run, digits, models=["pgd_at", "pgd_at_early", "pgd_at_e001"])
    assert table.loc["pgd_at_early", ["family", "epoch", "early_stopped"]].tolist() == ["pgd_at_early", 3, True]
    assert not table.loc["pgd_at", "early_stopped"]
    assert correlation.trajectories(table) == ["pgd_at"]  # pgd_at_e001 and the final pgd_at (epoch 6); early apart
    paired = correlation.early_stopping_table(table)
    assert list(paired.index) == ["pgd_at"] and paired.at["pgd_at", "early_epoch"] == 3
    assert paired.at["pgd_at", "early_avg_case_flatness"] == round(table.at["pgd_at_early", "avg_case_flatness"], 3)


def test_table_metrics_are_consistent(run, digits):
    table = table_of(run, digits)
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
    on_disk = run.read_table(run.flatness, index_col="model")
    assert list(on_disk.index) == list(table.index) and "settings" in on_disk


@pytest.mark.slow
def test_cache_policy_reuses_only_rows_made_the_same_way(run, digits, monkeypatch):
    """The one cache policy: a row made with other settings, another ZOO_VERSION or other weights is recomputed
    with a StaleCacheWarning naming the file, the row and the setting; matching rows are reused silently."""
    first = table_of(run, digits)
    calls = []
    original = zoo.model_metrics

    def counting(model, train, test, settings):
        calls.append(settings)
        return original(model, train, test, settings)

    monkeypatch.setattr(zoo, "model_metrics", counting)
    with warnings.catch_warnings():
        warnings.simplefilter("error", StaleCacheWarning)
        again = table_of(run, digits)
    assert calls == []
    pd.testing.assert_frame_equal(again, first, check_dtype=False)
    save(run, "fgsm", 5, epoch=2)                                  # retrained: new checkpoint hash
    with pytest.warns(StaleCacheWarning, match=r"flatness.csv, row 'fgsm' was made with checkpoint="):
        changed = table_of(run, digits)
    assert len(calls) == 1
    assert changed.at["fgsm", "robust_loss_test"] != first.at["fgsm", "robust_loss_test"]
    assert changed.at["base", "robust_loss_test"] == first.at["base", "robust_loss_test"]
    other = zoo.ZooSettings(**{**vars(TINY), "worst_steps": 1})
    with pytest.warns(StaleCacheWarning, match=r"row 'base' was made with worst_steps=2, this call asks for "
                                               r"worst_steps=1"):
        table_of(run, digits, other, models=["base"])
    assert len(calls) == 2
    on_disk = run.read_table(run.flatness, index_col="model")
    assert list(on_disk.index) == ["base", "fgsm", "pgd_at_e001"]   # rows not asked for are kept
    monkeypatch.setattr(zoo, "ZOO_VERSION", zoo.ZOO_VERSION + 1)     # a metric's definition changed
    with pytest.warns(StaleCacheWarning, match="row 'fgsm' was made with version="):
        table_of(run, digits, models=["fgsm"])
    assert len(calls) == 3
    with warnings.catch_warnings():
        warnings.simplefilter("error", StaleCacheWarning)
        table_of(run, digits, recompute=True)                        # asked for: no warning
    assert len(calls) == 6
    with pytest.raises(ValueError, match="not in"):
        table_of(run, digits, models=["nope"])
    with pytest.raises(ValueError, match="dataset"):
        table_of(run, digits, zoo.ZooSettings(dataset="cifar10"))


def test_edited_cache_is_an_error(run, digits):
    table_of(run, digits, models=["base"])
    run.flatness.write_text(run.flatness.read_text().replace("base,", "base,1"))
    with pytest.raises(CorruptArtifactError, match="flatness.csv is corrupt"):
        table_of(run, digits, models=["base"])


def write_results(run):
    run.write_table(run.attack_table("table2_ssim_distance"), pd.DataFrame(
        {"fgsm": [0.2], "pgd": [0.1], "stadv": [0.3]}, index=pd.Index(["base"], name="model")))
    run.write_table(run.landscape_table("sharpness"), pd.DataFrame(
        {"surface_sharpness": [1.0, 2.5], "loss_mean_increase": [0.1, 0.4]},
        index=pd.Index(["base", "fgsm"], name="model")))


def test_attach_run_results(run):
    table = pd.DataFrame({"robust_loss_test": [1.0, 2.0, 3.0, 4.0]},
                         index=pd.Index(["base", "fgsm", "fgsm_e001", "trades"], name="model"))
    bare = zoo.attach_run_results(table, run, optional=NO_RESULTS)
    assert bare[list(zoo.MERGED)].isna().all().all()
    write_results(run)
    full = zoo.attach_run_results(bare, run)
    assert full["one_minus_ssim"].tolist()[1:3] == [0.2, 0.2]
    assert np.isnan(full.at["base", "one_minus_ssim"]) and np.isnan(full.at["trades", "one_minus_ssim"])
    assert full["surface_sharpness"].tolist()[:2] == [1.0, 2.5] and np.isnan(full.at["trades", "surface_sharpness"])
    assert full.at["fgsm", "surface_mean_increase"] == 0.4 and full["robust_surface_sharpness"].isna().all()
    assert list(full.index) == list(table.index)


def test_missing_results_are_errors_naming_their_notebook_unless_optional(run, digits, monkeypatch):
    table = pd.DataFrame({"robust_loss_test": [1.0]}, index=pd.Index(["fgsm"], name="model"))
    with pytest.raises(FileNotFoundError, match=r"table2_ssim_distance.csv is missing: notebook 02_attack"):
        zoo.attach_run_results(table, run)
    with pytest.raises(FileNotFoundError, match=r"sharpness.csv is missing: notebook 04_visualize writes it"):
        zoo.attach_run_results(table, run, optional=["table2_ssim_distance"])
    with pytest.raises(ValueError, match="optional=.*'surfaces'"):
        zoo.attach_run_results(table, run, optional=["surfaces"])
    assert set(zoo.missing_run_results(run)) == set(NO_RESULTS)
    measured = []
    monkeypatch.setattr(zoo, "model_metrics", lambda *a: measured.append(a) or {})
    with pytest.raises(FileNotFoundError, match="04_visualize"):   # before any model is measured
        zoo.flatness_table(run, digits, TINY, progress=False, optional=["table2_ssim_distance"])
    assert measured == []
    write_results(run)
    assert zoo.missing_run_results(run) == {}
    run.landscape_table("sharpness").unlink()
    note = zoo.missing_run_results(run)["sharpness"]
    assert note.startswith("surface_sharpness, ") and "landscapes/sharpness.csv (notebook 04_visualize" in note
    run.write_table(run.attack_table("table2_ssim_distance"), pd.DataFrame(
        {"fgsm": [0.2]}, index=pd.Index(["fgsm"], name="model")))
    with pytest.raises(ValueError, match="no row 'base'.*02_attack"):
        zoo.attach_run_results(table, run, optional=["sharpness"])


def test_read_histories(run):
    run.write_table(run.history("pgd_at"), pd.DataFrame({"epoch": [1, 2], "test_robust_loss": [1.0, 1.1]}),
                    index=False)
    histories = zoo.read_histories(run, ["pgd_at"])
    assert list(histories) == ["pgd_at"] and histories["pgd_at"]["test_robust_loss"].tolist() == [1.0, 1.1]
    with pytest.raises(FileNotFoundError, match="trades.csv"):
        zoo.read_histories(run.root, ["pgd_at", "trades"])
