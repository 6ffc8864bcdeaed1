"""One training loop for every objective, with per-epoch evaluation and exact resume.

`fit` checkpoints its whole state after every epoch and reseeds all randomness from
(seed, epoch) at the start of each epoch, so a run killed at any point and started
again ends with exactly the weights of an uninterrupted run.
"""

from __future__ import annotations

import copy
import inspect
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn, update_bn
from tqdm.auto import tqdm

from advkit.attack_utils import autocast
from advkit.data import Batcher, to_float
from advkit.objectives import Objective, get_objective
from advkit.runs import atomic_path, atomic_write_text, load_checkpoint, save_model, verified

OPTIMIZERS = ("sgd", "adam")
SCHEDULES = ("constant", "multistep", "cosine", "onecycle")
EARLY_SUFFIX = "_early"  # models/<name>_early.pt: the early-stopped weights of <name>


@dataclass
class TrainConfig:
    """Everything that determines a training run (stored with the checkpoint)."""

    epochs: int = 10
    batch_size: int = 128
    optimizer: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    schedule: str = "multistep"
    milestones: tuple[float, ...] = (0.5, 0.75)  # fractions of training, for "multistep"
    gamma: float = 0.1
    label_smoothing: float = 0.0
    augment: bool = True
    padding: int = 4
    seed: int = 0
    ema_decay: float | None = None  # exponential moving average of the weights
    swa_start: float | None = None  # fraction of training after which SWA averages the weights
    amp: bool = True  # bf16 autocast on CUDA
    channels_last: bool = True  # on CUDA

    def __post_init__(self):
        self.milestones = tuple(self.milestones)
        checks = {
            "epochs": (self.epochs >= 1, ">= 1"),
            "batch_size": (self.batch_size >= 1, ">= 1"),
            "lr": (self.lr > 0, "> 0"),
            "weight_decay": (self.weight_decay >= 0, ">= 0"),
            "optimizer": (self.optimizer in OPTIMIZERS, f"one of {OPTIMIZERS}"),
            "schedule": (self.schedule in SCHEDULES, f"one of {SCHEDULES}"),
            "label_smoothing": (0 <= self.label_smoothing < 1, "in [0, 1)"),
            "ema_decay": (self.ema_decay is None or 0 < self.ema_decay < 1, "None or in (0, 1)"),
            "swa_start": (self.swa_start is None or 0 <= self.swa_start < 1, "None or in [0, 1)"),
            "milestones": (all(0 < m < 1 for m in self.milestones), "fractions in (0, 1)"),
        }
        for name, (ok, allowed) in checks.items():
            if not ok:
                raise ValueError(f"{name}={getattr(self, name)!r} is invalid: must be {allowed}")
        if self.ema_decay is not None and self.swa_start is not None:
            raise ValueError("ema_decay and swa_start are exclusive: choose one weight average")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown training settings {sorted(unknown)}; allowed: {sorted(names)}")
        return cls(**d)


@dataclass
class FitResult:
    model: nn.Module  # the final weights (Stutz et al. 2021 do not early-stop by default)
    history: pd.DataFrame
    best_epoch: int | None = None
    resumed_from: int = 0  # epochs already done when this call started
    files: dict[str, Path] = field(default_factory=dict)
    early: nn.Module | None = None  # with `select`: a copy holding the best epoch's weights


