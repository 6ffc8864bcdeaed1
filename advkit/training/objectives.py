"""Training objectives: the pluggable piece of `advkit.training.fit.fit`.

An objective is any callable `objective(model, x, y) -> loss` (a scalar tensor to
minimize). It may also define `on_epoch_start(epoch)` (called before each epoch, e.g. for a
warm-up), `after_backward(model)` and `after_step(model)`, which `fit` calls around the
optimizer step (adversarial weight perturbation needs them):

    loss = objective(model, x, y); opt.zero_grad(); loss.backward()
    objective.after_backward(model); opt.step(); objective.after_step(model)

Adversarial objectives split into `perturb(model, x, y) -> x_adv` (the inner maximization)
and `training_loss(forward, x, x_adv, y)` (the outer loss; `forward` is the model or any
callable with its signature), so wrappers such as AWP can reuse both halves. Their inner
attacks are `advkit.attacks.ascent.pgd_ascent`, the loop of `advkit.attacks.pgd`, in the model mode
each paper's code uses (`attack_mode`) and under `fit`'s precision; gradients are taken w.r.t.
the input only, so nothing leaks into `param.grad`. Random starts draw from `generator`, by
default torch's global RNG, which `fit` reseeds from (TrainConfig.seed, epoch) at every epoch:
interrupted runs resume exactly.
Budgets are in [0, 1] pixel space; defaults are each paper's CIFAR-10 settings.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from advkit._checks import check_choice, check_int, check_number
from advkit._torch import Forward, train_mode
from advkit.attacks.ascent import AttackObjective, attack_loss, pgd_ascent, random_point

ATTACK_MODES = ("train", "eval")


class Objective(Protocol):
    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor: ...


class Clean:
    """Standard cross-entropy training, optionally with label smoothing (Szegedy et al. 2016)."""

    def __init__(self, label_smoothing: float = 0.0):
        check_number("label_smoothing", label_smoothing, 0.0, 1.0, high_open=True)
        self.label_smoothing = label_smoothing

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(model(x), y, label_smoothing=self.label_smoothing)

    def __repr__(self) -> str:
        return f"Clean(label_smoothing={self.label_smoothing})"


# --- shared pieces of the inner maximization -------------------------------------------------


def _check_budget(eps: Any, alpha: Any, steps: Any, attack_mode: Any) -> None:
    check_number("eps", eps, high=1.0)
    check_number("alpha", alpha, high=1.0)
    check_int("steps", steps)
    check_choice("attack_mode", attack_mode, ATTACK_MODES)


def _linf_pgd(model: nn.Module, x: torch.Tensor, start: torch.Tensor, objective: AttackObjective,
              eps: float, alpha: float, steps: int, attack_mode: str) -> torch.Tensor:
    """The inner maximization: `steps` signed-gradient steps of `pgd_ascent` from `start` with the
    model in `attack_mode` (every module's flag restored), under the caller's (fit's) autocast."""
    with train_mode(model, attack_mode == "train"):
        return pgd_ascent(model, x, start, objective, eps=eps, alpha=alpha, steps=steps, norm="linf",
                          precision=None)


def _gaussian_start(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """x + 0.001 N(0, 1), clipped to [0, 1] (the start of TRADES' and MART's code)."""
    noise = torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)
    return (x + 0.001 * noise).clamp_(0.0, 1.0)


# --- adversarial objectives ----------------------------------------------------------------------


class Adversarial:
    """Base of the adversarial objectives: loss = training_loss(model, x, perturb(model, x, y), y)."""

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def training_loss(self, forward: Forward, x: torch.Tensor, x_adv: torch.Tensor,
                      y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.training_loss(model, x, self.perturb(model, x, y), y)


@dataclass
class PGDAT(Adversarial):
    """PGD adversarial training (Madry et al. 2018, Eq. 2.1): minimize CE on PGD examples.

    Defaults: Rice et al. (2020)'s CIFAR-10 code, eps 8/255, step 2/255, 10 steps, uniform
    random start. As in Rice et al.'s (and Madry et al.'s) code the attack runs with the model
    in TRAIN mode (`attack_mode="train"`: BatchNorm uses batch statistics and its running
    statistics are updated by the attack's forward passes). `label_smoothing` smooths the
    outer loss only (the attack maximizes plain CE), a regularizer of Stutz et al. Table 1.
    """

    eps: float = 8 / 255
    alpha: float = 2 / 255
    steps: int = 10
    random_start: bool = True
    label_smoothing: float = 0.0
    attack_mode: str = "train"
    generator: torch.Generator | None = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        _check_budget(self.eps, self.alpha, self.steps, self.attack_mode)
        check_number("label_smoothing", self.label_smoothing, 0.0, 1.0, high_open=True)

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        start = random_point(x, self.eps, "linf", self.generator) if self.random_start else x
        return _linf_pgd(model, x, start, attack_loss("ce", y), self.eps, self.alpha, self.steps, self.attack_mode)

    def training_loss(self, forward: Forward, x: torch.Tensor, x_adv: torch.Tensor,
                      y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(forward(x_adv).float(), y, label_smoothing=self.label_smoothing)


@dataclass
class FGSMRS(PGDAT):
    """FGSM training with random start, "Fast is better than free" (Wong et al. 2020, Alg. 3):
    x_adv = Proj(x + delta + alpha sign(grad)), delta ~ U[-eps, eps], alpha = 1.25 eps.

    A one-step PGDAT; the attack runs in TRAIN mode as in their code. Their schedule (cyclic
    lr, 15 epochs) is in `advkit.training.fit.PAPER_TRAINING["fgsm_rs"]`; catastrophic overfitting shows up as a
    collapse of the held-out PGD accuracy, which early stopping on it catches.
    """

    alpha: float | None = None  # None: 1.25 * eps
    steps: int = 1

    def __post_init__(self):
        if self.steps != 1:
            raise ValueError(f"steps={self.steps!r}: FGSM-RS takes exactly one step (Wong et al. 2020); "
                             "use pgd_at for several")
        if self.alpha is None:
            check_number("eps", self.eps, high=1.0)
            self.alpha = 1.25 * self.eps
        super().__post_init__()


@dataclass
class _Regularized(Adversarial):
    """Settings shared by TRADES and MART: their CIFAR-10 code's budget (eps 0.031 ~ 8/255, step
    0.007, 10 steps from x + 0.001 N(0, 1)), the weight beta of the robust term, eval-mode attack."""

    eps: float = 8 / 255
    alpha: float = 0.007
    steps: int = 10
    beta: float = 6.0
    attack_mode: str = "eval"
    generator: torch.Generator | None = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        _check_budget(self.eps, self.alpha, self.steps, self.attack_mode)
        check_number("beta", self.beta)


@dataclass
class TRADES(_Regularized):
    """TRADES (Zhang et al. 2019, Eq. 5): CE(f(x), y) + beta * KL(f(x) || f(x_adv)), x_adv
    maximizing the KL in the eps-ball by signed-gradient ascent from x + 0.001 N(0, 1).

    Defaults from their CIFAR-10 code: eps 0.031 (~8/255; we use 8/255), step 0.007, 10 steps,
    beta 6. As in their code the attack runs with the model in EVAL mode and the outer loss in
    train mode (x and x_adv in separate forward passes). beta = 0 is clean training.
    """

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        start = _gaussian_start(x, self.generator)
        with train_mode(model, self.attack_mode == "train"), torch.no_grad():
            p_natural = F.softmax(model(x).float(), dim=1)
        kl = lambda z: F.kl_div(F.log_softmax(z, dim=1), p_natural, reduction="none").sum(1)  # noqa: E731
        return _linf_pgd(model, x, start, kl, self.eps, self.alpha, self.steps, self.attack_mode)

    def training_loss(self, forward: Forward, x: torch.Tensor, x_adv: torch.Tensor,
                      y: torch.Tensor) -> torch.Tensor:
        logits = forward(x).float()
        logits_adv = forward(x_adv).float()
        # The target in log space: the same KL as their kl_div(log_softmax, softmax), but a class whose
        # softmax underflows to 0 (a logit gap over ~100) gives a zero gradient, not 0 * log(0) = NaN.
        robust = F.kl_div(F.log_softmax(logits_adv, dim=1), F.log_softmax(logits, dim=1), reduction="batchmean",
                          log_target=True)
        return F.cross_entropy(logits, y) + self.beta * robust


@dataclass
class MART(_Regularized):
    """MART, misclassification-aware adversarial training (Wang et al. 2020, Eq. 9):
    BCE(f(x_adv), y) + beta * KL(f(x) || f(x_adv)) * (1 - f_y(x)), with
    BCE = -log f_y(x_adv) - log(1 - max_{k != y} f_k(x_adv)) (Eq. 7).

    Defaults from their code: eps 0.031 (~8/255; we use 8/255), step 0.007, 10 steps of CE
    ascent from x + 0.001 N(0, 1), beta 6 (their WideResNet script; their ResNet-18 script uses
    5). The attack runs in EVAL mode and the loss in train mode, as in their code.
    """

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        start = _gaussian_start(x, self.generator)
        return _linf_pgd(model, x, start, attack_loss("ce", y), self.eps, self.alpha, self.steps, self.attack_mode)

    def training_loss(self, forward: Forward, x: torch.Tensor, x_adv: torch.Tensor,
                      y: torch.Tensor) -> torch.Tensor:
        logits = forward(x).float()
        logits_adv = forward(x_adv).float()
        p_adv = F.softmax(logits_adv, dim=1)
        top2 = p_adv.topk(2, dim=1).indices
        runner_up = torch.where(top2[:, 0] == y, top2[:, 1], top2[:, 0])  # argmax_{k != y} p_k(x_adv)
        bce = F.cross_entropy(logits_adv, y) + F.nll_loss(torch.log(1.0001 - p_adv + 1e-12), runner_up)
        p_natural = F.softmax(logits, dim=1)
        p_true = p_natural.gather(1, y[:, None]).squeeze(1)
        # target in log space, as in TRADES: an underflowed p_natural gives no NaN gradient
        kl = F.kl_div(torch.log(p_adv + 1e-12), F.log_softmax(logits, dim=1), reduction="none", log_target=True).sum(1)
        return bce + self.beta * (kl * (1.0000001 - p_true)).mean()


# --- adversarial weight perturbation -----------------------------------------------------------


AWP_INNER = ("pgd_at", "fgsm_rs", "trades", "mart")


@dataclass
class AWP:
    """Adversarial weight perturbation (Wu et al. 2020, Eq. 8-9) around an adversarial objective.

    Per step: x_adv = inner.perturb(model, x, y) at the weights w; then one ascent step on the
    inner training loss in weight space, layer-wise relative: v_l = gamma ||w_l|| g_l / ||g_l||
    for every conv/linear weight (ndim > 1; BatchNorm and biases are left alone); the loss is
    returned at w + v, so backward gives its gradient there. `after_backward` (called by `fit`
    before the optimizer step) copies the saved weights back bit for bit, so the optimizer
    steps from exactly w with the gradient taken at w + v. The ascent gradient comes from a
    functional call with copies of the buffers (their proxy model): it leaves BatchNorm
    statistics and `param.grad` untouched. gamma = 5e-3 (their TRADES-AWP; their AT-AWP code
    uses 1e-2). Their warm-up (no AWP for the first epochs of TRADES-AWP) is not implemented.
    """

    inner: Adversarial | str = "pgd_at"
    gamma: float = 5e-3
    inner_kwargs: dict[str, Any] = field(default_factory=dict)
    _saved: list[tuple[nn.Parameter, torch.Tensor]] | None = field(default=None, init=False, repr=False,
                                                                    compare=False)

    def __post_init__(self):
        check_number("gamma", self.gamma)
        if isinstance(self.inner, str):
            if self.inner not in AWP_INNER:
                raise ValueError(f"inner={self.inner!r} is not available for AWP; choose one of {list(AWP_INNER)} "
                                 "or pass an Adversarial objective")
            self.inner = get_objective(self.inner, **self.inner_kwargs)
        elif not isinstance(self.inner, Adversarial):
            raise ValueError(f"inner must be one of {list(AWP_INNER)} or an Adversarial objective, got {self.inner!r}")
        elif self.inner_kwargs:
            raise ValueError("inner_kwargs only apply when inner is a name; configure the inner objective instead")

    def weight_perturbation(self, model: nn.Module, x: torch.Tensor, x_adv: torch.Tensor,
                            y: torch.Tensor) -> list[tuple[nn.Parameter, torch.Tensor]]:
        """(parameter, v) pairs of Eq. 9: one normalized ascent step on the inner training loss."""
        params = dict(model.named_parameters())
        perturbed = [p for p in params.values() if p.requires_grad and p.dim() > 1]
        proxy_buffers = {n: b.clone() for n, b in model.named_buffers()}
        with train_mode(model, True), torch.enable_grad():
            loss = self.inner.training_loss(
                lambda inp: functional_call(model, {**params, **proxy_buffers}, (inp,)), x, x_adv, y)
            grads = torch.autograd.grad(loss, perturbed)
        with torch.no_grad():
            return [(p, self.gamma * p.norm() / (g.norm() + 1e-20) * g) for p, g in zip(perturbed, grads)]

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self._saved is not None:
            raise RuntimeError("AWP: the weights are still perturbed by the previous call; call "
                               "after_backward(model) (fit does) before computing the next loss")
        x_adv = self.inner.perturb(model, x, y)
        perturbation = self.weight_perturbation(model, x, x_adv, y)
        with torch.no_grad():
            self._saved = [(p, p.detach().clone()) for p, _ in perturbation]
            for p, v in perturbation:
                p.add_(v)
        return self.inner.training_loss(model, x, x_adv, y)

    def restore(self) -> None:
        """Copy the unperturbed weights back (exactly, not by subtracting v)."""
        if self._saved is None:
            return
        with torch.no_grad():
            for p, saved in self._saved:
                p.copy_(saved)
        self._saved = None

    def after_backward(self, model: nn.Module) -> None:
        self.restore()


# --- registry ---------------------------------------------------------------------------------


OBJECTIVES: dict[str, Callable[..., Objective]] = {
    "clean": Clean,
    "pgd_at": PGDAT,
    "fgsm_rs": FGSMRS,
    "trades": TRADES,
    "mart": MART,
    "awp": AWP,
}


def get_objective(name: str, **kwargs) -> Objective:
    """Build a registered objective by name with its keyword settings (e.g. beta=6)."""
    check_choice("objective", name, sorted(OBJECTIVES))
    cls = OBJECTIVES[name]
    allowed = [p for p in inspect.signature(cls).parameters if not p.startswith("_")]
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise ValueError(f"objective {name!r} has no setting {unknown}; allowed: {allowed}")
    return cls(**kwargs)
