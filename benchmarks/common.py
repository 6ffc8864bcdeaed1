"""What every benchmark shares: data, device names, synchronisation and RESULTS.md entries."""

from __future__ import annotations

import platform
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "RESULTS.md"
sys.path.insert(0, str(ROOT))

from advkit.runs import git_commit  # noqa: E402


def load_images(n: int, data_dir: str | None, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, str]:
    """The first n CIFAR-10 test images from `data_dir`, else n random CIFAR-shaped images."""
    if data_dir:
        from advkit.data import get_dataset, to_float
        ds = get_dataset("cifar10", data_dir, download=False)
        return to_float(ds.x_test[:n]), ds.y_test[:n], "CIFAR-10 test (shared JPEG copy)"
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g), "random CIFAR-shaped"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def append_results(title: str, header: str, table: str, path: Path = RESULTS) -> None:
    """Append a dated section (device, commit, the table) to benchmarks/RESULTS.md."""
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    commit = (git_commit() or "none")[:10]
    entry = f"\n### {title} ({stamp})\n\n{header}; commit: {commit}\n\n{table}\n"
    if not path.exists():
        path.write_text("# Benchmark results\n")
    with open(path, "a") as f:
        f.write(entry)
