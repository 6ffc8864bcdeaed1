"""nbval_sanitize.cfg: orderings, booleans, padding and addresses are masked; numbers and structure are not."""

from pathlib import Path

import pytest
from nbval.plugin import get_sanitize_patterns

CFG = Path(__file__).resolve().parents[1] / "nbval_sanitize.cfg"


def sanitize(text: str) -> str:
    """What nbval does with --nbval-sanitize-with: every (regex, replacement) in file order."""
    import re

    for regex, replacement in get_sanitize_patterns(CFG.read_text()):
        text = re.sub(regex, replacement, text)
    return text


# Pairs seen between two CPUs' executions of the quick profile (notebooks 04, 05); decimals are left to
# tools/nbval_tolerance.py (tests/test_nbval_tolerance.py).
SAME = [
    ("robust_gap   -0.089  3.421", "robust_gap  -0.089    3.421"),                     # padding
    ("curvature filter 0.10 base > stadv > pgd > fgsm > trades > trades_ea... 1.000 True",
     "curvature filter 0.10 base > stadv > fgsm > pgd > trades 1.000 False"),
    ("<td>base &gt; stadv &gt; pgd</td>", "<td>base &gt; pgd &gt; stadv</td>"),
    ("<function f at 0x7f3a2c1d0e50>", "<function f at 0x7f12aa0b1c10>"),
]
DIFFERENT = [
    ("n = 12 models", "n = 11 models"),                                    # counts are structure
    ("6 model(s): base, fgsm, pgd", "5 model(s): base, fgsm"),
    ("<th>pgd_at</th>", "<th>trades</th>"),                                # rows and columns
    ("small_cnn: 56,554 parameters on cpu", "small_cnn: 56,555 parameters on cpu"),
    ("eps 0.0627\nsteps 10", "eps 0.0627\nsteps 20"),
    ("pgd_alpha None", "pgd_alpha 0.0157"),                                # a missing value is structure
    ("python 3.11.7", "python 3.11.8"),                                    # not a number: a version
    ("base   0.972  0.519", "base   0.972  0.511"),                        # numbers reach the tolerance
    ("<Figure size 900x320 with 2 Axes>", "<Figure size 900x330 with 2 Axes>"),  # not an address
]


@pytest.mark.parametrize("a, b", SAME)
def test_masked_parts_compare_equal(a, b):
    assert a != b and sanitize(a) == sanitize(b)


@pytest.mark.parametrize("a, b", DIFFERENT)
def test_structure_and_counts_still_differ(a, b):
    assert sanitize(a) != sanitize(b)
