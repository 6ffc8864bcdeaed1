"""Adversarial training quality bar and the Xu et al. (2019) Table-1 ordering.

Part A (--part at): PGD-AT (Madry et al. 2018) of PreAct ResNet-18 on CIFAR-10 with Rice et
al.'s settings (advkit.training.fit.paper_config("pgd_at"), rescaled to --epochs), 500 held-out
training images for early stopping on the robust loss and Stutz et al.'s per-epoch subsets
(advkit.training.robust_overfitting). Reports, for the early-stopped and the final weights, clean test
accuracy and robust accuracy against PGD-20 at eps 8/255 (step 2/255, uniform start), plus
training wall time per epoch (evaluation excluded). Goal (issue 4): >= 47% PGD-20 robust
accuracy with early stopping (Rice et al.: ~52% on the original data), clean >= ~80%.

Part B (--part xu): the Xu et al. protocol on ResNet-32: a clean base model, then one
fine-tune per static adversarial augmentation (FGSM, PGD, stAdv with the XU2019 budgets;
advkit.training.augment), evaluated with the XU2019 preset on --n-test test images. Checks the Table-1
ordering: the FGSM-augmented model is the most robust to FGSM, the PGD-augmented one to PGD
(and the stAdv-augmented one to stAdv).

    python benchmarks/adversarial_training.py                      # GPU: 200 + 200 + 3 x 20 epochs
    python benchmarks/adversarial_training.py --epochs 30 --xu-base-epochs 30 --xu-epochs 5  # ~1 h H100
    python benchmarks/adversarial_training.py --epochs 1 --n-train 512 --n-test 256 --n-sub 64 \\
        --xu-base-epochs 1 --xu-epochs 1 --threads 1                  # CPU toy run, minutes

Data: CIFAR-10 from --data-dir (advkit.data format; default the shared JPEG copy), else random
images. Prints markdown tables and appends them to benchmarks/RESULTS.md (date, device, commit).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, ROOT, append_results, device_name  # noqa: E402

from advkit._checks import XU_ATTACKS
from advkit._torch import to_float
from advkit.attacks.evaluate import XU2019, accuracy, evaluate_attacks, robust_accuracy
from advkit.data import Batcher, Dataset, split_validation
from advkit.models import get_model
from advkit.training.augment import augmented_dataset, finetune_batcher, finetune_config
from advkit.training.fit import TrainConfig, fit, paper_config
from advkit.training.objectives import PGDAT
from advkit.training.robust_overfitting import epoch_robust_metrics


def load_data(data_dir: str | None, seed: int) -> tuple[Dataset, str]:
    if data_dir:
        try:
            from advkit.data import get_dataset
            return get_dataset("cifar10", data_dir, download=False), f"CIFAR-10 ({data_dir})"
        except Exception as err:  # noqa: BLE001 - any failure means: fall back to random images
            print(f"could not load CIFAR-10 from {data_dir} ({err}); using random images", file=sys.stderr)
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (6000, 3, 32, 32), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, 10, (6000,), generator=g)
    return Dataset("random", images[:5000], labels[:5000], images[5000:], labels[5000:],
                   [str(i) for i in range(10)]), "random images"


def markdown(df: pd.DataFrame, index: bool = True, digits: int = 4) -> str:
    """A DataFrame as a markdown table (pandas' to_markdown needs tabulate)."""
    df = df.reset_index() if index else df
    cells = [[f"{v:.{digits}f}" if isinstance(v, float) else str(v) for v in row] for row in df.itertuples(index=False)]
    lines = ["| " + " | ".join(map(str, df.columns)) + " |", "|" + "---|" * len(df.columns)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in cells])


