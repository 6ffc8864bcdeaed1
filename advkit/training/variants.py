"""Adversarial-training variants of Stutz et al. (2021, Table 1) as one-line specs.

A spec is an objective followed by `+`-separated modifiers, e.g. `pgd_at`, `trades+b3`,
`pgd_at+ls0.1`, `awp_trades+g0.01`, `pgd_at+wd0.005+aa`:

| token | meaning | applies to |
|---|---|---|
| `pgd_at`, `fgsm_rs`, `trades`, `mart` | the objective (advkit.training.objectives) | first token |
| `awp`, `awp_<inner>` | AWP (Wu et al. 2020) around `pgd_at` or `<inner>` | first token |
| `ls<x>` | label smoothing x in (0, 1) | pgd_at, fgsm_rs (and awp around them) |
| `ln<x>` | label noise: a fraction x in (0, 1] of training labels changed once | all |
| `wd<x>` | weight decay x >= 0 (replaces the paper's) | all |
| `ema<x>` / `swa<x>` | EMA of the weights with decay x in (0, 1) / SWA from fraction x in [0, 1) | all, exclusive |
| `aa` | AutoAugment (torchvision's CIFAR-10 policy) | all |
| `b<x>` | beta x >= 0 of the robust term | trades, mart (and awp around them) |
| `g<x>` | AWP's relative weight-perturbation size gamma x >= 0 | awp |
| `eps<x>` | training budget x in (0, 1] instead of the notebook's (e.g. 9/255 = 0.0353) | all |

`parse_variant(spec)` checks a spec (ValueError naming the token and the allowed ones) without
building anything; `train_variant` builds model, data, objective and schedule for one spec and
calls `advkit.training.fit.fit`: notebook 03 calls it once per entry of `at_variants`. The spec is the
model's name in the run directory (`models/<spec>.pt`, `models/<spec>_early.pt`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

import torch

from advkit.data import Batcher, crop_padding
from advkit.models import get_model
from advkit.training.fit import FitResult, TrainConfig, fit, paper_config
from advkit.training.objectives import AWP_INNER, Objective, get_objective
from advkit.training.regularizers import AutoAugmentBatcher, noisy_labels

OBJECTIVE_TOKENS = ("pgd_at", "fgsm_rs", "trades", "mart", "awp") + tuple(f"awp_{i}" for i in AWP_INNER)
MODIFIERS = ("ls", "ln", "wd", "ema", "swa", "aa", "b", "g", "eps")
_NUMBER = r"(\d+(?:\.\d*)?(?:[eE][-+]?\d+)?|\.\d+(?:[eE][-+]?\d+)?)"
_MODIFIER = re.compile(rf"^(ls|ln|wd|ema|swa|b|g|eps){_NUMBER}$")
_LABEL_SMOOTHING = ("pgd_at", "fgsm_rs")  # objectives whose outer loss is cross-entropy
_BETA = ("trades", "mart")


@dataclass(frozen=True)
class Variant:
    """A parsed spec: the objective (registry name, AWP's inner), its settings, the TrainConfig
    overrides and the data-side regularizers (label noise, AutoAugment)."""

    spec: str
    objective: str
    inner: str | None = None  # AWP's inner objective
    objective_kwargs: dict[str, Any] = field(default_factory=dict)
    config_overrides: dict[str, Any] = field(default_factory=dict)
    label_noise: float = 0.0
    autoaugment: bool = False
    eps: float | None = None  # budget override

    @property
    def name(self) -> str:
        """The model's file stem in the run directory."""
        return self.spec

    @property
    def schedule(self) -> str:
        """Whose paper's training schedule (advkit.training.fit.PAPER_TRAINING) the variant uses."""
        return self.objective


def _number(token: str, key: str, text: str, low: float, high: float, low_open: bool, high_open: bool) -> float:
    value = float(text)
    ok = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok or not math.isfinite(value):
        lo, hi = ("(" if low_open else "["), (")" if high_open else "]")
        raise ValueError(f"variant token {token!r}: {key} must be in {lo}{low:g}, {high:g}{hi}, got {value:g}")
    return value


def parse_variant(spec: str) -> Variant:
    """Parse an `at_variants` entry (see the module docstring); ValueError names the bad token."""
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"a variant must be a non-empty string such as 'pgd_at' or 'trades+b3', got {spec!r}")
    head, *mods = spec.split("+")
    if head not in OBJECTIVE_TOKENS:
        raise ValueError(f"variant {spec!r}: objective {head!r} is not available; choose one of "
                         f"{list(OBJECTIVE_TOKENS)}")
    objective, inner = ("awp", head[4:] or "pgd_at") if head.startswith("awp") else (head, None)
    base = inner or objective
    kwargs: dict[str, Any] = {}
    overrides: dict[str, Any] = {}
    label_noise, autoaugment, eps, seen = 0.0, False, None, set()
    for token in mods:
        if token == "aa":
            key = "aa"
        else:
            match = _MODIFIER.match(token)
            if not match:
                raise ValueError(f"variant {spec!r}: modifier {token!r} is not understood; use one of "
                                 f"{[m + ('' if m == 'aa' else '<number>') for m in MODIFIERS]}")
            key, text = match.groups()
        if key in seen:
            raise ValueError(f"variant {spec!r}: modifier {key!r} is given twice")
        seen.add(key)
        if key == "aa":
            autoaugment = True
        elif key == "ls":
            if base not in _LABEL_SMOOTHING:
                raise ValueError(f"variant {spec!r}: label smoothing (ls) applies to {list(_LABEL_SMOOTHING)} "
                                 f"(cross-entropy outer loss), not {base!r}")
            overrides["label_smoothing"] = _number(token, "ls", text, 0, 1, True, True)
        elif key == "ln":
            label_noise = _number(token, "ln", text, 0, 1, True, False)
        elif key == "wd":
            overrides["weight_decay"] = _number(token, "wd", text, 0, math.inf, False, True)
        elif key == "ema":
            overrides["ema_decay"] = _number(token, "ema", text, 0, 1, True, True)
        elif key == "swa":
            overrides["swa_start"] = _number(token, "swa", text, 0, 1, False, True)
        elif key == "b":
            if base not in _BETA:
                raise ValueError(f"variant {spec!r}: beta (b) applies to {list(_BETA)}, not {base!r}")
            kwargs["beta"] = _number(token, "b", text, 0, math.inf, False, True)
        elif key == "g":
            if objective != "awp":
                raise ValueError(f"variant {spec!r}: gamma (g) applies to awp variants only")
            kwargs["gamma"] = _number(token, "g", text, 0, math.inf, False, True)
        elif key == "eps":
            eps = _number(token, "eps", text, 0, 1, True, False)
    if "ema_decay" in overrides and "swa_start" in overrides:
        raise ValueError(f"variant {spec!r}: ema and swa are exclusive weight averages; choose one")
    return Variant(spec, objective, inner, kwargs, overrides, label_noise, autoaugment, eps)


