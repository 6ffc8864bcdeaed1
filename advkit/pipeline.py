"""Profiles and the papermill driver: `python -m advkit run --profile quick|paper`.

A profile (advkit/profiles/<name>.yaml) assigns values to the notebooks' parameters;
each notebook receives the ones its `parameters` cell declares. Every value is
checked (name, type, range) before the first notebook starts.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

from advkit.runs import environment_info, repo_root, run_dir, update_manifest

PROFILES_DIR = Path(__file__).parent / "profiles"
NOTEBOOKS = ("01_train", "02_attack", "03_finetune", "04_visualize", "05_flatness_correlation")


def notebooks_dir() -> Path:
    return repo_root() / "notebooks"


def notebook_paths(only: Sequence[str] | None = None) -> list[Path]:
    """The pipeline's notebooks that exist, in order; `only` picks by number prefix ("01", "02")."""
    paths = [notebooks_dir() / f"{nb}.ipynb" for nb in NOTEBOOKS]
    paths = [p for p in paths if p.exists()]
    if only:
        known = {p.name[:2]: p for p in paths}
        unknown = [o for o in only if o not in known]
        if unknown:
            raise ValueError(f"--only {','.join(unknown)}: no such notebook; choose from {sorted(known)}")
        paths = [known[o] for o in sorted(only)]
    return paths


def available_profiles() -> list[str]:
    return sorted(p.stem for p in PROFILES_DIR.glob("*.yaml"))


def load_profile(name: str) -> dict[str, Any]:
    """The parameter values of a profile."""
    if name not in available_profiles():
        raise ValueError(f"profile={name!r} does not exist; choose one of {available_profiles()}")
    return yaml.safe_load((PROFILES_DIR / f"{name}.yaml").read_text()) or {}


def notebook_parameters(paths: Sequence[Path]) -> dict[str, dict[str, dict[str, Any]]]:
    """{notebook name: {parameter: papermill's description (type, default, help)}}."""
    import papermill

    return {p.stem: papermill.inspect_notebook(str(p)) for p in paths}


# Range and choice rules for parameters, checked on top of the declared types.
def _choices(values: Callable[[], Sequence[str]]):
    return lambda v: (v in values(), f"one of {sorted(values())}")


def _at_least(lo: float):
    return lambda v: (v >= lo, f">= {lo}")


def _between(lo: float, hi: float):
    return lambda v: (lo <= v <= hi, f"in [{lo}, {hi}]")


def _models():
    from advkit.models import MODELS
    return list(MODELS)


def _datasets():
    from advkit.data import DATASETS
    return list(DATASETS)


RULES: dict[str, Callable[[Any], tuple[bool, str]]] = {
    "model": _choices(_models),
    "dataset": _choices(_datasets),
    "device": lambda v: (v in ("auto", "cpu", "cuda") or str(v).startswith("cuda:"), "auto, cpu, cuda or cuda:N"),
    "epochs": _at_least(1),
    "batch_size": _at_least(1),
    "lr": lambda v: (v > 0, "> 0"),
    "weight_decay": _at_least(0),
    "seed": _at_least(0),
    "n_train": _at_least(1),
    "n_test": _at_least(1),
    "label_smoothing": lambda v: (0 <= v < 1, "in [0, 1)"),
    "eps": _between(0, 1),
    "aa_targets": _between(1, 9),
    "stadv_tau": _at_least(0),
    "threads": _at_least(1),
    "resolution": _at_least(3),
    "line_resolution": _at_least(3),
    "sensitivity_resolution": _at_least(4),
    "robust_resolution": lambda v: (v == 0 or v >= 3, "0 (off) or >= 3"),
    "span": lambda v: (v > 0, "> 0"),
    "radius": lambda v: (v > 0, "> 0"),
    "normalization": _choices(lambda: importlib.import_module("advkit.directions").NORMS),
    "hessian_backend": _choices(lambda: ["forward", "reverse"]),
    "optimizer": _choices(lambda: importlib.import_module("advkit.train").OPTIMIZERS),
    "schedule": _choices(lambda: importlib.import_module("advkit.train").SCHEDULES),
}
# Rules by name pattern, for the many budgets and counts: *_eps in [0, 1], *_steps and n_* >= 1.
SUFFIX_RULES: dict[str, Callable[[Any], tuple[bool, str]]] = {"_eps": _between(0, 1), "_steps": _at_least(1),
                                                               "_samples": _at_least(1), "_iters": _at_least(1),
                                                               "_xi": _at_least(0)}


def _rule(name: str) -> Callable[[Any], tuple[bool, str]] | None:
    if name in RULES:
        return RULES[name]
    if name.startswith("n_"):
        return _at_least(1)
    return next((rule for suffix, rule in SUFFIX_RULES.items() if name.endswith(suffix)), None)


