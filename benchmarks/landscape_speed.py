"""Landscape speed: advkit.landscape vs a faithful re-implementation of the reference loop.

Grid points per second of a 2D clean-loss surface (filter-normalized directions, BatchNorm
ignored, eval-mode BatchNorm) of ResNet-32 on --n CIFAR-10 test images (random CIFAR-shaped
images unless --data-dir holds CIFAR-10), in one run on one device:

- reference: tomgoldstein/loss-landscape's per-point loop (plot_surface.crunch +
  net_plotter.set_weights + evaluation.eval_loss): for every grid point the directions (kept
  as numpy arrays, as read from its .h5 file) are combined on the CPU, copied into the
  module's parameters (p.data = w + change), and a full fp32 DataLoader pass over a
  TensorDataset at batch 128 computes loss.item() * batch per batch. Kept favourable to it:
  data already decoded in memory, num_workers=0 (no worker start-up), cudnn.benchmark on for
  both. Timed on the first --reference-points points of the grid and projected to the grid.
- ours: advkit.landscape.surfaces.grid: device-resident data, large batches, functional_call on views
  of one flat weight buffer, BatchNorm folded into the convolutions, bf16 autocast when it
  changes the loss < 1e-3 relative (precision "auto"; on CUDA only), channels_last on CUDA,
  optionally several points per forward with vmap (--points-per-forward, several values are
  timed side by side).

Both compute the same numbers: the table reports the largest relative loss difference at the
points both evaluated. With random weights (no --checkpoint), BatchNorm statistics are first
set on the images (update_bn) so that the losses are those of a normalized network. Warm-up (CUDA
context, cuDNN autotuning) is excluded for both.

    python benchmarks/landscape_speed.py                     # GPU: 51 x 51 on 10,000 images
    python benchmarks/landscape_speed.py --n 128 --resolution 3 --reference-points 3   # CPU smoke

Prints a markdown table and appends it to benchmarks/RESULTS.md (date, device, commit).
"""

from __future__ import annotations

import argparse
import copy

import numpy as np
import torch
from common import (
    add_output_args,
    device_name,
    load_images,
    publish,
    recalibrate_batchnorm,
    timed,  # first: puts the repository root on sys.path
)
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from advkit._torch import PRECISIONS
from advkit.landscape.directions import random_directions
from advkit.landscape.settings import coordinates
from advkit.landscape.surfaces import grid, line
from advkit.models import get_model
from advkit.runs.run import resolve_device

# --- the reference tool's loop, re-implemented faithfully -----------------------------------------


def reference_points(model: nn.Module, directions, x: torch.Tensor, y: torch.Tensor, coords: np.ndarray,
                     device: torch.device, batch_size: int = 128, workers: int = 0) -> np.ndarray:
    """Loss at each (alpha, beta) as loss-landscape computes it (set_weights + eval_loss)."""
    net = copy.deepcopy(model).to(device)
    names = [n for n, _ in net.named_parameters()]
    w = [p.data for p in net.parameters()]  # net_plotter.get_weights
    dx = [directions.vectors[0][n].cpu().numpy() for n in names]  # h5_util.read_list -> numpy
    dy = [directions.vectors[1][n].cpu().numpy() for n in names]
    loader = DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False, num_workers=workers)
    criterion = nn.CrossEntropyLoss()
    losses = []
    for coord in coords:
        # net_plotter.set_weights(net, w, d, coord)
        changes = [d0 * coord[0] + d1 * coord[1] for (d0, d1) in zip(dx, dy)]
        for (p, w0, d) in zip(net.parameters(), w, changes):
            p.data = w0 + torch.Tensor(d).type(type(w0)).to(w0.device)
        # evaluation.eval_loss(net, criterion, loader, use_cuda)
        correct, total_loss, total = 0, 0.0, 0
        net.eval()
        with torch.no_grad():
            for inputs, targets in loader:
                bs = inputs.size(0)
                total += bs
                inputs, targets = inputs.to(device), targets.to(device)
                outputs = net(inputs)
                loss = criterion(outputs, targets)
                total_loss += loss.item() * bs
                _, predicted = outputs.max(1)
                correct += predicted.eq(targets).sum()
        losses.append(total_loss / total)
    return np.asarray(losses)


