"""The landscape slicer end to end in a real browser: notebook 04 in JupyterLab in headless Chromium.

Runs notebooks 01-04 (quick profile, smaller landscapes) into a temporary run directory, starts
JupyterLab from this venv (token-less, isolated Jupyter directories, a free port), opens notebook 04,
runs all cells and drives every slicer control with the mouse and keyboard. Needs Chromium and the
`playwright` package: `.ci/browser-setup` installs both; without them the test is skipped, saying why.
ADVKIT_BROWSER_RUNS_DIR=<a runs/ folder holding quick/ with notebooks 01-04 done> skips the pipeline.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow

UPDATE_LIMIT_S = 3.0  # the longest a redraw may take, from the user's action to the new picture
# Notebook 04 with smaller landscapes than the quick profile's, so the pipeline takes minutes on 2 cores.
SMALL_04 = ["resolution=15", "line_resolution=15", "robust=false", "radius=0.3", 'sensitivity_norms=["filter"]',
            "sensitivity_radii=[0.3]", "sensitivity_resolution=7"]
PROBE = '''import json as _json, numpy as _np
def _slicer_state(s=slicer):
    box = s.ax_cbar.get_window_extent()
    return {"step": s.position_widget.step, "quantity": s.quantity_widget.value, "axis": s.axis_widget.value,
            "position": s.position_widget.value,
            "models": list(s.models_widget.value), "log": s.log_widget.value, "log_disabled": s.log_widget.disabled,
            "log_applied": s.log_applied, "yscale": s.ax_profile.get_yscale(), "draws": s.draws,
            "lines_ok": all(_np.allclose(s.lines[n].get_ydata(), s.profile(n)[1], equal_nan=True) for n in s.selected),
            "lines": sorted(s.lines), "cbar": [box.x0, box.y0, box.x1, box.y1], "height": s.fig.bbox.height}
print("SLICER-STATE " + _json.dumps(_slicer_state()))'''


def _chromium() -> str | None:
    for name in (os.environ.get("ADVKIT_CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("the playwright package is not installed in this venv: run .ci/browser-setup")
    exe = _chromium()
    if exe is None:
        pytest.skip("no Chromium found (chromium, chromium-browser, google-chrome or $ADVKIT_CHROMIUM): "
                    "run .ci/browser-setup")
    with sync_playwright() as p:
        try:
            b = p.chromium.launch(executable_path=exe, headless=True, args=["--no-sandbox"])
        except Exception as err:  # e.g. a Chromium too old for this playwright
            pytest.skip(f"Chromium at {exe} does not start under playwright: {err}")
        yield b
        b.close()


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """A runs/ folder whose quick/ run has notebooks 01-04 done (04 on smaller landscapes)."""
    given = os.environ.get("ADVKIT_BROWSER_RUNS_DIR")
    if given:
        return Path(given)
    runs = tmp_path_factory.mktemp("runs")
    env = {**os.environ, "ADVKIT_RUNS_DIR": str(runs), "ADVKIT_FIGURES_DIR": str(runs / "figures"),
           "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "advkit", "run", "--profile", "quick", "--only", "01,02,03,04"]
    for assignment in SMALL_04:
        cmd += ["-p", assignment]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return runs


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def lab(runs, tmp_path_factory):
    """JupyterLab serving a copy of the executed notebook 04 (outputs cleared), on a free port, token-less."""
    import nbformat

    root = tmp_path_factory.mktemp("lab")
    nb = nbformat.read(runs / "quick" / "notebooks" / "04_visualize.ipynb", as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    nb.metadata.pop("widgets", None)
    nbformat.write(nb, root / "04_visualize.ipynb")
    jupyter = {k: root / f".jupyter_{k}" for k in ("config", "data", "runtime")}
    # every cell in the DOM (JupyterLab 4 otherwise renders only the cells in view)
    settings = jupyter["config"] / "lab" / "user-settings" / "@jupyterlab" / "notebook-extension"
    settings.mkdir(parents=True)
    (settings / "tracker.jupyterlab-settings").write_text(json.dumps({"windowingMode": "none"}))
    news = jupyter["config"] / "lab" / "user-settings" / "@jupyterlab" / "apputils-extension"
    news.mkdir(parents=True)
    (news / "notification.jupyterlab-settings").write_text(json.dumps({"fetchNews": "false"}))
    env = {**os.environ, "ADVKIT_RUNS_DIR": str(runs), "ADVKIT_FIGURES_DIR": str(root / "figures"),
           "OMP_NUM_THREADS": "1", **{f"JUPYTER_{k.upper()}_DIR": str(v) for k, v in jupyter.items()}}
    port = _free_port()
    log = open(root / "jupyterlab.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
         f"--ServerApp.root_dir={root}", "--IdentityProvider.token=", "--ServerApp.password=",
         "--LabApp.expose_app_in_browser=True", "--ServerApp.open_browser=False"]
        + (["--allow-root"] if hasattr(os, "geteuid") and os.geteuid() == 0 else []),
        cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):
            if proc.poll() is not None:
                pytest.fail(f"JupyterLab exited: {(root / 'jupyterlab.log').read_text()[-3000:]}")
            try:
                urllib.request.urlopen(url + "/api/status", timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail(f"JupyterLab did not answer on {url}: {(root / 'jupyterlab.log').read_text()[-3000:]}")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


class Slicer:
    """The slicer as a person sees it in JupyterLab, plus the kernel's view of it (`state`, via PROBE)."""

    def __init__(self, page):
        self.page = page
        self.root = page.locator(".jp-OutputArea-output .widget-vbox").filter(has=page.locator(".widget-image")).first
        self.img = self.root.locator("img")
        self.times: list[float] = []
        self.cbar_heights: list[float] = []  # the colour bar's box in the PNG, from the kernel's layout
        self.cbar_rendered: list[int] = []  # the bar found in the PNG's pixels (with any extend tips)

    def png(self) -> bytes:
        data = self.img.evaluate("""async el => { const b = new Uint8Array(await (await fetch(el.src)).arrayBuffer());
            let s = ''; for (const x of b) s += String.fromCharCode(x); return btoa(s); }""")
        return base64.b64decode(data)

    def act(self, action) -> None:
        """Do `action` (a user gesture) and wait for the new picture: the time goes into `times`."""
        before = self.img.get_attribute("src")
        t0 = time.perf_counter()
        action()
        self.page.wait_for_function("([el, old]) => el.src && el.src !== old && el.complete",
                                    arg=[self.img.element_handle(), before], timeout=30_000)
        self.times.append(time.perf_counter() - t0)
        x0, y0, x1, y1 = self.state()["cbar"]
        self.cbar_heights.append(y1 - y0)
        self.cbar_rendered.append(self.measure_cbar(int(round((x0 + x1) / 2))))

    def measure_cbar(self, column: int) -> int:
        """The colour bar's height in the rendered PNG: the longest run of non-white pixels down
        `column` (through the bar's centre, so extend tips count too)."""
        from PIL import Image

        rgb = np.asarray(Image.open(io.BytesIO(self.png())).convert("RGB")).astype(int)
        column = rgb[:, column]
        coloured = np.abs(column - 255).sum(axis=1) > 30
        best = run = 0
        for c in coloured:
            run = run + 1 if c else 0
            best = max(best, run)
        return best

    def state(self) -> dict:
        """The slicer's kernel-side state, asked through the notebook's kernel connection (no UI)."""
        text = self.page.evaluate("""async code => {
            const kernel = window.jupyterapp.shell.currentWidget.sessionContext.session.kernel;
            const future = kernel.requestExecute({code, store_history: false});
            let out = '';
            future.onIOPub = msg => { const c = msg.content;
                if (msg.header.msg_type === 'stream') out += c.text;
                if (msg.header.msg_type === 'error') out += c.ename + ': ' + c.evalue; };
            await future.done;
            return out; }""", PROBE)
        assert "SLICER-STATE " in text, text
        return json.loads(text.split("SLICER-STATE ", 1)[1].strip().splitlines()[0])


