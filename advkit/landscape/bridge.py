"""The referee's bridge between the landscape pictures and the Hessian (the review of Xu et al. 2019).

A 2D surface is f(α, β) = L(θ* + α d1 + β d2) (Xu et al. Eq. 5), so at its centre exactly

    ∂²f/∂α² = d1ᵀ H d1,   ∂²f/∂β² = d2ᵀ H d2,   ∂²f/∂α∂β = d1ᵀ H d2,

with H the Hessian of the mean loss in the weights the directions move. `directional_curvature`
computes these three numbers by Hessian-vector products on the surface's own images, parameter set
(the directions' non-ignored parameters: biases and BatchNorm excluded when the directions exclude
them) and BatchNorm mode (eval, stored statistics); `curvature_table` sets them beside the quadratic
fit of the surface (`landscape.sharpness.quadratic_fit`: f ≈ c + gᵀa + ½ aᵀ A a within its radius,
so A's entries estimate the numbers above, blurred by the higher-order terms within the radius).
`hessian_eigen_map` gives the extreme Hessian eigenvalues and |λmin/λmax| (loss-landscape's
plot_hessian_eigen, Li et al. 2018) at every point of a coarse grid of the same plane.

Robust loss (Danskin): the Hessian at the attacked inputs x_adv(θ) held fixed
(`curvature.operator.adversarial_inputs`, the attack re-run at each grid point). It equals the second
derivative of the robust loss max_δ L(θ, x + δ) where the maximizer is locally constant in θ (at
the corners of the L∞ ball that PGD ends on); at an interior maximizer the true second derivative
is larger by the PSD term H_θx (−H_xx)⁻¹ H_xθ, so the fixed-input value is a lower bound there.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
import xarray as xr
from torch import nn

from advkit._checks import check_int
from advkit._torch import Attack, PerExampleLoss, make_generator, state_hash, tensors_hash
from advkit.curvature.estimators import lanczos, ritz
from advkit.curvature.operator import HessianOperator, adversarial_inputs
from advkit.landscape.directions import Directions, random_directions
from advkit.landscape.sharpness import quadratic_fit


def direction_parameters(model: nn.Module, directions: Directions) -> list[str]:
    """The parameters a surface moves: the directions' keys that are parameters, minus the ones
    they leave out (`directions.ignored`: biases and BatchNorm under bn="ignore"), in model order.
    A non-zero entry for a buffer (BatchNorm statistics of a model difference) is an error: the
    Hessian is taken in the parameters only."""
    keys = set().union(*(d.keys() for d in directions.vectors))
    params = [n for n, _ in model.named_parameters()]
    for k in keys - set(params):
        if any(bool(d[k].any()) for d in directions.vectors if k in d):
            raise ValueError(f"the directions move the buffer {k!r}; the Hessian covers parameters only")
    names = [n for n in params if n in keys and n not in set(directions.ignored)]
    if not names:
        raise ValueError("the directions move no parameter of the model")
    return names


def plane_operator(model: nn.Module, directions: Directions, x: torch.Tensor, y: torch.Tensor,
                   coeffs: Sequence[float] = (0.0, 0.0), *, attack: Attack | None = None,
                   loss_fn: PerExampleLoss | None = None, batch_size: int = 500,
                   backend: str = "forward") -> tuple[HessianOperator, list[torch.Tensor]]:
    """The Hessian at θ* + Σ cᵢ dᵢ over the directions' parameters (`direction_parameters`), and the
    directions as flat vectors of that space. With `attack`, the inputs are attacked at those weights
    and held fixed (Danskin). Eval mode, fp32, the model's own weights untouched."""
    directions.check(model)
    names = direction_parameters(model, directions)
    op = HessianOperator(model, x, y, loss_fn=loss_fn, include_bn=True, batch_size=batch_size, backend=backend)
    params = dict(model.named_parameters())
    flat = lambda d: torch.cat([d[n].detach().reshape(-1) for n in names]).to(op.device, torch.float32)  # noqa: E731
    vectors = [flat(d) for d in directions.vectors]
    centre = torch.cat([params[n].detach().reshape(-1) for n in names]).to(torch.float32)
    for c, v in zip(coeffs, vectors):
        centre = centre + float(c) * v
    op.names, op.shapes = names, [params[n].shape for n in names]
    op.numels = [params[n].numel() for n in names]
    op.p0, op.dim = centre, centre.numel()
    if attack is not None:
        op.x = adversarial_inputs(model, op.x, op.y, attack, batch_size, params=op.unflatten(op.p0))
    return op, vectors


@dataclass(frozen=True)
class DirectionalCurvature:
    """dᵢᵀ H dⱼ at the centre of a plane: `matrix` (k x k), the loss there, cost and space size."""

    matrix: np.ndarray
    loss: float
    n_hvp: int
    n_params: int

    def as_row(self, prefix: str = "hvp") -> dict[str, float]:
        m = self.matrix
        row = {f"{prefix}_aa": float(m[0, 0])}
        if len(m) == 2:
            eig = np.linalg.eigvalsh(m)
            row.update({f"{prefix}_bb": float(m[1, 1]), f"{prefix}_ab": float(m[0, 1]),
                        f"{prefix}_max": float(eig.max()), f"{prefix}_min": float(eig.min())})
        return row


