"""Adversarial attacks behind one call shape: `attack(model, x, y, **budget) -> x_adv`.

x are float images in [0, 1] (N, C, H, W), y int64 labels; budgets are in that pixel space
(eps=8/255 is 8 grey levels). Every attack puts the model in eval mode and restores each
module's flag afterwards, takes gradients w.r.t. the input only (parameters' .grad stay
untouched), returns x_adv clipped to [0, 1] and works batch-wise on x's device. How it runs the
model is the model's `AttackRuntime`, given once with it, `attack(attack_model(model, runtime), x, y)`
(`advkit.attacks.model`): precision ("auto": bf16 autocast on CUDA, fp32 elsewhere), channels_last
inputs, a cached `torch.compile` of the model, and a cached copy with BatchNorm folded into the
convs (None: on CUDA only), same outputs up to float rounding. Step loops contain no host-device
synchronisation. pgd and fgsm check the model's output (finite logits, labels in range) on their
own first forward.

Attacks: `fgsm`, `pgd` (here), `stadv` (advkit.attacks.stadv), `apgd_ce`, `apgd_dlr`, `apgd_t`
(advkit.attacks.apgd) and `autoattack`. Pick them by name with `get_attack` / `ATTACKS`.
"""

from __future__ import annotations

import torch
from torch import nn

from advkit._checks import check_choice, check_int, check_number
from advkit._torch import Attack, eval_mode, make_generator
from advkit.attacks.apgd import apgd, apgd_ce, apgd_dlr, apgd_t
from advkit.attacks.ascent import (
    NORMS,
    Strongest,
    attack_loss,
    check_eps,
    check_images,
    is_fooled,
    logits_at,
    loss_and_grad,
    pgd_ascent,
    prepare,
    random_point,
)
from advkit.attacks.model import AttackRuntime, CheckedForward, forward_fn, split_attack_model
from advkit.attacks.stadv import stadv

PGD_LOSSES = ("ce", "margin", "ce-targeted", "margin-targeted")
AUTOATTACK_VERSIONS = ("standard", "apgd")


def _check_copies(x: torch.Tensor, copies: int) -> None:
    """`copies` (stacked copies of one batch, see `pgd_on_copies`) must be a positive divisor of len(x)."""
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
         targeted: bool = False) -> torch.Tensor:
    """Fast gradient sign method, x + eps * sign(grad_x CE(f(x), y)), clipped to [0, 1]
    (Goodfellow et al. 2015, Eq. 3). Targeted: y are target classes and the step descends CE."""
    model, runtime = split_attack_model(model)
    check_images(x, y, model)
    check_eps(eps, "linf", x)
    with eval_mode(model):
        x = prepare(x, runtime.channels_last)
        forward = _checked_forward(model, x, y, runtime)
        grad, _, _ = loss_and_grad(forward, x, attack_loss("ce", y, targeted), runtime.precision)
        return (x + eps * grad.sign()).clamp(0.0, 1.0)


def _fgsm_on_copies(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float = 8 / 255, *,
                    copies: int = 1, **kw) -> torch.Tensor:
    """`fgsm` on `copies` stacked copies of a batch: it draws nothing at random, so only the check."""
    _check_copies(x, copies)
    return fgsm(model, x, y, eps, **kw)


def pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float = 8 / 255,
        alpha: float | None = None, steps: int = 10, *, norm: str = "linf", loss: str = "ce",
        restarts: int = 1, seed: int | torch.Generator = 0) -> torch.Tensor:
    """Projected gradient ascent on the loss in the eps-ball (Madry et al. 2018, Eq. 2-3).

    alpha: step size (default 2.5 * eps / steps, Madry et al.'s rule); norm: "linf" (signed
    gradient steps) or "l2" (normalized gradient steps); loss: "ce" or "margin" (CW,
    max_{j!=y} z_j - z_y), "-targeted" for y as target classes (the loss of y descends).
    restarts: independent uniform random starts in the ball, drawn from `seed` (an integer or a
    torch.Generator); restarts=0: one run from x itself. Each example keeps its strongest point
    over every iterate of every run (a misclassified point beats a correct one, then higher loss
    wins), so more steps or restarts (same seed) never make the attack weaker; Madry et al.'s plain
    last iterate is `advkit.attacks.ascent.pgd_ascent`, the loop of this attack and of the training
    objectives' inner maximization. The model's `AttackRuntime` (`attack_model`) says how it runs.
    """
    return pgd_on_copies(model, x, y, eps, alpha, steps, norm=norm, loss=loss, restarts=restarts, seed=seed)


