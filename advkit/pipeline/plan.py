"""A run's cost before it starts: unit costs (measured here, or recorded on another device) times the
run's counts, notebook by notebook: `python -m advkit plan --profile P [-p k=v ...] [--only ...]`.

`project(values, costs)` is the one place the counting lives. A unit cost is seconds per image of one
kind of work for one architecture at the run's input shape (`UnitCosts`): a clean training step, a PGD
step (forward and input gradient), a loss forward (surface point, clean evaluation), a Hessian-vector
product, an stAdv iteration, and an adversarial training step per objective. A notebook also pays a
fixed overhead (kernel start, imports, data loading, figures; `Costs.overhead`).

Counted per notebook: 01 the base model's training and its per-epoch test evaluation (or loading a
pretrained checkpoint and its clean evaluation); 02 the attack tables (FGSM, PGD, stAdv), the stAdv
flow sweep, the accuracy-vs-eps curves, AutoAttack (APGD-T on half the images, an assumption: it runs
on the points APGD-CE left robust) and its PGD check; 03 Xu et al.'s augmentation sets and fine-tunes
(twice the training set per epoch), adversarial training per variant, Stutz et al.'s per-epoch robust
evaluation, the zoo attack tables; 04 the 2D grid and line, the robust line and grid, the sensitivity
lines, interpolations, the direction replicates, the Hessian eigenvalue maps; 05 per model RLoss, RErr,
flatness, Hessian eigenvalue and trace, then the confidence, Walter et al., scale-invariance and
robust-split analyses. Left out: SSIM, BatchNorm recalibration forwards, the curvature bridge's few
HVPs and notebook 05's correlations (small beside the rest at any profile).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import platform
import subprocess
import sys
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

import yaml

REFERENCES_DIR = Path(__file__).parent / "plan_references"
NOTEBOOKS = ("01", "02", "03", "04", "05")
# images per split and input shape of each dataset (advkit.data), so that counting needs no torch
DATASETS = {"cifar10": {"train": 50_000, "test": 10_000, "shape": (3, 32, 32)},
            "digits": {"train": 1437, "test": 360, "shape": (1, 8, 8)}}
FAST_EPOCHS = 40  # advkit.training.fit.FAST_RECIPE's epochs (notebook 01's recipe="fast")
# adversarial training step over (clean step + K PGD steps) where not measured: an extra forward (TRADES,
# MART) or a weight-ascent step (AWP)
OBJECTIVE_FACTOR = {"trades": 1.04, "mart": 1.04, "awp": 1.11}
KINDS = ("train", "attack", "point", "hvp", "stadv")
# stAdv's L-BFGS (torch.optim.LBFGS, max_iter = steps) stops once its loss stalls, which on a trained model
# happens well before `steps`; measured on an untrained one it runs them all. The plan counts this fraction.
STADV_ITERATIONS_RUN = 0.5
NEEDS = {"01": {"train", "point"}, "02": {"attack", "stadv", "point"}, "03": {"train", "attack", "stadv", "point"},
         "04": {"attack", "point", "hvp", "surface"}, "05": {"attack", "point", "hvp"}}  # what each notebook uses
MEASURE_IMAGES = (8, 512)  # images per timed attack step, surface point and HVP: n_eval, within these bounds
FORWARD_S = 0.3  # at most about this many seconds per timed forward while measuring


@dataclass(frozen=True)
class UnitCosts:
    """Seconds per image of each kind of work, for one architecture at one input shape.

    train: a clean training step (forward, backward, SGD step) at the run's batch size; attack: a PGD
    step; point: a loss forward (a surface point, a clean evaluation); hvp: a Hessian-vector product;
    stadv: an stAdv L-BFGS iteration; at: {objective: an adversarial training step at the run's
    at_steps}, where measured (else (train + K x max(train, attack)) x OBJECTIVE_FACTOR: an attack step at the
    training batch costs about a training step, as a small batch leaves a GPU launch-bound); surface and row: seconds
    per landscape file and per row it writes (a 2D row, a 1D point: directions, file, progress), whatever
    its images.
    """

    train: float
    attack: float
    point: float
    hvp: float
    stadv: float
    at: Mapping[str, float] = field(default_factory=dict)
    surface: float = 0.0
    row: float = 0.0

    def __post_init__(self) -> None:
        for name, value in ([(k, getattr(self, k)) for k in (*KINDS, "surface", "row")]
                            + [(f"at[{k}]", v) for k, v in self.at.items()]):
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"unit cost {name} must be a finite number of seconds >= 0, got {value!r}")

    def at_step(self, objective: str, steps: int) -> tuple[float, bool]:
        """(seconds per image of an adversarial training step, measured?)."""
        if objective in self.at:
            return self.at[objective], True
        k = 1 if objective == "fgsm_rs" else steps
        return (self.train + k * max(self.train, self.attack)) * OBJECTIVE_FACTOR.get(objective, 1.0), False


@dataclass(frozen=True)
class Costs:
    """Everything a plan multiplies: `units` by architecture, `overhead` seconds per notebook, where they
    come from (`source`) and what they assume (`notes`), for `dataset`'s input shape."""

    device: str
    source: str
    dataset: str
    units: Mapping[str, UnitCosts]
    overhead: Mapping[str, float]
    notes: tuple[str, ...] = ()

    def unit(self, arch: str) -> UnitCosts:
        if arch not in self.units:
            raise ValueError(f"the unit costs of {self.device} ({self.source}) have no {arch} on {self.dataset}; "
                             f"they have {sorted(self.units)} (plan without --reference to measure this device)")
        return self.units[arch]


