"""The zoo as jobs: `python -m advkit sweep` runs each cell of a parameter grid as one submitit job.

A cell is one assignment of the grid's axes (`-g at_variants=pgd_at,trades -g seed=0,1`: four
cells). Its job executes notebook 03 with papermill for that cell only (`zoo_parts` without
"report", `model_suffix` naming the cell), so every job leaves its executed notebook as its log in
`runs/<run>/sweep/<cell>.ipynb` and its models in the one run directory (`models/pgd_at_s1.pt`).
The same job function runs on SLURM (`--executor slurm`) and on this machine (`--executor local`,
one process per job). `runs/<run>/sweep/sweep.json` records the cells, their jobs and status;
a re-run skips cells whose models exist and verify, and a killed cell resumes from its checkpoint
(`advkit.training.fit.fit` resumes a run of the same name exactly).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import itertools
import math
import re
import signal
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

from advkit import progress
from advkit._checks import check_choice, shown
from advkit.pipeline import driver as pipeline
from advkit.pipeline import params
from advkit.pipeline.jobs import EXECUTORS, JobSettings, execute_cell, in_flight, make_executor, submit_and_wait

NOTEBOOK = "03_finetune"
CELL_PARAMETERS = ("zoo_parts", "model_suffix", "run")  # set by the sweep itself, never an axis
NAMING_AXES = ("at_variants", "xu_attacks")  # already in the model names
TAGS = {"seed": "s"}  # short axis tags in the names: seed=1 -> _s1
XU_PARAMETERS = {"xu_attacks", "finetune_epochs", "finetune_lr", "finetune_batch_size", "xu_augment_eps",
                 "xu_augment_mode", "xu_storage"}
AT_PARAMETERS = {"at_variants", "at_model", "at_epochs", "at_eps", "at_alpha", "at_steps", "at_batch_size",
                 "n_robust_train", "n_robust_test", "n_val", "epoch_eps", "epoch_steps", "early_stop_steps",
                 "keep_epochs"}


# ---------------------------------------------------------------- the grid
def split_values(raw: str) -> list[str]:
    """`0,1` -> ["0", "1"]; commas inside brackets stay (`[2,4],[3]` -> ["[2,4]", "[3]"])."""
    out, depth, start = [], 0, 0
    for i, ch in enumerate(raw):
        if ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0:
            out.append(raw[start:i])
            start = i + 1
    return [v.strip() for v in out + [raw[start:]]]


def parse_axes(items: Sequence[str], declared: Mapping[str, Any]) -> dict[str, list[Any]]:
    """`-g name=v1,v2` strings -> {name: [values]}, each value read like a `-p` value (YAML, then its
    declared type); a list parameter's axis takes one element per cell (`at_variants=pgd_at,trades`)."""
    axes: dict[str, list[Any]] = {}
    for item in items:
        name, sep, raw = item.partition("=")
        name = name.strip()
        if not sep or not raw.strip():
            raise ValueError(f"-g {shown(item)}: expected name=value1,value2,...")
        if name not in declared:
            raise ValueError(f"-g {shown(item)}: {shown(name)} is not a parameter of notebook {NOTEBOOK}; "
                             f"an axis is one of {', '.join(sorted(set(declared) - set(CELL_PARAMETERS)))}")
        if name in CELL_PARAMETERS:
            raise ValueError(f"-g {shown(item)}: the sweep sets {name} itself (use --run for the run)")
        if name in axes:
            raise ValueError(f"-g {shown(item)}: axis {name} is given twice")
        texts = split_values(raw)
        if len(texts) > MAX_CELLS:
            raise ValueError(f"-g {shown(item)}: {len(texts)} values; a sweep runs at most {MAX_CELLS} cells")
        values = []
        for text in texts:
            value = pipeline.parse_assignments([f"{name}={text}"])[name]
            kind = params.PARAMS[name].kind if name in params.PARAMS else None
            values.append([value] if kind is list and not isinstance(value, list) else value)
        if len({repr(v) for v in values}) < len(values):
            raise ValueError(f"-g {shown(item)}: a value repeats")
        axes[name] = values
    return axes


MAX_TAG = 40  # characters of one axis value in a cell's name and model suffix (longer: cut, with a hash)
MAX_CELLS = 10_000  # cells of one grid
MAX_CELL_NAME = 120  # characters of a cell's name (its notebook's file name)


def _shortened(text: str, limit: int) -> str:
    """`text`, or its first characters and a hash of the whole when it is longer than `limit`."""
    if len(text) <= limit:
        return text
    return text[:limit - 9] + "-" + hashlib.sha1(text.encode("utf-8", "surrogateescape")).hexdigest()[:8]


