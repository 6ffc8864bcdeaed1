"""benchmarks/speed_table.py (issue 12's table in one command) on CPU smoke sizes, and the paper-profile
projection of benchmarks/paper_budget.py on made-up unit costs. No timing is asserted."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import paper_budget as P  # noqa: E402

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


def test_speed_table_smoke_has_every_row_and_its_checks(smoke):
    from advkit.runs import git_commit

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


def _units(**nonzero: float) -> P.UnitCosts:
    base = dict(clean_epoch=0.0, at_epoch=0.0, clean_point=0.0, attack_image_step=0.0, hvp=0.0, resnet18_factor=1.0)
    return P.UnitCosts(**{**base, **nonzero})


def _total(items) -> float:
    return sum(it.seconds for it in items)


def test_paper_projection_clean_epochs_by_hand():
    # 01: 160 epochs; 03: 3 Xu fine-tunes x 200 epochs x twice the training set
    items = P.project(P.profile_values("paper"), _units(clean_epoch=1.0))
    assert _total(items) == pytest.approx(160 + 3 * 200 * 2)
    assert P.by_notebook(items)["01"] == pytest.approx(160)


def test_paper_projection_adversarial_training_by_hand():
    # a PGD-7 epoch of 8 s: (K + 1) s per epoch; 12 variants x 200 epochs; TRADES, MART +4 %, AWP +11 %, FGSM-RS K = 1
    per_epoch = 8 + 3 * 8 * 1.04 + 8 * 1.11 + 2 + 6 * 8
    items = P.project(P.profile_values("paper"), _units(at_epoch=8.0))
    assert _total(items) == pytest.approx(200 * per_epoch)


def test_paper_projection_hvps_and_resnet18_factor_by_hand():
    # 05: 4 ResNet-32 and 72 ResNet-18 models (12 variants x final, early, 4 kept epochs) x 120 HVPs on 1000 images;
    # 04: eigenvalue maps of base, pgd (ResNet-32) and pgd_at (ResNet-18): 7^2 points x 20 steps x clean + robust,
    # 256 images
    maps = 49 * 20 * 2 * 0.256
    expected = 4 * 120 + 72 * 120 * 2.0 + 2 * maps + maps * 2.0
    items = P.project(P.profile_values("paper"), _units(hvp=1.0, resnet18_factor=2.0))
    assert _total(items) == pytest.approx(expected)


def test_paper_projection_measured_robust_points_by_hand():
    # 04: robust line 51 + grid 21^2 for 4 + 24 models; robust replicates (replicate_robust: all) of 4 + 12 final
    # models x 6 surfaces x 10 seeds x (11 + 11^2) points; all on 1000 images with PGD-20
    points = 28 * (51 + 21 ** 2) + 16 * 6 * 10 * (11 + 11 ** 2)
    items = P.project(P.profile_values("paper"), _units(robust_image_step=1e-6))
    assert _total(items) == pytest.approx(points * 1000 * 20 * 1e-6)


def test_budget_table_and_the_quick_profile():
    units = _units(clean_epoch=4.3, at_epoch=100.0, clean_point=0.03, attack_image_step=1e-5, hvp=0.1)
    quick = P.project(P.profile_values("quick"), units)
    assert set(P.by_notebook(quick)) == {"01", "02", "03", "04", "05"}
    assert quick[0].count == 15 * 1437  # 15 epochs of the 1437 digits training images
    text = P.budget_table(quick, goal_s=3600)
    assert "| **all** |" in text and "h, met)" in text
    assert "not met" in P.budget_table(P.project(P.profile_values("paper"), units))
    fast = {**P.profile_values("paper"), "recipe": "fast"}
    assert P.project(fast, _units(clean_epoch=1.0))[0].seconds == pytest.approx(P.FAST_EPOCHS)


def test_fast_epochs_match_the_fast_recipe():
    from advkit import train
    if not hasattr(train, "FAST_RECIPE"):
        pytest.skip("no fast recipe in this checkout")
    assert train.FAST_RECIPE["epochs"] == P.FAST_EPOCHS


def test_unit_costs_are_checked():
    with pytest.raises(ValueError, match="resnet18_factor"):
        _units(resnet18_factor=0.0)
    with pytest.raises(ValueError, match="hvp"):
        _units(hvp=float("nan"))


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
