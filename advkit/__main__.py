"""Command line: `python -m advkit run --profile quick|paper [--only 01,02] [-p name=value ...]`."""

from advkit.pipeline import main

if __name__ == "__main__":
    main()
