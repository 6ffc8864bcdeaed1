"""Static adversarial augmentation (Xu, Yap & Prabhu 2019, Sec. 2.2).

Against the clean base model, one untargeted adversarial example per training image is
generated once (FGSM, PGD or stAdv with the paper's budgets, `advkit.attacks.evaluate.XU2019`), and
the base model is fine-tuned on the 1:1 union of clean and adversarial images, labels kept.

The adversarial images are generated in one batched pass on the model's device and cached
in the run directory as uint8 (`attacks/augment_<attack>.pt` plus a JSON of the settings),
like the clean data: rounding to the nearest grey level moves a pixel by at most 0.5/255 and,
for L-inf budgets that are whole grey levels (8/255, 1/255), keeps |x_adv - x| <= eps exactly,
because x sits on a level and the ball's faces do too. What rounding does cost (fractional
PGD steps rounded away) shows in the stored `fooled_stored` vs `fooled_float` rates; `dtype="float32"`
keeps them. `RegeneratedAugmentation` is the released code's alternative: the adversarial half made
anew for every batch against the current model (Xu et al.'s ambiguities as switches: docs/api.md).
"""

from __future__ import annotations

import inspect
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from advkit._checks import AUGMENT_DTYPES, AUGMENT_MODES, XU_ATTACKS, check_choice, check_int, check_number
from advkit._torch import (
    chunks,
    eval_mode,
    loss_and_accuracy,
    make_generator,
    model_device,
    state_hash,
    tensors_hash,
    to_float,
)
from advkit.attacks.evaluate import XU2019
from advkit.attacks.pgd import GENERATOR_SEEDED, get_attack
from advkit.data import Batcher, Dataset, crop_padding
from advkit.progress import LoopProgress
from advkit.runs.artifacts import as_stored, atomic_path, read_json, write_json
from advkit.runs.checkpoints import load_model, load_torch
from advkit.runs.run import Run, cache_is_current
from advkit.training.objectives import Adversarial


def xu_budget(attack: str) -> dict[str, Any]:
    """The attack settings of Xu et al. (2019): FGSM eps 8/255; PGD eps 1/255, 10 steps; stAdv."""
    check_choice("attack", attack, XU_ATTACKS)
    return dict(XU2019.attacks[attack].params)


def _quantize(x: torch.Tensor) -> torch.Tensor:
    return x.mul(255).round_().clamp_(0, 255).to(torch.uint8)


def adversarial_examples(model: nn.Module, x: torch.Tensor, y: torch.Tensor, attack: str = "fgsm", *,
                         batch_size: int = 1024, seed: int = 0, dtype: str = "uint8", progress: bool = True,
                         **budget) -> tuple[torch.Tensor, dict[str, Any]]:
    """One untargeted adversarial example per image, in large batches on the model's device.

    x: uint8 (or float in [0, 1]) images; budget overrides the Xu et al. settings of `attack`.
    Returns (x_adv on x's device, in `dtype`) and statistics: clean accuracy and the attack's
    success rate before and after storing (rounding to uint8).
    """
    params = {**xu_budget(attack), **budget}
    check_choice("dtype", dtype, AUGMENT_DTYPES)
    check_int("batch_size", batch_size)
    if x.dim() != 4 or len(x) != len(y):
        raise ValueError(f"x must be (N, C, H, W) images with N = len(y), got {tuple(x.shape)} and {tuple(y.shape)}")
    fn = get_attack(attack)
    try:  # fail on a misspelled budget before the long pass
        inspect.signature(fn).bind(model, x[:1], y[:1], **params)
    except TypeError as err:
        raise ValueError(f"invalid settings for attack {attack!r}: {err}") from err
    device = model_device(model)
    if any(fn is a for a in GENERATOR_SEEDED):  # one stream for all batches
        params["seed"] = make_generator(device, seed)
    out = torch.empty(x.shape, dtype=torch.uint8 if dtype == "uint8" else torch.float32, device=device)
    correct_float = torch.zeros((), dtype=torch.int64, device=device)  # before rounding to uint8
    batches = list(chunks(len(y), batch_size))
    steps = LoopProgress(f"augment {attack}", "batch", len(batches))  # the driver's log (advkit.progress)
    for k, s in enumerate(tqdm(batches, desc=f"augment {attack}", disable=not progress), 1):
        xb, yb = to_float(x[s].to(device)), y[s].to(device)
        x_adv = fn(model, xb, yb, **params).detach()
        out[s] = _quantize(x_adv) if dtype == "uint8" else x_adv.float()
        with torch.no_grad(), eval_mode(model):
            correct_float += (model(x_adv).argmax(1) == yb).sum()
        steps.step(k)
    stats = {"clean_accuracy": loss_and_accuracy(model, x, y, batch_size=batch_size, precision="fp32").accuracy,
             "fooled_float": 1 - correct_float.item() / len(y),
             "fooled_stored": 1 - loss_and_accuracy(model, out, y, batch_size=batch_size, precision="fp32").accuracy}
    return out.to(x.device), stats