def pgd_on_copies(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float = 8 / 255,
                  alpha: float | None = None, steps: int = 10, *, norm: str = "linf", loss: str = "ce",
                  restarts: int = 1, seed: int | torch.Generator = 0, copies: int = 1) -> torch.Tensor:
    """`pgd` on x made of `copies` stacked copies of one batch (a landscape engine attacking
    several weight points at once, `advkit.landscape.robust`): each random start is drawn for one
    copy and repeated, so every copy starts where a `pgd` call on that copy alone would."""
    model, runtime = split_attack_model(model)
    precision = runtime.precision
    check_images(x, y, model)
    check_eps(eps, norm, x)
    check_int("steps", steps)
    check_int("restarts", restarts, 0)
    _check_copies(x, copies)
    check_choice("loss", loss, PGD_LOSSES)
    alpha = 2.5 * eps / steps if alpha is None else alpha
    check_number("alpha", alpha)
    targeted = loss.endswith("-targeted")
    with eval_mode(model):
        x = prepare(x, runtime.channels_last)
        forward = _checked_forward(model, x, y, runtime)
        gen = None
        if restarts:
            gen = seed if isinstance(seed, torch.Generator) else make_generator(x.device, seed)
        objective = attack_loss(loss.removesuffix("-targeted"), y, targeted)
        best = Strongest(x)

        def keep(x_adv: torch.Tensor, loss_value: torch.Tensor, logits: torch.Tensor) -> None:
            best.update(x_adv, loss_value, is_fooled(logits, y, targeted))

        for _ in range(max(restarts, 1)):
            start = _random_start(x, eps, norm, gen, copies) if restarts else x
            x_adv = pgd_ascent(forward, x, start, objective, eps=eps, alpha=alpha, steps=steps, norm=norm,
                               precision=precision, on_step=keep)
            logits = logits_at(forward, x_adv, precision)
            keep(x_adv, objective(logits), logits)
        return best.x


GENERATOR_SEEDED: tuple[Attack, ...] = (pgd, apgd)
"""The attacks whose `seed` also takes a torch.Generator: one stream can serve many batches."""

ON_COPIES: dict[Attack, Attack] = {pgd: pgd_on_copies, fgsm: _fgsm_on_copies}
"""The attacks a landscape engine runs on stacked copies of a batch (`advkit.landscape.robust`),
with the version that takes `copies`."""


def autoattack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float = 8 / 255, *,
               version: str = "standard", norm: str = "linf", steps: int = 100,
               n_target_classes: int = 9, seed: int | None = 0) -> torch.Tensor:
    """AutoAttack-style robust evaluation (Croce & Hein 2020): attacks run in sequence, each on the
    points still classified correctly; a point counts as broken once any attack breaks it.

    version="standard": APGD-CE then APGD-T (targeted DLR, `n_target_classes` targets), our own
      implementation (advkit.attacks.apgd). AutoAttack's standard suite also runs FAB-T and Square; they
      are omitted here: Croce & Hein report they rarely lower robust accuracy further after APGD.
    version="apgd": APGD-CE then untargeted APGD-DLR (two runs instead of 1 + n_target_classes).
    Points no attack breaks are returned as APGD-CE left them (a high-loss point in the ball).
    """
    plain, runtime = split_attack_model(model)
    check_images(x, y, plain)
    check_eps(eps, norm, x)
    check_choice("version", version, AUTOATTACK_VERSIONS)
    check_int("steps", steps)
    check_int("n_target_classes", n_target_classes)
    precision = runtime.precision
    runs = [(apgd_ce, {}), (apgd_t, {"n_target_classes": n_target_classes}) if version == "standard"
            else (apgd_dlr, {})]
    with eval_mode(plain):
        forward = forward_fn(plain, runtime.compile, runtime.fold_bn, probe=x[:2], precision=precision)
        robust = logits_at(CheckedForward(forward, y), prepare(x, runtime.channels_last), precision).argmax(1) == y
        x_adv = x.detach().clone()
        for i, (attack, extra) in enumerate(runs):
            idx = robust.nonzero().squeeze(1)  # one sync per attack, none per step
            if len(idx) == 0:
                break
            xa = attack(model, x[idx], y[idx], eps=eps, norm=norm, steps=steps,
                        seed=None if seed is None else seed + i, **extra)
            broken = logits_at(forward, xa, precision).argmax(1) != y[idx]
            keep = broken if i > 0 else torch.ones_like(broken)  # unbroken points keep APGD-CE's result
            x_adv[idx[keep]] = xa[keep].to(x_adv.dtype)
            robust[idx[broken]] = False
        return x_adv


def _checked_forward(model: nn.Module, x: torch.Tensor, y: torch.Tensor, runtime: AttackRuntime) -> CheckedForward:
    """The attack's forward (`forward_fn`: BatchNorm folded per the runtime, checked once on x[:2]),
    whose first call checks the logits and labels: no extra forward for the checks."""
    return CheckedForward(forward_fn(model, runtime.compile, runtime.fold_bn, probe=x[:2],
                                     precision=runtime.precision), y)


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


__all__ = ["ATTACKS", "Attack", "GENERATOR_SEEDED", "NORMS", "ON_COPIES", "PGD_LOSSES", "apgd", "apgd_ce", "apgd_dlr",
           "apgd_t", "autoattack", "fgsm", "get_attack", "pgd", "pgd_on_copies", "stadv"]