@torch.no_grad()
def loss_and_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1024,
                      amp: bool = True) -> tuple[float, float]:
    """Mean cross-entropy and top-1 accuracy over (x, y), in large batches, model in eval mode."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total_loss = torch.zeros((), device=device, dtype=torch.float64)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    for i in range(0, len(y), batch_size):
        xb, yb = to_float(x[i:i + batch_size].to(device)), y[i:i + batch_size].to(device)
        with autocast(device, None if amp else False):
            logits = model(xb).float()
        total_loss += F.cross_entropy(logits, yb, reduction="sum")
        correct += (logits.argmax(1) == yb).sum()
    model.train(was_training)
    return total_loss.item() / len(y), correct.item() / len(y)


def _lr_lambda(config: TrainConfig, total_steps: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        t = step / max(total_steps, 1)
        if config.schedule == "multistep":
            return config.gamma ** sum(t >= m for m in config.milestones)
        if config.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * t))
        return 1.0
    return factor


def _make_optimizer(model: nn.Module, config: TrainConfig, steps_per_epoch: int):
    params = [p for p in model.parameters() if p.requires_grad]
    if config.optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=config.lr, momentum=config.momentum,
                              nesterov=config.nesterov and config.momentum > 0, weight_decay=config.weight_decay)
    else:
        opt = torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    total = config.epochs * steps_per_epoch
    if config.schedule == "onecycle":
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=config.lr, total_steps=total)
    else:
        sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(config, total))
    return opt, sched


def _epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch) % (2**63)


def fit(model: nn.Module, train: Batcher, config: TrainConfig, *,
        objective: Objective | str = "clean",
        test: tuple[torch.Tensor, torch.Tensor] | None = None,
        evaluate: Callable[[nn.Module], dict[str, float]] | None = None,
        run: str | Path | None = None, name: str = "model",
        select: str | None = None, keep_epochs: Sequence[int] = (),
        stop_after: int | None = None, progress: bool = True) -> FitResult:
    """Train `model` on `train` batches with `objective`; evaluate, log and checkpoint every epoch.

    - `test`: (x, y) for per-epoch clean test loss/accuracy; `evaluate(model)` adds more metrics
      (robust loss, robust error, ...) to each history row.
    - `run`/`name`: write `history/<name>.csv`, `models/<name>.pt` and the resumable state
      `checkpoints/<name>.state.pt` under the run directory; an existing state is resumed
      (its config must equal `config`).
    - `select`: a history column to minimize (e.g. "val_robust_loss"): early stopping. The final
      weights stay the result (`models/<name>.pt`, FitResult.model); the best epoch's weights are
      kept as well (`models/<name>_early.pt`, FitResult.early), so both can be compared.
      `keep_epochs`: also save `models/<name>_e<NNN>.pt` at these epochs.
    - `stop_after`: stop (as if interrupted) after this many epochs; for tests and time budgets.
    """
    device = next(model.parameters()).device
    if isinstance(objective, str):
        objective = _named_objective(objective, config.label_smoothing)
    if device.type == "cuda" and config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    train.batch_size, train.augment, train.padding, train.seed = (
        config.batch_size, config.augment, config.padding, config.seed)
    opt, sched = _make_optimizer(model, config, len(train))
    averaged = _make_average(model, config)
    paths = _paths(run, name)

    history: list[dict[str, Any]] = []
    best: tuple[float, int, dict[str, torch.Tensor]] | None = None
    start = 0
    if paths and paths["state"].exists():
        state = load_checkpoint(paths["state"], map_location=device)
        _check_same_config(state["config"], asdict(config), paths["state"])
        model.load_state_dict(state["state_dict"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        if averaged is not None:
            averaged.load_state_dict(state["averaged"])
        history = list(pd.read_csv(verified(paths["history"])).to_dict("records")) if paths["history"].exists() else []
        history = history[:state["epoch"]]
        if state.get("best_state") is not None:
            best = (state["best_value"], state["best_epoch"], state["best_state"])
        start = state["epoch"]

    epochs = range(start + 1, config.epochs + 1)
    bar = tqdm(epochs, desc=f"train {name}", disable=not progress, initial=start, total=config.epochs)
    for epoch in bar:
        if stop_after is not None and epoch > stop_after:
            break
        torch.manual_seed(_epoch_seed(config.seed, epoch))
        train.set_epoch(epoch)
        if hasattr(objective, "on_epoch_start"):  # e.g. a warm-up that depends on the epoch
            objective.on_epoch_start(epoch)
        t0 = time.perf_counter()
        row = {"epoch": epoch, "lr": opt.param_groups[0]["lr"],
               **_train_one_epoch(model, train, objective, opt, sched, averaged, config, device)}
        _check_finite(model, row["train_loss"], name, epoch)  # before anything of this epoch is saved
        if averaged is not None and config.swa_start is not None and epoch == config.epochs:
            update_bn(train, averaged, device=device)
        eval_model = averaged.module if averaged is not None else model
        if test is not None:
            row["test_loss"], row["test_acc"] = loss_and_accuracy(eval_model, *test, amp=config.amp)
        if evaluate is not None:
            row.update(evaluate(eval_model))
        row["time_s"] = time.perf_counter() - t0
        history.append(row)
        if select is not None:
            if select not in row:
                raise ValueError(f"select={select!r} is not a history column; columns: {sorted(row)}")
            if best is None or row[select] < best[0]:
                best = (row[select], epoch, {k: v.detach().clone() for k, v in eval_model.state_dict().items()})
        bar.set_postfix({k: f"{v:.3f}" for k, v in row.items() if k.endswith(("loss", "acc"))})
        if paths:
            _write_history(paths["history"], history)
            if epoch in keep_epochs:
                save_model(paths["models"] / f"{name}_e{epoch:03d}.pt", eval_model, asdict(config), epoch=epoch)
            _save_state(paths["state"], model, opt, sched, averaged, config, epoch, best)

    final = averaged.module if averaged is not None else model
    early = None
    if best is not None:
        early = copy.deepcopy(final)
        early.load_state_dict(best[2])
    done = len(history) == config.epochs
    files = {}
    if paths and done:
        files["model"] = save_model(paths["models"] / f"{name}.pt", final, asdict(config), epoch=len(history))
        if early is not None:
            files["early"] = save_model(paths["models"] / f"{name}{EARLY_SUFFIX}.pt", early, asdict(config),
                                        epoch=best[1], early_stopped=True, select=select)
        files["history"] = paths["history"]
    return FitResult(final, pd.DataFrame(history), best[1] if best else None, start, files, early)


def _named_objective(name: str, label_smoothing: float) -> Objective:
    """A registered objective, given the config's label smoothing when it takes one."""
    from advkit.objectives import OBJECTIVES

    if name in OBJECTIVES and "label_smoothing" in inspect.signature(OBJECTIVES[name]).parameters:
        return get_objective(name, label_smoothing=label_smoothing)
    if label_smoothing:
        raise ValueError(f"label_smoothing={label_smoothing} but objective {name!r} does not take it")
    return get_objective(name)


