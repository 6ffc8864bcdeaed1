"""The batched evaluator of a surface: the model at theta* + sum_i c_i d_i for many points c.

Every point runs through `torch.func.functional_call` on device-resident data (no weights
copied into the module, no DataLoader); all weights live in one flat buffer, so a point's
weights are one fused multiply-add, passed as views; several points per forward with `vmap`
when asked; eval-mode BatchNorm folded into the preceding convolution; the per-point forward
`torch.compile`d when asked. The precision is chosen per surface by `advkit.landscape.precision`.
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

from advkit._torch import Attack, CompiledOrEager, WithParams, autocast, chunks, eval_mode, model_device, train_mode
from advkit.folding import conv_bn_pairs, folded_copy
from advkit.landscape.directions import Directions, perturbable_state
from advkit.landscape.robust import ATTACK_EXAMPLES_PER_CALL, PointsModule, attack_points, on_copies


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
                 fold_bn: bool, bn_mode: str, bn_x: torch.Tensor | None, bn_batch_size: int,
                 compile: bool = False):
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
        self.compile = compile
        self._many = vmap(self.forward, in_dims=(0, None))  # P points: stacked weights, shared images
        # compile=True: the 1-point forward and the vmapped P-point forward, each its own graph
        # (dynamic=False: one graph per batch shape and precision, recompiled on a new one)
        # (eager where compiling fails: `CompiledOrEager`)
        self._compiled = ((CompiledOrEager(self.forward, dynamic=False), CompiledOrEager(self._many, dynamic=False))
                          if compile else None)

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
        and every tensor of the state is a view (channels_last-strided for 4-D weights with channels_last)."""
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

    def fixed(self, coeffs: torch.Tensor, x: torch.Tensor, y: torch.Tensor, *, precision: str | None = None,
              compiled: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed loss and number correct at P points on fixed inputs (device tensors, no sync);
        `precision` overrides the engine's, `compiled=False` skips the compiled forward."""
        p = coeffs.shape[0]
        precision = precision or self.precision
        one, many = self._compiled if compiled and self._compiled else (self.forward, self._many)
        loss = torch.zeros(p, dtype=torch.float64, device=self.device)
        correct = torch.zeros(p, dtype=torch.int64, device=self.device)
        stacked = self.perturbed(coeffs)
        with torch.no_grad():
            if self.bn_mode == "recalibrate" or p == 1:
                state = {k: v[0] for k, v in stacked.items()}
                state = self.recalibrate(state) if self.bn_mode == "recalibrate" else state
                run = lambda xb: one(state, xb)[None]  # noqa: E731
            else:
                run = lambda xb: _quiet(many, stacked, xb)  # noqa: E731
            for xb, yb in self.batches(x, y):
                with autocast(self.device, precision):
                    logits = run(xb)
                logits = logits.float()
                ce = F.cross_entropy(logits.flatten(0, 1), yb.repeat(p), reduction="none")
                loss += ce.view(p, -1).sum(1, dtype=torch.float64)
                correct += (logits.argmax(-1) == yb).sum(1)
        return loss, correct

    def attacked(self, coeffs: torch.Tensor, x: torch.Tensor, y: torch.Tensor, attack: Attack,
                 attack_batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed robust loss and number correct, the attack re-run at each point (Stutz et al.);
        the P points in one attack call on P copies of each batch when the attack has a version on copies
        (`advkit.landscape.robust`; BatchNorm recalibration keeps one point at a time)."""
        p = coeffs.shape[0]
        loss = torch.zeros(p, dtype=torch.float64, device=self.device)
        correct = torch.zeros(p, dtype=torch.int64, device=self.device)
        with torch.no_grad():
            stacked = self.perturbed(coeffs)
        if p > 1 and self.bn_mode != "recalibrate" and on_copies(attack) is not None:
            # At most ATTACK_EXAMPLES_PER_CALL examples with input gradients per call: the points
            # go in sub-groups (each copy's result is its point's own, so grouping changes nothing).
            q = max(1, ATTACK_EXAMPLES_PER_CALL // min(attack_batch_size, max(len(y), 1)))
            for g in range(0, p, q):
                part = slice(g, min(g + q, p))
                n = part.stop - part.start
                module = PointsModule(self.exec_module, {k: v[part] for k, v in stacked.items()}, n, self.forward)
                with eval_mode(module):
                    for xb, yb in self.batches(x, y, attack_batch_size):
                        x_adv = attack_points(attack, module, xb, yb).flatten(0, 1)
                        with torch.no_grad(), autocast(self.device, self.precision):
                            logits = module(x_adv).float().unflatten(0, (n, -1))
                        ce = F.cross_entropy(logits.flatten(0, 1), yb.repeat(n), reduction="none")
                        loss[part] += ce.view(n, -1).sum(1, dtype=torch.float64)
                        correct[part] += (logits.argmax(-1) == yb).sum(1)
            return loss, correct
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
