"""nbval_sanitize.cfg: outputs that differ only in measurements compare equal; structure and counts still differ."""

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


# Pairs seen between two CPUs' executions of the quick profile (notebooks 02, 04, 05).
SAME = [
    ("base   0.972  0.519  0.431    0.0", "base   0.972  0.511  0.422    0.0"),
    ("robust_gap   -0.089  3.421", "robust_gap    0.012  3.421"),                     # sign changes the width
    ("<td>0.519</td>", "<td>0.511</td>"),
    ("max_flow  accuracy\n0.1    0.7167", "max_flow  accuracy\n0.1    0.7208"),          # four decimals too
    ("p = 5.5e-08, n = 200", "p = 1.2e-07, n = 200"),
    ("curvature filter 0.10 base > stadv > pgd > fgsm > trades > trades_ea... 1.000 True",
     "curvature filter 0.10 base > stadv > fgsm > pgd > trades 0.852 False"),
    ("<td>base &gt; stadv &gt; pgd</td>", "<td>base &gt; pgd &gt; stadv</td>"),
]
DIFFERENT = [
    ("n = 12 models", "n = 11 models"),                                    # counts are structure
    ("6 model(s): base, fgsm, pgd", "5 model(s): base, fgsm"),
    ("<th>pgd_at</th>", "<th>trades</th>"),                                # rows and columns
    ("small_cnn: 56,554 parameters on cpu", "small_cnn: 56,555 parameters on cpu"),
    ("eps 0.0627\nsteps 10", "eps 0.0627\nsteps 20"),
    ("pgd_alpha None", "pgd_alpha 0.0157"),                                # a missing value is structure
    ("python 3.11.7", "python 3.11.8"),                                    # not a number: a version
]


@pytest.mark.parametrize("a, b", SAME)
def test_measurements_compare_equal(a, b):
    assert a != b and sanitize(a) == sanitize(b)


@pytest.mark.parametrize("a, b", DIFFERENT)
def test_structure_and_counts_still_differ(a, b):
    assert sanitize(a) != sanitize(b)
