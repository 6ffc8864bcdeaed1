"""Robust surface speed: the attack re-run at every point, point by point vs batched across points.

A robust line (Stutz et al. Fig. 4: PGD re-run at every point, then the loss on its adversarial
examples) of ResNet-32 on --n CIFAR-10 test images (random CIFAR-shaped images unless --data-dir
holds CIFAR-10), filter-normalized direction, the attack as notebook 04 builds it
(`pgd(eps, steps, seed)`, random start), timed with points_per_forward=1 (the per-point loop)
and each --points-per-forward value (P points per attack call, `advkit.landscape.robust`), side
by side in one run. Reports points/s, the speed-up over the loop, the projected time of the paper
profile's 21 x 21 robust grid, and the largest relative robust-loss difference from the loop
(float rounding only: the random starts are the same).

    python benchmarks/robust_surface_speed.py                          # GPU: 21 points, 1,000 images, PGD-20
    python benchmarks/robust_surface_speed.py --n 16 --points 4 --steps 2 --points-per-forward 4   # CPU smoke

Prints a markdown table and appends it to benchmarks/RESULTS.md (date, device, commit).
"""

from __future__ import annotations

import argparse
import functools

import numpy as np
import torch
from common import (
    add_output_args,
    load_images,
    publish,
    recalibrate_batchnorm,
    run_header,
    timed,  # first: puts the repository root on sys.path
)

from advkit._torch import PRECISIONS
from advkit.attacks.pgd import pgd
from advkit.landscape.directions import random_directions
from advkit.landscape.surfaces import line
from advkit.models import get_model
from advkit.runs.run import resolve_device

PAPER_ROBUST_GRID = 21 * 21  # robust_resolution 21 in advkit/pipeline/profiles/paper.yaml


def run(args: argparse.Namespace) -> tuple[str, str]:
    """(header, table) of the RESULTS.md entry."""
    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    n, points, steps = args.n or (1000 if cuda else 16), args.points or (21 if cuda else 4), args.steps
    torch.backends.cudnn.benchmark = True
    torch.manual_seed(args.seed)
    model = get_model("resnet32", 10, 3)
    x, y, source = load_images(n, args.data_dir, args.seed)
    recalibrate_batchnorm(model, x[:2048], batch_size=256)  # random weights: sane BatchNorm statistics
    model = model.to(device).eval()
    direction = random_directions(model, 1, seed=args.seed)
    attack = functools.partial(pgd, eps=args.eps, steps=steps, seed=args.seed)
    robust = dict(resolution=points, span=1.0, attack=attack, quantities=("robust_loss", "robust_accuracy"),
                  precision=args.precision, attack_batch_size=args.attack_batch_size)

    lines = ["| points per attack call | precision | seconds | points/s | speed-up | 21 x 21 robust grid (s, "
             "projected) | max rel. robust-loss diff vs loop | max robust-accuracy diff vs loop |",
             "|---|---|---|---|---|---|---|---|"]
    loop = None  # (seconds, robust loss, robust accuracy) of the per-point loop
    for ppf in [1] + [p for p in args.points_per_forward if p != 1]:
        line(model, direction, x[:64], y[:64], points_per_forward=ppf, **{**robust, "resolution": 2})  # warm-up
        ds, t = timed(lambda: line(model, direction, x, y, points_per_forward=ppf, **robust), device)
        loss, acc = ds.robust_loss.values, ds.robust_accuracy.values
        loop = loop or (t, loss, acc)
        lines.append(f"| {ppf} | {ds.attrs['precision']} | {t:.2f} | {points / t:.2f} | {loop[0] / t:.1f}x | "
                     f"{PAPER_ROBUST_GRID * t / points:.0f} | {np.max(np.abs(loss - loop[1]) / np.abs(loop[1])):.2e} | "
                     f"{np.max(np.abs(acc - loop[2])):.4f} |")
    header = (f"{run_header(device)}; resnet32, {n} {source} images, robust line of {points} points "
              f"(PGD-{steps}, eps {args.eps:.4g}, random start, re-run at every point), attack batch "
              f"{args.attack_batch_size or 'all images'}")
    return header, "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda")
    ap.add_argument("--n", type=int, default=None, help="test images (default 1000 on CUDA, 16 on CPU)")
    ap.add_argument("--points", type=int, default=None, help="points of the line (default 21 CUDA, 4 CPU)")
    ap.add_argument("--steps", type=int, default=20, help="PGD steps (paper profile: 20)")
    ap.add_argument("--eps", type=float, default=8 / 255)
    ap.add_argument("--points-per-forward", type=int, nargs="+", default=[7, 21],
                    help="points per attack call, timed beside the per-point loop (1)")
    ap.add_argument("--attack-batch-size", type=int, default=None, help="examples per attack call and point")
    ap.add_argument("--precision", default="auto", choices=PRECISIONS, help="the surface's evaluation")
    add_output_args(ap, data=True)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    header, md = run(args)
    publish("Robust surface speed", header, md, args)


if __name__ == "__main__":
    main()
