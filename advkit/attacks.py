"""Adversarial attacks behind one call shape: `attack(model, x, y, **budget) -> x_adv`.

x are float images in [0, 1] (N, C, H, W), y int64 labels; budgets are in that pixel space
(eps=8/255 is 8 grey levels). Every attack puts the model in eval mode and restores each
module's flag afterwards, takes gradients w.r.t. the input only (parameters' .grad stay
untouched), returns x_adv clipped to [0, 1], works batch-wise on x's device, and takes
`precision` ("auto": bf16 autocast on CUDA, fp32 elsewhere; "bf16"; "fp32") and channels_last
inputs on CUDA. Step loops contain no host-device synchronisation. `compile=True` (or a
torch.compile mode, e.g. "reduce-overhead" for CUDA graphs) runs a cached `torch.compile` of the
model; `fold_bn` (None: on CUDA only) attacks a cached copy with BatchNorm folded into the convs
(`advkit.attack_model`), same outputs up to float rounding and fewer kernels per step. pgd and
fgsm check the model's output (finite logits, labels in range) on their own first forward.

Attacks: `fgsm`, `pgd` (here), `stadv` (advkit.stadv), `apgd_ce`, `apgd_dlr`, `apgd_t`
(advkit.apgd) and `autoattack`. Pick them by name with `get_attack` / `ATTACKS`.
"""

from __future__ import annotations

import torch
from torch import nn

from advkit._torch import (Attack, check_choice, check_int, check_number, check_precision, eval_mode,
                           make_generator)
from advkit.apgd import apgd, apgd_ce, apgd_dlr, apgd_t
from advkit.attack_utils import (NORMS, CheckedForward, Strongest, attack_loss, check_eps, check_images, forward_fn,
                                 is_fooled, logits_at, loss_and_grad, pgd_ascent, prepare, random_point)
from advkit.stadv import stadv

PGD_LOSSES = ("ce", "margin")
AUTOATTACK_VERSIONS = ("standard", "apgd", "torchattacks")


def _check_copies(x: torch.Tensor, copies: int) -> None:
    """`copies` (stacked copies of one batch, see `pgd`) must be a positive divisor of len(x)."""
    check_int("copies", copies)
    if len(x) % copies:
        raise ValueError(f"copies={copies} must divide the number of images, got {len(x)}")


def _random_start(x: torch.Tensor, eps: float, norm: str, generator: torch.Generator | None,
                  copies: int = 1) -> torch.Tensor:
    """`random_point` drawn for the first of `copies` stacked copies of a batch and repeated."""
    if copies == 1:
        return random_point(x, eps, norm, generator)
    start = random_point(x[:len(x) // copies], eps, norm, generator).repeat(copies, 1, 1, 1)
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    return start.contiguous(memory_format=torch.channels_last) if channels_last else start


def fgsm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float = 8 / 255, *,
         targeted: bool = False, precision: str = "auto", channels_last: bool | None = None,
         compile: bool | str = False, fold_bn: bool | None = None, copies: int = 1) -> torch.Tensor:
    """Fast gradient sign method, x + eps * sign(grad_x CE(f(x), y)), clipped to [0, 1]
    (Goodfellow et al. 2015, Eq. 3). Targeted: y are target classes and the step descends CE.
    copies: as `pgd`'s (stacked copies of a batch); FGSM draws nothing at random, so it only checks it."""
    check_images(x, y, model)
    check_eps(eps, "linf", x)
    _check_copies(x, copies)
    check_precision(precision)
    with eval_mode(model):
        x = prepare(x, channels_last)
        forward = _checked_forward(model, x, y, compile, fold_bn, precision)
        grad, _, _ = loss_and_grad(forward, x, attack_loss("ce", y, targeted), precision)
        return (x + eps * grad.sign()).clamp(0.0, 1.0)


def pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float = 8 / 255,
        alpha: float | None = None, steps: int = 10, *, norm: str = "linf", random_start: bool = True,
        restarts: int = 1, loss: str = "ce", targeted: bool = False, keep_best: bool = True,
        seed: int | None = 0, generator: torch.Generator | None = None, precision: str = "auto",
        channels_last: bool | None = None, compile: bool | str = False, fold_bn: bool | None = None,
        copies: int = 1) -> torch.Tensor:
    """Projected gradient ascent on the loss in the eps-ball (Madry et al. 2018, Eq. 2-3).

    alpha: step size (default 2.5 * eps / steps, Madry et al.'s rule); norm: "linf" (signed
    gradient steps) or "l2" (normalized gradient steps); random_start: uniform start in the ball;
    loss: "ce" or "margin" (CW, max_{j!=y} z_j - z_y); targeted: y are target classes.
    restarts: independent random starts (a single run without random start); each example keeps
    its strongest result (a misclassified point beats a correct one, then higher loss wins).
    keep_best: also compare every iterate of a run, not only the last, so more steps or
    restarts (same seed) never make the attack weaker; keep_best=False with one run returns
    the plain last iterate (Madry et al.'s PGD, as in torchattacks). The loop is
    `advkit.attack_utils.pgd_ascent`, the training objectives' inner maximization too.
    fold_bn: attack a BatchNorm-folded copy of the model (None: on CUDA only); compile: True or a
    torch.compile mode ("reduce-overhead": CUDA graphs on CUDA).
    copies: x is `copies` stacked copies of one batch (a landscape engine attacking several
    weight points at once, `advkit.landscape.robust`): each random start is drawn for one copy
    and repeated, so every copy starts where a call on that copy alone would.
    """
    check_images(x, y, model)
    check_eps(eps, norm, x)
    check_int("steps", steps)
    check_int("restarts", restarts)
    _check_copies(x, copies)
    check_choice("loss", loss, PGD_LOSSES)
    check_precision(precision)
    alpha = 2.5 * eps / steps if alpha is None else alpha
    check_number("alpha", alpha)
    with eval_mode(model):
        x = prepare(x, channels_last)
        forward = _checked_forward(model, x, y, compile, fold_bn, precision)
        gen = make_generator(x.device, seed, generator) if random_start else None
        objective = attack_loss(loss, y, targeted)
        best = Strongest(x)

        def keep(x_adv: torch.Tensor, loss_value: torch.Tensor, logits: torch.Tensor) -> None:
            best.update(x_adv, loss_value, is_fooled(logits, y, targeted))

        for _ in range(restarts if random_start else 1):  # without random start all runs coincide
            start = _random_start(x, eps, norm, gen, copies) if random_start else x
            x_adv = pgd_ascent(forward, x, start, objective, eps=eps, alpha=alpha, steps=steps, norm=norm,
                               precision=precision, on_step=keep if keep_best else None)
            if (restarts == 1 or not random_start) and not keep_best:
                return x_adv
            logits = logits_at(forward, x_adv, precision)
            keep(x_adv, objective(logits), logits)
        return best.x


