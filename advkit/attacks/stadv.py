"""Spatially transformed adversarial examples, stAdv (Xiao et al. 2018).

Instead of adding noise, stAdv moves pixels: a per-pixel flow field f = (du, dv) resamples the
image bilinearly, x_adv(p) = sum_{q in N(p + f_p)} x(q) (1 - |q_u - (p_u + du_p)|)(1 - |q_v - (p_v + dv_p)|)
(Eq. 3-4 of Xiao et al.), done by `torch.nn.functional.grid_sample`. The flow minimizes
L_adv + tau * L_flow (Eq. 2): a CW margin loss plus the flow's total variation (Eq. 5), taken as
a mean over the pixels (see `flow_loss` for why), within an optional L-inf bound `max_flow`.

Units: flows are in PIXELS, channel 0 horizontal (du, along W), channel 1 vertical (dv, along H).
grid_sample's normalized coordinates span [-1, 1] over the image (align_corners=False), so one
pixel is 2/W (horizontally) normalized units: a displacement r in normalized units is
r * W / 2 pixels (`normalized_to_pixels`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from advkit._checks import check_choice, check_int, check_number
from advkit._torch import autocast, eval_mode
from advkit.attacks.ascent import check_images, check_model_output, is_fooled, margin, prepare
from advkit.attacks.model import forward_fn, split_attack_model

OPTIMIZERS = ("lbfgs", "adam")


def normalized_to_pixels(radius: float, size: int) -> float:
    """A displacement in grid_sample's normalized [-1, 1] coordinates, in pixels of an image
    `size` pixels wide: radius * size / 2 (e.g. 0.3/64 on 32-pixel CIFAR-10 is 0.075 px)."""
    return radius * size / 2


def _next_pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def apply_flow(x: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    """Bilinear resampling of x (N, C, H, W) at p + flow_p, flow (N, 2, H, W) in pixels
    (Xiao et al. 2018, Eq. 3-4); outside the image the border pixels repeat.

    The image is replicate-padded to power-of-two sides, so the sampling grid, (2i + 1)/W' - 1,
    and its scaling are exact binary fractions: zero flow returns x bit for bit (a plain grid
    at e.g. W=28 is off by ~1e-6), and padding with the border value keeps border semantics.
    """
    if flow.shape != (x.shape[0], 2, *x.shape[2:]):
        raise ValueError(f"flow must have shape {(x.shape[0], 2, *x.shape[2:])}, got {tuple(flow.shape)}")
    n, _, h, w = x.shape
    hp, wp = _next_pow2(h), _next_pow2(w)
    padded = F.pad(x, (0, wp - w, 0, hp - h), mode="replicate") if (hp, wp) != (h, w) else x
    gx = (2 * torch.arange(w, device=x.device, dtype=flow.dtype) + 1) / wp - 1
    gy = (2 * torch.arange(h, device=x.device, dtype=flow.dtype) + 1) / hp - 1
    grid_x = gx.view(1, 1, w) + flow[:, 0] * (2 / wp)
    grid_y = gy.view(1, h, 1) + flow[:, 1] * (2 / hp)
    # NaN/inf coordinates make grid_sample's CPU backward read out of bounds (a segfault): map them
    # to the border (|coordinate| > 1 samples the border anyway), without a host sync.
    grid = torch.stack((grid_x, grid_y), dim=-1)
    grid = grid.nan_to_num(nan=2.0, posinf=2.0, neginf=-2.0).clamp(-2.0, 2.0)
    return F.grid_sample(padded, grid.to(padded.dtype), mode="bilinear", padding_mode="border",
                         align_corners=False)


def flow_loss(flow: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Flow smoothness per example: Xiao et al.'s (2018) Eq. 5,
    sum_p sum_{q in N(p)} sqrt(||du_p - du_q||^2 + ||dv_p - dv_q||^2 + eps) over the 4-neighbours q
    inside the image (each pair counted from both sides), divided by the number of pixels H*W.

    The mean, not Eq. 5's plain sum, keeps tau's weight independent of the image size. With the
    sum, a flow's TV grows with H*W while a CIFAR model's margin moves by only ~1e-3 per pixel of
    flow per pixel, so on 32x32 images tau = 0.05 made the zero flow the minimizer (the TV is not
    differentiable there, a lasso-like dead zone): stAdv stopped at ~1e-3 px and changed no
    prediction whatever max_flow was (it worked only on 8x8 digits, 16x fewer pixels). In flows
    of pixels, eps keeps the gradient finite at zero flow, where stAdv starts.
    """
    dh = flow[:, :, :, 1:] - flow[:, :, :, :-1]
    dv = flow[:, :, 1:, :] - flow[:, :, :-1, :]
    horizontal = (dh.pow(2).sum(1) + eps).sqrt().flatten(1).sum(1)
    vertical = (dv.pow(2).sum(1) + eps).sqrt().flatten(1).sum(1)
    return 2 * (horizontal + vertical) / (flow.shape[2] * flow.shape[3])


