"""The landscape slicer (advkit.widgets): driven by setting widget values, checked on the plot data."""

import json

import numpy as np
import pytest
import torch
import xarray as xr

from advkit import landscape as L
from advkit.directions import random_directions
from advkit.models import get_model
from advkit.widgets import LandscapeSlicer, profile


def _surface(path, scale, model):
    a = np.linspace(-1, 1, 9)
    b = np.linspace(-0.5, 0.5, 5)
    aa, bb = np.meshgrid(a, b, indexing="ij")
    loss = 0.1 + scale * (aa ** 2 + 3 * bb ** 2) + 0.2 * aa * bb
    ds = xr.Dataset({"loss": (("alpha", "beta"), loss), "accuracy": (("alpha", "beta"), 1 / (1 + loss)),
                     "computed": (("alpha", "beta"), np.ones_like(loss, dtype=np.int8))},
                    coords={"alpha": a, "beta": b}, attrs={"model": model, "direction_norm": "filter"})
    ds.to_netcdf(path, engine="h5netcdf")
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
    L.grid(model, random_directions(model, 2, seed=0), x, y, resolution=3, path=tmp_path / "m.nc", model_name="m")
    s = LandscapeSlicer(tmp_path)  # a folder: every .nc file in it
    assert s.models_widget.options == ("base", "m", "pgd")
    assert "loss" in s.quantity_widget.options and "computed" not in s.quantity_widget.options
    with pytest.raises(ValueError, match="quantity='robust_loss'"):
        LandscapeSlicer(tmp_path, quantity="robust_loss")
    L.line(model, random_directions(model, 1, seed=0), x, y, resolution=3, path=tmp_path / "line.nc")
    with pytest.raises(ValueError, match="1D surface"):
        LandscapeSlicer([tmp_path / "line.nc"])


def test_slicer_executes_under_papermill(files, tmp_path):
    nbformat = pytest.importorskip("nbformat")
    papermill = pytest.importorskip("papermill")
    paths, _ = files
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(
        "from advkit.widgets import LandscapeSlicer\n"
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
    # the figure reaches the front end as an Image widget (no Output widget: see advkit.widgets)
    models = executed.metadata["widgets"]["application/vnd.jupyter.widget-state+json"]["state"].values()
    names = {m["model_name"] for m in models}
    assert "ImageModel" in names and "OutputModel" not in names


def test_log_scale_from_the_start(files):
    paths, data = files
    s = LandscapeSlicer(paths, models=["pgd"], log=True)
    assert s.log_widget.value and s.ax_profile.get_yscale() == "log"
    assert s.ax_map.collections[0].norm.__class__.__name__ == "LogNorm"
