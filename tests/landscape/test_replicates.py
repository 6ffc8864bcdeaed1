"""advkit.landscape.replicates: the sharpness ordering as a probability over direction (and training) seeds."""

import functools

import numpy as np
import pytest
import torch
from torch import nn

from advkit.attacks.pgd import pgd
from advkit.landscape import replicates as R
from advkit.landscape.settings import SurfaceSettings
from advkit.plots.figures import ordering_figure


def _pair(k: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """A sharper than B in exactly k of n direction seeds."""
    a = np.ones((1, n))
    b = np.where(np.arange(n) < k, 0.5, 2.0)[None]
    return a, b


def test_probability_is_k_over_n_and_interval_contains_it_and_shrinks():
    p10, lo10, hi10, n10 = R.probability_sharper(*_pair(7, 10), n_resamples=2000, seed=0)
    assert p10 == pytest.approx(0.7) and n10 == 10
    assert lo10 <= 0.7 <= hi10 and lo10 < hi10
    p100, lo100, hi100, _ = R.probability_sharper(*_pair(70, 100), n_resamples=2000, seed=0)
    assert p100 == pytest.approx(0.7) and lo100 <= 0.7 <= hi100
    assert hi100 - lo100 < 0.6 * (hi10 - lo10)
    # binomial standard error 0.046 at n = 100: the 95 % percentile interval is about 0.7 +- 0.09
    assert 0.55 < lo100 < 0.66 and 0.74 < hi100 < 0.85
    # seeded: the same interval again
    assert R.probability_sharper(*_pair(7, 10), n_resamples=2000, seed=0) == (p10, lo10, hi10, n10)


def test_training_seeds_count_every_pair_of_replicates():
    # A's two training seeds x B's three, one direction seed each of two: 2 * 3 * 2 = 12 pairs
    a = np.array([[3.0, 3.0], [1.0, 1.0]])
    b = np.array([[2.0, 2.0], [2.0, 0.0], [4.0, 4.0]])
    p, lo, hi, n = R.probability_sharper(a, b, n_resamples=500)
    wins = sum(a[i, d] > b[j, d] for i in range(2) for j in range(3) for d in range(2))
    assert n == 12 and p == pytest.approx(wins / 12) and lo <= p <= hi


def test_one_draw_has_no_interval_and_ties_are_not_sharper():
    p, lo, hi, n = R.probability_sharper(np.ones((1, 1)), np.zeros((1, 1)))
    assert p == 1 and n == 1 and np.isnan(lo) and np.isnan(hi) and R.ordering_verdict(p, lo, hi) == "one draw"
    assert R.probability_sharper(np.ones((1, 5)), np.ones((1, 5)))[:3] == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="same direction seeds"):
        R.probability_sharper(np.ones((1, 3)), np.ones((1, 4)))


def test_ordering_table_matrix_and_lines():
    rows = [{"quantity": "loss", "dims": 1, "model": m, "family": m.split("_s")[0],
             "training_seed": int(m[-1]) if "_s" in m else -1, "direction_seed": d, "sharpness": v}
            for m, vals in {"base": [1, 1, 1, 1], "fgsm_s0": [2, 2, 2, 0], "fgsm_s1": [2, 2, 0, 0]}.items()
            for d, v in enumerate(vals)]
    import pandas as pd
    values = pd.DataFrame(rows)
    table = R.ordering_probabilities(values, n_resamples=200)
    (row,) = table.itertuples()
    assert (row.a, row.b, row.n_pairs, row.training_seeds_b) == ("base", "fgsm", 8, 2)
    assert row.p_a_sharper == pytest.approx(3 / 8)
    m = R.probability_matrix(table)
    assert m.loc["fgsm", "base"] == pytest.approx(5 / 8) and np.isnan(m.loc["base", "base"])
    (line,) = R.ordering_lines(table)
    assert line.startswith("fgsm sharper than base (1D): P = 0.62") and "over 8 replicate pairs" in line
    assert "fgsm 2" in R.training_seed_note(values)
    assert "no training-seed" in R.training_seed_note(values[values["family"] == "base"])


def _tiny(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                         nn.Flatten(), nn.Linear(16, 10)).eval()


@pytest.mark.slow
def test_cifar_shaped_smoke(tmp_path):
    x, y = torch.rand(8, 3, 32, 32), torch.randint(0, 10, (8,))
    models = {"base": _tiny(0), "pgd_s0": _tiny(1), "pgd_s1": _tiny(2)}
    settings = SurfaceSettings(span=0.2, resolution=5, data_name="cifar-shaped[:8]")
    attack = functools.partial(pgd, eps=2 / 255, steps=1, seed=0)
    reps = R.sensitivity_replicates(models, x, y, tmp_path, settings, seeds=[0, 1],
                                    spans={"filter": 0.2, "weight": 0.2}, dims=(1, 2), attack=attack, bn_x=x)
    assert set(reps) == {(s, d, k) for s in range(2) for d in (1, 2) for k in ("clean", "robust")}
    labels = {label for label, _, _ in reps[(0, 1, "clean")]}
    assert labels == {"filter", "weight", "filter, BN include", "filter, BN recalibrate"}
    values = R.sharpness_values(reps)
    assert len(values) == 2 * 2 * 2 * 3 and np.isfinite(values["sharpness"]).all()
    table = R.ordering_probabilities(values, n_resamples=100)
    assert set(table["a"] + ">" + table["b"]) == {"base>pgd"} and (table["n_pairs"] == 4).all()
    per_seed, agree = R.agreement_table(reps)
    assert len(agree) == 2 * 2 * 3 and agree["seeds"].eq(2).all()
    assert agree["same_ordering"].between(0, 1).all()
    fig = ordering_figure(table)
    assert len(fig.axes) == 5  # four panels and the colour bar
    # cached: a second call reads the files (seed, BatchNorm variant and robust loss in their names)
    again = R.sensitivity_replicates(models, x, y, tmp_path, settings, seeds=[0, 1],
                                     spans={"filter": 0.2, "weight": 0.2}, dims=(1, 2), attack=attack, bn_x=x)
    assert R.sharpness_values(again).equals(values)


def test_helpers_and_summary_lines(tmp_path):
    import pandas as pd

    from advkit.runs.run import Run

    assert R.replicate_spans(["filter", "none"], 0.2, [0.1, 0.2], [0.01, 0.02]) == {"filter": 0.2, "none": 0.02}
    assert list(R.final_models({"base": 1, "trades": 2, "trades_early": 3, "trades_e004": 4})) == ["base", "trades"]
    run = Run(tmp_path)
    assert "did not run" in R.summary_lines(run)[0]
    table = pd.DataFrame([{"quantity": "loss", "dims": 1, "a": "base", "b": "fgsm", "p_a_sharper": 0.1, "ci_low": 0.0,
                           "ci_high": 0.3, "n_pairs": 10, "direction_seeds": 10, "training_seeds_a": 1,
                           "training_seeds_b": 1, "verdict": "flatter"}])
    run.write_table(run.landscape_table("sharpness_ordering"), table, index=False)
    (line,) = R.summary_lines(run)
    assert "(clean loss, 10 direction seeds;" in line and "sharper 1, flatter 0, undecided 0 of 1" in line
    assert "fgsm sharper than base (1D): P = 0.90 [0.70, 1.00] over 10 replicate pairs: sharper" in line
