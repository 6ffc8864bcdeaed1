"""Surfaces and the flatness table across processes (issue 13): 2 gloo ranks on the CPU compute
the same files, bit for bit, as one process; a killed multi-rank run resumes; the torchrun command
computes what notebooks 04 and 05 would, so that they find the files complete.

The ranks are spawned with torch.multiprocessing (a file rendezvous, no port), each on one thread
as the test process (tests/conftest.py), so that the float path is the same."""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import functools
import io
import json
import math
import os
import shutil
import signal
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from advkit import ranks
from advkit.attacks.pgd import pgd
from advkit.data import Dataset
from advkit.landscape.directions import random_directions
from advkit.landscape.files import load_surface
from advkit.landscape.settings import SurfaceSettings
from advkit.landscape.surfaces import compute_surface
from advkit.models import get_model
from advkit.pipeline import params, stages
from advkit.pipeline.distributed import profile_values
from advkit.pipeline.driver import parse_assignments
from advkit.runs.checkpoints import save_model
from advkit.runs.run import Run
from advkit.studies import zoo

TIMING_ATTRS = ("created", "elapsed_s")  # wall-clock facts, not values
GRID_ROWS = 5


# ------------------------------------------------------------------ what every rank computes
def tiny_inputs():
    """A small CNN on CIFAR-shaped inputs (3 x 32 x 32), the same in every process."""
    torch.manual_seed(0)
    model = get_model("small_cnn", 10, 3, width=4).eval()
    g = torch.Generator().manual_seed(1)
    return model, torch.rand(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g)


def surfaces(folder: Path, callback=None, only_grid: bool = False) -> None:
    """A 5 x 5 clean grid (5 rows: an uneven last round on 2 ranks), a 3 x 3 robust grid (PGD
    re-run at every point, 2 points per attack call) and a 13-point line computed 2 points per
    forward (vmap)."""
    model, x, y = tiny_inputs()
    d2, d1 = random_directions(model, 2, seed=0), random_directions(model, 1, seed=0)
    folder.mkdir(parents=True, exist_ok=True)
    compute_surface(model, d2, x, y, SurfaceSettings(resolution=GRID_ROWS), path=folder / "grid.nc", callback=callback)
    if only_grid:
        return
    attack = functools.partial(pgd, eps=0.03, steps=2, seed=0)
    robust = SurfaceSettings(resolution=3, quantities=("robust_loss", "robust_accuracy"),
                             points_per_forward=2)  # rows of 3: one batched attack on 2 points, one alone
    compute_surface(model, d2, x[:4], y[:4], robust, attack=attack, path=folder / "robust_grid.nc")
    compute_surface(model, d1, x, y, SurfaceSettings(resolution=13, points_per_forward=2), path=folder / "line.nc")


TINY_ZOO = zoo.ZooSettings(dataset="cifar10", n_eval=8, pgd_eps=0.03, pgd_steps=2, pgd_alpha=None, pgd_restarts=1,
                           n_autoattack=4, aa_steps=2, aa_targets=2, flatness_samples=2, worst_steps=2,
                           hessian_iters=3, hessian_samples=3)


def cifar_shaped() -> Dataset:
    g = torch.Generator().manual_seed(2)
    images = lambda n: torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8)  # noqa: E731
    labels = lambda n: torch.randint(0, 10, (n,), generator=g)  # noqa: E731
    return Dataset("cifar10", images(8), labels(8), images(8), labels(8), [str(i) for i in range(10)])


def flatness(folder: Path) -> None:
    zoo.flatness_table(Run(folder), cifar_shaped(), TINY_ZOO, progress=False, optional=tuple(zoo.RUN_RESULTS))


def _killed_grid(folder: Path) -> None:
    """Rank 1 dies (SIGKILL) after the second round: rank 0 wrote the first round before it."""
    def die(done, total):
        if ranks.rank() == 1 and done >= 4 * GRID_ROWS:
            os.kill(os.getpid(), signal.SIGKILL)
    surfaces(folder, callback=die, only_grid=True)


def _resumed_grid(folder: Path) -> None:
    calls = []
    surfaces(folder, callback=lambda done, total: calls.append(done), only_grid=True)
    if ranks.is_writer():
        (folder / "calls.json").write_text(json.dumps(calls))


