"""Atomic, checksummed artifact writes and verified reads: the one way the kit writes a file.

Every write goes through `atomic_path` (a temporary file beside the target, renamed over it
only when the write succeeded) and records the file's sha256 in `<file>.sha256`; every read of
a kit artifact goes through `verified`, so changed bytes are an error naming the file and the
notebook that makes it (`writer_of`), never silently used values.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

import torch

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


# Which notebook makes each artifact of a run directory (README, "Architecture"), for the errors
# that name the notebook to re-run. Files of the base model come from 01, other models from 03.
_BY_NAME = {"flatness.csv": "05_flatness_correlation", "correlations.csv": "05_flatness_correlation",
            "manifest.json": "any (python -m advkit run)"}
_BY_FOLDER = {"landscapes": "04_visualize", "reported_vs_reproduced": "02_attack to 05_flatness_correlation "
              "(whichever reports the claim)"}
_FROM_FINETUNE = ("augment_", "zoo_")  # attacks/ files of notebook 03; the others are notebook 02's


def writer_of(path: str | Path) -> str | None:
    """The notebook that writes the run artifact `path` (e.g. "02_attack"), None if not a run artifact."""
    path = Path(path)
    folder, name = path.parent.name, path.name
    if name in _BY_NAME:
        return _BY_NAME[name]
    if folder in ("models", "checkpoints", "history"):
        return "01_train" if name.split(".")[0] == "base" else "03_finetune"
    if folder == "attacks":
        return "03_finetune" if name.startswith(_FROM_FINETUNE) else "02_attack"
    return _BY_FOLDER.get(folder)


def writer_hint(path: str | Path) -> str:
    """What to do about a missing or damaged artifact: "re-run notebook <writer>"."""
    writer = writer_of(path)
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
        raise FileNotFoundError(f"no file at {path}: {writer_hint(path)}")
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
            f"{sidecar.name}, then {writer_hint(path)}.")
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
    """Write `text` atomically, with a recorded checksum."""
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text)


def write_json(path: str | Path, obj: Any) -> None:
    """Write `obj` as sorted, indented JSON, atomically, with a recorded checksum."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=jsonable) + "\n")


def read_json(path: str | Path) -> Any:
    """Parse a JSON file the kit wrote (checksum verified); a truncated one is an error naming it."""
    path = verified(path)
    try:
        return json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON (truncated or edited?): {err}. "
                         f"Delete it and {writer_hint(path)}.") from err


def jsonable(obj: Any) -> Any:
    """`json.dumps` default: dataclasses, paths, devices, dtypes, sets and tuples, numpy/torch scalars."""
    if is_dataclass(obj):
        return asdict(obj)
    if isinstance(obj, (Path, torch.device, torch.dtype)):
        return str(obj)
    if isinstance(obj, (set, tuple)):
        return list(obj)
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


def as_stored(obj: Any) -> Any:
    """`obj` as JSON stores it (tuples become lists, keys sorted): how settings compare with a file's."""
    return json.loads(json.dumps(obj, sort_keys=True, default=jsonable))
