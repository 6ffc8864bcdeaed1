"""tools/nbval_tolerance.py: nbval passes another float path's measurements and fails a changed result."""

import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import nbformat
import pytest
from nbval.plugin import get_sanitize_patterns

from tools.nbval_tolerance import DECIMAL, TOLERANCES, measurements_match, printed_unit

ROOT = Path(__file__).resolve().parents[1]
CFG = ROOT / "nbval_sanitize.cfg"


def sanitize(text: str) -> str:
    """What nbval does with --nbval-sanitize-with: every (regex, replacement) in file order."""
    for regex, replacement in get_sanitize_patterns(CFG.read_text()):
        text = re.sub(regex, replacement, text)
    return text


def match(ref: str, test: str, notebook: str = "02_attack") -> bool:
    return measurements_match(sanitize(ref), sanitize(test), TOLERANCES[notebook])


# Committed output (this machine's default float path) and the same cell executed on the generic float path
# (ATEN_CPU_CAPABILITY=default OPENBLAS_CORETYPE=Haswell ...; tools/check_float_paths.sh generic).
FLOAT_PATHS = [
    ("01_train", "final test accuracy: 0.972  (test loss 0.106, 15 epochs)\n",
     "final test accuracy: 0.972  (test loss 0.104, 15 epochs)\n"),
    ("02_attack", "       clean   fgsm    pgd  stadv\nmodel            \nbase   0.972  0.519  0.431  0.172",
     "       clean   fgsm    pgd  stadv\nmodel            \nbase   0.972  0.511  0.422  0.169"),
    ("02_attack", "<td>0.0941</td>\n      <td>0.211</td>\n      <td>0.083</td>",      # 4 of 360 images
     "<td>0.0941</td>\n      <td>0.211</td>\n      <td>0.094</td>"),
    ("02_attack", "0.1255  0.083  0.014", "0.1255  0.069  0.011"),
    ("02_attack", "2       0.4    0.0000         0.0823", "2       0.4    0.0000         0.0709"),
    ("02_attack", "base      0.000      43.056         NaN  top-1 accuracy %",
     "base      0.000      42.222         NaN  top-1 accuracy %"),
    ("03_finetune", "pgd_at          6.0     0.897              0.952             0.927             0.343",
     "pgd_at          6.0     0.903              0.949             0.930             0.363"),
    ("03_finetune", "pgd_at        0.897  0.711  0.672  0.469", "pgd_at        0.903  0.700  0.667  0.439"),
    ("03_finetune", "TRADES        RErr (train)  trades      15.80      22.667",
     "TRADES        RErr (train)  trades      15.80      24.333"),
    ("03_finetune", "fgsm       75.23      67.500", "fgsm       75.23      67.778"),
]

# A printed measurement changed by 10 % (notebooks 01, 02) or by half (03), up or down: nbval must fail.
MEASUREMENTS = [
    ("02_attack", "base   0.972  0.519  0.431  0.172", 0.1),                       # clean, FGSM, PGD accuracy
    ("01_train", "final test accuracy: 0.972  (test loss 0.106, 15 epochs)", 0.1),
    ("02_attack", "<td>base</td>\n      <td>92.640</td>\n      <td>43.056</td>", 0.1),   # the claims table, in %
    ("03_finetune", "pgd_at   6.0   0.897   0.952   0.927   0.343   0.319   0.911", 0.5),
    ("03_finetune", "pgd_at        0.897  0.711  0.672  0.469", 0.5),
]

DIFFERENT = [
    ("n = 12 models", "n = 11 models"),                                    # counts are structure
    ("6 model(s): base, fgsm, pgd", "5 model(s): base, fgsm"),
    ("<th>pgd_at</th>", "<th>trades</th>"),                                # rows and columns
    ("small_cnn: 56,554 parameters on cpu", "small_cnn: 56,555 parameters on cpu"),
    ("eps 0.0627\nsteps 10", "eps 0.0627\nsteps 20"),
    ("pgd_alpha None", "pgd_alpha 0.0157"),                                # a missing value is structure
    ("fgsm   0.675   NaN", "fgsm   0.675   0.614"),
    ("python 3.11.7", "python 3.11.8"),                                    # not a number: a version
    ("pgd_at_e002  2  1.370", "pgd_at_e004  2  1.370"),                    # digits in a name are text
    ("accuracy 0.519 0.431", "accuracy 0.519"),                            # a missing number
]


