"""Where a profile's hours go: measured unit costs times the profile's counts, notebook by notebook.

`project(values, units)` is the one place the counting lives. It multiplies the unit costs of one
speed-table run (`UnitCosts`, seconds, all measured on ResNet-32 except `at_epoch`) by the counts a
profile asks for (models, epochs, grids, images, attack steps, HVPs). Image-steps of attacks are
counted as PGD steps (a forward and a backward each); stAdv's L-BFGS iterations and AutoAttack's APGD
iterations count as one step each.

Included: 01 the base model's training; 02 the attack tables (FGSM, PGD, stAdv), the stAdv flow sweep,
accuracy-vs-eps curves, AutoAttack (targeted runs on half the images, as docs/scaling.md assumes);
03 Xu et al.'s augmentation sets and fine-tunes (twice the training set per epoch), adversarial
training per variant (PGD-K costs (K + 1) / 8 of the measured PGD-7 epoch; TRADES and MART +4 %, AWP +11 %,
FGSM-RS K = 1), Stutz et al.'s per-epoch robust evaluation, the zoo attack tables; 04 the 2D grid, the
clean and robust lines, the robust grid, interpolations, the sensitivity lines, the direction
replicates and the Hessian eigenvalue maps (clean and robust); 05 per model RLoss, RErr, average- and
worst-case flatness and the Hessian top eigenvalue and trace.

Left out (seconds each on a GPU): clean evaluation passes (per-epoch test accuracy, clean columns),
BatchNorm recalibration forwards, SSIM, the curvature bridge's few HVPs, the scale-invariance audit,
model loading, file I/O, figures, notebook 05's correlations, warm-up and compilation. Unit costs
are for 32 x 32 images; the quick profile's 8 x 8 digits make its projection an upper bound.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PROFILES = Path(__file__).resolve().parent.parent / "advkit" / "profiles"
TRAIN_IMAGES = {"cifar10": 50_000, "digits": 1437}
MEASURED_AT_STEPS = 7  # `UnitCosts.at_epoch` is a PGD-7 epoch (Stutz et al.)
OBJECTIVE_FACTOR = {"trades": 1.04, "mart": 1.04, "awp": 1.11}  # extra forward / weight-ascent step (docs/scaling.md)
RESNET18_ARCHS = ("resnet18", "preact_resnet18")
FAST_EPOCHS = 40  # advkit.train.FAST_RECIPE's epochs (notebook 01's recipe="fast"), counted at the batch-128 epoch cost


@dataclass(frozen=True)
class UnitCosts:
    """Seconds per unit of work, measured by benchmarks/speed_table.py (ResNet-32 unless named).

    clean_epoch: a clean training epoch, 50,000 images at batch 128; at_epoch: a ResNet-18 PGD-7
    adversarial-training epoch, 50,000 images at batch 128; clean_point: one clean surface point on
    10,000 images; attack_image_step: one PGD step on one image; hvp: one Hessian-vector product on
    1,000 images; resnet18_factor: ResNet-18's cost over ResNet-32's for the same work;
    robust_image_step: one PGD step on one image at a robust surface point, the loss included (None:
    derived, a robust point on n images = n x pgd_steps attack image-steps + the clean loss).
    """

    clean_epoch: float
    at_epoch: float
    clean_point: float
    attack_image_step: float
    hvp: float
    resnet18_factor: float = 1.0
    robust_image_step: float | None = None

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if value is None and name == "robust_image_step":
                continue
            if not (math.isfinite(value) and value >= 0) or (name == "resnet18_factor" and not value > 0):
                raise ValueError(f"{name} must be a finite number >= 0 (resnet18_factor > 0), got {value!r}")


@dataclass(frozen=True)
class Item:
    notebook: str
    work: str
    count: float  # units of `unit`
    unit: str
    seconds: float


def profile_values(name: str) -> dict[str, Any]:
    """The parameter values of advkit/profiles/<name>.yaml (its `sweep:` job settings dropped)."""
    import yaml
    values = yaml.safe_load((PROFILES / f"{name}.yaml").read_text())
    values.pop("sweep", None)
    return values


def _models(values: Mapping[str, Any]) -> dict[str, list[str]]:
    """The run's models by role: base, xu (fine-tunes), at (final), at_early, at_epochs (kept copies)."""
    parts = values.get("zoo_parts") or ["xu", "at", "report"]
    xu = list(values["xu_attacks"]) if "xu" in parts else []
    at = list(values["at_variants"]) if "at" in parts else []
    return {"base": ["base"], "xu": xu, "at": at, "at_early": [f"{v}_early" for v in at],
            "at_epochs": [f"{v}_e{e:03d}" for v in at for e in values["keep_epochs"]]}


