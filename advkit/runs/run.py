"""The run directory: where it is, what it records, and the name of every artifact in it.

A run directory holds every artifact of one pipeline run (docs/run-directory.md); notebooks find
it through `Run.named` / `run_dir`, never through the current directory, because papermill and
nbval start kernels in different folders. `Run` names each artifact; writes are atomic and
checksummed (`advkit.runs.artifacts`), model files are `advkit.runs.checkpoints`; this module re-exports both.
"""

from __future__ import annotations

import contextlib
import functools
import os
import platform
import re
import subprocess
import sys
import warnings
from collections.abc import Iterator, Mapping
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from torch import nn

from advkit._checks import check_device
from advkit.runs.artifacts import (
    LockHeld,
    as_stored,
    atomic_path,
    clean_stale_temp_files,
    file_lock,
    read_json,
    update_json,
    verified,
    write_json,
)
from advkit.runs.checkpoints import (
    load_model,
)


def repo_root() -> Path:
    """The repository (or installation) folder that holds `advkit/`, `notebooks/` and `runs/`."""
    return Path(__file__).resolve().parents[2]


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


def check_folder(path: Path, what: str) -> Path:
    """`path`, when it is a folder or can be made one; a ValueError naming `what` and the file in the
    way when it, or a folder above it, is a file."""
    for existing in (path, *path.parents):
        if existing.exists():
            if not existing.is_dir():
                why = "is a file, not a folder" if existing == path else f"cannot be a folder: {existing} is a file"
                raise ValueError(f"{what}: {path} {why}; move the file away or choose another folder")
            break
    return path


def runs_root() -> Path:
    """`$ADVKIT_RUNS_DIR` (made absolute), else `runs/` in the repository."""
    resolve_environment_paths()
    value = os.environ.get("ADVKIT_RUNS_DIR")
    return check_folder(Path(value), "ADVKIT_RUNS_DIR") if value else repo_root() / "runs"


def run_dir(name: str | int = "quick", create: bool = True) -> Path:
    """`$ADVKIT_RUNS_DIR/<name>` (default `runs/<name>` in the repository).

    `name` must be a plain folder name (`check_run_name`), so a run never writes outside the
    runs folder, and a file where the folder goes is a ValueError naming it. With `create`, the
    folder is made and temporary files left by killed atomic writes are removed
    (`clean_stale_temp_files`).
    """
    path = check_folder(runs_root() / check_run_name(name), f"run={name}")
    if create:
        try:
            path.mkdir(parents=True, exist_ok=True)
            clean_stale_temp_files(path)
        except OSError as err:  # a read-only file system, no permission: an error line, not a traceback
            raise ValueError(f"cannot write the run folder {path}: {err.strerror or err}; choose a writable "
                             "ADVKIT_RUNS_DIR") from None
    return path


def figures_dir() -> Path:
    """`$ADVKIT_FIGURES_DIR` (made absolute), else `figures/` in the repository."""
    resolve_environment_paths()
    path = check_folder(Path(os.environ.get("ADVKIT_FIGURES_DIR") or repo_root() / "figures"), "ADVKIT_FIGURES_DIR")
    path.mkdir(parents=True, exist_ok=True)
    return path