def autoattack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float = 8 / 255, *,
               version: str = "standard", norm: str = "linf", steps: int = 100,
               n_target_classes: int = 9, seed: int | None = 0, precision: str = "auto",
               channels_last: bool | None = None, compile: bool | str = False,
               fold_bn: bool | None = None) -> torch.Tensor:
    """AutoAttack-style robust evaluation (Croce & Hein 2020): attacks run in sequence, each on the
    points still classified correctly; a point counts as broken once any attack breaks it.

    version="standard": APGD-CE then APGD-T (targeted DLR, `n_target_classes` targets), our own
      implementation (advkit.apgd). AutoAttack's standard suite also runs FAB-T and Square; they
      are omitted here: Croce & Hein report they rarely lower robust accuracy further after APGD.
    version="apgd": APGD-CE then untargeted APGD-DLR (two runs instead of 1 + n_target_classes).
    version="torchattacks": delegates to torchattacks.AutoAttack(version="standard") (the full
      suite incl. FAB-T and Square), when the torchattacks package is installed.
    Points no attack breaks are returned as APGD-CE left them (a high-loss point in the ball).
    """
    check_images(x, y, model)
    check_eps(eps, norm, x)
    check_choice("version", version, AUTOATTACK_VERSIONS)
    check_int("steps", steps)
    check_int("n_target_classes", n_target_classes)
    check_precision(precision)
    if version == "torchattacks":
        return _torchattacks_autoattack(model, x, y, eps, norm, seed)
    kw = dict(eps=eps, norm=norm, steps=steps, precision=precision, channels_last=channels_last, compile=compile,
              fold_bn=fold_bn)
    runs = [(apgd_ce, {}), (apgd_t, {"n_target_classes": n_target_classes}) if version == "standard"
            else (apgd_dlr, {})]
    with eval_mode(model):
        forward = forward_fn(model, compile, fold_bn, probe=x[:2], precision=precision)
        robust = logits_at(CheckedForward(forward, y), prepare(x, channels_last), precision).argmax(1) == y
        x_adv = x.detach().clone()
        for i, (attack, extra) in enumerate(runs):
            idx = robust.nonzero().squeeze(1)  # one sync per attack, none per step
            if len(idx) == 0:
                break
            xa = attack(model, x[idx], y[idx], seed=None if seed is None else seed + i, **kw, **extra)
            broken = logits_at(forward, xa, precision).argmax(1) != y[idx]
            keep = broken if i > 0 else torch.ones_like(broken)  # unbroken points keep APGD-CE's result
            x_adv[idx[keep]] = xa[keep].to(x_adv.dtype)
            robust[idx[broken]] = False
        return x_adv


def _checked_forward(model: nn.Module, x: torch.Tensor, y: torch.Tensor, compile: bool | str,
                     fold_bn: bool | None, precision: str) -> CheckedForward:
    """The attack's forward (`forward_fn`: BatchNorm folded per `fold_bn`, checked once on x[:2]),
    whose first call checks the logits and labels: no extra forward for the checks."""
    return CheckedForward(forward_fn(model, compile, fold_bn, probe=x[:2], precision=precision), y)


def _torchattacks_autoattack(model, x, y, eps, norm, seed):
    try:
        import torchattacks
    except ImportError as err:
        raise ValueError("version='torchattacks' needs the torchattacks package "
                         "(pip install --no-deps torchattacks==3.5.1)") from err
    with eval_mode(model), torch.enable_grad():
        n_classes = logits_at(model, x[:1]).shape[1]
        atk = torchattacks.AutoAttack(model, norm={"linf": "Linf", "l2": "L2"}[norm], eps=eps,
                                      version="standard", n_classes=n_classes, seed=seed or 0)
        return atk(x.detach(), y).clamp(0.0, 1.0)


ATTACKS: dict[str, Attack] = {
    "fgsm": fgsm,
    "pgd": pgd,
    "stadv": stadv,
    "apgd-ce": apgd_ce,
    "apgd-dlr": apgd_dlr,
    "apgd-t": apgd_t,
    "autoattack": autoattack,
}


def get_attack(name: str) -> Attack:
    """The attack registered under `name` (see ATTACKS); all share attack(model, x, y, **budget)."""
    check_choice("attack", name, sorted(ATTACKS))
    return ATTACKS[name]


__all__ = ["ATTACKS", "Attack", "NORMS", "PGD_LOSSES", "apgd", "apgd_ce", "apgd_dlr", "apgd_t", "autoattack", "fgsm",
           "get_attack", "pgd", "stadv"]
