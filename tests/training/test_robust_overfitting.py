"""advkit.training.robust_overfitting: per-epoch robust metrics on fixed subsets and early stopping."""

import pytest
import torch

from advkit._torch import loss_and_accuracy, to_float
from advkit.attacks.evaluate import AttackSpec, robust_accuracy
from advkit.data import Batcher
from advkit.models import get_model
from advkit.runs.checkpoints import load_checkpoint, load_model
from advkit.training.fit import TrainConfig, fit
from advkit.training.objectives import PGDAT
from advkit.training.regularizers import noisy_labels
from advkit.training.robust_overfitting import (
    EARLY_STOP_ATTACK,
    EPOCH_ATTACK,
    early_stopping_indices,
    epoch_robust_metrics,
    stutz_subsets,
)

ATTACK = AttackSpec("pgd", dict(eps=0.1, alpha=0.04, steps=3))



def test_stutz_subsets_early_stop_on_the_last_test_images(digits):
    s = stutz_subsets(digits, n_train=100, n_test=50, n_val=80)
    n = len(digits.y_test)  # 360
    assert torch.equal(s["val"][0], digits.x_test[n - 80:]) and torch.equal(s["val"][1], digits.y_test[n - 80:])
    assert torch.equal(s["train"][0], digits.x_train)  # Stutz et al. train on the whole training set
    assert torch.equal(s["train_sub"][0], digits.x_train[:100]) and torch.equal(s["test_sub"][0], digits.x_test[:50])
    assert EPOCH_ATTACK.params["steps"] == 20 and EPOCH_ATTACK.params["restarts"] == 1
    assert EARLY_STOP_ATTACK.params["steps"] == 7 and EARLY_STOP_ATTACK.params["eps"] == pytest.approx(8 / 255)


def test_early_stopping_indices_are_the_last_500_of_cifar10_test():
    idx = early_stopping_indices(10_000, 500, n_test=1000)  # Stutz et al. Sec. 3
    assert idx == range(9500, 10_000) and set(idx).isdisjoint(range(1000))
    with pytest.raises(ValueError, match="overlap"):
        early_stopping_indices(360, 100, n_test=300)  # digits: first 300 and last 100 share 40 images
    with pytest.raises(ValueError, match="n_val"):
        early_stopping_indices(360, 0)


def test_robust_metrics_columns_and_values(trained_cnn, digits):
    train, test = (digits.x_train[:64], digits.y_train[:64]), (digits.x_test[:64], digits.y_test[:64])
    evaluate = epoch_robust_metrics(train, test, None, ATTACK)
    row = evaluate(trained_cnn)
    assert set(row) == {f"{s}_{m}" for s in ("train", "test")
                        for m in ("loss_sub", "acc_sub", "robust_loss", "robust_err")} | {"eval_time_s"}
    loss, acc = loss_and_accuracy(trained_cnn, *test)
    assert row["test_loss_sub"] == pytest.approx(loss) and row["test_acc_sub"] == pytest.approx(acc)
    robust = robust_accuracy(trained_cnn, to_float(test[0]), test[1], ATTACK, seed=0)
    assert row["test_robust_err"] == pytest.approx(1 - robust)
    assert row["test_robust_err"] > 1 - acc and row["test_robust_loss"] > row["test_loss_sub"]
    assert evaluate(trained_cnn)["test_robust_loss"] == row["test_robust_loss"]  # same starts every epoch


@pytest.mark.slow
def test_early_stopping_keeps_the_epoch_with_lowest_held_out_robust_loss(digits, tmp_path):
    s = stutz_subsets(digits, n_train=64, n_test=64, n_val=100)
    x, y = s["train"][0][:128], s["train"][1][:128]
    evaluate = epoch_robust_metrics(None, None, s["val"], ATTACK)
    torch.manual_seed(0)
    model = get_model("small_cnn", 10, 1)
    config = TrainConfig(epochs=10, lr=0.1, schedule="constant", seed=1)
    # Half the labels wrong: the held-out robust loss falls, then rises as the noise is memorized.
    result = fit(model, Batcher(x, noisy_labels(y, 0.5, 10, seed=0), 32, seed=1), config,
                 objective=PGDAT(eps=0.1, alpha=0.04, steps=3), evaluate=evaluate, select="val_robust_loss",
                 keep_epochs=(2, 10), run=tmp_path, name="es", progress=False)
    history = result.history
    best = int(history["val_robust_loss"].idxmin()) + 1
    assert 1 < best < 10  # the scenario has an interior optimum, so "last" or "first" would fail
    assert result.best_epoch == best
    assert evaluate(result.early)["val_robust_loss"] == pytest.approx(history["val_robust_loss"].min(), rel=1e-6)
    assert evaluate(result.model)["val_robust_loss"] == pytest.approx(history["val_robust_loss"].iloc[-1], rel=1e-6)
    for file, expected, epoch in (("es.pt", result.model, 10), ("es_early.pt", result.early, best)):
        saved = load_model(tmp_path / "models" / file)  # both loadable, final and early stopped
        assert all(torch.equal(a, b) for a, b in zip(saved.state_dict().values(), expected.state_dict().values()))
        assert load_checkpoint(tmp_path / "models" / file)["epoch"] == epoch
    assert (tmp_path / "models" / "es_e002.pt").exists() and (tmp_path / "models" / "es_e010.pt").exists()
    assert {"val_robust_loss", "val_robust_err", "val_acc_sub"} <= set(history.columns)


@pytest.mark.parametrize("kwargs, match", [
    (dict(attack="pgdx"), "attack='pgdx'"),
    (dict(attack=3), "attack must be"),
    (dict(train_subset=(torch.zeros(4, 8, 8), torch.zeros(4))), "train_subset"),
    (dict(train_subset=None), "at least one"),
])
def test_bad_input(digits, kwargs, match):
    args = {"train_subset": (digits.x_train[:8], digits.y_train[:8]), "test_subset": None, **kwargs}
    with pytest.raises(ValueError, match=match):
        epoch_robust_metrics(**args)
