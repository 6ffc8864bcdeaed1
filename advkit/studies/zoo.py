"""Every metric for every model of a run: the one-row-per-model table of notebook 05 (measuring;
what the numbers say is `advkit.studies.correlation`'s report).

`flatness_table` loads each model of `runs/<run>/models/` (epoch checkpoints included) in
turn and measures it on fixed subsets (the first n training and test images, as Stutz et
al. 2021): clean and robust accuracy, the robust loss (RLoss: cross-entropy on PGD-20
examples with 10 restarts) and robust error (RErr: AutoAttack) on train and test and their
gap, average-case flatness of the robust loss on train and test and its worst case (the
attack re-run on the perturbed weights), the Hessian's top eigenvalue and trace
(clean loss) and the relative flatness of the feature layer (Petzka et al. 2021; Walter et
al. 2025) on clean and on PGD inputs. Rows are cached in `flatness.csv` with their settings
and the checkpoint's sha256, under the kit's one cache policy (`advkit.runs.run.cache_is_current`):
a row made with other settings, another ZOO_VERSION or other weights is recomputed with a
StaleCacheWarning. Under torchrun the models are shared out across the ranks (`advkit.ranks`:
one model per rank and round; rank 0 writes flatness.csv after each round). The 1 - SSIM of
each fine-tune's augmentation attack (notebook 02) and the surface sharpness of notebook 04
are merged in afresh on every call (`attach_run_results`).
"""

from __future__ import annotations

import functools
import json
import math
import time
from collections.abc import Collection, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from advkit import ranks
from advkit._checks import HESSIAN_BACKENDS, XU_ATTACKS, check_choice, check_int, check_number, check_seed
from advkit._torch import Attack, loss_and_accuracy, to_float
from advkit.attacks.evaluate import STUTZ2021
from advkit.attacks.pgd import autoattack, pgd
from advkit.curvature.estimators import hessian_eigenvalues, hessian_trace
from advkit.curvature.flatness import FlatnessLoss, avg_case_flatness, relative_flatness, worst_case_flatness
from advkit.curvature.operator import HessianOperator, adversarial_inputs
from advkit.data import DATASETS, Dataset, subset
from advkit.progress import LoopProgress
from advkit.runs.artifacts import file_sha256
from advkit.runs.checkpoints import load_checkpoint, load_model
from advkit.runs.run import Run, cache_is_current, is_epoch_name

ZOO_VERSION = 2  # bump when a metric's definition changes: cached rows are then recomputed
TRACE_METHODS = ("hutchpp", "hutchinson")
# Columns that come from other notebooks' files, not from the metrics: never cached. Each source
# is named as `Run` names it, with the notebook that writes it and the columns it gives.
RUN_RESULTS = {
    "table2_ssim_distance": ("02_attack", ("one_minus_ssim",)),
    "sharpness": ("04_visualize", ("surface_sharpness", "surface_mean_increase", "robust_surface_sharpness",
                                   "robust_surface_mean_increase")),
}
MERGED = tuple(c for _, columns in RUN_RESULTS.values() for c in columns)
SHARPNESS_COLUMNS = {"surface_sharpness": "surface_sharpness", "loss_mean_increase": "surface_mean_increase",
                     "robust_loss_curvature_max": "robust_surface_sharpness",
                     "robust_loss_mean_increase": "robust_surface_mean_increase"}


_STUTZ_PGD = STUTZ2021.attacks["pgd"].params  # RLoss: PGD-20, step 0.007, 10 restarts at 8/255


