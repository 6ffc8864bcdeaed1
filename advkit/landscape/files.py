"""Surface files: self-describing netCDF (xarray + h5netcdf), written atomically with a checksum,
read verified, and reused only under the kit's one cache policy (`advkit.runs.run.cache_is_current`)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import xarray as xr

from advkit.landscape.settings import SurfaceSettings, plain
from advkit.runs.artifacts import atomic_path, verified
from advkit.runs.run import cache_is_current


def load_surface(path: str | Path) -> xr.Dataset:
    """Read a surface file into memory (the file is closed afterwards), after checking it
    against the checksum recorded when it was written; an unreadable file is an error naming it."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no surface file at {path}")
    verified(path)
    try:
        ds = xr.load_dataset(path, engine="h5netcdf")
    except Exception as err:  # h5py/h5netcdf raise OSError, ValueError, KeyError, ... on damaged files
        raise ValueError(f"{path} is not a readable surface file (truncated or not netCDF?): {err}. "
                         "Delete it (and its .sha256) and compute the surface again (notebook 04).") from err
    if "computed" not in ds:
        raise ValueError(f"{path} is not an advkit surface file: it has no 'computed' mask")
    return ds


def write_surface(ds: xr.Dataset, path: str | Path) -> Path:
    """Write a surface atomically, with its checksum recorded (`advkit.runs.artifacts.atomic_path`)."""
    with atomic_path(path) as tmp:
        ds.to_netcdf(tmp, engine="h5netcdf")
    return Path(path)


def settings_of(ds: xr.Dataset) -> SurfaceSettings:
    """The settings a surface was computed with (`SurfaceSettings.from_attrs`)."""
    return SurfaceSettings.from_attrs(ds.attrs)


def cached_surface(path: str | Path | None, key: Mapping[str, Any]) -> xr.Dataset | None:
    """The surface file at `path` (complete or partial) if it was made with every setting of
    `key`; None if there is none, or, with a StaleCacheWarning naming the file and the setting,
    if it was made with other settings (it is then recomputed and replaced: never silent reuse).
    A file whose bytes changed since it was written is an error (`load_surface`)."""
    if path is None or not Path(path).exists():
        return None
    old = load_surface(path)
    stored = {k: plain(old.attrs[k]) for k in key if k in old.attrs}
    return old if cache_is_current(path, stored, key) else None
