"""The package's shape: concept folders whose imports flow one way (LAYERS), no import cycle, package
`__init__` files without re-exports, no private name imported across modules, the notebook
parameters known to the pipeline only, and test folders that mirror the concept folders.

The import graph is read from the source with `ast`, so it sees every `import advkit.x`,
`from advkit.x import y`, `from advkit import x` and relative import, at module level and inside
functions (a lazy import still ties two modules together).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "advkit"

# Lowest first: a module may import its own layer and the layers below it, never one above.
LAYERS = [
    ("core", ("advkit._checks", "advkit._torch", "advkit.folding", "advkit.ranks", "advkit.progress",
              "advkit.reproducibility", "advkit.models")),
    ("runs", ("advkit.runs",)),
    ("data", ("advkit.data",)),
    ("attacks", ("advkit.attacks",)),
    ("training", ("advkit.training",)),
    ("curvature", ("advkit.curvature",)),
    ("landscape", ("advkit.landscape",)),
    ("studies", ("advkit.studies",)),
    ("plots", ("advkit.plots",)),
    ("pipeline", ("advkit.pipeline", "advkit.__main__")),
]
NOTEBOOK_PARAMETERS = "advkit.pipeline.params"  # the notebooks' parameter table: the pipeline's alone


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


def layer(module: str) -> int | None:
    """The index in LAYERS of the layer that holds `module` (a package holds its submodules)."""
    for index, (_, members) in enumerate(LAYERS):
        if any(module == m or module.startswith(m + ".") for m in members):
            return index
    return None


def test_every_module_has_a_layer():
    orphans = [m for m in modules() if m != "advkit" and layer(m) is None]
    assert not orphans, f"add these modules to a layer in LAYERS: {orphans}"


def test_imports_follow_the_layers():
    upward = sorted(f"{a} ({LAYERS[layer(a)][0]}) imports {b} ({LAYERS[layer(b)][0]})"
                    for a, targets in import_graph().items() if a != "advkit"
                    for b in targets if b != "advkit" and layer(b) > layer(a))
    assert not upward, "imports against the layer order:\n" + "\n".join(upward)


def test_the_tests_mirror_the_package():
    """tests/<concept>/ for each concept folder advkit/<concept>/, and no test folder without one."""
    tests = PACKAGE.parent / "tests"
    concepts = {p.parent.name for p in PACKAGE.glob("*/__init__.py")}
    test_folders = {p.parent.name for p in tests.glob("*/test_*.py")}
    assert concepts and test_folders == concepts, (sorted(concepts - test_folders), sorted(test_folders - concepts))


def test_only_the_pipeline_imports_the_notebook_parameters():
    users = sorted(a for a, targets in import_graph().items() if NOTEBOOK_PARAMETERS in targets)
    assert users and all(u.startswith("advkit.pipeline.") for u in users), users


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("__init__.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_package_init_holds_a_docstring_only(path):
    def allowed(node: ast.stmt) -> bool:  # the docstring, and dunders such as __version__
        if isinstance(node, ast.Expr):
            return isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)
        return isinstance(node, ast.Assign) and all(isinstance(t, ast.Name) and t.id.startswith("__")
                                                    for t in node.targets)

    assert all(allowed(n) for n in ast.parse(path.read_text()).body), (
        f"{path.relative_to(PACKAGE.parent)}: import from the defining module, not through a package")


def test_no_private_name_is_imported_across_modules():
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("advkit"):
                found += [f"{path.relative_to(PACKAGE.parent)}: {a.name} from {node.module}"
                          for a in node.names if a.name.startswith("_")]
    assert not found, found


def defined_names(path: Path) -> set[str]:
    """The names a module defines itself (functions, classes, assignments), not those it imports."""
    names: set[str] = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                names |= {n.id for n in ast.walk(target) if isinstance(n, ast.Name)}
    return names


def test_every_name_is_imported_from_the_module_that_defines_it():
    """No re-exports: `from advkit.x import name` finds `name` defined in advkit.x (or names a submodule)."""
    mods = modules()
    relayed = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and not node.level and node.module in mods:
                own = defined_names(mods[node.module])
                relayed += [f"{path.relative_to(PACKAGE.parent)}: {a.name} from {node.module}" for a in node.names
                            if a.name not in own and f"{node.module}.{a.name}" not in mods]
    assert not relayed, relayed


def test_no_module_aliases_another_modules_name():
    """No aliases either (`f = other.f` at module level, `other` one of the package's modules): one home per name."""
    mods = modules()
    aliases = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text())
        bound = set()  # the names this file binds to the package's modules
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and not node.level and node.module:
                bound |= {a.asname or a.name for a in node.names if f"{node.module}.{a.name}" in mods}
            elif isinstance(node, ast.Import):
                bound |= {a.asname for a in node.names if a.asname and a.name in mods}
        aliases += [f"{path.relative_to(PACKAGE.parent)}:{node.lineno}" for node in tree.body
                    if isinstance(node, ast.Assign) and isinstance(node.value, ast.Attribute)
                    and isinstance(node.value.value, ast.Name) and node.value.value.id in bound]
    assert not aliases, aliases


def test_layer_rules_catch_an_upward_import(tmp_path):
    root = _package(tmp_path, {"__init__.py": "", "runs/__init__.py": "", "runs/run.py": "from advkit.plots import f\n",
                               "plots/__init__.py": "", "plots/f.py": "from advkit.runs import run\n"})
    graph = import_graph(root)
    assert graph["advkit.runs.run"] == {"advkit.plots.f"}
    assert layer("advkit.plots.f") > layer("advkit.runs.run")


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