def _check_finite(model: nn.Module, train_loss: float, name: str, epoch: int) -> None:
    """Fail fast on divergence: a non-finite training loss or weight raises FloatingPointError
    naming the model and epoch, so no NaN model, checkpoint or history row is ever saved."""
    bad = [k for k, p in model.state_dict().items() if p.is_floating_point() and not torch.isfinite(p).all()]
    if math.isfinite(train_loss) and not bad:
        return
    raise FloatingPointError(
        f"training {name!r} diverged in epoch {epoch}: mean training loss {train_loss}, non-finite weights in "
        f"{len(bad)} tensor(s) {bad[:3]}. Nothing of this epoch was saved; lower the learning rate or check "
        "the objective's settings (the checkpoint of the previous epoch, if any, still resumes)")


def _train_one_epoch(model, train, objective, opt, sched, averaged, config, device) -> dict[str, float]:
    model.train()
    total = torch.zeros((), device=device)
    for x, y in train:
        if device.type == "cuda" and config.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(device, None if config.amp else False):
            loss = objective(model, x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if hasattr(objective, "after_backward"):
            objective.after_backward(model)
        opt.step()
        if hasattr(objective, "after_step"):
            objective.after_step(model)
        sched.step()
        if averaged is not None and (config.swa_start is None
                                     or sched.last_epoch >= config.swa_start * config.epochs * len(train)):
            averaged.update_parameters(model)
        total += loss.detach().float()
    return {"train_loss": total.item() / len(train)}


def _make_average(model: nn.Module, config: TrainConfig) -> AveragedModel | None:
    if config.ema_decay is not None:
        return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(config.ema_decay), use_buffers=True)
    if config.swa_start is not None:
        return AveragedModel(model)
    return None


