"""The landscape slicer (advkit.plots.slicer): driven by setting widget values, checked on the plot data."""

import io
import json

import numpy as np
import pytest
import torch
import xarray as xr

from advkit.landscape.directions import random_directions
from advkit.landscape.files import write_surface
from advkit.landscape.surfaces import grid, line
from advkit.models import get_model
from advkit.plots.slicer import LandscapeSlicer, profile
from advkit.runs.run import Run


def _surface(path, scale, model):
    a = np.linspace(-1, 1, 9)
    b = np.linspace(-0.5, 0.5, 5)
    aa, bb = np.meshgrid(a, b, indexing="ij")
    loss = 0.1 + scale * (aa ** 2 + 3 * bb ** 2) + 0.2 * aa * bb
    ds = xr.Dataset({"loss": (("alpha", "beta"), loss), "accuracy": (("alpha", "beta"), 1 / (1 + loss)),
                     "computed": (("alpha", "beta"), np.ones_like(loss, dtype=np.int8))},
                    coords={"alpha": a, "beta": b}, attrs={"model": model, "direction_norm": "filter"})
    write_surface(ds, path)  # with its checksum, as advkit.landscape writes surfaces
    return ds


@pytest.fixture()
def files(tmp_path):
    paths = {"base": tmp_path / "base.nc", "pgd": tmp_path / "pgd.nc"}
    data = {name: _surface(p, s, name) for (name, p), s in zip(paths.items(), (1.0, 4.0))}
    return paths, data


def test_slider_changes_the_profile_to_the_expected_slice(files):
    paths, data = files
    s = LandscapeSlicer(paths, models=["base", "pgd"])
    assert set(s.lines) == {"base", "pgd"}
    np.testing.assert_allclose(s.lines["pgd"].get_ydata(), data["pgd"].loss.sel(beta=0).values)

    s.position_widget.value = 0.25
    for name in ("base", "pgd"):
        x, y = s.lines[name].get_data()
        np.testing.assert_allclose(x, data[name].alpha.values)
        np.testing.assert_allclose(y, data[name].loss.sel(beta=0.25).values)
    assert list(s.slice_line.get_ydata()) == [0.25, 0.25]

    s.axis_widget.value = "beta"  # profiles along beta, the slider now cuts alpha
    assert (s.position_widget.min, s.position_widget.max) == (-1, 1)
    s.position_widget.value = -0.75
    np.testing.assert_allclose(s.lines["base"].get_xdata(), data["base"].beta.values)
    np.testing.assert_allclose(s.lines["base"].get_ydata(), data["base"].loss.sel(alpha=-0.75).values)
    assert list(s.slice_line.get_xdata()) == [-0.75, -0.75]

    s.quantity_widget.value = "accuracy"
    np.testing.assert_allclose(s.lines["pgd"].get_ydata(), data["pgd"].accuracy.sel(alpha=-0.75).values)

    s.models_widget.value = ("pgd",)
    assert list(s.lines) == ["pgd"] and s.ax_map.get_title() == "pgd"
    s.quantity_widget.value = "loss"
    s.log_widget.value = True
    assert s.ax_profile.get_yscale() == "log"


def test_profile_snaps_to_the_nearest_grid_value(files):
    _, data = files
    x, y = profile(data["base"], "loss", "alpha", 0.26)
    np.testing.assert_allclose(y, data["base"].loss.sel(beta=0.25).values)
    with pytest.raises(ValueError, match="axis='gamma'"):
        profile(data["base"], "loss", "gamma", 0.0)


def test_slicer_reads_files_written_by_landscape(tmp_path, files):
    model = get_model("small_cnn", 10, 1, width=4).eval()
    x, y = torch.rand(16, 1, 8, 8), torch.randint(0, 10, (16,))
    grid(model, random_directions(model, 2, seed=0), x, y, resolution=3, path=tmp_path / "m.nc", model_name="m")
    s = LandscapeSlicer(tmp_path)  # a folder: every .nc file in it
    assert s.models_widget.options == ("base", "m", "pgd")
    assert "loss" in s.quantity_widget.options and "computed" not in s.quantity_widget.options
    with pytest.raises(ValueError, match="quantity='robust_loss'"):
        LandscapeSlicer(tmp_path, quantity="robust_loss")
    line(model, random_directions(model, 1, seed=0), x, y, resolution=3, path=tmp_path / "line.nc")
    with pytest.raises(ValueError, match="1D surface"):
        LandscapeSlicer([tmp_path / "line.nc"])


