"""advkit.studies.published: the seed papers' numbers with their sources, beside a run's values."""

import math
import re

import numpy as np
import pandas as pd
import pytest

from advkit.runs.artifacts import CorruptArtifactError
from advkit.runs.run import Run, repo_root
from advkit.studies import published as P

SEEDS = repo_root().parent / "shared" / "seeds"


def test_published_values_carry_their_sources():
    table = P.published()
    assert set(table.claim) == set(P.CLAIMS)
    assert table[["paper", "table", "row", "column", "seed_file", "unit"]].ne("").all().all()
    assert table.value.map(math.isfinite).all()
    xu = P.published("xu_table1").set_index(["model", "metric"]).value
    assert xu["base", "clean"] == 92.64 and xu["pgd", "pgd"] == 51.20 and xu["stadv", "stadv"] == 25.49
    assert P.published("xu_table2").set_index("metric").value.to_dict() == {"fgsm": 0.049344, "pgd": 0.008206,
                                                                            "stadv": 0.002801}
    stutz = P.published("stutz_table1")
    assert stutz.row.nunique() == 19
    at = stutz[stutz.row == "AT (baseline)"].set_index("column").value
    assert at.to_dict() == {"RErr (test)": 62.8, "RErr (train)": 10.7, "Flatness (RLoss)": 1.21,
                            "RErr (early stop)": 54.6}
    with pytest.raises(ValueError, match="claim='xu_table3'.*xu_table1"):
        P.published("xu_table3")
    with pytest.raises(ValueError, match="dataset='cifar-10'.*cifar10"):
        P.reported_vs_reproduced("unused", ["xu_table1"], dataset="cifar-10")


@pytest.mark.skipif(not SEEDS.exists(), reason="the seed texts are in ../shared/seeds")
def test_every_number_is_printed_in_its_seed():
    for claim in ("xu_table1", "xu_table2", "stutz_table1"):
        for p in P.PUBLISHED:
            if p.claim != claim:
                continue
            text = (SEEDS / p.seed_file).read_text()
            key = re.sub(r"\W", "", p.row.replace("data augmented with ", "")).upper()[:6]
            lines = [ln for ln in text.splitlines() if re.sub(r"\W", "", ln).upper().startswith(key)]
            forms = {f"{p.value:.1f}", f"{p.value:.2f}", f"{p.value:g}", f"{p.value:.1f}".replace(".", "")}
            assert lines and any(re.search(rf"(?<![\d.]){re.escape(f)}(?![\d])", ln) for f in forms for ln in lines), p


def test_ordering_agreement_on_hand_made_numbers():
    order = ("fgsm", "pgd", "stadv", "base")
    agree = P.ordering_agreement(order, {"fgsm": 4.0, "pgd": 3.0, "stadv": 2.0, "base": 1.0})
    assert agree == {"n_items": 4, "kendall_tau": pytest.approx(1.0), "pairwise_agreement": 1.0, "matches": True}
    reverse = P.ordering_agreement(order, {"fgsm": 1.0, "pgd": 2.0, "stadv": 3.0, "base": 4.0})
    assert reverse["kendall_tau"] == pytest.approx(-1.0) and reverse["pairwise_agreement"] == 0.0
    assert not reverse["matches"]
    swap = P.ordering_agreement(order, {"fgsm": 3.0, "pgd": 4.0, "stadv": 2.0, "base": 1.0})  # FGSM and PGD swapped
    assert swap["pairwise_agreement"] == pytest.approx(5 / 6) and swap["kendall_tau"] == pytest.approx(2 / 3)
    assert not swap["matches"]
    missing = P.ordering_agreement(order, {"fgsm": 5.0, "stadv": np.nan, "base": 1.0, "other": 9.0})
    assert missing["n_items"] == 2 and missing["matches"] and missing["pairwise_agreement"] == 1.0
    assert math.isnan(P.ordering_agreement(order, {"base": 1.0})["kendall_tau"])


def _write(path, frame, index=True):
    Run(path.parent).write_table(path, frame, index=index)  # as the notebooks do: atomic, with a checksum


