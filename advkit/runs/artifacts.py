"""Atomic, checksummed artifact writes and verified reads: the one way the kit writes a file.

Every write goes through `atomic_path` (a temporary file beside the target, renamed over it
only when the write succeeded) and records the file's sha256 in `<file>.sha256`; every read of
a kit artifact goes through `verified`, so changed bytes are an error naming the file and the
notebook that makes it (`writer_of`), never silently used values.

Processes share run folders (a sweep's jobs, notebooks, the driver), so a write's commit (the
renames of the file and its sidecar) holds the folder's lock (`file_lock` on `.advkit.lock`), a
read-modify-write of a shared file holds it throughout (`update_json`), and the sidecar keeps the
replaced file's hash until the new file is in place: a kill at any step leaves a pair that verifies.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import resource
import shutil
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

import torch

# Temporary files of atomic writes: `.<name>.<pid>.<random>.tmp` (older versions: no pid).
_TEMP_FILE = re.compile(r"^\..+?\.(?:(?P<pid>\d+)\.)?[a-z0-9_]+\.tmp$")
_PROCESS_START = time.time()
CHECKSUM_SUFFIX = ".sha256"
FOLDER_LOCK = ".advkit.lock"  # in each folder the kit writes: held while a write commits
REPLACING = "# replacing: "  # a sidecar line naming the hash of the file being replaced (`atomic_path`)


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


class LockHeld(ValueError):
    """`file_lock(wait=False)` found the lock held by another process (`pid`, None if unknown)."""

    def __init__(self, path: Path, pid: int | None):
        super().__init__(f"{path} is held by process {pid if pid is not None else '(unknown pid)'}")
        self.path, self.pid = path, pid


_HELD = threading.local()  # the locks this thread holds: a nested file_lock of one of them is a no-op


@contextlib.contextmanager
def file_lock(path: str | Path, wait: bool = True) -> Iterator[None]:
    """Hold an exclusive `fcntl.flock` on the lock file `path` (made if missing) for the block.

    Re-entrant within a thread. The holder's pid is written into the file; with `wait=False` a lock
    held by another process raises LockHeld (a ValueError) naming it, instead of waiting.
    """
    path = Path(path)
    held = vars(_HELD).setdefault("paths", set())
    key = os.path.realpath(path)
    if key in held:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            text = os.pread(fd, 32, 0).decode(errors="replace").strip()
            raise LockHeld(path, int(text) if text.isdigit() else None) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        held.add(key)
        try:
            yield
        finally:
            held.discard(key)
    finally:
        os.close(fd)  # releases the lock


def folder_lock(folder: str | Path) -> contextlib.AbstractContextManager:
    """The lock of `folder`'s commits (`FOLDER_LOCK`): hold it to read-modify-write a file there."""
    return file_lock(Path(folder) / FOLDER_LOCK)


def recorded_hashes(path: str | Path) -> list[str]:
    """The sha256 values `path`'s sidecar accepts: the recorded one, and while `atomic_path` replaces
    the file (or after a kill between its steps), the replaced file's."""
    sidecar = checksum_path(path)
    lines = sidecar.read_text().splitlines() if sidecar.exists() else []
    first = lines[0].split(maxsplit=1) if lines else []
    return first[:1] + [line[len(REPLACING):].split()[0] for line in lines[1:]
                        if line.startswith(REPLACING) and line[len(REPLACING):].split()]


def _write_sidecar(path: Path, digest: str, replacing: list[str]) -> None:
    sidecar = checksum_path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{sidecar.name}.{os.getpid()}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(f"{digest}  {path.name}\n" + "".join(f"{REPLACING}{h}  {path.name}\n" for h in replacing))
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, sidecar)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _commit(tmp: Path, path: Path, digest: str | None) -> None:
    """Rename `tmp` over `path` with its sidecar, in an order a kill cannot break: first the sidecar
    accepts the new hash and the replaced file's, then the file is renamed, then the sidecar names
    only the new hash. Callers hold the folder's lock."""
    if digest is None:
        os.replace(tmp, path)
        return
    if checksum_path(path).exists():
        replacing = recorded_hashes(path)
    else:  # a file without a sidecar (written by hand or an older version) keeps verifying until replaced
        replacing = [file_sha256(path)] if path.is_file() else []
    replacing = [h for h in dict.fromkeys(replacing) if h != digest]
    _write_sidecar(path, digest, replacing)
    os.replace(tmp, path)
    if replacing:
        _write_sidecar(path, digest, [])


