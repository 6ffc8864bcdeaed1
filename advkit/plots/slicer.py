"""The landscape slicer: pick models and a quantity, slide a slice through saved 2D surfaces.

Works from surface files only (written by `advkit.landscape`), never recomputes. The left
panel shows the first picked model's 2D contour with the slice line, the right panel the 1D
profiles of all picked models along it, on one colour scale / one y axis. Without a
Jupyter frontend (papermill, pytest) it still builds and draws: the figure and the plotted
lines are attributes (`fig`, `lines`, `slice_line`) that tests can read.
"""

from __future__ import annotations

import io
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import ipywidgets as W
import numpy as np
import xarray as xr
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure

from advkit.landscape.files import load_surface
from advkit.landscape.settings import QUANTITIES
from advkit.plots.figures import add_colorbar, axis_label, landscape_panel, quantity_label, shared_norm
from advkit.runs.run import Run

AXES = ("alpha", "beta")
SYMBOLS = {"alpha": "α", "beta": "β"}
# The figure is drawn at its final pixel size (FIGSIZE x DPI = 576 x 279 px) so that JupyterLab
# never scales it down: it fits the output area (588 px) of a 1024 px wide window with the file browser open.
FIGSIZE, DPI = (6.4, 3.1), 90


def log_scale_applies(quantity: str) -> bool:
    """Whether a logarithmic scale suits `quantity`: losses yes; accuracies (in [0, 1]) no."""
    return "accuracy" not in quantity


def _quantities_2d(ds: xr.Dataset) -> list[str]:
    return [str(q) for q in ds.data_vars if q != "computed" and {"alpha", "beta"} <= set(ds[q].dims)]