@dataclass(frozen=True)
class Item:
    notebook: str
    work: str
    count: float  # units of `unit`
    unit: str
    seconds: float


# ---------------------------------------------------------------- counting
def _models(values: Mapping[str, Any]) -> dict[str, list[str]]:
    """The run's models by role: base, xu (fine-tunes), at (final), at_epochs (kept copies)."""
    parts = values.get("zoo_parts") or ["xu", "at", "report"]
    xu = list(values["xu_attacks"]) if "xu" in parts else []
    at = list(values["at_variants"]) if "at" in parts else []
    epochs = [f"{v}_e{e:03d}" for v in at for e in values["keep_epochs"]]
    return {"base": ["base"], "xu": xu, "at": at, "at_epochs": epochs}


def objective_of(spec: str) -> str:
    """The objective of an adversarial training variant spec (`trades+b3` -> `trades`), torch-free."""
    return spec.split("+")[0]


def project(values: Mapping[str, Any], costs: Costs, only: Sequence[str] | None = None) -> list[Item]:
    """The run's work as `Item`s (seconds = count x unit cost), notebook overheads included; `only`
    keeps those notebooks. See the module docstring for what is counted."""
    v = values
    ds = DATASETS[v["dataset"]]
    base_arch, at_arch = v["model"], v["at_model"] or v["model"]
    ub, ua = costs.unit(base_arch), (costs.unit(at_arch) if v["at_variants"] else costs.unit(base_arch))
    n_train = min(v["n_train"] or ds["train"], ds["train"])
    n_test = ds["test"]
    m = _models(v)
    items: list[Item] = []

    def add(nb: str, work: str, count: float, unit: str, seconds_each: float) -> None:
        items.append(Item(nb, work, count, unit, count * seconds_each))

    def robust_point(n: int, u: UnitCosts) -> float:  # PGD-`pgd_steps` at a point, then the loss
        return n * (v["pgd_steps"] * u.attack + u.point)

    stadv = ub.stadv * STADV_ITERATIONS_RUN  # per image and stAdv step of the base architecture
    for nb in NOTEBOOKS:
        add(nb, "overhead: kernel start, imports, data, figures", 1, "notebook", costs.overhead.get(nb, 0.0))
    # 01 base model
    if v["pretrained_checkpoint"]:
        add("01", f"pretrained {base_arch}: clean test evaluation", n_test, "images", ub.point)
    else:
        epochs = FAST_EPOCHS if v.get("recipe") == "fast" else v["epochs"]
        add("01", f"{base_arch} training ({v.get('recipe', 'paper')} recipe), {epochs} epochs x {n_train} images",
            epochs * n_train, "image-steps", ub.train)
        add("01", f"test evaluation after each of {epochs} epochs", epochs * n_test, "images", ub.point)
    # 02 attacks on the base model
    n_eval, n_aa = min(v["n_eval"], n_test), min(v["n_autoattack"], v["n_eval"], n_test)
    add("02", "attack tables: FGSM, PGD", n_eval * (1 + v["xu_pgd_steps"]), "image-steps", ub.attack)
    add("02", "attack tables: stAdv", n_eval * v["stadv_steps"], "stAdv image-iterations", stadv)
    add("02", f"stAdv flow sweep ({len(v['stadv_flow_grid'])} bounds)",
        n_eval * len(v["stadv_flow_grid"]) * v["stadv_steps"], "stAdv image-iterations", stadv)
    add("02", f"accuracy vs eps ({len(v['eps_grid'])} eps, FGSM + PGD)",
        n_eval * len(v["eps_grid"]) * (1 + v["xu_pgd_steps"]), "image-steps", ub.attack)
    add("02", "AutoAttack (APGD-T on half) + PGD check",
        n_aa * (v["aa_steps"] * (1 + v["aa_targets"] / 2) + v["xu_pgd_steps"]), "image-steps", ub.attack)
    # 03 zoo
    xu_steps = {"fgsm": (1, ub.attack), "pgd": (v["xu_pgd_steps"], ub.attack), "stadv": (v["stadv_steps"], stadv)}
    for attack in m["xu"]:
        steps, each = xu_steps.get(attack, (1, ub.attack))
        add("03", f"Xu augmentation set {attack}", n_train * steps, "image-steps", each)
    add("03", f"Xu fine-tunes ({len(m['xu'])}), {v['finetune_epochs']} epochs x 2 x {n_train} images",
        len(m["xu"]) * v["finetune_epochs"] * 2 * n_train, "image-steps", ub.train)
    add("03", "Xu fine-tunes: test evaluation per epoch", len(m["xu"]) * v["finetune_epochs"] * n_eval, "images",
        ub.point)
    for spec in m["at"]:
        each, measured = ua.at_step(objective_of(spec), v["at_steps"])
        add("03", f"AT {spec} ({at_arch}), {v['at_epochs']} epochs x {n_train} images"
            + ("" if measured else " (derived: K + 1 training steps)"), v["at_epochs"] * n_train, "image-steps", each)
    robust_eval = (v["n_robust_train"] + v["n_robust_test"]) * v["epoch_steps"] + v["n_val"] * v["early_stop_steps"]
    add("03", "per-epoch robust evaluation (Stutz et al.)", len(m["at"]) * v["at_epochs"] * robust_eval, "image-steps",
        ua.attack)
    clean_eval = v["n_robust_train"] + v["n_robust_test"] + v["n_val"] + n_eval
    add("03", "per-epoch clean evaluation", len(m["at"]) * v["at_epochs"] * clean_eval, "images", ua.point)
    if "report" in (v.get("zoo_parts") or ["report"]):
        table = n_eval * (1 + v["xu_pgd_steps"])
        n_at = len(m["at"]) * 2 + len(m["at_epochs"])
        add("03", f"zoo attack tables: FGSM, PGD ({len(m['xu']) + 1} {base_arch})", table * (len(m["xu"]) + 1),
            "image-steps", ub.attack)
        add("03", f"zoo attack tables: stAdv ({len(m['xu']) + 1} {base_arch})",
            n_eval * v["stadv_steps"] * (len(m["xu"]) + 1), "stAdv image-iterations", stadv)
        add("03", f"zoo attack tables: FGSM, PGD ({n_at} AT {at_arch})", table * n_at, "image-steps", ua.attack)
        add("03", f"zoo attack tables: stAdv ({n_at} AT {at_arch})", n_eval * v["stadv_steps"] * n_at,
            "stAdv image-iterations", ua.stadv * STADV_ITERATIONS_RUN)
    # 04 landscapes: every non-epoch model
    n_img = min(v["n_images"], n_test)
    rn = min(v["robust_n_images"] or n_img, n_img)
    groups = ((ub, 1 + len(m["xu"]), f"{1 + len(m['xu'])} {base_arch}"),
              (ua, 2 * len(m["at"]), f"{2 * len(m['at'])} AT {at_arch}"))
    spans = sum(len(v["sensitivity_none_radii"] if n == "none" else v["sensitivity_radii"])
                for n in v["sensitivity_norms"])
    for u, count, label in groups:
        add("04", f"{label}: 2D grid {v['resolution']}^2 + line {v['line_resolution']}",
            count * (v["resolution"] ** 2 + v["line_resolution"]) * n_img, "point-images", u.point)
        if v["robust"]:
            pts = v["line_resolution"] + v["robust_resolution"] ** 2
            grid = f" + grid {v['robust_resolution']}^2" if v["robust_resolution"] else ""
            add("04", f"{label}: robust line{grid} (PGD-{v['pgd_steps']})",
                count * pts, "robust points", robust_point(rn, u))
        add("04", f"{label}: sensitivity lines ({spans} spans)", count * spans * v["sensitivity_resolution"] * n_img,
            "point-images", u.point)
    for u, count, label in groups:  # landscape files: the grid, the line (and the robust grid), the sensitivity lines
        files = count * (2 + (1 if v["robust"] and v["robust_resolution"] else 0) + spans)
        rows = count * (v["resolution"] + v["line_resolution"] + v["sensitivity_resolution"] * spans
                        + (v["robust_resolution"] if v["robust"] else 0))
        add("04", f"{label}: {files} surface files", files, "files", u.surface)
        add("04", f"{label}: their {rows} rows", rows, "rows", u.row)
    same_arch = len(m["xu"]) + (2 * len(m["at"]) if at_arch == base_arch else 0)
    add("04", f"interpolation files from base ({same_arch})", same_arch, "files",
        ub.surface + v["line_resolution"] * ub.row)
    add("04", "interpolations from base", same_arch * v["line_resolution"] * n_img, "point-images", ub.point)
    rep_n = min(v["replicate_n_images"], n_img)
    rep_points = sum(v["replicate_resolution"] ** d for d in v["replicate_dims"]) * v["direction_replicates"]
    # the ordering replicates (filter, clean + robust), then the sweep: each other normalization, plus filter
    # with BatchNorm included / recalibrated (advkit.landscape.replicates.BN_VARIANTS; the filter surfaces are reused)
    sweep = len([n for n in v["replicate_norms"] if n != "filter"]) + 2
    robust_surfaces = 1 + (sweep if v["replicate_robust"] == "all" else 0)
    for u, count in ((ub, 1 + len(m["xu"])), (ua, len(m["at"]))):
        add("04", f"replicates, {count} final models x {1 + sweep} surfaces",
            count * (1 + sweep) * rep_points * rep_n, "point-images", u.point)
        files = count * (1 + sweep) * len(v["replicate_dims"]) * v["direction_replicates"]
        add("04", f"replicates: {files} surface files", files, "files",
            u.surface + v["replicate_resolution"] * u.row)
        if v["robust"]:
            add("04", f"replicates robust, {count} final models x {robust_surfaces} surfaces",
                count * robust_surfaces * rep_points, "robust points", robust_point(rep_n, u))
    known = set(sum(m.values(), []))
    for name in [n for n in v["eigen_map_models"] if n in known]:
        u = ub if name == "base" or name in m["xu"] else ua
        pts = v["eigen_map_resolution"] ** 2
        n_c = min(v["curvature_images"], n_img)
        losses = 2 if v["robust"] else 1
        add("04", f"eigenvalue map {name} ({losses} losses)", pts * v["eigen_map_steps"] * losses * n_c,
            "HVP-images", u.hvp)
        if v["robust"]:
            add("04", f"eigenvalue map {name}: PGD per point", pts * n_c * v["pgd_steps"], "image-steps", u.attack)
    # 05 flatness table: every model, epoch copies included, on n_subset train and n_subset test images
    n_s = min(v["n_subset"], n_test)
    per_model = 2 * n_s * (v["pgd_steps"] * (v["pgd_restarts"] + v["flatness_samples"]) + v["worst_steps"])
    per_model += 2 * min(v["n_autoattack"], n_s) * v["aa_steps"] * (1 + v["aa_targets"] / 2)
    per_model_hvp = (v["hessian_iters"] + v["hessian_samples"]) * n_s
    for u, count, arch in ((ub, 1 + len(m["xu"]), base_arch), (ua, 2 * len(m["at"]) + len(m["at_epochs"]), at_arch)):
        add("05", f"{count} {arch}: RLoss, RErr (AutoAttack), flatness", count * per_model, "image-steps", u.attack)
        add("05", f"{count} {arch}: Hessian eigenvalue + trace", count * per_model_hvp, "HVP-images", u.hvp)
        add("05", f"{count} {arch}: robust split (PGD)", count * n_s * v["pgd_steps"], "image-steps", u.attack)
    n_walter = 1 + (1 if m["at"] else 0)
    n_w = min(64, n_s)  # Walter et al.: 5 eps, the path, 4 rescalings, 2 transfers, each a PGD
    add("05", "confidence flatness + Walter et al. (PGD)",
        n_s * v["pgd_steps"] + n_walter * n_w * v["pgd_steps"] * 12, "image-steps", ub.attack)
    n_inv = min(v["invariance_images"], n_s)  # base and two rescalings of it
    add("05", "scale-invariance audit", 3 * n_inv * (v["flatness_samples"] * v["pgd_steps"] + v["worst_steps"]),
        "image-steps", ub.attack)
    add("05", "scale-invariance audit: Hessian", 3 * n_inv * v["hessian_iters"], "HVP-images", ub.hvp)
    picked = set(only) if only is not None else set(NOTEBOOKS)
    return [it for it in items if it.count > 0 and it.notebook in picked]


