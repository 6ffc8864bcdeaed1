"""Notebook 04's surfaces and notebook 05's flatness table across processes, with torchrun:

    torchrun --nproc_per_node=N -m advkit.pipeline.distributed surfaces --profile paper --run-name NAME
    torchrun --nproc_per_node=N -m advkit.pipeline.distributed flatness --profile paper --run-name NAME

(`--run-name`, not `--run`: torchrun's own parser reads any `--run...` as its `--run-path`.)

Each command computes what its notebook would for that profile (`-p name=value` overrides, as
`python -m advkit run`), with the settings built by the same function the notebook calls
(`advkit.pipeline.stages`), into the run directory; the notebook then finds the files complete and only
plots. Notebooks 04 and 05 stay the entry point on one machine.

Design (the simplest correct one): every rank loads the data and every model; a surface's grid
rows (`surfaces`) or the run's models (`flatness`) are dealt out in rounds, one per rank
(`advkit.ranks.in_rounds`); all ranks receive each round's results and rank 0, the one writer,
writes the file after every round, atomically, as one process writes it after every row or
model. So the file is the one a single process writes, bit for bit the same values (each row
is computed by the same code on the same inputs), and a killed job resumes from the complete
rounds on disk, with any number of processes. Ranks started with other parameters (or finding
other files) stop with an error naming them, before anything is computed (`advkit.ranks.agree`).
NCCL when the ranks use GPUs (each on cuda:LOCAL_RANK), gloo on CPUs. Without torchrun the
command runs in one process.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from collections.abc import Sequence
from typing import Any

from advkit.pipeline import driver as pipeline
from advkit.pipeline import params

COMMANDS = {"surfaces": "04_visualize", "flatness": "05_flatness_correlation"}


def profile_values(profile: str, run: str | None = None, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Every parameter's value for `profile` with `overrides` and the run name, checked as
    `python -m advkit run` checks them (`advkit.pipeline.driver.check_parameters`)."""
    values = {**pipeline.load_profile(profile), **(overrides or {})}
    if run is not None:
        values["run"] = params.coerce("run", run)
    declared = params.notebook_parameters(pipeline.notebook_paths())
    pipeline.check_parameters(values, declared)
    return params.effective_values(values, declared)


def compute(command: str, values: dict[str, Any]) -> str:
    """Run `command` ("surfaces" or "flatness") on this process's share; a line saying what was written."""
    from advkit import ranks
    from advkit.pipeline import stages

    if command == "surfaces":
        study = stages.landscape_study(stages.LandscapeParameters.from_values(values))
        surfaces = study.surfaces()
        sensitivity = study.sensitivity_surfaces()
        n = sum(len(s) for s in surfaces.values()) + len(sensitivity)
        where = f"{study.run.landscapes} ({ranks.world_size()} process(es))"
        return f"{n} surfaces of {len(study.models)} model(s) in {where}"
    if command == "flatness":
        study = stages.flatness_study(stages.FlatnessParameters.from_values(values))
        table = study.table(progress=ranks.is_writer())
        return f"{len(table)} model(s) in {study.run.flatness} ({ranks.world_size()} process(es))"
    raise ValueError(f"command={command!r}: choose one of {sorted(COMMANDS)}")


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m advkit.pipeline.distributed surfaces|flatness [flatness] --profile P --run-name NAME
    [-p name=value ...]`."""
    parser = argparse.ArgumentParser(prog="torchrun --nproc_per_node=N -m advkit.pipeline.distributed",
                                     description="Notebook 04's surfaces or notebook 05's flatness.csv across "
                                                 "torchrun's processes (one process without torchrun).")
    parser.add_argument("command", nargs="+", choices=sorted(COMMANDS),
                        help="surfaces (notebook 04) and/or flatness (notebook 05), in the order given")
    parser.add_argument("--profile", default="quick", help="advkit/pipeline/profiles/<profile>.yaml (default quick)")
    parser.add_argument("--run-name", default=None, help="run name (default: the profile's `run`)")
    parser.add_argument("-p", "--param", action="append", default=[], metavar="NAME=VALUE",
                        help="override a parameter (YAML value), as `python -m advkit run -p`")
    args = parser.parse_args(argv)
    try:
        values = profile_values(args.profile, args.run_name, pipeline.parse_assignments(args.param))
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    from advkit import ranks
    from advkit.reproducibility import set_reproducible
    from advkit.runs.run import StaleCacheWarning, resolve_device

    set_reproducible(values["seed"], values["threads"])  # as the notebook's first cell
    ranks.init(cuda=resolve_device(values["device"]).type == "cuda")
    if not ranks.is_writer():  # each rank reads the same caches: one warning is enough
        warnings.simplefilter("ignore", StaleCacheWarning)
    writer, start = ranks.is_writer(), time.perf_counter()
    try:
        ranks.agree("parameters", {"commands": args.command, **values})
        for command in args.command:
            line = compute(command, values)
            if writer:
                print(f"{command}: {line}, {time.perf_counter() - start:.1f} s; notebook {COMMANDS[command]} "
                      "now finds them complete", flush=True)
            start = time.perf_counter()
    except ranks.RanksDisagree as err:  # every rank says so, before anything is computed
        ranks.finish(wait=False)
        print(f"error: {err}", file=sys.stderr)
        return 2
    except BaseException:
        ranks.finish(wait=False)  # torchrun then stops the other ranks
        raise
    ranks.finish()
    return 0


if __name__ == "__main__":
    sys.exit(main())
