"""The model as an attack runs it: BatchNorm folded, torch.compile'd, its first output checked.

`forward_fn(model, compile, fold_bn)` gives the callable an attack differentiates: `model`
itself, or its eval-mode copy with BatchNorm folded into the convolutions (`advkit.folding`;
one kernel instead of conv + BN, forward and backward), optionally through `torch.compile`.
Both are cached per model; the folded copy is refreshed in place whenever a parameter or buffer
of the model changed since (in-place updates bump `tensor._version`, a new tensor has a new
`data_ptr`: optimizers, `load_state_dict`, `.to()`, and training-mode BatchNorm through its
`num_batches_tracked`; a change through `.data` is not seen); under bf16 autocast a sibling
with bf16 conv/linear weights saves autocast's weight casts. `CheckedForward`
checks the attack's first forward (logit shape, finite logits, labels in range) with one host
sync, so an attack needs no extra forward for its checks. The speed options of every attack are
one `AttackRuntime`, given to attacks with the model: `attack(attack_model(model, runtime), x, y)`.
"""

from __future__ import annotations

import copy
import math
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field, fields

import torch
from torch import nn

from advkit._checks import check_choice
from advkit._torch import (
    CompiledOrEager,
    Forward,
    WithParams,
    check_precision,
    gpu_policy,
    model_device,
    resolve_precision,
)
from advkit.folding import conv_bn_pairs, fold_batchnorm, fold_into

COMPILE_MODES = (False, True, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
"""`compile`: False (eager), True (= "default"), or a torch.compile mode; "reduce-overhead" adds
CUDA graphs on CUDA (on CPU it compiles without them)."""


def resolve_fold_bn(fold_bn: bool | None, device: torch.device) -> bool:
    """None: fold under the GPU policy only (`gpu_policy`: on CUDA; CPU results stay those of the
    plain model); True/False force."""
    if fold_bn is not None and not isinstance(fold_bn, bool):
        raise ValueError(f"fold_bn must be None, True or False, got {fold_bn!r}")
    return gpu_policy(device) if fold_bn is None else fold_bn


@dataclass(frozen=True)
class AttackRuntime:
    """How an attack runs the model, never what it computes (up to float rounding): `precision`
    ("auto": bf16 autocast on CUDA, fp32 elsewhere; "bf16"; "fp32"), `channels_last` inputs (None:
    under the GPU policy), `compile` (see COMPILE_MODES) and `fold_bn` (see `resolve_fold_bn`).
    The defaults are every attack's defaults."""

    precision: str = "auto"
    channels_last: bool | None = None
    compile: bool | str = False
    fold_bn: bool | None = None

    def __post_init__(self) -> None:
        check_precision(self.precision)
        check_choice("compile", self.compile, COMPILE_MODES)
        if self.fold_bn is not None and not isinstance(self.fold_bn, bool):
            raise ValueError(f"fold_bn must be None, True or False, got {self.fold_bn!r}")
        if self.channels_last is not None and not isinstance(self.channels_last, bool):
            raise ValueError(f"channels_last must be None, True or False, got {self.channels_last!r}")


class AttackModel(nn.Module):
    """`module` with the `AttackRuntime` the attacks run it with (`attack_model`); its forward is
    the module's own, so anything else that calls it sees the plain model."""

    def __init__(self, module: nn.Module, runtime: AttackRuntime):
        super().__init__()
        self.module, self.runtime = module, runtime

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)


def attack_model(model: nn.Module, runtime: AttackRuntime | None = None, **options) -> AttackModel:
    """`model` as attacks run it: `runtime` (or AttackRuntime(**options)) replaces the one `model`
    already carries. Every attack takes it as its model: attack(attack_model(model, runtime), x, y)."""
    module, base = split_attack_model(model)
    if runtime is not None and options:
        raise ValueError("give either runtime or its options, not both")
    if runtime is not None and not isinstance(runtime, AttackRuntime):
        raise ValueError(f"runtime must be an AttackRuntime, got {type(runtime).__name__}")
    if options:
        unknown = sorted(set(options) - {f.name for f in fields(AttackRuntime)})
        if unknown:
            raise ValueError(f"unknown runtime options {unknown}; AttackRuntime takes "
                             f"{[f.name for f in fields(AttackRuntime)]}")
        runtime = AttackRuntime(**{**base.__dict__, **options})
    return AttackModel(module, runtime or base)


