"""Hessian speed: advkit.curvature.estimators vs PyHessian on the same model, data and device.

Top eigenvalue by power iteration (--iters, default 20, no early stop) and Hutchinson trace
(--samples Rademacher probes, default 100) of the mean cross-entropy of ResNet-32 on --n
CIFAR-10 test images (random CIFAR-shaped images unless --data-dir holds CIFAR-10; a randomly
initialised model gets its BatchNorm statistics from the images), eval mode, all parameters
including BatchNorm's (what PyHessian differentiates). Ours runs with both HessianOperator
backends: "forward" (torch.func jvp of grad, recomputed per product, memory of one chunk) and
"reverse" (gradient graph cached once, one backward per product), the trace with each
--block-sizes value (probes per batched product; "auto": 1 on CPU, what fits in memory on CUDA,
the chosen value shown as auto=k). "batched" says whether a block runs through every op batched
(else the op that loops over the probes).

Both sides run in float32 without autocast: Hessian-vector products are small differences
of gradients and bf16 (8-bit mantissa) would swamp them; cuDNN's default TF32 setting is
left as it is for both. Each timing includes the method's setup (PyHessian's and our
reverse backend's create_graph gradient), after a warm-up of every method (on CUDA the trace's
warm-up is a full run, so every block shape is tuned); CUDA is synchronized around it; --repeat
interleaves repetitions and keeps the fastest (use it on a shared CPU). "within SE": the trace
differs from PyHessian's by at most twice their combined standard error, the eigenvalue by at
most 1 % (relative).

    python benchmarks/hessian_speed.py                        # GPU: ResNet-32, 1000 images
    python benchmarks/hessian_speed.py --arch resnet20 --n 32 --iters 5 --samples 8   # CPU, < 3 min

Prints a markdown table and appends it to benchmarks/RESULTS.md (date, device, commit).
`measure_hessian(model, x, y, device, ...)` returns the rows (dicts) for other scripts.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from common import (  # first: repository root on sys.path
    RESULTS,
    append_results,
    device_name,
    load_images,
    recalibrate_batchnorm,
    timed,
)
from torch import nn

from advkit._checks import HESSIAN_BACKENDS
from advkit.curvature.blocks import vmap_fallback
from advkit.curvature.estimators import hessian_eigenvalues, hessian_trace
from advkit.curvature.operator import HessianOperator
from advkit.models import get_model
from advkit.runs.run import resolve_device

EIG_RTOL = 0.01          # "within" for the top eigenvalue: relative difference to PyHessian's


def our_methods(model, x, y, *, backends, block_sizes, batch_size, seed):
    """{(method, block label): (eig fn or None, trace fn)}; fns(count) -> (estimate, n_hvp, std error, block)."""
    out = {}
    for backend in backends:
        def make(backend=backend):
            return HessianOperator(model, x, y, include_bn=True, batch_size=batch_size, backend=backend)

        def eig(iters, make=make):
            r = hessian_eigenvalues(make(), method="power", iters=iters, tol=0.0, seed=seed)
            return r.value, r.n_hvp, math.nan, None

        for i, block in enumerate(block_sizes):
            def trace(samples, make=make, block=block):
                r = hessian_trace(make(), n_samples=samples, block_size=block, seed=seed)
                return r.value, r.n_hvp, r.std_error, r.block_size

            out[(f"ours ({backend})", block)] = (eig if i == 0 else None, trace)
    return out


def pyhessian_methods(model, x, y, args, device):
    """{"PyHessian": (eig fn, trace fn)}; fns(count) -> (estimate, n_hvp, std error); args.seed seeds them."""
    from pyhessian import hessian as PyHessian  # PyPI `pyhessian` (0.1; deps numpy, torch only)

    criterion = nn.CrossEntropyLoss()
    cuda = device.type == "cuda"

    def make():
        model.zero_grad(set_to_none=True)
        return PyHessian(model, criterion, data=(x, y), cuda=cuda)

    def eig(iters):
        torch.manual_seed(args.seed)
        values, _ = make().eigenvalues(maxIter=iters, tol=0.0, top_n=1)
        model.zero_grad(set_to_none=True)
        return values[0], iters, math.nan

    def trace(samples):
        torch.manual_seed(args.seed)
        # tol=-inf: PyHessian otherwise stops once the running mean changes by < tol
        vals = make().trace(maxIter=samples, tol=-math.inf)
        model.zero_grad(set_to_none=True)
        se = float(torch.tensor(vals).std() / math.sqrt(len(vals))) if len(vals) > 1 else math.nan
        return sum(vals) / len(vals), len(vals), se

    return {"PyHessian": (eig, trace)}


def _time_all(methods, iters, samples, repeat, device):
    """Warm up every method, then time each task `repeat` times, interleaved; keep the fastest run."""
    warm_samples = samples if device.type == "cuda" else min(samples, 2)
    for eig, trace in methods.values():
        if eig is not None:
            eig(1)
        trace(warm_samples)
    results = {}
    for _ in range(repeat):
        for key, (eig, trace) in methods.items():
            for task, fn, count in (("eig", eig, iters), ("trace", trace, samples)):
                if fn is None:
                    continue
                out, seconds = timed(lambda: fn(count), device)
                best = results.get((key, task))
                if best is None or seconds < best[1]:
                    results[(key, task)] = (out, seconds)
    return results


def _within(task: str, ours: tuple, ref: tuple) -> bool:
    """Trace: |ours - ref| <= 2 sqrt(se^2 + se_ref^2); eigenvalue: relative difference <= EIG_RTOL."""
    diff = abs(ours[0] - ref[0])
    if task == "trace":
        return diff <= 2 * math.hypot(ours[2], ref[2])
    return diff <= EIG_RTOL * abs(ref[0])


def measure_hessian(model: nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device, *,
                    iters: int = 20, samples: int = 100, block_sizes: Sequence[int | str] = (1, "auto"),
                    backends: Sequence[str] = ("reverse", "forward"), batch_size: int = 1000, seed: int = 0,
                    repeat: int = 1, pyhessian: bool = True) -> list[dict[str, Any]]:
    """Time the top eigenvalue (power, `iters` HVPs) and the Hutchinson trace (`samples` probes) of ours,
    per backend and trace block size, and PyHessian's when installed (else a line on stderr, ours only).

    `model` in eval mode on `device`, all parameters (BatchNorm's too). One dict per row: quantity,
    method, block ("-" / k / "auto=k"), hvps, seconds, speedup (PyHessian's seconds / ours), estimate,
    std_error, rel_diff and within_se (to PyHessian; NaN / None without it), batched (the trace's
    vmap check: "yes", or the op that loops over the probes; "-" for one probe per product)."""
    x, y = x.to(device), y.to(device)
    methods = {}
    if pyhessian:
        try:
            eig, trace = pyhessian_methods(model, x, y, argparse.Namespace(seed=seed), device)["PyHessian"]
            methods[("PyHessian", None)] = (lambda n: (*eig(n), None), lambda n: (*trace(n), None))
        except ImportError:
            print("pyhessian is not installed (pip install pyhessian); ours only", file=sys.stderr)
    methods.update(our_methods(model, x, y, backends=backends, block_sizes=block_sizes,
                               batch_size=batch_size, seed=seed))
    results = _time_all(methods, iters, samples, repeat, device)
    batched = {}    # backend -> vmap_fallback's answer, checked once where a row has blocks

    def check(backend: str) -> str | None:
        if backend not in batched:
            op = HessianOperator(model, x, y, include_bn=True, batch_size=batch_size, backend=backend)
            batched[backend] = vmap_fallback(op)
        return batched[backend]

    rows = []
    for task, quantity in (("eig", "top eigenvalue (power)"), ("trace", "trace (Hutchinson)")):
        ref = results.get((("PyHessian", None), task))
        for (name, block), _ in methods.items():
            if ((name, block), task) not in results:
                continue
            out, seconds = results[((name, block), task)]
            value, n_hvp, se, used = out
            label = "-" if used is None else (f"auto={used}" if block == "auto" else str(used))
            row = {"quantity": quantity, "method": name, "block": label, "hvps": n_hvp, "seconds": seconds,
                   "estimate": value, "std_error": se, "speedup": math.nan, "rel_diff": math.nan,
                   "within_se": None, "batched": "-"}
            if used is not None and used > 1:
                fallback = check(name.split("(")[1].rstrip(")"))
                row["batched"] = "yes" if fallback is None else f"no: {fallback}"
            if ref is not None and name != "PyHessian":
                row.update(speedup=ref[1] / seconds, rel_diff=abs(value - ref[0][0]) / max(abs(ref[0][0]), 1e-12),
                           within_se=_within(task, out, ref[0]))
            rows.append(row)
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| quantity | method | block | HVPs | time (s) | speed-up vs PyHessian | estimate ± SE "
             "| rel. diff to PyHessian | within PyHessian's SE | batched |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        est = f"{r['estimate']:.4g}" + (f" ± {r['std_error']:.2g}" if math.isfinite(r["std_error"]) else "")
        speed = f"{r['speedup']:.2f}x" if math.isfinite(r["speedup"]) else "-"
        diff = f"{100 * r['rel_diff']:.2f}%" if math.isfinite(r["rel_diff"]) else "-"
        within = "-" if r["within_se"] is None else ("yes" if r["within_se"] else "NO")
        lines.append(f"| {r['quantity']} | {r['method']} | {r['block']} | {r['hvps']} | {r['seconds']:.2f} | "
                     f"{speed} | {est} | {diff} | {within} | {r['batched']} |")
    return "\n".join(lines)


def _block(value: str) -> int | str:
    if value == "auto":
        return value
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"a block size is 'auto' or an integer >= 1, got {value!r}")
    return int(value)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="resnet32")
    ap.add_argument("--n", type=int, default=1000, help="number of images")
    ap.add_argument("--iters", type=int, default=20, help="power iterations")
    ap.add_argument("--samples", type=int, default=100, help="Hutchinson probes")
    ap.add_argument("--batch-size", type=int, default=1000, help="images per HVP chunk (ours)")
    ap.add_argument("--block-sizes", type=_block, nargs="+", default=[1, "auto"],
                    help="Hutchinson probes per batched product (ours), one row each; 'auto' allowed")
    ap.add_argument("--backends", nargs="+", choices=HESSIAN_BACKENDS, default=["reverse", "forward"])
    ap.add_argument("--data-dir", default=None, help="folder with CIFAR-10 (advkit.data format); else random")
    ap.add_argument("--checkpoint", default=None, help="advkit checkpoint (advkit.runs.checkpoints.save_model) to load")
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
    torch.backends.cudnn.benchmark = True
    torch.manual_seed(args.seed)
    x, y, source = load_images(args.n, args.data_dir, args.seed)
    source = f"{source} images"
    if args.checkpoint:
        from advkit.runs.checkpoints import load_model
        model = load_model(args.checkpoint, device=device)
    else:
        model = get_model(args.arch, 10, 3).to(device)
        recalibrate_batchnorm(model, x.to(device))
        source += " (BatchNorm statistics from them)"
    model = model.to(device).eval()
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{args.arch}: {n_params} parameters, {args.n} {source}, device {device_name(device)}",
          flush=True)
    rows = measure_hessian(model, x, y, device, iters=args.iters, samples=args.samples,
                           block_sizes=args.block_sizes, backends=args.backends, batch_size=args.batch_size,
                           seed=args.seed, repeat=args.repeat, pyhessian=not args.no_pyhessian)
    header = (f"device: {device_name(device)}; torch {torch.__version__}; "
              f"{args.arch} ({n_params} params, BatchNorm included), {args.n} {source}, eval mode, fp32 "
              f"(TF32 convolutions: {torch.backends.cudnn.allow_tf32}); power iterations {args.iters}, "
              f"Hutchinson probes {args.samples}, ours: batch {args.batch_size}"
              f"{', channels_last' if args.channels_last else ''}; within SE: trace within 2 combined standard "
              f"errors, eigenvalue within {EIG_RTOL:.0%}; fastest of {args.repeat} interleaved run(s), each "
              f"including its setup")
    print(append_results("Hessian speed", header, table(rows), Path(args.results)))


if __name__ == "__main__":
    main()