def _load(surfaces) -> dict[str, dict[str, xr.Dataset]]:
    """name -> {quantity -> surface}. A folder (e.g. a run's `landscapes/`) contributes its 2D files
    and skips the 1D ones; 2D files of one model with different quantities (its `grid` with loss and
    accuracy, its `robust_grid` with the robust ones) become one entry. A `Run` means its landscapes/."""
    if isinstance(surfaces, Run):
        surfaces = surfaces.landscapes
    from_folder = isinstance(surfaces, (str, Path))
    if from_folder:
        folder = Path(surfaces)
        if not folder.is_dir():
            raise ValueError(f"surfaces={str(surfaces)!r}: give a folder of .nc files, a list of files or "
                             "a mapping name -> file")
        surfaces = sorted(folder.glob("*.nc"))
    if isinstance(surfaces, Mapping):
        items = [(str(k), Path(v)) for k, v in surfaces.items()]
    elif isinstance(surfaces, Sequence) and not isinstance(surfaces, str):
        items = [(None, Path(p)) for p in surfaces]
    else:
        raise ValueError(f"surfaces must be a folder, a list of files or a mapping name -> file, "
                         f"got {type(surfaces).__name__}")
    out: dict[str, dict[str, xr.Dataset]] = {}
    skipped = []
    for name, path in items:
        ds = load_surface(path)
        if "beta" not in ds.dims:
            if from_folder:
                skipped.append(path.name)
                continue
            raise ValueError(f"{path} is a 1D surface; the slicer needs 2D surfaces (alpha and beta)")
        name = name or str(ds.attrs.get("model", path.stem))
        quantities = _quantities_2d(ds)
        if set(quantities) & set(out.get(name, {})):
            name = f"{name} ({path.stem})"
        out.setdefault(name, {}).update({q: ds for q in quantities})
    if not out:
        raise ValueError("no 2D surface files given" + (f" (the folder holds only 1D ones: {skipped})"
                                                         if skipped else " (or none found in the folder)"))
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

    `surfaces`: a `Run` (its `landscapes/`: its 2D files), a folder of .nc files, a list of files,
    or a mapping name -> file; `self.surfaces` is name -> {quantity -> surface}. Widgets:
    `models_widget` (SelectMultiple), `quantity_widget` (Dropdown), `axis_widget` (the axis the
    profile runs along), `position_widget` (where the other axis is cut), `log_widget` (losses
    only: disabled for accuracies). Every user action redraws once (`draws` counts redraws).
    """

    def __init__(self, surfaces, *, quantity: str = "loss", axis: str = "alpha", position: float = 0.0,
                 models: Sequence[str] | None = None, log: bool = False):
        self.surfaces = _load(surfaces)
        names = list(self.surfaces)
        common = set.intersection(*(set(by_q) for by_q in self.surfaces.values()))
        quantities = [q for q in QUANTITIES if q in common] + sorted(common - set(QUANTITIES))
        if quantity not in quantities:
            raise ValueError(f"quantity={quantity!r} is not in every surface; available: {quantities}")
        if axis not in AXES:
            raise ValueError(f"axis={axis!r} is not available; choose one of {list(AXES)}")
        models = list(models) if models is not None else names[:3]
        unknown = [m for m in models if m not in names]
        if unknown or not models:
            raise ValueError(f"models={models!r}: choose one or more of {names}")
        fit = {"description_width": "initial"}  # labels take the room they need, never cut off
        self.models_widget = W.SelectMultiple(options=names, value=tuple(models), description="models",
                                              rows=min(len(names), 6), style=fit,
                                              layout=W.Layout(width="auto", max_width="100%"))
        self.quantity_widget = W.Dropdown(options=quantities, value=quantity, description="quantity", style=fit,
                                          layout=W.Layout(width="auto"))
        self.axis_widget = W.ToggleButtons(options=[(SYMBOLS[a], a) for a in AXES], value=axis,
                                           description="profile along", tooltips=list(AXES),
                                           style={"description_width": "initial", "button_width": "3em"})
        self.position_widget = W.FloatSlider(continuous_update=False, readout_format=".3f", style=fit,
                                             layout=W.Layout(max_width="100%"))
        self.log_widget = W.Checkbox(value=bool(log), description="log scale", indent=False,
                                     layout=W.Layout(width="auto"))
        self.draws = 0
        self._holding = 0
        self._sync_controls(position)
        self.fig = Figure(figsize=FIGSIZE, dpi=DPI, layout="constrained")
        self.fig.get_layout_engine().set(wspace=0.06)  # room between the colour bar and the profile
        self.ax_map, self.ax_cbar, self.ax_profile = self.fig.subplots(
            1, 3, gridspec_kw={"width_ratios": [1, 0.05, 1.1]})
        self.lines: dict = {}
        self.slice_line = None
        # The figure is shown as PNG bytes in an Image widget, not through an Output widget: headless
        # clients (nbclient, under papermill and nbval) mimic Output widgets with message hooks that
        # can leave a cell waiting forever (jupyter/nbclient#312; notebook 04 hung so in 2 of 5 runs).
        # It is drawn at its display size (never scaled down, so its text stays readable) and the
        # controls wrap below the model list in a narrow window instead of scrolling sideways.
        self.image = W.Image(format="png", layout=W.Layout(max_width="100%", height="auto"))
        controls = W.VBox([self.quantity_widget, self.axis_widget, self.position_widget, self.log_widget],
                          layout=W.Layout(max_width="100%"))
        self.widget = W.VBox([W.HBox([self.models_widget, controls],
                                     layout=W.Layout(flex_flow="row wrap", grid_gap="4px 16px", max_width="100%")),
                              self.image], layout=W.Layout(max_width="100%", overflow="hidden"))
        for w in (self.models_widget, self.quantity_widget, self.axis_widget, self.position_widget,
                  self.log_widget):
            w.observe(self._changed, names="value")
        self.update()

    # -- state ------------------------------------------------------------------------------
    @property
    def selected(self) -> list[str]:
        return list(self.models_widget.value)

    @property
    def other_axis(self) -> str:
        return "beta" if self.axis_widget.value == "alpha" else "alpha"

    @property
    def log_applied(self) -> bool:
        """Whether the current drawing uses a log scale: asked for, a loss, and positive values."""
        q = self.quantity_widget.value
        return (self.log_widget.value and log_scale_applies(q)
                and all(float(np.nanmin(self.surfaces[n][q][q].values)) > 0 for n in self.selected))

    def surface(self, name: str, quantity: str | None = None) -> xr.Dataset:
        """The surface of model `name` that holds `quantity` (default: the current one)."""
        return self.surfaces[name][quantity or self.quantity_widget.value]

    @contextmanager
    def _hold(self) -> Iterator[None]:
        """Widget changes made inside do not redraw: one user action, one redraw."""
        self._holding += 1
        try:
            yield
        finally:
            self._holding -= 1

    def _sync_controls(self, position: float) -> None:
        """Fit the slider to the cut axis of the first picked model's grid (snapping `position` to it),
        name that axis in its label, and offer the log scale only for losses. Never redraws."""
        with self._hold():
            first = (self.selected or list(self.surfaces))[0]
            other = self.other_axis
            coords = self.surface(first)[other].values
            step = float(np.min(np.diff(coords))) if len(coords) > 1 else 1.0
            slider = self.position_widget
            lo, hi = float(coords.min()), float(coords.max())
            # order matters for traitlets validation: widen first, then narrow
            slider.min, slider.max = min(lo, slider.min), max(hi, slider.max)
            slider.min, slider.max, slider.step = lo, hi, step
            slider.value = float(coords[np.abs(coords - position).argmin()])
            slider.description = f"at {SYMBOLS[other]} ="
            loss = log_scale_applies(self.quantity_widget.value)
            self.log_widget.disabled = not loss
            self.log_widget.description = "log scale" if loss else "log scale (losses only)"

    def profile(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """The expected slice of model `name` for the current widget values."""
        return profile(self.surface(name), self.quantity_widget.value, self.axis_widget.value,
                       self.position_widget.value)

    # -- drawing ----------------------------------------------------------------------------
    def _changed(self, change) -> None:
        if self._holding:
            return
        if change["owner"] is not self.log_widget:  # snaps a typed position to the grid, quietly
            self._sync_controls(self.position_widget.value)
        self.update()

    def update(self) -> None:
        """Redraw both panels for the current widget values (and show them when in Jupyter)."""
        self.draws += 1
        q, axis, pos = self.quantity_widget.value, self.axis_widget.value, self.position_widget.value
        names = self.selected
        for ax in (self.ax_map, self.ax_cbar, self.ax_profile):
            ax.clear()
        # A colour bar wraps its axes' locator, which clear() keeps: without this reset every redraw
        # would nest the new colour bar inside the previous one and shrink it.
        self.ax_cbar.set_axes_locator(None)
        self.lines = {}
        if not names:
            self.ax_map.set_title("pick at least one model")
            self.ax_cbar.set_axis_off()
            self._show()
            return
        self.ax_cbar.set_axis_on()
        first = self.surface(names[0])
        log = self.log_applied
        norm = shared_norm([self.surface(n) for n in names], q, log=log)
        mappable = landscape_panel(first, q, kind="contourf", ax=self.ax_map, norm=norm, title=names[0])
        add_colorbar(self.fig, mappable, None, quantity_label(first, q), isinstance(norm, LogNorm), cax=self.ax_cbar)
        other = self.other_axis
        cut = float(first[other].sel({other: pos}, method="nearest"))
        if axis == "alpha":
            self.slice_line = self.ax_map.axhline(cut, color="r", lw=1.5)
        else:
            self.slice_line = self.ax_map.axvline(cut, color="r", lw=1.5)
        for name in names:
            x, v = self.profile(name)
            (self.lines[name],) = self.ax_profile.plot(x, v, label=name)
        self.ax_profile.set_xlabel(axis_label(first, axis))
        self.ax_profile.set_ylabel(quantity_label(first, q))
        self.ax_profile.set_title(f"along {axis_label(first, axis)} at {axis_label(first, other)} = {cut:.3f}",
                                  fontsize="medium")
        if log:
            self.ax_profile.set_yscale("log")
        self.ax_profile.grid(alpha=0.3)
        self.ax_profile.legend(fontsize="small", loc="best")
        self._show()

    def _show(self) -> None:
        try:
            from IPython import get_ipython
        except ImportError:  # pragma: no cover - IPython ships with ipywidgets
            return
        if get_ipython() is None:  # plain Python / pytest: keep the figure, draw nothing
            return
        buf = io.BytesIO()
        self.fig.savefig(buf, format="png", dpi=DPI)
        self.image.value = buf.getvalue()

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.widget)
