"""Profiles and the papermill driver: `python -m advkit run --profile quick|paper`.

A profile (advkit/profiles/<name>.yaml) assigns a value to every parameter of every notebook
(the notebooks' defaults are the quick profile's); each notebook receives the ones its
`parameters` cell declares. Every value is checked before the first notebook starts: against
its declaration in advkit.params (type, range, list elements, cross-parameter rules; torch-free),
then the variant specs (advkit.variants) and the machine (run name, device, files). Kernels are
quiet and stop with the driver.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from advkit import params

PROFILES_DIR = Path(__file__).parent / "profiles"
NOTEBOOKS = ("01_train", "02_attack", "03_finetune", "04_visualize", "05_flatness_correlation")


def notebooks_dir() -> Path:
    return Path(__file__).resolve().parent.parent / "notebooks"  # runs.repo_root, without importing torch


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


SWEEP_SECTION = "sweep"  # a profile's job settings for `python -m advkit sweep` (advkit.sweep.JobSettings)


def _profile_document(name: str) -> dict[str, Any]:
    if name not in available_profiles():
        raise ValueError(f"profile={name!r} does not exist; choose one of {available_profiles()}")
    path = PROFILES_DIR / f"{name}.yaml"
    values = _yaml(path.read_text(), f"profile {name!r} ({path})") or {}
    if not isinstance(values, dict):
        raise ValueError(f"profile {name!r} ({path}) must map parameter names to values, got {type(values).__name__}")
    return values


def load_profile(name: str) -> dict[str, Any]:
    """The parameter values of a profile (its `sweep:` section aside)."""
    return {k: params.coerce(k, v) for k, v in _profile_document(name).items() if k != SWEEP_SECTION}


def load_sweep_section(name: str) -> dict[str, Any]:
    """A profile's `sweep:` section: job settings (partition, gpus_per_job, time, mem, ...), or {}."""
    section = _profile_document(name).get(SWEEP_SECTION) or {}
    if not isinstance(section, dict):
        raise ValueError(f"profile {name!r}: its {SWEEP_SECTION}: section must map settings to values")
    return section


notebook_parameters = params.notebook_parameters  # {notebook: {parameter: type, default, help}}, no papermill


def validate(values: dict[str, Any], declared: dict[str, dict[str, dict[str, Any]]],
             environment: bool = True) -> None:
    """Raise ValueError naming the parameter(s) of the first bad value or broken rule: first the
    torch-free declarations (advkit.params), then the variant specs (advkit.variants), then, with
    `environment`, the machine (`check_environment`)."""
    full = params.validate(values, declared)
    check_variants(full.get("at_variants") or [])
    if environment:
        check_environment(full)


def check_variants(specs: Sequence[str]) -> None:
    """Each adversarial training variant parses (`advkit.variants.parse_variant`, which imports torch)."""
    from advkit.variants import parse_variant

    for i, spec in enumerate(specs):
        try:
            parse_variant(spec)
        except ValueError as err:
            raise ValueError(f"parameter at_variants={list(specs)!r}: at_variants[{i}]={spec!r} is invalid: {err}") from None


def check_environment(values: dict[str, Any]) -> None:
    """Checks that need the machine, the torch-free ones first: an existing data_dir and
    pretrained_checkpoint, a confidence_model the run will have (or has), a present GPU for
    device=cuda, a valid run name (advkit.runs.check_run_name)."""
    data_dir = values.get("data_dir")
    if data_dir is not None and not Path(os.path.expanduser(data_dir)).is_dir():
        raise ValueError(f"parameter data_dir={data_dir!r} is not a folder")
    checkpoint = values.get("pretrained_checkpoint")
    if checkpoint is not None and not Path(os.path.expanduser(checkpoint)).is_file():
        raise ValueError(f"parameter pretrained_checkpoint={checkpoint!r} is not a file")
    device = values.get("device", "auto")
    if device.startswith("cuda"):
        import torch

        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = int(device[5:]) if device.startswith("cuda:") else 0
        if index >= count:
            raise ValueError(f"parameter device={device!r}: this machine has {count} CUDA device(s); "
                             f"use device='auto' or 'cpu'" + (f" or 'cuda:0'..'cuda:{count - 1}'" if count else ""))
    from advkit import runs  # imports torch

    folder = runs.run_dir(runs.check_run_name(values.get("run", "quick")), create=False)  # names run= itself
    model = values.get("confidence_model")
    if model is not None and model not in params.expected_models(values):
        from advkit.variants import parse_variant

        expected = params.expected_models(values, name=lambda spec: parse_variant(spec).name)
        present = sorted(p.stem for p in (folder / "models").glob("*.pt")) if (folder / "models").is_dir() else []
        if model not in expected + present:
            raise ValueError(f"parameters confidence_model={model!r}, xu_attacks={values.get('xu_attacks')!r}, "
                             f"at_variants={values.get('at_variants')!r}, keep_epochs={values.get('keep_epochs')!r}: "
                             f"confidence_model must be one of the run's models {sorted(set(expected + present))}")


