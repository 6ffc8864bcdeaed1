"""Every metric for every model of a run: the one-row-per-model table of notebook 05.

`flatness_table` loads each model of `runs/<run>/models/` (epoch checkpoints included) in
turn and measures it on fixed subsets (the first n training and test images, as Stutz et
al. 2021): clean and robust accuracy, the robust loss (RLoss: cross-entropy on PGD-20
examples with 10 restarts) and robust error (RErr: AutoAttack) on train and test and their
gap, average-case flatness of the robust loss on train and test and its worst case (the
attack re-run on the perturbed weights), the Hessian's top eigenvalue and trace
(clean loss) and the relative flatness of the feature layer (Petzka et al. 2021; Walter et
al. 2025) on clean and on PGD inputs. Rows are cached in `flatness.csv` with their settings
and the checkpoint's hash; a row is recomputed only when either changes. The 1 - SSIM of
each fine-tune's augmentation attack (notebook 02) and the surface sharpness of notebook 04
are merged in afresh on every call (`attach_run_results`).
"""

from __future__ import annotations

import functools
import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.stats
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from advkit.attacks import autoattack, pgd
from advkit.correlation import SEED_CLAIMS, Claim, correlation_table, summarize
from advkit.data import Dataset, subset, to_float
from advkit.evaluate import STUTZ2021
from advkit.flatness import avg_case_flatness, relative_flatness, worst_case_flatness
from advkit.hessian import (Attack, HessianOperator, adversarial_inputs, chunks, eval_mode, hessian_eigenvalues,
                            hessian_trace)
from advkit.runs import atomic_path, file_sha256, list_models, load_checkpoint, load_model, verified
from advkit.train import EARLY_SUFFIX

ZOO_VERSION = 2  # bump when a metric's definition changes: cached rows are then recomputed
HESSIAN_BACKENDS = HessianOperator.BACKENDS
TRACE_METHODS = ("hutchpp", "hutchinson")
AUGMENTATION_ATTACKS = ("fgsm", "pgd", "stadv")  # Xu et al.'s fine-tunes, named after their attack
# Columns that come from other notebooks' files, not from the metrics: never cached.
MERGED = ("one_minus_ssim", "surface_sharpness", "surface_mean_increase", "robust_surface_sharpness",
          "robust_surface_mean_increase")
SHARPNESS_COLUMNS = {"surface_sharpness": "surface_sharpness", "loss_mean_increase": "surface_mean_increase",
                     "robust_loss_curvature_max": "robust_surface_sharpness",
                     "robust_loss_mean_increase": "robust_surface_mean_increase"}
# What notebook 05 correlates: robustness-side and flatness-side columns.
ROBUSTNESS = ("robust_loss_test", "robust_gap", "robust_err", "robust_acc", "one_minus_ssim", "surface_sharpness")
FLATNESS = ("avg_case_flatness", "avg_case_flatness_train", "worst_case_flatness", "hessian_top_eig", "hessian_trace",
            "relative_flatness", "surface_sharpness")


_STUTZ_PGD = STUTZ2021.attacks["pgd"].params  # RLoss: PGD-20, step 0.007, 10 restarts at 8/255