def resolve_device(device: str = "auto") -> torch.device:
    """`auto`: CUDA when present, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    check_device("device", device)  # cpu, cuda or cuda:N
    return torch.device(device)


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


def update_manifest(run: "str | Path | Run", section: str, entry: dict[str, Any]) -> None:
    """Merge `entry` under `section` of `run/manifest.json` (written atomically, under the run folder's
    lock, so notebooks, the driver and a sweep's jobs updating it at once lose nothing)."""

    def merge(manifest: dict[str, Any]) -> dict[str, Any]:
        manifest.setdefault(section, {}).update(entry)
        manifest["updated"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        return manifest

    update_json(Run.of(run).manifest, merge, missing={})


@contextlib.contextmanager
def one_at_a_time(path: str | Path, command: str) -> Iterator[None]:
    """Hold the lock file `path` (`file_lock`) while one `command` uses a run: a second is refused
    with a ValueError naming the holder's pid (`python -m advkit run` holds `Run.lock`, a sweep
    `sweep/sweep.lock`)."""
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(file_lock(path, wait=False))
        except LockHeld as err:
            raise ValueError(f"another {command} (pid {err.pid if err.pid is not None else 'unknown'}) holds {path}: "
                             f"one {command} per run at a time; wait for it to finish, or choose another run") from None
        except OSError as err:  # a read-only run folder: an error line, not a traceback
            raise ValueError(f"cannot write the run folder {Path(path).parent}: {err.strerror or err} "
                             f"(its lock file {Path(path).name})") from None
        yield


# --- the one cache policy --------------------------------------------------------------------------


class StaleCacheWarning(UserWarning):
    """A cached artifact was made with other settings than requested; it is being recomputed."""


def cache_is_current(path: str | Path, stored: Mapping[str, Any] | None, requested: Mapping[str, Any]) -> bool:
    """The kit's one cache policy (docs/run-directory.md, "Caches"): a cached artifact is reused only when every
    setting it was made with equals the request; otherwise it is recomputed and replaced, with a
    StaleCacheWarning naming the file and the first setting that differs. Never silent reuse.
    Settings compare as JSON would store them (tuples equal lists)."""
    if stored is None:
        return False
    stored, requested = as_stored(dict(stored)), as_stored(dict(requested))
    for key in sorted(set(stored) | set(requested)):
        if stored.get(key) != requested.get(key):
            warnings.warn(f"{path} was made with {key}={stored.get(key)!r}, this call asks for "
                          f"{key}={requested.get(key)!r}: recomputing it", StaleCacheWarning, stacklevel=2)
            return False
    return True


# --- the run object: one name for every artifact ---------------------------------------------------

EARLY_SUFFIX = "_early"  # models/<name>_early.pt: the early-stopped weights of <name>


def epoch_name(name: str, epoch: int) -> str:
    """`<name>_eNNN`: the model name of `name`'s weights kept after `epoch` (`fit(keep_epochs=)`)."""
    return f"{name}_e{epoch:03d}"


def is_epoch_name(name: str) -> bool:
    """Whether `name` is an epoch checkpoint's name (`epoch_name`)."""
    stem, _, epoch = name.rpartition("_e")
    return bool(stem) and len(epoch) == 3 and epoch.isdigit()


SEED_TAG = "_s"  # <name>_s<seed>: replicate <seed> of <name> (a sweep's seed axis, advkit.pipeline.sweep.TAGS)
_SEEDED = re.compile(rf"(?P<stem>.+){SEED_TAG}(?P<seed>\d+)(?P<copy>_early|_e\d{{3}})?")


def split_seed(name: str) -> tuple[str, int | None]:
    """`<name>_s<k>` (with `_early`/`_eNNN` after it for copies) -> (`<name>` + copy suffix, k):
    'fgsm_s1' -> ('fgsm', 1), 'trades_s2_early' -> ('trades_early', 2); a plain name -> (name, None)."""
    m = _SEEDED.fullmatch(name)
    if m is None:
        return name, None
    return m["stem"] + (m["copy"] or ""), int(m["seed"])


class Run(os.PathLike):
    """One run directory and the name of every artifact in it (docs/run-directory.md).

    Notebooks, `training`, `landscape` and `studies` build artifact paths through this
    object, never by hand, so the layout lives in one place. Tables and JSON are written
    atomically with a checksum (`write_table`, `write_json`) and read verified (`read_table`,
    `read_json`, `require`); a missing artifact is a FileNotFoundError naming the notebook that
    makes it (`advkit.runs.artifacts.writer_of`). A Run is path-like: `Path(run)` and `run / "x"` work.
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

    # -- where each artifact lives (one folder per notebook stage; writer_of says which) --
    def _in(self, folder: str, name: str) -> Path:
        directory = self.root / folder
        directory.mkdir(parents=True, exist_ok=True)
        return directory / name

    @property
    def manifest(self) -> Path:
        """manifest.json: profile, parameters, seeds, versions (`update_manifest`)."""
        return self.root / "manifest.json"

    @property
    def lock(self) -> Path:
        """run.lock: held by the `python -m advkit run` using this run (`one_at_a_time`)."""
        return self.root / "run.lock"

    def model(self, name: str) -> Path:
        """models/<name>.pt: final weights (01 writes `base`, 03 the others)."""
        return self._in("models", f"{name}.pt")

    def early_model(self, name: str) -> Path:
        """models/<name>_early.pt: the early-stopped weights of `name` (`fit(select=)`)."""
        return self.model(name + EARLY_SUFFIX)

    def epoch_model(self, name: str, epoch: int) -> Path:
        """models/<name>_eNNN.pt: `name`'s weights after `epoch` (`fit(keep_epochs=)`)."""
        return self.model(epoch_name(name, epoch))

    def training_state(self, name: str) -> Path:
        """checkpoints/<name>.state.pt: the resumable training state of `fit`."""
        return self._in("checkpoints", f"{name}.state.pt")

    def finetune_settings(self, name: str) -> Path:
        """checkpoints/<name>.xu.json: the Xu et al. switches a fine-tune was made with."""
        return self._in("checkpoints", f"{name}.xu.json")

    def history(self, name: str) -> Path:
        """history/<name>.csv: one row per epoch."""
        return self._in("history", f"{name}.csv")

    def attack_table(self, name: str, suffix: str = ".csv") -> Path:
        """attacks/<name>.csv (or .json): 02's tables (table1_accuracy, table2_ssim_distance,
        stadv_flow_sweep, accuracy_vs_eps, budgets.json, autoattack.json) and 03's (zoo_*)."""
        return self._in("attacks", f"{name}{suffix}")

    def augmentation(self, attack: str, suffix: str = ".pt") -> Path:
        """attacks/augment_<attack>.pt: the cached adversarial half of Xu et al.'s fine-tuning
        set (`.json`: its settings and statistics)."""
        return self._in("attacks", f"augment_{attack}{suffix}")

    @property
    def landscapes(self) -> Path:
        """landscapes/: notebook 04's surface files (what `LandscapeSlicer` browses)."""
        return self.root / "landscapes"

    def surface(self, model: str, kind: str) -> Path:
        """landscapes/<model>_<kind>.nc: one surface file (self-describing netCDF)."""
        return self._in("landscapes", f"{model}_{kind}.nc")

    def landscape_table(self, name: str) -> Path:
        """landscapes/<name>.csv: notebook 04's tables (`sharpness`, `sensitivity`)."""
        return self._in("landscapes", f"{name}.csv")

    def sensitivity_surface(self, model: str, norm: str, span: float, dims: int) -> Path:
        """landscapes/sensitivity/<model>_<norm>_<span>_<dims>d.nc: notebook 04's sensitivity study."""
        return self._in("landscapes/sensitivity", f"{model}_{norm}_{span:g}_{dims}d.nc")

    @property
    def flatness(self) -> Path:
        """flatness.csv: notebook 05's metrics, one row per model (a cache keyed by settings)."""
        return self.root / "flatness.csv"

    @property
    def correlations(self) -> Path:
        """correlations.csv: notebook 05's robustness-flatness correlations."""
        return self.root / "correlations.csv"

    def reported(self, claim: str) -> Path:
        """reported_vs_reproduced/<claim>.csv: a seed claim's published and reproduced values."""
        return self._in("reported_vs_reproduced", f"{claim}.csv")

    def models(self, epochs: bool = False) -> list[str]:
        """Names of the saved models: `base` first, then sorted; epoch checkpoints
        (`<name>_eNNN`) only with `epochs=True`."""
        names = [p.stem for p in (self.root / "models").glob("*.pt")]
        if not epochs:
            names = [n for n in names if not is_epoch_name(n)]
        return sorted(names, key=lambda n: (n != "base", n))

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
        """Write JSON atomically, with a checksum."""
        write_json(path, obj)
        return Path(path)

    def read_json(self, path: str | Path) -> Any:
        """A JSON file this kit wrote, checksum verified; missing -> an error naming its notebook."""
        return read_json(path)


def list_models(run: str | Path | Run, epochs: bool = False) -> list[str]:
    """Names of the models saved in `run` (`Run.models`)."""
    return Run.of(run).models(epochs)


def load_models(run: str | Path | Run, names: list[str] | None = None, device: str | torch.device = "cpu",
                epochs: bool = False) -> dict[str, nn.Module]:
    """{name: model in eval mode} for `names` (default: every model of the run, see `list_models`)."""
    run = Run.of(run)
    names = run.models(epochs) if names is None else names
    if not names:
        raise FileNotFoundError(f"no models in {run / 'models'}: run notebook 01_train first")
    return {n: load_model(run.model(n), device=device) for n in names}
