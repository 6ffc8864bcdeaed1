"""Model checkpoints: weights with their architecture and training config, loaded safely.

A checkpoint is untrusted input: it is loaded with `torch.load(weights_only=True)` after its
checksum is verified, and the architecture it asks for is bounded (`check_model_spec`) before
anything is allocated. `advkit.runs.run` re-exports these names.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from advkit.runs.artifacts import atomic_path, verified, writer_hint


def save_model(path: str | Path, model: nn.Module, config: dict[str, Any] | None = None,
               **extra: Any) -> Path:
    """Save weights with the architecture (from `get_model`) and the training config.

    `extra` entries (metrics, epoch, ...) must be plain Python values or tensors, so the
    file loads with `weights_only=True`.
    """
    spec = getattr(model, "advkit_spec", None)
    if spec is None:
        raise ValueError("model was not built by advkit.models.get_model: its architecture is unknown")
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    payload = {"arch": spec["arch"], "spec": spec, "config": dict(config or {}), "state_dict": state, **extra}
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return path


def load_torch(path: str | Path, map_location: str | torch.device = "cpu") -> Any:
    """`torch.load(weights_only=True)` of a file the kit wrote, checksum verified first; an
    unreadable file is a ValueError naming it and what to do."""
    path = verified(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises several types for truncated/corrupt files
        raise ValueError(f"{path} is not a readable advkit checkpoint (corrupt or truncated?): {err}. "
                         f"Delete it and {writer_hint(path)}.") from err


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint with `weights_only=True`; a clear error names a missing or corrupt file."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}: {writer_hint(path)}")
    payload = load_torch(path, map_location)
    if not isinstance(payload, dict) or "state_dict" not in payload or "arch" not in payload:
        raise ValueError(f"{path} is not an advkit checkpoint (missing 'arch' or 'state_dict')")
    return payload


# What a checkpoint's architecture spec may ask for: a file is untrusted input, and a spec
# such as width=40000 would otherwise allocate ~115 GB before load_state_dict could object.
SPEC_LIMITS = {"num_classes": (1, 100_000), "in_channels": (1, 64), "width": (1, 4096)}
MAX_PARAMETERS = 200_000_000  # PreAct ResNet-18 has 11.2 M, ResNet-32 0.46 M


def check_model_spec(spec: Any, source: str | Path = "spec") -> dict[str, Any]:
    """Check an architecture spec read from a file before building it: a registered `arch`,
    known constructor arguments within `SPEC_LIMITS`, and at most `MAX_PARAMETERS` parameters
    (counted on the meta device, which allocates nothing). Returns the spec with defaults."""
    from advkit.models import MODELS, get_model

    if not isinstance(spec, dict):
        raise ValueError(f"{source}: the architecture spec must be a mapping, got {type(spec).__name__}")
    arch = spec.get("arch")
    if arch not in MODELS:
        raise ValueError(f"{source}: arch={arch!r} is not a registered model; allowed: {sorted(MODELS)}")
    kwargs = spec.get("model_kwargs") or {}
    if not isinstance(kwargs, dict) or set(kwargs) - {"width", "mean", "std"}:
        raise ValueError(f"{source}: model_kwargs={kwargs!r}; allowed keys: ['mean', 'std', 'width']")
    full = {"num_classes": spec.get("num_classes", 10), "in_channels": spec.get("in_channels", 3), **kwargs}
    for key, (low, high) in SPEC_LIMITS.items():
        value = full.get(key)
        if key in full and (not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high):
            raise ValueError(f"{source}: {key}={value!r} is out of range; allowed: integers {low}..{high}")
    for key in ("mean", "std"):
        value = full.get(key)
        if value is not None and (not isinstance(value, (list, tuple)) or not 1 <= len(value) <= full["in_channels"]
                                  or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                             and math.isfinite(v) and (key == "mean" or v > 0) for v in value)):
            allowed = "finite numbers" if key == "mean" else "positive finite numbers (the images are divided by them)"
            raise ValueError(f"{source}: {key}={value!r}; allowed: None or one number per input channel, {allowed}")
    try:
        with torch.device("meta"):
            n = sum(p.numel() for p in get_model(arch, full["num_classes"], full["in_channels"], **kwargs).parameters())
    except (TypeError, ValueError) as err:
        raise ValueError(f"{source}: the architecture spec {spec!r} cannot be built: {err}") from err
    if n > MAX_PARAMETERS:
        raise ValueError(f"{source}: the architecture spec asks for a {arch!r} with {n:,} parameters; "
                         f"at most {MAX_PARAMETERS:,} are allowed (spec {spec!r})")
    return {"arch": arch, "num_classes": full["num_classes"], "in_channels": full["in_channels"],
            "model_kwargs": kwargs}


def load_model(path: str | Path, arch: str | None = None, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a model saved by `save_model` (in eval mode); `arch`, if given, must match the file.

    The file's checksum is verified and its architecture spec bounded (`check_model_spec`)
    before the model is built."""
    from advkit.models import check_finite_weights, get_model

    payload = load_checkpoint(path)
    if arch is not None and arch != payload["arch"]:
        raise ValueError(f"{path} holds a {payload['arch']!r} model, not the requested {arch!r}")
    spec = payload.get("spec") or {}
    if isinstance(spec, dict) and spec.get("arch", payload["arch"]) != payload["arch"]:
        raise ValueError(f"{path}: its 'arch' ({payload['arch']!r}) and its spec's ({spec['arch']!r}) differ")
    spec = check_model_spec({**spec, "arch": payload["arch"]} if isinstance(spec, dict) else spec, path)
    model = get_model(spec["arch"], spec["num_classes"], spec["in_channels"], **spec["model_kwargs"])
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as err:
        raise ValueError(f"{path}: weights do not fit architecture {payload['arch']!r}: {err}") from err
    check_finite_weights(model, path)
    return model.to(device).eval()
