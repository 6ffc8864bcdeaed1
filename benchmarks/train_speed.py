"""Training speed (issue 12): epoch time of the paper and the fast recipe, and time to a test accuracy.

Rows, each trained through `advkit.training.fit.fit` exactly as notebook 01 trains the base model:

- paper: the paper profile's notebook-01 settings (advkit/pipeline/profiles/paper.yaml: batch 128, SGD 0.1,
  weight decay 1e-4, multistep over 160 epochs), eager;
- fast: `advkit.training.fit.FAST_RECIPE` (batch 512, one-cycle, label smoothing; fused SGD on CUDA), eager;
- fast + compile: the same with `TrainConfig(compile=...)` (--compile-mode, default "default").

Each runs --epochs epochs of its recipe's schedule on CIFAR-10 (--data-dir) or on random CIFAR-shaped
images (times only; the accuracy means nothing) and reports the first epoch (cuDNN autotuning and
compilation land there) and the median of the later ones. --epochs-to-accuracy adds the fast recipe's
whole schedule, stopped when the test accuracy reaches --target (92.5 %) or the training time passes
--time-limit; its time counts training only (the per-epoch test evaluation is excluded), from the
first step, compilation included.

    python benchmarks/train_speed.py --data-dir shared-data/cifar10-jpeg                     # GPU, ~1 min
    python benchmarks/train_speed.py --data-dir shared-data/cifar10-jpeg --epochs-to-accuracy  # + <= 150 s
    python benchmarks/train_speed.py --model resnet18 --rows paper                           # E18 (docs/scaling.md)
    python benchmarks/train_speed.py --n-train 128 --n-test 128 --epochs 1 --no-append       # CPU smoke, < 2 min

`measure_training(...)` returns one row as a dict (benchmarks/speed_table.py uses it). Prints a
markdown table and appends it to benchmarks/RESULTS.md (date, device, torch version, commit).
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch
from common import add_output_args, publish, run_header  # first: repository root on sys.path

from advkit._torch import gpu_policy, loss_and_accuracy, resolve_precision
from advkit.data import Batcher, get_dataset
from advkit.models import get_model
from advkit.runs.run import resolve_device
from advkit.training.fit import TrainConfig, apply_recipe, fit

ROWS = ("paper", "fast", "fast+compile")


class _Stop(Exception):
    """Raised from the per-epoch evaluation to end training (target reached or time spent)."""


def _paper_settings(epochs: int | None) -> tuple[TrainConfig, int]:
    """The paper profile's notebook-01 TrainConfig and batch size, as notebook 01 builds them."""
    from advkit.pipeline.driver import load_profile

    p = load_profile("paper")
    config = TrainConfig(epochs=epochs or p["epochs"], optimizer=p["optimizer"], lr=p["lr"],
                         weight_decay=p["weight_decay"], schedule=p["schedule"], seed=0)
    return apply_recipe(p["recipe"], config, p["batch_size"])


def _data(data_dir: str | None, n_train: int | None, n_test: int | None, device: torch.device):
    """(x_train, y_train, x_test, y_test, description): CIFAR-10, or random CIFAR-shaped uint8 images."""
    if data_dir:
        ds = get_dataset("cifar10", data_dir, download=False)
        return (ds.x_train[:n_train], ds.y_train[:n_train], ds.x_test[:n_test].to(device),
                ds.y_test[:n_test].to(device), "CIFAR-10")
    g = torch.Generator().manual_seed(0)
    n, m = n_train or 50_000, n_test or 10_000
    return (torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8),
            torch.randint(0, 10, (n,), generator=g),
            torch.randint(0, 256, (m, 3, 32, 32), generator=g, dtype=torch.uint8).to(device),
            torch.randint(0, 10, (m,), generator=g).to(device), "random CIFAR-shaped")


