"""Sweep overhead: seconds a `python -m advkit sweep` job costs beyond its training.

Three ways of running an empty-ish job, --jobs times each, one after another on this machine:

- kernel: papermill executes a one-cell notebook in this process (kernel start-up and shutdown);
- submitit: submitit's local executor runs a no-op job (scheduling: pickling, two Python
  processes, result polling), through `advkit.pipeline.jobs.run_job` as a sweep's job;
- submitit + kernel: the same job executing the one-cell notebook (`advkit.pipeline.jobs.execute_cell`),
  which is what each sweep cell pays before notebook 03 starts training.

Then --jobs of the last kind submitted at once (local executor, all in flight), as a sweep does.

    python benchmarks/sweep_overhead.py              # 10 jobs of each kind, about 1-2 minutes on 2 CPUs

Prints a markdown table and appends it to benchmarks/RESULTS.md (date, device, commit).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import nbformat

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402
from common import RESULTS, append_results, device_name  # noqa: E402

from advkit.pipeline import jobs


def empty_notebook(folder: Path) -> Path:
    """A notebook with a tagged parameters cell and one cell that prints: an empty-ish job."""
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("x = 0", metadata={"tags": ["parameters"]}),
                nbformat.v4.new_code_cell("print(x + 1)")]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    path = folder / "empty.ipynb"
    nbformat.write(nb, path)
    return path


def payload(notebook: Path, i: int) -> dict:
    return {"name": f"j{i}", "notebook": str(notebook), "output": str(notebook.parent / f"out{i}.ipynb"),
            "parameters": {"x": i}, "environment": {}, "models": []}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--jobs", type=int, default=10)
    ap.add_argument("--results", default=str(RESULTS), help="markdown file to append to ('' for none)")
    args = ap.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="sweep_overhead_"))
    notebook = empty_notebook(folder)
    executor = jobs.make_executor("local", folder / "submitit", jobs.JobSettings(time="10"))
    rows = []

    def sequential(label: str, run_one) -> None:
        times = []
        for i in range(args.jobs):
            t0 = time.perf_counter()
            result = run_one(i)
            assert result[0]["status"] == "done", result
            times.append(time.perf_counter() - t0)
        rows.append((label, args.jobs, sum(times) / len(times), min(times), max(times), sum(times)))
        print(f"{label}: {sum(times) / len(times):.2f} s per job", flush=True)

    sequential("kernel (papermill, in process)", lambda i: [jobs.execute_cell(payload(notebook, i))])
    # no-op: advkit.pipeline.jobs.placeholder_cell with no model files to write
    sequential("submitit local job, no-op", lambda i: executor.submit(jobs.run_job, [payload(notebook, i)],
                                                                       jobs.placeholder_cell).result())
    sequential("submitit local job + kernel", lambda i: executor.submit(jobs.run_job, [payload(notebook, i)]).result())
    t0 = time.perf_counter()
    with executor.batch():
        batch = [executor.submit(jobs.run_job, [payload(notebook, 100 + i)]) for i in range(args.jobs)]
    assert all(j.result()[0]["status"] == "done" for j in batch)
    wall = time.perf_counter() - t0
    rows.append((f"submitit local job + kernel, {args.jobs} at once", args.jobs, wall / args.jobs, float("nan"),
                 float("nan"), wall))
    cell = lambda v: "-" if v != v else f"{v:.2f}"  # noqa: E731 - NaN: not measured
    table = ("| job | jobs | s per job | min s | max s | total s |\n|---|---|---|---|---|---|\n"
             + "\n".join(f"| {r[0]} | {r[1]} | {r[2]:.2f} | {cell(r[3])} | {cell(r[4])} | {r[5]:.1f} |" for r in rows))
    print(table)
    header = (f"local executor (submitit), empty-ish jobs; {device_name(torch.device('cpu'))}, "
              f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end")
    if args.results:
        append_results("Sweep overhead per job (submitit local executor, papermill)", header, table, Path(args.results))


if __name__ == "__main__":
    main()