def by_notebook(items: Sequence[Item]) -> dict[str, float]:
    """{notebook: seconds}, in notebook order."""
    out: dict[str, float] = {}
    for it in items:
        out[it.notebook] = out.get(it.notebook, 0.0) + it.seconds
    return dict(sorted(out.items()))


def largest(items: Sequence[Item], n: int = 3) -> list[Item]:
    return sorted(items, key=lambda it: -it.seconds)[:n]


def hours(seconds: float) -> str:
    return f"{seconds / 3600:.2f} h" if seconds >= 360 else f"{seconds:.0f} s"


def budget_table(items: Sequence[Item], goal_s: float = 3600.0) -> str:
    """Markdown: every item, a subtotal per notebook, the total against `goal_s`."""
    lines = ["| notebook | work | count | unit | projected s |", "|---|---|---:|---|---:|"]
    lines += [f"| {it.notebook} | {it.work} | {it.count:,.0f} | {it.unit} | {it.seconds:,.1f} |" for it in items]
    for nb, s in by_notebook(items).items():
        lines.append(f"| **{nb}** | subtotal | | | **{s:,.0f}** ({s / 3600:.2f} h) |")
    total = sum(it.seconds for it in items)
    met = "met" if total < goal_s else "not met"
    lines.append(f"| **all** | total vs goal {goal_s / 3600:g} h | | | "
                 f"**{total:,.0f}** ({total / 3600:.2f} h, {met}) |")
    return "\n".join(lines)


