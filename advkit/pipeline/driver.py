"""Profiles and the papermill driver: `python -m advkit run --profile quick|paper`.

A profile (advkit/pipeline/profiles/<name>.yaml) assigns a value to every parameter of every notebook
(the notebooks' defaults are the quick profile's); each notebook receives the ones its
`parameters` cell declares. Every value is checked before the first notebook starts: against
its declaration in advkit.pipeline.params (type, range, list elements, cross-parameter rules; torch-free),
then the variant specs (advkit.training.variants) and the machine (run name, device, files). Kernels are
quiet and stop with the driver.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import yaml

from advkit import progress
from advkit._checks import MAX_SHOWN, shown
from advkit.pipeline import params

PROFILES_DIR = Path(__file__).parent / "profiles"
NOTEBOOKS = ("01_train", "02_attack", "03_finetune", "04_visualize", "05_flatness_correlation")


def notebooks_dir() -> Path:
    return Path(__file__).resolve().parents[2] / "notebooks"  # runs.repo_root, without importing torch


def notebook_paths(only: Sequence[str] | None = None) -> list[Path]:
    """The pipeline's notebooks that exist, in order; `only` picks by number prefix ("01", "02")."""
    paths = [notebooks_dir() / f"{nb}.ipynb" for nb in NOTEBOOKS]
    paths = [p for p in paths if p.exists()]
    if only is not None:
        known = {p.name[:2]: p for p in paths}
        unknown = [o for o in only if o not in known]
        if unknown:
            raise ValueError(f"--only {','.join(unknown)}: no such notebook; choose from {sorted(known)}")
        if not only:
            raise ValueError("--only names no notebook; give numbers such as --only 01,02")
        paths = [known[o] for o in sorted(set(only))]
    return paths


def available_profiles() -> list[str]:
    return sorted(p.stem for p in PROFILES_DIR.glob("*.yaml"))


SWEEP_SECTION = "sweep"  # a profile's job settings for `python -m advkit sweep` (advkit.pipeline.jobs.JobSettings)


def _profile_document(name: str) -> dict[str, Any]:
    if name not in available_profiles():
        raise ValueError(f"profile={shown(name)} does not exist; choose one of {available_profiles()}")
    path = PROFILES_DIR / f"{name}.yaml"
    values = _yaml(path.read_text(), f"profile {name!r} ({path})") or {}
    if not isinstance(values, dict):
        raise ValueError(f"profile {name!r} ({path}) must map parameter names to values, got {type(values).__name__}")
    return values


def load_profile(name: str) -> dict[str, Any]:
    """The parameter values of a profile (its `sweep:` section aside). A profile sets every parameter
    of every notebook, so that none silently takes the notebooks' (quick) default."""
    values = {k: params.coerce(k, v) for k, v in _profile_document(name).items() if k != SWEEP_SECTION}
    declared = {n for nb in params.notebook_parameters(notebook_paths()).values() for n in nb}
    missing = sorted(declared - set(values))
    if missing:
        raise ValueError(f"profile {name!r} ({PROFILES_DIR / f'{name}.yaml'}) does not set {', '.join(missing)}: "
                         f"a profile sets every parameter (python -m advkit params --profile quick lists them)")
    return values


def load_sweep_section(name: str) -> dict[str, Any]:
    """A profile's `sweep:` section: job settings (partition, gpus_per_job, time, mem, ...), or {}."""
    section = _profile_document(name).get(SWEEP_SECTION) or {}
    if not isinstance(section, dict):
        raise ValueError(f"profile {name!r}: its {SWEEP_SECTION}: section must map settings to values")
    return section


def check_parameters(values: dict[str, Any], declared: dict[str, dict[str, dict[str, Any]]],
                     environment: bool = True) -> None:
    """Raise ValueError naming the parameter(s) of the first bad value or broken rule: first the
    torch-free declarations (advkit.pipeline.params), then the variant specs (advkit.training.variants), then, with
    `environment`, the machine (`check_environment`)."""
    full = params.checked_values(values, declared)
    check_variants(full.get("at_variants") or [])
    if environment:
        check_environment(full)