def test_comparison_with_missing_models_shows_nan_with_a_note(tmp_path):
    empty = P.reported_vs_reproduced(tmp_path, P.CLAIMS)  # nothing run yet: NaN everywhere, no error
    assert empty.reproduced.isna().all() and empty.note.str.contains("not in this run").any()
    _write(tmp_path / "attacks" / "table1_accuracy.csv",
           pd.DataFrame({"clean": [0.9], "fgsm": [0.2], "pgd": [0.05]}, index=pd.Index(["base"], name="model")))
    table = P.reported_vs_reproduced(tmp_path, ["xu_table1"])
    base = table[table.model == "base"].set_index("column")
    assert base.at["GROUND ACC.", "reproduced"] == pytest.approx(90.0)
    assert base.at["GROUND ACC.", "difference"] == pytest.approx(90.0 - 92.64)
    assert base.at["PGD", "difference"] == pytest.approx(5.0)
    assert math.isnan(base.at["STADV", "reproduced"]) and "'stadv' not in" in base.at["STADV", "note"]
    fgsm = table[table.model == "fgsm"]
    assert len(fgsm) == 4 and fgsm.reproduced.isna().all() and fgsm.note.str.contains("model 'fgsm' not in").all()
    written = pd.read_csv(tmp_path / "reported_vs_reproduced" / "xu_table1.csv")
    assert len(written) == 16 and written.published.tolist() == table.published.tolist()
    assert set(P.load_tables(tmp_path)) == set(P.CLAIMS)
    assert Run(tmp_path).reported("xu_table1") == tmp_path / "reported_vs_reproduced" / "xu_table1.csv"


def test_run_files_are_read_verified(tmp_path):
    """Every file is read through the Run with its checksum: an edited table is an error, not a value."""
    path = Run(tmp_path).attack_table("table2_ssim_distance")
    _write(path, pd.DataFrame({"fgsm": [0.2]}, index=pd.Index(["base"], name="model")))
    assert P.compare(tmp_path, "xu_table2").set_index("model").at["base", "reproduced"].tolist()[0] == 0.2
    path.write_text(path.read_text().replace("0.2", "0.3"))
    with pytest.raises(CorruptArtifactError, match="table2_ssim_distance.csv is corrupt"):
        P.compare(tmp_path, "xu_table2")


def test_other_datasets_show_the_seed_values_for_reference_only(tmp_path):
    _write(tmp_path / "attacks" / "table2_ssim_distance.csv",
           pd.DataFrame({"fgsm": [0.2], "pgd": [0.1], "stadv": [0.01]}, index=pd.Index(["base"], name="model")))
    cifar = P.compare(tmp_path, "xu_table2")
    assert cifar.difference.tolist() == pytest.approx([0.2 - 0.049344, 0.1 - 0.008206, 0.01 - 0.002801])
    digits = P.compare(tmp_path, "xu_table2", dataset="digits")
    assert digits.reproduced.tolist() == cifar.reproduced.tolist() and digits.difference.isna().all()
    assert digits.note.str.contains("published value is CIFAR-10; this run: digits").all()


def test_sharpness_ordering_table(tmp_path):
    _write(tmp_path / "landscapes" / "sharpness.csv", pd.DataFrame(
        {"surface_sharpness": [1.0, 9.0, 4.0, 6.0]}, index=pd.Index(["base", "fgsm", "pgd", "stadv"], name="model")))
    table = P.compare(tmp_path, "xu_sharpness_order", dataset="digits").set_index(["row", "column"])
    assert table.loc[("stadv", "sharpness rank"), "reproduced"] == 2 and table.loc[("pgd", "sharpness rank"),
                                                                                   "reproduced"] == 3
    assert table.loc[("ordering", "pairwise_agreement"), "reproduced"] == pytest.approx(5 / 6)
    assert table.loc[("ordering", "kendall_tau"), "reproduced"] == pytest.approx(2 / 3)
    assert "differs: fgsm > stadv > pgd > base" in table.loc[("ordering", "kendall_tau"), "note"]


def test_stutz_table_from_histories_and_flatness(tmp_path):
    history = pd.DataFrame({"epoch": [1, 2, 3], "test_robust_err": [0.7, 0.5, 0.6],
                            "train_robust_err": [0.6, 0.4, 0.2], "val_robust_loss": [2.0, 1.5, 1.8]})
    _write(tmp_path / "history" / "pgd_at.csv", history, index=False)
    _write(tmp_path / "flatness.csv", pd.DataFrame({"avg_case_flatness": [0.9]},
                                                   index=pd.Index(["pgd_at"], name="model")))
    _write(tmp_path / "history" / "pgd_at+ls0.1.csv", history, index=False)
    _write(tmp_path / "history" / "pgd_at+ls0.1+aa.csv", history, index=False)  # two regularizers: no Stutz row
    table = P.compare(tmp_path, "stutz_table1")
    assert list(dict.fromkeys(table.model)) == [*P.STUTZ_MODELS.values(), "pgd_at+ls0.1"]
    ls = table[table.model == "pgd_at+ls0.1"].set_index("column")
    assert (ls.row == "Label smoothing").all() and ls.at["RErr (test)", "published"] == 61.2
    assert ls.at["RErr (test)", "reproduced"] == pytest.approx(60.0)
    at = table[table.model == "pgd_at"].set_index("column").reproduced
    assert at.to_dict() == pytest.approx({"RErr (test)": 60.0, "RErr (train)": 20.0, "Flatness (RLoss)": 0.9,
                                          "RErr (early stop)": 50.0})
    assert table[table.model == "trades"].reproduced.isna().all()