def plan_text(items: Sequence[Item], costs: Costs, archs: Sequence[str] | None = None) -> str:
    """Per notebook: its hours and its three largest items; then the total, the source of the costs and
    what they assume (of `archs`, the run's architectures, when given)."""
    lines = [f"unit costs: {costs.device} ({costs.source})"]
    for nb, s in by_notebook(items).items():
        lines.append(f"\n{nb}: {hours(s)}")
        for it in largest([it for it in items if it.notebook == nb]):
            lines.append(f"  {it.seconds:>10,.1f} s  {it.work} ({it.count:,.0f} {it.unit})")
    total = sum(it.seconds for it in items)
    lines.append(f"\ntotal: {hours(total)} ({total:,.0f} s)")
    lines += [f"note: {n}" for n in costs.notes
              if archs is None or n.split(":")[0] not in costs.units or n.split(":")[0] in archs]
    return "\n".join(lines)


def summary_line(items: Sequence[Item]) -> str:
    total = sum(it.seconds for it in items)
    per = ", ".join(f"{nb} {hours(s)}" for nb, s in by_notebook(items).items())
    return f"plan: {hours(total)} ({per})"


# ---------------------------------------------------------------- recorded unit costs
def references() -> list[str]:
    return sorted(p.stem for p in REFERENCES_DIR.glob("*.yaml"))


