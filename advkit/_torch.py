"""The plumbing every module shares: argument checks, the train/eval mode guard, devices,
seeded generators, chunking, the one precision vocabulary, the one loss-and-accuracy loop and
the one content hash of a set of tensors.

Internal: the public modules re-export what users need. Every check takes `(name, value, ...)`
and raises `ValueError` naming the parameter, before any long computation starts.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from advkit._checks import check_choice, check_int

Forward = Callable[[torch.Tensor], torch.Tensor]
"""A model or any callable with its signature: images (N, C, H, W) in [0, 1] -> logits (N, K)."""
Attack = Callable[..., torch.Tensor]
"""attack(model, x, y, **budget) -> x_adv, the call shape of every attack in `advkit.attacks`."""
PerExampleLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""loss(logits, y) -> per-example loss (N,), to be averaged over a dataset."""

PRECISIONS = ("auto", "bf16", "tf32", "fp32")
"""The one precision vocabulary: "auto" = bf16 autocast on CUDA (`gpu_policy`) and fp32 elsewhere (surfaces
refine it by measuring the error at their own points, `advkit.landscape.precision.choose_surface_precision`),
"bf16" (autocast), "tf32" (fp32 tensors, TF32 convolutions and matmuls on CUDA; fp32 elsewhere,
CPUs have no TF32) and "fp32" (strict: TF32 switched off on CUDA)."""


# --- argument checks: one family, one order (name, value, ...) ---------------------------------


def check_precision(precision: Any) -> None:
    check_choice("precision", precision, PRECISIONS)


# --- the model: mode, device, precision --------------------------------------------------------


@contextlib.contextmanager
def train_mode(model: nn.Module, training: bool) -> Iterator[nn.Module]:
    """`model.train(training)` for the block; every submodule's own flag is restored afterwards,
    also when the block raises (a frozen BatchNorm inside a training model stays frozen)."""
    flags = [(m, m.training) for m in model.modules()]
    model.train(training)
    try:
        yield model
    finally:
        for m, flag in flags:
            m.training = flag


def eval_mode(model: nn.Module) -> contextlib.AbstractContextManager[nn.Module]:
    """Eval mode (BatchNorm on running statistics, dropout off) for the block, flags restored."""
    return train_mode(model, False)


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (or buffer); CPU for a stateless module."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


GPU_POLICY_ENV = "ADVKIT_GPU_POLICY"
"""Set to 1, every device takes the choices made for CUDA (`gpu_policy`): CI runs the GPU paths on its CPU."""


def gpu_policy(device: torch.device | str) -> bool:
    """Whether the speed choices made for a GPU apply on `device` (several points per forward,
    BatchNorm folding, channels_last, bf16 "auto", the precision probe, batched robust copies and
    Hessian blocks, fused optimizers): on CUDA, and on any device while ADVKIT_GPU_POLICY=1."""
    return torch.device(device).type == "cuda" or os.environ.get(GPU_POLICY_ENV, "") == "1"


def resolve_precision(precision: str, device: torch.device) -> str:
    """"bf16", "tf32" or "fp32": "auto" is bf16 under the GPU policy (fast, accurate enough for
    attacks and training) and fp32 elsewhere (bf16 is slow on most CPUs); "tf32" is fp32 off CUDA."""
    check_precision(precision)
    if precision == "auto":
        return "bf16" if gpu_policy(device) else "fp32"
    return "fp32" if precision == "tf32" and torch.device(device).type != "cuda" else precision


def autocast(device: torch.device, precision: str = "auto") -> contextlib.AbstractContextManager:
    """The autocast context for `precision` on `device`: bf16 autocast, or for "fp32"/"tf32"
    autocast switched off (so they also hold inside a caller's bf16 region); on CUDA "fp32" also
    switches TF32 off for the block (strict fp32, not cuDNN's TF32 default) and "tf32" on."""
    device = torch.device(device)
    resolved = resolve_precision(precision, device)
    if resolved == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if device.type != "cuda":
        return torch.autocast(device.type, enabled=False)
    return _no_autocast_tf32(device, allow_tf32=resolved == "tf32")


@contextlib.contextmanager
def _no_autocast_tf32(device: torch.device, *, allow_tf32: bool) -> Iterator[None]:
    """Autocast off and TF32 convolutions/matmuls allowed or not for the block, flags restored
    (the legacy `allow_tf32` flags, which torch's inductor reads too)."""
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    saved = cudnn.allow_tf32, matmul.allow_tf32
    cudnn.allow_tf32 = matmul.allow_tf32 = allow_tf32
    try:
        with torch.autocast(device.type, enabled=False):
            yield
    finally:
        cudnn.allow_tf32, matmul.allow_tf32 = saved


_COMPILE_WARNED: set[str] = set()


def _compile_errors() -> tuple[type[BaseException], ...]:
    """What a failing torch.compile backend raises at the first call of a new graph (an inductor C++
    build that cannot target the CPU, e.g. "'at::vec' has not been declared" under a generic ATen)."""
    from torch._dynamo.exc import BackendCompilerFailed
    from torch._inductor.exc import CppCompileError
    return BackendCompilerFailed, CppCompileError


