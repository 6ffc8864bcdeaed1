"""Reference attacks the tests compare advkit's against: Madry et al.'s PGD as its last iterate
(what torchattacks.PGD computes; advkit's `pgd` keeps each example's strongest iterate instead)
and torchattacks' AutoAttack (the full standard suite, FAB-T and Square included)."""

from __future__ import annotations

import torch
from torch import nn

from advkit._torch import eval_mode
from advkit.attacks.ascent import attack_loss, logits_at, pgd_ascent, prepare, random_point
from advkit.attacks.model import forward_fn, split_attack_model


def last_iterate_pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, alpha: float, steps: int,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """L-inf PGD on the cross-entropy, the last iterate (Madry et al. 2018), from x, or from a
    uniform random point drawn from `generator`; through advkit's loop (`pgd_ascent`) and the
    model's `AttackRuntime`, so it is advkit's `pgd` without the choice of the strongest iterate."""
    model, runtime = split_attack_model(model)
    with eval_mode(model):
        x = prepare(x, runtime.channels_last)
        forward = forward_fn(model, runtime.compile, runtime.fold_bn, probe=x[:2], precision=runtime.precision)
        start = x if generator is None else random_point(x, eps, "linf", generator)
        return pgd_ascent(forward, x, start, attack_loss("ce", y), eps=eps, alpha=alpha, steps=steps, norm="linf",
                          precision=runtime.precision)


def torchattacks_autoattack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, norm: str = "linf",
                            seed: int = 0) -> torch.Tensor:
    """torchattacks.AutoAttack(version="standard") (Croce & Hein 2020's full suite), clipped to [0, 1]."""
    import torchattacks

    with eval_mode(model), torch.enable_grad():
        n_classes = logits_at(model, x[:1]).shape[1]
        atk = torchattacks.AutoAttack(model, norm={"linf": "Linf", "l2": "L2"}[norm], eps=eps,
                                      version="standard", n_classes=n_classes, seed=seed)
        return atk(x.detach(), y).clamp(0.0, 1.0)
