"""The batched evaluator of a surface: the model at theta* + sum_i c_i d_i for many points c.

Every point runs through `torch.func.functional_call` on device-resident data (no weights
copied into the module, no DataLoader); all weights live in one flat buffer, so a point's
weights are one fused multiply-add, passed as views; several points per forward with `vmap`
when asked; eval-mode BatchNorm folded into the preceding convolution; bf16 autocast only
where it changes the loss by less than `AUTOCAST_TOLERANCE` relative (`choose_precision`).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vmap

from advkit._torch import (Attack, WithParams, autocast, check_number, check_precision, chunks, eval_mode,
                           loss_and_accuracy, model_device, train_mode)
from advkit.directions import Directions, perturbable_state
from advkit.folding import conv_bn_pairs, folded_copy

AUTOCAST_TOLERANCE = 1e-3  # largest relative change of the loss that bf16 autocast may cause


# --- precision ----------------------------------------------------------------------------------


def autocast_error(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, precision: str = "bf16",
                   batch_size: int = 1024) -> float:
    """Relative change |L_bf16 - L_fp32| / L_fp32 of the mean cross-entropy under autocast.

    Runs on the model's device (CPU autocast included), at the model's own weights, in eval mode.
    """
    fp32 = loss_and_accuracy(model, x, y, batch_size=batch_size, precision="fp32").loss
    amp = loss_and_accuracy(model, x, y, batch_size=batch_size, precision=precision).loss
    return abs(amp - fp32) / max(abs(fp32), 1e-12)


def choose_precision(model: nn.Module, x: torch.Tensor, y: torch.Tensor, precision: str = "auto", *,
                     tolerance: float = AUTOCAST_TOLERANCE, check_on_cpu: bool = False,
                     n_check: int = 2048) -> tuple[str, float | None]:
    """Resolve `precision` to "fp32" or "bf16"; also return the measured autocast error.

    "auto" uses bf16 autocast only on CUDA (CPU bf16 is rarely faster; `check_on_cpu`
    applies the same rule there) and only if it changes the loss on the first `n_check`
    examples by less than `tolerance` relative.
    """
    check_precision(precision)
    check_number("tolerance", tolerance, low_open=True)
    if precision == "fp32":
        return "fp32", None
    if precision == "auto" and model_device(model).type != "cuda" and not check_on_cpu:
        return "fp32", None
    err = autocast_error(model, x[:n_check], y[:n_check])
    if precision == "bf16":
        return "bf16", err
    return ("bf16" if err < tolerance else "fp32"), err


def _quiet(fn: Callable, *args: Any) -> Any:
    """Call under vmap without functorch's per-op "performance drop" warnings (e.g. for
    adaptive_avg_pool2d's as_strided_, a tiny op that the fallback loops over points)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="There is a performance drop")
        return fn(*args)


# --- the engine -------------------------------------------------------------------------------