@pytest.mark.slow
def test_slicer_executes_under_papermill(files, tmp_path):
    nbformat = pytest.importorskip("nbformat")
    papermill = pytest.importorskip("papermill")
    paths, _ = files
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(
        "from advkit.plots.slicer import LandscapeSlicer\n"
        f"slicer = LandscapeSlicer({json.dumps({k: str(v) for k, v in paths.items()})})\n"
        "slicer.position_widget.value = 0.25\n"
        "slicer")]
    src, out = tmp_path / "slicer.ipynb", tmp_path / "slicer_out.ipynb"
    nbformat.write(nb, src)
    papermill.execute_notebook(str(src), str(out), kernel_name="python3", progress_bar=False,
                               cwd=str(tmp_path), execution_timeout=120)
    executed = nbformat.read(out, as_version=4)
    outputs = executed.cells[0].outputs
    assert not [o for o in outputs if o.get("output_type") == "error"]
    # the figure reaches the front end as an Image widget (no Output widget: see advkit.plots.slicer)
    models = executed.metadata["widgets"]["application/vnd.jupyter.widget-state+json"]["state"].values()
    names = {m["model_name"] for m in models}
    assert "ImageModel" in names and "OutputModel" not in names


def test_log_scale_from_the_start(files):
    paths, data = files
    s = LandscapeSlicer(paths, models=["pgd"], log=True)
    assert s.log_widget.value and s.ax_profile.get_yscale() == "log"
    assert s.ax_map.collections[0].norm.__class__.__name__ == "LogNorm"


def _grid_file(path, model, n, quantities=("loss", "accuracy"), scale=1.0):
    """A paper-profile-sized 2D surface file (n x n over [-1, 1]^2), as `landscape.grid` writes it."""
    a = np.linspace(-1, 1, n)
    aa, bb = np.meshgrid(a, a, indexing="ij")
    loss = 0.1 + scale * (aa ** 2 + 3 * bb ** 2)
    values = {"loss": loss, "accuracy": 1 / (1 + loss), "robust_loss": 2 * loss, "robust_accuracy": 1 / (1 + 2 * loss)}
    ds = xr.Dataset({q: (("alpha", "beta"), values[q]) for q in quantities}
                    | {"computed": (("alpha", "beta"), np.ones_like(loss, dtype=np.int8))},
                    coords={"alpha": a, "beta": a}, attrs={"model": model, "kind": "grid"})
    write_surface(ds, path)  # with its checksum, as advkit.landscape writes surfaces
    return ds


def _line_file(path, model):
    a = np.linspace(-1, 1, 51)
    write_surface(xr.Dataset({"loss": ("alpha", a ** 2), "computed": ("alpha", np.ones(51, dtype=np.int8))},
                               coords={"alpha": a}, attrs={"model": model, "kind": "line"}), path)


@pytest.fixture()
def landscapes(tmp_path):
    """A run's landscapes/ folder as notebook 04 leaves it with the paper profile: 51 x 51 clean grids,
    21 x 21 robust grids, 1D lines and interpolations, and a sensitivity/ subfolder."""
    folder = tmp_path / "landscapes"
    (folder / "sensitivity").mkdir(parents=True)
    for i, model in enumerate(("base", "pgd_at")):
        _grid_file(folder / f"{model}_grid.nc", model, 51, scale=1 + i)
        _grid_file(folder / f"{model}_robust_grid.nc", model, 21, ("robust_loss", "robust_accuracy"), scale=1 + i)
        _line_file(folder / f"{model}_line.nc", model)
    _line_file(folder / "pgd_at_interpolation.nc", "base -> pgd_at")
    _line_file(folder / "sensitivity" / "base_filter_0.5.nc", "base")
    return folder


def _cbar_size(s) -> tuple[float, float]:
    """The colour bar's (height, width) in pixels, once the figure is laid out as for the widget's PNG."""
    s.fig.savefig(io.BytesIO(), format="png")
    box = s.ax_cbar.get_window_extent()
    return float(box.height), float(box.width)


