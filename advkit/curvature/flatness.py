"""Flatness of the (clean or robust) loss around the trained weights.

- `avg_case_flatness`, `worst_case_flatness`: Stutz, Hein & Schiele 2021 (Eq. 1-2), loss
  change in a *relative* per-layer ball {v : ||v_l|| <= xi ||w_l|| for every layer l},
  which makes them invariant to the layer-wise rescalings that leave a ReLU network's
  function unchanged.
- `epsilon_sharpness` (Keskar et al. 2017, Metric 2.1) and `adaptive_sharpness` (Kwon et
  al. 2021, ASAM) as extras: both by projected gradient ascent on the weights.
- `relative_flatness` of the feature layer (Petzka et al. 2021, Def. 3; used per example
  by Walter et al. 2025) in closed form for softmax cross-entropy, and
  `confidence_flatness` for the "confidently wrong in flat regions" plot.

Common conventions: the measures share one call shape, measure(model, x, y, loss, **own settings),
where `loss` (a `FlatnessLoss`) says which loss is perturbed and which weights: a "layer" is one
parameter tensor (weights and biases are separate layers); BatchNorm parameters are never perturbed
unless `include_bn=True`; the loss is the mean over the fixed subset (x in [0, 1], y), computed in
chunks of `batch_size`; it is the robust loss when an `attack(model, x, y) -> x_adv` is given, re-run
on every set of perturbed weights. The model runs in eval mode and is never modified
(`torch.func.functional_call`). Every random choice is seeded.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from advkit._checks import check_int, check_number
from advkit._torch import (
    Attack,
    PerExampleLoss,
    WithParams,
    chunks,
    eval_mode,
    loss_and_accuracy,
    make_generator,
    model_device,
    to_float,
)
from advkit.attacks.ascent import pgd_step, random_point
from advkit.curvature.operator import adversarial_inputs, check_data, per_example_cross_entropy, select_params
from advkit.runs.run import describe_callable


@dataclass(frozen=True)
class FlatnessResult:
    """One flatness number with the losses it came from and the settings that produced it."""

    metric: str
    value: float
    loss: float              # loss at the trained weights w
    perturbed_loss: float    # mean (average case) or max (worst case) loss at w + v
    samples: list[float] = field(default_factory=list)   # per perturbation / restart: loss(w+v) - loss(w)
    settings: dict[str, Any] = field(default_factory=dict)

    def as_row(self) -> dict[str, Any]:
        """Flat dict for one row of flatness.csv: value, losses and every setting, prefixed by `metric`."""
        row = {self.metric: self.value, f"{self.metric}_loss": self.loss,
               f"{self.metric}_perturbed_loss": self.perturbed_loss}
        row.update({f"{self.metric}_{k}": v for k, v in self.settings.items()})
        return row


# --- loss over the subset ---------------------------------------------------------------------


def dataset_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *,
                 params: dict[str, torch.Tensor] | None = None, attack: Attack | None = None,
                 loss_fn: PerExampleLoss | None = None, batch_size: int = 500) -> float:
    """Mean loss over (x, y) at substituted `params` (by name; the rest as in `model`), eval mode, fp32.

    With `attack`, each chunk is first replaced by attack(model_at_params, x, y): the robust loss.
    """
    net = model if params is None else WithParams(model, params)
    return loss_and_accuracy(net, x, y, batch_size=batch_size, precision="fp32",
                             loss_fn=loss_fn or per_example_cross_entropy, attack=attack, mode_of=model).loss


@dataclass(frozen=True)
class FlatnessLoss:
    """The loss L(w) a flatness measure perturbs, and which weights: the mean `loss_fn` (None:
    cross-entropy) over (x, y), or the robust loss (Stutz et al. 2021, Eq. 1-2) with `attack(model, x,
    y) -> x_adv` re-run at every perturbed w; every parameter tensor but normalization layers'
    (`include_bn`) or only `layers`; evaluated in chunks of `batch_size` (speed only)."""

    attack: Attack | None = None
    loss_fn: PerExampleLoss | None = None
    include_bn: bool = False
    layers: Sequence[str] | None = None
    batch_size: int = 500

    def __post_init__(self) -> None:
        check_int("batch_size", self.batch_size)

    @property
    def per_example(self) -> PerExampleLoss:
        return self.loss_fn or per_example_cross_entropy

    def weights(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The parameter tensors the measures perturb, by name."""
        return select_params(model, include_bn=self.include_bn, layers=self.layers)

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                 params: dict[str, torch.Tensor] | None = None) -> float:
        """L at the substituted `params` (`dataset_loss`)."""
        return dataset_loss(model, x, y, params=params, attack=self.attack, loss_fn=self.loss_fn,
                            batch_size=self.batch_size)

    def record(self, x: torch.Tensor) -> dict[str, Any]:
        """What every flatness row records of the loss it measured."""
        return {"attack": describe_callable(self.attack), "loss_fn": describe_callable(self.per_example),
                "include_bn": self.include_bn, "n_data": len(x)}