def project(values: Mapping[str, Any], units: UnitCosts) -> list[Item]:
    """The profile's work as `Item`s (seconds = count x unit cost); see the module docstring for
    what is counted and what is left out."""
    v, u = values, units
    at_arch = v["at_model"] or v["model"]
    base_f, at_f = (u.resnet18_factor if a in RESNET18_ARCHS else 1.0 for a in (v["model"], at_arch))
    n_train = v["n_train"] or TRAIN_IMAGES[v["dataset"]]
    image_epoch = u.clean_epoch / TRAIN_IMAGES["cifar10"]  # one image through a training step
    point_image = u.clean_point / 10_000
    hvp_image = u.hvp / 1000
    step = u.attack_image_step
    m = _models(v)
    items: list[Item] = []

    def add(nb: str, work: str, count: float, unit: str, seconds_each: float) -> None:
        items.append(Item(nb, work, count, unit, count * seconds_each))

    def robust_point(n: int, factor: float) -> float:  # PGD-`pgd_steps` at a grid point, then the loss
        if u.robust_image_step is not None:
            return factor * n * v["pgd_steps"] * u.robust_image_step
        return factor * (n * v["pgd_steps"] * step + n * point_image)

    # 01 base model
    epochs = 0 if v["pretrained_checkpoint"] else (FAST_EPOCHS if v.get("recipe") == "fast" else v["epochs"])
    add("01", f"{v['model']} training ({v.get('recipe', 'paper')} recipe), {epochs} epochs x {n_train} images",
        epochs * n_train, "image-epochs", image_epoch * base_f)
    # 02 attacks on the base model
    n_eval, n_aa = v["n_eval"], v["n_autoattack"]
    table_steps = 1 + v["xu_pgd_steps"] + v["stadv_steps"]
    add("02", "attack tables (FGSM, PGD, stAdv)", n_eval * table_steps, "image-steps", step * base_f)
    add("02", "stAdv flow sweep", n_eval * len(v["stadv_flow_grid"]) * v["stadv_steps"], "image-steps", step * base_f)
    add("02", "accuracy vs eps (FGSM, PGD)", n_eval * len(v["eps_grid"]) * (1 + v["xu_pgd_steps"]), "image-steps",
        step * base_f)
    add("02", "AutoAttack + PGD check", n_aa * (v["aa_steps"] * (1 + v["aa_targets"] / 2) + v["xu_pgd_steps"]),
        "image-steps", step * base_f)
    # 03 zoo
    add("03", f"Xu augmentation sets ({len(m['xu'])})", n_train * sum(
        {"fgsm": 1, "pgd": v["xu_pgd_steps"], "stadv": v["stadv_steps"]}.get(a, 1) for a in m["xu"]),
        "image-steps", step * base_f)
    add("03", f"Xu fine-tunes ({len(m['xu'])}), 2 x {n_train} images",
        len(m["xu"]) * v["finetune_epochs"] * 2 * n_train, "image-epochs", image_epoch * base_f)
    at_epoch_image = u.at_epoch / TRAIN_IMAGES["cifar10"] / (MEASURED_AT_STEPS + 1) * at_f / u.resnet18_factor
    for spec in m["at"]:
        objective = re.split(r"\+", spec)[0]
        k = 1 if objective == "fgsm_rs" else v["at_steps"]
        add("03", f"AT {spec}, {v['at_epochs']} epochs", v["at_epochs"] * n_train, "image-epochs",
            at_epoch_image * (k + 1) * OBJECTIVE_FACTOR.get(objective, 1.0))
    per_epoch = (v["n_robust_train"] + v["n_robust_test"]) * v["epoch_steps"] + v["n_val"] * v["early_stop_steps"]
    add("03", "per-epoch robust evaluation (Stutz et al.)", len(m["at"]) * v["at_epochs"] * per_epoch, "image-steps",
        step * at_f)
    n_zoo = len(m["xu"]) + 1
    add("03", "zoo attack tables", n_eval * table_steps * n_zoo, "image-steps", step * base_f)
    add("03", "zoo attack tables (AT models)", n_eval * table_steps * (len(m["at"]) * 2 + len(m["at_epochs"])),
        "image-steps", step * at_f)
    # 04 landscapes: every non-epoch model
    n_img, rn = v["n_images"], v["robust_n_images"] or v["n_images"]
    for fac, count, label in ((base_f, 1 + len(m["xu"]), f"base + Xu, {1 + len(m['xu'])} {v['model']}"),
                              (at_f, 2 * len(m["at"]), f"AT final + early, {2 * len(m['at'])} {at_arch}")):
        add("04", f"{label}: 2D grid {v['resolution']}^2 + line {v['line_resolution']}",
            count * (v["resolution"] ** 2 + v["line_resolution"]) * n_img, "point-images", point_image * fac)
        if v["robust"]:
            pts = v["line_resolution"] + v["robust_resolution"] ** 2
            add("04", f"{label}: robust line + grid {v['robust_resolution']}^2 (PGD-{v['pgd_steps']})",
                count * pts, "robust points", robust_point(rn, fac))
        spans = sum(len(v["sensitivity_none_radii"] if n == "none" else v["sensitivity_radii"])
                    for n in v["sensitivity_norms"])
        add("04", f"{label}: sensitivity lines", count * spans * v["sensitivity_resolution"] * n_img, "point-images",
            point_image * fac)
    same_arch = len(m["xu"]) + (2 * len(m["at"]) if not v["at_model"] or v["at_model"] == v["model"] else 0)
    add("04", "interpolations from base", same_arch * v["line_resolution"] * n_img, "point-images",
        point_image * base_f)
    rep_n = min(v["replicate_n_images"], n_img)
    rep_points = sum(v["replicate_resolution"] ** d for d in v["replicate_dims"]) * v["direction_replicates"]
    surfaces = len(v["replicate_norms"]) + 2  # each normalization, plus filter with BatchNorm included / recalibrated
    robust_surfaces = (surfaces if v["replicate_robust"] == "all" else 1) if v["robust"] else 0
    for fac, count in ((base_f, 1 + len(m["xu"])), (at_f, len(m["at"]))):
        add("04", f"replicates, {count} final models x {surfaces} surfaces", count * surfaces * rep_points * rep_n,
            "point-images", point_image * fac)
        add("04", f"replicates robust, {count} final models x {robust_surfaces} surfaces",
            count * robust_surfaces * rep_points, "robust points", robust_point(rep_n, fac))
    known = set(sum(m.values(), []))
    maps = [name for name in v["eigen_map_models"] if name in known]
    for name in maps:
        fac = base_f if name == "base" or name in m["xu"] else at_f
        pts = v["eigen_map_resolution"] ** 2
        n_c = min(v["curvature_images"], n_img)
        losses = 2 if v["robust"] else 1
        add("04", f"eigenvalue map {name} (clean + robust)", pts * v["eigen_map_steps"] * losses * n_c,
            "HVP-images", hvp_image * fac)
        if v["robust"]:
            add("04", f"eigenvalue map {name}: PGD per point", pts * n_c * v["pgd_steps"], "image-steps", step * fac)
    # 05 flatness table: every model, epoch copies included
    n_s = v["n_subset"]
    per_model_steps = 2 * n_s * (v["pgd_steps"] * (v["pgd_restarts"] + v["flatness_samples"]) + v["worst_steps"])
    per_model_steps += 2 * min(n_aa, n_s) * v["aa_steps"] * (1 + v["aa_targets"] / 2)
    per_model_hvp = (v["hessian_iters"] + v["hessian_samples"]) * n_s
    for fac, count in ((base_f, 1 + len(m["xu"])), (at_f, 2 * len(m["at"]) + len(m["at_epochs"]))):
        add("05", f"{count} models: RLoss, RErr (AutoAttack), flatness", count * per_model_steps, "image-steps",
            step * fac)
        add("05", f"{count} models: Hessian eigenvalue + trace", count * per_model_hvp, "HVP-images", hvp_image * fac)
    return [it for it in items if it.count > 0]


def by_notebook(items: Sequence[Item]) -> dict[str, float]:
    """{notebook: seconds}, in notebook order."""
    out: dict[str, float] = {}
    for it in items:
        out[it.notebook] = out.get(it.notebook, 0.0) + it.seconds
    return dict(sorted(out.items()))


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