@pytest.mark.slow
def test_colour_bar_keeps_its_size_over_many_redraws(landscapes):
    s = LandscapeSlicer(landscapes, log=True)
    first = _cbar_size(s)
    assert first[0] > 100
    positions = s.surface("base")["beta"].values
    for i in range(32):  # every kind of redraw: slider, quantity (log and linear), axis, models
        s.position_widget.value = float(positions[i % len(positions)])
        if i % 8 == 3:
            s.quantity_widget.value = "accuracy" if s.quantity_widget.value == "loss" else "loss"
        if i % 8 == 5:
            s.axis_widget.value = "beta" if s.axis_widget.value == "alpha" else "alpha"
        if i % 8 == 7:
            s.models_widget.value = ("pgd_at",) if len(s.selected) == 2 else ("base", "pgd_at")
        if i % 4 == 0:
            assert _cbar_size(s) == pytest.approx(first, abs=1), f"after {s.draws} redraws"
    assert s.draws > 32
    assert _cbar_size(s) == pytest.approx(first, abs=1)  # a shrinking bar lost 9% per redraw


def test_one_redraw_per_user_action(files):
    paths, data = files
    s = LandscapeSlicer(paths, models=["base", "pgd"], position=0.25)
    assert s.draws == 1 and s.position_widget.value == 0.25 and s.position_widget.description == "at β ="
    s.axis_widget.value = "beta"  # the slider is refitted and its value snapped: still one redraw
    assert s.draws == 2
    assert (s.position_widget.min, s.position_widget.max, s.position_widget.value) == (-1, 1, 0.25)
    assert s.position_widget.description == "at α ="
    np.testing.assert_allclose(s.lines["pgd"].get_ydata(), data["pgd"].loss.sel(alpha=0.25).values)
    s.axis_widget.value = "alpha"
    assert s.draws == 3 and s.position_widget.value == 0.25 and s.position_widget.description == "at β ="
    s.position_widget.value = 0.26  # typed off the grid: snapped to the nearest grid value, one redraw
    assert s.draws == 4 and s.position_widget.value == 0.25
    for widget, value in ((s.quantity_widget, "accuracy"), (s.models_widget, ("pgd",)), (s.log_widget, True)):
        before = s.draws
        widget.value = value
        assert s.draws == before + 1, widget.description


def test_a_runs_landscapes_folder_is_accepted(landscapes):
    s = LandscapeSlicer(landscapes)  # 1D lines, interpolations and sensitivity/ are skipped
    assert LandscapeSlicer(Run(landscapes.parent)).surfaces.keys() == s.surfaces.keys()  # a run: its landscapes/
    assert s.models_widget.options == ("base", "pgd_at")
    assert s.quantity_widget.options == ("loss", "accuracy", "robust_loss", "robust_accuracy")
    assert s.position_widget.step == pytest.approx(2 / 50)
    s.quantity_widget.value = "robust_loss"  # a model's robust_grid: 21 x 21, the slider follows it
    assert s.position_widget.step == pytest.approx(2 / 20) and s.draws == 2
    x, y = s.lines["pgd_at"].get_data()
    assert len(x) == 21
    np.testing.assert_allclose(y, s.surface("pgd_at").robust_loss.sel(beta=0).values)
    with pytest.raises(ValueError, match="only 1D"):
        LandscapeSlicer(landscapes / "sensitivity")


def test_log_scale_is_for_losses_only(landscapes):
    s = LandscapeSlicer(landscapes, quantity="accuracy", log=True)
    assert s.log_widget.disabled and not s.log_applied
    assert s.ax_profile.get_yscale() == "linear"
    assert s.ax_map.collections[0].norm.__class__.__name__ == "Normalize"
    assert "log" not in s.ax_cbar.get_ylabel()
    s.quantity_widget.value = "robust_loss"
    assert not s.log_widget.disabled and s.log_applied and s.ax_profile.get_yscale() == "log"
    s.quantity_widget.value = "robust_accuracy"
    assert s.log_widget.disabled and s.ax_profile.get_yscale() == "linear"
