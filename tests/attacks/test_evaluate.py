"""advkit.attacks.evaluate: batched accuracies and losses, 1 - SSIM, presets."""

import dataclasses

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from skimage.metrics import structural_similarity

from advkit.attacks import evaluate
from advkit.attacks.evaluate import (
    STUTZ2021,
    XU2019,
    AttackSpec,
    accuracy,
    accuracy_vs_eps,
    evaluate_attacks,
    robust_accuracy,
    robust_loss,
    ssim_distance,
    ssim_win_size,
)
from advkit.attacks.pgd import fgsm, pgd

EPS = 16 / 255


def manual_accuracy(model, x, y):
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def test_accuracy_is_batch_and_dtype_invariant(trained_cnn, digits, digits_test):
    x, y = digits_test
    expected = manual_accuracy(trained_cnn, x, y)
    assert accuracy(trained_cnn, x, y) == pytest.approx(expected)
    assert accuracy(trained_cnn, x, y, batch_size=7) == pytest.approx(expected)
    assert accuracy(trained_cnn, digits.x_test[:256], y) == pytest.approx(expected)  # uint8 input
    assert isinstance(accuracy(trained_cnn, x, y), float)


def test_robust_accuracy_and_loss_match_direct_attacks(trained_cnn, digits_test):
    x, y = digits_test[0][:128], digits_test[1][:128]
    assert robust_accuracy(trained_cnn, x, y, "fgsm", eps=EPS) == pytest.approx(
        manual_accuracy(trained_cnn, fgsm(trained_cnn, x, y, eps=EPS), y))
    x_pgd = pgd(trained_cnn, x, y, eps=EPS, steps=5, seed=0)  # one batch: the same seeded stream
    with torch.no_grad():
        rloss = F.cross_entropy(trained_cnn(x_pgd), y).item()
    assert robust_loss(trained_cnn, x, y, "pgd", eps=EPS, steps=5, seed=0) == pytest.approx(rloss, rel=1e-5)
    assert rloss > F.cross_entropy(trained_cnn(x), y).item()


def test_zero_budget_gives_clean_accuracy(trained_cnn, digits_test):
    x, y = digits_test
    curve = accuracy_vs_eps(trained_cnn, x, y, "pgd", [0.0, EPS], steps=3, batch_size=100)
    assert list(curve.columns) == ["eps", "accuracy"]
    assert curve.accuracy[0] == pytest.approx(accuracy(trained_cnn, x, y))
    assert curve.accuracy[1] < curve.accuracy[0]


def test_evaluation_restores_model_mode(trained_cnn, digits_test):
    trained_cnn.train()
    try:
        robust_accuracy(trained_cnn, *digits_test, "fgsm", eps=EPS)
        assert trained_cnn.training
    finally:
        trained_cnn.eval()


def test_ssim_distance_uses_skimage_and_suits_tiny_images():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 3, 32, 32, generator=g)
    assert ssim_distance(x, x) == pytest.approx(0.0, abs=1e-12)
    noisy = (x + 0.1 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    expected = 1 - np.mean([structural_similarity(a.numpy().astype(np.float64), b.numpy().astype(np.float64),
                                                  data_range=1.0, channel_axis=0, win_size=7)
                            for a, b in zip(x, noisy)])
    assert ssim_distance(x, noisy) == pytest.approx(expected)
    more_noisy = (x + 0.3 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    assert ssim_distance(x, more_noisy) > ssim_distance(x, noisy) > 0
    assert ssim_win_size(8, 8) == 3 and ssim_win_size(32, 32) == 7 and ssim_win_size(12, 40) == 5
    digits = torch.rand(2, 1, 8, 8, generator=g)
    assert 0 < ssim_distance(digits, digits.flip(-1)) <= 2
    assert ssim_distance((digits * 255).to(torch.uint8), (digits * 255).to(torch.uint8)) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="x_adv"):
        ssim_distance(x, x[:2])


def test_presets_hold_the_papers_settings():
    pgd_spec = STUTZ2021.attacks["pgd"].params
    assert (pgd_spec["eps"], pgd_spec["alpha"], pgd_spec["steps"], pgd_spec["restarts"]) == (8 / 255, 0.007, 20, 10)
    assert STUTZ2021.n_test == 1000 and STUTZ2021.attacks["autoattack"].attack == "autoattack"
    assert XU2019.attacks["fgsm"].params["eps"] == 8 / 255
    assert XU2019.attacks["pgd"].params["eps"] == 1 / 255 and XU2019.attacks["pgd"].params["steps"] == 10
    assert XU2019.attacks["stadv"].params["tau"] == 0.05 and XU2019.attacks["stadv"].params["optimizer"] == "lbfgs"
    with pytest.raises(dataclasses.FrozenInstanceError):
        XU2019.n_test = 5
    with pytest.raises(TypeError):
        XU2019.attacks["pgd"].params["eps"] = 1.0
    table = XU2019.table()
    assert list(table.index) == ["fgsm", "pgd", "stadv"] and "eps" in table.columns
    assert set(evaluate.PRESETS) == {"xu2019", "stutz2021"}
    with pytest.raises(ValueError, match="attack"):
        AttackSpec("deepfool")


def test_evaluate_attacks_table(trained_cnn, digits_test):
    x, y = digits_test[0][:64], digits_test[1][:64]
    specs = {"fgsm": AttackSpec("fgsm", {"eps": EPS}), "pgd": AttackSpec("pgd", {"eps": EPS, "steps": 3}),
             "stadv": AttackSpec("stadv", {"steps": 3, "optimizer": "adam", "lr": 0.1})}
    result = evaluate_attacks(trained_cnn, x, y, specs, batch_size=40)
    frame = pd.DataFrame(result)
    assert list(frame.index) == ["clean", "fgsm", "pgd", "stadv"]
    assert list(frame.columns) == ["accuracy", "loss", "ssim_distance"]
    assert result["accuracy"]["clean"] == pytest.approx(accuracy(trained_cnn, x, y))
    assert result["accuracy"]["pgd"] < result["accuracy"]["clean"]
    assert result["loss"]["pgd"] > result["loss"]["clean"] and result["ssim_distance"]["fgsm"] > 0
    assert result["accuracy"]["fgsm"] == pytest.approx(robust_accuracy(trained_cnn, x, y, "fgsm", eps=EPS))


def test_evaluate_with_a_preset_uses_its_subset(trained_cnn, digits_test):
    x, y = digits_test
    preset = dataclasses.replace(STUTZ2021, n_test=32, attacks={
        "pgd": AttackSpec("pgd", {**STUTZ2021.attacks["pgd"].params, "steps": 2, "restarts": 2})})
    result = evaluate_attacks(trained_cnn, x, y, preset, ssim=False)
    assert result["accuracy"]["clean"] == pytest.approx(accuracy(trained_cnn, x[:32], y[:32]))
    assert "ssim_distance" not in result


@pytest.mark.parametrize("call,match", [
    (lambda m, x, y: accuracy(m, x, y, batch_size=0), "batch_size"),
    (lambda m, x, y: accuracy(m, x, y[:3]), "y"),
    (lambda m, x, y: robust_accuracy(m, x, y, "nope"), "attack"),
    (lambda m, x, y: robust_accuracy(m, x, y, "pgd", eps=-1.0), "eps"),
    (lambda m, x, y: accuracy(m, x, y, precision="half"), "precision='half'"),
])
def test_bad_input(call, match, trained_cnn, digits_test):
    with pytest.raises(ValueError, match=match):
        call(trained_cnn, *digits_test)