@dataclass(frozen=True)
class ZooSettings:
    """What determines the metrics of one model (defaults: Stutz et al. 2021's CIFAR-10 settings).

    The robust loss (RLoss, Stutz et al. Sec. 3) uses L-inf PGD (eps `pgd_eps`, `pgd_steps`
    steps of `pgd_alpha`, None: 2.5 eps / steps; `pgd_restarts` uniform random starts seeded by
    `seed`, each example keeping its worst); the robust error (RErr) is 1 - AutoAttack accuracy
    (`advkit.attacks.pgd.autoattack`, `aa_steps` APGD iterations, `aa_targets` APGD-T targets) on the
    first `n_autoattack` of the n_eval images (0: skip). Flatness re-runs PGD with ONE restart at
    every perturbed weight (ten would cost ten times as much). `worst_steps` joint weight/input
    ascent steps for the worst case; `hessian_iters` Lanczos steps and `hessian_samples` Hessian-vector products for the
    trace (`trace_method` Hutch++: about 3x less spread than Hutchinson's at 30).
    """

    dataset: str = "cifar10"
    n_eval: int = STUTZ2021.n_test
    pgd_eps: float = _STUTZ_PGD["eps"]
    pgd_steps: int = _STUTZ_PGD["steps"]
    pgd_alpha: float | None = _STUTZ_PGD["alpha"]
    pgd_restarts: int = _STUTZ_PGD["restarts"]
    n_autoattack: int = STUTZ2021.n_test
    aa_steps: int = 100
    aa_targets: int = 9
    flatness_xi: float = 0.5
    flatness_samples: int = 10
    worst_xi: float = 0.003
    worst_steps: int = 20
    hessian_iters: int = 20
    hessian_samples: int = 100
    hessian_backend: str = "reverse"
    trace_method: str = "hutchpp"
    seed: int = 0
    batch_size: int = 500

    def __post_init__(self):
        check_choice("dataset", self.dataset, DATASETS)
        check_int("n_eval", self.n_eval)
        check_number("pgd_eps", self.pgd_eps, 0, 1)  # pixel space
        check_int("pgd_steps", self.pgd_steps)
        if self.pgd_alpha is not None:
            check_number("pgd_alpha", self.pgd_alpha, 0, 1, low_open=True)
        check_int("pgd_restarts", self.pgd_restarts)
        check_int("aa_steps", self.aa_steps)
        check_int("aa_targets", self.aa_targets, 1, 9)  # APGD-T: at most the other 9 classes of either dataset
        check_number("flatness_xi", self.flatness_xi)
        check_int("flatness_samples", self.flatness_samples)
        check_number("worst_xi", self.worst_xi)
        check_int("worst_steps", self.worst_steps)
        check_int("hessian_iters", self.hessian_iters)
        check_choice("hessian_backend", self.hessian_backend, HESSIAN_BACKENDS)
        check_seed("seed", self.seed)
        check_int("hessian_samples", self.hessian_samples)
        check_int("batch_size", self.batch_size)
        check_int("n_autoattack", self.n_autoattack, minimum=0)  # 0: no AutoAttack
        check_choice("trace_method", self.trace_method, TRACE_METHODS)
        if self.trace_method == "hutchpp":
            check_int("hessian_samples", self.hessian_samples, minimum=3)  # Hutch++ splits them in three

    def as_dict(self) -> dict[str, Any]:
        """The settings and ZOO_VERSION: what a cached row must match (`advkit.runs.run.cache_is_current`)."""
        return {**asdict(self), "version": ZOO_VERSION}

    def key(self) -> str:
        """Canonical JSON of `as_dict`: the cache key stored with each row (column `settings`)."""
        return json.dumps(self.as_dict(), sort_keys=True)

    def attack(self, restarts: int | None = None) -> Attack:
        """The robust loss's PGD, attack(model, x, y) -> x_adv (seeded: the same starts every call);
        `pgd_restarts` restarts unless `restarts` is given (flatness uses 1)."""
        return functools.partial(pgd, eps=self.pgd_eps, alpha=self.pgd_alpha, steps=self.pgd_steps,
                                 restarts=self.pgd_restarts if restarts is None else restarts, seed=self.seed)

    def robust_error_attack(self) -> Attack:
        """AutoAttack for the robust error (Stutz et al.: RErr), seeded."""
        return functools.partial(autoattack, eps=self.pgd_eps, steps=self.aa_steps,
                                 n_target_classes=self.aa_targets, seed=self.seed)


def split_name(name: str) -> tuple[str, int | None]:
    """'pgd_at_e002' -> ('pgd_at', 2); 'pgd_at' -> ('pgd_at', None): epoch checkpoints of `fit(keep_epochs=)`.
    Early-stopped weights ('pgd_at_early') are models of their own, not epoch checkpoints."""
    if not is_epoch_name(name):
        return name, None
    stem, _, epoch = name.rpartition("_e")
    return stem, int(epoch)