# --- average-case flatness (Stutz et al. 2021, Eq. 1) -----------------------------------------


def relative_sphere(params: dict[str, torch.Tensor], xi: float, generator: torch.Generator
                    ) -> dict[str, torch.Tensor]:
    """v uniform on the relative per-layer sphere: v_l = xi ||w_l|| u_l / ||u_l||, u_l Gaussian."""
    out = {}
    for name, w in params.items():
        u = torch.randn(w.shape, generator=generator, device=w.device, dtype=w.dtype)
        out[name] = xi * w.norm() * u / u.norm().clamp_min(1e-30)
    return out


def avg_case_flatness(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss: FlatnessLoss | None = None, *,
                      xi: float = 0.5, n_samples: int = 10, seed: int = 0) -> FlatnessResult:
    """Average-case flatness (Stutz et al. 2021, Eq. 1): E_v[L(w + v)] - L(w).

    v is drawn uniformly on the relative per-layer L2 sphere of radius xi ||w_l|| (n_samples
    draws, seeded); L is `loss`'s: the clean loss, or the robust loss with its attack re-run on w + v.
    Sphere, not ball: Stutz et al. define the neighbourhood as the ball B_xi(w) (Eq. 2) and draw
    "random weight perturbations v in B_xi(w)"; a uniform draw from a d_l-dimensional ball has
    radius xi ||w_l|| U^(1/d_l), on average d_l / (d_l + 1) of the boundary (>= 0.996 for the
    smallest layer here, 288 weights; ~1 for ResNet-18's), so sampling the sphere gives the same
    measure while keeping every draw at the stated relative size xi.
    """
    check_data(x, y)
    check_number("xi", xi)
    check_int("n_samples", n_samples)
    loss = loss or FlatnessLoss()
    params = loss.weights(model)
    ref = loss(model, x, y)
    gen = make_generator(model_device(model), seed)
    losses = []
    for _ in range(n_samples):
        v = relative_sphere(params, xi, gen)
        losses.append(loss(model, x, y, params={n: w + v[n] for n, w in params.items()}))
    settings = {"xi": xi, "n_samples": n_samples, "seed": seed, **loss.record(x)}
    return FlatnessResult("avg_case_flatness", float(np.mean(losses)) - ref, ref, float(np.mean(losses)),
                          [lo - ref for lo in losses], settings)


# --- gradient ascent on the weights (worst case, Keskar, ASAM) ---------------------------------


def _ascent(model: nn.Module, x: torch.Tensor, y: torch.Tensor, params: dict[str, torch.Tensor],
            u: dict[str, torch.Tensor], to_delta: Callable[[dict], dict], step: Callable[[dict, dict], dict],
            steps: int, loss: FlatnessLoss, *, eps: float, input_step: float, generator: torch.Generator) -> float:
    """Maximize L(w + to_delta(u), x_adv) by `steps` ascent steps on u (and on x_adv).

    The weight step sees the gradient of the mean loss over the whole subset (accumulated
    over chunks). Inputs: with `loss.attack`, each step re-runs it at the current weights
    (Danskin); else with eps > 0, Stutz et al.'s joint ascent: x_adv starts uniform in the
    L-inf eps-ball around x (in the [0, 1] box) and takes one PGD step (`pgd_step`, size
    `input_step`) per weight step, both from the gradient at the same point (w + v, x_adv);
    else clean. Returns the loss at the final weights and inputs (`dataset_loss`).
    """
    attack, loss_fn = loss.attack, loss.per_example
    device = model_device(model)
    x, y = to_float(x.to(device)), y.to(device)
    joint = attack is None and eps > 0
    x_adv = random_point(x, eps, "linf", generator) if joint else x
    with eval_mode(model):
        for _ in range(steps):
            u = {k: t.detach().requires_grad_(True) for k, t in u.items()}
            d = to_delta(u)
            p = {k: w + d[k] for k, w in params.items()}
            g_sum = {k: torch.zeros_like(t) for k, t in u.items()}
            for s in chunks(len(x), loss.batch_size):
                xb, yb = x_adv[s], y[s]
                if attack is not None:
                    xb = attack(WithParams(model, {k: t.detach() for k, t in p.items()}), xb, yb).detach()
                elif joint:
                    xb = xb.clone().requires_grad_(True)
                mean = loss_fn(functional_call(model, p, (xb,)), yb).sum() / len(x)
                grads = torch.autograd.grad(mean, list(u.values()) + ([xb] if joint else []))
                for k, g in zip(u, grads):
                    g_sum[k] += g
                if joint:
                    x_adv[s] = pgd_step(xb.detach(), grads[-1], x[s], eps, input_step, "linf")
            with torch.no_grad():
                u = step({k: t.detach() for k, t in u.items()}, g_sum)
    d = to_delta(u)
    final = {k: w + d[k].detach() for k, w in params.items()}
    return loss(model, x_adv, y, params=final)


