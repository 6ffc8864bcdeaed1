"""Robust overfitting curves and early stopping (Rice et al. 2020; Stutz et al. 2021, Sec. 4 and Fig. 2).

Per epoch, on fixed subsets (Stutz et al.: the first 1000 training and 1000 test images, and
500 held-out training images for early stopping), record clean loss/accuracy and the robust
loss (RLoss, mean CE on PGD examples) and robust error (RErr) into `fit`'s history:

    subsets = stutz_subsets(data)
    evaluate = epoch_robust_metrics(subsets["train_sub"], subsets["test_sub"], subsets["val"])
    fit(model, Batcher(*subsets["train"], 128), config, objective="pgd_at", evaluate=evaluate,
        select="val_robust_loss", keep_epochs=(10, 50, 100), run=run, name="pgd_at")

`select="val_robust_loss"` keeps the weights of the epoch with the lowest held-out RLoss;
`keep_epochs` saves checkpoints along the way ("flatness throughout training", Fig. 5).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from advkit.data import Dataset, split_validation, subset
from advkit.evaluate import STUTZ2021, AttackSpec
from advkit.evaluate import robust_metrics as _attack_metrics
from advkit.train import loss_and_accuracy

Split = tuple[torch.Tensor, torch.Tensor]

# Per-epoch attack: Stutz et al.'s PGD (eps 8/255, step 0.007, 20 iterations) with one restart
# (their final evaluation uses 10); a fixed seed gives every epoch the same random starts.
EPOCH_ATTACK = AttackSpec("pgd", {**STUTZ2021.attacks["pgd"].params, "restarts": 1})


def stutz_subsets(data: Dataset, n_train: int = 1000, n_test: int = 1000, n_val: int = 500,
                  seed: int = 0) -> dict[str, Split]:
    """{"train": the training set minus the held-out images, "val": n_val held-out training
    images (random, seeded), "train_sub": the first n_train of "train", "test_sub": the first
    n_test test images}; uint8 images as in the Dataset."""
    train, val = split_validation(data.x_train, data.y_train, n_val, seed=seed)
    return {"train": train, "val": val, "train_sub": subset(*train, n_train),
            "test_sub": subset(data.x_test, data.y_test, n_test)}


def epoch_robust_metrics(train_subset: Split | None, test_subset: Split | None, val_subset: Split | None = None,
                   attack: str | AttackSpec | Callable[..., torch.Tensor] = EPOCH_ATTACK, *,
                   batch_size: int = 500, seed: int = 0, amp: bool = True,
                   **attack_kwargs: Any) -> Callable[[nn.Module], dict[str, float]]:
    """An `evaluate(model)` for `fit(..., evaluate=)`: per split s in (train, test, val) given,
    s_loss_sub / s_acc_sub (clean, on the subset), s_robust_loss (RLoss) and s_robust_err
    (RErr = 1 - robust accuracy) under `attack` (a name, AttackSpec or callable; `attack_kwargs`
    override its settings), plus eval_time_s. The same `seed` every epoch: comparable curves."""
    splits = {"train": train_subset, "test": test_subset, "val": val_subset}
    for name, split in splits.items():
        if split is not None and (len(split) != 2 or split[0].dim() != 4 or len(split[0]) != len(split[1])
                                  or len(split[1]) == 0):
            raise ValueError(f"{name}_subset must be (x, y) with x (N, C, H, W), N = len(y) >= 1")
    if all(s is None for s in splits.values()):
        raise ValueError("give at least one of train_subset, test_subset, val_subset")
    if isinstance(attack, str):
        attack = AttackSpec(attack)  # raises ValueError naming unknown attacks
    if not callable(attack):
        raise ValueError(f"attack must be an attack name, an AttackSpec or a callable, got {attack!r}")

    def evaluate(model: nn.Module) -> dict[str, float]:
        t0 = time.perf_counter()
        row: dict[str, float] = {}
        for name, split in splits.items():
            if split is None:
                continue
            x, y = split
            row[f"{name}_loss_sub"], row[f"{name}_acc_sub"] = loss_and_accuracy(model, x, y, batch_size, amp=amp)
            robust = _attack_metrics(model, x, y, attack, batch_size, seed=seed, **attack_kwargs)
            row[f"{name}_robust_loss"], row[f"{name}_robust_err"] = robust["loss"], 1.0 - robust["accuracy"]
        row["eval_time_s"] = time.perf_counter() - t0
        return row

    return evaluate
