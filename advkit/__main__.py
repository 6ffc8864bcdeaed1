"""Command line: `python -m advkit COMMAND`; `python -m advkit COMMAND --help` for a command's options."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

COMMANDS = {
    "run": "run the notebook pipeline (advkit.pipeline)",
    "plan": "the run's cost before it starts, notebook by notebook (advkit.pipeline.plan)",
    "params": "list the notebooks' parameters and a profile's values",
    "refresh": "re-execute notebooks in place (maintainers; nbval outputs)",
    "sweep": "notebook 03's cells of a parameter grid as jobs, SLURM or local (advkit.pipeline.sweep)",
}


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m advkit", description="advkit's notebook pipeline.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, text in COMMANDS.items():
        sub.add_parser(name, help=text, add_help=False)  # each command's own parser reads its options
    command = parser.parse_args(argv[:1]).command
    if command == "sweep":
        from advkit.pipeline.sweep import main as sweep_main

        sweep_main(argv[1:])
    elif command == "plan":
        from advkit.pipeline.driver import plan_main

        plan_main(argv[1:])
    else:
        from advkit.pipeline.driver import main as pipeline_main

        pipeline_main(argv)


if __name__ == "__main__":
    main()
