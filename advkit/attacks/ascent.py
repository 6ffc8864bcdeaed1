"""Shared pieces of the attacks: input checks, losses, input gradients, the one PGD step and loop.

Every attack in `advkit.attacks.pgd`, `advkit.attacks.apgd` and `advkit.attacks.stadv` (and the inner maximization
of the training objectives) is built from these, so they all treat the model the same way:
gradients taken with `torch.autograd.grad` w.r.t. the input only (nothing accumulates in
`param.grad`), one precision vocabulary (`advkit._torch.PRECISIONS`), channels_last under the GPU policy, and
no host-device synchronisation in step loops. The attacks run the model in eval mode
(`advkit._torch.eval_mode`); argument checks are `advkit._torch`'s. The callable an attack
differentiates (BatchNorm folded, compiled, its first output checked) is `advkit.attacks.model`'s.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from advkit._checks import check_choice, check_number
from advkit._torch import Forward, autocast, gpu_policy
from advkit.attacks.model import check_logits

NORMS = ("linf", "l2")
AttackObjective = Callable[[torch.Tensor], torch.Tensor]
"""logits -> per-example loss (N,) that the attacker MAXIMIZES (labels are bound in already;
not to be confused with `advkit._torch.PerExampleLoss`, loss(logits, y) to average)."""


# --- input checks (all before any long computation) ------------------------------------------


def check_eps(eps: float, norm: str, x: torch.Tensor) -> None:
    """eps in [0, 1] for L-inf; for L2 in [0, sqrt(C*H*W)] (the diameter of the [0, 1] box)."""
    check_choice("norm", norm, NORMS)
    check_number("eps", eps, 0.0, 1.0 if norm == "linf" else math.sqrt(x[0].numel()))


def check_images(x: torch.Tensor, y: torch.Tensor | None = None, model: torch.nn.Module | None = None) -> None:
    """x: float (N, C, H, W) in [0, 1], of the dtype of `model`'s weights; y: int64 labels (N,).
    One sync for the range check."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"x must be a 4-D tensor (N, C, H, W), got {getattr(x, 'shape', type(x))}")
    if not x.is_floating_point():
        raise ValueError(f"x must be float images in [0, 1], got dtype {x.dtype} "
                         "(convert uint8 with advkit.data.to_float)")
    weight = next((p for p in model.parameters() if p.is_floating_point()), None) if model is not None else None
    if weight is not None and weight.dtype != x.dtype:
        raise ValueError(f"x has dtype {x.dtype} but the model's weights are {weight.dtype}: "
                         f"pass x.to({weight.dtype}) (or convert the model)")
    if x.numel() and not bool(((x >= 0) & (x <= 1)).all()):  # NaN fails both comparisons
        n_nan = int(x.isnan().sum())
        if n_nan:
            raise ValueError(f"x must be finite images in [0, 1], got {n_nan} NaN pixels")
        raise ValueError(f"x must lie in [0, 1] (normalization belongs inside the model), got values in "
                         f"[{float(x.amin()):g}, {float(x.amax()):g}]")
    if y is not None:
        if not isinstance(y, torch.Tensor) or y.shape != x.shape[:1] or y.dtype != torch.int64:
            raise ValueError(f"y must be int64 labels of shape ({len(x)},), got "
                             f"{getattr(y, 'dtype', type(y))} {tuple(getattr(y, 'shape', ()))}")


def check_model_output(forward: Forward, x: torch.Tensor, y: torch.Tensor, precision: str | None = "auto") -> None:
    """`check_logits` on one forward pass of the first image, in attack mode, for attacks whose
    first forward is not a plain logits call (stadv, APGD's set-up); pgd and fgsm check their own
    first forward instead (`CheckedForward`). One host sync."""
    if len(x):
        check_logits(logits_at(forward, x[:1], precision), y)


# --- the model during an attack ----------------------------------------------------------------


def _autocast(device: torch.device, precision: str | None) -> contextlib.AbstractContextManager:
    """`advkit._torch.autocast` for a precision; None opens no context of its own, so the caller's
    applies (the objectives' inner attacks run inside `fit`'s autocast)."""
    return contextlib.nullcontext() if precision is None else autocast(device, precision)