def part_at(data: Dataset, args, device: torch.device, run: Path) -> tuple[str, dict]:
    (x_train, y_train), val = split_validation(data.x_train, data.y_train, args.n_val, seed=args.seed)
    x_train, y_train = x_train[:args.n_train], y_train[:args.n_train]
    n_sub = args.n_sub
    evaluate = epoch_robust_metrics((x_train[:n_sub], y_train[:n_sub]), (data.x_test[:n_sub], data.y_test[:n_sub]),
                              val, batch_size=args.eval_batch_size)
    torch.manual_seed(args.seed)
    model = get_model(args.arch, 10, 3).to(device)
    config = paper_config("pgd_at", epochs=args.epochs, seed=args.seed)
    objective = PGDAT()  # eps 8/255, step 2/255, 10 steps, train-mode attack (Rice et al.)
    result = fit(model, Batcher(x_train, y_train, 128, augment=True, padding=4, seed=args.seed, device=device), config,
                 objective=objective, evaluate=evaluate, select="val_robust_loss", run=run, name=f"pgd_at_{args.arch}",
                 progress=True)
    history = result.history
    train_time = (history["time_s"] - history["eval_time_s"]).mean()
    final = result.model
    x_test, y_test = to_float(data.x_test[:args.n_test]), data.y_test[:args.n_test]
    attack = dict(eps=8 / 255, alpha=2 / 255, steps=20, restarts=1)
    rows = []
    for label, m in (("early stopped (epoch %d)" % result.best_epoch, result.early), ("final", final)):
        m.eval()
        rows.append({"weights": label, "clean acc": accuracy(m, x_test, y_test),
                     "PGD-20 acc": robust_accuracy(m, x_test, y_test, "pgd", batch_size=args.eval_batch_size,
                                                   **attack)})
    table = markdown(pd.DataFrame(rows), index=False)
    curve = markdown(history[["epoch", "train_robust_loss", "test_robust_loss", "val_robust_loss",
                              "train_robust_err", "test_robust_err"]], index=False)
    summary = {"train_s_per_epoch": float(train_time), "best_epoch": result.best_epoch,
               "n_train": len(y_train)}
    text = (f"PGD-AT {args.arch}, {len(y_train)} training images, {args.epochs} epochs, Rice et al. schedule; "
            f"early stopping on PGD-20 robust loss of {args.n_val} held-out images; test: first {len(y_test)} "
            f"images, PGD-20 eps 8/255 step 2/255, 1 restart. Training time per epoch (evaluation excluded): "
            f"{train_time:.1f} s.\n\n{table}\n\nPer-epoch robust loss / error (subsets of {n_sub}):\n\n{curve}\n")
    return text, summary