def directional_curvature(model: nn.Module, directions: Directions, x: torch.Tensor, y: torch.Tensor, *,
                          attack: Attack | None = None, loss_fn: PerExampleLoss | None = None,
                          batch_size: int = 500, backend: str = "reverse") -> DirectionalCurvature:
    """d1ᵀHd1, d2ᵀHd2, d1ᵀHd2 at θ* by Hessian-vector products (one per direction): exactly
    ∂²f/∂α², ∂²f/∂β², ∂²f/∂α∂β at 0 of the surface f(α, β) = L(θ* + α d1 + β d2) drawn with these
    directions on (x, y), BatchNorm in eval mode; `loss_fn` per example (default cross-entropy). With
    `attack`: the robust loss's Hessian at the attacked inputs held fixed (Danskin; see the module
    docstring for when that is exact). `backend`: `curvature.operator.HessianOperator`'s (reverse: one cached
    gradient graph of the whole subset, several times faster; forward: memory of one chunk)."""
    op, vectors = plane_operator(model, directions, x, y, attack=attack, loss_fn=loss_fn, batch_size=batch_size,
                                 backend=backend)
    hv = [op.matvec(v) for v in vectors]
    m = np.array([[float(torch.dot(a, h)) for h in hv] for a in vectors])
    return DirectionalCurvature((m + m.T) / 2, op.loss(), op.n_hvp, op.dim)


def surface_directions(model: nn.Module, ds: xr.Dataset, x: torch.Tensor, y: torch.Tensor) -> Directions:
    """The random directions a surface was drawn with (its seed, normalization, BatchNorm policy),
    checked against the surface: the same directions, weights and images (hashes in its attributes),
    BatchNorm with stored statistics. Anything else is a ValueError naming what differs."""
    a = ds.attrs
    if a.get("direction_kind") != "random":
        raise ValueError(f"surface directions of kind {a.get('direction_kind')!r}: only random ones are redrawn")
    dims = 2 if "beta" in ds.dims else 1
    d = random_directions(model, dims, seed=int(a["direction_seed"]), norm=a["direction_norm"],
                          bn=a["direction_bn"], orthogonalize=bool(int(a.get("direction_orthogonalized", 0))))
    checks = [("directions", d.sha256, a.get("directions_sha256")),
              ("weights", state_hash(model), a.get("model_sha256")),
              ("images", tensors_hash([("x", x), ("y", y)]), a.get("data_sha256")),
              ("bn_mode", "eval", a.get("bn_mode", "eval"))]
    for what, mine, theirs in checks:
        if mine != theirs:
            raise ValueError(f"the surface of {a.get('model', '?')} was drawn with other {what} "
                             f"({theirs!r} there, {mine!r} here)")
    return d


def curvature_table(models: Mapping[str, nn.Module], x: torch.Tensor, y: torch.Tensor,
                    surfaces: Mapping[str, Mapping[str, xr.Dataset]], *, attack: Attack | None = None,
                    radius: float = 0.2, batch_size: int = 500, backend: str = "reverse") -> pd.DataFrame:
    """One row per (model, loss): dᵀHd by HVPs beside the quadratic-fit curvature of the same surface
    within `radius` (`fit_*`: the fitted second derivatives, units of the directions' scale).

    `surfaces` is `model_surfaces`' output: the clean loss from "grid" (2D: aa, bb, ab and the 2x2
    matrix's eigenvalues max/min), the robust loss from "robust_grid" when there is one, else from
    "line" (1D: aa only), on the images (first n of x) and directions of that surface."""
    rows = []
    for name, model in models.items():
        robust = [surfaces.get(kind, {}).get(name) for kind in ("robust_grid", "line")] if attack is not None else []
        robust = [ds for ds in robust if ds is not None and "robust_loss" in ds][:1]
        for loss, kind, quantity, ds in [("clean", "grid", "loss", surfaces["grid"][name])] + [
                ("robust", "robust_grid" if "beta" in ds.dims else "line", "robust_loss", ds) for ds in robust]:
            n = int(ds.attrs.get("data_n", len(y)))
            d = surface_directions(model, ds, x[:n], y[:n])
            exact = directional_curvature(model, d, x[:n], y[:n], attack=attack if loss == "robust" else None,
                                          batch_size=batch_size, backend=backend)
            fit = quadratic_fit(ds, quantity, radius)
            row = {"model": name, "loss": loss, "surface": kind, "n_images": n, **exact.as_row("hvp")}
            row.update({f"fit_{k}": fit[f"curvature_{k}"] for k in ("aa", "bb", "ab", "max", "min")
                        if f"curvature_{k}" in fit and f"hvp_{k}" in row})
            row.update({"fit_radius": radius, "fit_points": fit["n_points"], "centre_loss": exact.loss,
                        "n_params": exact.n_params})
            rows.append(row)
    return pd.DataFrame(rows).set_index(["model", "loss"])