def reference_costs(name: str, dataset: str) -> Costs:
    """The recorded unit costs `plan_references/<name>.yaml` for `dataset`: each number dated and sourced;
    an architecture never measured there is a multiple of a measured one (`scale_of`, `factor`), stated."""
    if name not in references():
        raise ValueError(f"--reference {name!r}: no such reference; choose one of {references()}")
    doc = yaml.safe_load((REFERENCES_DIR / f"{name}.yaml").read_text())
    per = doc["datasets"].get(dataset)
    if per is None:
        raise ValueError(f"--reference {name}: no unit costs for dataset {dataset!r} "
                         f"(it has {sorted(doc['datasets'])})")
    units, notes = {}, list(doc.get("notes", []))
    for arch, entry in per["architectures"].items():
        if "scale_of" in entry:
            continue
        units[arch] = UnitCosts(**{k: float(entry[k]["seconds"]) for k in KINDS},
                                at={k: float(e["seconds"]) for k, e in (entry.get("at") or {}).items()})
    for arch, entry in per["architectures"].items():
        if "scale_of" in entry:
            u, f = units[entry["scale_of"]], float(entry["factor"])
            units[arch] = UnitCosts(**{k: getattr(u, k) * f for k in KINDS}, at={k: s * f for k, s in u.at.items()})
            notes.append(f"{arch}: {entry['note']}")
    overhead = {nb: float(per["overhead"]["seconds"]) for nb in NOTEBOOKS}
    notes.append(f"notebook overhead: {per['overhead']['note']}")
    return Costs(doc["device"], f"reference {name}, {doc['date']}", dataset, units, overhead, tuple(notes))


