"""The landscape slicer: pick models and a quantity, slide a slice through saved 2D surfaces.

Works from surface files only (written by `advkit.landscape`), never recomputes. The left
panel shows the first picked model's 2D contour with the slice line, the right panel the 1D
profiles of all picked models along it, on one colour scale / one y axis. Without a
Jupyter frontend (papermill, pytest) it still builds and draws: the figure and the plotted
lines are attributes (`fig`, `lines`, `slice_line`) that tests can read.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from pathlib import Path

import ipywidgets as W
import numpy as np
import xarray as xr
from matplotlib.figure import Figure

from advkit.landscape import QUANTITIES, load_surface
from advkit.plots import _axis_label, _colorbar, quantity_label, shared_norm

AXES = ("alpha", "beta")


def _load(surfaces) -> dict[str, xr.Dataset]:
    if isinstance(surfaces, (str, Path)):
        folder = Path(surfaces)
        if not folder.is_dir():
            raise ValueError(f"surfaces={str(surfaces)!r}: give a folder of .nc files, a list of files or "
                             "a mapping name -> file")
        surfaces = sorted(folder.glob("*.nc"))
    if isinstance(surfaces, Mapping):
        items = [(str(k), Path(v)) for k, v in surfaces.items()]
    elif isinstance(surfaces, Sequence):
        items = [(None, Path(p)) for p in surfaces]
    else:
        raise ValueError(f"surfaces must be a folder, a list of files or a mapping name -> file, "
                         f"got {type(surfaces).__name__}")
    out = {}
    for name, path in items:
        ds = load_surface(path)
        if "beta" not in ds.dims:
            raise ValueError(f"{path} is a 1D surface; the slicer needs 2D surfaces (alpha and beta)")
        name = name or str(ds.attrs.get("model", path.stem))
        if name in out:
            name = f"{name} ({path.stem})"
        out[name] = ds
    if not out:
        raise ValueError("no surface files given (or none found in the folder)")
    return out


def profile(ds: xr.Dataset, quantity: str, axis: str, position: float) -> tuple[np.ndarray, np.ndarray]:
    """The 1D slice of a 2D surface along `axis` at the grid value of the other axis nearest to
    `position`: (coordinates along `axis`, values)."""
    if axis not in AXES:
        raise ValueError(f"axis={axis!r} is not available; choose one of {list(AXES)}")
    other = "beta" if axis == "alpha" else "alpha"
    cut = ds[quantity].sel({other: position}, method="nearest")
    return ds[axis].values, cut.transpose(axis).values


class LandscapeSlicer:
    """Interactive slicer over saved 2D surfaces (ipywidgets + matplotlib).

    `surfaces`: a folder of .nc files, a list of files, or a mapping name -> file. Widgets:
    `models_widget` (SelectMultiple), `quantity_widget` (Dropdown), `axis_widget` (the axis the
    profile runs along), `position_widget` (where the other axis is cut), `log_widget`.
    """

    def __init__(self, surfaces, *, quantity: str = "loss", axis: str = "alpha", position: float = 0.0,
                 models: Sequence[str] | None = None, log: bool = False):
        self.surfaces = _load(surfaces)
        names = list(self.surfaces)
        common = set.intersection(*(set(ds.data_vars) for ds in self.surfaces.values()))
        quantities = [q for q in QUANTITIES if q in common] + sorted(common - set(QUANTITIES) - {"computed"})
        if quantity not in quantities:
            raise ValueError(f"quantity={quantity!r} is not in every surface; available: {quantities}")
        if axis not in AXES:
            raise ValueError(f"axis={axis!r} is not available; choose one of {list(AXES)}")
        models = list(models) if models is not None else names[:3]
        unknown = [m for m in models if m not in names]
        if unknown or not models:
            raise ValueError(f"models={models!r}: choose one or more of {names}")
        self.models_widget = W.SelectMultiple(options=names, value=tuple(models), description="models",
                                              rows=min(len(names), 6))
        self.quantity_widget = W.Dropdown(options=quantities, value=quantity, description="quantity")
        self.axis_widget = W.ToggleButtons(options=list(AXES), value=axis, description="profile along")
        self.position_widget = W.FloatSlider(description="at", continuous_update=False, readout_format=".3f")
        self.log_widget = W.Checkbox(value=bool(log), description="log scale")
        self._set_slider_range(position)
        self.fig = Figure(figsize=(10, 4), layout="constrained")
        self.fig.get_layout_engine().set(wspace=0.06)  # room between the colour bar and the profile
        self.ax_map, self.ax_cbar, self.ax_profile = self.fig.subplots(
            1, 3, gridspec_kw={"width_ratios": [1, 0.05, 1.1]})
        self.lines: dict = {}
        self.slice_line = None
        # The figure is shown as PNG bytes in an Image widget, not through an Output widget: headless
        # clients (nbclient, under papermill and nbval) mimic Output widgets with message hooks that
        # can leave a cell waiting forever (jupyter/nbclient#312; notebook 04 hung so in 2 of 5 runs).
        self.image = W.Image(format="png")
        self.widget = W.VBox([W.HBox([self.models_widget,
                                      W.VBox([self.quantity_widget, self.axis_widget, self.position_widget,
                                              self.log_widget])]),
                              self.image])
        for w in (self.models_widget, self.quantity_widget, self.position_widget, self.log_widget):
            w.observe(self._changed, names="value")
        self.axis_widget.observe(self._axis_changed, names="value")
        self.update()

    # -- state ------------------------------------------------------------------------------
    @property
    def selected(self) -> list[str]:
        return list(self.models_widget.value)

    @property
    def other_axis(self) -> str:
        return "beta" if self.axis_widget.value == "alpha" else "alpha"

    def _set_slider_range(self, position: float) -> None:
        first = self.surfaces[(list(self.models_widget.value) or list(self.surfaces))[0]]
        coords = first["beta" if self.axis_widget.value == "alpha" else "alpha"].values
        step = float(np.min(np.diff(coords))) if len(coords) > 1 else 1.0
        slider = self.position_widget
        lo, hi = float(coords.min()), float(coords.max())
        # order matters for traitlets validation: widen first, then narrow
        slider.min, slider.max = min(lo, slider.min), max(hi, slider.max)
        slider.min, slider.max, slider.step = lo, hi, step
        slider.value = float(coords[np.abs(coords - position).argmin()])

    def profile(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """The expected slice of model `name` for the current widget values."""
        return profile(self.surfaces[name], self.quantity_widget.value, self.axis_widget.value,
                       self.position_widget.value)

    # -- drawing ----------------------------------------------------------------------------
    def _axis_changed(self, change) -> None:
        self._set_slider_range(self.position_widget.value)
        self.update()

    def _changed(self, change) -> None:
        self.update()

    def update(self) -> None:
        """Redraw both panels for the current widget values (and show them when in Jupyter)."""
        q, axis, pos, log = (self.quantity_widget.value, self.axis_widget.value,
                             self.position_widget.value, self.log_widget.value)
        names = self.selected
        for ax in (self.ax_map, self.ax_cbar, self.ax_profile):
            ax.clear()
        self.lines = {}
        if not names:
            self.ax_map.set_title("pick at least one model")
            self._show()
            return
        from advkit.plots import landscape_panel

        picked = [self.surfaces[n] for n in names]
        norm = shared_norm(picked, q, log=log and (np.nanmin([np.nanmin(ds[q].values) for ds in picked]) > 0))
        first = names[0]
        mappable = landscape_panel(self.surfaces[first], q, kind="contourf", ax=self.ax_map, norm=norm, title=first)
        _colorbar(self.fig, mappable, None, quantity_label(self.surfaces[first], q),
                  norm.__class__.__name__ == "LogNorm", cax=self.ax_cbar)
        other = self.other_axis
        cut = float(self.surfaces[first][other].sel({other: pos}, method="nearest"))
        if axis == "alpha":
            self.slice_line = self.ax_map.axhline(cut, color="r", lw=1.5)
        else:
            self.slice_line = self.ax_map.axvline(cut, color="r", lw=1.5)
        for name in names:
            x, v = self.profile(name)
            (self.lines[name],) = self.ax_profile.plot(x, v, label=name)
        self.ax_profile.set_xlabel(_axis_label(self.surfaces[first], axis))
        self.ax_profile.set_ylabel(quantity_label(self.surfaces[first], q))
        self.ax_profile.set_title(f"profiles along {_axis_label(self.surfaces[first], axis)} at "
                                  f"{_axis_label(self.surfaces[first], other)} = {cut:.3f}")
        if log and norm.__class__.__name__ == "LogNorm":
            self.ax_profile.set_yscale("log")
        self.ax_profile.grid(alpha=0.3)
        self.ax_profile.legend(fontsize=8, loc="best")
        self._show()

    def _show(self) -> None:
        try:
            from IPython import get_ipython
        except ImportError:  # pragma: no cover - IPython ships with ipywidgets
            return
        if get_ipython() is None:  # plain Python / pytest: keep the figure, draw nothing
            return
        buf = io.BytesIO()
        self.fig.savefig(buf, format="png", dpi=90)
        self.image.value = buf.getvalue()

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.widget)