def _relative_ball_step(params: dict[str, torch.Tensor], xi: float, frac: float):
    """Layer-wise normalized gradient step of frac * xi ||w_l||, projected onto the relative ball."""
    def step(v, g):
        out = {}
        for k, w in params.items():
            radius = xi * w.norm()
            new = v[k] + frac * radius * g[k] / g[k].norm().clamp_min(1e-30)
            out[k] = new * torch.clamp(radius / new.norm().clamp_min(1e-30), max=1.0)
        return out
    return step


def worst_case_flatness(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss: FlatnessLoss | None = None, *,
                        xi: float = 0.003, steps: int = 20, restarts: int = 1, eps: float = 0.0,
                        input_step: float | None = None, weight_step: float | None = None,
                        seed: int = 0) -> FlatnessResult:
    """Worst-case flatness (Stutz et al. 2021, Eq. 2): max_{v in B_xi} L(w + v) - L(w).

    Joint gradient ascent: per step a layer-wise normalized weight step of
    weight_step * xi ||w_l|| (default 2.5/steps), projected onto the relative ball, and -
    for the robust loss - one L-inf PGD step (`pgd_step`) of size input_step (default
    2.5 eps/steps) on inputs that start uniform in the eps-ball (eps > 0), or `loss`'s attack
    re-run at the current weights. Start: v uniform in the ball (seeded); the maximum over
    `restarts`. L(w) uses the same input procedure with the weights fixed.
    """
    check_data(x, y)
    check_number("xi", xi)
    check_number("eps", eps, high=1.0)
    check_int("steps", steps)
    check_int("restarts", restarts)
    loss = loss or FlatnessLoss()
    if loss.attack is not None and eps > 0:
        raise ValueError("give either attack (re-run per step) or eps (joint PGD steps), not both")
    input_step = 2.5 * eps / steps if input_step is None else input_step
    weight_step = 2.5 / steps if weight_step is None else weight_step
    check_number("input_step", input_step)
    check_number("weight_step", weight_step)
    params = loss.weights(model)
    gen = make_generator(model_device(model), seed)
    kw = dict(eps=eps, input_step=input_step, generator=gen)
    zero = {k: torch.zeros_like(w) for k, w in params.items()}
    ref = _ascent(model, x, y, params, zero, lambda u: u, lambda v, g: v, steps if eps > 0 else 0, loss, **kw)
    losses = []
    for _ in range(restarts):
        v0 = relative_sphere(params, xi, gen)
        v0 = {k: t * torch.rand((), generator=gen, device=t.device) for k, t in v0.items()}
        losses.append(_ascent(model, x, y, params, v0, lambda u: u, _relative_ball_step(params, xi, weight_step),
                              steps, loss, **kw))
    settings = {"xi": xi, "steps": steps, "restarts": restarts, "eps": eps, "input_step": input_step,
                "weight_step": weight_step, "seed": seed, **loss.record(x)}
    return FlatnessResult("worst_case_flatness", max(losses) - ref, ref, max(losses),
                          [lo - ref for lo in losses], settings)