def augmented_dataset(model: nn.Module, x: torch.Tensor, y: torch.Tensor, attack: str = "fgsm", *,
                      run: str | Path | Run | None = None, batch_size: int = 1024, seed: int = 0,
                      dtype: str = "uint8", progress: bool = True, **budget) -> tuple[torch.Tensor, torch.Tensor]:
    """The Xu et al. augmented training set: concat(clean, adversarial) images, labels (y, y).

    `run` caches the adversarial half in `attacks/augment_<attack>.pt` (`Run.augmentation`) with
    its settings (attack, budget, seed, dtype, content hashes of the base model and the data); a
    cache made with other settings is regenerated with a StaleCacheWarning naming the setting
    (`advkit.runs.run.cache_is_current`). Settings and statistics also go to the `.json` beside it.
    """
    settings = {"attack": attack, "budget": {**xu_budget(attack), **budget}, "seed": seed, "dtype": dtype,
                "batch_size": batch_size, "n": len(y), "model": state_hash(model),
                "data": tensors_hash([("x", x), ("y", y)])}
    cache = Run.of(run).augmentation(attack) if run is not None else None
    x_adv = None
    if cache is not None and cache.exists():
        payload = load_torch(cache)
        stored = payload.get("settings") if isinstance(payload, dict) and "x_adv" in payload else None
        if cache_is_current(cache, stored, settings):
            x_adv = payload["x_adv"].to(x.device)
    if x_adv is None:
        t0 = time.perf_counter()
        x_adv, stats = adversarial_examples(model, x, y, attack, batch_size=batch_size, seed=seed, dtype=dtype,
                                            progress=progress, **budget)
        if cache is not None:
            with atomic_path(cache) as tmp:
                torch.save({"x_adv": x_adv.cpu(), "settings": settings}, tmp)
            write_json(Run.of(run).augmentation(attack, ".json"), {
                "settings": settings, "stats": stats, "device": str(model_device(model)),
                "time_s": time.perf_counter() - t0})
    clean = x if dtype == "uint8" and x.dtype == torch.uint8 else (
        _quantize(to_float(x)) if dtype == "uint8" else to_float(x).float())
    return torch.cat([clean, x_adv.to(clean.dtype)]), torch.cat([y, y])


def finetune_config(epochs: int, *, lr: float = 1e-3, **overrides: Any):
    """Fine-tuning settings of the seed's code: Adam, lr 1e-3, constant lr, no weight decay
    (overrides replace any TrainConfig field); its batches are `finetune_batcher`'s."""
    from advkit.training.fit import TrainConfig

    settings = dict(epochs=epochs, optimizer="adam", lr=lr, weight_decay=0.0, schedule="constant")
    return TrainConfig(**{**settings, **overrides})


def finetune_batcher(x: torch.Tensor, y: torch.Tensor, batch_size: int = 128, *, padding: int = 4,
                     **kwargs: Any) -> Batcher:
    """The seed code's fine-tuning batches: `batch_size` 128, random crop (`padding` px) + flip;
    `kwargs` (seed, device, ...) go to the Batcher."""
    return Batcher(x, y, batch_size, augment=True, padding=padding, **kwargs)


# --- Xu et al.'s ambiguities as switches --------------------------------------------------------

CODE_EPS = 8 / 255  # the L-inf bound of the released code (joycex99/adversarial-training, L_INF_BOUND)


def xu_training_budget(attack: str, budget: dict[str, Any], eps: float | None = None) -> dict[str, Any]:
    """The augmentation budget: `budget` (Table 1's evaluation settings) or, with `eps`, the L-inf attacks
    at `eps` instead (the released code trains at 8/255 for FGSM and PGD; PGD step eps/4); stAdv unchanged."""
    if eps is not None:
        check_number("eps", eps, 0, 1, low_open=True)  # an L-inf budget in pixel space
    budget = {k: v for k, v in budget.items() if v is not None}
    if eps is None or attack == "stadv":
        return budget
    return {**budget, "eps": float(eps), **({"alpha": float(eps) / 4} if attack == "pgd" else {})}