def variant_objective(variant: Variant | str, eps: float, steps: int, alpha: float | None = None) -> Objective:
    """The variant's objective with the training budget: L-inf `eps` (unless the spec sets one),
    `steps` attack iterations of size `alpha` (None: the paper's step). FGSM-RS is always one
    step of 1.25 eps (Wong et al. 2020): `steps` and `alpha` do not apply to it."""
    v = parse_variant(variant) if isinstance(variant, str) else variant
    label_smoothing = v.config_overrides.get("label_smoothing", 0.0)
    eps = v.eps if v.eps is not None else eps
    base = v.inner or v.objective
    if base == "fgsm_rs":
        budget: dict[str, Any] = {"eps": eps}
    else:
        budget = {"eps": eps, "steps": steps, **({"alpha": alpha} if alpha is not None else {})}
    inner_kwargs = {**budget, **{k: val for k, val in v.objective_kwargs.items() if k == "beta"}}
    if label_smoothing:
        inner_kwargs["label_smoothing"] = label_smoothing
    if v.objective == "awp":
        return get_objective("awp", inner=v.inner, inner_kwargs=inner_kwargs,
                             **{k: val for k, val in v.objective_kwargs.items() if k == "gamma"})
    return get_objective(v.objective, **inner_kwargs)


def variant_config(variant: Variant | str, epochs: int, **overrides: Any) -> TrainConfig:
    """The variant's TrainConfig: its objective's paper schedule (`paper_config`) rescaled to
    `epochs`, then `overrides` (seed, precision, ...), then the spec's own settings."""
    v = parse_variant(variant) if isinstance(variant, str) else variant
    return paper_config(v.schedule, epochs=epochs, **{**overrides, **v.config_overrides})


def train_variant(spec: str, arch: str, train: tuple[torch.Tensor, torch.Tensor], *, epochs: int, eps: float,
                  steps: int, alpha: float | None = None, num_classes: int = 10, batch_size: int = 128,
                  seed: int = 0, device: str | torch.device = "cpu", precision: str = "auto",
                  **fit_options: Any) -> FitResult:
    """Adversarially train a fresh `arch` from scratch on `train` (N x C x H x W uint8 images, labels) with
    the variant `spec`: one call per notebook-03 variant, in batches of `batch_size` with random crop
    (`advkit.data.crop_padding`) + flip (the papers' 128 and 4 px at 32 px). Weights, batch order and
    augmentation are seeded by `seed`; label noise is drawn once from `seed`; `precision` is TrainConfig's.
    `fit_options` go to `advkit.training.fit.fit` (test, evaluate, select, keep_epochs, run, progress, name):
    the model is saved as `models/<spec>.pt` (final) and, with `select`, `models/<spec>_early.pt` (early
    stopped); `name` replaces `<spec>` (a sweep cell's `<spec><suffix>`, advkit.pipeline.sweep)."""
    v = parse_variant(spec)
    if arch not in _arch_names():
        raise ValueError(f"arch={arch!r} is not available; choose one of {_arch_names()}")
    config = variant_config(v, epochs, seed=seed, precision=precision)
    objective = variant_objective(v, eps, steps, alpha)
    x, y = train
    if v.label_noise:
        y = noisy_labels(y, v.label_noise, num_classes, seed=seed)
    batcher_cls = AutoAugmentBatcher if v.autoaugment else Batcher
    batcher = batcher_cls(x, y, batch_size, augment=True, padding=crop_padding(x), seed=seed, device=device)
    torch.manual_seed(seed)
    model = get_model(arch, num_classes, in_channels=x.shape[1]).to(device)
    return fit(model, batcher, config, objective=objective, **{"name": v.name, **fit_options})


def _arch_names() -> list[str]:
    from advkit.models import MODELS

    return sorted(MODELS)