@pytest.mark.parametrize("notebook, ref, test", FLOAT_PATHS)
def test_second_float_path_passes(notebook, ref, test):
    assert match(ref, test, notebook)


def changes(text: str, factor: float):
    """The text with one decimal of at least 0.4 multiplied by factor, for each such decimal."""
    for m in DECIMAL.finditer(text):
        if abs(float(m.group())) >= 0.4:
            decimals = len(m.group().partition(".")[2])
            yield text[:m.start()] + f"{float(m.group()) * factor:.{decimals}f}" + text[m.end():]


@pytest.mark.parametrize("notebook, text, change", MEASUREMENTS)
@pytest.mark.parametrize("sign", [1, -1])
def test_changed_measurement_fails(notebook, text, change, sign):
    changed = list(changes(text, 1 + sign * change))
    assert changed
    for test in changed:
        assert test != text and not match(text, test, notebook), test


def test_notebook_without_tolerance_still_checks_text_and_integers():
    assert TOLERANCES["04_visualize"] is None
    assert match("base  clean  104.728  0.778", "base  clean  21.883  0.078", "04_visualize")
    assert not match("base  clean  104.728  n = 5", "base  clean  104.728  n = 4", "04_visualize")
    assert not match("base  clean  104.728", "pgd_at  clean  104.728", "04_visualize")


@pytest.mark.parametrize("ref, test", DIFFERENT)
def test_structure_and_integers_compare_exactly(ref, test):
    assert not match(ref, test)


def test_conftest_loads_the_tolerance(request):
    """`make test` (pytest from the repository root) compares notebooks with the tolerance."""
    assert request.config.pluginmanager.has_plugin("tools.nbval_tolerance")


def test_printed_unit():
    assert printed_unit("0.519") == pytest.approx(1e-3)
    assert printed_unit("-12.5") == pytest.approx(0.1)
    assert printed_unit("5.5e-08") == pytest.approx(1e-9)


def notebook(cells):
    """A notebook whose code cells print `new` while the committed output says `committed`."""
    nb = nbformat.v4.new_notebook()
    for i, (committed, new) in enumerate(cells):
        cell = nbformat.v4.new_code_cell(f"print({new!r})", execution_count=i + 1)
        cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text=committed + "\n")]
        nb.cells.append(cell)
    return nb


@pytest.mark.slow
def test_nbval_uses_the_tolerance(tmp_path):
    """A real nbval run (as tools/check_float_paths.sh runs it): each cell passes or fails as expected."""
    cells = {"Cell 0": (("robust accuracy 0.431", "robust accuracy 0.422"), "passed"),    # another float path
             "Cell 1": (("robust accuracy 0.431", "robust accuracy 0.474"), "failed"),    # +10 %
             "Cell 2": (("n = 12 models, 0.431", "n = 11 models, 0.431"), "failed")}
    path = tmp_path / "nb.ipynb"
    nbformat.write(notebook([pair for pair, _ in cells.values()]), path)
    report = tmp_path / "report.xml"
    subprocess.run([sys.executable, "-m", "pytest", "-c", "pyproject.toml", "--rootdir", str(ROOT), "-p",
                    "no:cacheprovider", "-p", "tools.nbval_tolerance", "--nbval", "--nbval-sanitize-with", str(CFG),
                    f"--junitxml={report}", str(path)], cwd=ROOT, capture_output=True, timeout=300)
    outcomes = {case.get("name"): "failed" if case.find("failure") is not None else "passed"
                for case in ET.parse(report).iter("testcase")}
    assert outcomes == {name: outcome for name, (_, outcome) in cells.items()}