def measure_training(device: torch.device | str, data_dir: str | None, recipe: str = "fast", epochs: int | None = None,
                     target_acc: float | None = None, time_limit_s: float | None = None, *,
                     compile: bool | str = False, model: str = "resnet32", n_train: int | None = None,
                     n_test: int | None = None, schedule_epochs: int | None = None) -> dict[str, Any]:
    """Train `model` with `recipe` ("paper": the paper profile's notebook-01 settings; "fast": FAST_RECIPE)
    through `fit` for `epochs` epochs (None: the whole schedule of `schedule_epochs`, default the
    recipe's), stopping early once the test accuracy reaches `target_acc` or the training time passes
    `time_limit_s`. Returns one row: epoch times, images/s, accuracies, time to the target."""
    device = torch.device(device) if isinstance(device, str) else device
    if recipe == "paper":
        config, batch_size = _paper_settings(schedule_epochs)
    else:
        config, batch_size = apply_recipe(recipe, TrainConfig(seed=0), 0)
        if schedule_epochs is not None:
            config = TrainConfig(**{**vars(config), "epochs": schedule_epochs})
    config = TrainConfig(**{**vars(config), "compile": compile})
    x, y, x_test, y_test, what = _data(data_dir, n_train, n_test, device)
    batches = Batcher(x, y, batch_size, augment=True, padding=4, seed=0, device=device)
    torch.manual_seed(0)
    net = get_model(model, 10, 3).to(device)
    log: list[dict[str, float]] = []
    clock = {"train": 0.0, "mark": 0.0}
    stopped = "schedule end"

    def evaluate(m: torch.nn.Module) -> dict[str, float]:
        nonlocal stopped
        seconds = time.perf_counter() - clock["mark"]  # fit's epoch ended with a host sync (its mean loss)
        clock["train"] += seconds
        acc = loss_and_accuracy(m, x_test, y_test, batch_size=2048, precision=config.precision).accuracy
        log.append({"epoch_s": seconds, "train_s": clock["train"], "test_acc": acc})
        clock["mark"] = time.perf_counter()
        if target_acc is not None and acc >= target_acc:
            stopped = "target"
            raise _Stop
        if time_limit_s is not None and clock["train"] >= time_limit_s:
            stopped = "time limit"
            raise _Stop
        return {}

    start = clock["mark"] = time.perf_counter()
    try:
        fit(net, batches, config, evaluate=evaluate, stop_after=epochs, progress=False)
        if epochs is not None and epochs < config.epochs:
            stopped = "epochs"
    except _Stop:
        pass
    wall = time.perf_counter() - start
    later = [r["epoch_s"] for r in log[1:]] or [log[0]["epoch_s"]]
    hit = next((i for i, r in enumerate(log) if target_acc is not None and r["test_acc"] >= target_acc), None)
    return {"model": model, "recipe": recipe, "batch_size": batch_size, "compile": config.compile,
            "fused": gpu_policy(device), "precision": resolve_precision(config.precision, device),
            "data": what, "n_train": len(y), "schedule_epochs": config.epochs, "epochs_run": len(log),
            "first_epoch_s": log[0]["epoch_s"], "epoch_s": statistics.median(later),
            "images_per_s": len(y) / statistics.median(later), "train_s": clock["train"], "wall_s": wall,
            "final_test_acc": log[-1]["test_acc"], "best_test_acc": max(r["test_acc"] for r in log),
            "target_acc": target_acc, "time_to_target_s": log[hit]["train_s"] if hit is not None else None,
            "epoch_at_target": hit + 1 if hit is not None else None, "stopped": stopped}


def table_row(r: dict[str, Any]) -> str:
    to_target = ("-" if r["target_acc"] is None else
                 f"{r['time_to_target_s']:.1f} s (epoch {r['epoch_at_target']})" if r["time_to_target_s"] is not None
                 else f"not reached ({r['stopped']}, {r['train_s']:.0f} s)")
    return (f"| {r['model']} | {r['recipe']} | {r['batch_size']} | {r['compile']} | {r['fused']} | {r['precision']} "
            f"| {r['first_epoch_s']:.2f} | {r['epoch_s']:.2f} | {r['images_per_s']:,.0f} | {r['epochs_run']}/"
            f"{r['schedule_epochs']} | {r['best_test_acc']:.4f} | {to_target} |")


HEADER = ("| model | recipe | batch | compile | fused | precision | first epoch s | epoch s | images/s | epochs "
          "| best test acc | time to target |\n|---|---|---|---|---|---|---|---|---|---|---|---|")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--model", default="resnet32")
    parser.add_argument("--data-dir", default=None, help="CIFAR-10 folder (else random CIFAR-shaped images)")
    parser.add_argument("--rows", default=None, help=f"comma-separated, of {ROWS} (default: all on CUDA; on the "
                        "CPU paper,fast: compiling ResNet-32's training step there takes minutes)")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per epoch-time row")
    parser.add_argument("--n-train", type=int, default=None, help="first n training images (default all / 50,000)")
    parser.add_argument("--n-test", type=int, default=None, help="first n test images (default all / 10,000)")
    parser.add_argument("--compile-mode", default="default", help="TrainConfig.compile of the compiled rows")
    parser.add_argument("--epochs-to-accuracy", action="store_true", help="add the fast recipe to --target")
    parser.add_argument("--target", type=float, default=0.925)
    parser.add_argument("--time-limit", type=float, default=150.0, help="training seconds of that row at most")
    add_output_args(parser)
    args = parser.parse_args()
    device = resolve_device(args.device)
    mode = True if args.compile_mode == "default" else args.compile_mode
    common = dict(model=args.model, n_train=args.n_train, n_test=args.n_test)
    rows = []
    for name in (args.rows or ",".join(ROWS if device.type == "cuda" else ROWS[:2])).split(","):
        if name not in ROWS:
            parser.error(f"--rows: {name!r} is not one of {ROWS}")
        recipe, compile = name.split("+")[0], mode if name.endswith("+compile") else False
        rows.append(measure_training(device, args.data_dir, recipe, args.epochs, compile=compile, **common))
        print(table_row(rows[-1]), flush=True)
    if args.epochs_to_accuracy:
        rows.append(measure_training(device, args.data_dir, "fast", None, args.target, args.time_limit, **common))
    table = "\n".join([HEADER, *map(table_row, rows)])
    header = (f"{run_header(device)}; data: {rows[0]['data']}, {rows[0]['n_train']} training images; epoch s: "
              "median after the first; time to target: training time (evaluation excluded), compilation included")
    publish("Training speed", header, table, args)


if __name__ == "__main__":
    main()
