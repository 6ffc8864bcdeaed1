"""Hessian speed: advkit.hessian vs PyHessian on the same model, data and device.

Top eigenvalue by power iteration (--iters, default 20, no early stop) and Hutchinson trace
(--samples Rademacher probes, default 100) of the mean cross-entropy of ResNet-32 on --n
CIFAR-10 test images (random CIFAR-shaped images unless --data-dir holds CIFAR-10), eval
mode, all parameters including BatchNorm's (what PyHessian differentiates). Ours runs with
both HessianOperator backends: "forward" (torch.func jvp of grad, recomputed per product,
memory of one chunk) and "reverse" (gradient graph cached once, one backward per product,
blocks of probes in one batched call).

Both sides run in float32 without autocast: Hessian-vector products are small differences
of gradients and bf16 (8-bit mantissa) would swamp them; cuDNN's default TF32 setting is
left as it is for both. Each timing includes the method's setup (PyHessian's and our
reverse backend's create_graph gradient), after a warm-up of every method; CUDA is
synchronized around it; --repeat interleaves repetitions and keeps the fastest (use it on
a shared CPU). GPU knobs of ours: --block-size (probes per batched call), --batch-size
(images per chunk of the forward backend), --channels-last (applied to both sides).

    python benchmarks/hessian_speed.py                        # GPU: ResNet-32, 1000 images
    python benchmarks/hessian_speed.py --arch resnet20 --n 32 --iters 5 --samples 8   # CPU, < 3 min

Prints a markdown table and appends it to benchmarks/RESULTS.md (date, device, commit).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
from torch import nn

from common import RESULTS, append_results, device_name, load_images, timed  # first: repository root on sys.path

from advkit.hessian import HessianOperator, hessian_eigenvalues, hessian_trace
from advkit.models import get_model
from advkit.runs import resolve_device


def our_methods(model, x, y, args):
    """(eigenvalue fn, trace fn) per backend; each fn(iters) -> (estimate, n_hvp, std error)."""
    out = {}
    for backend in ("forward", "reverse"):
        def make(backend=backend):
            return HessianOperator(model, x, y, include_bn=True, batch_size=args.batch_size, backend=backend)

        def eig(iters, make=make):
            r = hessian_eigenvalues(make(), method="power", iters=iters, tol=0.0, seed=args.seed)
            return r.value, r.n_hvp, float("nan")

        def trace(samples, make=make):
            r = hessian_trace(make(), n_samples=samples, block_size=min(args.block_size, samples), seed=args.seed)
            return r.value, r.n_hvp, r.std_error

        out[f"ours ({backend})"] = (eig, trace)
    return out


def pyhessian_methods(model, x, y, args, device):
    from pyhessian import hessian as PyHessian   # PyPI `pyhessian` (0.1; deps numpy, torch only)

    criterion = nn.CrossEntropyLoss()
    cuda = device.type == "cuda"

    def make():
        model.zero_grad(set_to_none=True)
        return PyHessian(model, criterion, data=(x, y), cuda=cuda)

    def eig(iters):
        torch.manual_seed(args.seed)
        values, _ = make().eigenvalues(maxIter=iters, tol=0.0, top_n=1)
        model.zero_grad(set_to_none=True)
        return values[0], iters, float("nan")

    def trace(samples):
        torch.manual_seed(args.seed)
        # tol=-inf: PyHessian otherwise stops once the running mean changes by < tol
        vals = make().trace(maxIter=samples, tol=-math.inf)
        model.zero_grad(set_to_none=True)
        se = float(torch.tensor(vals).std() / math.sqrt(len(vals))) if len(vals) > 1 else float("nan")
        return sum(vals) / len(vals), len(vals), se

    return {"PyHessian": (eig, trace)}


def measure(methods, args, device):
    """Warm up every method, then time each task `repeat` times, interleaved; keep the fastest run."""
    for eig, trace in methods.values():
        eig(1)
        trace(2)
    results = {}
    for _ in range(args.repeat):
        for name, (eig, trace) in methods.items():
            for task, fn, count in (("eig", eig, args.iters), ("trace", trace, args.samples)):
                (value, n_hvp, se), seconds = timed(lambda: fn(count), device)
                best = results.get((name, task))
                if best is None or seconds < best[1]:
                    results[(name, task)] = (value, seconds, n_hvp, se)
    return results


def table(results, names) -> str:
    ref = "PyHessian" if "PyHessian" in names else None
    lines = ["| quantity | method | HVPs | time (s) | speed-up vs PyHessian | estimate | rel. diff to PyHessian |",
             "|---|---|---|---|---|---|---|"]
    for task, label in (("eig", "top eigenvalue (power)"), ("trace", "trace (Hutchinson)")):
        base = results.get((ref, task)) if ref else None
        for name in names:
            value, seconds, n_hvp, se = results[(name, task)]
            est = f"{value:.4g}" + (f" ± {se:.2g}" if math.isfinite(se) else "")
            if base is None or name == ref:
                speed = diff = "-"
            else:
                speed = f"{base[1] / seconds:.2f}x"
                diff = f"{100 * abs(value - base[0]) / max(abs(base[0]), 1e-12):.1f}%"
            lines.append(f"| {label} | {name} | {n_hvp} | {seconds:.2f} | {speed} | {est} | {diff} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="resnet32")
    ap.add_argument("--n", type=int, default=1000, help="number of images")
    ap.add_argument("--iters", type=int, default=20, help="power iterations (and Lanczos steps)")
    ap.add_argument("--samples", type=int, default=100, help="Hutchinson probes")
    ap.add_argument("--batch-size", type=int, default=1000, help="images per HVP chunk (ours)")
    ap.add_argument("--block-size", type=int, default=None,
                    help="Hutchinson probes per vmap call (ours); default 10 on CUDA, 1 on CPU")
    ap.add_argument("--data-dir", default=None, help="folder with CIFAR-10 (advkit.data format); else random")
    ap.add_argument("--checkpoint", default=None, help="advkit checkpoint (advkit.runs.save_model) to load")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=1, help="interleaved repetitions; the fastest is kept")
    ap.add_argument("--no-pyhessian", action="store_true")
    ap.add_argument("--results", default=str(RESULTS))
    args = ap.parse_args(argv)
    for name in ("n", "iters", "samples", "batch_size", "repeat"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")

    device = resolve_device(args.device)
    if args.block_size is None:
        args.block_size = 10 if device.type == "cuda" else 1
    torch.backends.cudnn.benchmark = True
    torch.manual_seed(args.seed)
    if args.checkpoint:
        from advkit.runs import load_model
        model = load_model(args.checkpoint, device=device)
    else:
        model = get_model(args.arch, 10, 3)
    model = model.to(device).eval()
    x, y, source = load_images(args.n, args.data_dir, args.seed)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{args.arch}: {n_params} parameters, {args.n} {source} images, device {device_name(device)}",
          flush=True)

    xd, yd = x.to(device), y.to(device)
    methods = {}
    if not args.no_pyhessian:
        try:
            methods.update(pyhessian_methods(model, xd, yd, args, device))
        except ImportError:
            print("pyhessian is not installed (pip install pyhessian); ours only", file=sys.stderr)
    methods.update(our_methods(model, xd, yd, args))
    results = measure(methods, args, device)
    md = table(results, list(methods))
    header = (f"device: {device_name(device)}; torch {torch.__version__}; "
              f"{args.arch} ({n_params} params, BatchNorm included), {args.n} {source} images, eval mode, fp32; "
              f"power iterations {args.iters}, Hutchinson probes {args.samples}, ours: batch {args.batch_size}, "
              f"vmap block {args.block_size}{', channels_last' if args.channels_last else ''}; "
              f"fastest of {args.repeat} interleaved run(s), each including its setup")
    print(append_results("Hessian speed", header, md, Path(args.results)))


if __name__ == "__main__":
    main()
