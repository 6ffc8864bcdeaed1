"""Training speed: ResNet-32 images/s on this device, and (with CIFAR-10) wall time to a test accuracy.

    python benchmarks/train_speed.py                       # throughput, CIFAR-shaped random data
    python benchmarks/train_speed.py --data-dir DIR --to-accuracy 0.92 --epochs 40
                                                           # paper-profile model to 92% (GPU)

Prints a markdown table and appends it to benchmarks/RESULTS.md (date, device, commit).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

from common import RESULTS, append_results, device_name, results_entry, timed  # first: repository root on sys.path

from advkit._torch import autocast
from advkit.data import Batcher, get_dataset
from advkit.models import get_model
from advkit.runs import resolve_device
from advkit.train import TrainConfig, fit


def throughput(model_name: str, device: torch.device, batch_size: int, steps: int, precision: str,
               channels_last: bool) -> float:
    """Training images/s (forward, backward, SGD step) on random CIFAR-shaped batches."""
    model = get_model(model_name, 10, 3).to(device)
    fmt = torch.channels_last if channels_last and device.type == "cuda" else torch.contiguous_format
    model = model.to(memory_format=fmt)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    x = torch.rand(batch_size, 3, 32, 32, device=device).contiguous(memory_format=fmt)
    y = torch.randint(0, 10, (batch_size,), device=device)

    def step():
        with autocast(device, precision):
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def run(n: int) -> None:
        for _ in range(n):
            step()

    timed(lambda: run(3), device)  # warm-up
    _, seconds = timed(lambda: run(steps), device)
    return steps * batch_size / seconds


def time_to_accuracy(args, device: torch.device) -> tuple[float | None, float, int]:
    """Train with the given recipe; wall seconds until test accuracy first reaches the target."""
    data = get_dataset("cifar10", args.data_dir)
    torch.manual_seed(0)
    model = get_model(args.model, 10, 3).to(device)
    config = TrainConfig(epochs=args.epochs, lr=args.lr, schedule=args.schedule,
                         weight_decay=args.weight_decay, label_smoothing=args.label_smoothing, seed=0)
    result = fit(model, Batcher(data.x_train, data.y_train, args.batch_size, augment=True, padding=4, device=device), config,
                 test=(data.x_test.to(device), data.y_test.to(device)))
    elapsed = result.history["time_s"].cumsum()
    hit = result.history.index[result.history["test_acc"] >= args.to_accuracy]
    when = float(elapsed[hit[0]]) if len(hit) else None
    return when, float(result.history["test_acc"].max()), int(hit[0] + 1) if len(hit) else -1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--model", default="resnet32")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20, help="timed steps for the throughput figure")
    parser.add_argument("--data-dir", default=None, help="CIFAR-10 folder: also measure time to accuracy")
    parser.add_argument("--to-accuracy", type=float, default=0.92)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--lr", type=float, default=0.2)
    parser.add_argument("--schedule", default="onecycle")
    parser.add_argument("--weight-decay", type=float, default=5e-4)
    parser.add_argument("--label-smoothing", type=float, default=0.1)
    parser.add_argument("--results", default=str(RESULTS), help="markdown file to append to")
    parser.add_argument("--no-append", action="store_true", help="print only, do not append to --results")
    args = parser.parse_args()
    device = resolve_device(args.device)

    rows = []
    for precision in (["fp32", "bf16"] if device.type == "cuda" else ["fp32"]):
        ips = throughput(args.model, device, args.batch_size, args.steps, precision, channels_last=True)
        rows.append(f"| {args.model} training throughput | {precision} | {args.batch_size} "
                    f"| {ips:,.0f} images/s |")
    if args.data_dir:
        when, best, epoch = time_to_accuracy(args, device)
        reached = f"{when:.0f} s (epoch {epoch})" if when is not None else f"not reached (best {best:.4f})"
        rows.append(f"| {args.model} to {args.to_accuracy:.0%} test acc, {args.epochs} ep {args.schedule} "
                    f"lr {args.lr} | bf16 | {args.batch_size} | {reached} |")
    table = "\n".join(["| what | precision | batch | result |", "|---|---|---|---|", *rows])
    header = f"device: {device_name(device)}; torch {torch.__version__}"
    print(results_entry("Training speed", header, table) if args.no_append
          else append_results("Training speed", header, table, Path(args.results)))


if __name__ == "__main__":
    main()
