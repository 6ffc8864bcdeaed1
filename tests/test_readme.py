"""The README's library example runs as printed (digits, offline), so it cannot drift from the API."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.mark.slow
def test_the_readme_library_example_runs(tmp_path, monkeypatch, capsys):
    section = README.read_text().split("## The library in a few lines", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, str(README), "exec"), {"__name__": "readme"})
    out = capsys.readouterr().out
    assert out.count("average-case flatness of the robust loss") == 2 and "curvature" in out
