"""Static adversarial augmentation (Xu, Yap & Prabhu 2019, Sec. 2.2).

Against the clean base model, one untargeted adversarial example per training image is
generated once (FGSM, PGD or stAdv with the paper's budgets, `advkit.evaluate.XU2019`), and
the base model is fine-tuned on the 1:1 union of clean and adversarial images, labels kept.

The adversarial images are generated in one batched pass on the model's device and cached
in the run directory as uint8 (`attacks/augment_<attack>.pt` plus a JSON of the settings),
like the clean data: rounding to the nearest grey level moves a pixel by at most 0.5/255 and,
for L-inf budgets that are whole grey levels (8/255, 1/255), keeps |x_adv - x| <= eps exactly,
because x sits on a level and the ball's faces do too. What rounding does cost (fractional
PGD steps rounded away) shows in the stored `fooled_stored` vs `fooled_float` rates; `dtype="float32"`
keeps them. `RegeneratedAugmentation` is the released code's alternative: the adversarial half made
anew for every batch against the current model (Xu et al.'s ambiguities as switches: README).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from advkit.attack_utils import make_generator
from advkit.attacks import get_attack
from advkit.data import to_float
from advkit.evaluate import XU2019
from advkit.objectives import Adversarial
from advkit.runs import atomic_path, load_torch, write_json

XU_ATTACKS = tuple(XU2019.attacks)  # ("fgsm", "pgd", "stadv")
DTYPES = ("uint8", "float32")


def xu_budget(attack: str) -> dict[str, Any]:
    """The attack settings of Xu et al. (2019): FGSM eps 8/255; PGD eps 1/255, 10 steps; stAdv."""
    if attack not in XU_ATTACKS:
        raise ValueError(f"attack={attack!r} is not available for augmentation; choose one of {list(XU_ATTACKS)}")
    return dict(XU2019.attacks[attack].params)


def _fingerprint(*tensors: torch.Tensor) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(str((tuple(t.shape), str(t.dtype))).encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def model_fingerprint(model: nn.Module) -> str:
    """A short hash of the model's weights and buffers: which base model made a cached set."""
    return _fingerprint(*model.state_dict().values())


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
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not available; choose one of {list(DTYPES)}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if x.dim() != 4 or len(x) != len(y):
        raise ValueError(f"x must be (N, C, H, W) images with N = len(y), got {tuple(x.shape)} and {tuple(y.shape)}")
    fn = get_attack(attack)
    try:  # fail on a misspelled budget before the long pass
        inspect.signature(fn).bind(model, x[:1], y[:1], **params)
    except TypeError as err:
        raise ValueError(f"invalid settings for attack {attack!r}: {err}") from err
    device = next(model.parameters()).device
    if "generator" in inspect.signature(fn).parameters:
        params["generator"] = make_generator(device, seed)
    out = torch.empty(x.shape, dtype=torch.uint8 if dtype == "uint8" else torch.float32, device=device)
    counts = torch.zeros(3, dtype=torch.int64, device=device)  # clean correct, fooled float, fooled stored
    bar = tqdm(range(0, len(y), batch_size), desc=f"augment {attack}", disable=not progress)
    for i in bar:
        xb = to_float(x[i:i + batch_size].to(device))
        yb = y[i:i + batch_size].to(device)
        x_adv = fn(model, xb, yb, **params).detach()
        stored = _quantize(x_adv) if dtype == "uint8" else x_adv.float()
        out[i:i + batch_size] = stored
        with torch.no_grad():
            was_training = model.training
            model.eval()
            counts[0] += (model(xb).argmax(1) == yb).sum()
            counts[1] += (model(x_adv).argmax(1) != yb).sum()
            counts[2] += (model(to_float(stored)).argmax(1) != yb).sum()
            model.train(was_training)
    clean_correct, fooled_float, fooled_stored = (c / max(len(y), 1) for c in counts.tolist())
    stats = {"clean_accuracy": clean_correct, "fooled_float": fooled_float, "fooled_stored": fooled_stored}
    return out.to(x.device), stats