def _yaml(text: str, where: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        raise ValueError(f"{where} is not valid YAML{at}: {getattr(err, 'problem', None) or err}") from None


def parse_assignments(items: Sequence[str]) -> dict[str, Any]:
    """`name=value` strings -> dict; values are parsed as YAML (numbers, lists, true/false) and
    read as their declared type (`run=2024` is the run "2024")."""
    out = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"-p {item!r}: expected name=value")
        name, raw = item.split("=", 1)
        name = name.strip()
        if not name:
            raise ValueError(f"-p {item!r}: the parameter name is empty; expected name=value")
        value = _yaml(raw, f"-p {item!r}") if raw.strip() else ""
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
def _kernel_manager_class():
    """papermill's kernel manager, made quiet: IPC transport (ipykernel warns that TCP runs
    without encryption; sockets in the temporary folder, named by this process) and no SIGINT
    before a graceful shutdown (jupyter_client >= 8 interrupts every kernel first, so a kernel that
    finished logs "KeyboardInterrupt caught in kernel."). `kill_all()` stops the kernels it started (their process groups), from any thread."""
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
            """SIGTERM each kernel's process group, SIGKILL what is left after `grace` seconds."""
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

    km_class = _kernel_manager_class()
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


def run(profile: str = "quick", only: Sequence[str] | None = None, overrides: dict[str, Any] | None = None,
        log_output: bool = False) -> Path:
    """Validate the parameters, then execute the notebooks in order into `runs/<run>/notebooks/`."""
    values = {**load_profile(profile), **(overrides or {})}
    declared = notebook_parameters(notebook_paths())
    paths = notebook_paths(only)
    validate(values, declared)  # against every notebook, so a profile stays valid with --only
    from advkit.runs import environment_info, resolve_environment_paths, run_dir, update_manifest  # torch: after validation

    # Relative folders resolve once, against the caller's directory: kernels start in notebooks/.
    resolve_environment_paths()
    values = resolve_paths(values)
    run_name = str(values.get("run", profile))
    out_dir = run_dir(run_name) / "notebooks"
    out_dir.mkdir(parents=True, exist_ok=True)
    update_manifest(out_dir.parent, "pipeline", {"profile": profile, "parameters": values,
                                                 "environment": environment_info(values.get("device", "auto"))})
    for path in paths:
        nb_params = {k: v for k, v in values.items() if k in declared[path.stem]}
        t0 = time.perf_counter()
        print(f"[advkit] {path.stem} started -> {out_dir / path.name}", flush=True)
        try:
            _execute(path, out_dir / path.name, nb_params, log_output)
        except Interrupted as err:
            print(f"[advkit] {path.stem} interrupted ({err}) after {time.perf_counter() - t0:.0f} s; "
                  f"its kernel was shut down", flush=True)
            raise
        except Exception:
            print(f"[advkit] {path.stem} failed after {time.perf_counter() - t0:.0f} s; "
                  f"see {out_dir / path.name}", flush=True)
            raise
        print(f"[advkit] {path.stem} done in {time.perf_counter() - t0:.0f} s", flush=True)
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
                                            "jobs (SLURM or local; advkit.sweep)")
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
            for nb, declared in notebook_parameters(notebook_paths()).items():
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
        out = run(args.profile, only, parse_assignments(args.param), args.log_output)
        print(f"[advkit] run directory: {out}")
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except (Interrupted, KeyboardInterrupt) as err:
        print(f"[advkit] stopped ({err or 'SIGINT'})", file=sys.stderr)
        sys.exit(143 if str(err) == "SIGTERM" else 130)
