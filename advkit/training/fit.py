"""One training loop for every objective, with per-epoch evaluation and exact resume.

`fit` checkpoints its whole state after every epoch and reseeds all randomness from
(seed, epoch) at the start of each epoch, so a run killed at any point and started
again ends with exactly the weights of an uninterrupted run. The data side of training
(batch size, augmentation, order) is the Batcher's, used as given; `TrainConfig` holds the rest.
"""

from __future__ import annotations

import copy
import inspect
import io
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn, update_bn
from tqdm.auto import tqdm

from advkit._checks import OPTIMIZERS, RECIPES, SCHEDULES, check_choice, check_int, check_number, check_seed
from advkit._torch import autocast, check_precision, gpu_policy, loss_and_accuracy, model_device, train_mode
from advkit.attacks.evaluate import evaluate_attacks
from advkit.attacks.model import COMPILE_MODES, forward_fn
from advkit.data import Batcher, Dataset
from advkit.models import IMAGENET_MEAN, IMAGENET_STD, get_model, load_akamaster_checkpoint
from advkit.progress import LoopProgress
from advkit.runs.artifacts import as_stored, atomic_path
from advkit.runs.checkpoints import load_checkpoint, save_model
from advkit.runs.run import EARLY_SUFFIX, Run
from advkit.training.objectives import Objective, get_objective

__all__ = ["EARLY_SUFFIX", "FAST_RECIPE", "FitResult", "PAPER_TRAINING", "TrainConfig", "apply_recipe", "fast_config",
           "fit", "loss_and_accuracy", "paper_config"]


@dataclass
class TrainConfig:
    """The optimization side of a training run (stored with the checkpoint; a resume must match).
    Batch size, augmentation and data order are the Batcher's (`advkit.data.Batcher`)."""

    epochs: int = 10
    optimizer: str = "sgd"  # OPTIMIZERS
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    schedule: str = "multistep"  # SCHEDULES
    milestones: tuple[float, ...] = (0.5, 0.75)  # fractions of training, for "multistep"
    gamma: float = 0.1
    label_smoothing: float = 0.0
    seed: int = 0  # reseeds torch's global RNG every epoch: the objectives' random starts
    ema_decay: float | None = None  # exponential moving average of the weights
    swa_start: float | None = None  # fraction of training after which SWA averages the weights
    precision: str = "auto"  # advkit._torch.PRECISIONS: auto = bf16 autocast on CUDA, fp32 elsewhere
    channels_last: bool = True  # on CUDA
    recipe: str = "paper"  # RECIPES: paper: the fields as given; fast: made by fast_config (FAST_RECIPE)
    compile: bool | str = False  # torch.compile the training step's model: True or a mode (COMPILE_MODES)

    def __post_init__(self):
        self.milestones = tuple(self.milestones)
        check_int("epochs", self.epochs)
        check_choice("optimizer", self.optimizer, OPTIMIZERS)
        check_number("lr", self.lr, 0, low_open=True)
        check_number("weight_decay", self.weight_decay, 0)
        check_choice("schedule", self.schedule, SCHEDULES)
        check_seed("seed", self.seed)
        check_choice("recipe", self.recipe, RECIPES)
        check_number("momentum", self.momentum, 0, 1)
        check_number("gamma", self.gamma, 0, low_open=True)
        check_number("label_smoothing", self.label_smoothing, 0, 1, high_open=True)
        for m in self.milestones:
            check_number("milestones", m, 0, 1, low_open=True, high_open=True)
        if self.ema_decay is not None:
            check_number("ema_decay", self.ema_decay, 0, 1, low_open=True, high_open=True)
        if self.swa_start is not None:
            check_number("swa_start", self.swa_start, 0, 1, high_open=True)
        check_precision(self.precision)
        if not isinstance(self.compile, (bool, str)):
            raise ValueError(f"compile must be True, False or a mode {COMPILE_MODES[2:]}, got {self.compile!r}")
        check_choice("compile", self.compile, COMPILE_MODES)
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


def _lr_lambda(config: TrainConfig, total_steps: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        t = step / max(total_steps, 1)
        if config.schedule == "multistep":
            return config.gamma ** sum(t >= m for m in config.milestones)
        if config.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * t))
        return 1.0
    return factor


