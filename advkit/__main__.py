"""Command line: `python -m advkit run --profile quick|paper [--only 01,02] [-p name=value ...]`
(advkit.pipeline) and `python -m advkit sweep -g name=v1,v2 ... [--executor local|slurm]` (advkit.sweep)."""

from __future__ import annotations

import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["sweep"]:
        from advkit.sweep import main as sweep_main

        sweep_main(argv[1:])
    else:
        from advkit.pipeline import main as pipeline_main

        pipeline_main(argv)


if __name__ == "__main__":
    main()
