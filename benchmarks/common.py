"""What every benchmark shares: data, device names, synchronisation, timing and RESULTS.md entries."""

from __future__ import annotations

import argparse
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "RESULTS.md"
sys.path.insert(0, str(ROOT))

from advkit.runs.run import git_commit  # noqa: E402 (needs the repository root on sys.path, set above)


def load_images(n: int, data_dir: str | None, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, str]:
    """The first n CIFAR-10 test images from `data_dir`, else (no folder, or loading it fails, with a
    warning on stderr) n random CIFAR-shaped images; the third item names which."""
    if data_dir:
        try:
            from advkit._torch import to_float
            from advkit.data import get_dataset
            ds = get_dataset("cifar10", data_dir, download=False)
            return to_float(ds.x_test[:n]), ds.y_test[:n], "CIFAR-10 test (shared JPEG copy)"
        except Exception as err:  # noqa: BLE001 - any failure means: fall back to random images
            print(f"could not load CIFAR-10 from {data_dir} ({err}); using random images", file=sys.stderr)
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g), "random CIFAR-shaped"


@torch.no_grad()
def recalibrate_batchnorm(model: torch.nn.Module, x: torch.Tensor, batch_size: int = 256) -> None:
    """Running BatchNorm statistics = the cumulative average of the batch statistics of x, in
    batches of `batch_size` (torch.optim.swa_utils.update_bn). A randomly initialised ResNet with
    default statistics predicts one class for every input and has meaningless losses."""
    from torch.optim.swa_utils import update_bn
    update_bn([x[i:i + batch_size] for i in range(0, len(x), batch_size)], model)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[Any, float]:
    """(fn(), wall seconds it took), the device synchronised before and after."""
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - start


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def results_entry(title: str, header: str, table: str) -> str:
    """A dated RESULTS.md section: title, `header; commit: <hash>`, the table."""
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    commit = (git_commit() or "none")[:10]
    return f"\n### {title} ({stamp})\n\n{header}; commit: {commit}\n\n{table.rstrip()}\n"


def append_results(title: str, header: str, table: str, path: Path = RESULTS) -> str:
    """Append a dated section (device, commit, the table) to `path` (benchmarks/RESULTS.md); returns it."""
    entry = results_entry(title, header, table)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists() or path.stat().st_size == 0:
        path.write_text("# Benchmark results\n")
    with open(path, "a") as f:
        f.write(entry)
    return entry


def run_header(device: torch.device) -> str:
    """`device: <name>; torch <version>`: how every speed entry starts (the commit comes with `results_entry`)."""
    return f"device: {device_name(device)}; torch {torch.__version__}"


def profile_kernels(fn: Callable[[], Any], device: torch.device, top: int = 10) -> tuple[str, float]:
    """Run fn() under torch.profiler: (the `top` kernels (CUDA) or operators (CPU) by self time as a
    markdown table, the fraction of the wall time the device was idle between them)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sync(device)
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        fn()
        sync(device)
        wall_us = (time.perf_counter() - start) * 1e6
    events = [e for e in prof.events() if (e.device_type == DeviceType.CUDA if cuda
                                           else e.device_type == DeviceType.CPU and e.cpu_parent is None)]
    busy, end = 0.0, -1.0
    for s, e in sorted((ev.time_range.start, ev.time_range.end) for ev in events):  # union of the intervals
        busy += max(0.0, e - max(s, end))
        end = max(end, e)
    idle = max(0.0, 1.0 - busy / wall_us) if wall_us > 0 else float("nan")
    totals: dict[str, list[float]] = {}
    for ev in events:
        t = totals.setdefault(ev.name, [0.0, 0])
        t[0] += ev.time_range.end - ev.time_range.start
        t[1] += 1
    kind = "CUDA kernel" if cuda else "CPU operator (top level)"
    lines = [f"| {kind} | calls | total ms | share of wall |", "|---|---:|---:|---:|"]
    for name, (us, calls) in sorted(totals.items(), key=lambda kv: -kv[1][0])[:top]:
        lines.append(f"| {name[:80].replace('|', '/')} | {calls} | {us / 1e3:.2f} | {us / wall_us:.1%} |")
    lines.append(f"\nwall {wall_us / 1e3:.1f} ms, {len(events)} {kind}s, device idle between them {idle:.1%}")
    return "\n".join(lines), idle


def add_output_args(ap: argparse.ArgumentParser, *, data: bool = False) -> None:
    """The options every benchmark shares: where its entry goes (--results, --no-append); with `data`,
    also the input options (--data-dir, --threads, --seed) of the CIFAR-10 speed scripts."""
    if data:
        ap.add_argument("--data-dir", default=None, help="folder with CIFAR-10 (else random images)")
        ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
        ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--results", default=str(RESULTS))
    ap.add_argument("--no-append", action="store_true", help="print only, do not append to --results")


def publish(title: str, header: str, table: str, args: argparse.Namespace) -> None:
    """Print the dated entry; append it to args.results unless args.no_append."""
    print(results_entry(title, header, table) if args.no_append
          else append_results(title, header, table, Path(args.results)))