def _make_optimizer(model: nn.Module, config: TrainConfig, steps_per_epoch: int, device: torch.device | str):
    """The optimizer and its schedule; under the GPU policy (`gpu_policy`: on CUDA) the fused implementation
    (one kernel per step for all parameters instead of several per tensor), elsewhere torch's default
    (CPU results unchanged)."""
    params = [p for p in model.parameters() if p.requires_grad]
    impl = {"fused": True} if gpu_policy(device) else {}
    if config.optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, **impl,
                              nesterov=config.nesterov and config.momentum > 0, weight_decay=config.weight_decay)
    else:
        opt = torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay, **impl)
    total = config.epochs * steps_per_epoch
    if config.schedule == "onecycle":
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=config.lr, total_steps=total)
    else:
        sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(config, total))
    return opt, sched


HISTORY_FORMAT = "%.6g"  # the numbers of history/<name>.csv, which a resumed fit reads back


def _epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch) % (2**63)


def fit(model: nn.Module, train: Batcher, config: TrainConfig, *,
        objective: Objective | str = "clean",
        test: tuple[torch.Tensor, torch.Tensor] | None = None,
        evaluate: Callable[[nn.Module], dict[str, float]] | None = None,
        run: str | Path | Run | None = None, name: str = "model",
        select: str | None = None, keep_epochs: Sequence[int] = (),
        stop_after: int | None = None, progress: bool = True) -> FitResult:
    """Train `model` on the batches of `train` with `objective`; evaluate, log and checkpoint every epoch.

    - `train`: a Batcher, used as given (its batch size, augmentation, seed and order are the
      training's; `fit` changes none of them); `config`: everything else (TrainConfig).
    - `test`: (x, y) for per-epoch clean test loss/accuracy; `evaluate(model)` adds more metrics
      (robust loss, robust error, ...) to each history row.
    - `run`/`name`: write `history/<name>.csv`, `models/<name>.pt` and the resumable state
      `checkpoints/<name>.state.pt` under the run directory (`Run`); an existing state is resumed
      (its config and its Batcher's settings must equal these). FitResult.history is then the
      CSV's numbers (6 significant digits), so a fresh and a resumed fit plot the same figure.
    - `select`: a history column to minimize (e.g. "val_robust_loss"): early stopping. The final
      weights stay the result (`models/<name>.pt`, FitResult.model); the best epoch's weights are
      kept as well (`models/<name>_early.pt`, FitResult.early), so both can be compared.
      `keep_epochs`: also save `models/<name>_e<NNN>.pt` at these epochs.
    - `stop_after`: stop (as if interrupted) after this many epochs; for tests and time budgets.
    """
    device = model_device(model)
    if isinstance(objective, str):
        objective = _named_objective(objective, config.label_smoothing)
    if gpu_policy(device) and config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt, sched = _make_optimizer(model, config, len(train), device)
    step_model = forward_fn(model, compile=config.compile)  # the model, or its compiled form (same parameters)
    averaged = _make_average(model, config)
    run = Run.of(run) if run is not None else None
    recorded = {**asdict(config), "data": train.settings()}  # stored with every file; a resume must match

    history: list[dict[str, Any]] = []
    best: tuple[float, int, dict[str, torch.Tensor]] | None = None
    start = 0
    if run is not None and run.training_state(name).exists():
        state = load_checkpoint(run.training_state(name), map_location=device)
        saved = {**_ADDED_FIELDS, **state["config"], "data": state.get("data")}
        _check_same_settings(saved, recorded, run.training_state(name))
        model.load_state_dict(state["state_dict"])
        _load_optimizer(opt, state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        if averaged is not None:
            averaged.load_state_dict(state["averaged"])
        if run.history(name).exists():
            history = list(run.read_table(run.history(name)).to_dict("records"))[:state["epoch"]]
        if state.get("best_state") is not None:
            best = (state["best_value"], state["best_epoch"], state["best_state"])
        start = state["epoch"]

    epochs = range(start + 1, config.epochs + 1)
    bar = tqdm(epochs, desc=f"train {name}", disable=not progress, initial=start, total=config.epochs)
    steps = LoopProgress(f"train {name}", "epoch", config.epochs, start)  # the driver's log (advkit.progress)
    for epoch in bar:
        if stop_after is not None and epoch > stop_after:
            break
        torch.manual_seed(_epoch_seed(config.seed, epoch))
        train.set_epoch(epoch)
        if hasattr(objective, "on_epoch_start"):  # e.g. a warm-up that depends on the epoch
            objective.on_epoch_start(epoch)
        t0 = time.perf_counter()
        row = {"epoch": epoch, "lr": opt.param_groups[0]["lr"],
               **_train_one_epoch(model, step_model, train, objective, opt, sched, averaged, config, device)}
        _check_finite(model, row["train_loss"], name, epoch)  # before anything of this epoch is saved
        if averaged is not None and config.swa_start is not None and epoch == config.epochs:
            update_bn(train, averaged, device=device)
        eval_model = averaged.module if averaged is not None else model
        if test is not None:
            row["test_loss"], row["test_acc"] = loss_and_accuracy(eval_model, *test, precision=config.precision)
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
        if run is not None:
            run.write_table(run.history(name), pd.DataFrame(history), index=False, float_format=HISTORY_FORMAT)
            if epoch in keep_epochs:
                save_model(run.epoch_model(name, epoch), eval_model, recorded, epoch=epoch)
            _save_state(run.training_state(name), model, opt, sched, averaged, recorded, epoch, best)
        steps.step(epoch, ", ".join(f"{k} {v:.3f}" for k, v in row.items() if k.endswith(("loss", "acc"))))

    final = averaged.module if averaged is not None else model
    early = None
    if best is not None:
        early = copy.deepcopy(final)
        early.load_state_dict(best[2])
    done = len(history) == config.epochs
    files = {}
    if run is not None and done:
        files["model"] = save_model(run.model(name), final, recorded, epoch=len(history))
        if early is not None:
            files["early"] = save_model(run.early_model(name), early, recorded, epoch=best[1],
                                        early_stopped=True, select=select)
        files["history"] = run.history(name)
    table = pd.DataFrame(history)
    if run is not None and history:  # as history/<name>.csv holds it: a fresh and a resumed fit return the same
        table = pd.read_csv(io.StringIO(table.to_csv(index=False, float_format=HISTORY_FORMAT)))
    return FitResult(final, table, best[1] if best else None, start, files, early)


def _named_objective(name: str, label_smoothing: float) -> Objective:
    """A registered objective, given the config's label smoothing when it takes one."""
    from advkit.training.objectives import OBJECTIVES

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


def _train_one_epoch(model, step_model, train, objective, opt, sched, averaged, config, device) -> dict[str, float]:
    """One pass over `train`; the objective sees `step_model` (the model, or its compiled form)."""
    total = torch.zeros((), device=device)
    with train_mode(model, True):
        for x, y in train:
            if gpu_policy(device) and config.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast(device, config.precision):
                loss = objective(step_model, x, y)
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


# TrainConfig fields added after checkpoints existed: an older checkpoint was trained with these values.
_ADDED_FIELDS: dict[str, Any] = {"recipe": "paper", "compile": False}


def _load_optimizer(opt: torch.optim.Optimizer, saved: dict[str, Any]) -> None:
    """Load a saved optimizer state but keep this optimizer's implementation (fused under the GPU policy, torch's
    default elsewhere), so a training state moves between devices; Adam's step counters follow it."""
    impl = [{k: g[k] for k in ("fused", "foreach") if k in g} for g in opt.param_groups]
    opt.load_state_dict(saved)
    for group, flags in zip(opt.param_groups, impl):
        group.update(flags)
        for p in group["params"]:
            step = opt.state.get(p, {}).get("step")
            if torch.is_tensor(step):  # fused kernels read it on the parameter's device, the others on the CPU
                opt.state[p]["step"] = step.to(p.device if group.get("fused") else "cpu")


def _check_same_settings(saved: dict[str, Any], current: dict[str, Any], path: Path) -> None:
    saved, current = as_stored(saved), as_stored(current)
    for key in sorted(set(saved) | set(current)):
        if saved.get(key) != current.get(key):
            raise ValueError(f"{path} was trained with {key}={saved.get(key)!r}, but this call asks for "
                             f"{key}={current.get(key)!r}: delete the checkpoint or choose another name")


def _save_state(path, model, opt, sched, averaged, recorded, epoch, best) -> None:
    config = {k: v for k, v in recorded.items() if k != "data"}
    state = {"arch": getattr(model, "advkit_spec", {}).get("arch", "unknown"),
             "state_dict": model.state_dict(), "optimizer": opt.state_dict(),
             "scheduler": sched.state_dict(), "config": config, "data": recorded["data"], "epoch": epoch,
             "averaged": averaged.state_dict() if averaged is not None else None,
             "best_value": best[0] if best else None, "best_epoch": best[1] if best else None,
             "best_state": best[2] if best else None}
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


# Training settings of each paper's CIFAR-10 code (TrainConfig fields), for `paper_config`. All five
# train with batch 128: the Batcher's (`advkit.training.variants.train_variant` defaults to it).
PAPER_TRAINING: dict[str, dict[str, Any]] = {
    # Rice et al. 2020 (PreAct ResNet-18): SGD 0.1, x0.1 at 50% and 75% of 200 epochs.
    "pgd_at": dict(epochs=200, optimizer="sgd", lr=0.1, momentum=0.9, nesterov=False,
                   weight_decay=5e-4, schedule="multistep", milestones=(0.5, 0.75), gamma=0.1),
    # Wong et al. 2020: cyclic lr up to 0.2 over 15 epochs (OneCycleLR approximates their triangle).
    "fgsm_rs": dict(epochs=15, optimizer="sgd", lr=0.2, momentum=0.9, nesterov=False,
                    weight_decay=5e-4, schedule="onecycle"),
    # Zhang et al. 2019: SGD 0.1, wd 2e-4, 80 epochs, x0.1 at epoch 75.
    "trades": dict(epochs=80, optimizer="sgd", lr=0.1, momentum=0.9, nesterov=False,
                   weight_decay=2e-4, schedule="multistep", milestones=(75 / 80,), gamma=0.1),
    # Wang et al. 2020 (ResNet-18 script): SGD 0.01, wd 3.5e-3, 120 epochs, x0.1 at 75, 90, 100.
    "mart": dict(epochs=120, optimizer="sgd", lr=0.01, momentum=0.9, nesterov=False,
                 weight_decay=3.5e-3, schedule="multistep", milestones=(75 / 120, 90 / 120, 100 / 120), gamma=0.1),
    # Wu et al. 2020 AT-AWP (built on Rice et al.'s code): as pgd_at.
    "awp": dict(epochs=200, optimizer="sgd", lr=0.1, momentum=0.9, nesterov=False,
                weight_decay=5e-4, schedule="multistep", milestones=(0.5, 0.75), gamma=0.1),
}


def paper_config(objective: str, epochs: int | None = None, **overrides: Any) -> TrainConfig:
    """The TrainConfig of `objective`'s paper (PAPER_TRAINING); `epochs` rescales the schedule
    (milestones are fractions of training), `overrides` replace any field."""
    if objective not in PAPER_TRAINING:
        raise ValueError(f"objective={objective!r} has no paper config; choose one of {sorted(PAPER_TRAINING)}")
    settings = {**PAPER_TRAINING[objective], **({"epochs": epochs} if epochs is not None else {}), **overrides}
    return TrainConfig(**settings)


# A fast recipe for the clean base model (ResNet-32 on CIFAR-10): an option (notebook 01's `recipe="fast"`),
# NOT the papers' protocol, which stays the default (the paper profile: SGD 0.1, momentum 0.9, weight decay
# 1e-4, batch 128, 160 epochs, x0.1 at 50 % and 75 %; He et al. 2016 report 92.49 % for ResNet-32 with it).
# Each number and its source:
# - batch 512: ResNet-32 at batch 128 leaves a large GPU launch-bound (docs/gpu.md); 4x fewer steps.
# - lr 0.4: the linear scaling rule (Goyal et al. 2017), 0.1 x 512/128, the peak of a one-cycle schedule.
# - one-cycle (Smith & Topin 2019, "super-convergence"; torch's OneCycleLR: warm-up over 30 % of the steps
#   from lr/25, cosine annealing to lr/1e4, momentum cycled 0.95 -> 0.85 -> 0.95): ResNets on CIFAR-10 reach
#   their multistep accuracy in several times fewer epochs.
# - 40 epochs: a quarter of the paper's 160, the budget the 2-minute goal allows at <= 3 s per epoch.
# - Nesterov momentum 0.9, weight decay 5e-4 (the common short-schedule value for CIFAR ResNets; airbench94,
#   KellerJordan/cifar10-airbench, also uses Nesterov SGD), label smoothing 0.1 (Szegedy et al. 2016;
#   airbench94 uses 0.2), bf16 autocast and channels_last on CUDA (precision "auto"), the Batcher's flip and
#   4-pixel crop. `compile` stays off: its one-off compile time counts against a 2-minute budget;
#   benchmarks/train_speed.py measures both.
# Whether it reaches 92.5 % test accuracy within 2 minutes on an H200: `python benchmarks/train_speed.py
# --data-dir DIR --epochs-to-accuracy` measures it (benchmarks/RESULTS.md); `fast_config(epochs=60)` is the knob
# if 40 epochs fall short.
FAST_RECIPE: dict[str, Any] = dict(
    batch_size=512,  # the Batcher's (not a TrainConfig field)
    epochs=40, optimizer="sgd", lr=0.4, momentum=0.9, nesterov=True, weight_decay=5e-4, schedule="onecycle",
    label_smoothing=0.1, precision="auto", channels_last=True, compile=False, recipe="fast",
)


def fast_config(epochs: int | None = None, **overrides: Any) -> TrainConfig:
    """The TrainConfig of FAST_RECIPE (its batch size is the Batcher's: FAST_RECIPE["batch_size"]);
    `epochs` rescales the one-cycle schedule, `overrides` replace any field (the recipe stays "fast")."""
    settings = {k: v for k, v in FAST_RECIPE.items() if k != "batch_size"}
    return TrainConfig(**{**settings, **({"epochs": epochs} if epochs is not None else {}), **overrides})


def apply_recipe(recipe: str, config: TrainConfig, batch_size: int) -> tuple[TrainConfig, int]:
    """Notebook 01's `recipe`: "paper" keeps (config, batch_size) as given; "fast" replaces both by
    FAST_RECIPE, keeping config's seed (epochs, batch size, optimizer, lr, schedule, label smoothing change)."""
    check_choice("recipe", recipe, RECIPES)
    if recipe == "paper":
        return config, batch_size
    return fast_config(seed=config.seed), FAST_RECIPE["batch_size"]


AKAMASTER_RESNETS = ("resnet20", "resnet32", "resnet44", "resnet56")
"""The CIFAR-10 ResNets of akamaster/pytorch_resnet_cifar10's pretrained checkpoints."""


def pretrained_fit(run: Run, data: Dataset, model: str, checkpoint: str | Path,
                   device: torch.device | str = "cpu") -> FitResult:
    """Notebook 01's base model from a pretrained akamaster CIFAR-10 ResNet (`.th`, as the released code of
    Xu et al.; ImageNet normalization inside the model) instead of training: saved as the run's base model,
    with its clean test accuracy and loss as the history's one row (epoch 0)."""
    if data.name != "cifar10" or model not in AKAMASTER_RESNETS:
        raise ValueError(f"pretrained_checkpoint needs dataset='cifar10' and model resnet20-56, "
                         f"got {data.name!r}, {model!r}")
    net = get_model(model, data.num_classes, data.in_channels, mean=IMAGENET_MEAN, std=IMAGENET_STD).to(device)
    depth = int(model.removeprefix("resnet"))
    net.load_state_dict(load_akamaster_checkpoint(checkpoint, depth=depth).state_dict())
    save_model(run.model("base"), net, {"pretrained_checkpoint": str(checkpoint)})
    clean = evaluate_attacks(net, data.x_test.float().div(255), data.y_test, {}, ssim=False)
    return FitResult(net, pd.DataFrame([{"epoch": 0, "test_acc": clean["accuracy"]["clean"],
                                         "test_loss": clean["loss"]["clean"]}]))