def _type_ok(value: Any, type_name: str) -> bool:
    base = (type_name or "None").replace(" ", "").removeprefix("typing.")
    optional = base.startswith("Optional[") or "|None" in base or "None|" in base
    if value is None:
        return optional or base == "None"
    for t in (base.removeprefix("Optional[").removesuffix("]") if base.startswith("Optional[") else base).split("|"):
        if t == "None":
            continue
        if t == "bool" and isinstance(value, bool):
            return True
        if t == "int" and isinstance(value, int) and not isinstance(value, bool):
            return True
        if t == "float" and isinstance(value, (int, float)) and not isinstance(value, bool):
            return True
        if t == "str" and isinstance(value, str):
            return True
        if t.startswith(("list", "tuple")) and isinstance(value, (list, tuple)):
            return True
        if t.startswith("dict") and isinstance(value, dict):
            return True
    return False


def validate(values: dict[str, Any], declared: dict[str, dict[str, dict[str, Any]]]) -> None:
    """Raise ValueError naming the first unknown, mistyped or out-of-range parameter."""
    known: dict[str, str] = {}
    for params in declared.values():
        for name, info in params.items():
            known.setdefault(name, info.get("inferred_type_name") or "None")
    for name, value in values.items():
        if name not in known:
            raise ValueError(f"unknown parameter {name!r}; the notebooks take: {', '.join(sorted(known))}")
        if not _type_ok(value, known[name]):
            raise ValueError(f"parameter {name}={value!r} has the wrong type: expected {known[name]}")
        rule = _rule(name)
        if rule is not None and value is not None and not isinstance(value, (list, dict)):
            ok, allowed = rule(value)
            if not ok:
                raise ValueError(f"parameter {name}={value!r} is out of range: must be {allowed}")


def parse_assignments(items: Sequence[str]) -> dict[str, Any]:
    """`name=value` strings -> dict; values are parsed as YAML (numbers, lists, true/false)."""
    out = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"-p {item!r}: expected name=value")
        name, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw.strip() else ""
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
            try:
                value = float(value)
            except ValueError:
                pass
        out[name.strip()] = value
    return out


def run(profile: str = "quick", only: Sequence[str] | None = None, overrides: dict[str, Any] | None = None,
        log_output: bool = False) -> Path:
    """Validate the parameters, then execute the notebooks in order into `runs/<run>/notebooks/`."""
    import papermill

    values = {**load_profile(profile), **(overrides or {})}
    declared = notebook_parameters(notebook_paths())
    validate(values, declared)  # against every notebook, so a profile stays valid with --only
    paths = notebook_paths(only)
    run_name = values.get("run", profile)
    out_dir = run_dir(run_name) / "notebooks"
    out_dir.mkdir(parents=True, exist_ok=True)
    update_manifest(out_dir.parent, "pipeline", {"profile": profile, "parameters": values,
                                                 "environment": environment_info(values.get("device", "auto"))})
    for path in paths:
        params = {k: v for k, v in values.items() if k in declared[path.stem]}
        t0 = time.perf_counter()
        print(f"[advkit] {path.name} ({profile}) ...", flush=True)
        papermill.execute_notebook(str(path), str(out_dir / path.name), parameters=params,
                                   cwd=str(path.parent), progress_bar=False, log_output=log_output)
        print(f"[advkit] {path.name} done in {time.perf_counter() - t0:.0f} s", flush=True)
    return out_dir.parent


def refresh_notebooks(only: Sequence[str] | None = None) -> None:
    """Re-execute the notebooks in place with their own (quick) defaults, refreshing the
    committed outputs that nbval compares against. Use a fresh ADVKIT_RUNS_DIR."""
    import papermill

    for path in notebook_paths(only):
        print(f"[advkit] refreshing {path.name} ...", flush=True)
        papermill.execute_notebook(str(path), str(path), cwd=str(path.parent), progress_bar=False)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m advkit", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_run = sub.add_parser("run", help="run the notebook pipeline")
    p_run.add_argument("--profile", default="quick", help=f"one of {available_profiles()}")
    p_run.add_argument("--only", default=None, help="comma-separated notebook numbers, e.g. 01,02")
    p_run.add_argument("-p", "--param", action="append", default=[], metavar="NAME=VALUE",
                       help="override a parameter (repeatable)")
    p_run.add_argument("--log-output", action="store_true", help="stream notebook output")
    p_params = sub.add_parser("params", help="list the notebooks' parameters and a profile's values")
    p_params.add_argument("--profile", default="quick")
    p_refresh = sub.add_parser("refresh", help="re-execute notebooks in place (maintainers; nbval outputs)")
    p_refresh.add_argument("--only", default=None)
    args = parser.parse_args(argv)
    try:
        if args.command == "params":
            values = load_profile(args.profile)
            for nb, params in notebook_parameters(notebook_paths()).items():
                print(f"{nb}:")
                for name, info in params.items():
                    val = values.get(name, info["default"])
                    print(f"  {name}: {info['inferred_type_name']} = {val}   # {info['help']}")
            return
        only = [o.strip() for o in args.only.split(",")] if args.only else None
        if args.command == "refresh":
            refresh_notebooks(only)
            return
        out = run(args.profile, only, parse_assignments(args.param), args.log_output)
        print(f"[advkit] run directory: {out}")
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