def _tag(name: str, value: Any) -> str:
    text = "-".join(map(str, value)) if isinstance(value, list) else str(value)
    return _shortened(re.sub(r"[^A-Za-z0-9_.+-]", "-", TAGS.get(name, name) + text), MAX_TAG)


def cell_parts(axes: Mapping[str, Any], fixed: Mapping[str, Any]) -> list[str]:
    """The parts of notebook 03 a cell trains: those its axes touch (both when none does)."""
    if "zoo_parts" in fixed:
        parts = list(fixed["zoo_parts"])
        if "report" in parts:
            raise ValueError(f"zoo_parts={parts!r}: 'report' is the whole zoo's; after the sweep run notebook "
                             f"03 with -p zoo_parts=[report]")
        return parts
    parts = [p for p, names in (("xu", XU_PARAMETERS), ("at", AT_PARAMETERS)) if set(axes) & names]
    return parts or ["xu", "at"]


@dataclass(frozen=True)
class Cell:
    """One cell of the grid: its name, the parameter values it sets and the models it makes."""

    name: str
    values: dict[str, Any]
    models: tuple[str, ...]


def plan(profile: str, axes: Mapping[str, list[Any]], fixed: Mapping[str, Any], run: str) -> list[Cell]:
    """Every cell of the grid, each validated as it will run (advkit.pipeline.driver.check_parameters: the profile's
    value of an axis is never checked, each cell's is), before any job; the run name, device and files once."""
    from advkit.training.variants import parse_variant

    base = {**pipeline.load_profile(profile), **fixed, "run": run}
    declared = params.notebook_parameters(pipeline.notebook_paths())
    parts = cell_parts(axes, fixed)
    count = math.prod(len(v) for v in axes.values())
    if count > MAX_CELLS:
        raise ValueError(f"the grid has {count} cells ({' x '.join(f'{k}: {len(v)}' for k, v in axes.items())}); "
                         f"a sweep runs at most {MAX_CELLS}")
    cells, owner = [], {}
    for combo in itertools.product(*axes.values()):
        chosen = dict(zip(axes, combo))
        tags = [_tag(k, chosen[k])
                for k in sorted((k for k in chosen if k not in NAMING_AXES), key=lambda k: k == "seed")]
        suffix = "".join("_" + t for t in tags)  # the seed last: <name>_s<seed> (advkit.runs.run.split_seed)
        values = {**base, **chosen, "zoo_parts": parts, "model_suffix": suffix}
        name = "_".join([_tag("", v) for k in NAMING_AXES if k in chosen for v in chosen[k]] + tags) or "cell"
        name = _shortened(name, MAX_CELL_NAME)
        try:
            pipeline.check_parameters(values, declared, environment=False)
        except ValueError as err:
            raise ValueError(f"sweep cell {name} ({shown(chosen)}): {err}") from None
        models = [m for m in params.expected_models(values, name=lambda s: parse_variant(s).name) if m != "base"]
        for m in models:
            if m in owner:
                raise ValueError(f"sweep cells {owner[m]} and {name} would both write models/{m}.pt: "
                                 f"add the axis that tells them apart to the model names")
            owner[m] = name
        cells.append(Cell(name, {k: values[k] for k in [*chosen, "zoo_parts", "model_suffix"]}, tuple(models)))
    values = params.effective_values(base, declared)  # the machine's checks of what notebook 03 uses
    pipeline.check_environment({k: v for k, v in values.items() if k in declared[NOTEBOOK]})
    return cells


# ---------------------------------------------------------------- the sweep
@dataclass
class Record:
    """One cell's line in sweep.json."""

    parameters: dict[str, Any]
    models: list[str]
    notebook: str
    status: str = "pending"
    job_id: str | None = None
    log: str | None = None
    error: str | None = None
    seconds: float | None = None
    history: list[str] = field(default_factory=list)


def cell_is_done(run: Any, cell: Cell) -> bool:
    """Every model of the cell exists and matches its recorded checksum."""
    from advkit.runs.artifacts import CorruptArtifactError, verified

    try:
        for m in cell.models:
            verified(run.model(m))
    except (FileNotFoundError, CorruptArtifactError):
        return False
    return True