def _run_all(page) -> None:
    page.wait_for_function("() => window.jupyterapp?.shell.currentWidget?.sessionContext?.session?.kernel",
                           timeout=120_000)
    page.evaluate("() => window.jupyterapp.commands.execute('notebook:run-all-cells')")
    # done when every code cell has run (from the notebook's model); stop at the first error
    cells = "window.jupyterapp.shell.currentWidget.content.model.toJSON().cells.filter(c => c.cell_type === 'code')"
    page.wait_for_function(f"""() => {{ const cells = {cells};
        return cells.some(c => c.outputs.some(o => o.output_type === 'error')) || cells.every(c => c.execution_count)
               && window.jupyterapp.shell.currentWidget.sessionContext.session.kernel.status === 'idle'; }}""",
                           timeout=600_000)
    errors = page.evaluate(f"() => {cells}.flatMap(c => c.outputs.filter(o => o.output_type === 'error'))")
    assert not errors, "\n".join(errors[0]["traceback"])[-3000:]


def test_slicer_in_jupyterlab(browser, lab):  # browser first: skip before the pipeline runs
    page = browser.new_page(viewport={"width": 1024, "height": 768})
    page.goto(f"{lab}/lab/tree/04_visualize.ipynb")
    _run_all(page)
    s = Slicer(page)
    s.root.scroll_into_view_if_needed()
    first = s.state()
    assert first["lines_ok"] and first["draws"] == 2  # drawn, then set to span / 2 by the next cell
    box = first["cbar"]
    cbar0 = box[3] - box[1]
    assert cbar0 > 150  # about 2/3 of the figure's height

    # Narrow window (1024 x 768, file browser open): nothing scrolls sideways, the figure is not shrunk.
    if not page.locator("#filebrowser").is_visible():
        page.locator(".jp-SideBar [data-id='filebrowser']").click()
    assert page.locator("#filebrowser").is_visible()
    page.wait_for_timeout(500)
    geometry = s.root.evaluate("""el => { const img = el.querySelector('img');
        const area = el.closest('.jp-OutputArea-output');
        return {scroll: el.scrollWidth - el.clientWidth, area: area.scrollWidth - area.clientWidth,
                shown: img.clientWidth, natural: img.naturalWidth,
                labels: [...el.querySelectorAll('.widget-label')].map(l => l.scrollWidth - l.clientWidth)}; }""")
    assert geometry["scroll"] <= 1 and geometry["area"] <= 1, geometry
    assert geometry["shown"] >= 0.98 * geometry["natural"], geometry  # drawn at its display size
    assert max(geometry["labels"]) <= 1, geometry  # every label fits its column

    slider = s.root.locator(".widget-slider")
    track = slider.locator(".noUi-target, .slider").first
    handle = slider.locator(".noUi-handle").first
    readout = slider.locator(".widget-readout")
    quantity = s.root.locator(".widget-dropdown select")
    models = s.root.locator(".widget-select-multiple select")
    axis_button = lambda label: s.root.locator(".widget-toggle-button", has_text=label)  # noqa: E731
    log_box = s.root.locator(".widget-checkbox input[type=checkbox]")
    draws = first["draws"]

    def check(actions=1, **expected):
        """The kernel drew once per action, its plot matches its widgets, which show `expected`."""
        nonlocal draws
        state = s.state()
        assert state["draws"] - draws == actions, f"{actions} action(s), {state['draws'] - draws} redraws"
        draws = state["draws"]
        assert state["lines_ok"], state
        for key, value in expected.items():
            assert state[key] == (pytest.approx(value) if isinstance(value, float) else value), (key, state)
        # the front end shows the kernel's values
        assert float(readout.inner_text().replace("\u2212", "-")) == pytest.approx(state["position"], abs=1e-3)
        assert quantity.input_value() == state["quantity"]
        return state

    # the slider: click on its track, arrow keys, a typed value (snapped to the grid)
    def click_track(fraction):
        track.scroll_into_view_if_needed()
        b = track.bounding_box()
        page.mouse.click(b["x"] + fraction * b["width"], b["y"] + b["height"] / 2)

    s.act(lambda: click_track(0.85))
    state = check(axis="alpha")
    assert state["position"] > first["position"]
    s.act(lambda: (handle.focus(), page.keyboard.press("ArrowLeft")))
    state = check(position=state["position"] - state["step"])
    s.act(lambda: (readout.click(), page.keyboard.press("Control+A"), page.keyboard.type("-0.3"),
                   page.keyboard.press("Enter")))
    state = check()
    assert abs(state["position"] + 0.3) <= state["step"] / 2 + 1e-6  # the nearest grid value
    # quantity: accuracy has no log scale
    s.act(lambda: quantity.select_option("accuracy"))
    check(quantity="accuracy", log_disabled=True, log_applied=False, yscale="linear")
    assert log_box.is_disabled()
    s.act(lambda: quantity.select_option("loss"))
    check(quantity="loss", log_disabled=False, log_applied=True, yscale="log")
    # the log checkbox
    s.act(lambda: log_box.click())
    check(log=False, yscale="linear")
    s.act(lambda: log_box.click())
    check(log=True, yscale="log")
    # the axis toggle buttons: one redraw each, the slider's label names the cut axis
    s.act(lambda: axis_button("β").click())
    check(axis="beta")
    assert "α" in slider.locator(".widget-label").inner_text()
    s.act(lambda: axis_button("α").click())
    check(axis="alpha")
    assert "β" in slider.locator(".widget-label").inner_text()
    # the model multi-select
    names = models.locator("option").all_inner_texts()
    s.act(lambda: models.select_option(names[1:3]))
    check(models=names[1:3], lines=sorted(names[1:3]))
    s.act(lambda: models.select_option(names[:1]))
    check(models=names[:1])
    # 20 more redraws by arrow keys: the colour bar keeps its size
    for i in range(20):
        s.act(lambda i=i: (handle.focus(), page.keyboard.press("ArrowRight" if (i // 5) % 2 == 0 else "ArrowLeft")))
    last = check(actions=20)
    assert last["draws"] >= 30
    print(f"\nslicer in JupyterLab/Chromium: {len(s.times)} updates, per update "
          f"median {np.median(s.times):.2f} s, max {max(s.times):.2f} s; colour bar heights (px) "
          f"{cbar0:.1f} -> {sorted({round(float(h), 1) for h in s.cbar_heights})}, found in the pixels "
          f"{sorted(set(s.cbar_rendered))}")
    assert max(s.times) < UPDATE_LIMIT_S, s.times
    assert all(abs(h - cbar0) <= 1 for h in s.cbar_heights), s.cbar_heights
    # the pixels agree: the bar is there, as tall as its box plus at most its two extend tips
    assert all(h - 2 <= r <= 1.25 * h for h, r in zip(s.cbar_heights, s.cbar_rendered)), s.cbar_rendered
    page.close()
