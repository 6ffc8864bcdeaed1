"""Hessian of the loss in weight space through Hessian-vector products (HVPs).

Every quantity here is matrix-free: an HVP is `torch.func.jvp` of `torch.func.grad`
(forward-over-reverse), evaluated over the data subset in chunks and summed, so memory
stays that of one chunk's double pass. On top of the HVP sit Lanczos / power iteration
(top eigenvalues), Hutchinson / Hutch++ (trace) and stochastic Lanczos quadrature
(spectral density, Ghorbani et al. 2019). Every result says how many HVPs it used and
whether it converged.

Conventions (why):
- The model runs in eval mode (BatchNorm uses its running statistics): the Hessian of a
  fixed function of the weights, not of one batch's normalization. The caller's
  train/eval flags are restored afterwards; its weights are never touched
  (`torch.func.functional_call`).
- BatchNorm affine parameters are left out by module type (`include_bn=False`), as for
  the flatness metrics (Stutz et al. 2021); `layers` restricts the Hessian to the
  diagonal block of some layers ("per layer").
- Always float32, autocast off: HVPs are differences of small gradient changes and
  Lanczos relies on orthogonality; bf16's 8-bit mantissa breaks both. TF32 is NOT switched
  off here (`torch.autocast(enabled=False)`, not `_torch.autocast(device, "fp32")`): on CUDA
  convolutions follow `torch.backends.cudnn.allow_tf32` (PyTorch's default: on) as PyHessian
  does under the same setting; turn it off for HVPs exact to fp32 rounding.
- Independent probes (Hutchinson, Hutch++) go through H in blocks (`block_size`, "auto": 1 on
  CPU, on CUDA as many as fit in memory, `advkit.curvature.blocks`), each block one batched product.
- Robust loss: `attack(model, x, y) -> x_adv` is run once at the current weights and the
  Hessian of the loss at these fixed x_adv is taken (Danskin-style approximation).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import scipy.integrate
import scipy.linalg
import torch
from torch import nn

from advkit._checks import check_choice, check_int, check_number
from advkit._torch import make_generator
from advkit.curvature.blocks import block_size_of
from advkit.curvature.operator import (
    HessianOperator,
    layer_names,
)

# --- parameter selection and data ------------------------------------------------------


# --- the HVP operator ---------------------------------------------------------------------------


# --- results -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class EigenResult:
    """Top eigenvalues (descending) of the Hessian, with the cost and convergence of the solver."""

    eigenvalues: list[float]
    n_hvp: int
    converged: bool
    residuals: list[float]
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def value(self) -> float:
        return self.eigenvalues[0]

    def as_row(self, prefix: str = "hessian_top_eig") -> dict[str, Any]:
        row = {prefix: self.value, f"{prefix}_n_hvp": self.n_hvp, f"{prefix}_converged": self.converged}
        row.update({f"{prefix}_{i + 1}": v for i, v in enumerate(self.eigenvalues[1:], 1)})
        row.update({f"{prefix}_{k}": v for k, v in self.settings.items()})
        return row


@dataclass(frozen=True)
class TraceResult:
    """Stochastic trace estimate with its standard error (over probes) and cost."""

    value: float
    std_error: float
    n_hvp: int
    converged: bool
    settings: dict[str, Any] = field(default_factory=dict)
    block_size: int = 1                     # probes per product (speed only: not in as_row)

    def as_row(self, prefix: str = "hessian_trace") -> dict[str, Any]:
        row = {prefix: self.value, f"{prefix}_std_error": self.std_error, f"{prefix}_n_hvp": self.n_hvp,
               f"{prefix}_converged": self.converged}
        row.update({f"{prefix}_{k}": v for k, v in self.settings.items()})
        return row


@dataclass(frozen=True)
class SpectrumResult:
    """Spectral density on `grid` (integrates to 1) with the quadrature nodes and weights of each run."""

    grid: np.ndarray
    density: np.ndarray
    nodes: np.ndarray
    weights: np.ndarray
    n_hvp: int
    converged: bool
    settings: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# --- Krylov and stochastic estimators on any symmetric operator --------------------------------


def lanczos(matvec: Callable[[torch.Tensor], torch.Tensor], v0: torch.Tensor, steps: int, *,
            reorthogonalize: bool = True) -> tuple[np.ndarray, np.ndarray, float]:
    """Lanczos tridiagonalization from v0: (alpha, beta, beta_last), float64 arrays.

    T = tridiag(beta, alpha, beta) is (m x m) with m <= steps (fewer if an invariant subspace
    was found: then beta_last = 0 and the Ritz values are exact). Full reorthogonalization
    (twice, Gram-Schmidt against all previous vectors) keeps ghosts out of the spectrum; it
    stores the Krylov vectors. No host-device sync inside the loop: a breakdown is detected
    afterwards and the steps after it are dropped.
    """
    Q = torch.empty(steps, v0.numel(), dtype=v0.dtype, device=v0.device)
    Q[0] = v0 / v0.norm()
    alphas: list[torch.Tensor] = []
    betas: list[torch.Tensor] = []
    for j in range(steps):
        q = Q[j]
        w = matvec(q)
        alpha = torch.dot(w, q)
        w = w - alpha * q
        if j > 0:
            w = w - betas[-1] * Q[j - 1]
        if reorthogonalize:
            basis = Q[: j + 1]
            for _ in range(2):
                w = w - basis.T @ (basis @ w)
        beta = w.norm()
        alphas.append(alpha)
        betas.append(beta)
        if j + 1 < steps:
            Q[j + 1] = w / beta.clamp_min(torch.finfo(w.dtype).tiny)
    a = torch.stack(alphas).double().cpu().numpy()
    b = torch.stack(betas).double().cpu().numpy()
    scale = max(float(np.abs(a).max()), 1e-30)
    broke = np.flatnonzero(b <= 1e-6 * scale)
    if len(broke):                      # invariant subspace after step broke[0]: exact from there on
        m = broke[0] + 1
        return a[:m], b[: m - 1], 0.0
    return a, b[:-1], float(b[-1])


def ritz(alpha: np.ndarray, beta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues (ascending) and eigenvectors of the Lanczos tridiagonal matrix."""
    if len(alpha) == 1:
        return alpha.copy(), np.ones((1, 1))
    return scipy.linalg.eigh_tridiagonal(alpha, beta)


