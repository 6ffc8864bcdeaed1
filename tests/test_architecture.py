"""The package's shape (issue 11): no import cycle, lazy imports included, and no module over 600 lines.

The import graph is read from the source with `ast`, so it sees every `import advkit.x`,
`from advkit.x import y`, `from advkit import x` and relative import, at module level and inside
functions (a lazy import still ties two modules together).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "advkit"
MAX_LINES = 600


def module_name(path: Path, root: Path = PACKAGE) -> str:
    """advkit/landscape/engine.py -> "advkit.landscape.engine"; a package's __init__ is the package."""
    parts = (root.name,) + path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules(root: Path = PACKAGE) -> dict[str, Path]:
    return {module_name(p, root): p for p in sorted(root.rglob("*.py"))}


def imported(path: Path, known: set[str], root: Path = PACKAGE) -> set[str]:
    """The package's modules that the file at `path` imports anywhere in its body."""
    name = module_name(path, root)
    is_package = path.name == "__init__.py"
    found: set[str] = set()

    def resolve(candidate: str) -> None:
        # the longest known module that `candidate` names or lies inside (advkit.x.f -> advkit.x)
        while candidate and candidate not in known:
            candidate = candidate.rpartition(".")[0]
        if candidate and candidate != name:
            found.add(candidate)

    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                resolve(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the file's package, up level - 1 further packages
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[:len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            for alias in node.names:  # `from advkit import x` imports the module advkit.x
                full = f"{module}.{alias.name}"
                resolve(full if full in known else module)
    return found


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    """{module: the package's modules it imports}. A submodule's import also runs its packages'
    __init__, but that edge is not counted: only what a file itself imports."""
    mods = modules(root)
    return {name: imported(path, set(mods), root) for name, path in mods.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None (depth-first search, three colours)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_the_package_has_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_module_is_over_600_lines(path):
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{path.relative_to(PACKAGE.parent)} has {lines} lines (at most {MAX_LINES}): split it"


NOTEBOOK_PARAMETERS = "advkit.params"
PIPELINE_LAYER = frozenset({"advkit.pipeline", "advkit.stages", "advkit.distributed", "advkit.sweep", "advkit.jobs",
                            "advkit.plan", "advkit.__main__", NOTEBOOK_PARAMETERS})
"""The modules that run the notebooks: the only ones that may import the notebooks' parameter table."""


def notebook_layer_importers(graph: dict[str, set[str]]) -> list[str]:
    """The library's modules (outside PIPELINE_LAYER) that import advkit.params."""
    return sorted(m for m, deps in graph.items() if NOTEBOOK_PARAMETERS in deps and m not in PIPELINE_LAYER)


def test_the_library_does_not_import_the_notebook_parameters():
    """The library checks its settings with its own rules (advkit._checks); advkit.params is built from
    them and belongs to the pipeline layer, so no library module imports it."""
    importers = notebook_layer_importers(import_graph())
    assert not importers, f"library modules importing {NOTEBOOK_PARAMETERS} (pipeline layer only): {importers}"
    assert set(PIPELINE_LAYER) <= set(modules()), "PIPELINE_LAYER names a module that does not exist"


# ------------------------------------------------------------------ the graph reader can fail
def _package(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "advkit"
    for rel, source in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(source)
    return root


def test_graph_sees_lazy_relative_and_from_package_imports(tmp_path):
    root = _package(tmp_path, {
        "__init__.py": "",
        "a.py": "def f():\n    from advkit import b\n",
        "b.py": "from .sub.c import thing\n",
        "sub/__init__.py": "",
        "sub/c.py": "import advkit.a.f\nfrom .. import d\nfrom . import e\n",
        "d.py": "import numpy\nfrom advkit.sub import e\n",
        "sub/e.py": "from ...outside import x\n",
    })
    graph = import_graph(root)
    assert graph["advkit.a"] == {"advkit.b"}
    assert graph["advkit.b"] == {"advkit.sub.c"}
    assert graph["advkit.sub.c"] == {"advkit.a", "advkit.d", "advkit.sub.e"}
    assert graph["advkit.d"] == {"advkit.sub.e"}
    assert find_cycle(graph) == ["advkit.a", "advkit.b", "advkit.sub.c", "advkit.a"]


def test_acyclic_graph_has_no_cycle(tmp_path):
    root = _package(tmp_path, {"__init__.py": "", "a.py": "from advkit import b\n", "b.py": "import os\n",
                               "c.py": "from advkit.a import x\nfrom advkit.b import y\n"})
    graph = import_graph(root)
    assert graph == {"advkit": set(), "advkit.a": {"advkit.b"}, "advkit.b": set(), "advkit.c": {"advkit.a", "advkit.b"}}
    assert find_cycle(graph) is None


def test_a_library_module_importing_the_parameters_is_found(tmp_path):
    root = _package(tmp_path, {"__init__.py": "", "params.py": "", "pipeline.py": "from advkit import params\n",
                               "train.py": "def f():\n    from advkit.params import PARAMS\n"})
    assert notebook_layer_importers(import_graph(root)) == ["advkit.train"]
