"""Loss landscapes: 1D lines, 2D grids, interpolations and planes of clean and robust loss.

theta(alpha, beta) = theta* + alpha d1 + beta d2 (Li et al. 2018; Xu et al. 2019, Eq. 5-6),
with directions from `advkit.directions`. Every point is evaluated with
`torch.func.functional_call` on device-resident data (no weights copied into the module,
no DataLoader), several points per forward with `vmap` when asked, eval-mode BatchNorm
folded into the preceding convolution, bf16 autocast on CUDA when it changes the loss by
less than 1e-3 relative, and channels_last on CUDA. Surfaces are xarray Datasets written
to netCDF (h5netcdf) after every row, so an interrupted computation resumes; asking for a
surface whose settings differ from an existing file's is an error naming the setting.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
import xarray as xr
from torch import nn
from torch.func import functional_call, vmap

from advkit.directions import (Directions, architecture_mismatch, interpolation_directions, perturbable_state,
                               plane_directions, random_directions, state_hash, tensors_hash)
from advkit.runs import atomic_path, describe_callable, verified

QUANTITIES = ("loss", "accuracy", "robust_loss", "robust_accuracy")
BN_MODES = ("eval", "recalibrate")
PRECISIONS = ("auto", "fp32", "bf16")
AUTOCAST_TOLERANCE = 1e-3  # largest relative change of the loss that bf16 autocast may cause

Attack = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]

LONG_NAMES = {
    "loss": "cross-entropy loss",
    "accuracy": "accuracy (fraction correct)",
    "robust_loss": "cross-entropy loss on adversarial examples",
    "robust_accuracy": "robust accuracy (fraction correct on adversarial examples)",
}


# --- precision ----------------------------------------------------------------------------


def _amp(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def autocast_error(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *,
                   dtype: torch.dtype = torch.bfloat16, batch_size: int = 1024) -> float:
    """Relative change |L_amp - L_fp32| / L_fp32 of the mean cross-entropy under autocast.

    Runs on the model's device (CPU autocast included), at the model's own weights.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        losses = []
        for amp_dtype in (None, dtype):
            total = torch.zeros((), dtype=torch.float64, device=device)
            with torch.no_grad(), _amp(device, amp_dtype):
                for i in range(0, len(y), batch_size):
                    xb = _as_float(x[i:i + batch_size].to(device))
                    logits = model(xb).float()
                    total += F.cross_entropy(logits, y[i:i + batch_size].to(device), reduction="sum").double()
            losses.append(float(total) / len(y))
    finally:
        model.train(was_training)
    return abs(losses[1] - losses[0]) / max(abs(losses[0]), 1e-12)


def choose_precision(model: nn.Module, x: torch.Tensor, y: torch.Tensor, precision: str = "auto", *,
                     tolerance: float = AUTOCAST_TOLERANCE, check_on_cpu: bool = False,
                     n_check: int = 2048) -> tuple[str, float | None]:
    """Resolve `precision` to "fp32" or "bf16"; also return the measured autocast error.

    "auto" uses bf16 autocast only on CUDA (CPU bf16 is rarely faster; `check_on_cpu`
    applies the same rule there) and only if it changes the loss on the first `n_check`
    examples by less than `tolerance` relative.
    """
    _check_choice("precision", precision, PRECISIONS)
    device = next(model.parameters()).device
    if precision == "fp32":
        return "fp32", None
    if precision == "auto" and device.type != "cuda" and not check_on_cpu:
        return "fp32", None
    err = autocast_error(model, x[:n_check], y[:n_check])
    if precision == "bf16":
        return "bf16", err
    return ("bf16" if err < tolerance else "fp32"), err


# --- evaluation engine --------------------------------------------------------------------


def _as_float(x: torch.Tensor) -> torch.Tensor:
    return x.float().div_(255) if x.dtype == torch.uint8 else x