def epsilon_sharpness(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss: FlatnessLoss | None = None, *,
                      epsilon: float = 1e-3, steps: int = 10, seed: int = 0) -> FlatnessResult:
    """Keskar et al. 2017 (Metric 2.1): 100 (max_{z in C} L(w + z) - L(w)) / (1 + L(w)).

    C is the box |z_i| <= epsilon (|w_i| + 1) in the full parameter space (A = I); the max
    is taken by `steps` projected sign-gradient steps of 2.5/steps of the box (Keskar et al.
    used L-BFGS-B), from a seeded uniform start in the box.
    """
    check_data(x, y)
    check_number("epsilon", epsilon)
    check_int("steps", steps)
    loss = loss or FlatnessLoss()
    params = loss.weights(model)
    gen = make_generator(model_device(model), seed)
    box = {k: epsilon * (w.abs() + 1) for k, w in params.items()}

    def step(z, g):
        return {k: (z[k] + 2.5 / steps * box[k] * g[k].sign()).clamp(-box[k], box[k]) for k in z}

    z0 = {k: (torch.rand(b.shape, generator=gen, device=b.device) * 2 - 1) * b for k, b in box.items()}
    ref = loss(model, x, y)
    top = _ascent(model, x, y, params, z0, lambda u: u, step, steps, loss, eps=0.0, input_step=0.0, generator=gen)
    settings = {"epsilon": epsilon, "steps": steps, "seed": seed, **loss.record(x)}
    return FlatnessResult("epsilon_sharpness", 100 * (top - ref) / (1 + ref), ref, top, [top - ref], settings)


def adaptive_sharpness(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss: FlatnessLoss | None = None, *,
                       rho: float = 0.5, eta: float = 0.01, steps: int = 5, seed: int = 0) -> FlatnessResult:
    """Adaptive sharpness (Kwon et al. 2021, ASAM): max_{||T_w^-1 e||_2 <= rho} L(w + e) - L(w).

    T_w = diag(|w| + eta) makes it invariant to per-neuron rescaling. The max is taken by
    `steps` normalized gradient steps of 2.5 rho / steps in u = T_w^-1 e, projected onto the
    rho ball, from a seeded random start in the ball.
    """
    check_data(x, y)
    check_number("rho", rho)
    check_number("eta", eta)
    check_int("steps", steps)
    loss = loss or FlatnessLoss()
    params = loss.weights(model)
    gen = make_generator(model_device(model), seed)
    scale = {k: w.abs() + eta for k, w in params.items()}

    def norm(u):
        return torch.sqrt(sum((t ** 2).sum() for t in u.values())).clamp_min(1e-30)

    def step(u, g):
        gn = norm(g)
        new = {k: u[k] + 2.5 * rho / steps * g[k] / gn for k in u}
        shrink = torch.clamp(rho / norm(new), max=1.0)
        return {k: t * shrink for k, t in new.items()}

    u0 = {k: torch.randn(w.shape, generator=gen, device=w.device) for k, w in params.items()}
    r = rho * torch.rand((), generator=gen, device=model_device(model)) / norm(u0)
    u0 = {k: t * r for k, t in u0.items()}
    ref = loss(model, x, y)
    top = _ascent(model, x, y, params, u0, lambda u: {k: scale[k] * t for k, t in u.items()}, step, steps, loss,
                  eps=0.0, input_step=0.0, generator=gen)
    settings = {"rho": rho, "eta": eta, "steps": steps, "seed": seed, **loss.record(x)}
    return FlatnessResult("adaptive_sharpness", top - ref, ref, top, [top - ref], settings)


# --- relative flatness of the feature layer (Petzka et al. 2021) -------------------------------


def feature_layer(model: nn.Module) -> tuple[str, nn.Linear]:
    """The model's last nn.Linear (module order), whose input is the feature vector phi(x).

    advkit's models end in one (`linear` for the ResNets and the small CNN).
    """
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not found:
        raise ValueError("the model has no nn.Linear layer; pass layer=<the final linear module>")
    return found[-1]