def check_variants(specs: Sequence[str]) -> None:
    """Each adversarial training variant parses (`advkit.training.variants.parse_variant`, which imports torch)."""
    from advkit.training.variants import parse_variant

    for i, spec in enumerate(specs):
        try:
            parse_variant(spec)
        except ValueError as err:
            why = str(err) if len(str(err)) <= 2 * MAX_SHOWN else str(err)[:2 * MAX_SHOWN - 3] + "..."
            raise ValueError(f"parameter at_variants={shown(list(specs))}: at_variants[{i}]={shown(spec)} "
                             f"is invalid: {why}") from None


def check_environment(values: dict[str, Any]) -> None:
    """Checks that need the machine, the torch-free ones first: an existing data_dir and
    pretrained_checkpoint, a confidence_model the run will have (or has), a present GPU for
    device=cuda, a valid run name (advkit.runs.run.check_run_name)."""
    data_dir = values.get("data_dir")
    # os.path's tests answer False for a name too long or holding a NUL byte, where pathlib's raise
    if data_dir is not None and not os.path.isdir(os.path.expanduser(data_dir)):
        raise ValueError(f"parameter data_dir={shown(data_dir)} is not a folder")
    checkpoint = values.get("pretrained_checkpoint")
    if checkpoint is not None and not os.path.isfile(os.path.expanduser(checkpoint)):
        raise ValueError(f"parameter pretrained_checkpoint={shown(checkpoint)} is not a file")
    device = values.get("device", "auto")
    if device.startswith("cuda"):
        import torch

        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = int(device[5:]) if device.startswith("cuda:") else 0
        if index >= count:
            raise ValueError(f"parameter device={device!r}: this machine has {count} CUDA device(s); "
                             f"use device='auto' or 'cpu'" + (f" or 'cuda:0'..'cuda:{count - 1}'" if count else ""))
    from advkit.runs import run as runs

    folder = runs.run_dir(runs.check_run_name(values.get("run", "quick")), create=False)  # names run= itself
    wanted = {"confidence_model": [values.get("confidence_model")], "eigen_map_models": values.get("eigen_map_models")}
    for param, models in wanted.items():
        unknown = [m for m in models or [] if m is not None and m not in params.expected_models(values)]
        if not unknown:
            continue
        from advkit.training.variants import parse_variant

        expected = params.expected_models(values, name=lambda spec: parse_variant(spec).name)
        present = sorted(p.stem for p in (folder / "models").glob("*.pt")) if (folder / "models").is_dir() else []
        unknown = [m for m in unknown if m not in expected + present]
        if unknown:
            raise ValueError(f"parameters {param}={shown(values.get(param))}, "
                             f"xu_attacks={shown(values.get('xu_attacks'))}, "
                             f"at_variants={shown(values.get('at_variants'))}, "
                             f"keep_epochs={shown(values.get('keep_epochs'))}: {param} must name the run's models "
                             f"{sorted(set(expected + present))}; {shown(unknown)} is not one")


def check_base_model(values: dict[str, Any], only: Sequence[str] | None) -> None:
    """Without notebook 01 in this invocation, the run's base model must be the one asked for: its `dataset` and
    `model` as notebook 01 recorded them in the run's manifest.json (a digits model fed CIFAR-10 fails in torch
    half a minute in). A run without that record is left to the notebooks' own checks."""
    if only is None or "01" in only:
        return
    from advkit.runs import run as runs

    manifest = runs.Run(runs.run_dir(runs.check_run_name(values.get("run", "quick")), create=False)).manifest
    try:
        trained = json.loads(manifest.read_text()).get("01_train") or {}
    except (OSError, ValueError, AttributeError):
        return
    for name in ("dataset", "model"):
        if name in trained and name in values and trained[name] != values[name]:
            raise ValueError(f"parameter {name}={shown(values[name])}: the run's base model was trained by notebook "
                             f"01_train with {name}={shown(trained[name])} ({manifest}); pass -p {name}="
                             f"{trained[name]}, or add 01 to --only to train it again")


