"""Run directories, manifests, atomic artifact writes and model checkpoints.

A run directory holds every artifact of one pipeline run (see README, "Data flow");
notebooks find it through `run_dir`, never through the current directory, because
papermill and nbval start kernels in different folders.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator, Mapping
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


# Folders the kit reads from the environment; relative values are resolved once, against the
# working directory of the first process that reads them (the driver), never against notebooks/
# where papermill starts kernels (kernels inherit the driver's environment).
PATH_VARIABLES = ("ADVKIT_RUNS_DIR", "ADVKIT_FIGURES_DIR", "ADVKIT_DATA_DIR")


def resolve_environment_paths() -> dict[str, str]:
    """Make the ADVKIT_*_DIR variables that are set absolute (in `os.environ`) and return them.

    Called by the driver before it starts kernels, and by `run_dir`, `figures_dir` and
    `default_data_dir`, so a relative value means the same folder in every notebook.
    """
    resolved = {}
    for var in PATH_VARIABLES:
        value = os.environ.get(var)
        if value:
            absolute = str(Path(value).expanduser().resolve())
            if absolute != value:
                os.environ[var] = absolute
            resolved[var] = absolute
    return resolved


def check_run_name(name: str | int) -> str:
    """A run name as a string: one folder name (no path separators, not empty, not '.' or '..').

    Integers are accepted as their decimal text (YAML reads `run: 2024` as a number).
    """
    if isinstance(name, int) and not isinstance(name, bool):
        name = str(name)
    if not isinstance(name, str):
        raise ValueError(f"run={name!r}: a run name must be a string (a folder name inside the runs folder)")
    separators = {"/", "\\", os.sep} | ({os.altsep} if os.altsep else set())
    if name.strip() in ("", ".", "..") or any(c in name for c in separators) or "\0" in name:
        raise ValueError(f"run={name!r} is not a run name: it must be one folder name inside the runs folder "
                         "(not empty, not '.' or '..', no '/' or '\\'), e.g. run=quick or run=paper_seed1")
    return name


def runs_root() -> Path:
    """`$ADVKIT_RUNS_DIR` (made absolute), else `runs/` in the repository."""
    resolve_environment_paths()
    return Path(os.environ.get("ADVKIT_RUNS_DIR") or repo_root() / "runs")


def run_dir(name: str | int = "quick", create: bool = True) -> Path:
    """`$ADVKIT_RUNS_DIR/<name>` (default `runs/<name>` in the repository).

    `name` must be a plain folder name (`check_run_name`), so a run never writes outside the
    runs folder. With `create`, the folder is made and temporary files left by killed atomic
    writes are removed (`clean_stale_temp_files`).
    """
    path = runs_root() / check_run_name(name)
    if create:
        path.mkdir(parents=True, exist_ok=True)
        clean_stale_temp_files(path)
    return path


def figures_dir() -> Path:
    """`$ADVKIT_FIGURES_DIR` (made absolute), else `figures/` in the repository."""
    resolve_environment_paths()
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


# --- atomic writes and checksums -----------------------------------------------------------

# Temporary files of atomic writes: `.<name>.<pid>.<random>.tmp` (older versions: no pid).
_TEMP_FILE = re.compile(r"^\..+?\.(?:(?P<pid>\d+)\.)?[a-z0-9_]+\.tmp$")
_PROCESS_START = time.time()
CHECKSUM_SUFFIX = ".sha256"


def _umask() -> int:
    try:  # Linux: read without changing it (os.umask would, briefly, for every thread)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes (read in 1 MiB blocks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def checksum_path(path: str | Path) -> Path:
    """The sidecar `<file>.sha256` that records a file's sha256 (`sha256sum -c` format)."""
    path = Path(path)
    return path.with_name(path.name + CHECKSUM_SUFFIX)


