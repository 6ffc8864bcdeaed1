"""Clean and robust accuracy, robust loss and 1 - SSIM over a dataset, plus the seed papers' presets.

Inputs are whole tensors (x uint8 or float in [0, 1], y int64) on any device; batches move to
the model's device. Accuracies and losses come from `advkit._torch.loss_and_accuracy` (the one
evaluation loop; with `attack=` for the robust numbers), one host sync per call.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from advkit._checks import check_int, check_number
from advkit._torch import check_precision, loss_and_accuracy, make_generator, to_float
from advkit.attacks.model import AttackModel, attack_model
from advkit.attacks.pgd import ATTACKS, GENERATOR_SEEDED, get_attack
from advkit.progress import LoopProgress

AttackLike = str | Callable[..., torch.Tensor]


def _check(x: torch.Tensor, y: torch.Tensor, batch_size: int) -> None:
    check_int("batch_size", batch_size)
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"x must be images (N, C, H, W), got {getattr(x, 'shape', type(x))}")
    if not isinstance(y, torch.Tensor) or y.shape != x.shape[:1]:
        raise ValueError(f"y must be labels of shape ({len(x)},), got {tuple(getattr(y, 'shape', ()))}")


def _takes(fn: Callable[..., Any], name: str) -> bool:
    target = get_attack(fn.attack) if isinstance(fn, AttackSpec) else fn
    try:
        return name in inspect.signature(target).parameters
    except (TypeError, ValueError):
        return False


def _batch_attack(attack: AttackLike, seed: int | None, precision: str,
                  kw: Mapping[str, Any]) -> Callable[..., torch.Tensor]:
    """attack(model, xb, yb) for `loss_and_accuracy`: the attack with its settings `kw`, a registered
    attack on the model with the evaluation's precision (`attack_model`; a model that carries its own
    `AttackRuntime` keeps it), and one generator seeded with `seed` shared by all batches when its
    `seed` takes one (`GENERATOR_SEEDED`; a callable's `generator`), created on the batches' device."""
    fn = get_attack(attack) if isinstance(attack, str) else attack
    target = get_attack(fn.attack) if isinstance(fn, AttackSpec) else fn
    registered = any(target is a for a in ATTACKS.values())
    kw = dict(kw)
    key = "seed" if any(target is a for a in GENERATOR_SEEDED) else "generator" if _takes(fn, "generator") else None
    seeded = seed is not None and key is not None and not isinstance(kw.get(key), torch.Generator)

    def run(model: nn.Module, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        if seeded and not isinstance(kw.get(key), torch.Generator):
            kw[key] = make_generator(xb.device, seed)
        if registered and not isinstance(model, AttackModel):
            model = attack_model(model, precision=precision)
        return fn(model, xb, yb, **kw)

    return run


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1024,
             precision: str = "auto") -> float:
    """Top-1 accuracy of model on (x, y), eval mode (restored after), in large batches. A model with
    non-finite logits (NaN weights) is an error, as for the robust metrics, not a chance-level accuracy."""
    _check(x, y, batch_size)
    result = loss_and_accuracy(model, x, y, batch_size=batch_size, precision=precision)
    if len(y) and not math.isfinite(result.loss):
        raise ValueError("the model returned non-finite logits (NaN or inf) on x, so its accuracy means nothing: "
                         "check its weights (e.g. a diverged training run)")
    return result.accuracy


def robust_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, attack: AttackLike = "pgd",
                    batch_size: int = 512, seed: int | None = 0, **kw) -> float:
    """Accuracy on attack(model, x, y, **kw), batch by batch. `attack` is a name (see
    advkit.attacks.pgd.ATTACKS) or a callable; one generator seeded with `seed` serves all batches."""
    return robust_metrics(model, x, y, attack, batch_size, seed=seed, **kw)["accuracy"]


def robust_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, attack: AttackLike = "pgd",
                batch_size: int = 512, seed: int | None = 0, **kw) -> float:
    """RLoss: mean cross-entropy on the attack's examples (Stutz et al. 2021, Sec. 3; PGD there)."""
    return robust_metrics(model, x, y, attack, batch_size, seed=seed, **kw)["loss"]


def robust_metrics(model: nn.Module, x: torch.Tensor, y: torch.Tensor, attack: AttackLike = "pgd",
                   batch_size: int = 512, *, ssim: bool = False, seed: int | None = 0,
                   precision: str = "auto", **kw) -> dict[str, float]:
    """One attack pass giving {"accuracy", "loss" (mean CE), and with ssim=True "ssim_distance"}.
    `precision` is the evaluation's and a registered attack's (`_batch_attack`); **kw are the attack's."""
    _check(x, y, batch_size)
    check_precision(precision)
    run = _batch_attack(attack, seed, precision, kw)
    ssim_sum = 0.0

    def attack_and_measure(m: nn.Module, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        nonlocal ssim_sum
        x_adv = run(m, xb, yb)
        if ssim:
            ssim_sum += ssim_distance(xb, x_adv) * len(yb)
        return x_adv

    result = loss_and_accuracy(model, x, y, batch_size=batch_size, precision=precision, attack=attack_and_measure)
    out = {"accuracy": result.accuracy, "loss": result.loss}
    if ssim:
        out["ssim_distance"] = ssim_sum / len(y)
    return out


def accuracy_vs_eps(model: nn.Module, x: torch.Tensor, y: torch.Tensor, attack: AttackLike,
                    eps_values: Iterable[float], batch_size: int = 512, **kw) -> pd.DataFrame:
    """Robust accuracy for each eps: a DataFrame with columns eps, accuracy."""
    rows = [{"eps": float(e), "accuracy": robust_accuracy(model, x, y, attack, batch_size, eps=e, **kw)}
            for e in eps_values]
    return pd.DataFrame(rows)


def stadv_flow_sweep(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                     max_flows: Iterable[float | None], batch_size: int = 512, **kw) -> pd.DataFrame:
    """stAdv accuracy and mean 1 - SSIM against its flow bound `max_flow` (pixels; None: unbounded),
    to calibrate the bound on Xu et al. (2019) Table 1 (0 % accuracy) and Table 2 (1 - SSIM 0.0028).
    Other stAdv settings (tau, steps, optimizer) come through **kw. Columns: max_flow, accuracy,
    ssim_distance."""
    max_flows = list(max_flows)
    if not max_flows:
        raise ValueError("max_flows must list at least one flow bound (pixels, or None for unbounded)")
    for value in max_flows:  # flow bounds in pixels, or None (unbounded)
        if value is not None:
            check_number("max_flows", value, 0.0, max(x.shape[2:]), low_open=True)
    rows = []
    for value in max_flows:
        metrics = robust_metrics(model, x, y, "stadv", batch_size, ssim=True, seed=None, max_flow=value, **kw)
        rows.append({"max_flow": value, "accuracy": metrics["accuracy"],
                     "ssim_distance": metrics["ssim_distance"]})
    return pd.DataFrame(rows)


def ssim_win_size(height: int, width: int) -> int:
    """SSIM window: 7 (scikit-image's default) when the image allows, else the largest odd size
    <= half the shorter side (min 3), so SSIM stays local: 3 for 8x8 digits, 7 for 32x32 CIFAR."""
    side = min(height, width)
    if side < 3:
        raise ValueError(f"SSIM needs images of at least 3x3 pixels, got {height}x{width}")
    win = min(7, max(3, side // 2))
    return win if win % 2 else win - 1


def ssim_distance(x: torch.Tensor, x_adv: torch.Tensor, win_size: int | None = None) -> float:
    """1 - SSIM (Wang et al. 2004) averaged over the images, computed by scikit-image's
    `structural_similarity` (uniform window, data_range 1, channels averaged). win_size
    defaults to `ssim_win_size(H, W)`: skimage's default 7 would cover almost a whole 8x8 digit."""
    from skimage.metrics import structural_similarity

    if x.shape != x_adv.shape or x.dim() != 4:
        raise ValueError(f"x and x_adv must be image batches of equal shape, got {tuple(x.shape)} "
                         f"and {tuple(x_adv.shape)}")
    win = ssim_win_size(*x.shape[2:]) if win_size is None else win_size
    a = to_float(x).detach().double().cpu().numpy()
    b = to_float(x_adv).detach().double().cpu().numpy()
    values = [structural_similarity(ai, bi, data_range=1.0, channel_axis=0, win_size=win)
              for ai, bi in zip(a, b)]
    return float(1.0 - np.mean(values)) if values else float("nan")


# --- presets ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AttackSpec:
    """A registered attack with its settings; calling it runs get_attack(attack)(model, x, y, **params)."""

    attack: str
    params: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        get_attack(self.attack)  # fail early on unknown names
        object.__setattr__(self, "params", MappingProxyType(dict(self.params)))

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, **overrides) -> torch.Tensor:
        return get_attack(self.attack)(model, x, y, **{**self.params, **overrides})

    def __repr__(self) -> str:
        return f"AttackSpec({self.attack!r}, {dict(self.params)})"


@dataclass(frozen=True)
class Preset:
    """A seed paper's evaluation settings: named attacks, test subset size and what they report."""

    name: str
    reference: str
    attacks: Mapping[str, AttackSpec]
    n_test: int | None = None  # evaluate on the first n_test test images (None: all)
    note: str = ""

    def __post_init__(self):
        object.__setattr__(self, "attacks", MappingProxyType(dict(self.attacks)))

    def table(self) -> pd.DataFrame:
        """One row per attack with its settings, for printing in a notebook."""
        return pd.DataFrame([{"label": k, "attack": s.attack, **s.params} for k, s in self.attacks.items()]
                            ).set_index("label")


XU2019 = Preset(
    name="xu2019",
    reference="Xu, Yap & Prabhu 2019, Understanding adversarial robustness through loss landscape geometries",
    attacks={
        "fgsm": AttackSpec("fgsm", {"eps": 8 / 255}),
        # alpha = eps/4 is Madry et al.'s 2.5 * eps / steps for 10 steps: the path can cross the ball.
        "pgd": AttackSpec("pgd", {"eps": 1 / 255, "alpha": 0.25 / 255, "steps": 10}),
        # flow bound of Xu et al.'s released code, 0.05 in grid_sample's units = 0.8 px at CIFAR-10's
        # 32 px; calibrated against their Tables 1-2 with stadv_flow_sweep (see advkit.attacks.stadv.stadv).
        "stadv": AttackSpec("stadv", {"tau": 0.05, "optimizer": "lbfgs", "steps": 50, "max_flow": 0.05 * 16}),
    },
    note="Table 1: top-1 accuracy under each attack; Table 2: mean 1 - SSIM of their examples.",
)

STUTZ2021 = Preset(
    name="stutz2021",
    reference="Stutz, Hein & Schiele 2021, Relating adversarially robust generalization to flat minima",
    attacks={
        "pgd": AttackSpec("pgd", {"eps": 8 / 255, "alpha": 0.007, "steps": 20, "restarts": 10}),
        "autoattack": AttackSpec("autoattack", {"eps": 8 / 255, "version": "standard"}),
    },
    n_test=1000,
    note="RLoss = mean CE on the PGD examples; robust error = 1 - AutoAttack robust accuracy.",
)

PRESETS: dict[str, Preset] = {p.name: p for p in (XU2019, STUTZ2021)}


def evaluate_attacks(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                     attacks: Preset | Mapping[str, AttackSpec | AttackLike], batch_size: int = 512, *,
                     ssim: bool = True, seed: int | None = 0, name: str = "model") -> dict[str, dict[str, float]]:
    """Clean accuracy and, per attack, robust accuracy, robust loss and 1 - SSIM, in one pass per
    attack. Returns {"accuracy": {"clean": .., name: ..}, "loss": {..}, "ssim_distance": {..}}
    (pd.DataFrame(result) gives one row per attack); a Preset also selects its first n_test images.
    `name`: the model's, in the driver's progress lines (advkit.progress)."""
    if isinstance(attacks, Preset):
        if attacks.n_test is not None:
            x, y = x[:attacks.n_test], y[:attacks.n_test]
        attacks = attacks.attacks
    _check(x, y, batch_size)
    result: dict[str, dict[str, float]] = {"accuracy": {}, "loss": {}}
    if ssim:
        result["ssim_distance"] = {"clean": 0.0}
    clean = loss_and_accuracy(model, x, y, batch_size=batch_size)
    result["accuracy"]["clean"], result["loss"]["clean"] = clean.accuracy, clean.loss
    steps = LoopProgress(f"attacks on {name}", "attack", len(attacks))
    for i, (label, attack) in enumerate(attacks.items(), 1):
        metrics = robust_metrics(model, x, y, attack, batch_size, ssim=ssim, seed=seed)
        for key, value in metrics.items():
            result[key][label] = value
        steps.step(i, f"{label} accuracy {result['accuracy'][label]:.3f}")
    return result


def attack_tables(models: Mapping[str, nn.Module], x: torch.Tensor, y: torch.Tensor,
                  attacks: Preset | Mapping[str, AttackSpec | AttackLike], batch_size: int = 512,
                  seed: int | None = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Xu et al. (2019) Tables 1 and 2 for several models: top-1 accuracy (clean and under each
    attack) and mean 1 - SSIM of each attack's examples; one row per model."""
    accuracy_rows, ssim_rows = {}, {}
    for name, model in models.items():
        result = evaluate_attacks(model, x, y, attacks, batch_size, ssim=True, seed=seed, name=name)
        accuracy_rows[name] = result["accuracy"]
        ssim_rows[name] = {k: v for k, v in result["ssim_distance"].items() if k != "clean"}
    return (pd.DataFrame.from_dict(accuracy_rows, orient="index").rename_axis("model"),
            pd.DataFrame.from_dict(ssim_rows, orient="index").rename_axis("model"))


__all__ = ["attack_tables", "AttackSpec", "PRESETS", "Preset", "STUTZ2021", "XU2019", "accuracy", "accuracy_vs_eps",
           "evaluate_attacks", "robust_accuracy", "robust_loss", "robust_metrics", "ssim_distance",
           "ssim_win_size", "stadv_flow_sweep"]
