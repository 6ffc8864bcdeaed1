"""benchmarks/speed_table.py (issue 12's table in one command) on CPU smoke sizes (its paper-profile
projection is advkit.pipeline.plan's, checked by hand in tests/pipeline/test_plan.py). No timing is asserted."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent

ROW_NAMES = ("clean surface", "same in fp32", "PGD-10", "Hessian top eigenvalue", "Hessian trace",
             "ResNet-32 training", "paper profile")


def _installed(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> str:
    results = tmp_path_factory.mktemp("speed") / "RESULTS.md"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "speed_table.py"), "--smoke", "--device", "cpu",
                           "--results", str(results)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return results.read_text()


def _rows(text: str) -> dict[str, list[str]]:
    """{row name: its 8 cells} of the speed table."""
    out = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        for name in ROW_NAMES:
            if line.startswith("|") and name in cells[0] and name not in out:
                out[name] = cells
    return out


@pytest.mark.slow
def test_speed_table_smoke_has_every_row_and_its_checks(smoke):
    from advkit.runs.run import git_commit

    assert "device: CPU" in smoke and f"torch {torch.__version__}" in smoke
    assert f"commit: {(git_commit() or 'none')[:10]}" in smoke
    assert "failed:" not in smoke
    rows = _rows(smoke)
    assert set(rows) == set(ROW_NAMES)
    assert all(len(cells) == 8 for cells in rows.values())
    surface, fp32 = rows["clean surface"], rows["same in fp32"]
    assert "auto -> fp32" in surface[1]  # bf16 is never chosen on the CPU
    assert surface[3].endswith("x") and fp32[3].endswith("x")
    assert surface[7] == "yes" and fp32[7] == "yes"  # fp32 vs the reference loop: within 1e-3
    pgd = rows["PGD-10"]
    if _installed("torchattacks"):
        assert pgd[2].startswith("torchattacks") and pgd[3].endswith("x")
        assert "points (<= 0.5)" in pgd[6] and pgd[7] == "yes"
    else:
        assert "reference not installed" in pgd[2]
    for name in ("Hessian top eigenvalue", "Hessian trace"):
        cells = rows[name]
        if _installed("pyhessian"):
            assert cells[2].startswith("PyHessian") and cells[7] in ("yes", "no") and " vs " in cells[6]
        else:
            assert cells[2] == "reference not installed"
    assert "best test accuracy" in rows["ResNet-32 training"][6]
    assert rows["paper profile"][1].endswith(")") and " h (01:" in rows["paper profile"][1]
    assert "| **all** | total vs goal 1 h |" in smoke


@pytest.mark.slow
def test_missing_reference_libraries_are_reported_not_fatal(tmp_path):
    results = tmp_path / "RESULTS.md"
    script = ("import runpy, sys; sys.modules['torchattacks'] = sys.modules['pyhessian'] = None; "  # imports fail
              f"sys.argv = ['speed_table.py', '--smoke', '--device', 'cpu', '--rows', 'pgd,hessian,paper', "
              f"'--results', {str(results)!r}]; runpy.run_path({str(ROOT / 'benchmarks' / 'speed_table.py')!r}, "
              "run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=ROOT / "benchmarks")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = _rows(results.read_text())
    assert set(rows) == {"PGD-10", "Hessian top eigenvalue", "Hessian trace", "paper profile"}
    for name in ("PGD-10", "Hessian top eigenvalue", "Hessian trace"):
        assert rows[name][2] == "reference not installed" and rows[name][3] == "-"
    assert "missing unit costs: clean_epoch, clean_point" in rows["paper profile"][6]