# ---------------------------------------------------------------- measuring this device
def measure_key(values: Mapping[str, Any], only: Sequence[str] | None = None) -> dict[str, Any]:
    """What measured unit costs depend on: the architectures, the input shape, batch sizes, the
    adversarial objectives and their steps, the device and thread count."""
    archs = sorted({values["model"], values["at_model"] or values["model"]})
    objectives = sorted({objective_of(s) for s in values["at_variants"]}) if _needs(only, "03") else []
    needs = {**NEEDS, **({"01": {"point"}} if values["pretrained_checkpoint"] else {})}  # loaded, not trained
    kinds = sorted(set().union(*(needs[nb] for nb in NOTEBOOKS if _needs(only, nb))))
    return {"dataset": values["dataset"], "archs": archs, "kinds": kinds, "batch_size": values["batch_size"],
            "at_batch_size": values["at_batch_size"], "objectives": objectives, "at_steps": values["at_steps"],
            "n_eval": values["n_eval"], "device": values.get("device", "auto"), "threads": values.get("threads"),
            "host": platform.node(), "python": sys.version.split()[0]}


def _needs(only: Sequence[str] | None, nb: str) -> bool:
    return only is None or nb in only


def measure(values: Mapping[str, Any], only: Sequence[str] | None = None, steps: int = 3) -> Costs:
    """This device's unit costs for the run: a few timed steps of each kind of work on the run's real
    architectures at its input shape (random images; one warm-up step each, not timed), and the
    notebook overhead: a fresh interpreter importing what the notebooks import, and loading the data."""
    import torch

    from advkit.attacks.pgd import pgd
    from advkit.attacks.stadv import stadv
    from advkit.models import get_model
    from advkit.runs.run import resolve_device
    from advkit.training.variants import variant_objective

    ds = DATASETS[values["dataset"]]
    dev = resolve_device(values.get("device", "auto"))
    key = measure_key(values, only)
    threads_before = torch.get_num_threads()
    if values.get("threads"):
        torch.set_num_threads(values["threads"])
    rng_state = torch.random.get_rng_state()
    torch.manual_seed(0)
    units = {}
    try:
        for arch in key["archs"]:
            net = get_model(arch, 10, ds["shape"][0]).to(dev)
            # images per timed call: as many as the run's attacks see (n_eval, within MEASURE_IMAGES), fewer where
            # a forward of them would take over FORWARD_S (a ResNet on a CPU), so that measuring stays short
            probe = torch.rand(MEASURE_IMAGES[0], *ds["shape"], device=dev)
            with torch.no_grad():
                net.eval()
                net(probe)  # warm-up
                t0 = time.perf_counter()
                net(probe)
                per_image = (time.perf_counter() - t0) / len(probe)
            n = int(min(max(FORWARD_S / max(per_image, 1e-9), MEASURE_IMAGES[0]), values["n_eval"], MEASURE_IMAGES[1]))
            n = max(n, min(values["n_eval"], MEASURE_IMAGES[0]))
            reps, pgd_steps = (steps, 5) if per_image * n < FORWARD_S / 2 else (1, 2)
            # the timed batches stay within max(n, 8) images, so an absurd batch_size allocates no more than they use
            batch, at_batch = min(values["batch_size"], max(n, 8)), min(values["at_batch_size"], max(n, 8))
            x = torch.rand(max(batch, at_batch, n), *ds["shape"], device=dev)
            y = torch.randint(0, 10, (len(x),), device=dev)

            def timed(fn, n: int = reps) -> float:
                fn()  # warm-up
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                t0 = time.perf_counter()
                for _ in range(n):
                    fn()
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                return (time.perf_counter() - t0) / n

            def train_step(objective, batch: int):
                opt = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9)

                def step():
                    net.train()
                    loss = objective(net, x[:batch], y[:batch])
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    if hasattr(objective, "after_backward"):  # as fit calls them: AWP restores its weights
                        objective.after_backward(net)
                    opt.step()
                    if hasattr(objective, "after_step"):
                        objective.after_step(net)
                return step

            kinds, cost = key["kinds"], dict.fromkeys(KINDS, 0.0)  # a kind no picked notebook uses stays 0
            if "train" in kinds:
                clean = train_step(lambda m, a, b: torch.nn.functional.cross_entropy(m(a), b), batch)
                cost["train"] = timed(clean) / batch
            net.eval()
            xm, ym = x[:n], y[:n]
            if "attack" in kinds:
                cost["attack"] = timed(lambda: pgd(net, xm, ym, eps=8 / 255, steps=pgd_steps), 1) / pgd_steps / n
            if "point" in kinds:
                with torch.no_grad():
                    cost["point"] = timed(lambda: torch.nn.functional.cross_entropy(net(xm), ym)) / n
            if "hvp" in kinds:
                weights = [p for p in net.parameters() if p.requires_grad]
                vec = [torch.randn_like(p) for p in weights]

                def hvp():
                    grads = torch.autograd.grad(torch.nn.functional.cross_entropy(net(xm), ym), weights,
                                                create_graph=True)
                    torch.autograd.grad(grads, weights, vec)
                cost["hvp"] = timed(hvp) / n
            if "stadv" in kinds:
                k = min(32, n)
                cost["stadv"] = timed(lambda: stadv(net, xm[:k], ym[:k], steps=pgd_steps), 1) / pgd_steps / k
            if "surface" in kinds:
                cost["surface"], cost["row"] = measure_surface(net, xm[:2], ym[:2])
            at = {}
            if arch == (values["at_model"] or values["model"]):
                for obj in key["objectives"]:
                    objective = variant_objective(obj, eps=values["at_eps"], steps=values["at_steps"])
                    at[obj] = timed(train_step(objective, at_batch), 1) / at_batch
            units[arch] = UnitCosts(**{k: cost[k] for k in KINDS}, at=at, surface=cost.get("surface", 0.0),
                                    row=cost.get("row", 0.0))
    finally:
        torch.set_num_threads(threads_before)
        torch.random.set_rng_state(rng_state)
    overhead = measure_overhead(values)
    name = (torch.cuda.get_device_name(dev) if dev.type == "cuda"
            else f"CPU, {torch.get_num_threads() if not values.get('threads') else values['threads']} thread(s) of "
                 f"{os.cpu_count()} cores")
    notes = ("unit costs on random images and an untrained model at the run's input shape; AutoAttack's targeted "
             f"runs assumed on half the images, stAdv's L-BFGS to run {STADV_ITERATIONS_RUN:.0%} of its iterations",)
    return Costs(name, f"measured {date.today().isoformat()}", values["dataset"], units,
                 {nb: overhead for nb in NOTEBOOKS}, notes)


