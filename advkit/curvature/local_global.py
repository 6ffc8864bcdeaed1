"""Walter, Adilova, Kamp & Vreeken (2025): relative flatness bounds robustness locally, not globally.

- `flatness_bound`: the loss change that relative flatness kappa of the feature layer allows under a
  relative feature perturbation delta (Petzka et al. 2021's feature robustness, per example, as
  Walter et al. carry it to input space); `bound_vs_eps` compares it with PGD's measured loss change as eps grows.
- `kappa_along_path`: kappa at every PGD iterate (`advkit.attacks.ascent.pgd_ascent(on_step=...)`).
- `scale_logits`, `rescaling_study`: their last-layer rescaling (same predictions, other kappa) and
  its effect on robust accuracy under CE- and margin-PGD.
- `transfer_across_eps`: do adversarial points found at a small eps carry over to a larger one?
"""

from __future__ import annotations

import copy
from collections.abc import Collection, Sequence

import numpy as np
import pandas as pd
import scipy.stats
import torch
import torch.nn.functional as F
from torch import nn

from advkit._checks import check_number
from advkit._torch import eval_mode, model_device
from advkit.attacks.ascent import attack_loss, is_fooled, pgd_ascent, random_point
from advkit.attacks.model import forward_fn
from advkit.attacks.pgd import pgd
from advkit.curvature.flatness import feature_layer, features, relative_flatness_closed_form


def flatness_bound(weight: torch.Tensor, phi: torch.Tensor, logits: torch.Tensor, y: torch.Tensor,
                   delta: torch.Tensor | float) -> torch.Tensor:
    """Per-example bound on the loss change for a relative feature perturbation ||phi' - phi|| <= delta ||phi||.

    ell(phi') - ell(phi) <= delta ||phi|| ||W^T (p - e_y)|| + delta^2 / 2 * kappa + O(delta^3), the
    second-order expansion of softmax CE in the features (logits z = W phi + b) behind Petzka et al.
    2021's feature-robustness theorem, per example, as Walter et al. 2025 carry relative flatness to
    input space (the seed copy of their paper is a summary without the theorem's statement, so this is
    the form implemented, not a transcription): the quadratic term is at most
    delta^2/2 ||phi||^2 lambda_max(W^T (diag p - p p^T) W) <= delta^2/2 kappa (the trace,
    `relative_flatness_closed_form`).
    Assumptions: a last linear layer; delta small (the O(delta^3) remainder is dropped, so the bound is
    local); the first-order term, which vanishes at a critical point of the training loss (their
    setting), is kept because one example's gradient is not zero. Input space enters through delta:
    with phi L-Lipschitz, an input perturbation of norm eps gives delta <= L eps / ||phi||.
    """
    phi, z, W = phi.double(), logits.double(), weight.double()
    p = torch.softmax(z, 1)
    residual = p - F.one_hot(y.to(z.device), z.shape[1]).double()
    first = (residual @ W).norm(dim=1) * phi.norm(dim=1)
    delta = torch.as_tensor(delta, dtype=torch.float64, device=z.device)
    return delta * first + 0.5 * delta ** 2 * relative_flatness_closed_form(W, phi, z)


def _at(model: nn.Module, x: torch.Tensor, y: torch.Tensor, layer: nn.Linear) -> dict[str, torch.Tensor]:
    phi, z = features(model, x, layer=layer)
    y = y.to(z.device)
    return {"phi": phi, "z": z, "loss": F.cross_entropy(z, y, reduction="none"), "correct": z.argmax(1) == y,
            "kappa": relative_flatness_closed_form(layer.weight.detach(), phi, z)}


def loss_change_bound(model: nn.Module, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor) -> pd.DataFrame:
    """Per example: measured CE change from x to x_adv, the `flatness_bound` at the measured relative
    feature change delta = ||phi(x_adv) - phi(x)|| / ||phi(x)||, whether it holds, kappa at both points."""
    layer = feature_layer(model)[1]
    a, b = _at(model, x, y, layer), _at(model, x_adv, y, layer)
    delta = (b["phi"] - a["phi"]).norm(dim=1) / a["phi"].norm(dim=1).clamp_min(1e-12)
    bound = flatness_bound(layer.weight.detach(), a["phi"], a["z"], y, delta)
    change = (b["loss"] - a["loss"]).double()
    return pd.DataFrame({"delta": delta.cpu().numpy(), "loss_change": change.cpu().numpy(),
                         "bound": bound.cpu().numpy(), "holds": (change <= bound + 1e-9).cpu().numpy(),
                         "kappa_clean": a["kappa"].cpu().numpy(), "kappa_adv": b["kappa"].cpu().numpy(),
                         "correct_clean": a["correct"].cpu().numpy(), "correct_adv": b["correct"].cpu().numpy()})