def power_iteration(matvec: Callable[[torch.Tensor], torch.Tensor], v0s: torch.Tensor, iters: int,
                    tol: float) -> tuple[list[float], list[bool], list[float]]:
    """Top-|lambda| eigenvalues by power iteration with deflation (one start vector per eigenvalue).

    Each iterate is orthogonalized against the eigenvectors already found (as PyHessian);
    an eigenvalue converged when its Rayleigh quotient changes by <= tol (relative); with
    tol <= 0 all `iters` products run without any host-device sync. Residuals ||Hv - lambda v||.
    """
    found: list[torch.Tensor] = []
    values, converged, residuals = [], [], []
    for v0 in v0s:
        v = v0
        value, prev, done = None, None, False
        for i in range(iters):
            for u in found:
                v = v - torch.dot(v, u) * u
            v = v / v.norm()
            hv = matvec(v)
            value = torch.dot(hv, v)
            if tol > 0:
                new = float(value)
                if prev is not None and abs(new - prev) <= tol * (abs(prev) + 1e-12):
                    done = True
                    break
                prev = new
            if i < iters - 1:
                v = hv                  # the last v stays the one whose Rayleigh quotient is reported
        residuals.append(float((hv - value * v).norm()))
        found.append(v)
        values.append(float(value))
        converged.append(done)
    return values, converged, residuals


def rademacher(shape: tuple[int, ...], generator: torch.Generator, device: torch.device) -> torch.Tensor:
    return torch.randint(0, 2, shape, generator=generator, device=device).to(torch.float32) * 2 - 1


def hutchinson(apply: Callable[[torch.Tensor], torch.Tensor], dim: int, n_samples: int,
               generator: torch.Generator, device: torch.device, block_size: int = 1
               ) -> tuple[float, float, np.ndarray]:
    """Tr(H) ~ mean of z^T H z over Rademacher z (Hutchinson 1989): (estimate, std error, samples).

    Probes are drawn one by one, so they do not depend on `block_size` (probes per `apply`)."""
    samples = []
    for start in range(0, n_samples, block_size):
        Z = torch.stack([rademacher((dim,), generator, device) for _ in range(min(block_size, n_samples - start))])
        samples.append((Z * apply(Z)).sum(1))
    s = torch.cat(samples).double().cpu().numpy()
    se = float(s.std(ddof=1) / math.sqrt(len(s))) if len(s) > 1 else float("inf")
    return float(s.mean()), se, s