def _surfaces_and_an_error(folder: Path) -> None:
    surfaces(folder)
    try:  # rank 0 divides by zero: every rank raises, none waits for a result that never comes
        list(ranks.in_rounds([0, 1], lambda i: 1 / i))
    except Exception as err:  # noqa: BLE001
        (folder / f"error_{ranks.rank()}.txt").write_text(type(err).__name__)


def _disagreeing_ranks(folder: Path) -> None:
    """Rank 0 asks for a 5 x 5 grid, rank 1 for a 7 x 7 one, into the same file: the agreement on
    the surface's settings refuses; without it, the writer's check of each received row does; the
    torchrun command refuses ranks started with other parameters. Each rank records what it saw."""
    from advkit.pipeline.distributed import main

    model, x, y = tiny_inputs()
    d2 = random_directions(model, 2, seed=0)
    rank = ranks.rank()  # kept: the failed command ends the process group
    resolution = GRID_ROWS if rank == 0 else GRID_ROWS + 2
    seen = {}

    def attempt(step, compute):
        try:
            seen[step] = f"finished: {compute()!r}"
        except Exception as err:  # noqa: BLE001 - recorded for the test
            seen[step] = f"{type(err).__name__}: {err}"

    grid = lambda: compute_surface(model, d2, x, y, SurfaceSettings(resolution=resolution),  # noqa: E731
                                   path=folder / "grid.nc")
    attempt("settings", grid)
    agree, ranks.agree = ranks.agree, lambda what, values: None  # as before the agreement existed
    try:
        attempt("rows", grid)
    finally:
        ranks.agree = agree
    command = ["surfaces", "--run-name", "disagree", "-p", f"resolution={4 * resolution + 1}"]  # 21 or 29: valid
    with contextlib.redirect_stderr(io.StringIO()) as err:
        attempt("command", lambda: main(command))
    seen["command"] += " " + err.getvalue()
    (folder / f"seen_{rank}.json").write_text(json.dumps(seen))


JOBS = {"surfaces": _surfaces_and_an_error, "flatness": flatness, "killed": _killed_grid, "resumed": _resumed_grid,
        "disagree": _disagreeing_ranks}


def _rank(rank: int, world: int, rendezvous: str, job: str, folder: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=120))
    try:
        JOBS[job](Path(folder))
    finally:
        if dist.is_initialized():  # the torchrun command ends the group itself when it fails
            dist.destroy_process_group()


def spawn(job: str, folder: Path, tmp_path: Path, world: int = 2) -> None:
    rendezvous = tmp_path / f"rendezvous_{job}_{len(list(tmp_path.glob('rendezvous_*')))}"
    rendezvous.touch()
    rendezvous.unlink()  # the name is reserved; the file store creates it
    mp.spawn(_rank, args=(world, str(rendezvous), job, str(folder)), nprocs=world, join=True)


def assert_same_surface(a: Path, b: Path) -> None:
    one, two = load_surface(a), load_surface(b)
    assert set(one.data_vars) == set(two.data_vars)
    for name in one.data_vars:
        assert np.array_equal(one[name].values, two[name].values), f"{a.name}: {name} differs"
    for name in one.coords:
        assert np.array_equal(one[name].values, two[name].values)
    strip = lambda attrs: {k: np.asarray(v).tolist() for k, v in attrs.items() if k not in TIMING_ATTRS}  # noqa: E731
    assert strip(one.attrs) == strip(two.attrs)
    assert one["computed"].values.all()


# ------------------------------------------------------------------ the tests
def test_outside_torchrun_there_is_one_rank_and_nothing_is_sent():
    assert not ranks.active() and ranks.rank() == 0 and ranks.world_size() == 1 and ranks.is_writer()
    assert ranks.gather(3) == [3] and ranks.broadcast("x") == "x"
    ranks.agree("settings", {"resolution": 5})  # alone there is no one to disagree with
    assert [r for r in ranks.in_rounds([1, 2, 3], lambda i: i * i)] == [[(1, 1)], [(2, 4)], [(3, 9)]]
    with pytest.raises(ZeroDivisionError):
        list(ranks.in_rounds([0], lambda i: 1 / i))
    assert ranks.device("cuda") == torch.device("cuda")  # no group: the device as given


