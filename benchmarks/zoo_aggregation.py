"""Notebook 05 at the scale of a Stutz-size zoo: time and peak memory of its aggregation steps.

Builds a synthetic flatness table of --models models (default 100, 200 and 500) with the columns
`advkit.studies.zoo.flatness_table` returns (taken from one real `zoo.model_metrics` row of a tiny model,
plus family/epoch/early_stopped/checkpoint/settings/compute_s and the columns merged from
notebooks 02 and 04), named as a sweep names them: `base` and Xu et al.'s fine-tunes `fgsm`,
`pgd`, `stadv`, then per (variant, seed) cell `<variant>_s<seed>` (final weights, 200 epochs),
`<variant>_s<seed>_early` and the epoch checkpoints `_e025`, `_e050`, `_e100`, `_e150`. Values
are random but plausible (seeded): test robust loss with robust overfitting after 40 % of
training, flatness that grows with it (Stutz et al. 2021), early stopping that sometimes keeps the
final epoch (so `distinct_models` drops copies).

Then runs notebook 05's report on it, with notebook 05's calls and arguments (paper profile:
`ci="fisher"`, 10,000 resamples when `ci="bootstrap"`), one step at a time: writing and reading
back `flatness.csv` through `Run` (checksummed), `early_stopping_table`, `overview`,
`correlations` (Fisher z and percentile bootstrap), `correlation_view`, `trajectories` +
`available_pairs`, `summary`, writing `correlations.csv` and `plots.model_scatter` (4 panels,
saved as PNG). Each step is timed once untraced, then run again under `tracemalloc` for its peak
of newly allocated memory (numpy's buffers included). Every step runs under an address-space cap
(--memory-cap-gb above what the process holds at start): a step that needs more raises
MemoryError instead of taking the machine down; a bootstrap that does is re-run with 10x fewer
resamples until it fits, and its time and memory are reported projected to the full count
(both scale linearly in the resamples), marked "projected".

    python benchmarks/zoo_aggregation.py                  # 100, 200, 500 models
    python benchmarks/zoo_aggregation.py --models 30 --no-append   # smoke

Prints a markdown table and appends it to benchmarks/RESULTS.md (date, device, commit).
"""

from __future__ import annotations

import argparse
import gc
import resource
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
from common import add_output_args, publish  # first: puts the repository root on sys.path

from advkit._checks import XU_ATTACKS
from advkit.runs.run import EARLY_SUFFIX, Run, epoch_name
from advkit.studies import correlation, zoo
from advkit.training.variants import parse_variant

# The paper profile's 12 variants, then 8 hyperparameter settings of the kind of Stutz et al.'s Fig. 6.
VARIANTS = ("pgd_at", "trades", "trades+b3", "mart", "awp", "fgsm_rs", "pgd_at+ls0.1", "pgd_at+ln0.1",
            "pgd_at+wd0.005", "pgd_at+swa0.75", "pgd_at+aa", "pgd_at+eps0.0353",
            "trades+b1", "trades+b9", "awp+g0.01", "awp+g0.001", "pgd_at+wd0.001", "pgd_at+wd0.01",
            "pgd_at+ls0.2", "pgd_at+ema0.999")
EPOCHS, KEEP_EPOCHS, BASE_EPOCHS = 200, (25, 50, 100, 150), 160
N_SUBSET, PAPER_RESAMPLES = 1000, 10_000
SCATTER = [("avg_case_flatness", "robust_loss_test"), ("worst_case_flatness", "robust_loss_test"),
           ("avg_case_flatness", "robust_gap"), ("worst_case_flatness", "robust_gap")]  # notebook 05's figure
GB = 1024 ** 3


# --- the synthetic zoo ------------------------------------------------------------------------------