def model_metrics(model: nn.Module, train: tuple[torch.Tensor, torch.Tensor],
                  test: tuple[torch.Tensor, torch.Tensor], settings: ZooSettings) -> dict[str, Any]:
    """One table row: accuracy, robust loss and robust error (train/test), gap, flatness, Hessian
    and relative flatness.

    `train` and `test` are (x float in [0, 1], y) subsets on the model's device. RLoss uses
    `settings.attack()` (Stutz et al.: PGD-20, 10 restarts); robust_err / robust_err_train are
    1 - AutoAttack accuracy on the first `n_autoattack` images (NaN when 0); robust_acc is PGD's.
    Average-case flatness is measured on both subsets (avg_case_flatness on test,
    avg_case_flatness_train on train: Stutz et al. Fig. 7); worst-case flatness and the Hessian
    on the test subset. robust_gap = RLoss(test) - RLoss(train), the robust generalization gap.
    Losses and accuracies: `advkit._torch.loss_and_accuracy` in fp32.
    """
    s = settings
    flat_attack = s.attack(restarts=1)
    bs = s.batch_size
    row: dict[str, Any] = {}
    for split, (x, y) in (("train", train), ("test", test)):
        x_adv = adversarial_inputs(model, x, y, s.attack(), bs)
        suffix = "" if split == "test" else "_train"
        row[f"clean_loss_{split}"], row[f"clean_acc{suffix}"] = _loss_acc(model, x, y, s)
        row[f"robust_loss_{split}"], row[f"robust_acc{suffix}"] = _loss_acc(model, x_adv, y, s)
        row[f"robust_err{suffix}"] = _robust_error(model, x, y, s)
        if split == "test":
            row["relative_flatness"] = relative_flatness(model, x, batch_size=bs).value
            row["relative_flatness_adv"] = relative_flatness(model, x_adv, batch_size=bs).value
    row["robust_gap"] = row["robust_loss_test"] - row["robust_loss_train"]
    robust = FlatnessLoss(attack=flat_attack, batch_size=bs)  # PGD re-run at every perturbed w
    avg_train = avg_case_flatness(model, *train, robust, xi=s.flatness_xi, n_samples=s.flatness_samples, seed=s.seed)
    row["avg_case_flatness_train"] = avg_train.value
    x, y = test
    avg = avg_case_flatness(model, x, y, robust, xi=s.flatness_xi, n_samples=s.flatness_samples, seed=s.seed)
    joint = FlatnessLoss(batch_size=bs)  # made robust by worst_case_flatness's joint PGD steps (eps)
    worst = worst_case_flatness(model, x, y, joint, xi=s.worst_xi, steps=s.worst_steps, eps=s.pgd_eps, seed=s.seed)
    op = HessianOperator(model, x, y, batch_size=bs, backend=s.hessian_backend)
    eig = hessian_eigenvalues(op, iters=s.hessian_iters, seed=s.seed)
    trace = hessian_trace(op, n_samples=s.hessian_samples, method=s.trace_method, seed=s.seed)
    op.release()
    for part in (avg.as_row(), worst.as_row(), eig.as_row(), trace.as_row()):
        row.update(part)
    return row