def features(model: nn.Module, x: torch.Tensor, *, layer: nn.Linear | None = None,
             batch_size: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    """(phi(x), z(x)): the input and output of the feature layer, captured by a forward hook (eval mode)."""
    layer = layer if layer is not None else feature_layer(model)[1]
    device = model_device(model)
    phis, zs = [], []

    def hook(_module, args, output):
        phis.append(args[0].detach().flatten(1))
        zs.append(output.detach())

    handle = layer.register_forward_hook(hook)
    try:
        with eval_mode(model), torch.no_grad():
            for s in chunks(len(x), batch_size):
                model(to_float(x[s].to(device)))
    finally:
        handle.remove()
    return torch.cat(phis), torch.cat(zs)


@dataclass(frozen=True)
class RelativeFlatnessResult:
    """kappa^phi_Tr over the subset (mean) and per example."""

    value: float
    per_example: np.ndarray
    settings: dict[str, Any] = field(default_factory=dict)

    def as_row(self, prefix: str = "relative_flatness") -> dict[str, Any]:
        row = {prefix: self.value}
        row.update({f"{prefix}_{k}": v for k, v in self.settings.items()})
        return row


def relative_flatness_closed_form(weight: torch.Tensor, phi: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Per-example kappa_i = ||phi_i||^2 (sum_c p_ic ||w_c||^2 - ||W^T p_i||^2) for softmax CE.

    The per-example Hessian w.r.t. W (classes x features) is (diag p - p p^T) kron phi phi^T,
    so Tr(H_{s,s'}) = (diag p - p p^T)_{ss'} ||phi||^2 and kappa = ||phi||^2 Tr(W W^T (diag p - p p^T)):
    the variance of the class weight vector w_c under c ~ p, times ||phi||^2. Small when the
    model is confident (p one-hot), whether it is right or wrong.
    """
    p = torch.softmax(logits.double(), dim=1)
    W = weight.double()
    sq = (W ** 2).sum(1)                                     # ||w_c||^2
    var = p @ sq - ((p @ W) ** 2).sum(1)
    return (phi.double() ** 2).sum(1) * var


def relative_flatness(model: nn.Module, x: torch.Tensor, *, layer: nn.Linear | None = None,
                      batch_size: int = 500) -> RelativeFlatnessResult:
    """Relative flatness kappa^phi_Tr(w) of the feature layer (Petzka et al. 2021, Def. 3).

    kappa = sum_{s,s'} <w_s, w_s'> Tr(H_{s,s'}), where the model is f(x) = g(W phi(x) + b),
    W in R^{d x m} is the last linear layer's weight (d classes, m features), w_s in R^m is
    its s-th ROW (the incoming weights of output neuron s, as in the authors' code) and
    H_{s,s'} (m x m) is the Hessian of the mean CE loss w.r.t. w_s and w_s'. Softmax CE gives
    a closed form (`relative_flatness_closed_form`, as derived by Walter et al. 2025) that
    needs no labels and no second derivatives; the subset value is the mean of the
    per-example values. Pass adversarial inputs as x to compare them with clean ones.
    """
    if not isinstance(x, torch.Tensor) or len(x) == 0:
        raise ValueError("x must be a non-empty tensor of inputs in [0, 1]")
    check_int("batch_size", batch_size)
    name, lin = (None, layer) if layer is not None else feature_layer(model)
    phi, z = features(model, x, layer=lin, batch_size=batch_size)
    kappa = relative_flatness_closed_form(lin.weight.detach(), phi, z).cpu().numpy()
    settings = {"layer": name or type(lin).__name__, "n_data": len(x)}
    return RelativeFlatnessResult(float(kappa.mean()), kappa, settings)


def confidence_flatness(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *,
                        attack: Attack | None = None, layer: nn.Linear | None = None,
                        batch_size: int = 500) -> pd.DataFrame:
    """Per example: label, prediction, confidence (max softmax), correctness, CE loss, relative flatness.

    For Walter et al. 2025's observation that adversarial examples sit in flat regions where
    the model is confidently wrong: plot confidence vs relative_flatness, colored by correct.
    With `attack`, the rows describe attack(model, x, y) instead of x.
    """
    check_data(x, y)
    if attack is not None:
        x = adversarial_inputs(model, x.to(model_device(model)), y.to(model_device(model)), attack, batch_size)
    lin = layer if layer is not None else feature_layer(model)[1]
    phi, z = features(model, x, layer=lin, batch_size=batch_size)
    y = y.to(z.device)
    p = torch.softmax(z, 1)
    conf, pred = p.max(1)
    kappa = relative_flatness_closed_form(lin.weight.detach(), phi, z)
    return pd.DataFrame({
        "label": y.cpu().numpy(), "predicted": pred.cpu().numpy(), "confidence": conf.cpu().numpy(),
        "correct": (pred == y).cpu().numpy(), "loss": F.cross_entropy(z, y, reduction="none").cpu().numpy(),
        "relative_flatness": kappa.cpu().numpy(),
    })
