"""Integrity of what the kit writes and reads: checksums, run names, leftovers and clear errors
(advkit.runs, with the loaders of advkit.landscape, advkit.landscape.directions, advkit.training.augment,
advkit.studies.zoo, advkit.training.fit). Each test reproduces a defect a hostile user found on CIFAR-shaped
artifacts."""

import os
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pandas as pd
import pytest
import torch

from advkit.data import Batcher
from advkit.landscape.directions import (
    Directions,
    explicit_directions,
    load_loss_landscape_directions,
    random_directions,
)
from advkit.landscape.files import load_surface
from advkit.landscape.surfaces import grid, line
from advkit.models import get_model
from advkit.runs import artifacts
from advkit.runs import run as runs
from advkit.runs.artifacts import CorruptArtifactError, atomic_path, verified
from advkit.runs.checkpoints import check_model_spec, load_model, save_model
from advkit.runs.run import run_dir, update_manifest
from advkit.studies import zoo
from advkit.training.augment import augmented_dataset
from advkit.training.fit import TrainConfig, fit


def _cifar(n=16, seed=0):
    """CIFAR-shaped uint8 images (n x 3 x 32 x 32) with labels."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=gen),
            torch.randint(0, 10, (n,), generator=gen))


def _garble(path, n=64):
    """Flip `n` bytes in the middle of a file (where a checkpoint keeps its tensor data)."""
    data = bytearray(path.read_bytes())
    start = len(data) // 2
    for i in range(start, start + n):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def resnet20():
    torch.manual_seed(0)
    return get_model("resnet20", 10, 3).eval()


# --- 1. silent corruption -------------------------------------------------------------------------


def test_garbled_training_state_is_an_error_and_keeps_the_good_model(tmp_path):
    x, y = _cifar()
    config = TrainConfig(epochs=2, lr=0.01, seed=0)
    torch.manual_seed(0)
    fit(get_model("resnet20", 10, 3), Batcher(x, y, 8, augment=True), config, run=tmp_path, name="base", progress=False)
    good = (tmp_path / "models" / "base.pt").read_bytes()
    state = tmp_path / "checkpoints" / "base.state.pt"
    _garble(state)
    torch.load(state, weights_only=True)  # the defect: the garbled file loads without complaint
    with pytest.raises(CorruptArtifactError, match=r"base.state.pt is corrupt.*notebook 01_train"):
        fit(get_model("resnet20", 10, 3), Batcher(x, y, 8, augment=True), config, run=tmp_path, name="base",
            progress=False)
    assert (tmp_path / "models" / "base.pt").read_bytes() == good


def test_garbled_model_is_an_error_naming_the_file(tmp_path):
    path = tmp_path / "models" / "base.pt"
    model = get_model("resnet32", 10, 3)
    save_model(path, model)
    _garble(path)
    garbled = torch.load(path, weights_only=True)["state_dict"]  # loads, with some weights far off
    assert any(not torch.equal(garbled[k], v) for k, v in model.state_dict().items())
    with pytest.raises(CorruptArtifactError, match=r"models/base.pt is corrupt.*Delete it.*notebook 01_train"):
        load_model(path)


def test_garbled_surface_value_is_an_error_not_reused(tmp_path, resnet20):
    x, y = _cifar(8)
    dirs = random_directions(resnet20, 2, seed=0)
    path = tmp_path / "landscapes" / "base_grid.nc"
    grid(resnet20, dirs, x, y, span=0.5, resolution=3, path=path)
    with h5py.File(path, "r+") as f:  # one value changed behind the kit's back
        f["loss"][1, 1] = f["loss"][1, 1] + 1.0
    with pytest.raises(CorruptArtifactError, match=r"base_grid.nc is corrupt.*notebook 04_visualize"):
        load_surface(path)
    with pytest.raises(CorruptArtifactError, match="base_grid.nc"):
        grid(resnet20, dirs, x, y, span=0.5, resolution=3, path=path)


def test_garbled_augmentation_cache_is_an_error(tmp_path, resnet20):
    x, y = _cifar(8)
    augmented_dataset(resnet20, x, y, "fgsm", run=tmp_path, progress=False)
    cache = tmp_path / "attacks" / "augment_fgsm.pt"
    _garble(cache)
    with pytest.raises(CorruptArtifactError, match="augment_fgsm.pt is corrupt"):
        augmented_dataset(resnet20, x, y, "fgsm", run=tmp_path, progress=False)


def test_edited_flatness_cache_is_an_error(tmp_path):
    run = runs.Run(tmp_path)
    run.write_table(run.flatness, pd.DataFrame({"robust_loss_test": [1.25]}, index=pd.Index(["base"], name="model")))
    assert zoo.read_cache(run).at["base", "robust_loss_test"] == 1.25
    run.flatness.write_text(run.flatness.read_text().replace("1.25", "0.25"))
    with pytest.raises(CorruptArtifactError, match=r"flatness.csv is corrupt.*05_flatness_correlation"):
        zoo.read_cache(run)


# --- 2. run names stay names --------------------------------------------------------------------


@pytest.mark.parametrize("name", ["../../evil", "/abs/path", "", ".", "..", "a/b", "a\\b", " "])
def test_run_names_cannot_escape_the_runs_folder(tmp_run, name):
    with pytest.raises(ValueError, match=r"run=.* is not a run name.*one folder name"):
        run_dir(name)
    assert not (tmp_run / "evil").exists() and not (tmp_run / "runs").exists()


def test_numeric_run_name_is_a_name(tmp_run):
    assert run_dir(2024) == tmp_run / "runs" / "2024" and (tmp_run / "runs" / "2024").is_dir()


def test_relative_folders_resolve_once_against_the_driver(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ADVKIT_RUNS_DIR", "rel_runs")
    monkeypatch.setenv("ADVKIT_FIGURES_DIR", "rel_figures")
    monkeypatch.setenv("ADVKIT_DATA_DIR", "rel_data")
    resolved = runs.resolve_environment_paths()
    root = tmp_path.resolve()
    assert resolved == {"ADVKIT_RUNS_DIR": str(root / "rel_runs"), "ADVKIT_FIGURES_DIR": str(root / "rel_figures"),
                        "ADVKIT_DATA_DIR": str(root / "rel_data")}
    (tmp_path / "notebooks").mkdir()
    monkeypatch.chdir(tmp_path / "notebooks")  # where papermill starts kernels
    assert run_dir("r") == root / "rel_runs" / "r" and runs.figures_dir() == root / "rel_figures"
    child = subprocess.run([sys.executable, "-c", "import os; print(os.environ['ADVKIT_RUNS_DIR'])"],
                           capture_output=True, text=True, check=True)
    assert child.stdout.strip() == str(root / "rel_runs")  # kernels inherit the absolute path


# --- 4. crashes become errors -----------------------------------------------------------------------


def test_truncated_surface_and_manifest_name_the_file(tmp_path, resnet20):
    x, y = _cifar(4)
    path = tmp_path / "s.nc"
    line(resnet20, random_directions(resnet20, 1, seed=0), x, y, resolution=3, path=path)
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(CorruptArtifactError, match="s.nc is corrupt"):
        load_surface(path)
    artifacts.checksum_path(path).unlink()  # no checksum to compare with: the reader still names the file
    with pytest.warns(UserWarning, match="no recorded checksum"), \
            pytest.raises(ValueError, match="s.nc is not a readable surface file"):
        load_surface(path)

    update_manifest(tmp_path, "01_train", {"epochs": 3})
    manifest = tmp_path / "manifest.json"
    manifest.write_text(manifest.read_text()[:20])
    with pytest.raises(CorruptArtifactError, match="manifest.json is corrupt"):
        update_manifest(tmp_path, "02_attack", {})
    artifacts.checksum_path(manifest).unlink()
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="manifest.json is not valid JSON"):
        update_manifest(tmp_path, "02_attack", {})


def test_non_hdf5_direction_file_names_the_file(tmp_path, resnet20):
    path = tmp_path / "directions.h5"
    path.write_bytes(b"this is not HDF5" * 10)
    with pytest.raises(ValueError, match="directions.h5 is not a readable HDF5 direction file"):
        load_loss_landscape_directions(path, resnet20)
    with h5py.File(path, "w") as f:
        f.create_group("xdirection").create_dataset("zero", data=np.zeros(3))
    with pytest.raises(ValueError, match="directions.h5:xdirection is not a loss-landscape direction group"):
        load_loss_landscape_directions(path, resnet20)


def _rewrite_spec(path, **changes):
    payload = torch.load(path, weights_only=True)
    payload["spec"] = {**payload["spec"], **changes}
    with atomic_path(path) as tmp:  # a valid checksum: the spec itself is what is checked
        torch.save(payload, tmp)


@pytest.mark.parametrize("changes, message", [
    ({"model_kwargs": {"width": 40000}}, r"width=40000 is out of range; allowed: integers 1\.\.4096"),
    ({"model_kwargs": {"width": 4000}}, r"with 864,228,010 parameters; at most 200,000,000"),
    ({"model_kwargs": {"depth": 10**6}}, r"model_kwargs=.*allowed keys"),
    ({"num_classes": 10**9}, r"num_classes=1000000000 is out of range"),
    ({"in_channels": "3"}, r"in_channels='3' is out of range"),
])
def test_untrusted_spec_is_bounded_before_building(tmp_path, changes, message):
    path = tmp_path / "m.pt"
    save_model(path, get_model("small_cnn", 10, 3))
    _rewrite_spec(path, **changes)
    with pytest.raises(ValueError, match=message):
        load_model(path)


def test_resnet_spec_with_unknown_arch_is_an_error(tmp_path):
    path = tmp_path / "m.pt"
    save_model(path, get_model("resnet32", 10, 3))
    assert check_model_spec(torch.load(path, weights_only=True)["spec"])["arch"] == "resnet32"
    payload = torch.load(path, weights_only=True)
    payload["arch"] = "resnet33"
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    with pytest.raises(ValueError, match=r"its 'arch' \('resnet33'\) and its spec's \('resnet32'\) differ"):
        load_model(path)
    _rewrite_spec(path, arch="resnet33")
    with pytest.raises(ValueError, match=r"arch='resnet33' is not a registered model; allowed: .*'resnet32'"):
        load_model(path)


def test_hand_built_directions_are_checked_against_the_model(resnet20):
    x, y = _cifar(4)
    d = dict(random_directions(resnet20, 1, seed=0).vectors[0])
    transposed = {**d, "linear.weight": d["linear.weight"].T.contiguous()}  # right size, wrong shape
    with pytest.raises(ValueError,
                       match=r"direction 1\['linear.weight'\] has shape \(64, 10\), the model's is \(10, 64\)"):
        line(resnet20, Directions((transposed,)), x, y, resolution=3)
    with pytest.raises(ValueError, match=r"direction 1\['fc.weight'\] is not a parameter"):
        line(resnet20, Directions(({**d, "fc.weight": torch.zeros(10, 64)},)), x, y, resolution=3)
    missing = {k: v for k, v in d.items() if k != "layer1.0.conv1.weight"}
    with pytest.raises(ValueError, match=r"direction 1 has no entry for the parameters \['layer1.0.conv1.weight'\]"):
        line(resnet20, Directions((missing,)), x, y, resolution=3)
    nan = {**d, "conv1.weight": torch.full_like(d["conv1.weight"], float("nan"))}
    with pytest.raises(ValueError, match=r"direction 1\['conv1.weight'\] holds NaN"):
        line(resnet20, Directions((nan,)), x, y, resolution=3)
    # explicit_directions states the zeros: parameters it is not given stay fixed
    partial = explicit_directions(resnet20, {"linear.weight": d["linear.weight"]})
    assert set(partial.vectors[0]) == {k for k, _ in resnet20.named_parameters()}
    assert not partial.vectors[0]["conv1.weight"].any()
    line(resnet20, partial, x, y, resolution=3)


# --- 5. leftovers -------------------------------------------------------------------------------------


@pytest.mark.slow
def test_killed_atomic_write_leaves_nothing_for_the_next_run(tmp_run, monkeypatch):
    run = run_dir("r")
    code = ("import os, signal; from advkit.runs.artifacts import atomic_path\n"
            f"with atomic_path({str(run / 'models' / 'base.pt')!r}) as tmp:\n"
            "    tmp.write_bytes(b'half'); os.kill(os.getpid(), signal.SIGKILL)\n")
    killed = subprocess.run([sys.executable, "-c", code])
    assert killed.returncode == -signal.SIGKILL
    leftovers = list((run / "models").glob(".base.pt.*.tmp"))
    assert len(leftovers) == 1 and not (run / "models" / "base.pt").exists()
    alive = run / f".other.pt.{os.getppid()}.abcdefgh.tmp"  # a write of a process still running
    unrelated = run / ".notes.tmp.txt"
    for p in (alive, unrelated):
        p.write_text("x")
        os.utime(p, (time.time() - 3600,) * 2)
    monkeypatch.setattr(artifacts, "_PROCESS_START", time.time() + 1)  # the next run starts later
    run_dir("r")
    assert not leftovers[0].exists() and alive.exists() and unrelated.exists()
    assert list((run / "models").iterdir()) == []


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640)])
def test_atomic_writes_respect_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        save_model(tmp_path / "m.pt", get_model("small_cnn", 10, 3))
        plain = tmp_path / "plain.txt"
        plain.write_text("x")
    finally:
        os.umask(old)
    assert (tmp_path / "m.pt").stat().st_mode & 0o777 == mode == plain.stat().st_mode & 0o777
    assert (tmp_path / "m.pt.sha256").stat().st_mode & 0o777 == mode


def test_verified_names_a_missing_file_and_its_notebook(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"landscapes/x.nc: re-run notebook 04_visualize"):
        verified(tmp_path / "landscapes" / "x.nc")