def _loss_acc(model: nn.Module, x: torch.Tensor, y: torch.Tensor, settings: ZooSettings,
              attack: Attack | None = None) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) in fp32: the one loop, `advkit._torch.loss_and_accuracy`."""
    return tuple(loss_and_accuracy(model, x, y, batch_size=settings.batch_size, precision="fp32", attack=attack))


def _robust_error(model: nn.Module, x: torch.Tensor, y: torch.Tensor, settings: ZooSettings) -> float:
    """1 - AutoAttack accuracy on the first n_autoattack images (Stutz et al.'s RErr); NaN when 0."""
    n = min(settings.n_autoattack, len(x))
    if n == 0:
        return math.nan
    return 1.0 - _loss_acc(model, x[:n], y[:n], settings, attack=settings.robust_error_attack())[1]


def eval_subsets(data: Dataset, n_eval: int, device: str | torch.device = "cpu"
                 ) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """(train, test): the first n_eval training and test images as floats in [0, 1] on `device`."""
    out = []
    for x, y in ((data.x_train, data.y_train), (data.x_test, data.y_test)):
        x, y = subset(x, y, n_eval)
        out.append((to_float(x).to(device), y.to(device)))
    return out[0], out[1]


def read_cache(run: Run | str | Path) -> pd.DataFrame:
    """Rows of the run's flatness.csv (checksum verified; merged columns dropped), indexed by model;
    empty if there is none yet."""
    run = Run.of(run)
    if not run.flatness.exists():
        return pd.DataFrame()
    table = run.read_table(run.flatness, index_col="model", dtype={"checkpoint": str, "settings": str})
    return table.drop(columns=[c for c in MERGED if c in table.columns])


def _is_current(run: Run, cache: pd.DataFrame, name: str, requested: dict[str, Any]) -> bool:
    """The one cache policy for one row: reuse it only when its settings (with ZOO_VERSION) and
    checkpoint hash equal the request; otherwise a StaleCacheWarning names the row and the setting."""
    if name not in cache.index:
        return False
    settings, checkpoint = (cache.at[name, c] if c in cache.columns else None for c in ("settings", "checkpoint"))
    stored = {**(json.loads(settings) if isinstance(settings, str) else {}), "checkpoint": checkpoint}
    return cache_is_current(f"{run.flatness}, row {name!r}", stored, requested)


def flatness_table(run: Run | str | Path, data: Dataset, settings: ZooSettings, *,
                   device: str | torch.device = "cpu", models: Sequence[str] | None = None,
                   recompute: bool = False, progress: bool = True,
                   optional: Collection[str] = ()) -> pd.DataFrame:
    """Every metric for every model of `run` (epoch checkpoints included), cached in `run.flatness`.

    A cached row is reused when its settings (`ZooSettings.as_dict`, with ZOO_VERSION) and the
    checkpoint's sha256 match; otherwise it is recomputed with a StaleCacheWarning (the one cache
    policy; `recompute`: every row, silently), and the file rewritten after each model, so an
    interrupted call resumes. Returns one row per model (index `model`) with family/epoch, the
    metrics, their settings, and the columns merged from other notebooks (`attach_run_results`;
    `optional` names the sources that may be missing, checked before any model is measured).
    """
    run = Run.of(run)
    if not isinstance(settings, ZooSettings):
        raise ValueError(f"settings must be a ZooSettings, got {type(settings).__name__}")
    if settings.dataset != data.name:
        raise ValueError(f"settings.dataset={settings.dataset!r} but data is {data.name!r}")
    available = run.models(epochs=True)
    if not available:
        raise ValueError(f"no models in {run / 'models'}: the run directory is empty; run notebook 01 "
                         "(and 03 for the fine-tunes) first")
    names = available if models is None else list(models)
    missing = [n for n in names if n not in available]
    if missing:
        raise ValueError(f"models {missing} are not in {run / 'models'}; available: {available}")
    results = read_run_results(run, optional)  # a missing source fails here, before hours of measuring
    cache = read_cache(run)
    train, test = eval_subsets(data, settings.n_eval, device)
    rows: dict[str, dict[str, Any]] = {}
    todo = []
    for name in names:
        digest = file_sha256(run.require(run.model(name)))[:16]
        if not recompute and _is_current(run, cache, name, {**settings.as_dict(), "checkpoint": digest}):
            rows[name] = cache.loc[name].to_dict()
        else:
            todo.append((name, digest))

    def measure(item: tuple[str, str]) -> dict[str, Any]:
        name, digest = item
        file = run.model(name)
        family, epoch = split_name(name)
        saved = load_checkpoint(file)
        epoch = saved.get("epoch") if epoch is None else epoch
        model = load_model(file, device=device)
        t0 = time.perf_counter()
        metrics = model_metrics(model, train, test, settings)
        return {"family": family, "epoch": epoch, "early_stopped": bool(saved.get("early_stopped", False)),
                **metrics, "checkpoint": digest, "settings": settings.key(), "compute_s": time.perf_counter() - t0}

    # One model per rank and round under torchrun (`advkit.ranks.in_rounds`), one alone; rank 0
    # writes flatness.csv after each round, so an interrupted call resumes.
    bar = tqdm(total=len(names), initial=len(names) - len(todo), desc="models",
               disable=not progress or not ranks.is_writer())
    steps = LoopProgress("flatness", "model", len(names), len(names) - len(todo))  # the driver's log
    for measured in ranks.in_rounds(todo, measure):
        for (name, _), row in measured:
            rows[name] = row
        bar.update(len(measured))
        if ranks.is_writer():
            steps.step(len(rows), ", ".join(n for (n, _), _ in measured))
        if ranks.is_writer():
            run.write_table(run.flatness, _attach(_file_rows(cache, available, rows), results))
    bar.close()
    if ranks.is_writer():
        run.write_table(run.flatness, _attach(_file_rows(cache, available, rows), results))
    ranks.barrier()  # flatness.csv is complete before any rank reads it again
    return _attach(_frame({n: rows[n] for n in names}), results)


def _file_rows(cache: pd.DataFrame, available: Sequence[str], rows: dict[str, dict[str, Any]]) -> pd.DataFrame:
    """What flatness.csv holds: the new rows, plus cached rows of models that still exist but were
    not asked for this time, in the run's model order."""
    kept = {n: cache.loc[n].to_dict() for n in cache.index if n in available and n not in rows}
    merged = {**kept, **rows}
    return _frame({n: merged[n] for n in available if n in merged})


def _frame(rows: dict[str, dict[str, Any]]) -> pd.DataFrame:
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.index.name = "model"
    return table


# --- columns measured by other notebooks ----------------------------------------------------------


def missing_run_results(run: Run | str | Path) -> dict[str, str]:
    """{source: why its columns are empty} for the `RUN_RESULTS` sources this run lacks (what
    notebook 05 prints when it lets a source be missing)."""
    run = Run.of(run)
    out = {}
    for source, (notebook, columns) in RUN_RESULTS.items():
        path = _source_path(run, source)
        if not path.exists():
            out[source] = (f"{', '.join(columns)}: empty, this run has no {path.relative_to(run.root)} "
                           f"(notebook {notebook} writes it)")
    return out


def _source_path(run: Run, source: str) -> Path:
    return run.attack_table(source) if source == "table2_ssim_distance" else run.landscape_table(source)


def read_run_results(run: Run | str | Path, optional: Collection[str] = ()) -> dict[str, pd.DataFrame]:
    """{source: table} of the `RUN_RESULTS` files the run has, read verified. A missing source is a
    FileNotFoundError naming the notebook that writes it, unless `optional` names it (its columns
    are then NaN; `missing_run_results` says why)."""
    run = Run.of(run)
    unknown = set(optional) - set(RUN_RESULTS)
    if unknown:
        raise ValueError(f"optional={sorted(unknown)}: not a source of merged columns; choose from {list(RUN_RESULTS)}")
    tables = {}
    for source, (notebook, columns) in RUN_RESULTS.items():
        path = _source_path(run, source)
        if path.exists():
            tables[source] = run.read_table(path, index_col="model")
        elif source not in optional:
            raise FileNotFoundError(f"{path} is missing: notebook {notebook} writes it (columns {', '.join(columns)}); "
                                    f"run that notebook first, or pass optional=[{source!r}] to leave them empty")
    ssim = tables.get("table2_ssim_distance")
    if ssim is not None and "base" not in ssim.index:
        raise ValueError(f"{_source_path(run, 'table2_ssim_distance')} has no row 'base' (the attacks' 1 - SSIM on the "
                         "base model): re-run notebook 02_attack")
    return tables


def _attach(table: pd.DataFrame, results: dict[str, pd.DataFrame]) -> pd.DataFrame:
    table = table.drop(columns=[c for c in MERGED if c in table.columns])
    ssim = results.get("table2_ssim_distance", pd.DataFrame())
    families = [split_name(n)[0] for n in table.index]
    out = table.assign(one_minus_ssim=[float(ssim.at["base", f]) if f in XU_ATTACKS and f in ssim.columns
                                       else np.nan for f in families])
    sharp = results.get("sharpness", pd.DataFrame())
    for src, dst in SHARPNESS_COLUMNS.items():
        values = sharp[src] if src in sharp.columns else pd.Series(dtype=float)
        out[dst] = pd.to_numeric(values.reindex(out.index), errors="coerce").to_numpy()
    return out


def attach_run_results(table: pd.DataFrame, run: Run | str | Path, optional: Collection[str] = ()) -> pd.DataFrame:
    """Add the columns other notebooks measured (`RUN_RESULTS`; NaN for models they did not measure):

    - one_minus_ssim: for a fine-tune named after its augmentation attack (fgsm, pgd, stadv;
      epoch checkpoints by family), that attack's mean 1 - SSIM on the base model (notebook
      02's `run.attack_table("table2_ssim_distance")`, row `base`): Xu et al.'s Table 2.
    - surface_sharpness (clean-loss curvature of the filter-normalized surface at its centre),
      surface_mean_increase and their robust-loss versions, from notebook 04's
      `run.landscape_table("sharpness")`.

    A missing file is an error naming its notebook unless `optional` names its source.
    """
    return _attach(table, read_run_results(run, optional))


def read_histories(run: Run | str | Path, families: Sequence[str]) -> dict[str, pd.DataFrame]:
    """{family: its `fit` history (`run.history(family)`, verified)}; a missing one is an error naming
    the notebook that trains the family (`fit` writes a history for every model it trains)."""
    run = Run.of(run)
    return {f: run.read_table(run.history(f)) for f in families}
