"""The plan against reality: `python -m advkit plan`'s seconds per notebook (measured on this device) beside
the wall time of the same run, notebook by notebook.

Cases (`--cases`, default both):
- quick: `make run`'s quick profile, every notebook;
- cifar02: the paper profile's notebook 02 on the shared pretrained ResNet-32, on CIFAR-10 with the counts cut
  so that it runs minutes on a CPU. The base model is saved into the run as notebook 01 saves a pretrained
  checkpoint, without 01's clean evaluation of the 10,000 test images (ten minutes on a loaded CPU).

Each case measures the unit costs afresh (its own cache folder, which the run then reuses, so the run does not
measure again), then runs the notebooks with `python -m advkit run` in temporary run and figure folders and
reads each notebook's "done in N s" line. Planned and measured should agree within +-35 % per notebook.

    python benchmarks/plan_accuracy.py --data-dir /tmp/cifar/cifar10-jpeg \\
        --checkpoint /work/shared/models/resnet32-d509ac18.th --results /tmp/r.md
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

import torch
from common import ROOT, add_output_args, publish, run_header  # first: puts the repository root on sys.path

from advkit.pipeline import driver as pipeline
from advkit.pipeline import plan

TOLERANCE = 0.35
SAVE_PRETRAINED = """
from advkit.models import IMAGENET_MEAN, IMAGENET_STD, get_model, load_akamaster_checkpoint
from advkit.runs import Run, save_model
net = get_model({model!r}, 10, 3, mean=IMAGENET_MEAN, std=IMAGENET_STD)
net.load_state_dict(load_akamaster_checkpoint({path!r}, depth=int({model!r}[6:])).state_dict())
save_model(Run.named({run!r}).model("base"), net, {{"pretrained_checkpoint": {path!r}}})
"""  # what notebook 01 does with a pretrained checkpoint, its clean evaluation aside
CIFAR02 = ["n_eval=32", "n_autoattack=32", "xu_pgd_steps=5", "aa_steps=5", "aa_targets=1", "stadv_steps=5",
           "stadv_flow_grid=[0.15,0.8]", "eps_grid=[0.0,0.0313725]", "device=cpu"]


def cases(args: argparse.Namespace) -> dict[str, tuple[str, list[str] | None, list[str]]]:
    """{name: (profile, only, -p assignments)}."""
    out = {"quick": ("quick", None, [])}
    if args.data_dir and args.checkpoint:
        out["cifar02"] = ("paper", ["02"], [f"data_dir={args.data_dir}", f"pretrained_checkpoint={args.checkpoint}",
                                            *CIFAR02])
    return {k: v for k, v in out.items() if k in args.cases.split(",")}


def compare(name: str, profile: str, only: list[str] | None, assignments: list[str]) -> list[dict]:
    """Plan (measured afresh), then run; one row per notebook."""
    with tempfile.TemporaryDirectory(prefix="advkit-plan-") as tmp:
        env = {**os.environ, "ADVKIT_CACHE_DIR": f"{tmp}/cache", "ADVKIT_RUNS_DIR": f"{tmp}/runs",
               "ADVKIT_FIGURES_DIR": f"{tmp}/figures"}
        os.environ["ADVKIT_CACHE_DIR"] = env["ADVKIT_CACHE_DIR"]
        values = pipeline.resolve_paths({**pipeline.load_profile(profile), **pipeline.parse_assignments(assignments)})
        t0 = time.perf_counter()
        items = plan.project(values, plan.measured_costs(values, only, fresh=True), only)
        measuring = time.perf_counter() - t0
        print(plan.plan_text(items, plan.measured_costs(values, only)), flush=True)
        if values["pretrained_checkpoint"] and only is not None and "01" not in only:
            subprocess.run([sys.executable, "-c", SAVE_PRETRAINED.format(run=values["run"], model=values["model"],
                                                                         path=values["pretrained_checkpoint"])],
                           cwd=ROOT, env=env, check=True)
        command = [sys.executable, "-m", "advkit", "run", "--profile", profile,
                   *(["--only", ",".join(only)] if only else []), *[a for p in assignments for a in ("-p", p)]]
        t0 = time.perf_counter()
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        print(done.stdout[-3000:], done.stderr[-3000:], flush=True)
        done.check_returncode()
    measured = {m[1][:2]: float(m[2]) for m in re.finditer(r"\[advkit\] (\d\d_\w+) done in (\d+) s", done.stdout)}
    rows = []
    for nb, planned in plan.by_notebook(items).items():
        real = measured.get(nb, float("nan"))
        rows.append({"case": name, "notebook": nb, "planned": planned, "measured": real, "ratio": planned / real,
                     "measuring": measuring, "wall": wall})
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| case | notebook | planned s | measured s | planned / measured | within +-35 % |",
             "|---|---|---:|---:|---:|---|"]
    for r in rows:
        ok = abs(r["ratio"] - 1) <= TOLERANCE
        lines.append(f"| {r['case']} | {r['notebook']} | {r['planned']:.0f} | {r['measured']:.0f} | {r['ratio']:.2f} | "
                     f"{'yes' if ok else 'no'} |")
    for case in dict.fromkeys(r["case"] for r in rows):
        rs = [r for r in rows if r["case"] == case]
        planned, real = sum(r["planned"] for r in rs), sum(r["measured"] for r in rs)
        lines.append(f"| {case} | all | {planned:.0f} | {real:.0f} | {planned / real:.2f} | "
                     f"{'yes' if abs(planned / real - 1) <= TOLERANCE else 'no'} |")
    notes = "; ".join(f"{c}: measuring the unit costs took {rs[0]['measuring']:.0f} s, the run {rs[0]['wall']:.0f} s"
                      for c in dict.fromkeys(r["case"] for r in rows)
                      for rs in [[r for r in rows if r["case"] == c]])
    return "\n".join(lines) + f"\n\n{notes}; CIFAR-10 case settings: {' '.join(CIFAR02)}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="quick,cifar02")
    ap.add_argument("--data-dir", default=None, help="extracted CIFAR-10 (the cifar02 case needs it)")
    ap.add_argument("--checkpoint", default=None, help="akamaster's ResNet-32 .th (the cifar02 case needs it)")
    ap.add_argument("--note", default="", help="added to the entry's header, e.g. how loaded the machine was")
    add_output_args(ap)
    args = ap.parse_args()
    rows = [r for name, (profile, only, assignments) in cases(args).items()
            for r in compare(name, profile, only, assignments)]
    header = f"{run_header(torch.device('cpu'))}; load average at the end {os.getloadavg()[0]:.1f}"
    publish("Plan vs measured wall time per notebook (benchmarks/plan_accuracy.py)",
            header + (f"; {args.note}" if args.note else ""), table(rows), args)


if __name__ == "__main__":
    main()
