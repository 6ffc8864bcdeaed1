"""Static adversarial augmentation (Xu, Yap & Prabhu 2019, Sec. 2.2).

Against the clean base model, one untargeted adversarial example per training image is
generated once (FGSM, PGD or stAdv with the paper's budgets, `advkit.evaluate.XU2019`), and
the base model is fine-tuned on the 1:1 union of clean and adversarial images, labels kept.

The adversarial images are generated in one batched pass on the model's device and cached
in the run directory as uint8 (`attacks/augment_<attack>.pt` plus a JSON of the settings),
like the clean data: rounding to the nearest grey level moves a pixel by at most 0.5/255 and,
for L-inf budgets that are whole grey levels (8/255, 1/255), keeps |x_adv - x| <= eps exactly,
because x sits on a level and the ball's faces do too. What rounding does cost (fractional
PGD steps rounded away) shows in the stored `fooled_stored` vs `fooled_float` rates.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from advkit.attack_utils import make_generator
from advkit.attacks import get_attack
from advkit.data import to_float
from advkit.evaluate import XU2019
from advkit.runs import atomic_path, write_json

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
        payload = torch.load(cache, map_location="cpu", weights_only=True)
        if _jsonable(payload.get("settings")) == _jsonable(settings):
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