class Engine:
    """Evaluates the model at theta* + sum_i c_i d_i for groups of coefficient vectors c.

    The model must be in eval mode while the engine runs (`compute_surface` guards it).
    """

    def __init__(self, model: nn.Module, directions: Directions, *, batch_size: int,
                 points_per_forward: int, precision: str, channels_last: bool,
                 fold_bn: bool, bn_mode: str, bn_x: torch.Tensor | None, bn_batch_size: int):
        self.model = model
        self.device = model_device(model)
        self.batch_size, self.precision = batch_size, precision
        self.points_per_forward = 1 if bn_mode == "recalibrate" else points_per_forward
        self.channels_last, self.bn_mode, self.bn_batch_size = channels_last, bn_mode, bn_batch_size
        self.bn_x = bn_x
        center = {k: v.detach() for k, v in perturbable_state(model).items()}
        self.center = center
        vectors = [dict(d) for d in directions.to(self.device).vectors]
        keys = [k for k in center if any(k in d and bool(d[k].any()) for d in vectors)]
        self.bn_modules = [(n, m) for n, m in model.named_modules()
                           if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
        self.variance_keys = {f"{n}.running_var" for n, _ in self.bn_modules}
        self.pairs = conv_bn_pairs(model) if fold_bn else []
        self.exec_module = folded_copy(model, self.pairs).eval() if self.pairs else model
        # When no folded BatchNorm entry is perturbed, folding is linear in the conv weights:
        # fold theta* and the directions once (W s + alpha d1 s + ...), nothing per point.
        # Otherwise (BN parameters included, interpolated statistics) fold at every point.
        bn_entries = {f"{bn}.{e}" for _, bn in self.pairs for e in ("weight", "bias", "running_mean", "running_var")}
        self.static_fold = bool(self.pairs) and not (bn_entries & set(keys))
        if self.static_fold:
            self.center = center = self._fold_statically(center, vectors)
        self._flatten(center, vectors, keys)
        self._drop_prefixes = tuple(f"{bn}." for _, bn in self.pairs)

    def _fold_statically(self, center: dict[str, torch.Tensor], vectors: list[dict[str, torch.Tensor]]
                         ) -> dict[str, torch.Tensor]:
        """theta* and the directions with every folded BatchNorm's scale applied to its conv."""
        center = dict(center)
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
        return center

    def _flatten(self, center: dict[str, torch.Tensor], vectors: list[dict[str, torch.Tensor]],
                 keys: list[str]) -> None:
        """One flat buffer for theta* and one row per direction: a point's weights are one addmm,
        and every tensor of the state is a view (channels_last-strided for 4-D weights on CUDA)."""
        self.layout = []
        offset = 0
        for k in keys:
            self.layout.append((k, offset, tuple(center[k].shape), center[k].dtype))
            offset += center[k].numel()
        if not keys:
            self.center_flat = torch.zeros(0, device=self.device)
            self.dir_flat = torch.zeros(len(vectors), 0, device=self.device)
            return
        dtype = torch.promote_types(torch.float32, center[keys[0]].dtype)
        self.center_flat = torch.cat([self._flat(center[k]) for k in keys]).to(dtype)
        self.dir_flat = torch.stack([
            torch.cat([self._flat(d[k]) if k in d else self._flat(torch.zeros_like(center[k])) for k in keys])
            for d in vectors]).to(dtype)

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
            chunk = flat[:, off:off + math.prod(shape)]
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
            out[f"{conv_name}.weight"] = get(f"{conv_name}.weight") * scale[..., None, None, None]
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
        for s in chunks(len(y), batch_size or self.batch_size):
            yield x[s], y[s]

    def recalibrate(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Recompute BatchNorm running statistics at this point on `bn_x` (cumulative average
        over batches, momentum=None, as torch.optim.swa_utils.update_bn)."""
        fresh = {}
        for name, m in self.bn_modules:
            fresh[f"{name}.running_mean"] = torch.zeros_like(m.running_mean)
            fresh[f"{name}.running_var"] = torch.ones_like(m.running_var)
            fresh[f"{name}.num_batches_tracked"] = torch.zeros_like(m.num_batches_tracked)
        full = {**state, **fresh}
        with contextlib.ExitStack() as restore, torch.no_grad():
            for _, m in self.bn_modules:  # only the BatchNorms train; dropout etc. stay in eval mode
                restore.enter_context(train_mode(m, True))
                restore.callback(setattr, m, "momentum", m.momentum)
                m.momentum = None
            for s in chunks(len(self.bn_x), self.bn_batch_size):
                functional_call(self.model, full, (self.bn_x[s],))
        return full

    def fixed(self, coeffs: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed loss and number correct at P points on fixed inputs (device tensors, no sync)."""
        p = coeffs.shape[0]
        loss = torch.zeros(p, dtype=torch.float64, device=self.device)
        correct = torch.zeros(p, dtype=torch.int64, device=self.device)
        stacked = self.perturbed(coeffs)
        with torch.no_grad():
            if self.bn_mode == "recalibrate" or p == 1:
                state = {k: v[0] for k, v in stacked.items()}
                state = self.recalibrate(state) if self.bn_mode == "recalibrate" else state
                run = lambda xb: self.forward(state, xb)[None]  # noqa: E731
            else:
                batched = vmap(self.forward, in_dims=(0, None))
                run = lambda xb: _quiet(batched, stacked, xb)  # noqa: E731
            for xb, yb in self.batches(x, y):
                with autocast(self.device, self.precision):
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
            module = WithParams(self.exec_module, state, forward=self.forward)
            with eval_mode(module):
                for xb, yb in self.batches(x, y, attack_batch_size):
                    x_adv = attack(module, xb, yb).detach()
                    with torch.no_grad(), autocast(self.device, self.precision):
                        logits = self.forward(state, x_adv).float()
                    loss[j] += F.cross_entropy(logits, yb, reduction="sum").double()
                    correct[j] += (logits.argmax(-1) == yb).sum()
        return loss, correct