def hutchpp(apply: Callable[[torch.Tensor], torch.Tensor], dim: int, n_hvp: int,
            generator: torch.Generator, device: torch.device) -> tuple[float, float]:
    """Hutch++ (Meyer et al. 2021): exact trace on a sketched top subspace + Hutchinson on the rest.

    Uses n_hvp products split in thirds; returns (estimate, std error of the residual part).
    """
    k = max(n_hvp // 3, 1)
    m = max(n_hvp - 2 * k, 1)
    S = rademacher((k, dim), generator, device)
    Q, _ = torch.linalg.qr(apply(S).T)                  # (dim, k): range of H S
    top = float(torch.trace(Q.T @ apply(Q.T).T))
    G = rademacher((m, dim), generator, device)
    G = G - (G @ Q) @ Q.T                               # (I - QQ^T) g
    s = (G * apply(G)).sum(1).double().cpu().numpy()
    se = float(s.std(ddof=1) / math.sqrt(m)) if m > 1 else float("inf")
    return top + float(s.mean()), se


def gaussian_density(nodes: np.ndarray, weights: np.ndarray, grid: np.ndarray, sigma: float) -> np.ndarray:
    """Average over runs of sum_i w_i N(t; theta_i, sigma^2), renormalized to integrate to 1 on `grid`."""
    d = np.zeros_like(grid)
    for theta, w in zip(nodes, weights):
        z = (grid[:, None] - theta[None, :]) / sigma
        d += (w[None, :] * np.exp(-0.5 * z ** 2)).sum(1) / (sigma * math.sqrt(2 * math.pi))
    d /= len(nodes)
    return d / scipy.integrate.trapezoid(d, grid)


# --- public metrics ---------------------------------------------------------------------------


def _op(model, x, y, operator_kwargs) -> HessianOperator:
    if isinstance(model, HessianOperator):
        if operator_kwargs or x is not None or y is not None:
            raise ValueError(f"a ready HessianOperator takes no data or operator settings, got "
                             f"{sorted(operator_kwargs) + [n for n, v in (('x', x), ('y', y)) if v is not None]}")
        return model
    return HessianOperator(model, x, y, **operator_kwargs)


def hessian_eigenvalues(model: nn.Module | HessianOperator, x: torch.Tensor | None = None,
                        y: torch.Tensor | None = None, *, k: int = 1, method: str = "lanczos",
                        iters: int = 20, tol: float = 1e-3, seed: int = 0, **operator_kwargs) -> EigenResult:
    """Top-k Hessian eigenvalues of the loss over (x, y).

    method="lanczos": `iters` Lanczos steps with full reorthogonalization; the k largest
    (algebraic) Ritz values, converged when each residual |beta_m s_mi| <= tol |theta_i|.
    method="power": power iteration with deflation, at most `iters` HVPs per eigenvalue,
    converged when the Rayleigh quotient changes by <= tol (relative); finds the largest
    |lambda| (as PyHessian). `operator_kwargs` go to `HessianOperator` (loss_fn, attack,
    include_bn, layers, batch_size); a ready `HessianOperator` may replace the model.
    """
    check_int("k", k)
    check_int("iters", iters)
    check_choice("method", method, ("lanczos", "power"))
    if method == "lanczos" and iters < k:
        raise ValueError(f"iters must be >= k for Lanczos, got iters={iters}, k={k}")
    op = _op(model, x, y, operator_kwargs)
    start_hvp = op.n_hvp
    gen = make_generator(op.device, seed)
    if method == "lanczos":
        v0 = torch.randn(op.dim, generator=gen, device=op.device)
        a, b, last = lanczos(op.matvec, v0, iters)
        theta, S = ritz(a, b)
        order = np.argsort(theta)[::-1][:k]
        values = [float(theta[i]) for i in order]
        residuals = [abs(last * S[-1, i]) for i in order]
        converged = len(values) == k and all(r <= tol * max(abs(t), 1e-12) for r, t in zip(residuals, values))
    else:
        v0s = torch.randn(k, op.dim, generator=gen, device=op.device)
        values, flags, residuals = power_iteration(op.matvec, v0s, iters, tol)
        converged = all(flags)
    settings = {"method": method, "k": k, "iters": iters, "tol": tol, "seed": seed, "n_data": op.n,
                "n_params": op.dim}
    return EigenResult(values, op.n_hvp - start_hvp, bool(converged), [float(r) for r in residuals], settings)


def hessian_trace(model: nn.Module | HessianOperator, x: torch.Tensor | None = None,
                  y: torch.Tensor | None = None, *, n_samples: int = 100, method: str = "hutchinson",
                  rtol: float = 0.05, block_size: int | str = "auto", seed: int = 0,
                  **operator_kwargs) -> TraceResult:
    """Tr(H) of the loss over (x, y) with `n_samples` HVPs.

    method="hutchinson": mean of z^T H z over Rademacher z; "hutchpp": Hutch++ (lower
    variance when a few eigenvalues dominate). Converged when std error <= rtol |estimate|.
    `block_size` > 1 applies H to that many probes at once with vmap (GPU); "auto": 1 on CPU,
    on CUDA what fits in memory (`advkit.curvature.blocks.auto_block_size`, one more HVP to measure it).
    The probes and the estimate do not depend on it (up to float rounding).
    """
    check_choice("method", method, ("hutchinson", "hutchpp"))
    check_int("n_samples", n_samples, 3 if method == "hutchpp" else 1)
    if block_size != "auto":
        check_int("block_size", block_size)
    op = _op(model, x, y, operator_kwargs)
    start_hvp = op.n_hvp
    block_size = block_size_of(op, block_size, n_samples)
    gen = make_generator(op.device, seed)
    apply = lambda V: op.apply_block(V, block_size)  # noqa: E731
    if method == "hutchinson":
        value, se, _ = hutchinson(apply, op.dim, n_samples, gen, op.device, block_size)
    else:
        value, se = hutchpp(apply, op.dim, n_samples, gen, op.device)
    settings = {"method": method, "n_samples": n_samples, "seed": seed, "n_data": op.n, "n_params": op.dim}
    return TraceResult(value, se, op.n_hvp - start_hvp, bool(se <= rtol * abs(value)), settings, block_size)


def hessian_spectrum(model: nn.Module | HessianOperator, x: torch.Tensor | None = None,
                     y: torch.Tensor | None = None, *, steps: int = 80, runs: int = 1,
                     kernel_width: float = 0.01, n_grid: int = 1000, seed: int = 0,
                     **operator_kwargs) -> SpectrumResult:
    """Eigenvalue density by stochastic Lanczos quadrature (Ghorbani et al. 2019; as in PyHessian).

    Each run: `steps` Lanczos steps from a normalized Rademacher vector; quadrature nodes are
    the Ritz values, weights the squared first components of the Ritz vectors. The density
    is a Gaussian mixture of width kernel_width * (spectral range), averaged over runs and
    renormalized on a grid padded by 5 widths. Converged: every run ended in an invariant
    subspace, or its extreme Ritz values settled (|beta_m s_mi| <= 1e-2 |theta_i|).
    """
    check_int("steps", steps)
    check_int("runs", runs)
    check_int("n_grid", n_grid, 2)
    check_number("kernel_width", kernel_width, low_open=True)    # a fraction of the spectral range
    op = _op(model, x, y, operator_kwargs)
    start_hvp = op.n_hvp
    gen = make_generator(op.device, seed)
    nodes, weights, ok = [], [], True
    for _ in range(runs):
        a, b, last = lanczos(op.matvec, rademacher((op.dim,), gen, op.device), steps)
        theta, S = ritz(a, b)
        nodes.append(theta)
        weights.append(S[0] ** 2)
        res = np.abs(last * S[-1, [0, -1]])
        ok = ok and bool(np.all(res <= 1e-2 * np.maximum(np.abs(theta[[0, -1]]), 1e-12)))
    lo = min(t.min() for t in nodes)
    hi = max(t.max() for t in nodes)
    sigma = kernel_width * max(hi - lo, 1e-12 + 1e-6 * max(abs(lo), abs(hi)))
    grid = np.linspace(lo - 5 * sigma, hi + 5 * sigma, n_grid)
    width = max(len(t) for t in nodes)
    pad = lambda arr: np.pad(arr, (0, width - len(arr)))  # noqa: E731  zero weight for short runs
    nodes_arr = np.stack([pad(t) for t in nodes])
    weights_arr = np.stack([pad(w) for w in weights])
    density = gaussian_density(nodes_arr, weights_arr, grid, sigma)
    settings = {"steps": steps, "runs": runs, "kernel_width": kernel_width, "seed": seed, "n_data": op.n,
                "n_params": op.dim}
    return SpectrumResult(grid, density, nodes_arr, weights_arr, op.n_hvp - start_hvp, ok, settings)


def per_layer(metric: Callable[..., Any], model: nn.Module, x: torch.Tensor, y: torch.Tensor, *,
              include_bn: bool = False, **kwargs) -> dict[str, Any]:
    """`metric` (hessian_trace, hessian_eigenvalues, ...) on each layer's diagonal Hessian block."""
    return {name: metric(model, x, y, layers=[name], include_bn=include_bn, **kwargs)
            for name in layer_names(model, include_bn=include_bn)}