def _quiet(fn: Callable, *args: Any) -> Any:
    """Call under vmap without functorch's per-op "performance drop" warnings (e.g. for
    adaptive_avg_pool2d's as_strided_, a tiny op that the fallback loops over points)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="There is a performance drop")
        return fn(*args)


def _check_choice(name: str, value: Any, allowed: Sequence[Any]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not available; choose one of {list(allowed)}")


def conv_bn_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """(conv, bn) module names where a Conv2d's only consumer is a BatchNorm2d with running
    statistics: in eval mode the BN is an affine map that folds into the conv's weights.

    Found by tracing the model with torch.fx; an untraceable model simply gets no folding.
    """
    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception:  # dynamic control flow etc.: fold nothing
        return []
    modules = dict(model.named_modules())
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    pairs = []
    for node in graph.nodes:
        bn = modules.get(node.target) if node.op == "call_module" else None
        if not (isinstance(bn, nn.BatchNorm2d) and bn.track_running_stats and node.args):
            continue
        src = node.args[0]
        conv = modules.get(src.target) if isinstance(src, torch.fx.Node) and src.op == "call_module" else None
        if (type(conv) is nn.Conv2d and len(src.users) == 1 and calls[node.target] == 1
                and calls[src.target] == 1 and conv.out_channels == bn.num_features):
            pairs.append((src.target, node.target))
    return pairs


def _folded_copy(model: nn.Module, pairs: list[tuple[str, str]]) -> nn.Module:
    """A copy of the model whose folded BatchNorms are Identity and whose convs have a bias."""
    folded = copy.deepcopy(model)
    for conv_name, bn_name in pairs:
        conv = folded.get_submodule(conv_name)
        if conv.bias is None:
            conv.bias = nn.Parameter(torch.zeros(conv.out_channels, device=conv.weight.device,
                                                 dtype=conv.weight.dtype), requires_grad=False)
        parent_name, _, attr = bn_name.rpartition(".")
        setattr(folded.get_submodule(parent_name) if parent_name else folded, attr, nn.Identity())
    return folded


class _PerturbedModule(nn.Module):
    """The model at one perturbed point, as a module (what an attack callable receives)."""

    def __init__(self, engine: _Engine, state: dict[str, torch.Tensor]):
        super().__init__()
        self.base = engine.exec_module
        self._engine, self._state = engine, state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._engine.forward(self._state, x)


class _Engine:
    """Evaluates the model at theta* + sum_i c_i d_i for groups of coefficient vectors c."""

    def __init__(self, model: nn.Module, directions: Directions, *, batch_size: int,
                 points_per_forward: int, amp_dtype: torch.dtype | None, channels_last: bool,
                 fold_bn: bool, bn_mode: str, bn_x: torch.Tensor | None, bn_batch_size: int):
        self.model = model
        params = dict(model.named_parameters())
        self.device = next(iter(params.values())).device
        self.batch_size, self.amp_dtype = batch_size, amp_dtype
        self.points_per_forward = 1 if bn_mode == "recalibrate" else points_per_forward
        self.channels_last, self.bn_mode, self.bn_batch_size = channels_last, bn_mode, bn_batch_size
        self.bn_x = bn_x
        center = {k: v.detach() for k, v in perturbable_state(model).items()}
        self.center = center
        vectors = [dict(d) for d in directions.to(self.device).vectors]
        keys = [k for k in center if any(k in d and bool(d[k].any()) for d in vectors)]
        self.keys = keys
        self.bn_modules = [(n, m) for n, m in model.named_modules()
                           if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
        self.variance_keys = {f"{n}.running_var" for n, _ in self.bn_modules}
        self.pairs = conv_bn_pairs(model) if fold_bn else []
        self.exec_module = _folded_copy(model, self.pairs).eval() if self.pairs else model
        # When no folded BatchNorm entry is perturbed, folding is linear in the conv weights:
        # fold theta* and the directions once (W s + alpha d1 s + ...), nothing per point.
        # Otherwise (BN parameters included, interpolated statistics) fold at every point.
        bn_entries = {f"{bn}.{e}" for _, bn in self.pairs for e in ("weight", "bias", "running_mean", "running_var")}
        self.static_fold = bool(self.pairs) and not (bn_entries & set(keys))
        if self.static_fold:
            self.center = center = dict(center)
            for conv_name, bn_name in self.pairs:
                scale, shift = self._bn_affine(bn_name, center)
                wk, bk = f"{conv_name}.weight", f"{conv_name}.bias"
                bias = center.get(bk)
                center[wk] = center[wk] * scale[:, None, None, None]
                center[bk] = shift if bias is None else bias * scale + shift
                for d in vectors:
                    if wk in d:
                        d[wk] = d[wk] * scale[:, None, None, None]
                    if bk in d:
                        d[bk] = d[bk] * scale
                conv = self.exec_module.get_submodule(conv_name)
                with torch.no_grad():
                    conv.weight.copy_(center[wk])
                    conv.bias.copy_(center[bk])
        # One flat buffer for theta* and one row per direction: a point's weights are one addmm,
        # and every tensor of the state is a view (channels_last-strided for 4-D weights on CUDA).
        self.layout = []
        offset = 0
        for k in keys:
            shape = tuple(center[k].shape)
            self.layout.append((k, offset, shape, center[k].dtype))
            offset += center[k].numel()
        dtype = torch.float32 if not keys else torch.promote_types(torch.float32, center[keys[0]].dtype)
        self.center_flat = torch.cat([self._flat(center[k]) for k in keys]).to(dtype) if keys else \
            torch.zeros(0, device=self.device)
        self.dir_flat = torch.stack([
            torch.cat([self._flat(d[k]) if k in d else self._flat(torch.zeros_like(center[k])) for k in keys])
            for d in vectors]).to(dtype) if keys else torch.zeros(len(vectors), 0, device=self.device)
        folded_bn = {bn for _, bn in self.pairs}
        self._drop_prefixes = tuple(f"{bn}." for bn in folded_bn)

    def _flat(self, t: torch.Tensor) -> torch.Tensor:
        if self.channels_last and t.dim() == 4:
            return t.permute(0, 2, 3, 1).reshape(-1)
        return t.reshape(-1)

    def perturbed(self, coeffs: torch.Tensor) -> dict[str, torch.Tensor]:
        """Perturbed entries for P points: name -> tensor of shape (P, *shape)."""
        p = coeffs.shape[0]
        flat = torch.addmm(self.center_flat.expand(p, -1), coeffs.to(self.center_flat.dtype), self.dir_flat)
        out = {}
        for k, off, shape, dtype in self.layout:
            n = math.prod(shape)
            chunk = flat[:, off:off + n]
            if self.channels_last and len(shape) == 4:
                o, i, h, w = shape
                t = chunk.view(p, o, h, w, i).permute(0, 1, 4, 2, 3)
            else:
                t = chunk.view(p, *shape)
            t = t if t.dtype == dtype else t.to(dtype)
            # Extrapolated BatchNorm variances (interpolation beyond [0, 1]) can turn negative.
            out[k] = t.clamp_min(0) if k in self.variance_keys else t
        return out

    def _bn_affine(self, bn_name: str, state: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Eval-mode BatchNorm as y = s x + shift: s = gamma / sqrt(var + eps), shift = beta - mu s."""
        get = lambda k: state[k] if k in state else self.center[k]  # noqa: E731
        bn = self.model.get_submodule(bn_name)
        scale = torch.rsqrt(get(f"{bn_name}.running_var") + bn.eps)
        shift = -get(f"{bn_name}.running_mean") * scale
        if bn.affine:
            gamma = get(f"{bn_name}.weight")
            scale, shift = scale * gamma, shift * gamma + get(f"{bn_name}.bias")
        return scale, shift

    def _fold(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Fold eval-mode BatchNorm into the preceding conv at one point: W' = W s,
        b' = b s + shift (see _bn_affine). Works per point inside vmap."""
        get = lambda k: state[k] if k in state else self.center[k]  # noqa: E731
        out = {k: v for k, v in state.items() if not k.startswith(self._drop_prefixes)}
        for conv_name, bn_name in self.pairs:
            scale, shift = self._bn_affine(bn_name, state)
            weight = get(f"{conv_name}.weight")
            out[f"{conv_name}.weight"] = weight * scale[..., None, None, None]
            bias_key = f"{conv_name}.bias"
            bias = state.get(bias_key, self.center.get(bias_key))
            out[bias_key] = shift if bias is None else bias * scale + shift
        return out

    def forward(self, state: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """Logits at one point (`state`: the perturbed entries; others are theta*'s)."""
        if self.pairs and not self.static_fold:
            state = self._fold(state)
        return functional_call(self.exec_module, state, (x,))

    def batches(self, x: torch.Tensor, y: torch.Tensor, batch_size: int | None = None
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        bs = batch_size or self.batch_size
        for i in range(0, len(y), bs):
            yield x[i:i + bs], y[i:i + bs]

    def recalibrate(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Recompute BatchNorm running statistics at this point on `bn_x` (cumulative average
        over batches, momentum=None, as torch.optim.swa_utils.update_bn)."""
        fresh = {}
        for name, m in self.bn_modules:
            fresh[f"{name}.running_mean"] = torch.zeros_like(m.running_mean)
            fresh[f"{name}.running_var"] = torch.ones_like(m.running_var)
            fresh[f"{name}.num_batches_tracked"] = torch.zeros_like(m.num_batches_tracked)
        full = {**state, **fresh}
        saved = [(m, m.training, m.momentum) for _, m in self.bn_modules]
        try:
            for m, _, _ in saved:
                m.train()
                m.momentum = None
            with torch.no_grad():
                for i in range(0, len(self.bn_x), self.bn_batch_size):
                    functional_call(self.model, full, (self.bn_x[i:i + self.bn_batch_size],))
        finally:
            for m, training, momentum in saved:
                m.train(training)
                m.momentum = momentum
        return full

    def fixed(self, coeffs: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed loss and number correct at P points on fixed inputs (device tensors, no sync)."""
        p = coeffs.shape[0]
        loss = torch.zeros(p, dtype=torch.float64, device=self.device)
        correct = torch.zeros(p, dtype=torch.int64, device=self.device)
        stacked = self.perturbed(coeffs)
        with torch.no_grad():
            if self.bn_mode == "recalibrate":
                state = self.recalibrate({k: v[0] for k, v in stacked.items()})
                run = lambda xb: self.forward(state, xb)[None]  # noqa: E731
            elif p == 1:
                state = {k: v[0] for k, v in stacked.items()}
                run = lambda xb: self.forward(state, xb)[None]  # noqa: E731
            else:
                batched = vmap(self.forward, in_dims=(0, None))
                run = lambda xb: _quiet(batched, stacked, xb)  # noqa: E731
            for xb, yb in self.batches(x, y):
                with _amp(self.device, self.amp_dtype):
                    logits = run(xb)
                logits = logits.float()
                ce = F.cross_entropy(logits.flatten(0, 1), yb.repeat(p), reduction="none")
                loss += ce.view(p, -1).sum(1, dtype=torch.float64)
                correct += (logits.argmax(-1) == yb).sum(1)
        return loss, correct

    def attacked(self, coeffs: torch.Tensor, x: torch.Tensor, y: torch.Tensor, attack: Attack,
                 attack_batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed robust loss and number correct, the attack re-run at each point (Stutz et al.)."""
        p = coeffs.shape[0]
        loss = torch.zeros(p, dtype=torch.float64, device=self.device)
        correct = torch.zeros(p, dtype=torch.int64, device=self.device)
        with torch.no_grad():
            stacked = self.perturbed(coeffs)
        for j in range(p):
            with torch.no_grad():
                state = {k: v[j] for k, v in stacked.items()}
                if self.bn_mode == "recalibrate":
                    state = self.recalibrate(state)
            module = _PerturbedModule(self, state).eval()
            for xb, yb in self.batches(x, y, attack_batch_size):
                x_adv = attack(module, xb, yb).detach()
                with torch.no_grad(), _amp(self.device, self.amp_dtype):
                    logits = self.forward(state, x_adv).float()
                loss[j] += F.cross_entropy(logits, yb, reduction="sum").double()
                correct[j] += (logits.argmax(-1) == yb).sum()
        return loss, correct


# --- settings and files -----------------------------------------------------------------------


def _attr_value(v: Any) -> str | float:
    if isinstance(v, (bool, np.bool_)):
        return float(v)
    if isinstance(v, (int, float, np.integer, np.floating)):
        return float(v)
    return str(v)


def check_settings(existing: Mapping[str, Any], requested: Mapping[str, Any], path: str | Path = "") -> None:
    """Raise ValueError naming every setting where an existing surface file differs."""
    diffs = []
    for key, want in requested.items():
        if key not in existing:
            diffs.append(f"{key}: file has none, requested {want!r}")
        elif _attr_value(existing[key]) != _attr_value(want):
            diffs.append(f"{key}: file has {existing[key]!r}, requested {want!r}")
    if diffs:
        raise ValueError(f"surface file {path} was computed with different settings -- "
                         + "; ".join(diffs) + ". Use another path or delete the file; "
                         "it is never reused silently.")


def _write(ds: xr.Dataset, path: Path) -> None:
    """Write atomically with a recorded checksum (`advkit.runs.atomic_path`)."""
    with atomic_path(path) as tmp:
        ds.to_netcdf(tmp, engine="h5netcdf")


def load_surface(path: str | Path) -> xr.Dataset:
    """Read a surface file into memory (the file is closed afterwards), after checking it
    against the checksum recorded when it was written; an unreadable file is an error naming it."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no surface file at {path}")
    verified(path)
    try:
        ds = xr.load_dataset(path, engine="h5netcdf")
    except Exception as err:  # h5py/h5netcdf raise OSError, ValueError, KeyError, ... on damaged files
        raise ValueError(f"{path} is not a readable surface file (truncated or not netCDF?): {err}. "
                         "Delete it (and its .sha256) and compute the surface again (notebook 04).") from err
    if "computed" not in ds:
        raise ValueError(f"{path} is not an advkit surface file: it has no 'computed' mask")
    return ds


def coordinates(span: tuple[float, float] | float = (-1.0, 1.0), resolution: int = 51) -> np.ndarray:
    """`resolution` evenly spaced values over `span` (a number s means (-s, s))."""
    if isinstance(span, (int, float)):
        span = (-float(span), float(span))
    if len(span) != 2 or not span[0] < span[1]:
        raise ValueError(f"span must be (low, high) with low < high, got {span!r}")
    if int(resolution) < 2:
        raise ValueError(f"resolution must be >= 2, got {resolution}")
    return np.linspace(float(span[0]), float(span[1]), int(resolution))


# --- surfaces -----------------------------------------------------------------------------------


def compute_surface(model: nn.Module, directions: Directions, x: torch.Tensor, y: torch.Tensor, *,
                    alphas: Sequence[float] | np.ndarray, betas: Sequence[float] | np.ndarray | None = None,
                    path: str | Path | None = None, kind: str | None = None,
                    model_name: str = "model", data_name: str = "data",
                    quantities: Sequence[str] | None = None,
                    attack: Attack | None = None, attack_name: str | None = None,
                    x_adv: torch.Tensor | None = None,
                    bn_mode: str = "eval", bn_x: torch.Tensor | None = None, bn_batch_size: int = 256,
                    batch_size: int | None = None, points_per_forward: int = 1,
                    attack_batch_size: int | None = None, precision: str = "auto",
                    channels_last: bool | None = None, fold_bn: bool = True,
                    progress: bool = False, callback: Callable[[int, int], None] | None = None,
                    extra_attrs: Mapping[str, Any] | None = None) -> xr.Dataset:
    """Evaluate the chosen quantities at theta* + alpha d1 (+ beta d2) for every coordinate.

    quantities: default loss and accuracy, plus robust_loss and robust_accuracy when an
    `attack` (re-run at each point: attack(model, x, y) -> x_adv) or fixed adversarial
    examples `x_adv` are given. bn_mode "eval" keeps the stored running statistics (Li et
    al.); "recalibrate" recomputes them at each point on `bn_x` (training images).
    With `path`, the surface is written after every row and an existing file with the same
    settings is resumed (or returned when complete); different settings raise ValueError.
    `callback(done, total)` runs after each row is saved.
    """
    # -- validate everything before any computation
    if not isinstance(directions, Directions):
        raise ValueError(f"directions must be an advkit.directions.Directions, got {type(directions).__name__}")
    directions.check(model)
    alphas = np.asarray(alphas, dtype=np.float64)
    betas = None if betas is None else np.asarray(betas, dtype=np.float64)
    ndim = 1 if betas is None else 2
    if directions.ndim != ndim:
        raise ValueError(f"a {ndim}-D surface needs {ndim} direction(s); directions has {directions.ndim}")
    if alphas.ndim != 1 or len(alphas) < 1 or (betas is not None and (betas.ndim != 1 or len(betas) < 1)):
        raise ValueError("alphas (and betas) must be non-empty 1-D sequences of coordinates")
    _check_choice("bn_mode", bn_mode, BN_MODES)
    _check_choice("precision", precision, PRECISIONS)
    if attack is not None and x_adv is not None:
        raise ValueError("give either attack (re-run at every point) or x_adv (fixed adversarial examples), not both")
    robust = "attack" if attack is not None else "fixed" if x_adv is not None else "none"
    if quantities is None:
        quantities = ("loss", "accuracy") + (("robust_loss", "robust_accuracy") if robust != "none" else ())
    quantities = tuple(quantities)
    for q in quantities:
        _check_choice("quantities entry", q, QUANTITIES)
    if robust == "none" and any(q.startswith("robust") for q in quantities):
        raise ValueError("robust quantities need attack=... (re-run at each point) or x_adv=... (fixed examples)")
    if len(y) != len(x) or len(y) == 0:
        raise ValueError(f"x and y must be non-empty and of equal length, got {len(x)} and {len(y)}")
    if x_adv is not None and x_adv.shape != x.shape:
        raise ValueError(f"x_adv must have x's shape {tuple(x.shape)}, got {tuple(x_adv.shape)}")
    if bn_mode == "recalibrate" and (bn_x is None or len(bn_x) == 0):
        raise ValueError("bn_mode='recalibrate' needs bn_x: training images to recompute BatchNorm statistics on")
    if points_per_forward < 1:
        raise ValueError(f"points_per_forward must be >= 1, got {points_per_forward}")
    device = next(model.parameters()).device
    if batch_size is None:
        batch_size = 10_000 if device.type == "cuda" else 1024
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if channels_last is None:
        channels_last = device.type == "cuda"
    kind = kind or ("line" if ndim == 1 else "grid")

    was_training = model.training
    model.eval()
    try:
        x_dev = _as_float(x.to(device))
        y_dev = y.to(device)
        xa_dev = _as_float(x_adv.to(device)) if x_adv is not None else None
        bn_dev = _as_float(bn_x.to(device)) if bn_x is not None else None
        if channels_last and x_dev.dim() == 4:
            x_dev = x_dev.contiguous(memory_format=torch.channels_last)
            xa_dev = xa_dev.contiguous(memory_format=torch.channels_last) if xa_dev is not None else None
        resolved, amp_error = choose_precision(model, x_dev, y_dev, precision)
        settings: dict[str, Any] = {
            "kind": kind, "model": model_name, "model_sha256": state_hash(model),
            "data": data_name, "data_n": len(y), "data_sha256": tensors_hash(x, y),
            **directions.settings(),
            "bn_mode": bn_mode, "quantities": ",".join(quantities), "precision": resolved,
            "robust": {"none": "none", "attack": "attack re-run at each point",
                       "fixed": "fixed adversarial examples"}[robust],
        }
        if robust == "attack":
            settings["attack"] = attack_name or describe_callable(attack)
        if robust == "fixed":
            settings["x_adv_sha256"] = tensors_hash(x_adv)
        if bn_mode == "recalibrate":
            settings["bn_data_sha256"] = tensors_hash(bn_x)
            settings["bn_batch_size"] = bn_batch_size
        shape = (len(alphas),) if ndim == 1 else (len(alphas), len(betas))
        values = {q: np.full(shape, np.nan) for q in quantities}
        mask = np.zeros(shape, dtype=bool)
        path = Path(path) if path is not None else None
        previous_elapsed = 0.0
        if path is not None and path.exists():
            old = load_surface(path)
            check_settings(old.attrs, settings, path)
            for name, want in (("alpha", alphas), ("beta", betas)):
                have = old.coords[name].values if name in old.coords else None
                if (want is None) != (have is None) or (want is not None and (
                        have.shape != want.shape or not np.allclose(have, want, rtol=0, atol=1e-12))):
                    raise ValueError(f"surface file {path} was computed with different settings -- {name} "
                                     f"coordinates (span/resolution) differ: file has "
                                     f"{None if have is None else (have.min(), have.max(), len(have))}, requested "
                                     f"{None if want is None else (want.min(), want.max(), len(want))}")
            mask = old["computed"].values.astype(bool)
            previous_elapsed = float(old.attrs.get("elapsed_s", 0.0))
            for q in quantities:
                values[q] = old[q].values.astype(np.float64)
            if mask.all():
                return old
        engine = _Engine(model, directions, batch_size=batch_size, points_per_forward=points_per_forward,
                         amp_dtype=torch.bfloat16 if resolved == "bf16" else None,
                         channels_last=channels_last, fold_bn=fold_bn and bn_mode == "eval",
                         bn_mode=bn_mode, bn_x=bn_dev, bn_batch_size=bn_batch_size)
        attrs = {
            **settings,
            "title": f"{'1D' if ndim == 1 else '2D'} loss landscape ({kind}) of {model_name} on {data_name}",
            "directions_cosine": "none" if directions.cosine is None else directions.cosine,
            "directions_raw_cosine": "none" if directions.raw_cosine is None else directions.raw_cosine,
            "directions_note": directions.note or "none",
            "n_ignored_parameters": len(directions.ignored),
            "autocast_relative_error": "not measured" if amp_error is None else amp_error,
            "device": str(device), "channels_last": int(channels_last),
            "fold_bn": len(engine.pairs), "fold_bn_static": int(engine.static_fold),
            "points_per_forward": engine.points_per_forward,
            "batch_size": batch_size, "torch_version": str(torch.__version__),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "accuracy_unit": "fraction in [0, 1]",
            **{k: _attr_value(v) for k, v in (extra_attrs or {}).items()},
            "elapsed_s": previous_elapsed,
        }
        coords = {"alpha": alphas} if ndim == 1 else {"alpha": alphas, "beta": betas}

        def dataset() -> xr.Dataset:
            dims = tuple(coords)
            data_vars = {q: (dims, values[q], {"long_name": _long_name(q, robust)}) for q in quantities}
            data_vars["computed"] = (dims, mask.astype(np.int8), {"long_name": "1 where the point is computed"})
            return xr.Dataset(data_vars, coords=coords, attrs=attrs)

        grid = np.stack(np.meshgrid(*coords.values(), indexing="ij"), -1).reshape(-1, ndim)
        coeffs_all = torch.tensor(grid, dtype=torch.float32, device=device)
        row = 1 if ndim == 1 else len(betas)
        block = max(row, points_per_forward) if ndim == 2 else max(10, points_per_forward)
        todo = [i for i in range(0, grid.shape[0], block) if not mask.reshape(-1)[i:i + block].all()]
        total, done = mask.size, int(mask.sum())
        n, k = len(y), engine.points_per_forward
        bar = _progress(total, done, progress, f"{model_name} {kind}")
        start = time.perf_counter()
        for first in todo:
            idx = np.arange(first, min(first + block, grid.shape[0]))
            idx = idx[~mask.reshape(-1)[idx]]
            results: dict[str, list[torch.Tensor]] = {q: [] for q in quantities}
            for g in range(0, len(idx), k):
                c = coeffs_all[idx[g:g + k]]
                if "loss" in quantities or "accuracy" in quantities:
                    loss, correct = engine.fixed(c, x_dev, y_dev)
                    results.setdefault("loss", []).append(loss / n)
                    results.setdefault("accuracy", []).append(correct / n)
                if robust == "fixed":
                    loss, correct = engine.fixed(c, xa_dev, y_dev)
                elif robust == "attack":
                    loss, correct = engine.attacked(c, x_dev, y_dev, attack, attack_batch_size or batch_size)
                if robust != "none":
                    results.setdefault("robust_loss", []).append(loss / n)
                    results.setdefault("robust_accuracy", []).append(correct / n)
            for q in quantities:  # one device->host transfer per row
                values[q].reshape(-1)[idx] = torch.cat(results[q]).double().cpu().numpy()
            mask.reshape(-1)[idx] = True
            done += len(idx)
            attrs["elapsed_s"] += time.perf_counter() - start
            start = time.perf_counter()
            if path is not None:
                _write(dataset(), path)
            bar.update(len(idx))
            if callback is not None:
                callback(done, total)
        bar.close()
        return dataset()
    finally:
        model.train(was_training)


def _long_name(q: str, robust: str) -> str:
    name = LONG_NAMES[q]
    if q.startswith("robust") and robust == "fixed":
        name += " (fixed adversarial examples, not re-attacked at each point)"
    elif q.startswith("robust"):
        name += " (attack re-run at each point)"
    return name


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, initial: int, enabled: bool, desc: str):
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="pt")


def line(model: nn.Module, directions: Directions, x: torch.Tensor, y: torch.Tensor, *,
         span: tuple[float, float] | float = (-1.0, 1.0), resolution: int = 51, **kwargs) -> xr.Dataset:
    """1D landscape theta* + alpha d along one direction (Li et al. 2018, Fig. 1-style curves)."""
    return compute_surface(model, directions, x, y, alphas=coordinates(span, resolution), **kwargs)


def grid(model: nn.Module, directions: Directions, x: torch.Tensor, y: torch.Tensor, *,
         span: tuple[float, float] | float = (-1.0, 1.0), resolution: int = 51,
         beta_span: tuple[float, float] | float | None = None, beta_resolution: int | None = None,
         **kwargs) -> xr.Dataset:
    """2D landscape theta* + alpha d1 + beta d2 over a grid (Xu et al. Fig. 1-2)."""
    alphas = coordinates(span, resolution)
    betas = coordinates(span if beta_span is None else beta_span, beta_resolution or resolution)
    return compute_surface(model, directions, x, y, alphas=alphas, betas=betas, **kwargs)


def interpolation(model_a: nn.Module, model_b: nn.Module, x: torch.Tensor, y: torch.Tensor, *,
                  span: tuple[float, float] = (0.0, 1.0), resolution: int = 51, **kwargs) -> xr.Dataset:
    """1D interpolation theta = (1 - t) theta_a + t theta_b (BatchNorm statistics interpolated too;
    with bn_mode="recalibrate" they are recomputed instead). alpha is t."""
    kwargs.setdefault("kind", "interpolation")
    return compute_surface(model_a, interpolation_directions(model_a, model_b), x, y,
                           alphas=coordinates(span, resolution), **kwargs)


def plane(model_a: nn.Module, model_b: nn.Module, model_c: nn.Module, x: torch.Tensor, y: torch.Tensor, *,
          span: tuple[float, float] = (-0.25, 1.25), resolution: int = 31, **kwargs) -> xr.Dataset:
    """The plane through three models: a + alpha (b - a) + beta (c - a); a at (0, 0), b at (1, 0),
    c at (0, 1)."""
    kwargs.setdefault("kind", "plane")
    c = coordinates(span, resolution)
    return compute_surface(model_a, plane_directions(model_a, model_b, model_c), x, y,
                           alphas=c, betas=c, **kwargs)


# --- numbers for "sharper" ------------------------------------------------------------------------


def _points(ds: xr.Dataset, quantity: str, radius: float) -> tuple[np.ndarray, np.ndarray]:
    if quantity not in ds:
        raise ValueError(f"quantity={quantity!r} is not in this surface; it has {sorted(ds.data_vars)}")
    if not radius > 0:
        raise ValueError(f"radius must be > 0, got {radius}")
    v = ds[quantity]
    if "beta" in v.dims:
        a, b = np.meshgrid(ds["alpha"].values, ds["beta"].values, indexing="ij")
        xy = np.stack([a.ravel(), b.ravel()], 1)
        vals = v.transpose("alpha", "beta").values.ravel()
    else:
        xy = ds["alpha"].values[:, None]
        vals = v.values.ravel()
    keep = (np.linalg.norm(xy, axis=1) <= radius + 1e-12) & np.isfinite(vals)
    return xy[keep], vals[keep]


def quadratic_fit(ds: xr.Dataset, quantity: str = "loss", radius: float = 0.2) -> dict[str, float]:
    """Least-squares fit L ~ c + g.x + x^T H x / 2 on the points within `radius` of the centre.

    Returns the fitted centre value, gradient norm and the curvature: the eigenvalues of H
    (2D; `curvature_max`, `curvature_min`) or L'' (1D; both equal) in units of the
    direction's scale.
    """
    xy, vals = _points(ds, quantity, radius)
    d = xy.shape[1]
    if d == 1:
        a = xy[:, 0]
        design = np.stack([np.ones_like(a), a, a ** 2], 1)
    else:
        a, b = xy[:, 0], xy[:, 1]
        design = np.stack([np.ones_like(a), a, b, a ** 2, a * b, b ** 2], 1)
    if len(vals) < design.shape[1] + 1:
        raise ValueError(f"radius={radius} holds only {len(vals)} computed points; a quadratic fit in "
                         f"{d}D needs at least {design.shape[1] + 1}: increase radius or resolution")
    coef, *_ = np.linalg.lstsq(design, vals, rcond=None)
    if d == 1:
        eig = np.array([2 * coef[2]])
        grad = abs(coef[1])
    else:
        hess = np.array([[2 * coef[3], coef[4]], [coef[4], 2 * coef[5]]])
        eig = np.linalg.eigvalsh(hess)
        grad = float(np.hypot(coef[1], coef[2]))
    return {"centre_fit": float(coef[0]), "gradient_norm": float(grad),
            "curvature_max": float(eig.max()), "curvature_min": float(eig.min()), "n_points": int(len(vals))}


def check_radius(radius: float, span: float, resolution: int, dims: int = 2) -> int:
    """Number of grid points within `radius` of the centre of a [-span, span]^dims grid; ValueError
    if fewer than `quadratic_fit` needs (1D: 4, 2D: 7), so a bad choice fails before computing."""
    if not radius > 0:
        raise ValueError(f"radius must be > 0, got {radius}")
    c = coordinates(span, resolution)
    if dims == 1:
        n = int(np.sum(np.abs(c) <= radius + 1e-12))
    else:
        a, b = np.meshgrid(c, c)
        n = int(np.sum(np.hypot(a, b) <= radius + 1e-12))
    need = 4 if dims == 1 else 7
    if n < need:
        raise ValueError(f"radius={radius} holds only {n} point(s) of a {dims}D grid of resolution {resolution} "
                         f"over [-{span:g}, {span:g}]; the quadratic fit needs {need}: increase radius or "
                         f"resolution")
    return n


def centre_value(ds: xr.Dataset, quantity: str = "loss") -> float:
    """The quantity at alpha = beta = 0 (linearly interpolated if 0 is not a grid coordinate)."""
    at = {"alpha": 0.0} if "beta" not in ds[quantity].dims else {"alpha": 0.0, "beta": 0.0}
    return float(ds[quantity].interp(at).values)


def mean_increase(ds: xr.Dataset, quantity: str = "loss", radius: float = 0.2) -> float:
    """Mean of L(point) - L(centre) over the computed points within `radius` of the centre."""
    _, vals = _points(ds, quantity, radius)
    if len(vals) == 0:
        raise ValueError(f"no computed point within radius={radius}")
    return float(np.mean(vals) - centre_value(ds, quantity))


def sharpness_table(surfaces: Mapping[str, xr.Dataset], quantity: str = "loss",
                    radius: float = 0.2) -> pd.DataFrame:
    """One row per surface: centre value, curvature of the quadratic fit, mean increase within r."""
    rows = []
    for name, ds in surfaces.items():
        fit = quadratic_fit(ds, quantity, radius)
        rows.append({"model": name, "quantity": quantity, "centre": centre_value(ds, quantity),
                     "curvature_max": fit["curvature_max"], "curvature_min": fit["curvature_min"],
                     "mean_increase": mean_increase(ds, quantity, radius), "radius": radius,
                     "n_points": fit["n_points"], "norm": ds.attrs.get("direction_norm", "?"),
                     "span": float(np.ptp(ds["alpha"].values)) / 2, "robust": ds.attrs.get("robust", "none")})
    return pd.DataFrame(rows).set_index("model")


# --- sensitivity analysis (the referee's question) ------------------------------------------------

METRICS = ("curvature", "mean_increase")


def sensitivity_surfaces(models: Mapping[str, nn.Module], x: torch.Tensor, y: torch.Tensor, *,
                         norms: Sequence[str] = ("filter", "layer", "none"),
                         spans: Sequence[float] | Mapping[str, Sequence[float]] = (0.25, 0.5, 1.0),
                         resolution: int = 21, dims: int = 1,
                         seed: int = 0, directory: str | Path | None = None, overwrite: bool = False,
                         **kwargs) -> dict[tuple[str, float, str], xr.Dataset]:
    """Surfaces of every model under every normalization and span, same seed for all (so each
    model sees the same raw direction). Cached as `directory/<model>_<norm>_<span>_<dims>d.nc`
    (reused when the settings match, else ValueError; `overwrite` recomputes).

    `spans` may map a normalization to its own spans: unnormalized ("none") Gaussian
    directions are far longer than the weights, so their informative range is far smaller.
    """
    if dims not in (1, 2):
        raise ValueError(f"dims must be 1 or 2, got {dims}")
    for norm in norms:
        _check_choice("norms entry", norm, ("filter", "layer", "weight", "none"))
    if isinstance(spans, Mapping):
        missing = [n for n in norms if n not in spans]
        if missing:
            raise ValueError(f"spans has no entry for the normalization(s) {missing}; it has {sorted(spans)}")
    span_lists = {n: [float(s) for s in (spans[n] if isinstance(spans, Mapping) else spans)] for n in norms}
    for n, values in span_lists.items():
        if not values or any(not s > 0 for s in values):
            raise ValueError(f"spans for norm={n!r} must be a non-empty list of numbers > 0, got {values}")
    out = {}
    for norm in norms:
        for name, model in models.items():
            dirs = random_directions(model, dims, seed=seed, norm=norm)
            for span in span_lists[norm]:
                path = None if directory is None else Path(directory) / f"{name}_{norm}_{span:g}_{dims}d.nc"
                if overwrite and path is not None and path.exists():
                    path.unlink()
                fn = line if dims == 1 else grid
                out[(norm, float(span), name)] = fn(model, dirs, x, y, span=span, resolution=resolution,
                                                    path=path, model_name=name, **kwargs)
    return out


def sensitivity_table(surfaces: Mapping[tuple[str, float, str], xr.Dataset], *, metric: str = "curvature",
                      quantity: str = "loss", radius_fraction: float = 0.2,
                      reference: tuple[str, float] | None = None) -> pd.DataFrame:
    """Does the ordering of models hold across normalizations and spans?

    For every (norm, span): the metric per model (radius = radius_fraction * span), the
    ordering sharpest first, and Kendall's tau against the `reference` setting (default:
    filter normalization at the largest span). tau = 1 means the same ordering.
    """
    from scipy.stats import kendalltau

    _check_choice("metric", metric, METRICS)
    settings = sorted({(n, s) for n, s, _ in surfaces}, key=lambda t: (t[0], t[1]))
    models = list(dict.fromkeys(m for _, _, m in surfaces))
    if reference is None:
        filt = [s for n, s in settings if n == "filter"]
        if not filt:
            raise ValueError("no 'filter' surfaces: give reference=(norm, span) explicitly")
        reference = ("filter", max(filt))
    if tuple(reference) not in settings:
        raise ValueError(f"reference={reference!r} is not among the settings {settings}")

    def value(ds: xr.Dataset, span: float) -> float:
        r = radius_fraction * span
        return quadratic_fit(ds, quantity, r)["curvature_max"] if metric == "curvature" else \
            mean_increase(ds, quantity, r)

    table = {(n, s): {m: value(surfaces[(n, s, m)], s) for m in models if (n, s, m) in surfaces}
             for n, s in settings}
    ref = table[tuple(reference)]
    ref_order = sorted(ref, key=lambda m: -ref[m])
    rows = []
    for (n, s), vals in table.items():
        common = [m for m in models if m in vals and m in ref]
        tau = kendalltau([vals[m] for m in common], [ref[m] for m in common]).statistic \
            if len(common) > 1 else float("nan")
        order = sorted(vals, key=lambda m: -vals[m])
        same = [m for m in order if m in common] == [m for m in ref_order if m in common]
        rows.append({"norm": n, "span": s, **vals, "ordering": " > ".join(order),
                     "kendall_tau": float(tau), "same_ordering": same})
    out = pd.DataFrame(rows)
    out.attrs.update(metric=metric, quantity=quantity, radius_fraction=radius_fraction,
                     reference=f"{reference[0]} @ span {reference[1]:g}")
    return out


def sensitivity_summary(surfaces: Mapping[tuple[str, float, str], xr.Dataset], *,
                        metrics: Sequence[str] = METRICS, quantity: str = "loss", radius_fraction: float = 0.2,
                        reference: tuple[str, float] | None = None) -> pd.DataFrame:
    """`sensitivity_table` for every metric, stacked with a leading `metric` column."""
    for m in metrics:
        _check_choice("metrics entry", m, METRICS)
    tables = [sensitivity_table(surfaces, metric=m, quantity=quantity, radius_fraction=radius_fraction,
                                reference=reference) for m in metrics]
    for m, t in zip(metrics, tables):
        t.insert(0, "metric", m)
    out = pd.concat(tables, ignore_index=True)
    out.attrs.update({k: v for k, v in tables[0].attrs.items() if k != "metric"})
    return out


def sensitivity_analysis(models: Mapping[str, nn.Module], x: torch.Tensor, y: torch.Tensor, *,
                         metric: str = "curvature", radius_fraction: float = 0.2, **kwargs) -> pd.DataFrame:
    """`sensitivity_surfaces` then `sensitivity_table`: one call for the referee's table."""
    _check_choice("metric", metric, METRICS)
    surfaces = sensitivity_surfaces(models, x, y, **kwargs)
    return sensitivity_table(surfaces, metric=metric, radius_fraction=radius_fraction)


# --- the set of surfaces a notebook compares --------------------------------------------------------

SURFACE_KINDS = ("grid", "line", "robust_grid", "interpolation")


def surface_path(directory: str | Path, model_name: str, kind: str) -> Path:
    """Where `model_surfaces` keeps a surface: `directory/<model>_<kind>.nc`."""
    _check_choice("kind", kind, SURFACE_KINDS)
    return Path(directory) / f"{model_name}_{kind}.nc"


def interpolation_pairs(models: Mapping[str, nn.Module], reference: str | None = "base"
                        ) -> tuple[list[str], dict[str, str]]:
    """The models that can be interpolated from `reference` (same architecture: one parameter
    space), and {model: why not} for the others (e.g. a ResNet-18 AT model beside a ResNet-32 base)."""
    if reference is None or reference not in models:
        return [], {}
    ok, skipped = [], {}
    for name, model in models.items():
        if name == reference:
            continue
        reason = architecture_mismatch(models[reference], model)
        if reason is None:
            ok.append(name)
        else:
            skipped[name] = reason
    return ok, skipped


def model_surfaces(models: Mapping[str, nn.Module], x: torch.Tensor, y: torch.Tensor,
                   directory: str | Path | None = None, *, seed: int, norm: str = "filter",
                   span: float = 1.0, resolution: int = 21, line_resolution: int | None = None,
                   attack: Attack | None = None, attack_name: str | None = None,
                   robust_resolution: int = 0, robust_n: int | None = None, reference: str | None = "base",
                   interpolation_span: tuple[float, float] = (0.0, 1.0), data_name: str = "data",
                   radius: float | None = None, overwrite: bool = False,
                   **kwargs) -> dict[str, dict[str, xr.Dataset]]:
    """Every model's comparison surfaces, all with the same direction seed (Xu et al. Fig. 1-2):

    - "grid": 2D clean loss/accuracy over [-span, span]^2 (`resolution` per axis);
    - "line": 1D along the grid's first direction (`line_resolution` points), with the robust
      loss/accuracy when an `attack` is given, re-run at every point (Stutz et al. Fig. 4);
    - "robust_grid": 2D robust loss/accuracy at `robust_resolution` per axis (if > 0, needs `attack`);
      with `robust_n`, "line" and "robust_grid" use only the first `robust_n` images (attacks are
      the expensive part);
    - "interpolation": (1 - t) theta_reference + t theta_model for every other model of the
      reference's architecture (`interpolation_pairs` says which are skipped and why), t over
      `interpolation_span` (keep 0 and 1 on the grid of `line_resolution` points).

    Returns {kind: {model: Dataset}}. Each surface is cached as `surface_path(directory, model,
    kind)` and reused (or resumed) when its settings match; a mismatch raises ValueError unless
    `overwrite`, which recomputes. `radius`: the sharpness radius to be used on "grid" and "line"
    (checked before computing: enough points for `quadratic_fit`). Other keywords go to
    `compute_surface`.
    """
    _check_choice("norm", norm, ("filter", "layer", "weight", "none"))
    if not models:
        raise ValueError("models is empty: give a mapping name -> model")
    if not span > 0:
        raise ValueError(f"span must be > 0, got {span}")
    if robust_resolution and attack is None:
        raise ValueError("robust_resolution > 0 needs attack=... (re-run at every point of the 2D grid)")
    if robust_resolution < 0 or (0 < robust_resolution < 2):
        raise ValueError(f"robust_resolution must be 0 (no 2D robust surface) or >= 2, got {robust_resolution}")
    coordinates(span, resolution), coordinates(span, line_resolution or resolution)  # validate early
    if radius is not None:
        check_radius(radius, span, resolution, dims=2)
        check_radius(radius, span, line_resolution or resolution, dims=1)
    if reference is not None and reference not in models and len(models) > 1:
        raise ValueError(f"reference={reference!r} is not among the models {list(models)}")
    if robust_n is not None and not 1 <= robust_n:
        raise ValueError(f"robust_n must be None (all images) or >= 1, got {robust_n}")
    x_r, y_r = (x, y) if robust_n is None or attack is None else (x[:robust_n], y[:robust_n])
    robust_data = data_name if len(y_r) == len(y) else f"{data_name}, first {len(y_r)}"

    def path(name: str, kind: str) -> Path | None:
        if directory is None:
            return None
        p = surface_path(directory, name, kind)
        if overwrite and p.exists():
            p.unlink()
        return p

    out: dict[str, dict[str, xr.Dataset]] = {k: {} for k in SURFACE_KINDS}
    robust = {"attack": attack, "attack_name": attack_name} if attack is not None else {}
    interpolated = set(interpolation_pairs(models, reference)[0])
    for name, model in models.items():
        d2 = random_directions(model, 2, seed=seed, norm=norm)
        d1 = random_directions(model, 1, seed=seed, norm=norm)  # = d2's first direction
        out["grid"][name] = grid(model, d2, x, y, span=span, resolution=resolution, path=path(name, "grid"),
                                 model_name=name, data_name=data_name, **kwargs)
        out["line"][name] = line(model, d1, x_r, y_r, span=span, resolution=line_resolution or resolution,
                                 path=path(name, "line"), model_name=name, data_name=robust_data,
                                 **robust, **kwargs)
        if robust_resolution:
            out["robust_grid"][name] = grid(model, d2, x_r, y_r, span=span, resolution=robust_resolution,
                                            path=path(name, "robust_grid"), model_name=name,
                                            data_name=robust_data, quantities=("robust_loss", "robust_accuracy"),
                                            **robust, **kwargs)
        if name in interpolated:
            out["interpolation"][name] = interpolation(
                models[reference], model, x, y, span=interpolation_span, resolution=line_resolution or resolution,
                path=path(name, "interpolation"), model_name=f"{reference} -> {name}", data_name=data_name,
                **kwargs)
    return {k: v for k, v in out.items() if v}


def sharpness_summary(clean: Mapping[str, xr.Dataset], robust: Mapping[str, xr.Dataset] | None = None, *,
                      radius: float = 0.2) -> pd.DataFrame:
    """One row per model: the numbers behind "sharper" for the clean loss (on `clean` surfaces)
    and the robust loss (on `robust` surfaces, 1D or 2D): value at the centre, curvature of
    the quadratic fit within `radius` (largest and smallest eigenvalue; equal in 1D) and the
    mean loss increase within `radius`. `surface_sharpness` repeats the clean loss's
    largest curvature, the column notebook 05 correlates with robustness."""
    groups = [("loss", clean)] + ([("robust_loss", robust)] if robust else [])
    frames = []
    for quantity, surfaces in groups:
        table = sharpness_table(surfaces, quantity, radius)
        cols = {"centre": "centre", "curvature_max": "curvature_max", "curvature_min": "curvature_min",
                "mean_increase": "mean_increase"}
        part = table[list(cols)].rename(columns=lambda c: f"{quantity}_{c}")
        part[f"{quantity}_dims"] = [2 if "beta" in surfaces[m].dims else 1 for m in table.index]
        frames.append(part)
    out = pd.concat(frames, axis=1)
    out.insert(0, "surface_sharpness", out["loss_curvature_max"])
    first = next(iter(clean.values())).attrs
    out["radius"] = radius
    out["norm"] = first.get("direction_norm", "?")
    out["span"] = [float(np.ptp(clean[m]["alpha"].values)) / 2 for m in out.index]
    out["direction_seed"] = first.get("direction_seed", "?")
    out["n_images"] = [int(clean[m].attrs.get("data_n", -1)) for m in out.index]
    out["robust"] = next(iter(robust.values())).attrs.get("attack", "none") if robust else "none"
    out.index.name = "model"
    return out