MAX_YAML_NODES = 10_000
"""Values a YAML document may expand to: aliases share nodes, so ten nested lists of nine aliases
(`&a0 [x, x, ...]`, `&a1 [*a0, *a0, ...]`, ...) are 9**10 values, which no parameter needs."""


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader refusing a mapping that repeats a key (the last would silently win)."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, Any] = {}
        for key, _ in node.value:
            if isinstance(key, yaml.ScalarNode) and key.tag != "tag:yaml.org,2002:merge":
                if key.value in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {shown(key.value)} is repeated (first on line "
                        f"{seen[key.value].line + 1}): the last one would silently win", key.start_mark)
                seen[key.value] = key.start_mark
        return super().construct_mapping(node, deep)


def _expanded_nodes(node: yaml.Node, budget: int) -> int:
    """Nodes of the document under `node` as its aliases expand, counted up to `budget` + 1."""
    count, stack = 0, [node]
    while stack and count <= budget:
        n = stack.pop()
        count += 1
        if isinstance(n, yaml.SequenceNode):
            stack.extend(n.value)
        elif isinstance(n, yaml.MappingNode):
            stack.extend(part for pair in n.value for part in pair)
    return count


_NULL, _STR = "tag:yaml.org,2002:null", "tag:yaml.org,2002:str"


def _read_as_text(node: yaml.Node, name: str) -> None:
    """Plain scalars of a text parameter (or a list of texts) read as the text written: `run=no` is
    the run "no", not False; `run=2024-01-01` not a date. A null stays None."""
    decl = params.PARAMS.get(name)
    if decl is None:
        return
    if decl.kind is str:
        scalars = [node]
    elif decl.item is not None and decl.item.kind is str and isinstance(node, yaml.SequenceNode):
        scalars = node.value
    else:
        return
    for n in scalars:
        if isinstance(n, yaml.ScalarNode) and n.style is None and n.tag != _NULL:
            n.tag = _STR


def _yaml(text: str, where: str, parameter: str | None = None) -> Any:
    """A YAML document: a `parameter`'s value, or (None) a profile mapping parameters to values. Refuses
    repeated keys and documents expanding to more than MAX_YAML_NODES values; text parameters read as text."""
    loader = _StrictLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_nodes(node, MAX_YAML_NODES) > MAX_YAML_NODES:
            raise ValueError(f"{where} is refused: its YAML aliases make it expand to more than {MAX_YAML_NODES} "
                             f"values")
        if parameter is not None:
            _read_as_text(node, parameter)
        elif isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                if isinstance(key, yaml.ScalarNode):
                    _read_as_text(value, key.value)
        return loader.construct_document(node)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        raise ValueError(f"{where} is not valid YAML{at}: {getattr(err, 'problem', None) or err}") from None
    finally:
        loader.dispose()


def parse_assignments(items: Sequence[str]) -> dict[str, Any]:
    """`name=value` strings -> dict; values are parsed as YAML (numbers, lists, true/false) and
    read as their declared type (`run=2024` is the run "2024")."""
    out = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"-p {shown(item)}: expected name=value")
        name, raw = item.split("=", 1)
        name = name.strip()
        if not name:
            raise ValueError(f"-p {shown(item)}: the parameter name is empty; expected name=value")
        value = _yaml(raw, f"-p {shown(item)}", name) if raw.strip() else ""
        out[name] = params.coerce(name, value, raw)
    return out


def parse_only(only: str | None) -> list[str] | None:
    """`--only 01,2` -> ["01", "02"]; None means every notebook; an empty selection is an error."""
    if only is None:
        return None
    picked = [o.strip().zfill(2) for o in only.split(",") if o.strip()]
    if not picked:
        raise ValueError(f"--only {only!r} names no notebook; give numbers such as --only 01,02 "
                         f"(or leave --only out to run all)")
    return picked


