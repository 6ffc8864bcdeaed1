"""Attack speed: advkit.attacks.pgd vs torchattacks.PGD, side by side in one run on one device.

PGD-10 (L-inf, eps 8/255, step 2/255, uniform random start) on ResNet-32
(advkit.models.get_model("resnet32", 10, 3)) over --n CIFAR-10 test images (or random
CIFAR-shaped images when --data-dir / $ADVKIT_DATA_DIR holds no CIFAR-10 copy; the output
says which). Without --checkpoint the ResNet-32 has random weights, so its robust accuracy only
shows that both attacks agree (its BatchNorm statistics are estimated on the images, else it
predicts one class everywhere); pass a trained checkpoint (advkit.runs.save_model) for real figures.

Rows: torchattacks.PGD (fp32); advkit pgd fp32; advkit pgd with bf16 autocast (CUDA, or CPU with
--bf16), and with --compile a torch.compile'd model. Every method sees the same model (on CUDA
converted to channels_last once, which helps both) and the same batches, taking turns batch by
batch; on CUDA one warm-up batch per method is excluded. Throughput = images / (wall time of all batches, device synchronised).

    python benchmarks/attack_speed.py                       # GPU: 10,000 images, batch 512
    python benchmarks/attack_speed.py --n 64 --batch-size 32 --bf16   # CPU smoke run (< 2 min)

Prints a markdown table and appends it to benchmarks/RESULTS.md (date, device, commit).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from common import (RESULTS, append_results, device_name, load_images, recalibrate_batchnorm, results_entry, sync,
                    timed)  # first: puts the repository root on sys.path

from advkit.attacks import pgd
from advkit.models import get_model
from advkit.runs import resolve_device


def methods(args, model, device):
    eps, alpha, steps = args.eps, args.alpha, args.steps
    out = {}
    try:
        import torchattacks

        def torchattacks_pgd(x, y, seed):
            torch.manual_seed(seed)
            return torchattacks.PGD(model, eps=eps, alpha=alpha, steps=steps, random_start=True)(x, y)
        out["torchattacks.PGD fp32"] = torchattacks_pgd
    except ImportError:
        print("torchattacks is not installed: only advkit rows", file=sys.stderr)
    out["advkit pgd fp32"] = lambda x, y, seed: pgd(model, x, y, eps, alpha, steps, seed=seed, precision="fp32")
    if device.type == "cuda" or args.bf16:
        out["advkit pgd bf16 autocast"] = lambda x, y, seed: pgd(model, x, y, eps, alpha, steps, seed=seed,
                                                                 precision="bf16")
    if args.compile:
        out["advkit pgd bf16 + compile"] = lambda x, y, seed: pgd(model, x, y, eps, alpha, steps, seed=seed,
                                                                  precision="auto", compile=True)
    return out


def measure(fns: dict, model, x, y, batch_size, device) -> dict[str, tuple[float, float]]:
    """{name: (images per second, robust accuracy)}. Methods take turns batch by batch (the order
    rotating), so a change in machine load hits them all alike; on CUDA each first runs one
    untimed batch (CUDA context, cuDNN autotuning)."""
    batches = [(x[i:i + batch_size].to(device), y[i:i + batch_size].to(device)) for i in range(0, len(y), batch_size)]
    if device.type == "cuda":
        for fn in fns.values():
            fn(*batches[0], 0)
        sync(device)
    names = list(fns)
    seconds = dict.fromkeys(names, 0.0)
    correct = {name: torch.zeros((), dtype=torch.int64, device=device) for name in names}
    for i, (xb, yb) in enumerate(batches):
        for name in names[i % len(names):] + names[:i % len(names)]:
            x_adv, t = timed(lambda: fns[name](xb, yb, i), device)
            seconds[name] += t
            with torch.no_grad():
                correct[name] += (model(x_adv).argmax(1) == yb).sum()
    return {name: (len(y) / seconds[name], correct[name].item() / len(y)) for name in names}


def run(args) -> tuple[str, str, str]:
    """(title, header, table) of the RESULTS.md entry."""
    device = resolve_device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    x, y, source = load_images(args.n, args.data_dir, args.seed)
    torch.manual_seed(args.seed)
    model = get_model("resnet32", 10, 3)
    if args.checkpoint:
        from advkit.runs import load_model
        model = load_model(args.checkpoint)
    else:  # random weights: estimate BatchNorm statistics on the images, so predictions depend on them
        recalibrate_batchnorm(model, x[:512], batch_size=512)
    model = model.to(device).eval()
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    with torch.no_grad():
        clean = sum((model(x[i:i + 512].to(device)).argmax(1).cpu() == y[i:i + 512]).sum().item()
                    for i in range(0, len(y), 512)) / len(y)
    results = measure(methods(args, model, device), model, x, y, args.batch_size, device)
    rows = [(name, ips, acc) for name, (ips, acc) in results.items()]
    base = next((ips for name, ips, _ in rows if name.startswith("torchattacks")), None)
    load = f", load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores" if device.type == "cpu" else ""
    weights = f"checkpoint {args.checkpoint}" if args.checkpoint else "random weights"
    title = f"attack_speed: PGD-{args.steps} eps {args.eps * 255:.0f}/255 step {args.alpha * 255:.0f}/255, ResNet-32"
    header = (f"device: {device_name(device)}{load}; torch {torch.__version__}; "
              f"data: {source}, n={len(y)}, batch {args.batch_size}; model: {weights}, clean accuracy {clean:.4f}")
    lines = [
        "| method | images/s | speed-up vs torchattacks | robust accuracy |",
        "|---|---:|---:|---:|",
    ]
    for name, ips, acc in rows:
        speedup = f"{ips / base:.2f}x" if base else "n/a"
        lines.append(f"| {name} | {ips:.1f} | {speedup} | {acc:.4f} |")
    if device.type == "cpu" and os.getloadavg()[0] > (os.cpu_count() or 1):
        lines += ["", "Caution: the load average exceeds the core count, so other processes dominate these "
                  "timings; compare speeds only from an idle machine or a GPU run."]
    return title, header, "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=10_000, help="number of images (default 10,000)")
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--eps", type=float, default=8 / 255)
    ap.add_argument("--alpha", type=float, default=2 / 255)
    ap.add_argument("--device", default="auto", help="auto (cuda when present), cpu, cuda")
    ap.add_argument("--data-dir", default=os.environ.get("ADVKIT_DATA_DIR"),
                    help="folder with CIFAR-10 for advkit.data.get_dataset (default $ADVKIT_DATA_DIR)")
    ap.add_argument("--checkpoint", default=None, help="trained ResNet-32 saved by advkit.runs.save_model")
    ap.add_argument("--bf16", action="store_true", help="also time bf16 autocast on CPU (always on CUDA)")
    ap.add_argument("--compile", action="store_true", help="also time a torch.compile'd model")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--results", default=str(RESULTS), help="markdown file to append to ('' : print only)")
    args = ap.parse_args(argv)
    if args.n < 1 or args.batch_size < 1 or args.steps < 1:
        ap.error("--n, --batch-size and --steps must be >= 1")
    title, header, table = run(args)
    print(append_results(title, header, table, Path(args.results)) if args.results
          else results_entry(title, header, table))


if __name__ == "__main__":
    main()
