"""Robust overfitting curves and early stopping (Rice et al. 2020; Stutz et al. 2021, Sec. 4 and Fig. 2).

Per epoch, on fixed subsets (Stutz et al. Sec. 3: the first 1000 training and 1000 test images;
for early stopping, the LAST 500 test images under PGD-7), record clean loss/accuracy and the
robust loss (RLoss, mean CE on PGD examples) and robust error (RErr) into `fit`'s history:

    subsets = stutz_subsets(data)
    evaluate = epoch_robust_metrics(subsets["train_sub"], subsets["test_sub"], subsets["val"],
                                    val_attack=EARLY_STOP_ATTACK)
    fit(model, Batcher(*subsets["train"], 128, augment=True), config, objective="pgd_at", evaluate=evaluate,
        select="val_robust_loss", keep_epochs=(10, 50, 100), run=run, name="pgd_at")

Stutz et al. do not early-stop by default: `fit` returns and saves the final weights as
`<name>.pt` and, with `select="val_robust_loss"`, also the epoch with the lowest RLoss on the
last test images as `<name>_early.pt` (Table 1's early-stopped column); `keep_epochs` saves
checkpoints along the way ("flatness throughout training", Fig. 5).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from advkit._checks import check_int
from advkit._torch import check_precision, loss_and_accuracy
from advkit.attacks.evaluate import STUTZ2021, AttackSpec
from advkit.attacks.evaluate import robust_metrics as _attack_metrics
from advkit.data import Dataset, subset

Split = tuple[torch.Tensor, torch.Tensor]

# Per-epoch attack: Stutz et al.'s PGD (eps 8/255, step 0.007, 20 iterations) with one restart
# (their final evaluation uses 10); a fixed seed gives every epoch the same random starts.
EPOCH_ATTACK = AttackSpec("pgd", {**STUTZ2021.attacks["pgd"].params, "restarts": 1})
# Early stopping (Stutz et al. Sec. 3): PGD-7 at 8/255 (their training attack; step 2/255 as PGD-AT).
EARLY_STOP_ATTACK = AttackSpec("pgd", {"eps": 8 / 255, "alpha": 2 / 255, "steps": 7, "restarts": 1})


def early_stopping_indices(n_test_total: int, n_val: int, n_test: int = 0) -> range:
    """Indices of the early-stopping images: the LAST n_val of the n_test_total test images
    (Stutz et al. Sec. 3), disjoint from the first n_test used for evaluation."""
    check_int("n_test_total", n_test_total)
    check_int("n_val", n_val)
    check_int("n_test", n_test, minimum=0)
    if n_val > n_test_total:
        raise ValueError(f"n_val={n_val} exceeds the {n_test_total} test images")
    if min(n_test, n_test_total) + n_val > n_test_total:
        raise ValueError(f"the first n_test={n_test} and the last n_val={n_val} test images overlap "
                         f"({n_test_total} test images): need n_test + n_val <= {n_test_total}")
    return range(n_test_total - n_val, n_test_total)


def stutz_subsets(data: Dataset, n_train: int = 1000, n_test: int = 1000, n_val: int = 500) -> dict[str, Split]:
    """{"train": the whole training set, "train_sub": its first n_train images, "test_sub": the
    first n_test test images, "val": the LAST n_val test images (early stopping, Stutz et al.
    Sec. 3; disjoint from test_sub, else ValueError)}; uint8 images as in the Dataset."""
    idx = early_stopping_indices(len(data.y_test), n_val, min(n_test, len(data.y_test)))
    return {"train": (data.x_train, data.y_train), "val": (data.x_test[idx.start:], data.y_test[idx.start:]),
            "train_sub": subset(data.x_train, data.y_train, n_train),
            "test_sub": subset(data.x_test, data.y_test, n_test)}


def epoch_robust_metrics(train_subset: Split | None, test_subset: Split | None, val_subset: Split | None = None,
                   attack: str | AttackSpec | Callable[..., torch.Tensor] = EPOCH_ATTACK, *,
                   val_attack: str | AttackSpec | Callable[..., torch.Tensor] | None = None,
                   batch_size: int = 500, seed: int = 0, precision: str = "auto",
                   **attack_kwargs: Any) -> Callable[[nn.Module], dict[str, float]]:
    """An `evaluate(model)` for `fit(..., evaluate=)`: per split s in (train, test, val) given,
    s_loss_sub / s_acc_sub (clean, on the subset), s_robust_loss (RLoss) and s_robust_err
    (RErr = 1 - robust accuracy) under `attack` (a name, AttackSpec or callable; `attack_kwargs`
    override its settings; the val split uses `val_attack` when given, e.g. EARLY_STOP_ATTACK),
    plus eval_time_s. The same `seed` every epoch: comparable curves; `precision` of the clean
    evaluation (advkit._torch.PRECISIONS)."""
    check_precision(precision)
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
    if isinstance(val_attack, str):
        val_attack = AttackSpec(val_attack)
    if val_attack is not None and not callable(val_attack):
        raise ValueError(f"val_attack must be None, an attack name, an AttackSpec or a callable, got {val_attack!r}")
    attacks = {"train": attack, "test": attack, "val": val_attack or attack}

    def evaluate(model: nn.Module) -> dict[str, float]:
        t0 = time.perf_counter()
        row: dict[str, float] = {}
        for name, split in splits.items():
            if split is None:
                continue
            x, y = split
            row[f"{name}_loss_sub"], row[f"{name}_acc_sub"] = loss_and_accuracy(model, x, y, batch_size=batch_size,
                                                                                 precision=precision)
            robust = _attack_metrics(model, x, y, attacks[name], batch_size, seed=seed, **attack_kwargs)
            row[f"{name}_robust_loss"], row[f"{name}_robust_err"] = robust["loss"], 1.0 - robust["accuracy"]
        row["eval_time_s"] = time.perf_counter() - t0
        return row

    return evaluate