@functools.lru_cache(maxsize=None)
def kernel_manager_class():
    """papermill's kernel manager, made quiet: IPC transport (ipykernel warns that TCP runs
    without encryption; sockets in the temporary folder, named by this process) and no SIGINT
    before a graceful shutdown (jupyter_client >= 8 interrupts every kernel first, so a kernel that
    finished logs "KeyboardInterrupt caught in kernel."). `kill_all()` stops the kernels it started
    (their process groups), from any thread."""
    from jupyter_client.manager import AsyncKernelManager

    class QuietKernelManager(AsyncKernelManager):
        live: set = set()

        def __init__(self, **kwargs):
            kwargs.setdefault("transport", "ipc")
            # IPC sockets are files <ip>-<port>: a prefix of this process's own, so that kernels started
            # side by side by other processes (a sweep's jobs) never pick the same socket
            kwargs.setdefault("ip", os.path.join(tempfile.gettempdir(), f"advkit-kernel-{os.getpid()}"))
            super().__init__(**kwargs)

        async def _async_start_kernel(self, **kw) -> None:
            await super()._async_start_kernel(**kw)
            QuietKernelManager.live.add(self)

        async def _async_interrupt_kernel(self) -> None:
            if not self.shutting_down:
                await super()._async_interrupt_kernel()

        async def _async_cleanup_resources(self, restart: bool = False) -> None:
            QuietKernelManager.live.discard(self)
            await super()._async_cleanup_resources(restart=restart)

        start_kernel = _async_start_kernel  # AsyncKernelManager binds the public names to the base's
        cleanup_resources = _async_cleanup_resources

        @classmethod
        def kill_all(cls, grace: float = 3.0) -> None:
            """SIGTERM each kernel's process group, SIGKILL what is left after `grace` seconds, then
            remove the IPC socket files and the connection file each kernel leaves in the temp folder."""
            groups = [getattr(km.provisioner, "pgid", None) or getattr(km.provisioner, "pid", None)
                      for km in list(cls.live) if km.provisioner is not None]
            for sig in (signal.SIGTERM, signal.SIGKILL):
                alive = []
                for pgid in filter(None, groups):
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.killpg(pgid, sig)
                        alive.append(pgid)
                deadline = time.monotonic() + grace
                while alive and time.monotonic() < deadline:
                    alive = [g for g in alive if _group_alive(g)]
                    time.sleep(0.05)
                groups = alive
            for km in list(cls.live):
                km.cleanup_ipc_files()
                km.cleanup_connection_file()

    return QuietKernelManager


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    with contextlib.suppress(ChildProcessError):
        os.waitpid(-pgid, os.WNOHANG)  # reap the kernel if it is our child
    return True


class Interrupted(Exception):
    """The driver got SIGINT or SIGTERM; the notebook's kernel has been stopped."""


def _execute(path: Path, out: Path, parameters: dict[str, Any], log_output: bool) -> None:
    """Run one notebook with papermill in a worker thread, so that the main thread keeps the
    signals: SIGINT or SIGTERM stops the notebook's kernel and raises Interrupted."""
    import papermill

    km_class = kernel_manager_class()
    failure: list[BaseException] = []
    if log_output:  # papermill logs cell output at INFO on its logger; show it on the terminal
        import logging

        logger = logging.getLogger("papermill")
        logger.setLevel(logging.INFO)
        if not logger.handlers:
            logger.addHandler(logging.StreamHandler(sys.stdout))

    def work():
        try:
            papermill.execute_notebook(str(path), str(out), parameters=parameters, cwd=str(path.parent),
                                       progress_bar=False, log_output=log_output, kernel_manager_class=km_class)
        except BaseException as err:  # re-raised in the main thread
            failure.append(err)

    def stop(signum, frame):
        raise Interrupted(signal.Signals(signum).name)

    worker = threading.Thread(target=work, name=f"papermill {path.stem}", daemon=True)
    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        worker.start()
        while worker.is_alive():
            worker.join(0.2)
    except Interrupted:
        km_class.kill_all()
        worker.join(10)
        raise
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if failure:
        raise failure[0]


