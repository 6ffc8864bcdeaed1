"""Robust surfaces batched across grid points: one attack call for P points (Stutz et al.'s
attack re-run at every point), on P stacked copies of a batch, copy p run at point p's weights.

The kit's attacks are per example (summed loss, eval mode: no coupling between examples), so
attacking the (P*B) stack is attacking each point on its own; an attack takes part through its
version on copies (`advkit.attacks.pgd.ON_COPIES`: pgd's `pgd_on_copies`, fgsm), which draws each
copy's random start as a call on that copy alone would. Other attacks (e.g. AutoAttack, which re-selects subsets of its
inputs) are run point by point.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable

import torch
from torch import nn
from torch.func import vmap

from advkit._torch import Attack, WithParams
from advkit.attacks.pgd import ON_COPIES

ATTACK_EXAMPLES_PER_CALL = 8192
"""Most examples (P copies x batch) one batched attack call holds with input gradients (a CIFAR
ResNet-18 keeps a few MB per example for the backward); larger groups go in sub-groups of points."""

PointForward = Callable[[dict[str, torch.Tensor], torch.Tensor], torch.Tensor]


def on_copies(attack: Attack) -> Attack | None:
    """`attack` (one of `advkit.attacks.pgd.ON_COPIES`, or a functools.partial of one) as the version
    that takes `copies` (stacked copies of a batch), with the same settings; None for any other."""
    func, args, kw = attack, (), {}
    if isinstance(attack, functools.partial):
        func, args, kw = attack.func, attack.args, attack.keywords
    stacked = next((v for k, v in ON_COPIES.items() if k is func), None)
    return None if stacked is None else functools.partial(stacked, *args, **kw)


class PointsModule(WithParams):
    """P weight points as one module: (P*B, ...) inputs viewed as (P, B, ...), slice p through
    point p's weights (`vmap` over the stacked states: grouped convolutions), (P*B, K) logits.

    `params`: name -> (P, *shape) perturbed entries; `forward(state, x)`: logits at one point
    (a landscape engine's); a `WithParams`, so its weights live outside `model` (an attack never
    folds or copies it) and mode and device follow `model`. Inputs that do not split into P
    slices (e.g. an output check on one image) run at every point, and their logits come back
    non-finite wherever any point's are, so such a check still covers every point.
    """

    def __init__(self, model: nn.Module, params: dict[str, torch.Tensor], points: int, forward: PointForward):
        super().__init__(model, params, forward)
        self.points = points

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with warnings.catch_warnings():  # functorch's per-op "performance drop" notes
            warnings.filterwarnings("ignore", message="There is a performance drop")
            if len(x) % self.points == 0:
                out = vmap(self._forward, in_dims=(0, 0))(self.params, x.unflatten(0, (self.points, -1)))
                return out.flatten(0, 1)
            out = vmap(self._forward, in_dims=(0, None))(self.params, x)
            return torch.where(out.isfinite().all(0), out[0], float("nan"))


def attack_points(attack: Attack, module: PointsModule, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Adversarial examples (P, B, ...) of the B examples x at each of the module's P points: one
    call on P copies (`on_copies(attack)`, copies=P), equal to P calls `attack(point p, x, y)` up to
    float rounding."""
    p = module.points
    stacked = on_copies(attack)
    if stacked is None:
        raise ValueError("the attack has no version on stacked copies (advkit.attacks.pgd.ON_COPIES)")
    x_adv = stacked(module, x.repeat(p, *([1] * (x.dim() - 1))), y.repeat(p), copies=p)
    return x_adv.detach().unflatten(0, (p, -1))