def measure_surface(net: Any, x: Any, y: Any) -> tuple[float, float]:
    """(seconds per landscape file, per row it writes), beside its points' losses: 1D lines on two images
    written to files, at 2 and 12 points (one warm-up line first)."""
    import tempfile

    from advkit.landscape.directions import random_directions
    from advkit.landscape.surfaces import line as surface_line

    with tempfile.TemporaryDirectory(prefix="advkit-plan-") as tmp:
        def line(points: int, seed: int) -> float:
            t0 = time.perf_counter()
            surface_line(net, random_directions(net, 1, seed=seed), x, y, resolution=points,
                         path=Path(tmp) / f"{seed}.nc")
            return time.perf_counter() - t0

        line(2, 0)
        short, long_ = line(2, 1), line(12, 2)
    row = max(long_ - short, 0.0) / 10
    return max(short - 2 * row, 0.0), row


NOTEBOOK_IMPORTS = ("import torch, pandas, matplotlib.pyplot, ipykernel, advkit.plots.figures, "
                    "advkit.attacks.evaluate, advkit.landscape.surfaces, advkit.studies.zoo")


def measure_overhead(values: Mapping[str, Any]) -> float:
    """Seconds a notebook spends outside the counted work: a fresh interpreter importing what the notebooks
    import and loading the run's data, times OVERHEAD_FACTOR for the kernel's start and the figures (calibrated
    by benchmarks/plan_accuracy.py)."""
    t0 = time.perf_counter()
    code = (f"{NOTEBOOK_IMPORTS}\nfrom advkit.data import get_dataset\ntry:\n    get_dataset({values['dataset']!r}, "
            f"{values.get('data_dir')!r}, download=False)\nexcept Exception:\n    pass")  # no data yet: imports only
    subprocess.run([sys.executable, "-c", code], capture_output=True)
    return OVERHEAD_FACTOR * (time.perf_counter() - t0)