# Parameters that name files or folders: made absolute by the driver before any kernel starts.
PATH_PARAMETERS = ("data_dir", "pretrained_checkpoint")


def resolve_paths(values: dict[str, Any]) -> dict[str, Any]:
    """`values` with the PATH_PARAMETERS made absolute against the current directory."""
    return {k: str(Path(v).expanduser().resolve()) if k in PATH_PARAMETERS and isinstance(v, str) else v
            for k, v in values.items()}


@contextlib.contextmanager
def default_environment(name: str, value: str) -> Iterator[str]:
    """`os.environ[name]` (inherited by the kernels) set to `value` unless it is already set, and
    removed again afterwards; yields the value in force."""
    if os.environ.get(name):
        yield os.environ[name]
        return
    os.environ[name] = value
    try:
        yield value
    finally:
        os.environ.pop(name, None)


def run(profile: str = "quick", only: Sequence[str] | None = None, overrides: dict[str, Any] | None = None,
        log_output: bool = False, plan: Any = None) -> Path:
    """Validate the parameters, print the run's plan (`plan`: an advkit.pipeline.plan.Request; None: no plan), then
    execute the notebooks in order into `runs/<run>/notebooks/`."""
    values = {**load_profile(profile), **(overrides or {})}
    declared = params.notebook_parameters(notebook_paths())
    paths = notebook_paths(only)
    check_parameters(values, declared)  # against every notebook, so a profile stays valid with --only
    check_base_model(values, only)
    if plan is not None:  # its total before the first notebook; ValueError above plan.budget_h
        plan.announce([resolve_paths(values)], only)
    from advkit.runs.run import (
        Run,
        environment_info,
        one_at_a_time,
        resolve_environment_paths,
        run_dir,
        update_manifest,
    )

    # Relative folders resolve once, against the caller's directory: kernels start in notebooks/.
    resolve_environment_paths()
    values = resolve_paths(values)
    run_name = str(values.get("run", profile))
    root = run_dir(run_name)
    # a run's figures go to runs/<run>/figures/ unless ADVKIT_FIGURES_DIR says otherwise: running the
    # pipeline never rewrites the committed figures/ (`make notebooks` refreshes those)
    with (one_at_a_time(Run(root).lock, "python -m advkit run"),  # a second run of it is refused
          default_environment("ADVKIT_FIGURES_DIR", str(root / "figures"))):
        out_dir = root / "notebooks"
        out_dir.mkdir(parents=True, exist_ok=True)
        update_manifest(out_dir.parent, "pipeline", {"profile": profile, "parameters": values,
                                                     "environment": environment_info(values.get("device", "auto"))})
        log = out_dir.parent / "log.txt"  # these lines and the notebooks' progress lines (advkit.progress)

        def say(text: str) -> None:
            print(f"[advkit] {text}", flush=True)
            progress.append(log, "advkit", text)

        for path in paths:
            nb_params = {k: v for k, v in values.items() if k in declared[path.stem]}
            t0 = time.perf_counter()
            say(f"{path.stem} started -> {out_dir / path.name}")
            try:
                # the kernel's progress lines (advkit.progress) go to log.txt and are printed as they come
                with progress.following(log, path.stem, lambda line: print(f"[advkit] {line}", flush=True)):
                    _execute(path, out_dir / path.name, nb_params, log_output)
            except Interrupted as err:
                say(f"{path.stem} interrupted ({err}) after {time.perf_counter() - t0:.0f} s; its kernel was shut down")
                raise
            except Exception:
                say(f"{path.stem} failed after {time.perf_counter() - t0:.0f} s; see {out_dir / path.name}")
                raise
            say(f"{path.stem} done in {time.perf_counter() - t0:.0f} s")
    return out_dir.parent