def bound_vs_eps(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: Sequence[float], *,
                 steps: int = 10, seed: int = 0) -> pd.DataFrame:
    """One row per PGD budget: mean measured loss change, mean bound, share of examples where the bound
    holds, median delta, robust accuracy, median kappa at the clean and the adversarial points, and the
    Spearman correlation over the examples of clean-point kappa with the loss change (local: positive)."""
    rows = []
    for e in eps:
        check_number("eps", e, low=0.0, low_open=True)
        df = loss_change_bound(model, x, pgd(model, x, y, eps=e, steps=steps, seed=seed), y)
        rho, p = scipy.stats.spearmanr(df["kappa_clean"], df["loss_change"])
        rows.append({"eps": e, "loss_change": df["loss_change"].mean(), "bound": df["bound"].mean(),
                     "bound_holds": df["holds"].mean(), "median_delta": df["delta"].median(),
                     "robust_accuracy": df["correct_adv"].mean(), "kappa_clean": df["kappa_clean"].median(),
                     "kappa_adv": df["kappa_adv"].median(), "spearman_kappa_change": rho, "spearman_p": p,
                     "n": len(df)})
    return pd.DataFrame(rows)


def kappa_along_path(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, steps: int = 10,
                     alpha: float | None = None, seed: int = 0) -> pd.DataFrame:
    """Per PGD iterate (CE, L-inf, uniform start): median and mean kappa, mean CE loss, accuracy."""
    layer = feature_layer(model)[1]
    device = model_device(model)
    x, y = x.to(device), y.to(device)
    rows: list[dict] = []

    def on_step(x_adv: torch.Tensor, loss: torch.Tensor, logits: torch.Tensor) -> None:
        phi, z = features(model, x_adv, layer=layer)
        k = relative_flatness_closed_form(layer.weight.detach(), phi, z.float())
        rows.append({"step": len(rows), "kappa_median": float(k.median()), "kappa_mean": float(k.mean()),
                     "loss": float(loss.float().mean()), "accuracy": float((logits.argmax(1) == y).float().mean())})

    gen = torch.Generator(device=device).manual_seed(seed)
    with eval_mode(model):
        pgd_ascent(forward_fn(model), x, random_point(x, eps, "linf", gen), attack_loss("ce", y), eps=eps,
                   alpha=alpha if alpha is not None else 2.5 * eps / steps, steps=steps, precision="fp32",
                   on_step=on_step)
    return pd.DataFrame(rows)