def stadv(model: nn.Module, x: torch.Tensor, y: torch.Tensor, tau: float = 0.05, steps: int = 50, *,
          optimizer: str = "lbfgs", max_flow: float | None = None, kappa: float = 0.0,
          lr: float | None = None, targeted: bool = False, return_flow: bool = False,
          ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """stAdv (Xiao et al. 2018): minimize over the flow f, per example,
    L_adv(x_f) + tau * L_flow(f), with L_adv = max(z_y - max_{j!=y} z_j, -kappa) (Eq. 6, CW margin;
    targeted: max(max_{j!=t} z_j - z_t, -kappa)) and L_flow of `flow_loss`, from zero flow.

    optimizer: "lbfgs" (as in the paper; torch.optim.LBFGS with strong-Wolfe line search and
    `steps` iterations on the batch's summed objective, which is separable across examples;
    its line search synchronises with the host) or "adam" (`steps` steps of size `lr` pixels,
    sync-free). max_flow: optional L-inf bound on every flow component, in PIXELS, enforced
    exactly by the reparametrization f = max_flow * tanh(w).

    The bound of Xu et al. (2019), calibrated (`advkit.attacks.evaluate.stadv_flow_sweep`): their text
    states a flow radius of 0.3/64, i.e. 0.0047 px read in pixels or 0.075 px read in grid_sample's
    normalized units (normalized_to_pixels(0.3/64, 32)); their released code (mister_ed's
    FullSpatial flow, L-inf bound FLOW_LINF = 0.05 on the normalized sampling grid) bounds the flow
    at normalized_to_pixels(0.05, 32) = 0.8 px. On a ResNet-20 trained briefly on CIFAR-10 on CPU
    (64 test images, 28 % clean), tau 0.05 and 50 L-BFGS steps gave accuracy 28, 19, 16, 8 and 0 %
    and 1 - SSIM 4e-6, 7.8e-4, 2.5e-3, 7.9e-3 and 1.2e-2 at 0.0047, 0.075, 0.15, 0.3 and 0.8 px.
    Their Table 2 (1 - SSIM 0.0028) needs flows beyond 0.075 px, which stays 3.6x below it even
    filled, and only 0.8 px reaches their Table 1 (0 %): `XU2019` and the paper profile use the
    code's reading, max_flow=0.8 (0.2 px on 8x8 digits, notebook 02's default).

    Returns x_adv in [0, 1] (and the flow in pixels, (N, 2, H, W), with return_flow=True): per
    example the successful flow with the smallest L_flow seen during the optimization, else the
    final flow. The model's `AttackRuntime` (`advkit.attacks.model.attack_model`) says how it runs
    (its BatchNorm is not folded: `fold_bn` does not apply).
    """
    model, runtime = split_attack_model(model)
    precision = runtime.precision
    check_images(x, y, model)
    check_number("tau", tau)
    check_int("steps", steps)
    check_choice("optimizer", optimizer, OPTIMIZERS)
    check_number("kappa", kappa)
    if max_flow is not None:
        check_number("max_flow", max_flow, 0.0, float(max(x.shape[2:])), low_open=True)
    lr = (1.0 if optimizer == "lbfgs" else 0.01) if lr is None else lr
    check_number("lr", lr, low_open=True)
    if len(x) == 0:  # nothing to attack (as pgd returns); L-BFGS cannot reduce over an empty batch
        return (x.clone(), x.new_zeros((0, 2, *x.shape[2:]))) if return_flow else x.clone()
    with eval_mode(model), torch.enable_grad():
        forward = forward_fn(model, runtime.compile)
        x = prepare(x, runtime.channels_last)
        check_model_output(forward, x, y, precision)  # NaN weights: a clear error, not a crash
        w = torch.zeros((len(x), 2, *x.shape[2:]), device=x.device, dtype=x.dtype, requires_grad=True)
        sign = -1.0 if targeted else 1.0
        best_flow = torch.zeros_like(w)
        best_smooth = torch.full((len(x),), float("inf"), device=x.device, dtype=x.dtype)

        def to_flow(w):
            return w if max_flow is None else max_flow * torch.tanh(w)

        def objective() -> torch.Tensor:
            nonlocal best_flow, best_smooth
            flow = to_flow(w)
            x_adv = apply_flow(x, flow)
            with autocast(x.device, precision):
                logits = forward(x_adv)
            logits = logits.float()
            adv = (sign * margin(logits, y)).clamp_min(-kappa)
            smooth = flow_loss(flow)
            with torch.no_grad():  # track the smoothest successful flow (no host sync)
                better = is_fooled(logits, y, targeted) & (smooth < best_smooth)
                best_flow = torch.where(better.view(-1, 1, 1, 1), flow, best_flow)
                best_smooth = torch.where(better, smooth, best_smooth)
            return (adv + tau * smooth).sum()

        if optimizer == "lbfgs":
            opt = torch.optim.LBFGS([w], lr=lr, max_iter=steps, line_search_fn="strong_wolfe")

            def closure() -> torch.Tensor:
                value = objective()
                (w.grad,) = torch.autograd.grad(value, w)
                return value.detach()

            opt.step(closure)
        else:
            opt = torch.optim.Adam([w], lr=lr)
            for _ in range(steps):
                value = objective()
                (w.grad,) = torch.autograd.grad(value, w)
                opt.step()
        with torch.no_grad():
            objective()  # the final flow is a candidate too
            final = to_flow(w)
            flow = torch.where(torch.isfinite(best_smooth).view(-1, 1, 1, 1), best_flow, final).detach()
            if not bool(torch.isfinite(flow).all()):  # one sync, after the optimization
                raise ValueError("stAdv's flow became non-finite: the model's gradients are NaN or inf on x")
            x_adv = apply_flow(x, flow).clamp(0.0, 1.0)
        return (x_adv, flow) if return_flow else x_adv