@pytest.mark.slow
def test_two_gloo_ranks_compute_the_same_surfaces_as_one_process(tmp_path):
    surfaces(tmp_path / "one")
    spawn("surfaces", tmp_path / "two", tmp_path)
    for name in ("grid.nc", "robust_grid.nc", "line.nc"):
        assert_same_surface(tmp_path / "one" / name, tmp_path / "two" / name)
    assert [(tmp_path / "two" / f"error_{r}.txt").read_text() for r in (0, 1)] == ["ZeroDivisionError", "RankFailed"]
    robust = load_surface(tmp_path / "two" / "robust_grid.nc")
    assert robust.attrs["robust"] == "attack re-run at each point"
    assert np.isfinite(robust["robust_loss"].values).all()


@pytest.mark.slow
def test_a_killed_two_rank_surface_resumes_from_the_rounds_on_disk(tmp_path):
    surfaces(tmp_path / "one", only_grid=True)
    with pytest.raises(Exception):  # rank 1 is killed; mp.spawn stops rank 0 and reports it
        spawn("killed", tmp_path / "two", tmp_path)
    partial = load_surface(tmp_path / "two" / "grid.nc")["computed"].values
    rows_done = int(partial.all(axis=1).sum())
    assert partial.sum() == rows_done * GRID_ROWS  # only whole rows (blocks) are ever written
    assert rows_done in (2, 4)  # the first round for sure, the second maybe
    spawn("resumed", tmp_path / "two", tmp_path)
    calls = json.loads((tmp_path / "two" / "calls.json").read_text())
    assert len(calls) == math.ceil((GRID_ROWS - rows_done) / 2)  # only the missing rows, two per round
    assert calls[-1] == GRID_ROWS ** 2
    assert_same_surface(tmp_path / "one" / "grid.nc", tmp_path / "two" / "grid.nc")


@pytest.mark.slow
def test_ranks_with_other_settings_stop_before_writing_and_leave_no_wrong_points(tmp_path):
    folder = tmp_path / "two"
    folder.mkdir()
    spawn("disagree", folder, tmp_path)
    seen = [json.loads((folder / f"seen_{r}.json").read_text()) for r in (0, 1)]
    for rank_seen in seen:  # every rank stops, with the error naming the setting
        assert rank_seen["settings"].startswith("RanksDisagree: the ranks disagree on the surface grid.nc")
        assert "rank 1 has resolution=7 where rank 0 has 5" in rank_seen["settings"]
        assert rank_seen["command"].startswith("finished: 2 error: the ranks disagree on the parameters")
        assert "rank 1 has resolution=29 where rank 0 has 21" in rank_seen["command"]
    assert seen[0]["rows"].startswith("ValueError: rank 1 sent 7 point(s)")  # 7 x 7's second row, refused
    assert seen[1]["rows"].startswith("ValueError: rank 0 sent 5 point(s)")
    assert not (folder / "grid.nc").exists()  # not one point of the wrong grid was written
    surfaces(folder, only_grid=True)  # a correct one-process run then equals a clean one
    surfaces(tmp_path / "clean", only_grid=True)
    assert_same_surface(tmp_path / "clean" / "grid.nc", folder / "grid.nc")


def _zoo(folder: Path) -> Run:
    run = Run(folder)
    for seed, name in enumerate(("base", "fgsm", "pgd_at")):  # 3 models: an uneven last round on 2 ranks
        torch.manual_seed(seed)
        save_model(run.model(name), get_model("small_cnn", 10, 3, width=4), {"seed": seed}, epoch=1)
    return run


@pytest.mark.slow
def test_flatness_table_split_over_two_ranks_equals_one_process(tmp_path):
    one = _zoo(tmp_path / "one")
    shutil.copytree(one.root, tmp_path / "two")  # the same checkpoint files (and hashes)
    two = Run(tmp_path / "two")
    flatness(one.root)
    spawn("flatness", two.root, tmp_path)
    a, b = (r.read_table(r.flatness, index_col="model").drop(columns="compute_s") for r in (one, two))
    assert list(a.index) == ["base", "fgsm", "pgd_at"]
    pd.testing.assert_frame_equal(a, b, check_exact=True)
    assert np.isfinite(a["robust_loss_test"]).all()