class _Scaled(nn.Module):
    """The model with its logits multiplied by c (a temperature 1/c): the same argmax for c > 0."""

    def __init__(self, model: nn.Module, c: float):
        super().__init__()
        self.model = copy.deepcopy(model)
        lin = feature_layer(self.model)[1]
        with torch.no_grad():
            lin.weight.mul_(c)
            if lin.bias is not None:
                lin.bias.mul_(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def scale_logits(model: nn.Module, c: float) -> nn.Module:
    """A copy whose last linear layer (weight and bias) is scaled by c > 0 (Walter et al.'s rescaling):
    predictions unchanged, kappa = c^2 ||phi||^2 Var_{p(c z)}(w) changes (confidence does)."""
    check_number("c", c, low=0.0, low_open=True)
    return _Scaled(model, c)


def rescaling_study(model: nn.Module, x: torch.Tensor, y: torch.Tensor, scales: Sequence[float], *,
                    eps: float, steps: int = 10, seed: int = 0) -> pd.DataFrame:
    """Per scale c: median kappa, clean accuracy (the same for every c), robust accuracy under CE-PGD and
    under margin-PGD (whose sign steps are the same for every c: if only CE-PGD gains, it is gradient masking)."""
    rows = []
    for c in scales:
        m = scale_logits(model, c)
        layer = feature_layer(m)[1]
        clean = _at(m, x, y, layer)
        acc = {f"robust_accuracy_{loss}": float(_at(m, pgd(m, x, y, eps=eps, steps=steps, loss=loss, seed=seed), y,
                                                    layer)["correct"].float().mean()) for loss in ("ce", "margin")}
        rows.append({"scale": c, "kappa_median": float(clean["kappa"].median()),
                     "accuracy": float(clean["correct"].float().mean()), **acc})
    return pd.DataFrame(rows)


def transfer_across_eps(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps_small: float, eps_large: float, *,
                        steps: int = 10, seed: int = 0) -> dict[str, float]:
    """Small-eps PGD points at the larger budget: share of examples fooled at eps_small, share of those
    also fooled by an independent eps_large attack, and eps_large robust accuracy from a random start
    vs from the eps_small points (warm start)."""
    if not 0 < eps_small < eps_large:
        raise ValueError(f"need 0 < eps_small < eps_large, got {eps_small}, {eps_large}")
    device = model_device(model)
    x, y = x.to(device), y.to(device)
    small = pgd(model, x, y, eps=eps_small, steps=steps, seed=seed)
    large = pgd(model, x, y, eps=eps_large, steps=steps, seed=seed)
    objective = attack_loss("ce", y)
    with eval_mode(model):
        forward = forward_fn(model)
        warm = pgd_ascent(forward, x, small, objective, eps=eps_large, alpha=2.5 * eps_large / steps,
                          steps=steps, precision="fp32")
        with torch.no_grad():
            fooled = {k: is_fooled(forward(v), y) for k, v in (("small", small), ("large", large), ("warm", warm))}
    fooled["warm"] |= fooled["small"]          # the warm start keeps its small-eps success (keep-best)
    n_small = int(fooled["small"].sum())
    return {"eps_small": eps_small, "eps_large": eps_large, "fooled_small": float(fooled["small"].float().mean()),
            "also_fooled_large": float(fooled["large"][fooled["small"]].float().mean()) if n_small else np.nan,
            "robust_accuracy_large": float(1 - fooled["large"].float().mean()),
            "robust_accuracy_large_warm": float(1 - fooled["warm"].float().mean())}


def walter_models(reference: str, available: Collection[str],
                  robust: Sequence[str] = ("pgd_at", "trades")) -> list[str]:
    """The models of the local-vs-global study: `reference` and, beside it, the first adversarially trained
    model of `robust` that `available` holds (none when the run has none)."""
    return [reference] + [m for m in robust if m in available and m != reference][:1]


def summary_lines(curves: dict[str, pd.DataFrame], rescaled: dict[str, pd.DataFrame],
                  transfer: dict[str, dict[str, float]]) -> list[str]:
    """Walter et al.'s claims, one line each, with what this run supports and the test used
    (`bound_vs_eps`, `rescaling_study`, `transfer_across_eps` results per model)."""
    def per_model(fmt, items):
        return "; ".join(fmt(m, v) for m, v in items.items())

    def local(m, df):
        lo, hi = df.iloc[0], df.iloc[-1]
        return (f"{m}: holds for {lo['bound_holds']:.0%} at eps {lo['eps']:.3g} and {hi['bound_holds']:.0%} at "
                f"{hi['eps']:.3g}; Spearman(kappa, loss change) {lo['spearman_kappa_change']:.2f} "
                f"(p = {lo['spearman_p']:.2g}) -> {hi['spearman_kappa_change']:.2f} (p = {hi['spearman_p']:.2g})")

    holds = all(df["bound_holds"].iloc[0] >= 0.9 for df in curves.values())
    fades = all(df["bound_holds"].iloc[-1] < df["bound_holds"].iloc[0] for df in curves.values())
    lines = [f"- Walter et al. 2025 (relative flatness bounds the loss change locally, not globally): "
             f"{'SUPPORTED' if holds and fades else 'NOT SUPPORTED' if not holds else 'PARTLY (holds, does not fade)'}"
             f" - second-order kappa bound checked per image at PGD's measured feature change (holds: >= 90 % "
             f"at the smallest eps, fewer at the largest), n = {next(iter(curves.values()))['n'].iloc[0]} images; "
             + per_model(local, curves) + "."]

    def scaled(m, df):
        one, top = df.loc[df["scale"] == 1].iloc[0], df.iloc[-1]
        return (f"{m}: kappa {one['kappa_median']:.3g} -> {top['kappa_median']:.3g}, CE-PGD robust accuracy "
                f"{one['robust_accuracy_ce']:.0%} -> {top['robust_accuracy_ce']:.0%}, margin-PGD "
                f"{one['robust_accuracy_margin']:.0%} -> {top['robust_accuracy_margin']:.0%}")

    gain = [df.iloc[-1]["robust_accuracy_ce"] > df.loc[df["scale"] == 1].iloc[0]["robust_accuracy_ce"]
            for df in rescaled.values()]
    masked = all(df["robust_accuracy_margin"].nunique() == 1 for df in rescaled.values())
    lines.append(f"- Walter et al. 2025 (scaling the last layer up raises robust accuracy): "
                 f"{'SUPPORTED' if all(gain) else 'NOT SUPPORTED' if not any(gain) else 'MIXED'} under CE-PGD, "
                 f"scale 1 vs {next(iter(rescaled.values()))['scale'].iloc[-1]:g} (descriptive, same images and "
                 f"seed; predictions identical); " + per_model(scaled, rescaled)
                 + (" - margin-PGD is unchanged, so the gain is gradient masking, not robustness." if masked else "."))
    lines.append("- Walter et al. 2025 (small-eps adversarial examples transfer to larger eps): "
                 + per_model(lambda m, t: f"{m}: {t['also_fooled_large']:.0%} of the {t['fooled_small']:.0%} fooled "
                             f"at eps {t['eps_small']:.3g} are fooled by an independent attack at eps "
                             f"{t['eps_large']:.3g}; its robust "
                             f"accuracy {t['robust_accuracy_large']:.0%} (random start) vs "
                             f"{t['robust_accuracy_large_warm']:.0%} (started from the small-eps points)", transfer)
                 + " (descriptive).")
    return lines
