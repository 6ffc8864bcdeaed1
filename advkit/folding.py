"""Eval-mode BatchNorm folded into the preceding convolution: y = s (W x + b) + t = (s W) x + (s b + t).

Shared by the landscape engine (fewer kernels per grid point) and the attacks (fewer kernels per
PGD step); `fold_batchnorm` gives a folded eval-mode copy whose outputs equal the model's up to
float rounding.
"""

from __future__ import annotations

import copy
from collections import Counter

import torch
from torch import nn


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


def folded_copy(model: nn.Module, pairs: list[tuple[str, str]]) -> nn.Module:
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


@torch.no_grad()
def fold_batchnorm(model: nn.Module) -> nn.Module:
    """An eval-mode copy of `model` with every foldable BatchNorm merged into its convolution
    (W' = W s, b' = b s + t with s = gamma / sqrt(var + eps), t = beta - mean s); parameters
    frozen. Same outputs as `model.eval()` up to float rounding, one kernel fewer per pair."""
    pairs = conv_bn_pairs(model)
    folded = folded_copy(model, pairs).eval().requires_grad_(False)
    fold_into(folded, model, pairs)
    return folded


@torch.no_grad()
def fold_into(folded: nn.Module, model: nn.Module, pairs: list[tuple[str, str]]) -> None:
    """Set the folded convs of `folded` (a `folded_copy`) from `model`'s convs and BatchNorm
    statistics, in place: W' = W s, b' = b s + t (also refreshes a copy after `model` changed)."""
    for conv_name, bn_name in pairs:
        bn, src, conv = model.get_submodule(bn_name), model.get_submodule(conv_name), folded.get_submodule(conv_name)
        scale = torch.rsqrt(bn.running_var + bn.eps)
        shift = -bn.running_mean * scale
        if bn.affine:
            scale, shift = scale * bn.weight, shift * bn.weight + bn.bias
        conv.weight.copy_(src.weight * scale.to(conv.weight.dtype)[:, None, None, None])
        bias = torch.zeros_like(conv.bias) if src.bias is None else src.bias
        conv.bias.copy_((bias * scale + shift).to(conv.bias.dtype))