class RegeneratedAugmentation(Adversarial):
    """Xu et al.'s 1:1 clean + adversarial training with the adversarial half regenerated for every batch
    against the current model (as the released code's adversarial training does), not once against the
    base model (Sec. 2.2, `augmented_dataset`). loss = CE(model(concat(x, x_adv)), concat(y, y)).

    Random starts draw a seed from torch's global RNG, which `fit` reseeds per epoch (exact resume).
    Use half the static batch size to see as many images per step as the static 1:1 set does.
    """

    def __init__(self, attack: str = "fgsm", **budget: Any):
        check_choice("attack", attack, XU_ATTACKS)
        self.attack = attack
        self.budget = {**xu_budget(attack), **{k: v for k, v in budget.items() if v is not None}}
        fn = get_attack(attack)
        try:  # a misspelled budget fails here, not after the first batch
            inspect.signature(fn).bind(None, None, None, **self.budget)
        except TypeError as err:
            raise ValueError(f"invalid settings for attack {attack!r}: {err}") from err
        self._random = "seed" in inspect.signature(fn).parameters

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        extra = {"seed": int(torch.randint(0, 2**31 - 1, ()))} if self._random else {}
        return get_attack(self.attack)(model, x, y, **self.budget, **extra).detach()

    def training_loss(self, forward, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(forward(torch.cat([x, x_adv])), torch.cat([y, y]))

    def __repr__(self) -> str:
        return f"RegeneratedAugmentation({self.attack!r}, {self.budget})"


def xu_finetune(run: Run, data: Dataset, attack: str, budget: dict[str, Any], config, *, mode: str = "static",
                storage: str = "uint8", batch_size: int = 128, device: torch.device | str = "cpu",
                test: tuple[torch.Tensor, torch.Tensor] | None = None, name: str | None = None):
    """Xu et al.'s fine-tune of the run's base model on `attack` examples of data's training images, saved as
    `name` (default `attack`). `mode` "static": 1:1 clean + adversarial batches, the examples made once against
    the base model (Sec. 2.2, `augmented_dataset`, kept as `storage`); "regenerate": half-size batches of clean
    images, their examples made anew against the current weights (`RegeneratedAugmentation`). Random crop
    (width / 8 px) + flip, seeded by `config` (`finetune_config`)."""
    from advkit.training.fit import fit

    check_choice("mode", mode, AUGMENT_MODES)
    model = load_model(run.model("base"), device=device)  # the copy that is fine-tuned
    if mode == "static":
        base = load_model(run.model("base"), device=device)
        x, y = augmented_dataset(base, data.x_train, data.y_train, attack, run=run, seed=config.seed,
                                 dtype=storage, **budget)
        objective = "clean"
    else:
        x, y = data.x_train, data.y_train
        batch_size, objective = max(1, batch_size // 2), RegeneratedAugmentation(attack, **budget)
    batches = finetune_batcher(x, y, batch_size, padding=crop_padding(data.x_train), seed=config.seed, device=device)
    return fit(model, batches, config, objective=objective, test=test, run=run, name=name or attack)


# The settings of fine-tunes made before these switches existed (no record beside their checkpoint).
LEGACY_FINETUNE = {"augment_mode": "static", "storage": "uint8", "augment_eps": None}


def check_finetune_settings(run: str | Path | Run, name: str, settings: dict[str, Any]) -> None:
    """Fail, naming the switch, when fine-tune `name` of `run` has a checkpoint made with other Xu switches
    (`fit` would otherwise resume it silently); else record `settings` beside the checkpoint."""
    run = Run.of(run)
    checkpoint, record = run.training_state(name), run.finetune_settings(name)
    if checkpoint.exists():
        saved = read_json(record) if record.exists() else LEGACY_FINETUNE
        differ = [k for k in settings if as_stored(saved.get(k)) != as_stored(settings[k])]
        if differ:
            was = ", ".join(f"{k}={saved.get(k)!r}" for k in differ)
            now = ", ".join(f"{k}={settings[k]!r}" for k in differ)
            raise ValueError(f"{checkpoint} was fine-tuned with {was}, but this call asks for {now}: "
                             "delete the checkpoint or use another run")
    write_json(record, settings)