def check_prerequisites(run: Any, profile: str) -> None:
    """Notebooks 01 and 02 made the base model and the attack budgets (checksums verified)."""
    from advkit.runs.artifacts import CorruptArtifactError, verified

    first = (f"A sweep trains notebook 03's cells on notebooks 01 and 02's results: first "
             f"python -m advkit run --profile {profile} --only 01,02 -p run={run.root.name}")
    if not run.root.is_dir():  # (naming an artifact would create the folders)
        raise ValueError(f"run {run.root.name!r} does not exist ({run.root}). {first}")
    for path in (run.model("base"), run.attack_table("budgets", ".json")):
        try:
            verified(path)
        except (FileNotFoundError, CorruptArtifactError) as err:
            raise ValueError(f"{err}. {first}") from None


def sweep(profile: str, axes: Mapping[str, list[Any]], fixed: Mapping[str, Any] | None = None, run: str | None = None,
          executor: str = "local", settings: JobSettings | None = None, cell_function: Callable = execute_cell,
          poll_s: float = 0.2, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Validate every cell, check notebooks 01-02's results, skip finished cells, submit the rest
    (`settings.jobs_per_gpu` cells per job) and wait; returns the state written to sweep.json.
    Failed cells are reported by name with their executed notebook; see `main` for the exit status."""
    from advkit.runs.run import Run, one_at_a_time, resolve_environment_paths, update_manifest

    fixed = dict(fixed or {})
    run = str(run or fixed.pop("run", None) or pipeline.load_profile(profile)["run"])
    settings = settings or JobSettings.of(pipeline.load_sweep_section(profile))
    check_choice("executor", executor, EXECUTORS)
    cells = plan(profile, axes, fixed, run)
    out = Run.named(run, create=False)
    check_prerequisites(out, profile)
    environment = resolve_environment_paths()
    folder = out / "sweep"
    base = pipeline.resolve_paths({**pipeline.load_profile(profile), **fixed, "run": run})
    declared = params.notebook_parameters(pipeline.notebook_paths())[NOTEBOOK]
    with one_at_a_time(folder / "sweep.lock", "sweep"):
        terminal = echo

        def echo(line: str) -> None:  # the terminal and the run's log.txt
            terminal(line)
            progress.append(out / "log.txt", "sweep", line.removeprefix("[advkit] "))

        state = {"profile": profile, "run": run, "executor": executor, "axes": dict(axes), "fixed": fixed,
                 "settings": asdict(settings), "cells": {}}
        records = {c.name: Record(c.values, list(c.models), str(folder / f"{c.name}.ipynb")) for c in cells}
        with contextlib.suppress(FileNotFoundError, ValueError):  # earlier attempts' job ids stay on record
            for name, old in out.read_json(folder / "sweep.json")["cells"].items():
                if name in records:
                    records[name].history = list(old.get("history", []))
        todo = []
        for c in cells:
            if cell_is_done(out, c):
                records[c.name].status = "skipped"
            else:
                todo.append(c)
        update_manifest(out, "sweep", {"profile": profile, "axes": dict(axes), "fixed": fixed,
                                       "cells": [c.name for c in cells]})
        echo(f"[advkit] sweep {run}: {len(cells)} cells, {len(cells) - len(todo)} finished already, "
             f"{len(todo)} to run ({executor}, {settings.jobs_per_gpu} per job)")

        def save() -> None:
            state["cells"] = {n: asdict(r) for n, r in records.items()}
            state["updated"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
            out.write_json(folder / "sweep.json", state)

        def payload(c: Cell) -> dict[str, Any]:
            values = {**base, **c.values}
            return {"name": c.name, "notebook": str(pipeline.notebooks_dir() / f"{NOTEBOOK}.ipynb"),
                    "output": records[c.name].notebook,
                    "environment": {**environment, progress.LOG_VARIABLE: str(out / "log.txt"),  # epochs in log.txt
                                    progress.LABEL_VARIABLE: f"{NOTEBOOK} {c.name}"},
                    "parameters": {k: v for k, v in values.items() if k in declared},
                    "models": [str(out.model(m)) for m in c.models]}

        groups = [todo[i:i + settings.jobs_per_gpu] for i in range(0, len(todo), settings.jobs_per_gpu)]
        engine = make_executor(executor, folder / "submitit", settings) if groups else None
        save()
        if groups:
            submit_and_wait(engine, groups, records, payload, cell_function, in_flight(executor, settings), save,
                            poll_s, echo)
        save()
    return state


def failures(state: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    return {n: c for n, c in state["cells"].items() if c["status"] == "failed"}


def summary(state: Mapping[str, Any]) -> str:
    """One line per cell: name, status, job id, seconds, and for failures the error and notebook."""
    lines = [f"{'cell':30s} {'status':8s} {'job':>12s} {'seconds':>8s}"]
    for name, c in state["cells"].items():
        secs = f"{c['seconds']:.0f}" if c.get("seconds") is not None else "-"
        lines.append(f"{name:30s} {c['status']:8s} {c.get('job_id') or '-':>12s} {secs:>8s}")
    for name, c in failures(state).items():
        lines.append(f"FAILED {name}: {c['error']}\n  notebook: {c['notebook']}\n  job log: {c.get('log')}")
    return "\n".join(lines)


class Stopped(KeyboardInterrupt):
    """The sweep got SIGTERM or SIGHUP: it stops as on SIGINT (the jobs in flight are cancelled, their
    cells marked in sweep.json), rather than leaving its jobs and their kernels running."""


STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


def _stop(signum: int, frame: Any) -> None:
    raise Stopped(signal.Signals(signum).name)


def cell_values(profile: str, axes: Mapping[str, list[Any]], fixed: Mapping[str, Any], run: str | None) -> list[dict]:
    """The parameter values of each cell of a sweep, every cell counted (finished ones too), after the
    sweep's own checks: its cells (`plan`) and notebooks 01-02's results in the run."""
    base = {**pipeline.load_profile(profile), **fixed}
    run = str(run or fixed.get("run") or base["run"])
    cells = plan(profile, axes, fixed, run)
    from advkit.runs.run import Run

    check_prerequisites(Run.named(run, create=False), profile)
    return [pipeline.resolve_paths({**base, **c.values}) for c in cells]


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m advkit sweep`: exit 0 when every cell is done, 1 when one failed, 2 on a bad argument,
    128 + the signal's number when stopped by SIGINT, SIGTERM or SIGHUP (130, 143, 129)."""
    p = argparse.ArgumentParser(prog="python -m advkit sweep", description=__doc__.splitlines()[0])
    p.add_argument("--profile", default="quick", help=f"one of {pipeline.available_profiles()}")
    p.add_argument("-g", "--grid", action="append", default=[], metavar="NAME=V1,V2",
                   help="an axis of the grid: a notebook-03 parameter and its values (repeatable)")
    p.add_argument("-p", "--param", action="append", default=[], metavar="NAME=VALUE",
                   help="a fixed parameter for every cell (repeatable)")
    p.add_argument("--run", default=None, help="run directory name (default: the profile's run)")
    p.add_argument("--executor", default="local", choices=EXECUTORS)
    p.add_argument("--partition", default=None)
    p.add_argument("--gpus-per-job", type=int, default=None)
    p.add_argument("--cpus-per-job", type=int, default=None)
    p.add_argument("--time", default=None, help="per job, [D-]HH:MM:SS or minutes")
    p.add_argument("--mem", default=None, help="per job, e.g. 32G")
    p.add_argument("--jobs-per-gpu", type=int, default=None, help="cells packed into one job, sharing its GPU")
    p.add_argument("--max-parallel", type=int, default=None, help="jobs at once")
    from advkit.pipeline.plan import Request, add_arguments

    add_arguments(p)  # --budget, --reference
    args = p.parse_args(argv)
    previous = {sig: signal.signal(sig, _stop) for sig in STOP_SIGNALS}
    try:
        if not args.grid:
            raise ValueError("give at least one axis, e.g. -g at_variants=pgd_at,trades -g seed=0,1")
        declared = params.notebook_parameters(pipeline.notebook_paths())[NOTEBOOK]
        axes = parse_axes(args.grid, declared)
        fixed = pipeline.parse_assignments(args.param)
        settings = JobSettings.of(pipeline.load_sweep_section(args.profile), partition=args.partition,
                                  gpus_per_job=args.gpus_per_job, cpus_per_job=args.cpus_per_job, time=args.time,
                                  mem=args.mem, jobs_per_gpu=args.jobs_per_gpu, max_parallel=args.max_parallel)
        Request(args.budget, args.reference).announce(cell_values(args.profile, axes, fixed, args.run), [NOTEBOOK[:2]])
        state = sweep(args.profile, axes, fixed, args.run, args.executor, settings)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as err:
        name = err.args[0] if isinstance(err, Stopped) else "SIGINT"
        print(f"[advkit] sweep stopped ({name}); the jobs in flight were cancelled, sweep.json says which; "
              "the same command resumes", file=sys.stderr)
        sys.exit(128 + signal.Signals[name].value)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print(summary(state))
    if failures(state):
        print(f"[advkit] {len(failures(state))} cell(s) failed; re-run the same command to retry them "
              f"(finished cells are skipped, killed ones resume from their checkpoints)", file=sys.stderr)
        sys.exit(1)