class ArtifactWriteError(OSError):
    """Writing an artifact failed for lack of room: the disk is full or a file-size limit was reached."""


_NO_ROOM = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}
_TORCH_WRITE_FAILED = re.compile(r"inline_container|PytorchStreamWriter|file write failed|unexpected pos")


def _no_room(path: Path, err: BaseException) -> ArtifactWriteError | None:
    """An error naming `path` and the likely cause, when `err` is a write that ran out of room
    (torch's zip writer reports it as a RuntimeError without the file or the cause); else None."""
    if not (isinstance(err, OSError) and err.errno in _NO_ROOM
            or isinstance(err, RuntimeError) and _TORCH_WRITE_FAILED.search(str(err))):
        return None
    try:
        free = f"{shutil.disk_usage(path.parent).free / 2**20:,.0f} MiB free there"
    except OSError:
        free = "free space unknown"
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    limit = "none" if limit == resource.RLIM_INFINITY else f"{limit / 2**10:,.0f} KiB"
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return ArtifactWriteError(
        f"could not write {path}: the disk is probably full or the file-size limit was reached ({free}; "
        f"file-size limit, ulimit -f: {limit}). Free some space or raise the limit, then re-run; the previous "
        f"file, if any, is unchanged. ({type(err).__name__}: {first})")


@contextlib.contextmanager
def atomic_path(path: str | Path, checksum: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside `path`; it replaces `path` only if the block succeeds.

    The file gets the usual permissions (0666 minus the umask, not mkstemp's 0600) and, with
    `checksum`, its sha256 is recorded in `<file>.sha256` for `verified` to check on reading. The
    commit holds the folder's lock (`folder_lock`), so concurrent writers never mix a file with
    another's sidecar. A write that runs out of room is an ArtifactWriteError naming the file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        digest = file_sha256(tmp) if checksum else None
        with folder_lock(path.parent):
            _commit(Path(tmp), path, digest)
    except (OSError, RuntimeError) as err:
        failure = _no_room(path, err)
        if failure is None:
            raise
        raise failure from err
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


class CorruptArtifactError(ValueError):
    """A file's bytes differ from the sha256 recorded when the kit wrote it."""


# Which notebook makes each artifact of a run directory (docs/run-directory.md), for the errors
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
    version) is read with a warning. A mismatch is looked at again under the folder's lock, as a
    writer may have been between its renames.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no file at {path}: {writer_hint(path)}")
    sidecar = checksum_path(path)
    if not sidecar.exists():
        warnings.warn(f"{path} has no recorded checksum ({sidecar.name}); it is read unverified", stacklevel=2)
        return path
    recorded, actual = recorded_hashes(path), file_sha256(path)
    if actual not in recorded:
        with contextlib.ExitStack() as stack:
            with contextlib.suppress(OSError):  # a folder this process cannot write: it commits nothing there
                stack.enter_context(folder_lock(path.parent))
            recorded, actual = recorded_hashes(path), file_sha256(path)
    if actual not in recorded:
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


def update_json(path: str | Path, change: Callable[[Any], Any], missing: Any = None) -> Any:
    """Read the JSON file `path` (`missing` if there is none), write `change(value)` back, and return it,
    all under the folder's lock: a read-modify-write that concurrent processes cannot interleave."""
    path = Path(path)
    with folder_lock(path.parent):
        value = change(read_json(path) if path.exists() else missing)
        write_json(path, value)
    return value


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
