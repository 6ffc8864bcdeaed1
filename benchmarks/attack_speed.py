"""Attack speed: advkit.attacks.pgd vs torchattacks.PGD, side by side in one run on one device.

PGD-10 (L-inf, eps 8/255, step 2/255, uniform random start) on ResNet-32
(advkit.models.get_model("resnet32", 10, 3)) over --n CIFAR-10 test images (or random
CIFAR-shaped images when --data-dir / $ADVKIT_DATA_DIR holds no CIFAR-10 copy; the output
says which). Without --checkpoint the ResNet-32 has random weights, so its robust accuracy only
shows that both attacks agree (its BatchNorm statistics are estimated on the images, else it
predicts one class everywhere); pass a trained checkpoint (advkit.runs.checkpoints.save_model) for real figures.

Rows (`VARIANTS`, each an `advkit.attacks.model.AttackRuntime`): torchattacks.PGD (fp32); advkit's PGD loop fp32,
fp32 + BatchNorm folded, bf16 autocast, bf16 + BatchNorm folded (`fold_bn=True`), bf16 + fold_bn +
torch.compile(mode="reduce-overhead") (CUDA graphs), all returning the last iterate (torchattacks'
semantics; tests/reference_attacks.py's `last_iterate_pgd`), and advkit's `pgd` with the default runtime
(each example's strongest iterate, precision auto, fold_bn on CUDA) for reference. bf16 rows run on CUDA, or on
CPU with --bf16; the compiled row on CUDA, or on CPU with --compile. Every method sees the same
model (on CUDA converted to channels_last once, which helps both) and the same batches, taking
turns batch by batch; on CUDA one warm-up batch per method is excluded (compilation, CUDA graph
capture, cuDNN autotuning). Throughput = images / (wall time of all batches, device
synchronised). Robust accuracy is the plain fp32 model's on each method's x_adv; "vs
torchattacks" is the difference in percentage points (goal: within 0.5).

    python benchmarks/attack_speed.py                       # GPU: 10,000 images, batch 512
    python benchmarks/attack_speed.py --n 64 --batch-size 32 --bf16   # CPU smoke run (< 2 min)

Prints a markdown table and appends it to benchmarks/RESULTS.md (date, device, commit).
`measure_pgd(...)` gives the rows as dicts (benchmarks/speed_table.py).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
from common import (
    RESULTS,
    append_results,
    device_name,
    load_images,
    recalibrate_batchnorm,
    results_entry,
    sync,
    timed,  # first: puts the repository root on sys.path
)

from advkit.attacks.model import attack_model
from advkit.attacks.pgd import pgd
from advkit.models import get_model
from advkit.runs.run import resolve_device
from tests.reference_attacks import last_iterate_pgd

TORCHATTACKS = "torchattacks.PGD fp32"
DEFAULT = "advkit pgd default (auto precision, fold_bn on CUDA, strongest iterate)"
VARIANTS: dict[str, dict] = {  # row name -> AttackRuntime options; all but DEFAULT return the last iterate
    "advkit pgd fp32, last iterate": dict(precision="fp32", fold_bn=False),
    "advkit pgd fp32 + fold_bn, last iterate": dict(precision="fp32", fold_bn=True),
    "advkit pgd bf16, last iterate": dict(precision="bf16", fold_bn=False),
    "advkit pgd bf16 + fold_bn, last iterate": dict(precision="bf16", fold_bn=True),
    "advkit pgd bf16 + fold_bn + compile reduce-overhead, last iterate":
        dict(precision="bf16", fold_bn=True, compile="reduce-overhead"),
    DEFAULT: dict(),
}


def default_variants(device: torch.device, bf16: bool = False, compile: bool = False) -> list[str]:
    """The rows run by default: torchattacks and every VARIANTS row; bf16 rows on CUDA (or with
    `bf16`), the compiled one on CUDA (or with `compile`; on CPU its time includes compilation)."""
    out = [TORCHATTACKS]
    for name, kw in VARIANTS.items():
        if kw.get("compile"):
            if device.type == "cuda" or compile:
                out.append(name)
        elif kw.get("precision") != "bf16" or device.type == "cuda" or bf16:
            out.append(name)
    return out


def pgd_functions(model, eps: float, alpha: float, steps: int, variants: list[str]) -> dict:
    """{row name: fn(x, y, seed) -> x_adv}; torchattacks is left out (with a note) when not installed."""
    out = {}
    for name in variants:
        if name == TORCHATTACKS:
            try:
                import torchattacks
            except ImportError:
                print("torchattacks is not installed: only advkit rows", file=sys.stderr)
                continue

            def torchattacks_pgd(x, y, seed):
                torch.manual_seed(seed)
                return torchattacks.PGD(model, eps=eps, alpha=alpha, steps=steps, random_start=True)(x, y)
            out[name] = torchattacks_pgd
        elif name == DEFAULT:
            out[name] = lambda x, y, seed: pgd(model, x, y, eps, alpha, steps, seed=seed)
        else:
            fast = attack_model(model, **VARIANTS[name])
            out[name] = lambda x, y, seed, fast=fast: last_iterate_pgd(
                fast, x, y, eps, alpha, steps, torch.Generator(x.device).manual_seed(seed))
    return out


def measure_pgd(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device,
                batch_size: int = 512, steps: int = 10, eps: float = 8 / 255, alpha: float = 2 / 255,
                variants: list[str] | None = None) -> list[dict]:
    """One dict per row: method, images_per_s, speedup (vs torchattacks, None without it),
    robust_accuracy, diff_points (robust accuracy minus torchattacks', in percentage points).
    `model` on `device` in eval mode; variants: names of TORCHATTACKS / VARIANTS (default
    `default_variants(device)`). Only whole batches are used (a ragged last batch would make the
    compiled rows recompile for its shape inside the timed region)."""
    n = len(y) // batch_size * batch_size or len(y)
    x, y = x[:n], y[:n]
    fns = pgd_functions(model, eps, alpha, steps, variants or default_variants(device))
    results = measure(fns, model, x, y, batch_size, device)
    base = results.get(TORCHATTACKS)
    return [{"method": name, "images_per_s": ips, "robust_accuracy": acc,
             "speedup": ips / base[0] if base else None,
             "diff_points": 100 * (acc - base[1]) if base else None} for name, (ips, acc) in results.items()]


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
        from advkit.runs.checkpoints import load_model
        model = load_model(args.checkpoint)
    else:  # random weights: estimate BatchNorm statistics on the images, so predictions depend on them
        recalibrate_batchnorm(model, x[:512], batch_size=512)
    model = model.to(device).eval()
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    with torch.no_grad():
        clean = sum((model(x[i:i + 512].to(device)).argmax(1).cpu() == y[i:i + 512]).sum().item()
                    for i in range(0, len(y), 512)) / len(y)
    rows = measure_pgd(model, x, y, device, args.batch_size, args.steps, args.eps, args.alpha,
                       default_variants(device, args.bf16, args.compile))
    load = f", load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores" if device.type == "cpu" else ""
    weights = f"checkpoint {args.checkpoint}" if args.checkpoint else "random weights"
    title = f"attack_speed: PGD-{args.steps} eps {args.eps * 255:.0f}/255 step {args.alpha * 255:.0f}/255, ResNet-32"
    header = (f"device: {device_name(device)}{load}; torch {torch.__version__}; "
              f"data: {source}, n={len(y)}, batch {args.batch_size}; model: {weights}, clean accuracy {clean:.4f}")
    lines = [
        "| method | images/s | speed-up vs torchattacks | robust accuracy | vs torchattacks (points) |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        speedup = f"{r['speedup']:.2f}x" if r["speedup"] is not None else "n/a"
        diff = f"{r['diff_points']:+.2f}" if r["diff_points"] is not None else "n/a"
        lines.append(f"| {r['method']} | {r['images_per_s']:.1f} | {speedup} | {r['robust_accuracy']:.4f} | {diff} |")
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
    ap.add_argument("--checkpoint", default=None, help="trained ResNet-32 saved by advkit.runs.checkpoints.save_model")
    ap.add_argument("--bf16", action="store_true", help="also time bf16 autocast on CPU (always on CUDA)")
    ap.add_argument("--compile", action="store_true",
                    help="also time the compiled row (reduce-overhead) on CPU (always on CUDA)")
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
