"""Run directories, manifests, atomic artifact writes and model checkpoints.

A run directory holds every artifact of one pipeline run (see README, "Data flow");
notebooks find it through `run_dir`, never through the current directory, because
papermill and nbval start kernels in different folders.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import platform
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, is_dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from torch import nn


def repo_root() -> Path:
    """The repository (or installation) folder that holds `advkit/`, `notebooks/` and `runs/`."""
    return Path(__file__).resolve().parent.parent


def run_dir(name: str = "quick", create: bool = True) -> Path:
    """`$ADVKIT_RUNS_DIR/<name>` (default `runs/<name>` in the repository)."""
    root = Path(os.environ.get("ADVKIT_RUNS_DIR") or repo_root() / "runs")
    path = root / name
    if create:
        path.mkdir(parents=True, exist_ok=True)
    return path


def figures_dir() -> Path:
    """`$ADVKIT_FIGURES_DIR`, else `figures/` in the repository."""
    path = Path(os.environ.get("ADVKIT_FIGURES_DIR") or repo_root() / "figures")
    path.mkdir(parents=True, exist_ok=True)
    return path


def resolve_device(device: str = "auto") -> torch.device:
    """`auto`: CUDA when present, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ValueError(f"device={device!r}: choose 'auto', 'cpu', 'cuda' or 'cuda:N'")
    return torch.device(device)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; it replaces `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text)


def write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_jsonable) + "\n")


def _jsonable(obj: Any) -> Any:
    if is_dataclass(obj):
        return asdict(obj)
    if isinstance(obj, (Path, torch.device, torch.dtype)):
        return str(obj)
    if isinstance(obj, (set, tuple)):
        return list(obj)
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


def describe_callable(fn: Any) -> str:
    """Stable text naming a callable (functools.partial arguments included, no memory addresses),
    for the settings recorded beside results; None gives "none"."""
    if fn is None:
        return "none"
    if isinstance(fn, functools.partial):
        args = [repr(a) for a in fn.args] + [f"{k}={v!r}" for k, v in sorted(fn.keywords.items())]
        return f"{describe_callable(fn.func)}({', '.join(args)})"
    name = getattr(fn, "__qualname__", None) or type(fn).__qualname__
    module = getattr(fn, "__module__", None) or type(fn).__module__
    return f"{module}.{name}"


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo_root(), capture_output=True,
                              text=True, check=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def environment_info(device: str | torch.device | None = None) -> dict[str, Any]:
    """Versions, git commit and device: what a manifest records to make a run reproducible."""
    versions = {}
    for pkg in ("advkit", "torch", "torchvision", "numpy", "scipy", "papermill"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    dev = resolve_device(str(device)) if device is not None else resolve_device()
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "versions": versions,
        "git_commit": git_commit(),
        "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu",
    }


def update_manifest(run: Path, section: str, entry: dict[str, Any]) -> None:
    """Merge `entry` under `section` of `run/manifest.json` (written atomically)."""
    path = Path(run) / "manifest.json"
    manifest = json.loads(path.read_text()) if path.exists() else {}
    manifest.setdefault(section, {}).update(entry)
    manifest["updated"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    write_json(path, manifest)


# --- checkpoints --------------------------------------------------------------------------


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


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint with `weights_only=True`; a clear error names a missing or corrupt file."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises several types for truncated/corrupt files
        raise ValueError(f"{path} is not a readable advkit checkpoint (corrupt or truncated?): {err}") from err
    if not isinstance(payload, dict) or "state_dict" not in payload or "arch" not in payload:
        raise ValueError(f"{path} is not an advkit checkpoint (missing 'arch' or 'state_dict')")
    return payload


def load_model(path: str | Path, arch: str | None = None, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a model saved by `save_model` (in eval mode); `arch`, if given, must match the file."""
    from advkit.models import get_model

    payload = load_checkpoint(path)
    if arch is not None and arch != payload["arch"]:
        raise ValueError(f"{path} holds a {payload['arch']!r} model, not the requested {arch!r}")
    spec = payload.get("spec", {})
    model = get_model(payload["arch"], spec.get("num_classes", 10), spec.get("in_channels", 3),
                      **spec.get("model_kwargs", {}))
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as err:
        raise ValueError(f"{path}: weights do not fit architecture {payload['arch']!r}: {err}") from err
    return model.to(device).eval()


def list_models(run: Path, epochs: bool = False) -> list[str]:
    """Names of the models saved in `run/models/`: `base` first, then sorted; epoch
    checkpoints (`<name>_e<NNN>`, kept by `fit(keep_epochs=...)`) only with `epochs=True`."""
    names = [p.stem for p in (Path(run) / "models").glob("*.pt")]
    if not epochs:
        names = [n for n in names if not _is_epoch_checkpoint(n)]
    return sorted(names, key=lambda n: (n != "base", n))


def _is_epoch_checkpoint(name: str) -> bool:
    stem, _, epoch = name.rpartition("_e")
    return bool(stem) and len(epoch) == 3 and epoch.isdigit()


def load_models(run: Path, names: list[str] | None = None, device: str | torch.device = "cpu",
                epochs: bool = False) -> dict[str, nn.Module]:
    """{name: model in eval mode} for `names` (default: every model of the run, see `list_models`)."""
    names = list_models(run, epochs) if names is None else names
    if not names:
        raise FileNotFoundError(f"no models in {Path(run) / 'models'}: run notebook 01 first")
    return {n: load_model(Path(run) / "models" / f"{n}.pt", device=device) for n in names}
