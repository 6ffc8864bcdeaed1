"""Auto-PGD (Croce & Hein 2020, Alg. 1): step-size-free PGD with momentum, checkpoints and restarts
from the best point, with the cross-entropy (APGD-CE) or the DLR loss (APGD-DLR, APGD-T).

Step sizes are per example and every decision is a `torch.where`, so the step loop never
synchronises with the host. Call shape as in `advkit.attacks.pgd`: apgd_ce(model, x, y, eps=...).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from advkit._checks import check_choice, check_int, check_number
from advkit._torch import eval_mode, make_generator
from advkit.attacks.ascent import (
    Strongest,
    ascent_direction,
    attack_loss,
    check_eps,
    check_images,
    check_model_output,
    dlr_targeted,
    is_fooled,
    logits_at,
    loss_and_grad,
    prepare,
    project,
    random_point,
)
from advkit.attacks.model import forward_fn, split_attack_model

APGD_LOSSES = ("ce", "dlr")


def checkpoints(steps: int) -> list[int]:
    """Iterations w_j = ceil(p_j * steps) where the step size may be halved (Croce & Hein 2020, Sec. 3.2):
    p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)."""
    p = [0.0, 0.22]
    while p[-1] < 1:
        p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
    marks = {math.ceil(round(q * steps, 9)) for q in p[1:]}  # round: 0.22 + 0.19 + 0.16 is 0.5700...01
    return sorted(w for w in marks if 0 < w < steps)


def apgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float = 8 / 255, steps: int = 100, *,
         norm: str = "linf", loss: str = "ce", target: torch.Tensor | None = None, restarts: int = 1,
         rho: float = 0.75, momentum: float = 0.75, seed: int | torch.Generator = 0) -> torch.Tensor:
    """APGD (Croce & Hein 2020, Alg. 1). Step size starts at 2*eps (L-inf; 2*eps for L2 too) and is
    halved at checkpoint w_j for the examples where (1) fewer than rho*(w_j - w_{j-1}) steps since
    the last checkpoint increased the loss, or (2) the step size was not halved at the last
    checkpoint and the best loss has not improved since; those examples restart from their best
    point. Momentum: x <- P(x + a (z - x) + (1 - a)(x - x_prev)), z = P(x + eta * step), a = 0.75.

    loss: "ce" or "dlr" (untargeted, y true labels); with `target` (tensor of classes) the loss is
    the targeted DLR (Eq. 7). Returns, per example, the strongest point visited (misclassified
    first, then highest loss) over all restarts. seed: an integer or a torch.Generator; the model's
    `AttackRuntime` (`advkit.attacks.model.attack_model`) says how it runs.
    """
    model, runtime = split_attack_model(model)
    precision = runtime.precision
    check_images(x, y, model)
    check_eps(eps, norm, x)
    check_int("steps", steps)
    check_int("restarts", restarts)
    check_number("rho", rho, 0.0, 1.0, low_open=True)
    check_number("momentum", momentum, 0.0, 1.0, low_open=True)
    check_choice("loss", loss, APGD_LOSSES)
    if target is not None and target.shape != y.shape:
        raise ValueError(f"target must have the shape of y {tuple(y.shape)}, got {tuple(target.shape)}")
    with eval_mode(model):
        forward = forward_fn(model, runtime.compile, runtime.fold_bn, probe=x[:2], precision=precision)
        x = prepare(x, runtime.channels_last)
        check_model_output(forward, x, y, precision)
        gen = seed if isinstance(seed, torch.Generator) else make_generator(x.device, seed)
        loss_fn = attack_loss(loss, y) if target is None else (lambda z: dlr_targeted(z, y, target))
        best = Strongest(x)
        _apgd_run(forward, x, y, eps, steps, norm, loss_fn, rho, momentum, gen, precision, best)
        for _ in range(restarts - 1):  # further restarts only for the points not yet misclassified
            idx = (~best.fooled).nonzero().squeeze(1)  # one sync per restart, none per step
            if len(idx) == 0:
                break
            sub_loss = attack_loss(loss, y[idx]) if target is None else \
                (lambda z, i=idx: dlr_targeted(z, y[i], target[i]))
            sub = Strongest(x[idx])
            _apgd_run(forward, x[idx], y[idx], eps, steps, norm, sub_loss, rho, momentum, gen, precision, sub)
            best.update_at(idx, sub)
        return best.x


def _apgd_run(forward, x, y, eps, steps, norm, loss_fn, rho, momentum, gen, precision, best: Strongest) -> None:
    def view(v):
        return v.view(-1, *([1] * (x.dim() - 1)))

    eta = torch.full((len(x),), 2.0 * eps, device=x.device, dtype=x.dtype)
    x_cur = random_point(x, eps, norm, gen)
    grad, loss_cur, logits = loss_and_grad(forward, x_cur, loss_fn, precision)
    best.update(x_cur, loss_cur, is_fooled(logits, y))
    x_max, f_max, grad_max = x_cur, loss_cur, grad
    f_max_last_check = f_max
    halved_last_check = torch.zeros(len(x), dtype=torch.bool, device=x.device)
    increases = torch.zeros(len(x), device=x.device)
    marks, last_mark = set(checkpoints(steps)), 0
    x_prev = x_cur
    for k in range(1, steps + 1):
        a = 1.0 if k == 1 else momentum
        z = project(x_cur + view(eta) * ascent_direction(grad, norm), x, eps, norm)
        x_next = project(x_cur + a * (z - x_cur) + (1 - a) * (x_cur - x_prev), x, eps, norm)
        x_prev, x_cur = x_cur, x_next
        if k < steps:
            grad, loss_new, logits = loss_and_grad(forward, x_cur, loss_fn, precision)
        else:  # the last iterate only needs its loss
            logits = logits_at(forward, x_cur, precision)
            loss_new = loss_fn(logits)
        best.update(x_cur, loss_new, is_fooled(logits, y))
        increases += (loss_new > loss_cur).float()
        loss_cur = loss_new
        improved = loss_new > f_max
        x_max = torch.where(view(improved), x_cur, x_max)
        grad_max = torch.where(view(improved), grad, grad_max)
        f_max = torch.where(improved, loss_new, f_max)
        if k in marks:
            few_increases = increases < rho * (k - last_mark)
            stalled = ~halved_last_check & (f_max <= f_max_last_check)
            halve = few_increases | stalled
            eta = torch.where(halve, eta / 2, eta)
            x_cur = torch.where(view(halve), x_max, x_cur)
            x_prev = torch.where(view(halve), x_max, x_prev)  # no momentum across a restart
            grad = torch.where(view(halve), grad_max, grad)
            halved_last_check, f_max_last_check = halve, f_max
            increases = torch.zeros_like(increases)
            last_mark = k


def apgd_ce(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float = 8 / 255, steps: int = 100,
            **kw) -> torch.Tensor:
    """APGD with the cross-entropy loss (the first attack of AutoAttack)."""
    return apgd(model, x, y, eps, steps, loss="ce", **kw)


def apgd_dlr(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float = 8 / 255, steps: int = 100,
             **kw) -> torch.Tensor:
    """APGD with the untargeted DLR loss (Croce & Hein 2020, Eq. 6)."""
    return apgd(model, x, y, eps, steps, loss="dlr", **kw)


def apgd_t(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float = 8 / 255, steps: int = 100, *,
           n_target_classes: int = 9, seed: int | torch.Generator = 0, **kw) -> torch.Tensor:
    """APGD-T: APGD with the targeted DLR loss (Eq. 7), once for each of the `n_target_classes`
    classes ranked 2nd, 3rd, ... by the clean logits; each example keeps the strongest result
    (misclassified first, then highest targeted-DLR loss of its run)."""
    plain, runtime = split_attack_model(model)
    precision = runtime.precision
    check_images(x, y, plain)
    check_eps(eps, kw.get("norm", "linf"), x)
    check_int("steps", steps)
    check_int("n_target_classes", n_target_classes)
    with eval_mode(plain):
        forward = forward_fn(plain, runtime.compile, runtime.fold_bn, probe=x[:2], precision=precision)
        check_model_output(forward, prepare(x, runtime.channels_last), y, precision)
        logits = logits_at(forward, prepare(x, runtime.channels_last), precision)
        if not 1 <= n_target_classes <= logits.shape[1] - 1 or logits.shape[1] < 4:
            raise ValueError(f"n_target_classes must be in [1, {logits.shape[1] - 1}] and the model needs "
                             f">= 4 classes for targeted DLR, got {n_target_classes} with {logits.shape[1]}")
        ranked = logits.argsort(1, descending=True)
        best = Strongest(x.detach())
        best.fooled = ranked[:, 0] != y  # misclassified already: nothing to attack
        gen = seed if isinstance(seed, torch.Generator) else make_generator(x.device, seed)
        for rank in range(1, n_target_classes + 1):
            # as in AutoAttack, each target run attacks only the points no earlier run has broken
            idx = (~best.fooled).nonzero().squeeze(1)  # one sync per target class, none per step
            if len(idx) == 0:
                break
            target = ranked[idx, rank]
            xa = apgd(model, x[idx], y[idx], eps, steps, loss="dlr", target=target, seed=gen, **kw)
            z = logits_at(forward, xa, precision)
            sub = Strongest(x[idx])
            sub.update(xa, dlr_targeted(z, y[idx], target), is_fooled(z, y[idx]))
            best.update_at(idx, sub)
        return best.x
