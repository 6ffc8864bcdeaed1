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
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from advkit.attacks import pgd  # noqa: E402
from advkit.models import get_model  # noqa: E402


def load_images(n: int, data_dir: str | None, seed: int) -> tuple[torch.Tensor, torch.Tensor, str]:
    if data_dir:
        try:
            from advkit.data import get_dataset, to_float
            ds = get_dataset("cifar10", data_dir, download=False)
            return to_float(ds.x_test[:n]), ds.y_test[:n], "CIFAR-10 test"
        except Exception as err:  # noqa: BLE001 - any failure means: fall back to random images
            print(f"could not load CIFAR-10 from {data_dir} ({err}); using random images", file=sys.stderr)
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g), "random CIFAR-shaped"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                             text=True, timeout=10)
        return out.stdout.strip() or "none"
    except (OSError, subprocess.SubprocessError):
        return "none"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


@torch.no_grad()
def recalibrate_batchnorm(model: torch.nn.Module, x: torch.Tensor) -> None:
    """Running BatchNorm statistics = the batch statistics of x (a randomly initialised ResNet
    with default statistics predicts one class for every input, which no attack can change)."""
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # cumulative average
    model.train()
    model(x)
    model.eval()


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
    out["advkit pgd fp32"] = lambda x, y, seed: pgd(model, x, y, eps, alpha, steps, seed=seed, autocast=False)
    if device.type == "cuda" or args.bf16:
        out["advkit pgd bf16 autocast"] = lambda x, y, seed: pgd(model, x, y, eps, alpha, steps, seed=seed,
                                                                 autocast=True)
    if args.compile:
        out["advkit pgd bf16 + compile"] = lambda x, y, seed: pgd(model, x, y, eps, alpha, steps, seed=seed,
                                                                  autocast=device.type == "cuda", compile=True)
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
            sync(device)
            start = time.perf_counter()
            x_adv = fns[name](xb, yb, i)
            sync(device)
            seconds[name] += time.perf_counter() - start
            with torch.no_grad():
                correct[name] += (model(x_adv).argmax(1) == yb).sum()
    return {name: (len(y) / seconds[name], correct[name].item() / len(y)) for name in names}


def run(args) -> str:
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    x, y, source = load_images(args.n, args.data_dir, args.seed)
    torch.manual_seed(args.seed)
    model = get_model("resnet32", 10, 3)
    if args.checkpoint:
        from advkit.runs import load_model
        model = load_model(args.checkpoint)
    else:  # random weights: estimate BatchNorm statistics on the images, so predictions depend on them
        recalibrate_batchnorm(model, x[:512])
    model = model.to(device).eval()
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    with torch.no_grad():
        clean = sum((model(x[i:i + 512].to(device)).argmax(1).cpu() == y[i:i + 512]).sum().item()
                    for i in range(0, len(y), 512)) / len(y)
    results = measure(methods(args, model, device), model, x, y, args.batch_size, device)
    rows = [(name, ips, acc) for name, (ips, acc) in results.items()]
    base = next((ips for name, ips, _ in rows if name.startswith("torchattacks")), None)
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    load = f", load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores" if device.type == "cpu" else ""
    weights = f"checkpoint {args.checkpoint}" if args.checkpoint else "random weights"
    lines = [
        f"### attack_speed: PGD-{args.steps} eps {args.eps * 255:.0f}/255 step {args.alpha * 255:.0f}/255, ResNet-32",
        "",
        f"{when} · device: {device_name(device)}{load} · commit {git_commit()} · torch {torch.__version__} · "
        f"data: {source}, n={len(y)}, batch {args.batch_size} · model: {weights}, clean accuracy {clean:.4f}",
        "",
        "| method | images/s | speed-up vs torchattacks | robust accuracy |",
        "|---|---:|---:|---:|",
    ]
    for name, ips, acc in rows:
        speedup = f"{ips / base:.2f}x" if base else "n/a"
        lines.append(f"| {name} | {ips:.1f} | {speedup} | {acc:.4f} |")
    if device.type == "cpu" and os.getloadavg()[0] > (os.cpu_count() or 1):
        lines += ["", "Caution: the load average exceeds the core count, so other processes dominate these "
                  "timings; compare speeds only from an idle machine or a GPU run."]
    return "\n".join(lines) + "\n"


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
    ap.add_argument("--results", default=str(ROOT / "benchmarks" / "RESULTS.md"))
    args = ap.parse_args(argv)
    if args.n < 1 or args.batch_size < 1 or args.steps < 1:
        ap.error("--n, --batch-size and --steps must be >= 1")
    text = run(args)
    print(text)
    if args.results:
        with open(args.results, "a") as f:
            f.write("\n" + text)


if __name__ == "__main__":
    main()
