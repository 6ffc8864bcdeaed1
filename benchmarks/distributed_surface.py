"""One clean-loss surface computed by 1 process and by 2 processes (gloo, CPU), side by side.

    python benchmarks/distributed_surface.py [--model resnet20] [--n-images 256] [--resolution 7]

Rows: 1 process on 1 thread, 1 process on 2 threads, 2 processes (torch.multiprocessing, gloo)
on 1 thread each: the same cores, shared out differently. The 2-process surface must equal the
1-process, 1-thread one bit for bit (the same rows, computed by the same code on the same float
path). "surface s" is the computation (rank 0: process group up to file complete), "wall s" adds
starting the processes. Prints a table and appends it to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from common import append_results, device_name, load_images, recalibrate_batchnorm  # noqa: E402 (sets sys.path)

from advkit.landscape.directions import random_directions
from advkit.landscape.files import load_surface
from advkit.landscape.settings import SurfaceSettings
from advkit.landscape.surfaces import compute_surface
from advkit.models import get_model


def surface(args: argparse.Namespace, path: Path) -> float:
    """Compute the benchmark's surface into `path`; seconds it took."""
    torch.manual_seed(0)
    model = get_model(args.model, 10, 3)
    x, y, _ = load_images(args.n_images, args.data_dir)
    recalibrate_batchnorm(model, x)
    model.eval()
    directions = random_directions(model, 2, seed=0)
    settings = SurfaceSettings(resolution=args.resolution, batch_size=args.batch_size, precision="fp32")
    start = time.perf_counter()
    compute_surface(model, directions, x, y, settings, path=path)
    return time.perf_counter() - start


def _rank(rank: int, world: int, rendezvous: str, args: argparse.Namespace, path: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world,
                            timeout=timedelta(minutes=30))
    try:
        seconds = surface(args, Path(path))
        if rank == 0:
            Path(out).write_text(str(seconds))
    finally:
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--n-images", type=int, default=256)
    parser.add_argument("--resolution", type=int, default=7, help="points per axis of the 2D grid")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--data-dir", default=None, help="CIFAR-10 folder (default: random CIFAR-shaped images)")
    parser.add_argument("--no-results", action="store_true", help="print only, do not append to RESULTS.md")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        files = {}
        for threads in (1, 2):
            torch.set_num_threads(threads)
            files[threads] = tmp / f"one_{threads}.nc"
            start = time.perf_counter()
            seconds = surface(args, files[threads])
            rows.append((f"1 process, {threads} thread(s)", seconds, time.perf_counter() - start))
        torch.set_num_threads(1)
        files["2p"], out = tmp / "two.nc", tmp / "seconds.txt"
        start = time.perf_counter()
        mp.spawn(_rank, args=(2, str(tmp / "rendezvous"), args, str(files["2p"]), str(out)), nprocs=2, join=True)
        rows.append(("2 processes (gloo), 1 thread each", float(out.read_text()), time.perf_counter() - start))
        one, two = load_surface(files[1]), load_surface(files["2p"])
        equal = all(np.array_equal(one[q].values, two[q].values) for q in ("loss", "accuracy"))
    points = args.resolution ** 2
    base = rows[0][1]
    lines = ["| processes | surface s | wall s | points/s | speed-up vs 1 process, 1 thread |", "|---|---|---|---|---|"]
    lines += [f"| {name} | {s:.1f} | {w:.1f} | {points / s:.2f} | {base / s:.2f}x |" for name, s, w in rows]
    table = "\n".join(lines) + f"\n\n2-process surface equals the 1-process, 1-thread one bit for bit: {equal}\n"
    header = (f"{args.model}, {args.resolution}x{args.resolution} clean-loss grid on {args.n_images} images "
              f"(fp32, batch {args.batch_size}); {device_name(torch.device('cpu'))}, {torch.get_num_threads()} "
              f"thread(s) in the parent, {torch.multiprocessing.cpu_count()} CPUs")
    print(header + "\n\n" + table)
    if not args.no_results:
        append_results("Surface across processes (torchrun/gloo vs one process)", header, table)
    if not equal:
        raise SystemExit("the 2-process surface differs from the 1-process one")


if __name__ == "__main__":
    main()