def template_row() -> dict[str, Any]:
    """One real `zoo.model_metrics` row (tiny model, tiny settings): the metric columns and their types."""
    import torch

    from advkit.models import get_model
    torch.manual_seed(0)
    model = get_model("small_cnn", 10, 1).eval()
    x, y = torch.rand(16, 1, 8, 8), torch.randint(0, 10, (16,))
    tiny = zoo.ZooSettings(dataset="digits", n_eval=16, pgd_steps=1, pgd_restarts=1, n_autoattack=4, aa_steps=1,
                           aa_targets=1, flatness_samples=1, worst_steps=1, hessian_iters=2, hessian_samples=3)
    row = zoo.model_metrics(model, (x, y), (x, y), tiny)
    # the paper profile's settings in the per-metric settings columns (constant over models)
    row.update({k: N_SUBSET for k in row if k.endswith("_n_data")})
    row.update(avg_case_flatness_n_samples=10, worst_case_flatness_steps=20, hessian_top_eig_iters=20,
               hessian_trace_n_samples=100, hessian_top_eig_n_params=11_173_962,
               hessian_trace_n_params=11_173_962)
    return row


def model_names(n: int) -> list[tuple[str, str, int]]:
    """(name, variant, epoch) of n models: base, Xu's fine-tunes, then cells (variant, seed) in seed-major
    order, each final, early and its epoch checkpoints (the last cell may be cut short)."""
    names = [("base", "base", BASE_EPOCHS)] + [(a, a, EPOCHS) for a in XU_ATTACKS]
    seed = 0
    while len(names) < n:
        for v in VARIANTS:
            cell = f"{v}_s{seed}"
            names += [(cell, v, EPOCHS), (f"{cell}{EARLY_SUFFIX}", v, -1)]
            names += [(epoch_name(cell, e), v, e) for e in KEEP_EPOCHS]
        seed += 1
    return names[:n]


def synthetic_table(n: int, seed: int = 0) -> pd.DataFrame:
    """A plausible `flatness_table` result for n models (see the module docstring), seeded."""
    rng = np.random.default_rng(seed)
    template = template_row()
    settings = zoo.ZooSettings(dataset="cifar10", n_autoattack=N_SUBSET).key()  # the paper profile's
    severity = {v: rng.uniform(0.1, 1.0) for v in VARIANTS}  # how strongly a variant overfits robustly
    rows = {}
    for name, variant, epoch in model_names(n):
        family, _ = zoo.split_name(name)
        clean_model = variant in ("base", *XU_ATTACKS)
        s = 0.0 if clean_model else severity[variant]
        if epoch == -1:  # early-stopped: lowest test robust loss, or the final epoch if it hardly overfits
            epoch = EPOCHS if s < 0.2 else int(rng.integers(80, 111))
        t = epoch / EPOCHS
        noise = rng.normal(size=8)
        if clean_model:
            loss_test = 6.0 + (2.0 if variant == "base" else 0.0) + 0.3 * noise[0]
            loss_train, err, clean_acc = loss_test - 0.2, 1.0 - abs(0.01 * noise[1]), 0.92 + 0.01 * noise[2]
        else:
            loss_test = 1.45 + 0.05 * noise[0] + 1.6 * s * max(0.0, t - 0.4) / 0.6 + 0.4 * max(0.0, 0.3 - t)
            loss_train = max(0.1, 1.35 - 1.1 * s * t + 0.03 * noise[1])
            err = float(np.clip(0.47 + 0.1 * (loss_test - 1.45) + 0.01 * noise[2], 0.4, 0.95))
            clean_acc = 0.82 + 0.02 * noise[3]
        avg = max(0.05, 0.25 + 0.6 * (loss_test - 1.4) + 0.05 * noise[4])
        worst = max(0.001, 0.02 + 0.05 * (loss_test - 1.4) + 0.005 * noise[5])
        top = float(np.exp(np.log(50 * (1 + s * t)) + 0.2 * noise[6]))
        rel = float(np.exp(np.log(0.05) + 0.3 * noise[7]))
        row = dict(template)
        row.update(clean_loss_train=0.3 + 0.2 * loss_train / 2, clean_acc_train=min(1.0, clean_acc + 0.1 * s * t),
                   robust_loss_train=loss_train, robust_acc_train=min(1.0, 1 - err + 0.3 * s * t),
                   robust_err_train=max(0.0, err - 0.4 * s * t), clean_loss_test=0.5 + 0.1 * loss_test,
                   clean_acc=clean_acc, robust_loss_test=loss_test, robust_acc=1 - err + 0.02, robust_err=err,
                   relative_flatness=rel, relative_flatness_adv=0.8 * rel, robust_gap=loss_test - loss_train,
                   avg_case_flatness=avg, avg_case_flatness_train=0.8 * avg, avg_case_flatness_loss=loss_test,
                   avg_case_flatness_perturbed_loss=loss_test + avg, worst_case_flatness=worst,
                   worst_case_flatness_loss=loss_test, worst_case_flatness_perturbed_loss=loss_test + worst,
                   hessian_top_eig=top, hessian_trace=20 * top, hessian_trace_std_error=top)
        row.update({k: top * 0.7 ** int(k.rsplit("_", 1)[1]) for k in row
                    if k.startswith("hessian_top_eig_") and k.rsplit("_", 1)[1].isdigit()})
        surface = not zoo.split_name(name)[1]  # notebook 04 draws final and early weights, not epoch checkpoints
        rows[name] = {"family": family, "epoch": epoch, "early_stopped": name.endswith(EARLY_SUFFIX), **row,
                      "checkpoint": f"{rng.integers(2 ** 63):016x}", "settings": settings,
                      "compute_s": float(rng.uniform(30, 120)),
                      "one_minus_ssim": {"fgsm": 0.0031, "pgd": 0.0028, "stadv": 0.0062}.get(name, np.nan),
                      "surface_sharpness": 0.5 * avg + 0.05 * rng.normal() if surface else np.nan,
                      "surface_mean_increase": 0.2 * avg if surface else np.nan,
                      "robust_surface_sharpness": 2 * avg if surface and not clean_model else np.nan,
                      "robust_surface_mean_increase": 0.8 * avg if surface and not clean_model else np.nan}
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.index.name = "model"
    return table