@contextlib.contextmanager
def atomic_path(path: str | Path, checksum: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside `path`; it replaces `path` only if the block succeeds.

    The file gets the usual permissions (0666 minus the umask, not mkstemp's 0600) and, with
    `checksum`, its sha256 is recorded in `<file>.sha256` for `verified` to check on reading.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        if checksum:
            digest = file_sha256(tmp)
            sidecar = checksum_path(path)
            fd, side_tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{sidecar.name}.{os.getpid()}.", suffix=".tmp")
            with os.fdopen(fd, "w") as f:
                f.write(f"{digest}  {path.name}\n")
            os.chmod(side_tmp, 0o666 & ~_umask())
            os.replace(side_tmp, sidecar)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


class CorruptArtifactError(ValueError):
    """A file's bytes differ from the sha256 recorded when the kit wrote it."""


# Which notebook writes an artifact, by the folder (or file name) it lives in: for error messages.
_WRITERS = {"models": "01_train (base) or 03_finetune (the others)", "checkpoints": "01_train or 03_finetune",
            "history": "01_train or 03_finetune", "attacks": "02_attack or 03_finetune (augment_*)",
            "landscapes": "04_visualize", "flatness.csv": "05_flatness_correlation",
            "correlations.csv": "05_flatness_correlation", "manifest.json": "any (python -m advkit run)"}


def _writer_hint(path: Path) -> str:
    writer = _WRITERS.get(path.name) or _WRITERS.get(path.parent.name)
    return f"re-run notebook {writer}" if writer else "re-run the step that wrote it"


def verified(path: str | Path) -> Path:
    """`path`, after checking its bytes against the sha256 recorded when it was written.

    Every loader of a kit artifact (models, checkpoints, surfaces, caches) reads through this.
    A mismatch raises CorruptArtifactError naming the file and what to do; a missing file,
    FileNotFoundError; a file without a recorded checksum (written by hand or by an older
    version) is read with a warning.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no file at {path}: {_writer_hint(path)}")
    sidecar = checksum_path(path)
    if not sidecar.exists():
        warnings.warn(f"{path} has no recorded checksum ({sidecar.name}); it is read unverified", stacklevel=2)
        return path
    recorded = sidecar.read_text().split(maxsplit=1)
    actual = file_sha256(path)
    if not recorded or recorded[0] != actual:
        raise CorruptArtifactError(
            f"{path} is corrupt: its sha256 ({actual[:12]}...) differs from the one recorded when it was "
            f"written ({sidecar.name}: {recorded[0][:12] if recorded else 'empty'}...). Delete it and its "
            f"{sidecar.name}, then {_writer_hint(path)}.")
    return path


def clean_stale_temp_files(directory: str | Path) -> list[Path]:
    """Remove temporary files of atomic writes that a killed process left under `directory`.

    Only files named like `atomic_path`'s temporaries, last modified before this process
    started, and not belonging to a process that is still running. Returns what was removed.
    """
    removed = []
    for folder, _, files in os.walk(directory):
        for name in files:
            match = _TEMP_FILE.match(name)
            if not match:
                continue
            file = Path(folder) / name
            pid = int(match["pid"]) if match["pid"] else None
            try:
                if file.stat().st_mtime >= _PROCESS_START or (pid is not None and _alive(pid)):
                    continue
                file.unlink()
                removed.append(file)
            except FileNotFoundError:
                continue
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True
    return True


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text)


def write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_jsonable) + "\n")


def read_json(path: str | Path) -> Any:
    """Parse a JSON file the kit wrote (checksum verified); a truncated one is an error naming it."""
    path = verified(path)
    try:
        return json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON (truncated or edited?): {err}. "
                         f"Delete it and {_writer_hint(path)}.") from err


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
    manifest = read_json(path) if path.exists() else {}
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


def load_torch(path: str | Path, map_location: str | torch.device = "cpu") -> Any:
    """`torch.load(weights_only=True)` of a file the kit wrote, checksum verified first; an
    unreadable file is a ValueError naming it and what to do."""
    path = verified(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises several types for truncated/corrupt files
        raise ValueError(f"{path} is not a readable advkit checkpoint (corrupt or truncated?): {err}. "
                         f"Delete it and {_writer_hint(path)}.") from err


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint with `weights_only=True`; a clear error names a missing or corrupt file."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}: {_writer_hint(path)}")
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
                                  or not all(isinstance(v, (int, float)) for v in value)):
            raise ValueError(f"{source}: {key}={value!r}; allowed: None or one number per input channel")
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
    from advkit.models import get_model

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


# --- the one cache policy --------------------------------------------------------------------------


class StaleCacheWarning(UserWarning):
    """A cached artifact was made with other settings than requested; it is being recomputed."""


def cache_is_current(path: str | Path, stored: Mapping[str, Any] | None, requested: Mapping[str, Any]) -> bool:
    """The kit's one cache policy (README, "Caches"): a cached artifact is reused only when every
    setting it was made with equals the request; otherwise it is recomputed and replaced, with a
    StaleCacheWarning naming the file and the first setting that differs. Never silent reuse.
    Settings compare as JSON would store them (tuples equal lists)."""
    if stored is None:
        return False
    as_json = lambda v: json.loads(json.dumps(v, sort_keys=True, default=_jsonable))  # noqa: E731
    stored, requested = as_json(dict(stored)), as_json(dict(requested))
    for key in sorted(set(stored) | set(requested)):
        if stored.get(key) != requested.get(key):
            warnings.warn(f"{path} was made with {key}={stored.get(key)!r}, this call asks for "
                          f"{key}={requested.get(key)!r}: recomputing it", StaleCacheWarning, stacklevel=2)
            return False
    return True


# --- the run object: one name for every artifact ---------------------------------------------------


class Run(os.PathLike):
    """One run directory and the name of every artifact in it (README, "Data flow").

    Notebooks, `train`, `augment`, `landscape` and `zoo` build artifact paths through this
    object, never by hand, so the layout lives in one place. Tables and JSON are written
    atomically with a checksum (`write_table`, `write_json`) and read verified; a missing
    artifact is a FileNotFoundError naming the notebook that makes it (`require`). A Run is
    path-like: `Path(run)` and `open(run / "x")` work where a run folder did before.
    """

    def __init__(self, root: str | Path | "Run"):
        self.root = Path(root)

    @classmethod
    def named(cls, name: str | int = "quick", create: bool = True) -> "Run":
        """The run `$ADVKIT_RUNS_DIR/<name>` (see `run_dir`)."""
        return cls(run_dir(name, create))

    @classmethod
    def of(cls, run: "str | Path | Run") -> "Run":
        """`run` as a Run (a folder path or a Run)."""
        return run if isinstance(run, Run) else cls(run)

    def __fspath__(self) -> str:
        return str(self.root)

    def __truediv__(self, other: str) -> Path:
        return self.root / other

    def __repr__(self) -> str:
        return f"Run({str(self.root)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Run) and other.root == self.root

    def __hash__(self) -> int:
        return hash(self.root)

    # -- where each artifact lives (one folder per notebook stage) --
    def _in(self, folder: str, name: str) -> Path:
        directory = self.root / folder
        directory.mkdir(parents=True, exist_ok=True)
        return directory / name

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.json"

    def model(self, name: str) -> Path:
        """models/<name>.pt: final weights (01 writes `base`, 03 the others; `<name>_early`,
        `<name>_eNNN` are early-stopped and kept-epoch copies)."""
        return self._in("models", f"{name}.pt")

    def training_state(self, name: str) -> Path:
        """checkpoints/<name>.state.pt: the resumable training state of `fit`."""
        return self._in("checkpoints", f"{name}.state.pt")

    def history(self, name: str) -> Path:
        """history/<name>.csv: one row per epoch."""
        return self._in("history", f"{name}.csv")

    def attack_table(self, name: str, suffix: str = ".csv") -> Path:
        """attacks/<name>.csv (or .json): notebook 02's and 03's evaluation tables."""
        return self._in("attacks", f"{name}{suffix}")

    def augmentation(self, attack: str) -> Path:
        """attacks/augment_<attack>.pt: the cached adversarial half of Xu et al.'s fine-tuning set."""
        return self._in("attacks", f"augment_{attack}.pt")

    def surface(self, model: str, kind: str) -> Path:
        """landscapes/<model>_<kind>.nc: one surface file (self-describing netCDF)."""
        return self._in("landscapes", f"{model}_{kind}.nc")

    def landscape_table(self, name: str) -> Path:
        """landscapes/<name>.csv: notebook 04's tables (`sharpness`, `sensitivity`)."""
        return self._in("landscapes", f"{name}.csv")

    @property
    def flatness(self) -> Path:
        """flatness.csv: notebook 05's metrics, one row per model (a cache keyed by settings)."""
        return self.root / "flatness.csv"

    @property
    def correlations(self) -> Path:
        return self.root / "correlations.csv"

    def models(self, epochs: bool = False) -> list[str]:
        """The names of the saved models (`list_models`)."""
        return list_models(self.root, epochs)

    # -- reading and writing --
    def require(self, path: str | Path) -> Path:
        """`path` verified against its checksum; missing -> FileNotFoundError naming its notebook."""
        return verified(path)

    def write_table(self, path: str | Path, table: Any, index: bool = True, **to_csv: Any) -> Path:
        """Write a pandas table as CSV, atomically and with a checksum."""
        with atomic_path(path) as tmp:
            table.to_csv(tmp, index=index, **to_csv)
        return Path(path)

    def read_table(self, path: str | Path, **read_csv: Any) -> Any:
        """A table this kit wrote, checksum verified; missing -> an error naming its notebook."""
        import pandas as pd

        return pd.read_csv(self.require(path), **read_csv)

    def write_json(self, path: str | Path, obj: Any) -> Path:
        write_json(path, obj)
        return Path(path)

    def read_json(self, path: str | Path) -> Any:
        return read_json(path)