class CompiledOrEager(nn.Module):
    """`torch.compile(fn, **options)` that runs `fn` itself from the first call whose compilation
    fails, with one warning naming the cause: compile=True speeds a run up where it can, never stops it.

    A module `fn` is a submodule (its parameters, mode and device are this module's), as with
    torch.compile's own wrapper; `failure` is the cause once it fell back, else None."""

    def __init__(self, fn: Callable[..., Any], **options: Any):
        super().__init__()
        self.eager = fn
        self.__dict__["compiled"] = torch.compile(fn, **options)  # not a submodule: fn's parameters once
        self.failure: str | None = None

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.failure is None:
            try:
                return self.compiled(*args, **kwargs)
            except _compile_errors() as err:
                lines = [line for line in str(err).splitlines() if line.strip()]
                cause = next((line.strip() for line in lines if "error:" in line), lines[0] if lines else "")
                self.failure = f"{type(err).__name__}: {cause[:300]}"
                if self.failure not in _COMPILE_WARNED:
                    _COMPILE_WARNED.add(self.failure)
                    warnings.warn(f"torch.compile failed, running eagerly instead ({self.failure})",
                                  RuntimeWarning, stacklevel=2)
        return self.eager(*args, **kwargs)


class WithParams(nn.Module):
    """`model` seen through substituted parameters (`torch.func.functional_call`), as a module:
    what an attack callable receives at perturbed weights; the caller's model is never modified.

    `params` maps names (as in `model.named_parameters()`/buffers) to tensors; the rest stay
    the model's. `forward(params, x)` replaces the plain functional call (e.g. a landscape
    engine's batched forward). `model` is a submodule: mode and device follow it.
    """

    def __init__(self, model: nn.Module, params: dict[str, torch.Tensor],
                 forward: Callable[[dict[str, torch.Tensor], torch.Tensor], torch.Tensor] | None = None):
        super().__init__()
        self.model = model
        self.params = params
        self._forward = forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._forward is not None:
            return self._forward(self.params, x)
        return torch.func.functional_call(self.model, self.params, (x,))


# --- data plumbing --------------------------------------------------------------------------------


def to_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 images -> float32 in [0, 1] (float input is returned unchanged)."""
    return x.float().div_(255) if x.dtype == torch.uint8 else x


def chunks(n: int, batch_size: int) -> Iterator[slice]:
    """Consecutive slices of at most `batch_size` over range(n)."""
    for start in range(0, n, batch_size):
        yield slice(start, min(start + batch_size, n))


def make_generator(device: torch.device | str, seed: int | None = 0,
                   generator: torch.Generator | None = None) -> torch.Generator:
    """The caller's generator, or a fresh one seeded with `seed` on `device` (explicit randomness)."""
    if generator is not None:
        return generator
    if seed is None:
        raise ValueError("seed must be an integer when no generator is given (explicit randomness)")
    return torch.Generator(device=device).manual_seed(int(seed))


def tensors_hash(tensors: Iterable[tuple[str, torch.Tensor]]) -> str:
    """SHA-256 (first 16 hex digits) of named tensors' names, dtypes, shapes and bytes: the one
    content hash of weights, directions and caches (same values -> same hash, on any device)."""
    h = hashlib.sha256()
    for name, t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def state_hash(model: nn.Module) -> str:
    """Content hash of a model's state_dict (parameters and buffers)."""
    return tensors_hash(model.state_dict().items())


# --- the one loss-and-accuracy loop ---------------------------------------------------------------


class LossAccuracy(NamedTuple):
    loss: float
    accuracy: float


def cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-example cross-entropy in fp32, the default `PerExampleLoss`."""
    return F.cross_entropy(logits.float(), y, reduction="none")


def loss_and_accuracy(model: nn.Module | Forward, x: torch.Tensor, y: torch.Tensor, *,
                      batch_size: int = 1024, precision: str = "auto",
                      loss_fn: PerExampleLoss | None = None, attack: Attack | None = None,
                      mode_of: nn.Module | None = None) -> LossAccuracy:
    """Mean loss and top-1 accuracy over (x, y), in chunks of `batch_size`, in eval mode.

    x may be uint8 or float and live on any device: each chunk moves to the model's device.
    With `attack`, each chunk is first replaced by attack(model, x, y) (the robust loss and
    accuracy). `model` may be any forward callable; `mode_of` is then the module whose mode to
    guard and whose device to use (e.g. the model behind a `torch.func.functional_call`).
    Sums are accumulated on the device in fp64: one host sync at the end.
    """
    module = mode_of if mode_of is not None else model
    if not isinstance(module, nn.Module):
        raise ValueError("loss_and_accuracy needs an nn.Module, or mode_of= for a plain callable")
    check_int("batch_size", batch_size)
    if len(y) == 0:
        raise ValueError("loss_and_accuracy needs at least one example, got an empty dataset")
    loss_fn = loss_fn or cross_entropy
    device = model_device(module)
    total = torch.zeros((), device=device, dtype=torch.float64)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    with eval_mode(module):
        for s in chunks(len(y), batch_size):
            xb, yb = to_float(x[s].to(device)), y[s].to(device)
            if attack is not None:
                xb = attack(model, xb, yb).detach()
            with torch.no_grad(), autocast(device, precision):
                logits = model(xb)
            logits = logits.float()
            total += loss_fn(logits, yb).sum().double()
            correct += (logits.argmax(1) == yb).sum()
    return LossAccuracy(total.item() / len(y), correct.item() / len(y))