# --- measurement ------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> tuple[str, str]:
    """(header, table) of the RESULTS.md entry."""
    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    n = args.n or (10_000 if cuda else 128)
    res = args.resolution or (51 if cuda else 3)
    ref_points = args.reference_points or (20 if cuda else 3)
    torch.backends.cudnn.benchmark = True
    torch.manual_seed(args.seed)
    model = get_model("resnet32", 10, 3)
    if args.checkpoint:
        from advkit.runs.checkpoints import load_model
        model = load_model(args.checkpoint)
    x, y, source = load_images(n, args.data_dir, args.seed)
    if not args.checkpoint:  # random weights: give BatchNorm the statistics of the data, so losses are sane
        recalibrate_batchnorm(model, x[:2048], batch_size=256)
    model = model.to(device).eval()
    dirs = random_directions(model, 2, seed=args.seed)
    grid_coords = np.stack(np.meshgrid(coordinates(1.0, res), coordinates(1.0, res), indexing="ij"),
                           -1).reshape(-1, 2)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"resnet32: {n_params} parameters, {n} {source} images, {res} x {res} grid, device {device_name(device)}",
          flush=True)

    rows = []
    # reference: warm up on one point, then time the first ref_points points
    reference_points(model, dirs, x[:256], y[:256], grid_coords[:1], device)
    ref_loss, t_ref = timed(lambda: reference_points(model, dirs, x, y, grid_coords[:ref_points], device,
                                                     workers=args.reference_workers), device)
    ref_rate = ref_points / t_ref
    rows.append({"method": "reference loop (loss-landscape)", "precision": "fp32", "points/forward": 1,
                 "batch": 128, "timed points": ref_points, "seconds": t_ref, "rate": ref_rate,
                 "max |Δloss|": 0.0})

    for ppf in args.points_per_forward:
        for precision in args.precision:
            kw = dict(batch_size=args.batch_size, points_per_forward=ppf, precision=precision)
            line(model, random_directions(model, 1, seed=0), x[:256], y[:256], resolution=2, **kw)  # warm-up
            ds, t = timed(lambda: grid(model, dirs, x, y, resolution=res, **kw), device)
            ours = ds.loss.values.reshape(-1)[:ref_points]
            rows.append({"method": "advkit.landscape.surfaces.grid", "precision": ds.attrs["precision"],
                         "points/forward": ppf, "batch": ds.attrs["batch_size"], "timed points": res * res,
                         "seconds": t, "rate": res * res / t,
                         "max |Δloss|": float(np.max(np.abs(ours - ref_loss) / np.abs(ref_loss)))})

    lines = ["| method | precision | points/forward | batch | timed points | seconds | points/s | "
             f"{res}x{res} grid (s) | speed-up | max rel. loss diff vs reference |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        projected = res * res / r["rate"]
        lines.append(f"| {r['method']} | {r['precision']} | {r['points/forward']} | {r['batch']} | "
                     f"{r['timed points']} | {r['seconds']:.2f} | {r['rate']:.3f} | "
                     f"{projected:.1f}{' (projected)' if r['timed points'] < res * res else ''} | "
                     f"{r['rate'] / ref_rate:.1f}x | {r['max |Δloss|']:.2e} |")
    header = (f"device: {device_name(device)}; torch {torch.__version__}; "
              f"resnet32 ({n_params} params), {n} {source} images, {res} x {res} grid of clean loss, "
              f"filter-normalized directions, eval-mode BatchNorm; reference timed on {ref_points} points "
              f"(DataLoader workers: {args.reference_workers})")
    return header, "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda")
    ap.add_argument("--n", type=int, default=None, help="test images (default 10000 on CUDA, 128 on CPU)")
    ap.add_argument("--resolution", type=int, default=None, help="grid points per axis (default 51 CUDA, 3 CPU)")
    ap.add_argument("--reference-points", type=int, default=None,
                    help="points the reference loop is timed on (default 20 CUDA, 3 CPU)")
    ap.add_argument("--reference-workers", type=int, default=0, help="DataLoader workers of the reference")
    ap.add_argument("--batch-size", type=int, default=None, help="ours (default 10000 CUDA, 1024 CPU)")
    ap.add_argument("--points-per-forward", type=int, nargs="+", default=[1], help="ours; several values allowed")
    ap.add_argument("--precision", nargs="+", default=["auto"], choices=PRECISIONS, help="ours")
    ap.add_argument("--checkpoint", default=None, help="an advkit resnet32 checkpoint (else random init)")
    add_output_args(ap, data=True)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    header, md = run(args)
    publish("Landscape speed", header, md, args)


if __name__ == "__main__":
    main()