@dataclass(frozen=True)
class ZooSettings:
    """What determines the metrics of one model (defaults: Stutz et al. 2021's CIFAR-10 settings).

    The robust loss (RLoss, Stutz et al. Sec. 3) uses L-inf PGD (eps `pgd_eps`, `pgd_steps`
    steps of `pgd_alpha`, None: 2.5 eps / steps; `pgd_restarts` uniform random starts seeded by
    `seed`, each example keeping its worst); the robust error (RErr) is 1 - AutoAttack accuracy
    (`advkit.attacks.autoattack`, `aa_steps` APGD iterations, `aa_targets` APGD-T targets) on the
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
        for name in ("n_eval", "pgd_steps", "pgd_restarts", "aa_steps", "aa_targets", "flatness_samples", "worst_steps",
                     "hessian_iters", "hessian_samples", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        for name, hi in (("pgd_eps", 1.0), ("flatness_xi", math.inf), ("worst_xi", math.inf)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= hi:
                raise ValueError(f"{name} must be a number in [0, {hi}], got {value!r}")
        if isinstance(self.n_autoattack, bool) or not isinstance(self.n_autoattack, (int, np.integer)) \
                or self.n_autoattack < 0:
            raise ValueError(f"n_autoattack must be an integer >= 0 (0: no AutoAttack), got {self.n_autoattack!r}")
        alpha = self.pgd_alpha
        if alpha is not None and (isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha <= 1):
            raise ValueError(f"pgd_alpha must be None (2.5 eps / steps) or a number in (0, 1], got {self.pgd_alpha!r}")
        if self.trace_method not in TRACE_METHODS:
            raise ValueError(f"trace_method={self.trace_method!r}: choose one of {TRACE_METHODS}")
        if self.trace_method == "hutchpp" and self.hessian_samples < 3:
            raise ValueError(f"hessian_samples must be >= 3 for Hutch++, got {self.hessian_samples}")
        if self.hessian_backend not in HESSIAN_BACKENDS:
            raise ValueError(f"hessian_backend={self.hessian_backend!r}: choose one of {HESSIAN_BACKENDS}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)) or self.seed < 0:
            raise ValueError(f"seed must be an integer >= 0, got {self.seed!r}")

    def key(self) -> str:
        """Canonical JSON of the settings (and ZOO_VERSION): the cache key stored with each row."""
        return json.dumps({**asdict(self), "version": ZOO_VERSION}, sort_keys=True)

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
    stem, _, epoch = name.rpartition("_e")
    if stem and len(epoch) == 3 and epoch.isdigit():
        return stem, int(epoch)
    return name, None


def checkpoint_hash(path: str | Path) -> str:
    """First 16 hex digits of the checkpoint file's SHA-256: a retrained model invalidates its cached row."""
    return file_sha256(path)[:16]


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
    """
    s = settings
    attack = s.attack()
    flat_attack = s.attack(restarts=1)
    bs = s.batch_size
    row: dict[str, Any] = {}
    for split, (x, y) in (("train", train), ("test", test)):
        x_adv = adversarial_inputs(model, x, y, attack, bs)
        clean_loss, clean_acc = _loss_acc(model, x, y, bs)
        robust_loss, robust_acc = _loss_acc(model, x_adv, y, bs)
        suffix = "" if split == "test" else "_train"
        row[f"clean_acc{suffix}"], row[f"robust_acc{suffix}"] = clean_acc, robust_acc
        row[f"clean_loss_{split}"], row[f"robust_loss_{split}"] = clean_loss, robust_loss
        row[f"robust_err{suffix}"] = _robust_error(model, x, y, s)
        if split == "test":
            row["relative_flatness"] = relative_flatness(model, x, batch_size=bs).value
            row["relative_flatness_adv"] = relative_flatness(model, x_adv, batch_size=bs).value
    row["robust_gap"] = row["robust_loss_test"] - row["robust_loss_train"]
    avg_train = avg_case_flatness(model, *train, xi=s.flatness_xi, n_samples=s.flatness_samples,
                                  attack=flat_attack, seed=s.seed, batch_size=bs)
    row["avg_case_flatness_train"] = avg_train.value
    x, y = test
    avg = avg_case_flatness(model, x, y, xi=s.flatness_xi, n_samples=s.flatness_samples, attack=flat_attack,
                            seed=s.seed, batch_size=bs)
    worst = worst_case_flatness(model, x, y, xi=s.worst_xi, steps=s.worst_steps, eps=s.pgd_eps, seed=s.seed,
                                batch_size=bs)
    op = HessianOperator(model, x, y, batch_size=bs, backend=s.hessian_backend)
    eig = hessian_eigenvalues(op, iters=s.hessian_iters, seed=s.seed)
    trace = hessian_trace(op, n_samples=s.hessian_samples, method=s.trace_method, seed=s.seed)
    op.release()
    for part in (avg.as_row(), worst.as_row(), eig.as_row(), trace.as_row()):
        row.update(part)
    return row


def _robust_error(model: nn.Module, x: torch.Tensor, y: torch.Tensor, settings: ZooSettings) -> float:
    """1 - AutoAttack accuracy on the first n_autoattack images (Stutz et al.'s RErr); NaN when 0."""
    n = min(settings.n_autoattack, len(x))
    if n == 0:
        return math.nan
    x_adv = adversarial_inputs(model, x[:n], y[:n], settings.robust_error_attack(), settings.batch_size)
    return 1.0 - _loss_acc(model, x_adv, y[:n], settings.batch_size)[1]


def _loss_acc(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> tuple[float, float]:
    """Mean cross-entropy and accuracy, eval mode, fp32."""
    loss = torch.zeros((), dtype=torch.float64, device=x.device)
    correct = torch.zeros((), dtype=torch.int64, device=x.device)
    with eval_mode(model), torch.no_grad():
        for s in chunks(len(x), batch_size):
            z = model(x[s]).float()
            loss += F.cross_entropy(z, y[s], reduction="sum").double()
            correct += (z.argmax(1) == y[s]).sum()
    return float(loss) / len(x), int(correct) / len(x)


def eval_subsets(data: Dataset, n_eval: int, device: str | torch.device = "cpu"
                 ) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """(train, test): the first n_eval training and test images as floats in [0, 1] on `device`."""
    out = []
    for x, y in ((data.x_train, data.y_train), (data.x_test, data.y_test)):
        x, y = subset(x, y, n_eval)
        out.append((to_float(x).to(device), y.to(device)))
    return out[0], out[1]


def read_cache(path: str | Path) -> pd.DataFrame:
    """Rows of an existing flatness.csv (merged columns dropped), indexed by model; empty if none."""
    path = Path(path)
    if not path.exists():
        return pd.DataFrame()
    table = pd.read_csv(verified(path), index_col="model")
    return table.drop(columns=[c for c in MERGED if c in table.columns])


def flatness_table(run: str | Path, data: Dataset, settings: ZooSettings, *, device: str | torch.device = "cpu",
                   models: Sequence[str] | None = None, recompute: bool = False,
                   progress: bool = True) -> pd.DataFrame:
    """Every metric for every model of `run` (epoch checkpoints included), cached in `run/flatness.csv`.

    A cached row is reused when its settings (`ZooSettings.key`) and checkpoint hash match;
    otherwise (or with `recompute`) the model is measured again and the file rewritten after
    each model, so an interrupted call resumes. Returns one row per model (index `model`) with
    family/epoch, the metrics, their settings, and the merged 1 - SSIM and surface sharpness.
    """
    run = Path(run)
    if not isinstance(settings, ZooSettings):
        raise ValueError(f"settings must be a ZooSettings, got {type(settings).__name__}")
    if settings.dataset != data.name:
        raise ValueError(f"settings.dataset={settings.dataset!r} but data is {data.name!r}")
    available = list_models(run, epochs=True)
    if not available:
        raise ValueError(f"no models in {run / 'models'}: the run directory is empty; run notebook 01 "
                         "(and 03 for the fine-tunes) first")
    names = available if models is None else list(models)
    missing = [n for n in names if n not in available]
    if missing:
        raise ValueError(f"models {missing} are not in {run / 'models'}; available: {available}")
    path = run / "flatness.csv"
    cache = read_cache(path)
    key = settings.key()
    train, test = eval_subsets(data, settings.n_eval, device)
    rows: dict[str, dict[str, Any]] = {}
    for name in tqdm(names, desc="models", disable=not progress):
        file = run / "models" / f"{name}.pt"
        digest = checkpoint_hash(file)
        if not recompute and name in cache.index and cache.at[name, "settings"] == key \
                and cache.at[name, "checkpoint"] == digest:
            rows[name] = cache.loc[name].to_dict()
            continue
        family, epoch = split_name(name)
        saved = load_checkpoint(file)
        epoch = saved.get("epoch") if epoch is None else epoch
        model = load_model(file, device=device)
        t0 = time.perf_counter()
        metrics = model_metrics(model, train, test, settings)
        rows[name] = {"family": family, "epoch": epoch, "early_stopped": bool(saved.get("early_stopped", False)),
                      **metrics, "checkpoint": digest, "settings": key, "compute_s": time.perf_counter() - t0}
        _write(path, attach_run_results(_file_rows(cache, available, rows), run))
    _write(path, attach_run_results(_file_rows(cache, available, rows), run))
    return attach_run_results(_frame(rows), run)


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


def _write(path: Path, table: pd.DataFrame) -> None:
    with atomic_path(path) as tmp:
        table.to_csv(tmp)


def attach_run_results(table: pd.DataFrame, run: str | Path) -> pd.DataFrame:
    """Add the columns other notebooks measured, NaN where absent:

    - one_minus_ssim: for a fine-tune named after its augmentation attack (fgsm, pgd, stadv;
      epoch checkpoints by family), that attack's mean 1 - SSIM on the base model (notebook
      02's attacks/table2_ssim_distance.csv, row `base`): Xu et al.'s Table 2.
    - surface_sharpness (clean-loss curvature of the filter-normalized surface at its centre),
      surface_mean_increase and their robust-loss versions, from notebook 04's
      landscapes/sharpness.csv.
    """
    run = Path(run)
    table = table.drop(columns=[c for c in MERGED if c in table.columns])
    families = [split_name(n)[0] for n in table.index]
    ssim = pd.Series(np.nan, index=table.index)
    path = run / "attacks" / "table2_ssim_distance.csv"
    if path.exists():
        t2 = pd.read_csv(path, index_col="model")
        if "base" in t2.index:
            ssim = pd.Series([float(t2.at["base", f]) if f in AUGMENTATION_ATTACKS and f in t2.columns else np.nan
                              for f in families], index=table.index)
    out = table.assign(one_minus_ssim=ssim)
    path = run / "landscapes" / "sharpness.csv"
    sharp = pd.read_csv(path, index_col="model") if path.exists() else pd.DataFrame()
    for src, dst in SHARPNESS_COLUMNS.items():
        values = sharp[src] if src in sharp.columns else pd.Series(dtype=float)
        out[dst] = pd.to_numeric(values.reindex(out.index), errors="coerce").to_numpy()
    return out


# --- what the numbers say -----------------------------------------------------------------------


def distinct_models(table: pd.DataFrame) -> pd.DataFrame:
    """`table` without the `<name>_early` rows whose early-stopping epoch is `<name>`'s final epoch:
    those are the same weights, and counting them twice would inflate n in a correlation."""
    same = [f"{name}{EARLY_SUFFIX}" for name in table.index
            if f"{name}{EARLY_SUFFIX}" in table.index and "epoch" in table.columns
            and table.at[f"{name}{EARLY_SUFFIX}", "epoch"] == table.at[name, "epoch"]]
    return table.drop(index=same)


def correlations(table: pd.DataFrame, robustness: Sequence[str] = ROBUSTNESS, flatness: Sequence[str] = FLATNESS,
                 **kwargs: Any) -> pd.DataFrame:
    """`advkit.correlation.correlation_table` over the columns of `table` that exist, each distinct set
    of weights once (`distinct_models`); kwargs: methods, ci, n_resamples, confidence_level, seed."""
    table = distinct_models(table)
    rob = [c for c in robustness if c in table.columns]
    flat = [c for c in flatness if c in table.columns]
    if not rob or not flat:
        raise ValueError(f"the table has none of the robustness columns {list(robustness)} or none of the "
                         f"flatness columns {list(flatness)}")
    return correlation_table(table, rob, flat, **kwargs)


def correlation_view(corr: pd.DataFrame, min_n: int = 3, decimals: int = 3) -> pd.DataFrame:
    """Wide view of `correlations`: one row per (robustness, flatness, n) pair with at least `min_n`
    models, columns (method, statistic / ci_low / ci_high), rounded."""
    sub = corr[corr["n"] >= min_n]
    methods = [m for m in ("pearson", "spearman", "kendall") if m in set(sub["method"])]
    stats = ["statistic", "ci_low", "ci_high"]
    wide = sub.set_index(["robustness", "flatness", "method"])[stats].unstack("method")
    wide = wide.swaplevel(0, 1, axis=1).reindex(columns=pd.MultiIndex.from_product([methods, stats]))
    pairs = pd.MultiIndex.from_frame(sub[["robustness", "flatness"]].drop_duplicates())
    wide = wide.reindex(pairs)
    wide.insert(0, ("", "n"), sub.groupby(["robustness", "flatness"])["n"].first().reindex(pairs).to_numpy())
    return wide.round(decimals)


def available_pairs(table: pd.DataFrame, pairs: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    """The (x, y) column pairs of `pairs` that at least one model has both values of (what can be plotted)."""
    return [(a, b) for a, b in pairs
            if a in table.columns and b in table.columns and table[[a, b]].notna().all(axis=1).any()]


def trajectories(table: pd.DataFrame) -> list[str]:
    """Families with checkpoints at two or more epochs (for Stutz et al.'s Fig. 5)."""
    rows = table.dropna(subset=["epoch"])
    return [f for f, g in rows.groupby("family") if g["epoch"].nunique() >= 2]


def read_histories(run: str | Path, families: Sequence[str]) -> dict[str, pd.DataFrame]:
    """{family: its `fit` history (history/<family>.csv)} for the families that have one."""
    run = Path(run)
    return {f: pd.read_csv(run / "history" / f"{f}.csv") for f in families
            if (run / "history" / f"{f}.csv").exists()}


def overview(table: pd.DataFrame, decimals: int = 3) -> pd.DataFrame:
    """The headline columns of `flatness_table` (those present), rounded: what notebook 05 shows."""
    cols = ["epoch", "early_stopped", "clean_acc", "robust_acc", "robust_err", "robust_err_train",
            "robust_loss_train", "robust_loss_test", "robust_gap", "avg_case_flatness", "avg_case_flatness_train",
            "worst_case_flatness", "hessian_top_eig", "hessian_trace", "relative_flatness", "relative_flatness_adv",
            "one_minus_ssim", "surface_sharpness"]
    return table[[c for c in cols if c in table.columns]].round(decimals)


def early_stopping_table(table: pd.DataFrame, decimals: int = 3) -> pd.DataFrame:
    """Stutz et al. Table 1 for every model with early-stopped weights (`<name>` and `<name>_early`):
    test and train RErr and flatness in RLoss of the final weights, then RErr, RLoss and flatness
    after early stopping, and whether early stopping found a flatter minimum (their Sec. 4; NaN
    when the early-stopped epoch is the final one)."""
    rows = {}
    for name in table.index:
        early = f"{name}{EARLY_SUFFIX}"
        if early not in table.index:
            continue
        final, stopped = table.loc[name], table.loc[early]
        rows[name] = {"robust_err": final.get("robust_err"), "robust_err_train": final.get("robust_err_train"),
                      "avg_case_flatness": final.get("avg_case_flatness"),
                      "robust_loss_test": final.get("robust_loss_test"),
                      "early_epoch": stopped.get("epoch"), "early_robust_err": stopped.get("robust_err"),
                      "early_robust_loss_test": stopped.get("robust_loss_test"),
                      "early_avg_case_flatness": stopped.get("avg_case_flatness"),
                      # NaN when early stopping kept the final epoch (the same weights)
                      "early_flatter": (np.nan if stopped.get("epoch") == final.get("epoch") else
                                        bool(stopped.get("avg_case_flatness") < final.get("avg_case_flatness")))}
    out = pd.DataFrame.from_dict(rows, orient="index")
    out.index.name = "model"
    return out.round(decimals)


def settings_of(table: pd.DataFrame) -> pd.Series:
    """The settings every row was computed with (one set; ValueError if rows disagree)."""
    keys = table["settings"].unique()
    if len(keys) != 1:
        raise ValueError(f"rows were computed with {len(keys)} different settings")
    return pd.Series(json.loads(keys[0]))


def confidence_summary(clean: pd.DataFrame, adversarial: pd.DataFrame,
                       confident: float = 0.9) -> pd.DataFrame:
    """Walter et al. 2025 in numbers: per input kind, accuracy, mean confidence, median relative
    flatness and the share of inputs that are confidently (max softmax >= `confident`) wrong.
    Inputs: `advkit.flatness.confidence_flatness` tables for clean and adversarial inputs."""
    rows = {}
    for kind, df in (("clean", clean), ("adversarial", adversarial)):
        rows[kind] = {"n": len(df), "accuracy": df["correct"].mean(), "mean_confidence": df["confidence"].mean(),
                      "median_relative_flatness": df["relative_flatness"].median(),
                      "confidently_wrong": ((df["confidence"] >= confident) & ~df["correct"]).mean()}
    return pd.DataFrame.from_dict(rows, orient="index")


RUN_CLAIMS: tuple[Claim, ...] = SEED_CLAIMS


def summary(table: pd.DataFrame, correlations: pd.DataFrame,
            confidence: tuple[pd.DataFrame, pd.DataFrame] | None = None, *,
            claims: Sequence[Claim] = RUN_CLAIMS, method: str = "spearman", base: str = "base") -> str:
    """Plain-language summary of notebook 05 generated from the numbers.

    The cross-model claims (`advkit.correlation.summarize`), Xu et al.'s "adversarial
    fine-tuning sharpens the surface" as a count of fine-tunes sharper than `base`, and
    Walter et al.'s "adversarial examples sit in flat regions" from (clean, adversarial)
    `confidence_flatness` tables of one model (Mann-Whitney U test).
    """
    n = len(table)
    lines = [f"{n} model{'s' if n != 1 else ''} measured ({', '.join(map(str, table.index))})."]
    if n < 3:
        lines.append("Correlations across models need at least 3 models (4 for a confidence interval); "
                     "this run has too few, so no cross-model claim can be tested. Add fine-tuned or "
                     "adversarially trained models (notebook 03).")
    else:
        lines.append(summarize(correlations, claims, method=method))
    lines += _xu_line(table, base)
    if confidence is not None:
        lines.append(_walter_line(*confidence))
    if n >= 3:
        epochs = sum(split_name(m)[1] is not None or m.endswith(EARLY_SUFFIX) for m in table.index)
        lines.append(f"How far to trust this: {n} models from one seed, evaluated on one subset"
                     + (f"; {epochs} of them are checkpoints of another model's training run, so the models are "
                        "not independent" if epochs else "")
                     + "; several claims are tested at once without correction, so one SUPPORTED verdict among "
                       "them can be chance. Treat verdicts as hypotheses for the paper profile.")
    return "\n".join(lines)


def _xu_line(table: pd.DataFrame, base: str) -> list[str]:
    """How many of Xu et al.'s fine-tunes have a sharper surface than the base model (none if unknown)."""
    sharp = table["surface_sharpness"] if "surface_sharpness" in table.columns else pd.Series(dtype=float)
    if base not in sharp.index or not np.isfinite(sharp[base]):
        return []
    tuned = [f for f in AUGMENTATION_ATTACKS if f in sharp.index and np.isfinite(sharp[f])]
    if not tuned:
        return []
    sharper = [f for f in tuned if sharp[f] > sharp[base]]
    return [f"- Xu et al. 2019 (fine-tuning sharpens the landscape): {len(sharper)} of {len(tuned)} adversarially "
            f"fine-tuned models have a sharper clean-loss surface than {base} ({', '.join(sharper) or 'none'}); "
            "one run, one direction pair: an indication only."]


def _walter_line(clean: pd.DataFrame, adv: pd.DataFrame) -> str:
    """Walter et al.'s claim for one model: is kappa smaller on adversarial than on clean inputs?"""
    flatter = scipy.stats.mannwhitneyu(adv["relative_flatness"], clean["relative_flatness"], alternative="less")
    sharper = scipy.stats.mannwhitneyu(adv["relative_flatness"], clean["relative_flatness"], alternative="greater")
    verdict = ("SUPPORTED" if flatter.pvalue < 0.05 else
               "CONTRADICTED (adversarial inputs sit in SHARPER regions)" if sharper.pvalue < 0.05 else
               "INCONCLUSIVE")
    wrong = ((adv["confidence"] >= 0.9) & ~adv["correct"].astype(bool)).mean()
    return (f"- Walter et al. 2025 (adversarial examples sit in flatter regions): {verdict} for one model - "
            f"median relative flatness {adv['relative_flatness'].median():.3g} on adversarial vs "
            f"{clean['relative_flatness'].median():.3g} on clean inputs (one-sided Mann-Whitney "
            f"p = {min(flatter.pvalue, sharper.pvalue):.2g}, n = {len(adv)} images); {100 * wrong:.0f}% of the "
            "adversarial inputs are confidently (>= 0.9) wrong, and kappa is small exactly where the model is "
            "confident, so this tracks how confident the attack leaves it.")
