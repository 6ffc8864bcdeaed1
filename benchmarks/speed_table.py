"""Speed table (issue 12): every row of the issue's table, ours beside the reference, in one run.

Rows (`--rows`, default all), each with ours, the reference, the ratio, the goal, whether it is met,
and the correctness check beside it:

- surface: 51 x 51 clean-loss grid of ResNet-32 on 10,000 test images (`advkit.landscape.surfaces.grid`,
  precision auto) vs loss-landscape's per-point loop (`landscape_speed.reference_points`, timed on
  9 points and projected); check: max relative loss difference of ours vs that loop in strict fp32
  (TF32 off) on a 5 x 5 subgrid with the corners <= 1e-3, and the precision "auto" chose;
- surface fp32: the same at 11 x 11 in fp32, points/s; check at the points both grids share;
- pgd: PGD-10 8/255 on 10,000 images vs torchattacks.PGD (`attack_speed.measure_pgd`: advkit's default,
  with --compile also bf16 + CUDA graphs); check: robust accuracies within 0.5 points;
- hessian: top eigenvalue (20 power iterations) and Hutchinson trace (100 probes) on 1,000 images vs
  PyHessian (`hessian_speed.measure_hessian`); check: eigenvalue within 1 %, trace within 2 combined
  standard errors;
- train: ResNet-32 with the fast recipe, stopped at 92.5 % test accuracy or after --train-seconds,
  beside the paper recipe's 160 epochs (batch 128) projected from two timed epochs
  (`train_speed.measure_training`);
- paper: the paper profile projected from this run's unit costs (`advkit.pipeline.plan.project`), notebook
  by notebook, against the 1 h goal; a ResNet-18 PGD-7 training step and a robust line (PGD-20 at
  8 points, 1,000 images) are timed for it.

A missing reference library makes its row say "reference not installed". --profile also runs
torch.profiler over our surface and PGD: the top kernels and the device's idle fraction between them.

    python benchmarks/speed_table.py --data-dir shared-data/cifar10-jpeg   # GPU: the issue's sizes, ~7 min
    python benchmarks/speed_table.py --smoke --results /tmp/r.md           # CPU: tiny sizes, < 90 s

Prints the tables and appends them to benchmarks/RESULTS.md (device, torch version, commit).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import math
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from common import (
    RESULTS,
    append_results,
    load_images,
    profile_kernels,
    recalibrate_batchnorm,
    results_entry,
    run_header,  # first: puts the repository root on sys.path
    timed,
)

from advkit._torch import autocast, gpu_policy
from advkit.attacks.pgd import pgd
from advkit.landscape.directions import random_directions
from advkit.landscape.settings import SurfaceSettings, coordinates
from advkit.landscape.surfaces import grid, line
from advkit.models import get_model
from advkit.pipeline import plan
from advkit.pipeline.driver import load_profile
from advkit.runs.run import resolve_device

ROWS = ("surface", "pgd", "hessian", "train", "paper")
NOT_INSTALLED = "reference not installed"


@dataclass(frozen=True)
class Sizes:
    """What each row measures; the defaults are the issue's (about 7 minutes on one H200)."""

    arch: str = "resnet32"
    n_surface: int = 10_000
    resolution: int = 51
    fp32_resolution: int = 11
    check_points: int = 5  # per axis: the subgrid (corners included) where ours is checked against strict fp32
    reference_points: int = 9  # of them, timed in the reference loop and projected to the grid
    n_pgd: int = 10_000
    pgd_batch: int = 512
    pgd_steps: int = 10
    n_hessian: int = 1000
    power_iters: int = 20
    probes: int = 100
    probe_block: int = 10
    train_seconds: float = 150.0
    train_epochs: int | None = None  # epochs of the fast recipe run (None: its whole schedule, stopped at the target)
    paper_epochs: int = 2  # epochs of the paper recipe timed (the first includes cuDNN autotuning)
    n_train: int | None = None  # None: all training images
    timed_steps: int = 30  # ResNet-18 PGD-7 training steps timed for the paper profile's projection
    n_robust: int = 1000  # a robust line (PGD re-run at each point) timed for the projection, on these images
    robust_points: int = 8
    robust_steps: int = 20
    at_arch: str = "resnet18"
    at_batch: int = 128