def refresh_notebooks(only: Sequence[str] | None = None) -> None:
    """Re-execute the notebooks in place with their own (quick) defaults, refreshing the
    committed outputs that nbval compares against. Use a fresh ADVKIT_RUNS_DIR."""
    for path in notebook_paths(only):
        t0 = time.perf_counter()
        print(f"[advkit] refreshing {path.stem} -> {path}", flush=True)
        _execute(path, path, {}, log_output=False)
        print(f"[advkit] {path.stem} done in {time.perf_counter() - t0:.0f} s", flush=True)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m advkit", description=__doc__.splitlines()[0],
                                     epilog="python -m advkit sweep --help: notebook 03's cells of a grid as "
                                            "jobs (SLURM or local; advkit.pipeline.sweep)")
    sub = parser.add_subparsers(dest="command", required=True)
    p_run = sub.add_parser("run", help="run the notebook pipeline")
    p_run.add_argument("--profile", default="quick", help=f"one of {available_profiles()}")
    p_run.add_argument("--only", default=None, help="comma-separated notebook numbers, e.g. 01,02")
    p_run.add_argument("-p", "--param", action="append", default=[], metavar="NAME=VALUE",
                       help="override a parameter (repeatable)")
    p_run.add_argument("--log-output", action="store_true", help="stream notebook output")
    from advkit.pipeline.plan import Request, add_arguments

    add_arguments(p_run)  # --budget, --reference
    p_params = sub.add_parser("params", help="list the notebooks' parameters and a profile's values")
    p_params.add_argument("--profile", default="quick")
    p_refresh = sub.add_parser("refresh", help="re-execute notebooks in place (maintainers; nbval outputs)")
    p_refresh.add_argument("--only", default=None)
    args = parser.parse_args(argv)
    try:
        if args.command == "params":
            values = load_profile(args.profile)
            for nb, declared in params.notebook_parameters(notebook_paths()).items():
                print(f"{nb}:")
                for name, info in declared.items():
                    val = values.get(name, info["default"])
                    rule = params.PARAMS[name].allowed if name in params.PARAMS else "undeclared"
                    print(f"  {name}: {info['inferred_type_name']} = {val}   # {info['help']} [{rule}]")
            return
        only = parse_only(args.only)
        if args.command == "refresh":
            refresh_notebooks(only)
            return
        out = run(args.profile, only, parse_assignments(args.param), args.log_output,
                  Request(args.budget, args.reference))
        print(f"[advkit] run directory: {out}")
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except (Interrupted, KeyboardInterrupt) as err:
        print(f"[advkit] stopped ({err or 'SIGINT'})", file=sys.stderr)
        sys.exit(143 if str(err) == "SIGTERM" else 130)


def plan_main(argv: Sequence[str] | None = None) -> None:
    """`python -m advkit plan`: print the run's plan, notebook by notebook; exit 2 on a bad argument or a
    plan above --budget."""
    from advkit.pipeline.plan import add_arguments, budget_table, check_budget, costs_for, plan_text, project

    p = argparse.ArgumentParser(prog="python -m advkit plan",
                                description="the run's cost before it starts, notebook by notebook "
                                            "(advkit.pipeline.plan)")
    p.add_argument("--profile", default="quick", help=f"one of {available_profiles()}")
    p.add_argument("--only", default=None, help="comma-separated notebook numbers, e.g. 01,02")
    p.add_argument("-p", "--param", action="append", default=[], metavar="NAME=VALUE",
                   help="override a parameter (repeatable)")
    p.add_argument("--table", action="store_true", help="print every item as a Markdown table too")
    p.add_argument("--fresh", action="store_true",
                   help="measure again rather than reuse this device's cached costs")
    add_arguments(p)
    args = p.parse_args(argv)
    try:
        values = {**load_profile(args.profile), **parse_assignments(args.param)}
        params.checked_values(values, params.notebook_parameters(notebook_paths()))  # torch-free
        only = parse_only(args.only)
        if only is not None:
            notebook_paths(only)  # names existing notebooks
        costs = costs_for(values, only, args.reference, args.fresh)
        items = project(values, costs, only)
        print(plan_text(items, costs, [values["model"], values["at_model"] or values["model"]]))
        if args.table:
            print("\n" + budget_table(items))
        check_budget(items, args.budget)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