@pytest.mark.parametrize("model, row", [("pgd_at", "AT (baseline)"), ("awp", "AT-AWP"),
                                        ("pgd_at+wd0.005", "Weight decay"), ("pgd_at+ema0.999", "Weight averaging"),
                                        ("pgd_at+eps0.0353", "Larger ε=9/255"), ("pgd_at+aa", "AutoAugment"),
                                        ("trades+b3", None), ("fgsm", None)])
def test_stutz_rows_for_variant_names(model, row):
    assert P.stutz_row(model) == row


def test_replicates_are_averaged_with_a_note(tmp_path):
    """A sweep's `fgsm_s0`, `fgsm_s1` are replicates of `fgsm`: the run's value is their mean, noted."""
    _write(tmp_path / "landscapes" / "sharpness.csv", pd.DataFrame(
        {"surface_sharpness": [1.0, 8.0, 10.0, 4.0, 6.0, 99.0]},
        index=pd.Index(["base", "fgsm_s0", "fgsm_s1", "pgd_s0", "stadv_s0", "fgsm_s1_early"], name="model")))
    table = P.compare(tmp_path, "xu_sharpness_order").set_index(["row", "column"])
    fgsm = table.loc[("fgsm", "sharpness rank")]
    assert fgsm.reproduced == 1 and "surface_sharpness = 9" in fgsm.note           # mean of 8 and 10, not 99
    assert "mean of 2 replicates (fgsm_s0, fgsm_s1); range: surface_sharpness 8 to 10" in fgsm.note
    assert "one replicate (pgd_s0)" in table.loc[("pgd", "sharpness rank"), "note"]
    assert table.loc[("ordering", "pairwise_agreement"), "reproduced"] == pytest.approx(5 / 6)
    same, notes = P.mean_over_replicates(pd.DataFrame({"a": [1.0]}, index=["fgsm"]))   # plain names: unchanged
    assert notes == {} and same.equals(pd.DataFrame({"a": [1.0]}, index=["fgsm"]))


def test_stutz_table_averages_replicate_histories(tmp_path):
    for seed, errs in ((0, [0.7, 0.5, 0.6]), (1, [0.7, 0.5, 0.4])):
        _write(tmp_path / "history" / f"pgd_at+ls0.1_s{seed}.csv", pd.DataFrame(
            {"epoch": [1, 2, 3], "test_robust_err": errs, "train_robust_err": [0.6, 0.4, 0.2],
             "val_robust_loss": [2.0, 1.5, 1.8]}), index=False)
    _write(tmp_path / "flatness.csv", pd.DataFrame({"avg_case_flatness": [0.8, 1.0, 5.0]}, index=pd.Index(
        ["pgd_at+ls0.1_s0", "pgd_at+ls0.1_s1", "pgd_at+ls0.1_s1_early"], name="model")))
    table = P.compare(tmp_path, "stutz_table1")
    assert list(dict.fromkeys(table.model)) == [*P.STUTZ_MODELS.values(), "pgd_at+ls0.1"]
    ls = table[table.model == "pgd_at+ls0.1"].set_index("column")
    assert ls.reproduced.to_dict() == pytest.approx({"RErr (test)": 50.0, "RErr (train)": 20.0,
                                                     "Flatness (RLoss)": 0.9, "RErr (early stop)": 50.0})
    assert ls.note.str.contains("mean of 2 replicates").all()


@pytest.mark.parametrize("name, split", [("fgsm_s1", ("fgsm", 1)), ("trades_s2_early", ("trades_early", 2)),
                                         ("pgd_at+ls0.1_s0_e025", ("pgd_at+ls0.1_e025", 0)), ("fgsm", ("fgsm", None)),
                                         ("pgd_at_e025", ("pgd_at_e025", None)), ("stadv_s", ("stadv_s", None))])
def test_the_one_seed_suffix_parser(name, split):
    from advkit.runs.run import split_seed

    assert split_seed(name) == split