SMOKE = Sizes(arch="resnet20", n_surface=64, resolution=3, fp32_resolution=3, check_points=3, reference_points=3,
              n_pgd=64, pgd_batch=32, n_hessian=32, power_iters=2, probes=4, probe_block=2, train_seconds=5.0,
              train_epochs=1, paper_epochs=1, n_train=64, timed_steps=2, at_arch="resnet20", at_batch=16,
              n_robust=16, robust_points=2, robust_steps=2)


@dataclass
class Row:
    work: str
    ours: str
    reference: str
    ratio: float | None
    goal: str
    met: bool | None
    check: str
    check_ok: bool | None


def _yes(flag: bool | None) -> str:
    return "-" if flag is None else ("yes" if flag else "no")


def table(rows: list[Row]) -> str:
    lines = ["| work | ours | reference | ratio | goal | met? | correctness | within bound? |",
             "|---|---|---|---:|---|---|---|---|"]
    for r in rows:
        ratio = "-" if r.ratio is None else f"{r.ratio:.2f}x"
        cells = [r.work, r.ours, r.reference, ratio, r.goal, _yes(r.met), r.check, _yes(r.check_ok)]
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return "\n".join(lines)


class Bench:
    """The shared model, data and device of one run, and the unit costs its rows measure."""

    def __init__(self, args: argparse.Namespace, sizes: Sizes):
        self.args, self.sizes = args, sizes
        self.device = resolve_device(args.device)
        self.gpu = gpu_policy(self.device)  # the choices made for a GPU (also on a CPU under ADVKIT_GPU_POLICY=1)
        torch.backends.cudnn.benchmark = True
        torch.manual_seed(args.seed)
        n = max(sizes.n_surface, sizes.n_pgd, sizes.n_hessian)
        self.x, self.y, self.source = load_images(n, args.data_dir, args.seed)
        if args.checkpoint:
            from advkit.runs.checkpoints import load_model
            self.model = load_model(args.checkpoint)
            self.weights = f"checkpoint {args.checkpoint}"
        else:  # random weights: BatchNorm statistics of the images, so losses are those of a normalized network
            self.model = get_model(sizes.arch, 10, 3)
            recalibrate_batchnorm(self.model, self.x[:2048], batch_size=256)
            self.weights = f"random {sizes.arch} (BatchNorm statistics of the images)"
        self.model = self.model.to(self.device).eval()
        self.units: dict[str, float] = {}
        self.profiles: list[tuple[str, str]] = []

    def data(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[:n].to(self.device), self.y[:n].to(self.device)


# --- rows --------------------------------------------------------------------------------------------


def _surface_knobs(args: argparse.Namespace) -> dict[str, Any]:
    """Speed options of ours that this checkout's SurfaceSettings has (compile arrives with issue 12)."""
    fields = {f.name for f in dataclasses.fields(SurfaceSettings)}
    return {"compile": True} if args.compile and "compile" in fields else {}


def surface_rows(b: Bench) -> list[Row]:
    from landscape_speed import reference_points

    s, model = b.sizes, b.model
    x, y = b.data(s.n_surface)
    dirs = random_directions(model, 2, seed=b.args.seed)
    res, knobs = s.resolution, _surface_knobs(b.args)
    axis = coordinates(1.0, res)
    idx = np.unique(np.linspace(0, res - 1, min(s.check_points, res)).round().astype(int))
    sub = np.array([(axis[i], axis[j]) for i in idx for j in idx])
    xc, yc = b.x[:s.n_surface], b.y[:s.n_surface]  # the reference reads host memory, batch by batch
    reference_points(model, dirs, xc[:256], yc[:256], sub[:1], b.device)  # warm-up
    timed_sub = sub[:s.reference_points]  # timed as the tool runs (torch's defaults: cuDNN TF32 on CUDA)
    _, t_ref = timed(lambda: reference_points(model, dirs, xc, yc, timed_sub, b.device), b.device)
    ref_s = t_ref / len(timed_sub)
    with autocast(b.device, "fp32"):  # the correctness reference: the same loop in strict fp32 (TF32 off)
        ref = reference_points(model, dirs, xc, yc, sub, b.device)
    grid(model, dirs, x, y, resolution=2, precision="auto", **knobs)  # warm-up (compilation, cuDNN autotuning)
    ds, t = timed(lambda: grid(model, dirs, x, y, resolution=res, precision="auto", **knobs), b.device)
    ours = ds.loss.values[np.ix_(idx, idx)].reshape(-1)
    err = float(np.max(np.abs(ours - ref) / np.abs(ref)))
    probes = {k: ds.attrs.get(f"{k}_relative_error", "not measured") for k in ("autocast", "tf32")}
    probe = ", ".join(f"{'bf16' if k == 'autocast' else k} {v:.1e}" if isinstance(v, (float, np.floating))
                      else f"{'bf16' if k == 'autocast' else k} {v}" for k, v in probes.items())
    b.units["clean_point"] = t / (res * res) * 10_000 / s.n_surface
    n_pts = res * res
    ours_text = (f"{t:.1f} s (precision auto -> {ds.attrs['precision']}, "
                 f"{ds.attrs.get('points_per_forward', '?')} points/forward)")
    rows = [Row(f"{res}x{res} clean surface, {s.n_surface:,} images", ours_text,
                f"{ref_s:.3f} s/point -> {ref_s * n_pts:.0f} s", ref_s * n_pts / t,
                "< 10 s, >= 100x", t < 10 and ref_s * n_pts / t >= 100,
                f"max rel. diff vs strict-fp32 loop at {len(sub)} points {err:.1e} (<= 1e-3); auto's probe "
                f"errors: {probe}", err <= 1e-3)]
    if b.args.profile:
        b.profiles.append(("surface (ours, 5x5 grid)", profile_kernels(
            lambda: grid(model, dirs, x, y, resolution=min(res, 5), precision="auto", **knobs), b.device)[0]))
    r32 = s.fp32_resolution
    ds32, t32 = timed(lambda: grid(model, dirs, x, y, resolution=r32, precision="fp32", **knobs), b.device)
    axis32 = coordinates(1.0, r32)
    shared = [(k, i, j) for k, (a, c) in enumerate(sub) for i in range(r32) for j in range(r32)
              if math.isclose(axis32[i], a, abs_tol=1e-9) and math.isclose(axis32[j], c, abs_tol=1e-9)]
    err32 = max((abs(ds32.loss.values[i, j] - ref[k]) / abs(ref[k]) for k, i, j in shared), default=float("nan"))
    rate = r32 * r32 / t32
    rows.append(Row(f"same in fp32 ({r32}x{r32})", f"{rate:.2f} points/s", f"{1 / ref_s:.2f} points/s",
                    rate * ref_s, "-", None,
                    f"max rel. diff vs strict-fp32 loop at {len(shared)} shared points {err32:.1e}",
                    bool(err32 <= 1e-3) if shared else None))
    return rows


def pgd_row(b: Bench) -> list[Row]:
    from attack_speed import TORCHATTACKS, VARIANTS, measure_pgd

    s = b.sizes
    model = copy.deepcopy(b.model)  # channels_last on a GPU helps both sides (as attack_speed.py)
    if b.gpu:
        model = model.to(memory_format=torch.channels_last)
    default = next(name for name in VARIANTS if name.startswith("advkit pgd default"))
    compiled = next((name for name in VARIANTS if "compile" in name), None)
    variants = [TORCHATTACKS, default] + ([compiled] if b.args.compile and compiled else [])
    n = min(s.n_pgd, len(b.y))
    results = {r["method"]: r for r in measure_pgd(model, b.x[:n].to(b.device), b.y[:n].to(b.device), b.device,
                                                   s.pgd_batch, s.pgd_steps, 8 / 255, 2 / 255, variants)}
    b.units["attack_image_step"] = 1 / (results[default]["images_per_s"] * s.pgd_steps)
    if b.args.profile:
        xb, yb = b.data(s.pgd_batch)
        b.profiles.append(("PGD (ours, one batch)", profile_kernels(
            lambda: pgd(model, xb, yb, 8 / 255, 2 / 255, s.pgd_steps, seed=0), b.device)[0]))
    ref = results.get(TORCHATTACKS)
    rows = []
    labels = {default: "advkit default", compiled: "bf16 + fold_bn + compile reduce-overhead, last iterate"}
    for name, label in labels.items():
        if name not in results:
            continue
        r, work = results[name], f"PGD-{s.pgd_steps} 8/255, {n:,} images ({label})"
        ours = f"{r['images_per_s']:,.0f} img/s"
        if ref is None:
            rows.append(Row(work, ours, NOT_INSTALLED, None, ">= 3x", None,
                            f"robust accuracy {r['robust_accuracy']:.4f}; {NOT_INSTALLED}", None))
            continue
        diff = abs(r["diff_points"])
        rows.append(Row(work, ours, f"torchattacks {ref['images_per_s']:,.0f} img/s", r["speedup"], ">= 3x",
                        r["speedup"] >= 3, f"robust accuracy {r['robust_accuracy']:.4f} vs "
                        f"{ref['robust_accuracy']:.4f}: {diff:.2f} points (<= 0.5)", diff <= 0.5))
    return rows


def hessian_rows(b: Bench) -> list[Row]:
    from hessian_speed import EIG_RTOL, measure_hessian

    s = b.sizes
    x, y = b.data(s.n_hessian)
    found = measure_hessian(b.model, x, y, b.device, iters=s.power_iters, samples=s.probes, block_sizes=("auto",),
                            backends=("reverse",), batch_size=s.n_hessian, seed=b.args.seed)
    by = {(r["quantity"].split()[0], r["method"]): r for r in found}
    ours_trace = by[("trace", "ours (reverse)")]
    b.units["hvp"] = ours_trace["seconds"] / ours_trace["hvps"] * 1000 / s.n_hessian
    rows = []
    for task, work in (("top", f"Hessian top eigenvalue, {s.power_iters} power iterations"),
                       ("trace", f"Hessian trace, {s.probes} Hutchinson probes (block {ours_trace['block']})")):
        r, ref = by[(task, "ours (reverse)")], by.get((task, "PyHessian"))
        se = f" ± {r['std_error']:.2g}" if math.isfinite(r["std_error"]) else ""
        work, ours = f"{work}, {s.n_hessian:,} images", f"{r['seconds']:.2f} s ({r['estimate']:.4g}{se})"
        if ref is None:
            rows.append(Row(work, ours, NOT_INSTALLED, None, ">= 3x", None, NOT_INSTALLED, None))
            continue
        bound = (f"<= {EIG_RTOL:.0%}" if task == "top" else
                 f"within 2 combined SE = {2 * math.hypot(r['std_error'], ref['std_error']):.3g}")
        rows.append(Row(work, ours, f"PyHessian {ref['seconds']:.2f} s", r["speedup"], ">= 3x", r["speedup"] >= 3,
                        f"{r['estimate']:.4g} vs {ref['estimate']:.4g}: {r['rel_diff']:.1%} ({bound})",
                        bool(r["within_se"])))
    return rows


def _steps_per_second(model: torch.nn.Module, objective, x: torch.Tensor, y: torch.Tensor, steps: int,
                      device: torch.device) -> float:
    """Training steps per second (objective, backward, SGD step, bf16 autocast on CUDA), after one warm-up step."""
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step():
        with autocast(device, "auto"):
            loss = objective(model, x, y)
        opt.zero_grad(set_to_none=True)
        loss.float().backward()
        opt.step()

    step()
    _, t = timed(lambda: [step() for _ in range(steps)], device)
    return steps / t


def train_row(b: Bench) -> Row:
    from train_speed import measure_training

    s, target = b.sizes, 0.925
    n_test = None if b.args.data_dir else s.n_surface
    kw = dict(n_train=s.n_train, n_test=n_test)
    paper = measure_training(b.device, b.args.data_dir, "paper", epochs=s.paper_epochs, **kw)
    b.units["clean_epoch"] = paper["epoch_s"] * 50_000 / paper["n_train"]
    fast = measure_training(b.device, b.args.data_dir, "fast", epochs=s.train_epochs, target_acc=target,
                            time_limit_s=s.train_seconds, compile=b.args.compile, **kw)
    paper_total = b.units["clean_epoch"] * paper["schedule_epochs"]
    reached = fast["time_to_target_s"] is not None
    recipe = f"FAST_RECIPE, batch {fast['batch_size']}{', compiled' if fast['compile'] else ''}"
    ours = (f"{fast['time_to_target_s']:.0f} s to {target:.1%} (epoch {fast['epoch_at_target']}; {recipe})"
            if reached else f"{fast['best_test_acc']:.1%} after {fast['train_s']:.0f} s, {fast['epochs_run']} epochs "
            f"({fast['stopped']}; {recipe})")
    return Row("ResNet-32 training to 92.5 %", ours,
               f"paper recipe: {b.units['clean_epoch']:.1f} s/epoch x {paper['schedule_epochs']} = {paper_total:.0f} s",
               paper_total / fast["time_to_target_s"] if reached else None, "92.5 % in < 120 s",
               reached and fast["time_to_target_s"] < 120,
               f"best test accuracy {fast['best_test_acc']:.4f} (target {target}; {fast['data']})", reached)


def _robust_image_step(b: Bench) -> float:
    """Seconds per image and PGD step at a robust surface point: a robust line of ours (notebook 04's
    attack, PGD re-run at every point, points per forward auto), after a warm-up."""
    s = b.sizes
    x, y = b.data(s.n_robust)
    attack = functools.partial(pgd, eps=8 / 255, steps=s.robust_steps, seed=0)
    d = random_directions(b.model, 1, seed=b.args.seed)
    line(b.model, d, x, y, resolution=2, attack=attack)  # warm-up
    _, t = timed(lambda: line(b.model, d, x, y, resolution=s.robust_points, attack=attack), b.device)
    return t / (s.robust_points * len(y) * s.robust_steps)


def paper_row(b: Bench) -> tuple[Row, str]:
    """Times a ResNet-18 PGD-7 training step, then projects the paper profile with this run's unit costs."""
    from advkit.training.objectives import get_objective

    s, dev = b.sizes, b.device
    missing = [k for k in ("clean_epoch", "clean_point", "attack_image_step", "hvp") if k not in b.units]
    if missing:
        return Row("paper profile, projected", "needs the rows surface, pgd, hessian, train", "-", None, "< 1 h",
                   None, f"missing unit costs: {', '.join(missing)}", None), ""
    model = get_model(s.at_arch, 10, 3).to(dev)
    if b.gpu:  # as fit trains (TrainConfig.channels_last)
        model = model.to(memory_format=torch.channels_last)
    xb = b.x[:s.at_batch].to(dev)
    yb = b.y[:s.at_batch].to(dev)
    values = load_profile("paper")
    at = get_objective("pgd_at", steps=values["at_steps"])
    at_steps = _steps_per_second(model, lambda m, x, y: at(m, x, y), xb, yb, s.timed_steps, dev)
    b.units["at_epoch"] = math.ceil(50_000 / s.at_batch) / at_steps
    b.units["robust_image_step"] = _robust_image_step(b)
    r32 = plan.UnitCosts(train=b.units["clean_epoch"] / 50_000, attack=b.units["attack_image_step"],
                         point=b.units["clean_point"] / 10_000, hvp=b.units["hvp"] / 1000,
                         stadv=b.units["attack_image_step"])  # stAdv iteration: counted as a PGD step
    r18 = b.units["at_epoch"] / (values["at_steps"] + 1) / b.units["clean_epoch"]  # ResNet-18 over ResNet-32
    units = {"resnet32": r32, values["at_model"]: plan.UnitCosts(
        **{k: getattr(r32, k) * r18 for k in plan.KINDS}, at={"pgd_at": b.units["at_epoch"] / 50_000})}
    costs = plan.Costs(b.device.type, "this run", "cifar10", units, {})
    items = plan.project(values, costs)
    total = sum(it.seconds for it in items)
    per_nb = ", ".join(f"{nb}: {sec / 3600:.2f} h" for nb, sec in plan.by_notebook(items).items())
    unit_text = (", ".join(f"{k} {getattr(r32, k):.3g}" for k in plan.KINDS)
                 + f"; ResNet-18 x {r18:.3g}; robust image-step {b.units['robust_image_step']:.3g}")
    row = Row("paper profile (advkit/pipeline/profiles/paper.yaml), projected", f"{total / 3600:.2f} h ({per_nb})", "-",
              None, "< 1 h", total < 3600, f"unit costs (s per image): {unit_text}", None)
    return row, plan.budget_table(items)


# --- the run ---------------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> tuple[str, str, list[str]]:
    """(header, markdown body) of the RESULTS.md entry, and the rows that failed (each is reported in the
    table with its error; the others still run)."""
    sizes = SMOKE if args.smoke else Sizes()
    if args.train_seconds is not None:
        sizes = dataclasses.replace(sizes, train_seconds=args.train_seconds)
    start = time.perf_counter()
    b = Bench(args, sizes)
    print(f"speed_table: {b.weights}; {b.source} images; device {b.device}", flush=True)
    rows: list[Row] = []
    budget, failed = "", []

    def paper() -> None:
        nonlocal budget
        row, budget = paper_row(b)
        rows.append(row)

    steps = {"surface": lambda: rows.extend(surface_rows(b)), "pgd": lambda: rows.extend(pgd_row(b)),
             "hessian": lambda: rows.extend(hessian_rows(b)), "train": lambda: rows.append(train_row(b)),
             "paper": paper}
    for name in (r for r in ROWS if r in args.rows):
        t0 = time.perf_counter()
        try:
            steps[name]()
        except Exception as err:  # noqa: BLE001 - one failing row must not lose the others' measurements
            traceback.print_exc()
            failed.append(name)
            rows.append(Row(name, f"failed: {type(err).__name__}: {str(err)[:200]}", "-", None, "-", None, "-", None))
        print(f"speed_table: {name} done in {time.perf_counter() - t0:.0f} s", flush=True)
    header = (f"{run_header(b.device)}; model: {b.weights}; data: {b.source}; "
              f"{'smoke sizes' if args.smoke else 'issue 12 sizes'}: {dataclasses.asdict(sizes)}; "
              f"wall {time.perf_counter() - start:.0f} s for the whole table (data loading included)")
    body = table(rows)
    if budget:
        body += "\n\nPaper profile, projected from this run's unit costs (advkit.pipeline.plan):\n\n" + budget
    for title, prof in b.profiles:
        body += f"\n\nProfile of {title}:\n\n{prof}"
    return header, body, failed


def main(argv: list[str] | None = None) -> int:
    """Exit status 1 when a row failed (after the table, with the failure, is written)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny sizes (CPU, < 90 s)")
    ap.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {','.join(ROWS)}")
    ap.add_argument("--data-dir", default=None, help="CIFAR-10 folder (else random CIFAR-shaped images)")
    ap.add_argument("--checkpoint", default=None, help="a trained ResNet-32 (advkit.runs.checkpoints.save_model)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--compile", action="store_true", help="torch.compile ours where it has the option")
    ap.add_argument("--profile", action="store_true", help="torch.profiler over our surface and PGD")
    ap.add_argument("--train-seconds", type=float, default=None, help="cap of the training row (default 150)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--results", default=str(RESULTS), help="markdown file to append to ('': print only)")
    args = ap.parse_args(argv)
    args.rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = sorted(set(args.rows) - set(ROWS))
    if unknown or not args.rows:
        ap.error(f"--rows: unknown {unknown}; choose from {','.join(ROWS)}")
    header, body, failed = run(args)
    title = "Speed table (issue 12)" + (", CPU smoke sizes" if args.smoke else "")
    print(append_results(title, header, body, Path(args.results)) if args.results
          else results_entry(title, header, body))
    if failed:
        print(f"speed_table: failed rows: {', '.join(failed)} (tracebacks above)", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