def augmented_dataset(model: nn.Module, x: torch.Tensor, y: torch.Tensor, attack: str = "fgsm", *,
                      run: str | Path | None = None, batch_size: int = 1024, seed: int = 0,
                      dtype: str = "uint8", progress: bool = True, **budget) -> tuple[torch.Tensor, torch.Tensor]:
    """The Xu et al. augmented training set: concat(clean, adversarial) images, labels (y, y).

    `run` (a run directory) caches the adversarial half in `attacks/augment_<attack>.pt` with its
    settings (attack, budget, seed, dtype, fingerprints of the base model and the data); a cache
    whose settings differ is regenerated. Settings and statistics also go to the `.json` beside it.
    """
    settings = {"attack": attack, "budget": {**xu_budget(attack), **budget}, "seed": seed, "dtype": dtype,
                "batch_size": batch_size, "n": len(y), "model": model_fingerprint(model),
                "data": _fingerprint(x, y)}
    cache = Path(run) / "attacks" / f"augment_{attack}.pt" if run is not None else None
    x_adv = None
    if cache is not None and cache.exists():
        payload = load_torch(cache)
        if isinstance(payload, dict) and "x_adv" in payload and _jsonable(payload.get("settings")) == _jsonable(settings):
            x_adv = payload["x_adv"].to(x.device)
    if x_adv is None:
        t0 = time.perf_counter()
        x_adv, stats = adversarial_examples(model, x, y, attack, batch_size=batch_size, seed=seed, dtype=dtype,
                                            progress=progress, **budget)
        if cache is not None:
            with atomic_path(cache) as tmp:
                torch.save({"x_adv": x_adv.cpu(), "settings": settings}, tmp)
            device = str(next(model.parameters()).device)
            write_json(cache.with_suffix(".json"), {"settings": settings, "stats": stats, "device": device,
                                                    "time_s": time.perf_counter() - t0})
    clean = x if dtype == "uint8" and x.dtype == torch.uint8 else (
        _quantize(to_float(x)) if dtype == "uint8" else to_float(x).float())
    return torch.cat([clean, x_adv.to(clean.dtype)]), torch.cat([y, y])


def _jsonable(obj: Any) -> Any:
    """Settings as JSON would store them (tuples become lists), for cache comparison."""
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


def finetune_config(epochs: int, *, lr: float = 1e-3, batch_size: int = 128, **overrides):
    """Fine-tuning settings of the seed's code: Adam, lr 1e-3, batch 128, random crop + flip,
    constant lr, no weight decay (overrides replace any TrainConfig field)."""
    from advkit.train import TrainConfig

    settings = dict(epochs=epochs, batch_size=batch_size, optimizer="adam", lr=lr, weight_decay=0.0,
                    schedule="constant", augment=True, padding=4)
    return TrainConfig(**{**settings, **overrides})


# --- Xu et al.'s ambiguities as switches --------------------------------------------------------

AUGMENT_MODES = ("static", "regenerate")
CODE_EPS = 8 / 255  # the L-inf bound of the released code (joycex99/adversarial-training, L_INF_BOUND)


def xu_training_budget(attack: str, budget: dict[str, Any], eps: float | None = None) -> dict[str, Any]:
    """The augmentation budget: `budget` (Table 1's evaluation settings) or, with `eps`, the L-inf attacks
    at `eps` instead (the released code trains at 8/255 for FGSM and PGD; PGD step eps/4); stAdv unchanged."""
    if eps is not None and not (isinstance(eps, (int, float)) and 0 < eps <= 1):
        raise ValueError(f"eps must be None or a number in (0, 1], got {eps!r}")
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
        if attack not in XU_ATTACKS:
            raise ValueError(f"attack={attack!r} is not available for augmentation; choose one of {list(XU_ATTACKS)}")
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


# The settings of fine-tunes made before these switches existed (no record beside their checkpoint).
LEGACY_FINETUNE = {"augment_mode": "static", "storage": "uint8", "augment_eps": None}


def check_finetune_settings(run: str | Path, name: str, settings: dict[str, Any]) -> None:
    """Fail, naming the switch, when fine-tune `name` of `run` has a checkpoint made with other Xu switches
    (`fit` would otherwise resume it silently); else record `settings` beside the checkpoint."""
    checkpoint = Path(run) / "checkpoints" / f"{name}.state.pt"
    record = checkpoint.with_name(f"{name}.xu.json")
    if checkpoint.exists():
        saved = json.loads(record.read_text()) if record.exists() else LEGACY_FINETUNE
        differ = [k for k in settings if _jsonable(saved.get(k)) != _jsonable(settings[k])]
        if differ:
            was = ", ".join(f"{k}={saved.get(k)!r}" for k in differ)
            now = ", ".join(f"{k}={settings[k]!r}" for k in differ)
            raise ValueError(f"{checkpoint} was fine-tuned with {was}, but this call asks for {now}: "
                             "delete the checkpoint or use another run")
    write_json(record, settings)