def confidence_tables(seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """`confidence_flatness`-shaped tables (clean, adversarial) of one model on N_SUBSET images: notebook 05
    makes them for one model only, so their size does not grow with the zoo."""
    rng = np.random.default_rng(seed)
    out = []
    for acc in (0.82, 0.5):
        conf = rng.uniform(0.2, 1.0, N_SUBSET)
        out.append(pd.DataFrame({"confidence": conf, "correct": rng.uniform(size=N_SUBSET) < acc,
                                 "relative_flatness": 0.05 * (1 - conf) + 1e-3 * rng.uniform(size=N_SUBSET)}))
    return out[0], out[1]


# --- measuring ----------------------------------------------------------------------------------------


def set_cap(cap_gb: float) -> None:
    """Limit the address space to what the process maps now plus cap_gb (MemoryError beyond)."""
    vm = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmSize"))
    hard = resource.getrlimit(resource.RLIMIT_AS)[1]
    soft = vm + int(cap_gb * GB)
    resource.setrlimit(resource.RLIMIT_AS, (soft if hard == resource.RLIM_INFINITY else min(soft, hard), hard))


def measure(fn: Callable[[], Any]) -> tuple[Any, float, float]:
    """(fn(), seconds of an untraced call, peak bytes newly allocated during a second, traced call)."""
    gc.collect()
    t0 = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - t0
    del out
    gc.collect()
    tracemalloc.start()
    out = fn()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return out, seconds, peak


def steps(table: pd.DataFrame, run: Run, resamples: int, figures: Path) -> list[tuple[str, Callable[[], Any]]]:
    """Notebook 05's aggregation, cell by cell, with its arguments (paper profile: seed 0)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from advkit.plots.figures import save_figure
    from advkit.plots.models import model_scatter
    confidence = confidence_tables()

    def scatter():
        fig = model_scatter(table, SCATTER, ncols=2)
        save_figure(fig, "05_robust_loss_vs_flatness", folder=figures)
        plt.close(fig)

    def write_read():
        run.write_table(run.flatness, table)
        return zoo.read_cache(run)

    fisher = correlation.correlations(table, ci="fisher", n_resamples=resamples, seed=0)
    return [
        ("write + verified read of flatness.csv", write_read),
        ("early_stopping_table", lambda: correlation.early_stopping_table(table)),
        ("overview", lambda: correlation.overview(table)),
        ("correlations, ci=fisher", lambda: correlation.correlations(table, ci="fisher", n_resamples=resamples,
                                                                     seed=0)),
        ("correlation_view", lambda: correlation.correlation_view(fisher, decimals=2)),
        ("write correlations.csv", lambda: run.write_table(run.correlations, fisher, index=False)),
        ("trajectories + available_pairs", lambda: (correlation.trajectories(table), correlation.available_pairs(
            table, [("one_minus_ssim", "surface_sharpness"), ("surface_sharpness", "hessian_top_eig")]))),
        ("summary", lambda: correlation.summary(table, fisher, confidence)),
        ("model_scatter, 4 panels, PNG + PDF", scatter),
    ]


def bootstrap_step(table: pd.DataFrame, resamples: int) -> tuple[str, float, float, int]:
    """correlations with ci="bootstrap": (label, seconds, peak bytes, resamples actually run); fewer
    resamples (÷10 each time) when the full count exceeds the cap, projected linearly back."""
    r = resamples
    while True:
        try:
            _, seconds, peak = measure(lambda: correlation.correlations(table, ci="bootstrap", n_resamples=r, seed=0))
        except MemoryError:
            gc.collect()
            if r // 10 < 10:
                return f"correlations, ci=bootstrap, {resamples} resamples", float("nan"), float("nan"), 0
            r //= 10
            continue
        scale = resamples / r
        label = f"correlations, ci=bootstrap, {resamples} resamples"
        if r != resamples:
            label += f" (projected from {r})"
        return label, seconds * scale, peak * scale, r


def run_size(n: int, resamples: int, cap_gb: float, seed: int) -> tuple[list[list[str]], dict[str, Any]]:
    table = synthetic_table(n, seed)
    info = {"models": len(table), "columns": table.shape[1],
            "distinct": len(correlation.distinct_models(table)),
            "memory": table.memory_usage(deep=True).sum()}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        run = Run(Path(tmp) / "zoo")
        limit = resource.getrlimit(resource.RLIMIT_AS)
        set_cap(cap_gb)
        for label, fn in steps(table, run, resamples, Path(tmp) / "figures"):
            try:
                _, seconds, peak = measure(fn)
                rows.append([str(n), label, f"{seconds:.2f}", f"{peak / 2 ** 20:.1f}"])
            except MemoryError:
                rows.append([str(n), label, "-", f"> {cap_gb:g} GB cap"])
            print(" | ".join(rows[-1]), flush=True)
        label, seconds, peak, r = bootstrap_step(table, resamples)
        rows.append([str(n), label, f"{seconds:.1f}" if r else "-",
                     f"{peak / 2 ** 20:.0f}" if r else f"> {cap_gb:g} GB cap at 10 resamples"])
        print(" | ".join(rows[-1]), flush=True)
        resource.setrlimit(resource.RLIMIT_AS, limit)
    return rows, info


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", type=int, nargs="+", default=[100, 200, 500], help="zoo sizes")
    ap.add_argument("--n-resamples", type=int, default=PAPER_RESAMPLES, help="bootstrap resamples (paper: 10000)")
    ap.add_argument("--memory-cap-gb", type=float, default=4.0,
                    help="address space a step may add (MemoryError beyond; protects a shared machine)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the synthetic values")
    add_output_args(ap)
    args = ap.parse_args(argv)
    for v in VARIANTS:
        parse_variant(v)  # the synthetic names are specs notebook 03 accepts
    import threadpoolctl
    threadpoolctl.threadpool_limits(1)
    lines = ["| models | step | seconds | peak new memory (MiB) |", "|---:|---|---:|---:|"]
    sizes = []
    for n in args.models:
        rows, info = run_size(n, args.n_resamples, args.memory_cap_gb, args.seed)
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        sizes.append(f"{info['models']} models ({info['distinct']} distinct weights, {info['columns']} columns, "
                     f"{info['memory'] / 2 ** 20:.2f} MiB in pandas)")
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    header = (f"device: CPU, 1 thread (numpy/BLAS); pandas {pd.__version__}, numpy {np.__version__}; synthetic "
              f"flatness tables: {'; '.join(sizes)}; names `<variant>_s<seed>` with `_early` and `_e025`..`_e150`; "
              f"notebook 05's calls (seed 0, bootstrap {args.n_resamples} resamples); time of one untraced call, "
              f"peak from tracemalloc on a second call; address-space cap {args.memory_cap_gb:g} GB per step; "
              f"process peak RSS {peak_rss:.0f} MiB")
    md = "\n".join(lines)
    publish("Zoo aggregation (notebook 05)", header, md, args)


if __name__ == "__main__":
    main()