def extreme_eigenvalues(op: HessianOperator, steps: int, seed: int = 0, tol: float = 1e-2) -> dict[str, float]:
    """λmax and λmin of the operator from one Lanczos run (`steps` HVPs, full reorthogonalization):
    the extreme Ritz values, converged when each residual ≤ tol |λ| (Ritz values lie inside the
    spectrum: λmax from below, λmin from above)."""
    gen = make_generator(op.device, seed)
    a, b, last = lanczos(op.matvec, torch.randn(op.dim, generator=gen, device=op.device), min(steps, op.dim))
    theta, S = ritz(a, b)
    res = np.abs(last * S[-1, [0, -1]])
    ok = bool(np.all(res <= tol * np.maximum(np.abs(theta[[0, -1]]), 1e-12)))
    return {"lambda_min": float(theta[0]), "lambda_max": float(theta[-1]), "converged": ok}


def hessian_eigen_map(model: nn.Module, directions: Directions, x: torch.Tensor, y: torch.Tensor,
                      coords: Sequence[float], *, attack: Attack | None = None, steps: int = 10,
                      loss_fn: PerExampleLoss | None = None, seed: int = 0, batch_size: int = 500,
                      backend: str = "reverse") -> xr.Dataset:
    """λmax, λmin and |λmin/λmax| of the Hessian at θ* + α d1 + β d2 for α, β in `coords` (Li et al.
    2018's plot_hessian_eigen: near 0 where the loss is locally convex, "least convex" as a number).

    Same parameter space, images and BatchNorm mode as the surface (`plane_operator`); with `attack`
    the robust loss's Hessian, the attack re-run at every point (Danskin). `steps` Lanczos steps per
    point (`extreme_eigenvalues`); `converged` says where both extremes settled. `backend`: the
    HVP backend of `curvature.operator.HessianOperator` (reverse: one cached gradient graph per point)."""
    check_int("steps", steps, minimum=2)
    coords = np.asarray(coords, dtype=float)
    if directions.ndim != 2 or coords.ndim != 1 or len(coords) == 0:
        raise ValueError("hessian_eigen_map needs two directions and a non-empty 1D array of coordinates")
    shape = (len(coords), len(coords))
    out = {k: np.zeros(shape) for k in ("lambda_max", "lambda_min", "converged", "loss")}
    for i, a in enumerate(coords):
        for j, b in enumerate(coords):
            op, _ = plane_operator(model, directions, x, y, (a, b), attack=attack, loss_fn=loss_fn,
                                   batch_size=batch_size, backend=backend)
            for k, v in {**extreme_eigenvalues(op, steps, seed), "loss": op.loss()}.items():
                out[k][i, j] = v
    ratio = np.abs(out["lambda_min"]) / np.maximum(np.abs(out["lambda_max"]), 1e-12)
    data = {k: (("alpha", "beta"), v) for k, v in out.items()}
    data["ratio"] = (("alpha", "beta"), ratio, {"long_name": "|λmin / λmax|"})
    return xr.Dataset(data, coords={"alpha": coords, "beta": coords},
                      attrs={"loss": "robust (Danskin)" if attack is not None else "clean", "steps": steps,
                             "seed": seed, "n_images": len(y), **directions.settings()})


def eigen_maps(models: Mapping[str, nn.Module], surfaces: Mapping[str, xr.Dataset], x: torch.Tensor,
               y: torch.Tensor, coords: Sequence[float], *, names: Sequence[str], n_images: int | None = None,
               attack: Attack | None = None, steps: int = 10, seed: int = 0) -> dict[str, dict[str, xr.Dataset]]:
    """{model: {"clean"[, "robust"]: `hessian_eigen_map`}} for those of `names` that `models` holds, each in the
    plane of its 2D surface in `surfaces` (drawn on x, y: `surface_directions`), on the first `n_images`
    images; the robust loss's map only with `attack`."""
    losses = {"clean": None, **({"robust": attack} if attack is not None else {})}
    maps = {}
    for name in [m for m in names if m in models]:
        d = surface_directions(models[name], surfaces[name], x, y)
        maps[name] = {loss: hessian_eigen_map(models[name], d, x[:n_images], y[:n_images], coords, attack=a,
                                              steps=steps, seed=seed)
                      for loss, a in losses.items()}
    return maps


def eigen_map_summary(maps: Mapping[str, Mapping[str, xr.Dataset]]) -> pd.DataFrame:
    """One row per (model, loss) of `eigen_maps`: λmax, λmin and |λmin/λmax| at the centre, the largest
    |λmin/λmax| of the map and whether every point converged."""
    rows = [{"model": name, "loss": loss,
             **{f"{k}_centre": float(m[k].sel(alpha=0, beta=0, method="nearest"))
                for k in ("lambda_max", "lambda_min", "ratio")},
             "ratio_max": float(m["ratio"].max()), "converged": bool(m["converged"].all())}
            for name, per in maps.items() for loss, m in per.items()]
    return pd.DataFrame(rows).set_index(["model", "loss"])