def split_attack_model(model: nn.Module) -> tuple[nn.Module, AttackRuntime]:
    """(the plain model, its `AttackRuntime`): the defaults for a model not made by `attack_model`."""
    if isinstance(model, AttackModel):
        return model.module, model.runtime
    return model, AttackRuntime()


# --- the folded copy, cached per model ----------------------------------------------------------


@dataclass(eq=False)
class _Folded:
    structure: tuple  # (name, shape, dtype, device) of every parameter and buffer
    module: nn.Module | None  # None: nothing to fold
    pairs: list[tuple[str, str]]
    state: tuple = ()  # (data_ptr, _version) of every parameter and buffer at the last refresh
    seen: tuple = ()  # the same at the last call
    alive: list = field(default_factory=list)  # holds the storages of both: no address reuse
    low: nn.Module | None = None  # the copy with bf16 conv/linear weights (`_bf16_weights`)
    low_state: tuple = ()  # `state` when `low` was last refreshed


_folded: "weakref.WeakKeyDictionary[nn.Module, _Folded]" = weakref.WeakKeyDictionary()


def _tensors(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return list(model.named_parameters()) + list(model.named_buffers())


@torch.no_grad()
def _refresh(entry: _Folded, model: nn.Module) -> None:
    """Copy every tensor the folded copy shares with `model`, then refold its convs."""
    source = dict(_tensors(model))
    pairs = [(t, source[name]) for name, t in _tensors(entry.module) if name in source]
    torch._foreach_copy_([t for t, _ in pairs], [s for _, s in pairs])
    fold_into(entry.module, model, entry.pairs)


@torch.no_grad()
def _same_outputs(model: nn.Module, folded: nn.Module, probe: torch.Tensor) -> bool | None:
    """Whether the folded copy computes the model's logits on `probe` (fp32, up to rounding); a
    wrapper that feeds its convs other weights than its own (torch.func.functional_call) does not.
    None when the model's own logits are not finite (undecided; the attack's check reports it)."""
    with torch.autocast(probe.device.type, enabled=False):
        a, b = model(probe).float(), folded(probe).float()
    scale = float(a.abs().max()) if a.numel() else 0.0
    if not math.isfinite(scale):
        return None
    return a.shape == b.shape and bool(torch.allclose(a, b, rtol=1e-3, atol=1e-3 * (1 + scale)))


def folded_model(model: nn.Module, probe: torch.Tensor | None = None, lazy: bool = False,
                 bf16_weights: bool = False) -> nn.Module:
    """`model` with its BatchNorms folded (`advkit.folding.fold_batchnorm`), cached and kept in
    step with the model's current weights and statistics; `model` itself when nothing folds, when
    one of its BatchNorms is in training mode, for `WithParams` (whose weights live outside it),
    and when the copy's outputs on `probe` (a few finite images, checked once per copy) differ.
    lazy: when the weights changed since the last call, return `model` and refresh the copy only
    when they stay the same for a second call (a training loop, whose weights change before every
    call, then never pays for refreshes; an evaluation over batches refreshes once).
    bf16_weights: the folded copy's bf16 sibling for bf16 autocast (`_bf16_weights`)."""
    if isinstance(model, WithParams):
        return model
    named = _tensors(model)
    structure = tuple((n, t.shape, t.dtype, t.device) for n, t in named)
    entry = _folded.get(model)
    if entry is None or entry.structure != structure:
        pairs = conv_bn_pairs(model)
        folded = fold_batchnorm(model) if pairs else None
        same = True if folded is None or probe is None else _same_outputs(model, folded, probe)
        if same is None:
            return model
        folded = folded if same else None
        if folded is not None:  # its compilations live on it: no cycle through the weak cache below
            folded.__dict__["_attack_compiled"] = {}
        entry = _Folded(structure, folded, pairs)
        _folded[model] = entry
    if entry.module is None or any(model.get_submodule(bn).training for _, bn in entry.pairs):
        return model
    state = tuple((t.data_ptr(), t._version) for _, t in named)
    if state != entry.state:
        if entry.state and lazy and state != entry.seen:
            entry.seen, entry.alive = state, entry.alive[:1] + [[t.detach() for _, t in named]]
            return model
        if entry.state:  # built from these tensors at the first call, refreshed at later changes
            _refresh(entry, model)
        entry.state = entry.seen = state
        entry.alive = [[t.detach() for _, t in named]]
    return _bf16_weights(entry) if bf16_weights else entry.module


LOW_PRECISION_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


@torch.no_grad()
def _bf16_weights(entry: _Folded) -> nn.Module:
    """The folded copy with the weights and biases of its convolutions and linear layers stored in
    bf16: what bf16 autocast casts them to at every forward (the same numbers), without the cast
    kernels (two per folded conv). Built once, refreshed from the fp32 copy after its refreshes."""
    if entry.low is None:
        compiled_fns = entry.module.__dict__.pop("_attack_compiled")
        try:
            low = copy.deepcopy(entry.module)
        finally:
            entry.module.__dict__["_attack_compiled"] = compiled_fns
        low.__dict__["_attack_compiled"] = {}
        for m in low.modules():
            if type(m) in LOW_PRECISION_LAYERS and m.weight.dtype == torch.float32:  # what autocast casts
                m.to(torch.bfloat16)
        entry.low, entry.low_state = low, entry.state
    elif entry.low_state != entry.state:
        torch._foreach_copy_([t for _, t in _tensors(entry.low)], [t for _, t in _tensors(entry.module)])
        entry.low_state = entry.state
    return entry.low


# --- torch.compile, cached per (module, mode) -----------------------------------------------------

_compiled: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def compiled(module: nn.Module, compile: bool | str = True) -> Callable[[torch.Tensor], torch.Tensor]:
    """`torch.compile(module, mode=...)`, cached per module and mode (shares its parameters); a
    folded copy keeps its own (a compiled module holds its module, so a weak-key entry for it would
    never be freed: the models given to attacks stay cached for the session, as before). Where the
    compilation fails the module runs eagerly, with one warning (`CompiledOrEager`)."""
    check_choice("compile", compile, COMPILE_MODES)
    mode = "default" if compile is True else compile
    cache = module.__dict__.get("_attack_compiled")
    if cache is None:
        cache = _compiled.setdefault(module, {})
    if mode not in cache:
        cache[mode] = CompiledOrEager(module, mode=None if mode == "default" else mode)
    return cache[mode]


def forward_fn(model: nn.Module, compile: bool | str = False, fold_bn: bool | None = False,
               probe: torch.Tensor | None = None, precision: str | None = None) -> Forward:
    """The callable an attack differentiates: `model`, its BatchNorm-folded copy (`fold_bn`:
    True; None: under the GPU policy, lazily, see `folded_model`, which checks a new copy on `probe`, the
    attack's first images; eval-mode models only; with bf16 `precision` its copy with bf16
    conv/linear weights), each optionally `torch.compile`d (`compile`: see COMPILE_MODES).
    All are cached per model."""
    check_choice("compile", compile, COMPILE_MODES)
    device = probe.device if probe is not None else model_device(model)
    module = model
    if resolve_fold_bn(fold_bn, device):
        bf16 = precision is not None and resolve_precision(precision, device) == "bf16"
        module = folded_model(model, probe, lazy=fold_bn is None, bf16_weights=bf16)
    return compiled(module, compile) if compile is not False else module


# --- the first forward checks the model's output ----------------------------------------------------


def check_logits(logits: torch.Tensor, y: torch.Tensor) -> None:
    """The model must give finite logits of shape (N, K) (NaN weights would otherwise reach the
    attack's arithmetic) and y must be class indices in [0, K). One host sync."""
    if not isinstance(logits, torch.Tensor):
        raise ValueError(f"the model must return a tensor of logits (N, K), got a {type(logits).__name__}: "
                         "wrap a model with several outputs in one that returns the logits")
    if logits.dim() != 2:
        raise ValueError(f"the model must return logits of shape (N, K), got {tuple(logits.shape)}")
    k = logits.shape[1]
    bad_logits, bad_labels = (~torch.isfinite(logits.detach())).any(), ((y < 0) | (y >= k)).any()
    if bool(bad_logits | bad_labels):  # the sync; the messages below are the error path only
        if bool(bad_logits):
            raise ValueError("the model returned non-finite logits (NaN or inf) on the attack's input: "
                             "check its weights (e.g. a diverged training run)")
        wrong = y[(y < 0) | (y >= k)].unique()[:5].tolist()
        raise ValueError(f"y must be class indices in [0, {k - 1}] for a model with {k} outputs, got {wrong}")


class CheckedForward:
    """`forward` whose first call checks its output with `check_logits` (before any loss sees
    the labels), later calls pass through: the attack's own first forward serves as the check."""

    def __init__(self, forward: Forward, y: torch.Tensor):
        self.forward, self.y = forward, y

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.forward(x)
        if self.y is not None:
            y, self.y = self.y, None
            check_logits(logits, y)
        return logits
