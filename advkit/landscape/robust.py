"""Robust surfaces batched across grid points: one attack call for P points (Stutz et al.'s
attack re-run at every point), on P stacked copies of a batch, copy p run at point p's weights.

The kit's attacks are per example (summed loss, eval mode: no coupling between examples), so
attacking the (P*B) stack is attacking each point on its own; an attack takes part by accepting
`copies` (`advkit.attacks.pgd`, `fgsm`), with which it draws each copy's random start as a call
on that copy alone would. Other attacks (e.g. AutoAttack, which re-selects subsets of its
inputs) are run point by point.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable

import torch
from torch import nn
from torch.func import vmap

from advkit._torch import Attack, WithParams

ATTACK_EXAMPLES_PER_CALL = 8192
"""Most examples (P copies x batch) one batched attack call holds with input gradients (a CIFAR
ResNet-18 keeps a few MB per example for the backward); larger groups go in sub-groups of points."""

PointForward = Callable[[dict[str, torch.Tensor], torch.Tensor], torch.Tensor]


def takes_copies(attack: Attack) -> bool:
    """Whether `attack` accepts `copies` (stacked copies of a batch; see `advkit.attacks.pgd`)."""
    try:
        return "copies" in inspect.signature(attack).parameters
    except (TypeError, ValueError):  # builtins and other callables without a signature
        return False


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
    call on P copies (`copies=P`), equal to P calls `attack(point p, x, y)` up to float rounding."""
    p = module.points
    x_adv = attack(module, x.repeat(p, *([1] * (x.dim() - 1))), y.repeat(p), copies=p)
    return x_adv.detach().unflatten(0, (p, -1))