def part_xu(data: Dataset, args, device: torch.device, run: Path) -> tuple[str, dict]:
    x_train, y_train = data.x_train[:args.n_train], data.y_train[:args.n_train]
    x_test, y_test = data.x_test[:args.n_test], data.y_test[:args.n_test]
    torch.manual_seed(args.seed)
    base = get_model(args.xu_arch, 10, 3).to(device)
    base_config = TrainConfig(epochs=args.xu_base_epochs, lr=0.1, schedule="multistep",
                              weight_decay=1e-4, seed=args.seed)
    t0 = time.perf_counter()
    fit(base, Batcher(x_train, y_train, 128, augment=True, padding=4, seed=args.seed, device=device), base_config,
        run=run, name=f"base_{args.xu_arch}")
    times = {"base": time.perf_counter() - t0}
    models = {"base": base.eval()}
    for attack in XU_ATTACKS:
        t0 = time.perf_counter()
        x2, y2 = augmented_dataset(base, x_train, y_train, attack, run=run, batch_size=args.eval_batch_size,
                                   seed=args.seed)
        times[f"generate {attack}"] = time.perf_counter() - t0
        model = copy.deepcopy(base)
        t0 = time.perf_counter()
        fit(model, finetune_batcher(x2, y2, seed=args.seed, device=device),
            finetune_config(args.xu_epochs, seed=args.seed), run=run, name=f"{attack}_augmented_{args.xu_arch}")
        times[f"fine-tune {attack}"] = time.perf_counter() - t0
        models[f"{attack}-augmented"] = model.eval()
    table = pd.DataFrame({name: evaluate_attacks(m, to_float(x_test), y_test, XU2019, ssim=False,
                                                 batch_size=args.eval_batch_size)["accuracy"]
                          for name, m in models.items()}).T
    checks, verdicts = {}, []
    for attack in XU_ATTACKS:
        best = table.index[table[attack] == table[attack].max()].tolist()
        checks[attack] = f"{attack}-augmented" in best
        verdicts.append(f"most robust to {attack}: {' = '.join(best)} "
                        f"({'as in Xu et al.' if checks[attack] else 'NOT as in Xu et al.'})")
    verdict = "; ".join(verdicts)
    text = (f"Xu et al. protocol, {args.xu_arch}: base {args.xu_base_epochs} epochs (SGD 0.1), fine-tunes "
            f"{args.xu_epochs} epochs (Adam 1e-3) on {len(y_train)} clean + {len(y_train)} adversarial images; "
            f"top-1 accuracy on the first {len(y_test)} test images under the XU2019 preset.\n\n"
            f"{markdown(table.rename_axis('model'))}\n\n{verdict}.\n\nWall times (s): "
            + ", ".join(f"{k} {v:.0f}" for k, v in times.items()) + "\n")
    return text, {"ordering": checks}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=["at", "xu", "both"], default="both")
    ap.add_argument("--data-dir", default=str(ROOT / "shared-data" / "cifar10-jpeg"))
    ap.add_argument("--arch", default="preact_resnet18")
    ap.add_argument("--xu-arch", default="resnet32")
    ap.add_argument("--epochs", type=int, default=200, help="PGD-AT epochs (Rice et al.: 200)")
    ap.add_argument("--xu-base-epochs", type=int, default=200)
    ap.add_argument("--xu-epochs", type=int, default=20, help="fine-tuning epochs (Xu et al.: 200)")
    ap.add_argument("--n-train", type=int, default=None, help="training images (default: all)")
    ap.add_argument("--n-test", type=int, default=10_000)
    ap.add_argument("--n-val", type=int, default=500)
    ap.add_argument("--n-sub", type=int, default=1000, help="per-epoch train/test subsets (Stutz et al.: 1000)")
    ap.add_argument("--eval-batch-size", type=int, default=1000)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 on a shared CPU)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--run", default=None, help="run directory (default runs/bench_adv_<timestamp>)")
    ap.add_argument("--results", default=str(RESULTS))
    args = ap.parse_args(argv)
    for name in ("epochs", "xu_base_epochs", "xu_epochs", "n_test", "n_val", "n_sub", "eval_batch_size"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else "cpu" if args.device == "auto" else args.device)
    torch.backends.cudnn.benchmark = True
    data, source = load_data(args.data_dir, args.seed)
    stamp = datetime.now(timezone.utc)
    run = Path(args.run) if args.run else ROOT / "runs" / f"bench_adv_{stamp:%Y%m%d_%H%M%S}"
    print(f"{source}; device {device_name(device)}; run directory {run}", flush=True)

    sections = []
    if args.part in ("at", "both"):
        t0 = time.perf_counter()
        text, _ = part_at(data, args, device, run)
        sections.append(f"#### PGD-AT ({time.perf_counter() - t0:.0f} s in all)\n\n{text}")
    if args.part in ("xu", "both"):
        t0 = time.perf_counter()
        text, _ = part_xu(data, args, device, run)
        sections.append(f"#### Xu et al. Table 1 ordering ({time.perf_counter() - t0:.0f} s in all)\n\n{text}")
    command = " ".join(argv if argv is not None else sys.argv[1:])
    header = (f"device: {device_name(device)}; torch {torch.__version__}; data: {source}; "
              f"command: `python benchmarks/adversarial_training.py {command}`")
    body = "\n".join(sections)
    print(header + "\n\n" + body)
    append_results("Adversarial training", header, body, Path(args.results))


if __name__ == "__main__":
    main()