def prepare(x: torch.Tensor, channels_last: bool | None = None) -> torch.Tensor:
    """Detached copy of x, channels_last when `channels_last` is True, or None under the GPU policy."""
    x = x.detach()
    if channels_last is None:
        channels_last = gpu_policy(x.device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


# --- losses (per example, to be maximized by the attacker) -------------------------------------


def _other_max(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """max_{j != y} z_j."""
    return logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), float("-inf")).amax(1)


def margin(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """z_y - max_{j != y} z_j: positive iff the prediction is y (Carlini & Wagner 2017)."""
    return logits.gather(1, y[:, None]).squeeze(1) - _other_max(logits, y)


def dlr(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Difference of logits ratio, -(z_y - max_{j!=y} z_j) / (z_pi1 - z_pi3) (Croce & Hein 2020, Eq. 6)."""
    z = logits.sort(1, descending=True).values
    return -margin(logits, y) / (z[:, 0] - z[:, 2] + 1e-12)


def dlr_targeted(logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Targeted DLR, -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2) (Croce & Hein 2020, Eq. 7)."""
    z = logits.sort(1, descending=True).values
    z_y = logits.gather(1, y[:, None]).squeeze(1)
    z_t = logits.gather(1, target[:, None]).squeeze(1)
    return -(z_y - z_t) / (z[:, 0] - 0.5 * (z[:, 2] + z[:, 3]) + 1e-12)


def attack_loss(name: str, y: torch.Tensor, targeted: bool = False) -> AttackObjective:
    """Per-example objective to maximize. Untargeted: y are the true labels; targeted: y are
    the target classes ("ce" then maximizes -CE(target), "margin" maximizes z_t - max_{j!=t} z_j)."""
    sign = -1.0 if targeted else 1.0
    if name == "ce":
        return lambda logits: sign * F.cross_entropy(logits, y, reduction="none")
    if name == "margin":
        return lambda logits: -sign * margin(logits, y)
    if name == "dlr":
        if targeted:
            raise ValueError("loss='dlr' is untargeted; use advkit.attacks.apgd.apgd_t for targeted DLR")
        return lambda logits: dlr(logits, y)
    raise ValueError(f"loss={name!r} is not available; choose one of ['ce', 'margin', 'dlr']")


def is_fooled(logits: torch.Tensor, y: torch.Tensor, targeted: bool = False) -> torch.Tensor:
    """Attack success per example: prediction != y (untargeted) or == y (targeted)."""
    pred = logits.argmax(1)
    return pred == y if targeted else pred != y


# --- gradients and bookkeeping ------------------------------------------------------------------


def loss_and_grad(forward: Forward, x: torch.Tensor, objective: AttackObjective,
                  precision: str | None = "auto") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d loss / d x, per-example loss, logits) at x; the gradient is w.r.t. x only, so model
    parameters get no .grad. The summed loss gives per-example gradients (eval mode: no coupling)."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        with _autocast(x.device, precision):
            logits = forward(x)
        logits = logits.float()
        loss = objective(logits)
        (grad,) = torch.autograd.grad(loss.sum(), x)
    return grad, loss.detach(), logits.detach()


@torch.no_grad()
def logits_at(forward: Forward, x: torch.Tensor, precision: str | None = "auto") -> torch.Tensor:
    with _autocast(x.device, precision):
        logits = forward(x)
    return logits.float() if isinstance(logits, torch.Tensor) else logits  # anything else: check_logits names it


def _expand(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return mask.view(-1, *([1] * (like.dim() - 1)))


def _stronger(fooled, loss, best_fooled, best_loss) -> torch.Tensor:
    return (fooled & ~best_fooled) | ((fooled == best_fooled) & (loss > best_loss))


class Strongest:
    """Per-example strongest candidate: a fooling point beats a non-fooling one, then higher loss
    wins. Updated with `torch.where` only (no host sync), so it can sit inside step loops."""

    def __init__(self, x: torch.Tensor):
        self.x = x.clone()
        self.loss = torch.full((len(x),), float("-inf"), device=x.device)
        self.fooled = torch.zeros(len(x), dtype=torch.bool, device=x.device)

    def update(self, x: torch.Tensor, loss: torch.Tensor, fooled: torch.Tensor) -> None:
        better = _stronger(fooled, loss, self.fooled, self.loss)
        self.x = torch.where(_expand(better, x), x, self.x)
        self.loss = torch.where(better, loss, self.loss)
        self.fooled = self.fooled | fooled

    def update_at(self, idx: torch.Tensor, other: "Strongest") -> None:
        """Merge the results `other` found for the examples `idx` of this set."""
        better = _stronger(other.fooled, other.loss, self.fooled[idx], self.loss[idx])
        self.x[idx] = torch.where(_expand(better, other.x), other.x, self.x[idx])
        self.loss[idx] = torch.where(better, other.loss, self.loss[idx])
        self.fooled[idx] = self.fooled[idx] | other.fooled


# --- L-inf / L2 geometry --------------------------------------------------------------------------


def _norm2(v: torch.Tensor) -> torch.Tensor:
    return v.flatten(1).norm(dim=1).view(-1, *([1] * (v.dim() - 1)))


def project(x_adv: torch.Tensor, x: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    """Projection onto the eps-ball around x intersected with the [0, 1] box.
    (Ball first, then box: clamping to the box only shrinks |delta_i|, so both hold.)"""
    if norm == "linf":
        x_adv = torch.minimum(torch.maximum(x_adv, x - eps), x + eps)
    else:
        delta = x_adv - x
        delta = delta * (eps / _norm2(delta).clamp_min(1e-12)).clamp(max=1.0)
        x_adv = x + delta
    return x_adv.clamp(0.0, 1.0)


def ascent_direction(grad: torch.Tensor, norm: str) -> torch.Tensor:
    """Steepest ascent direction of unit norm: sign(g) (L-inf) or g / ||g||_2 (L2)."""
    if norm == "linf":
        return grad.sign()
    return grad / _norm2(grad).clamp_min(1e-12)


def pgd_step(x_adv: torch.Tensor, grad: torch.Tensor, x: torch.Tensor, eps: float, alpha: float,
             norm: str) -> torch.Tensor:
    """The one PGD step (Madry et al. 2018, Eq. 2): x_adv + alpha * ascent direction of `grad`,
    projected onto the eps-ball around x and the [0, 1] box."""
    return project(x_adv + alpha * ascent_direction(grad, norm), x, eps, norm)


def random_point(x: torch.Tensor, eps: float, norm: str, generator: torch.Generator | None) -> torch.Tensor:
    """x plus uniform noise in the eps-ball (L-inf: U[-eps, eps]^d, Madry et al.'s and Wong et
    al.'s random start; L2: uniform in the ball), in the box. generator None: torch's global RNG."""
    if norm == "linf":
        noise = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        delta = (2 * noise - 1) * eps
    else:
        direction = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        u = torch.rand((len(x),) + (1,) * (x.dim() - 1), generator=generator, device=x.device, dtype=x.dtype)
        delta = direction / _norm2(direction).clamp_min(1e-12) * eps * u ** (1.0 / x[0].numel())
    return (x + delta).clamp(0.0, 1.0)


def pgd_ascent(forward: Forward, x: torch.Tensor, start: torch.Tensor, objective: AttackObjective, *,
               eps: float, alpha: float, steps: int, norm: str = "linf", precision: str | None = "auto",
               on_step: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None] | None = None,
               ) -> torch.Tensor:
    """The one PGD loop (Madry et al. 2018, Eq. 2-3): `steps` times x_adv <- pgd_step(x_adv,
    grad objective(forward(x_adv))), from `start`, in the eps-ball around x and the [0, 1] box.

    on_step(x_adv, loss, logits) sees every iterate before its step (loss per example; the
    last iterate is returned unevaluated). The caller sets the model's mode and the random
    start; precision None runs under the caller's autocast. No host sync in the loop.
    """
    x, x_adv = x.detach(), start.detach()
    for _ in range(steps):
        grad, loss, logits = loss_and_grad(forward, x_adv, objective, precision)
        if on_step is not None:
            on_step(x_adv, loss, logits)
        x_adv = pgd_step(x_adv, grad, x, eps, alpha, norm)
    return x_adv