def _paths(run: str | Path | None, name: str) -> dict[str, Path] | None:
    if run is None:
        return None
    run = Path(run)
    for sub in ("models", "history", "checkpoints"):
        (run / sub).mkdir(parents=True, exist_ok=True)
    return {"models": run / "models", "history": run / "history" / f"{name}.csv",
            "state": run / "checkpoints" / f"{name}.state.pt"}


def _check_same_config(saved: dict[str, Any], current: dict[str, Any], path: Path) -> None:
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        if (list(a) if isinstance(a, tuple) else a) != (list(b) if isinstance(b, tuple) else b):
            raise ValueError(f"{path} was trained with {key}={a!r}, but this call asks for {key}={b!r}: "
                             "delete the checkpoint or choose another name")


def _write_history(path: Path, history: list[dict[str, Any]]) -> None:
    atomic_write_text(path, pd.DataFrame(history).to_csv(index=False, float_format="%.6g"))


def _save_state(path, model, opt, sched, averaged, config, epoch, best) -> None:
    state = {"arch": getattr(model, "advkit_spec", {}).get("arch", "unknown"),
             "state_dict": model.state_dict(), "optimizer": opt.state_dict(),
             "scheduler": sched.state_dict(), "config": asdict(config), "epoch": epoch,
             "averaged": averaged.state_dict() if averaged is not None else None,
             "best_value": best[0] if best else None, "best_epoch": best[1] if best else None,
             "best_state": best[2] if best else None}
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


# Training settings of each paper's CIFAR-10 code (TrainConfig fields), for `paper_config`.
PAPER_TRAINING: dict[str, dict[str, Any]] = {
    # Rice et al. 2020 (PreAct ResNet-18): SGD 0.1, x0.1 at 50% and 75% of 200 epochs.
    "pgd_at": dict(epochs=200, batch_size=128, optimizer="sgd", lr=0.1, momentum=0.9, nesterov=False,
                   weight_decay=5e-4, schedule="multistep", milestones=(0.5, 0.75), gamma=0.1),
    # Wong et al. 2020: cyclic lr up to 0.2 over 15 epochs (OneCycleLR approximates their triangle).
    "fgsm_rs": dict(epochs=15, batch_size=128, optimizer="sgd", lr=0.2, momentum=0.9, nesterov=False,
                    weight_decay=5e-4, schedule="onecycle"),
    # Zhang et al. 2019: SGD 0.1, wd 2e-4, 80 epochs, x0.1 at epoch 75.
    "trades": dict(epochs=80, batch_size=128, optimizer="sgd", lr=0.1, momentum=0.9, nesterov=False,
                   weight_decay=2e-4, schedule="multistep", milestones=(75 / 80,), gamma=0.1),
    # Wang et al. 2020 (ResNet-18 script): SGD 0.01, wd 3.5e-3, 120 epochs, x0.1 at 75, 90, 100.
    "mart": dict(epochs=120, batch_size=128, optimizer="sgd", lr=0.01, momentum=0.9, nesterov=False,
                 weight_decay=3.5e-3, schedule="multistep", milestones=(75 / 120, 90 / 120, 100 / 120), gamma=0.1),
    # Wu et al. 2020 AT-AWP (built on Rice et al.'s code): as pgd_at.
    "awp": dict(epochs=200, batch_size=128, optimizer="sgd", lr=0.1, momentum=0.9, nesterov=False,
                weight_decay=5e-4, schedule="multistep", milestones=(0.5, 0.75), gamma=0.1),
}


def paper_config(objective: str, epochs: int | None = None, **overrides: Any) -> TrainConfig:
    """The TrainConfig of `objective`'s paper (PAPER_TRAINING); `epochs` rescales the schedule
    (milestones are fractions of training), `overrides` replace any field."""
    if objective not in PAPER_TRAINING:
        raise ValueError(f"objective={objective!r} has no paper config; choose one of {sorted(PAPER_TRAINING)}")
    settings = {**PAPER_TRAINING[objective], **({"epochs": epochs} if epochs is not None else {}), **overrides}
    return TrainConfig(**settings)