def test_the_studies_read_only_their_notebooks_parameters():
    cells = params.notebook_parameters([Path("notebooks/04_visualize.ipynb"),
                                        Path("notebooks/05_flatness_correlation.ipynb")])
    assert set(stages.LANDSCAPE_PARAMETERS) <= set(cells["04_visualize"])
    assert set(stages.FLATNESS_PARAMETERS) <= set(cells["05_flatness_correlation"])
    with pytest.raises(KeyError, match="notebook 04_visualize needs .*'span'"):
        stages.LandscapeParameters.from_values({k: 0 for k in stages.LANDSCAPE_PARAMETERS if k != "span"})
    assert stages.FlatnessParameters.from_values({k: 0 for k in stages.FLATNESS_PARAMETERS}).recompute == 0


@pytest.mark.parametrize("notebook, cls", [("04_visualize", stages.LandscapeParameters),
                                           ("05_flatness_correlation", stages.FlatnessParameters)])
def test_the_notebooks_pass_every_parameter_by_name(notebook, cls):
    """The notebook builds its settings keyword by keyword from its own parameter variables."""
    cells = json.loads(Path(f"notebooks/{notebook}.ipynb").read_text())["cells"]
    tree = ast.parse("\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code"))
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
             and n.func.attr == cls.__name__]
    assert len(calls) == 1 and not calls[0].args
    passed = {k.arg: k.value.id for k in calls[0].keywords if isinstance(k.value, ast.Name)}
    assert list(passed) == [f.name for f in dataclasses.fields(cls)] and all(k == v for k, v in passed.items())


# ------------------------------------------------------------------ the torchrun command
QUICK_TINY = ["n_images=16", "resolution=11", "radius=0.3", "line_resolution=21", "robust_resolution=3",
              "robust_n_images=8", "sensitivity_resolution=5", "sensitivity_norms=[filter]", "sensitivity_radii=[0.3]",
              "n_subset=8", "n_autoattack=4", "aa_steps=2", "aa_targets=2", "pgd_steps=2", "pgd_restarts=1",
              "flatness_samples=2", "worst_steps=2", "hessian_iters=3", "hessian_samples=3",
              "curvature_images=8", "invariance_images=8"]


@pytest.mark.slow
def test_torchrun_commands_compute_what_notebooks_04_and_05_then_find_complete(tmp_run):
    run = Run.named("tiny")
    for seed, name in enumerate(("base", "fgsm")):
        torch.manual_seed(seed)
        save_model(run.model(name), get_model("small_cnn", 10, 1, width=4), {"seed": seed}, epoch=1)
    ssim = pd.DataFrame({"fgsm": [0.1]}, index=pd.Index(["base"], name="model"))  # notebook 02's, which 05 needs
    run.write_table(run.attack_table("table2_ssim_distance"), ssim)
    overrides = [a for p in QUICK_TINY for a in ("-p", p)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    done = subprocess.run([*torchrun, "-m", "advkit.pipeline.distributed", "surfaces", "flatness", "--profile", "quick",
                           "--run-name", "tiny", *overrides], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    for command in ("surfaces", "flatness"):
        assert f"{command}: " in done.stdout and "(2 process(es))" in done.stdout
    files = sorted(run.landscapes.rglob("*.nc")) + [run.flatness]
    assert len(files) == 2 * 3 + 1 + 2 + 1  # grid, line, robust grid per model, 1 interpolation, 2 sensitivity lines
    before = {f: (f.stat().st_mtime_ns if f.suffix == ".nc" else 0, f.read_bytes()) for f in files}
    values = profile_values("quick", "tiny", parse_assignments(QUICK_TINY))
    study = stages.landscape_study(stages.LandscapeParameters.from_values(values))  # as notebook 04: all complete
    assert len(study.surfaces()["grid"]) == 2 and len(study.sensitivity_surfaces()) == 2
    table = stages.flatness_study(stages.FlatnessParameters.from_values(values)).table(progress=False)
    assert list(table.index) == ["base", "fgsm"]
    # nothing recomputed: the surface files untouched, flatness.csv rewritten with the same rows
    assert {f: (f.stat().st_mtime_ns if f.suffix == ".nc" else 0, f.read_bytes()) for f in files} == before


def test_the_command_checks_its_values_as_the_pipeline_does(tmp_run, capsys):
    from advkit.pipeline.distributed import main

    assert main(["surfaces", "--run-name", "../x"]) == 2
    assert main(["flatness", "-p", "resolution=1"]) == 2
    err = capsys.readouterr().err
    assert "error: run='../x' is not a run name" in err and "error: parameter resolution must be an integer" in err
