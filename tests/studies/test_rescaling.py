"""Function-preserving rescalings, Stutz et al.'s scale-invariance audit and the robust-loss split (issue 14)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from advkit.curvature.estimators import hessian_eigenvalues
from advkit.curvature.flatness import avg_case_flatness, relative_flatness
from advkit.models import get_model
from advkit.runs.checkpoints import save_model
from advkit.runs.run import Run
from advkit.studies.rescaling import EXPECTED, default_pairs, rescale, scale_invariance_table
from advkit.studies.robust_split import robust_loss_split, robust_split_table


def two_layer(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 5)).eval()


def test_relu_pair_rescaling_is_exact_on_a_two_layer_network():
    model = two_layer()
    x = torch.rand(32, 1, 4, 4)
    assert default_pairs(model) == [("1", "3")]
    scaled = rescale(model, 3.7, check=x)
    # the weights moved as stated: first layer (weight and bias) x c, the next layer's weight x 1/c
    assert torch.allclose(scaled[1].weight, 3.7 * model[1].weight)
    assert torch.allclose(scaled[1].bias, 3.7 * model[1].bias)
    assert torch.allclose(scaled[3].weight, model[3].weight / 3.7)
    assert torch.equal(scaled[3].bias, model[3].bias)
    with torch.no_grad():
        assert (scaled(x) - model(x)).abs().max() < 1e-6
        # by hand: W2 relu(W1 x + b1) + b2 with the rescaled weights
        h = F.relu(x.flatten(1) @ scaled[1].weight.T + scaled[1].bias)
        assert torch.allclose(h @ scaled[3].weight.T + scaled[3].bias, model(x), atol=1e-6)


def test_rescale_leaves_the_model_unchanged_and_refuses_what_is_not_function_preserving():
    model = two_layer()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rescale(model, 2.0)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    x = torch.rand(16, 1, 4, 4)
    tanh = nn.Sequential(nn.Flatten(), nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 5)).eval()
    with pytest.raises(ValueError, match="changed the outputs"):
        rescale(tanh, 3.0, check=x)
    with pytest.raises(ValueError, match="factor"):
        rescale(model, 0.0)
    with pytest.raises(ValueError, match="no module 'fc9'"):
        rescale(model, 2.0, [("1", "fc9")])


def test_conv_before_batchnorm_rescaling_keeps_the_logits_of_a_cifar_resnet():
    torch.manual_seed(0)
    model = get_model("resnet20", 10, 3)
    with torch.no_grad():  # non-trivial running statistics
        for _ in range(3):
            model(torch.rand(16, 3, 32, 32))
    model.eval()
    pairs = default_pairs(model)
    assert len(pairs) == 19  # every conv of ResNet-20 feeds a BatchNorm
    x = torch.rand(8, 3, 32, 32)
    for c in (0.5, 3.0):
        scaled = rescale(model, c)
        conv, bn = pairs[5]
        assert torch.allclose(scaled.get_submodule(conv).weight, c * model.get_submodule(conv).weight)
        assert torch.allclose(scaled.get_submodule(bn).running_var, c ** 2 * model.get_submodule(bn).running_var)
        with torch.no_grad():
            assert torch.allclose(scaled(x), model(x), rtol=1e-4, atol=1e-5)


def test_relative_measures_are_invariant_and_the_hessian_is_not_on_a_relu_network():
    model = two_layer(1)
    x, y = torch.rand(40, 1, 4, 4), torch.randint(0, 5, (40,))
    scaled = rescale(model, 3.0)
    a = avg_case_flatness(model, x, y, xi=0.3, n_samples=3).value
    b = avg_case_flatness(scaled, x, y, xi=0.3, n_samples=3).value
    assert b == pytest.approx(a, rel=1e-4)
    # Walter et al.'s relative flatness of the last layer: its features phi x 3, its weight / 3
    assert relative_flatness(scaled, x).value == pytest.approx(relative_flatness(model, x).value, rel=1e-4)
    h0 = hessian_eigenvalues(model, x, y, iters=20).value
    h1 = hessian_eigenvalues(scaled, x, y, iters=20).value
    assert not math.isclose(h0, h1, rel_tol=0.05)


@pytest.mark.slow
def test_scale_invariance_table_separates_relative_from_raw_measures(trained_cnn, digits_test):
    x, y = digits_test[0][:48], digits_test[1][:48]
    table = scale_invariance_table(trained_cnn, x, y, factors=(0.5, 3.0), n_samples=2, steps=2,
                                   resolution=7, hessian_iters=6)
    assert list(table.index) == list(EXPECTED)
    assert list(table.columns) == ["unscaled", "x0.5", "x3", "expected", "invariant"]
    for measure, row in table.iterrows():
        assert bool(row["invariant"]) == (row["expected"] == "invariant"), (measure, row.to_dict())
    # BN makes the conv Hessian scale by 1/c^2: the top eigenvalue moves by far more than rounding
    assert table.loc["hessian_top_eig", ["x0.5", "x3"]].abs().max() > 0.2


def test_robust_loss_split_decomposes_the_robust_loss(trained_cnn, digits_test):
    x, y = digits_test
    identity = lambda model, x, y: x  # noqa: E731  (no attack: the split of the clean loss)
    split = robust_loss_split(trained_cnn, x, y, identity, batch_size=100)
    with torch.no_grad():
        logits = trained_cnn(x)
    loss, ok = F.cross_entropy(logits, y, reduction="none"), logits.argmax(1) == y
    assert split["robust_acc"] == pytest.approx(ok.float().mean().item())
    assert split["robust_loss_correct"] == pytest.approx(loss[ok].mean().item(), rel=1e-5)
    assert split["robust_loss_incorrect"] == pytest.approx(loss[~ok].mean().item(), rel=1e-5)
    acc = split["robust_acc"]
    mix = acc * split["robust_loss_correct"] + (1 - acc) * split["robust_loss_incorrect"]
    assert split["robust_loss"] == pytest.approx(mix, rel=1e-5)
    assert split["robust_loss_incorrect"] > split["robust_loss_correct"]


def test_robust_split_table_covers_epoch_checkpoints_and_joins_flatness(tmp_run, digits_test):
    run = Run.named("split")
    for name, epoch in (("base", None), ("pgd_at", 3), ("pgd_at_e001", 1)):
        extra = {} if epoch is None else {"epoch": epoch}
        save_model(run.model(name), get_model("small_cnn", 10, 1, width=4), {"seed": 0}, **extra)
    x, y = digits_test[0][:32], digits_test[1][:32]
    flatness = pd.DataFrame({"avg_case_flatness": [0.1, 0.2], "avg_case_flatness_train": [0.05, 0.1]},
                            index=pd.Index(["base", "pgd_at"], name="model"))
    wrong_everywhere = lambda model, x, y: torch.zeros_like(x)  # noqa: E731
    table = robust_split_table(run, x, y, wrong_everywhere, flatness=flatness)
    assert list(table.index) == ["base", "pgd_at", "pgd_at_e001"]
    assert table.loc["pgd_at_e001", "family"] == "pgd_at" and table.loc["pgd_at_e001", "epoch"] == 1
    assert table.loc["pgd_at", "epoch"] == 3 and np.isnan(table.loc["base", "epoch"])
    assert table.loc["pgd_at", "avg_case_flatness_train"] == 0.1
    assert np.isnan(table.loc["pgd_at_e001", "avg_case_flatness"])
    # one constant input: each model predicts one class, so exactly the images of that class count as correct
    for _, row in table.iterrows():
        assert row["robust_acc"] in {float((y == k).float().mean()) for k in range(10)}
