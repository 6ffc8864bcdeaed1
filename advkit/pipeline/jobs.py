"""Sweep jobs on submitit: per-job settings, the executor (SLURM or local processes), what one job
runs (notebook 03 for its cells, with papermill) and the submit-and-wait loop (advkit.pipeline.sweep drives it).

A job's process imports only this module (and papermill when it executes a notebook), so a job
starts in a fraction of a second; the argument checks and advkit.pipeline.driver load where used.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, fields
from multiprocessing import get_context
from pathlib import Path
from typing import Any

EXECUTORS = ("local", "slurm")


# ---------------------------------------------------------------- job settings
@dataclass(frozen=True)
class JobSettings:
    """Per-job resources (a profile's `sweep:` section, then the command line). `time` is
    [D-]HH:MM:SS or minutes; `mem` like 32G; `jobs_per_gpu` cells share one job (and its GPU);
    `max_parallel` bounds the jobs in flight (local: default the CPU count; SLURM: the array's %N)."""

    partition: str | None = None
    gpus_per_job: int = 0
    cpus_per_job: int | None = None
    time: str = "12:00:00"
    mem: str | None = None
    jobs_per_gpu: int = 1
    max_parallel: int | None = None

    def __post_init__(self):
        from advkit._checks import check_int

        check_int("gpus_per_job", self.gpus_per_job, 0, 64)
        check_int("jobs_per_gpu", self.jobs_per_gpu, 1, 1024)
        for name in ("cpus_per_job", "max_parallel"):
            if getattr(self, name) is not None:
                check_int(name, getattr(self, name), 1)
        minutes(self.time), memory_gb(self.mem)

    @classmethod
    def of(cls, section: Mapping[str, Any] | None, **overrides: Any) -> "JobSettings":
        known = {f.name for f in fields(cls)}
        merged = {**(section or {}), **{k: v for k, v in overrides.items() if v is not None}}
        unknown = sorted(set(merged) - known)
        if unknown:
            raise ValueError(f"sweep settings {unknown} are unknown; a profile's sweep: section takes {sorted(known)}")
        return cls(**merged)


def minutes(text: str | int) -> int:
    """SLURM's time: "90" (minutes), "HH:MM:SS", "D-HH:MM:SS" -> minutes (at least 1)."""
    m = re.fullmatch(r"(?:(\d+)-)?(\d+):(\d+):(\d+)|(\d+)", str(text).strip())
    if not m:
        raise ValueError(f"time={text!r}: use minutes or [D-]HH:MM:SS")
    if m.group(5):
        return max(1, int(m.group(5)))
    d, h, mi, s = (int(g or 0) for g in m.groups()[:4])
    return max(1, d * 1440 + h * 60 + mi + (s > 0))


def memory_gb(text: str | None) -> float | None:
    """"32G", "500M", "1T" or a number of GB -> GB."""
    if text is None:
        return None
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([MGT]?)B?", str(text).strip(), re.IGNORECASE)
    if not m:
        raise ValueError(f"mem={text!r}: use e.g. 32G or 500M")
    return float(m.group(1)) * {"M": 1 / 1024, "G": 1, "T": 1024, "": 1}[m.group(2).upper()]


def local_gpus(settings: JobSettings) -> int:
    """GPUs a local job gets: `gpus_per_job`, as far as this machine has them (0: the CPU)."""
    import torch

    return min(settings.gpus_per_job, torch.cuda.device_count() if torch.cuda.is_available() else 0)


def in_flight(kind: str, settings: JobSettings) -> int | None:
    """Jobs at once: SLURM's array limit does it there (None); locally `max_parallel`, else one job
    at a time on the GPU (submitit's local executor gives every job the first GPUs; pack cells
    with `jobs_per_gpu`) or one per CPU core."""
    if kind != "local":
        return None
    return settings.max_parallel or (1 if local_gpus(settings) else os.cpu_count() or 1)


def make_executor(kind: str, folder: Path, settings: JobSettings) -> Any:
    """A submitit executor: SLURM with the settings, or local processes (GPUs only where present)."""
    import submitit

    from advkit._checks import check_choice

    check_choice("executor", kind, EXECUTORS)
    try:
        executor = submitit.AutoExecutor(folder=folder, cluster=kind)
    except RuntimeError as err:  # slurm without srun on this machine
        raise ValueError(f"--executor {kind}: {err} (use --executor local on one machine)") from None
    options: dict[str, Any] = {"timeout_min": minutes(settings.time), "name": "advkit-sweep"}
    gpus = settings.gpus_per_job
    if kind == "local":
        gpus = local_gpus(settings)
    else:
        options.update(slurm_partition=settings.partition, mem_gb=memory_gb(settings.mem),
                       slurm_array_parallelism=settings.max_parallel or 256)
    options.update(gpus_per_node=gpus, cpus_per_task=settings.cpus_per_job)
    executor.update_parameters(**{k: v for k, v in options.items() if v is not None})
    return executor


# ---------------------------------------------------------------- what a job runs
def execute_cell(payload: Mapping[str, Any]) -> dict[str, Any]:
    """Execute the payload's notebook with papermill into its output path; never raises for the
    notebook: returns {"status": "done"|"failed", "error", "seconds"}."""
    import papermill

    from advkit.pipeline.driver import kernel_manager_class

    t0 = time.perf_counter()
    os.environ.update(payload.get("environment", {}))
    notebook = Path(payload["notebook"])
    try:
        papermill.execute_notebook(str(notebook), payload["output"], parameters=payload["parameters"],
                                   cwd=str(notebook.parent), progress_bar=False, start_timeout=600,
                                   kernel_manager_class=kernel_manager_class())
    except KeyboardInterrupt:  # the sweep cancelled the job (submitit's local cancel is SIGINT): stop the kernel
        kernel_manager_class().kill_all()
        raise
    except Exception as err:
        text = f"{getattr(err, 'ename', type(err).__name__)}: {getattr(err, 'evalue', err)}"
        text = " ".join(text.split())  # one line
        return {"status": "failed", "error": text if len(text) <= 1000 else text[:997] + "...",
                "seconds": time.perf_counter() - t0}
    return {"status": "done", "error": None, "seconds": time.perf_counter() - t0}


def placeholder_cell(payload: Mapping[str, Any]) -> dict[str, Any]:
    """A trivial job payload for tests of the bookkeeping at scale: writes each of the cell's model
    files as a few bytes (no checksum, no torch: a job stays a fraction of a second), without a
    notebook. A cell with seed 13 fails, to exercise the failure report."""
    if payload["parameters"].get("seed") == 13:
        return {"status": "failed", "error": "RuntimeError: seed 13 fails (placeholder)", "seconds": 0.0}
    for path in map(Path, payload["models"]):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"placeholder for {payload['name']}\n")
    return {"status": "done", "error": None, "seconds": 0.0}


def run_job(payloads: Sequence[Mapping[str, Any]], cell_function: Callable = execute_cell) -> list[dict[str, Any]]:
    """One submitted job: its cells (`jobs_per_gpu` of them) run concurrently as processes on the
    job's device(s); a single cell runs in the job's own process."""
    if len(payloads) == 1:
        return [cell_function(payloads[0])]
    with ProcessPoolExecutor(max_workers=len(payloads), mp_context=get_context("spawn")) as pool:
        return list(pool.map(cell_function, payloads))


def submit_and_wait(executor: Any, groups: list[list[Any]], records: Mapping[str, Any], payload: Callable,
                     cell_function: Callable, in_flight: int | None, save: Callable, poll_s: float,
                     echo: Callable[[str], None]) -> None:
    """Submit the groups of cells (all at once as a SLURM array; locally at most `in_flight` jobs at a
    time) and record each cell's result in `records` (status, job id, log, error) as its job ends;
    `save` writes them down after every change, `echo` tells each cell's state as it changes
    (submitted, running, done, failed). Interrupted: cancels the jobs in flight."""
    queue, running = list(groups), []

    def submit(batch: list[list[Any]]) -> None:
        with executor.batch():
            jobs = [executor.submit(run_job, [payload(c) for c in g], cell_function) for g in batch]
        for job, g in zip(jobs, batch):
            for c in g:
                r = records[c.name]
                r.status, r.job_id, r.log = "submitted", str(job.job_id), str(job.paths.stdout)
                r.history.append(f"job {job.job_id}")
                echo(f"[advkit] cell {c.name} submitted (job {job.job_id})")
            running.append((job, g))

    try:
        while queue or running:
            room = len(queue) if in_flight is None else in_flight - len(running)
            if room > 0 and queue:
                submit(queue[:room])
                queue = queue[room:]
                save()
            finished = [(j, g) for j, g in running if j.done()]
            started = []  # submitted cells whose job has started (a SLURM job may wait in the queue)
            for job, g in running:
                if (job, g) not in finished and records[g[0].name].status == "submitted" and job.state == "RUNNING":
                    started += g
            for c in started:
                records[c.name].status = "running"
                echo(f"[advkit] cell {c.name} running")
            for job, g in finished:
                running.remove((job, g))
                try:
                    results = job.result()
                except Exception as err:  # the job died (killed, out of time or memory)
                    message = f"{type(err).__name__}: {str(err).strip().splitlines()[-1] if str(err).strip() else ''}"
                    results = [{"status": "failed", "error": f"job {job.job_id} ended: {message}"}] * len(g)
                for c, res in zip(g, results):
                    r = records[c.name]
                    r.status, r.error, r.seconds = res["status"], res.get("error"), res.get("seconds")
                    line = f"[advkit] cell {c.name} {r.status}" + (f": {r.error}; see {r.notebook} "
                                                                   f"(job log {r.log})" if r.error else "")
                    echo(line)
            if finished or started:
                save()
            else:
                time.sleep(poll_s)
    except BaseException:
        for job, g in running:
            with contextlib.suppress(Exception):
                job.cancel(check=False)
            for c in g:
                records[c.name].status, records[c.name].error = "failed", "cancelled: the sweep was interrupted"
        save()
        stop_descendants()
        raise


def stop_descendants(grace_s: float = 5.0) -> None:
    """Stop what a cancel left running among this process's descendants (local jobs and their kernels):
    `grace_s` seconds to end by themselves, then SIGTERM, then SIGKILL."""
    import psutil

    with contextlib.suppress(psutil.Error):
        procs = psutil.Process().children(recursive=True)
        _, alive = psutil.wait_procs(procs, timeout=grace_s)
        for stop in ("terminate", "kill"):
            for proc in alive:
                with contextlib.suppress(psutil.Error):
                    getattr(proc, stop)()
            _, alive = psutil.wait_procs(alive, timeout=3.0)
