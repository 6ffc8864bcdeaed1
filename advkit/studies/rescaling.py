"""Function-preserving rescalings and Stutz et al.'s scale-invariance audit (Stutz et al. 2021, Fig. 4).

Two reparameterizations leave a network's function unchanged while moving its weights:

- ReLU positive homogeneity (Dinh et al. 2017): relu(c z) = c relu(z) for c > 0, so scaling a layer's
  weight and bias by c and the *next* layer's weight by 1/c preserves the outputs, for consecutive
  linear / conv (or eval-mode BatchNorm) layers with only a ReLU (or nothing) between them;
- BatchNorm in eval mode: BN(c z) = BN(z) when its running statistics follow the scale,
  running_mean x c and running_var x c^2 (and eps x c^2, which makes it exact; with eps kept it holds
  up to eps / var). So a conv before a BatchNorm can be scaled by c alone.

`scale_invariance_table` measures the kit's sharpness and flatness measures on the model and its
rescaled copies: the relative ones (Stutz et al.'s average / worst case, filter-normalized surfaces,
Walter et al.'s relative flatness) should not move, the raw ones (Hessian eigenvalue, un-normalized
surfaces, Keskar et al.'s epsilon-sharpness) do.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

from advkit._checks import check_number
from advkit._torch import eval_mode, model_device, to_float
from advkit.curvature.estimators import hessian_eigenvalues
from advkit.curvature.flatness import avg_case_flatness, epsilon_sharpness, relative_flatness, worst_case_flatness
from advkit.folding import conv_bn_pairs
from advkit.landscape.directions import random_directions
from advkit.landscape.sharpness import quadratic_fit
from advkit.landscape.surfaces import line

Pair = tuple[str, str]
WEIGHT_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def default_pairs(model: nn.Module) -> list[Pair]:
    """Every (conv, BatchNorm) pair of the model (`advkit.folding.conv_bn_pairs`); without BatchNorm, the
    first two weight layers (Linear / Conv), which must be separated by a ReLU only."""
    pairs = conv_bn_pairs(model)
    if pairs:
        return pairs
    layers = [n for n, m in model.named_modules() if isinstance(m, WEIGHT_LAYERS)]
    if len(layers) < 2:
        raise ValueError("no (conv, BatchNorm) pair and fewer than two weight layers: nothing to rescale")
    return [(layers[0], layers[1])]


def _scale(module: nn.Module, names: Sequence[str], factor: float) -> None:
    for name in names:
        t = getattr(module, name, None)
        if t is not None:
            t.data.mul_(factor)


def rescale(model: nn.Module, factor: float, pairs: Sequence[Pair] | None = None, *,
            check: torch.Tensor | None = None, atol: float = 1e-4) -> nn.Module:
    """A copy of `model` with the same function and rescaled weights (`model` is not changed).

    For each (first, second) of `pairs` (default `default_pairs`): first's weight and bias x c;
    then, when second is a BatchNorm, its running_mean x c, running_var x c^2 and eps x c^2 (eval
    mode: BN(c z) = BN(z) exactly; train mode normalizes with batch statistics, invariant anyway);
    otherwise second's weight x 1/c (ReLU positive homogeneity: only a ReLU may lie between them).
    With `check` (inputs in [0, 1]), the eval-mode outputs of both models must agree within `atol`
    (relative to the logits' scale), else ValueError naming the largest difference.
    """
    check_number("factor", factor, low_open=True)
    pairs = default_pairs(model) if pairs is None else list(pairs)
    out = copy.deepcopy(model)
    modules = dict(out.named_modules())
    for first, second in pairs:
        for name in (first, second):
            if name not in modules:
                raise ValueError(f"no module {name!r} in the model; it has {sorted(n for n in modules if n)[:20]}")
        a, b = modules[first], modules[second]
        _scale(a, ("weight", "bias"), factor)
        if isinstance(b, BATCHNORMS):
            if not b.track_running_stats or b.running_mean is None:
                raise ValueError(f"{second!r} has no running statistics to rescale")
            b.running_mean.mul_(factor)
            b.running_var.mul_(factor ** 2)
            b.eps = b.eps * factor ** 2
        else:
            _scale(b, ("weight",), 1.0 / factor)
    if check is not None:
        with torch.no_grad(), eval_mode(model), eval_mode(out):
            x = to_float(check.to(model_device(model)))
            ref, new = model(x), out(x)
        diff = float((ref - new).abs().max())
        if diff > atol * max(1.0, float(ref.abs().max())):
            raise ValueError(f"rescaling by {factor} changed the outputs by up to {diff:.3g}: is something other "
                             f"than a ReLU between the layers of {pairs}?")
    return out


# --- the audit (Stutz et al. 2021, Fig. 4) ------------------------------------------------------------

# (measure, expected under rescaling): relative measures first, then the raw ones
EXPECTED = {
    "avg_case_flatness": "invariant", "worst_case_flatness": "invariant",
    "filter_normalized_curvature": "invariant", "relative_flatness": "invariant",
    "hessian_top_eig": "changes", "unnormalized_curvature": "changes", "epsilon_sharpness": "changes",
}


def _line_curvature(model: nn.Module, x: torch.Tensor, y: torch.Tensor, norm: str, seed: int,
                    span: float, resolution: int) -> float:
    """Curvature of a quadratic fit to the 1D surface along one seeded `norm`-normalized direction."""
    d = random_directions(model, 1, seed=seed, norm=norm)
    ds = line(model, d, x, y, span=span, resolution=resolution, precision="fp32", quantities=("loss",))
    return quadratic_fit(ds, "loss", radius=span)["curvature_max"]


def invariance_measures(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, seed: int = 0,
                        n_samples: int = 3, xi: float = 0.5, worst_xi: float = 0.003, steps: int = 3,
                        span: float = 0.5, resolution: int = 11, hessian_iters: int = 8,
                        epsilon: float = 1e-3) -> dict[str, float]:
    """The `EXPECTED` measures of the clean loss on (x, y), each with its seed: Stutz et al.'s average /
    worst case (xi, worst_xi; n_samples draws, steps ascent steps), the curvature of filter-normalized
    and un-normalized 1D lines (span, resolution), Walter et al.'s relative flatness, the Hessian's top
    eigenvalue (Lanczos, hessian_iters) and Keskar's epsilon-sharpness (epsilon, steps)."""
    fns: dict[str, Callable[[], float]] = {
        "avg_case_flatness": lambda: avg_case_flatness(model, x, y, xi=xi, n_samples=n_samples, seed=seed).value,
        "worst_case_flatness": lambda: worst_case_flatness(model, x, y, xi=worst_xi, steps=steps, seed=seed).value,
        "filter_normalized_curvature": lambda: _line_curvature(model, x, y, "filter", seed, span, resolution),
        "relative_flatness": lambda: relative_flatness(model, x).value,
        "hessian_top_eig": lambda: hessian_eigenvalues(model, x, y, iters=hessian_iters, seed=seed).value,
        "unnormalized_curvature": lambda: _line_curvature(model, x, y, "none", seed, span, resolution),
        "epsilon_sharpness": lambda: epsilon_sharpness(model, x, y, epsilon=epsilon, steps=steps, seed=seed).value,
    }
    return {name: float(fn()) for name, fn in fns.items()}


def scale_invariance_table(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                           factors: Sequence[float] = (0.5, 2.0), *, pairs: Sequence[Pair] | None = None,
                           tol: float = 0.01, **measure_kwargs) -> pd.DataFrame:
    """Stutz et al.'s Fig. 4 as a table: one row per measure (`EXPECTED`), its value on `model`
    (`unscaled`), its relative change value(rescale(model, c)) / value(model) - 1 for each factor c
    (columns `x0.5`, `x2`, ...), the `expected` behaviour and `invariant`: every change within `tol`.
    `measure_kwargs` go to `invariance_measures`; `pairs` to `rescale` (each copy is checked to
    compute the same function on x)."""
    check_number("tol", tol)
    if not factors:
        raise ValueError("give at least one rescaling factor")
    base = invariance_measures(model, x, y, **measure_kwargs)
    table = pd.DataFrame({"unscaled": base})
    for c in factors:
        scaled = invariance_measures(rescale(model, c, pairs, check=x), x, y, **measure_kwargs)
        table[f"x{c:g}"] = [scaled[k] / base[k] - 1 if base[k] != 0 else np.nan for k in base]
    changes = table[[f"x{c:g}" for c in factors]].abs()
    table["expected"] = [EXPECTED[k] for k in table.index]
    table["invariant"] = (changes <= tol).all(axis=1)
    table.index.name = "measure"
    return table