OVERHEAD_FACTOR = 2.0


def cache_dir() -> Path:
    return Path(os.environ.get("ADVKIT_CACHE_DIR") or Path.home() / ".cache" / "advkit") / "plan"


def to_dict(costs: Costs) -> dict[str, Any]:
    return {**asdict(costs), "units": {a: {**asdict(u), "at": dict(u.at)} for a, u in costs.units.items()}}


def from_dict(doc: Mapping[str, Any]) -> Costs:
    return Costs(doc["device"], doc["source"], doc["dataset"], {a: UnitCosts(**u) for a, u in doc["units"].items()},
                 dict(doc["overhead"]), tuple(doc["notes"]))


def measured_costs(values: Mapping[str, Any], only: Sequence[str] | None = None, fresh: bool = False) -> Costs:
    """This device's unit costs for the run, measured once per device and settings (`measure_key`) and
    cached under ADVKIT_CACHE_DIR (default ~/.cache/advkit)/plan/."""
    key = measure_key(values, only)
    path = cache_dir() / (hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16] + ".json")
    if path.is_file() and not fresh:
        try:
            return from_dict(json.loads(path.read_text()))
        except (OSError, ValueError, KeyError, TypeError):
            pass  # an unreadable cache entry is measured again
    costs = measure(values, only)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps({**to_dict(costs), "key": key}, indent=1))
        tmp.replace(path)
    except OSError as err:  # the cache only saves measuring again: a read-only home must not stop the run
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        if str(path.parent) not in UNWRITABLE_CACHES:
            UNWRITABLE_CACHES.add(str(path.parent))
            warnings.warn(f"cannot write the plan's cost cache {path.parent} ({err.strerror or err}): the costs "
                          "are measured again by every run; set ADVKIT_CACHE_DIR to a writable folder",
                          RuntimeWarning, stacklevel=2)
    return costs


UNWRITABLE_CACHES: set[str] = set()  # cache folders already warned about (one warning each per process)


def costs_for(values: Mapping[str, Any], only: Sequence[str] | None = None, reference: str | None = None,
              fresh: bool = False) -> Costs:
    return reference_costs(reference, values["dataset"]) if reference else measured_costs(values, only, fresh)


def check_budget(items: Sequence[Item], budget_h: float | None) -> None:
    """ValueError naming the three largest items when the plan's total exceeds `budget_h` hours."""
    if budget_h is not None and not (math.isfinite(budget_h) and budget_h > 0):
        raise ValueError(f"--budget {budget_h:g}: give a number of hours > 0")
    total = sum(it.seconds for it in items)
    if budget_h is not None and total > budget_h * 3600:
        top = "; ".join(f"{it.notebook} {it.work}: {hours(it.seconds)}" for it in largest(items))
        raise ValueError(f"--budget {budget_h:g} h: the plan puts this run at {hours(total)}; largest items: {top}")


@dataclass(frozen=True)
class Request:
    """What `run` and `sweep` ask of the plan: `budget_h` hours at most (None: no limit), and the recorded
    unit costs `reference` (None: this device's, measured once and cached)."""

    budget_h: float | None = None
    reference: str | None = None

    def announce(self, runs: Sequence[Mapping[str, Any]], only: Sequence[str] | None, echo=print) -> list[Item]:
        """Plan one or more runs of notebooks `only` (a sweep's cells), print one line with the total and
        the hours per notebook, and refuse (ValueError) a plan above `budget_h` hours."""
        check_budget([], self.budget_h)  # a bad --budget is refused before anything is measured
        items: list[Item] = []
        for values in runs:
            items += project(values, costs_for(values, only, self.reference), only)
        echo(f"[advkit] {summary_line(items)}")
        check_budget(items, self.budget_h)
        return items


def budget_hours(text: str) -> float:
    """--budget's value, a finite number of hours > 0, checked when the arguments are parsed (before measuring)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"--budget {text}: give a number of hours > 0")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """--budget and --reference, shared by `run`, `sweep` and `plan`."""
    parser.add_argument("--reference", default=None, metavar="NAME",
                        help=f"plan with the recorded unit costs of another device ({', '.join(references())}) "
                             f"instead of measuring this one")
    parser.add_argument("--budget", type=budget_hours, default=None, metavar="HOURS",
                        help="refuse a run that the plan puts above this many hours")
