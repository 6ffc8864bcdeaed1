"""The seed papers' published numbers, each with its source, beside a run's own values.

Every number below is copied from the plain-text seeds in `../shared/seeds/` (Xu et al. 2019,
`002_*.txt`; Stutz et al. 2021, `004_*.txt`) and carries its paper, table, row and column.
`reported_vs_reproduced(run, claims)` reads a run's files through `advkit.runs.run.Run` (checksums
verified) and writes one table per claim to `run.reported(claim)`
(`runs/<run>/reported_vs_reproduced/<claim>.csv`): published value, this run's value, difference.
Notebooks 02, 03 and 05 each call it before the later notebooks' files exist, so a missing file,
model or attack gives NaN with a note naming it, never an error.
Replicates: a sweep's `<name>_s<k>` (`runs.run.split_seed`) is replicate k of `<name>`; the run's value for
`<name>` is then the mean over its replicates (and a plain `<name>` row, if any), with a note naming
them and their range (`mean_over_replicates`). Runs without seed suffixes read as they are.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.stats

from advkit.data import DATASETS, Dataset
from advkit.runs.run import Run, split_seed

XU = "Xu, Yap & Prabhu 2019"
STUTZ = "Stutz, Hein & Schiele 2021"
XU_SEED = "002_15a8d46f6dca2b6f.txt"
STUTZ_SEED = "004_a09c8b1b8e3e3f94.txt"


@dataclass(frozen=True)
class Published:
    """One published number: claim it belongs to, where it is printed, and the run's name for its row/column."""

    claim: str
    paper: str
    table: str  # "Table 1", or the section whose text states it
    row: str  # as printed
    column: str  # as printed
    value: float
    unit: str
    model: str  # the run's model name for `row` ("" when the row is not a model)
    metric: str  # the run's column for `column`
    seed_file: str
    note: str = ""


def _xu_table1() -> list[Published]:
    rows = {"NONE": "base", "FGSM": "fgsm", "PGD": "pgd", "STADV": "stadv"}
    columns = {"GROUND ACC.": "clean", "FGSM": "fgsm", "PGD": "pgd", "STADV": "stadv"}
    values = {"NONE": (92.64, 16.88, 0.0, 0.0), "FGSM": (90.11, 75.23, 12.11, 0.0),
              "PGD": (87.34, 60.52, 51.20, 13.85), "STADV": (91.05, 55.84, 52.98, 25.49)}
    return [Published("xu_table1", XU, "Table 1", f"data augmented with {row}", col, v, "top-1 accuracy %",
                      rows[row], columns[col], XU_SEED,
                      "FGSM 8/255; PGD 1/255, 10 iterations; stAdv radius 0.3/64 (Sec. 3)")
            for row, vals in values.items() for col, v in zip(columns, vals)]


def _xu_table2() -> list[Published]:
    values = {"FGSM": 0.049344, "PGD": 0.008206, "STADV": 0.002801}
    return [Published("xu_table2", XU, "Table 2", f"data augmented with {row}", "1-SSIM", v, "1 - SSIM",
                      "base", row.lower(), XU_SEED, "mean SSIM distance of the attack's examples from the originals")
            for row, v in values.items()]


# Xu et al. Sec. 3: "the clean model ... appears to have the smoothest/most convex loss landscape (Fig 1(a)).
# Meanwhile, the FGSM-augmented model has the sharpest/least convex geometry, followed by PGD and then the
# comparatively smoother stAdv" (Fig. 1(b)-(d)); Sec. 3.1 ties it to Table 2's 1 - SSIM. Rank 1 = sharpest.
XU_SHARPNESS_ORDER = ("fgsm", "pgd", "stadv", "base")


def _xu_sharpness() -> list[Published]:
    return [Published("xu_sharpness_order", XU, "Sec. 3, Fig. 1", model, "sharpness rank", rank, "rank (1 = sharpest)",
                      model, "surface_sharpness", XU_SEED,
                      "stated qualitatively from the filter-normalized plots: FGSM > PGD > stAdv > clean")
            for rank, model in enumerate(XU_SHARPNESS_ORDER, start=1)]


# Stutz et al. Table 1 (CIFAR-10, ResNet-18, AutoAttack RErr on the first 1000 test images, flatness in RLoss
# Eq. 1 with xi = 0.5): (test RErr, train RErr, flatness in RLoss, RErr after early stopping). Where the seed's
# text lost a decimal point (AT-AWP "543", AutoAugment "479", Cyclic "354"), the value follows from the
# difference printed in brackets beside it.
STUTZ_TABLE1 = {
    "+Unlabeled": (48.9, 43.2, 0.32, 48.9), "Cyclic": (53.6, 35.4, 0.35, 53.6),
    "AutoAugment": (54.0, 47.9, 0.49, 53.5), "AT-AWP": (54.3, 43.1, 0.35, 53.6),
    "Label noise": (56.2, 30.0, 0.33, 55.5), "Weight clipping": (56.5, 39.0, 0.41, 56.5),
    "TRADES": (56.7, 15.8, 0.57, 53.4), "Self-supervision": (57.1, 45.0, 0.33, 56.8),
    "Weight decay": (58.1, 32.8, 0.50, 54.8), "Entropy-SGD": (58.6, 46.1, 0.28, 56.9),
    "MiSH": (59.8, 5.3, 1.56, 53.7), "“Late” multi-step": (59.8, 18.4, 0.80, 57.8),
    "SiLU": (60.0, 5.6, 1.71, 53.7), "Weight averaging": (60.0, 10.0, 1.28, 53.0),
    "Larger ε=9/255": (60.9, 11.1, 1.33, 53.8), "MART": (61.0, 20.8, 0.73, 54.7),
    "GeLU": (61.1, 3.2, 1.55, 56.7), "Label smoothing": (61.2, 8.0, 0.65, 54.0),
    "AT (baseline)": (62.8, 10.7, 1.21, 54.6),
}
# The run's model names (notebook 03's at_variants, advkit.training.variants specs) for Stutz et al.'s rows: the four
# objectives always get a row; PGD-AT with one regularizer (`pgd_at+ls0.1`, ...) gets its row when the run has it.
STUTZ_MODELS = {"AT (baseline)": "pgd_at", "TRADES": "trades", "MART": "mart", "AT-AWP": "awp"}
STUTZ_MODIFIERS = {"ls": "Label smoothing", "ln": "Label noise", "wd": "Weight decay", "ema": "Weight averaging",
                   "swa": "Weight averaging", "aa": "AutoAugment", "eps": "Larger ε=9/255"}


def stutz_row(model: str) -> str | None:
    """Stutz et al.'s Table 1 row for a run's model name (`pgd_at`, `pgd_at+ls0.1`, ...), None if none fits."""
    by_model = {m: row for row, m in STUTZ_MODELS.items()}
    if model in by_model:
        return by_model[model]
    head, _, rest = model.partition("+")
    if head != "pgd_at" or not rest or "+" in rest:
        return None
    token = rest.rstrip("0123456789.e-")
    return STUTZ_MODIFIERS.get(token)
STUTZ_COLUMNS = {"RErr (test)": ("test_robust_err_last", "RErr %"), "RErr (train)": ("train_robust_err_last", "RErr %"),
                 "Flatness (RLoss)": ("avg_case_flatness", "flatness in RLoss, Eq. 1"),
                 "RErr (early stop)": ("test_robust_err_best", "RErr %")}


def _stutz_table1() -> list[Published]:
    return [Published("stutz_table1", STUTZ, "Table 1", row, col, v, STUTZ_COLUMNS[col][1],
                      STUTZ_MODELS.get(row, ""), STUTZ_COLUMNS[col][0], STUTZ_SEED,
                      "RErr: AutoAttack, first 1000 test images; no early stopping except the last column")
            for row, vals in STUTZ_TABLE1.items() for col, v in zip(STUTZ_COLUMNS, vals)]


PUBLISHED: tuple[Published, ...] = tuple(_xu_table1() + _xu_table2() + _xu_sharpness() + _stutz_table1())
CLAIMS = ("xu_table1", "xu_table2", "xu_sharpness_order", "stutz_table1")


def published(claim: str | None = None) -> pd.DataFrame:
    """The published values (of one claim, or all) with their sources, one row per number."""
    if claim is not None:
        _check_claim(claim)
    rows = [asdict(p) for p in PUBLISHED if claim is None or p.claim == claim]
    return pd.DataFrame(rows)


def _check_claim(claim: str) -> None:
    if claim not in CLAIMS:
        raise ValueError(f"claim={claim!r} is not available; choose one of {list(CLAIMS)}")


# --- ordering claims ---------------------------------------------------------------------------------


def ordering_agreement(order: Sequence[str], values: Mapping[str, float]) -> dict[str, float | int | bool]:
    """Does a run's `values` (larger = first) order the items of `order` (published, first = largest) the same?

    Over the items present with a finite value: Kendall's tau between published and run ranks, the
    fraction of pairs ordered alike, and `matches` (every pair agrees); NaN when fewer than 2 items.
    """
    present = [k for k in order if k in values and np.isfinite(values[k])]
    out: dict[str, float | int | bool] = {"n_items": len(present), "kendall_tau": float("nan"),
                                          "pairwise_agreement": float("nan"), "matches": False}
    if len(present) < 2:
        return out
    run = np.array([values[k] for k in present], dtype=float)
    expected = -np.arange(len(present), dtype=float)  # published: first is largest
    pairs = list(itertools.combinations(range(len(present)), 2))
    agree = [np.sign(run[i] - run[j]) == np.sign(expected[i] - expected[j]) for i, j in pairs]
    out["kendall_tau"] = float(scipy.stats.kendalltau(expected, run).statistic)
    out["pairwise_agreement"] = float(np.mean(agree))
    out["matches"] = bool(all(agree))
    return out


# --- this run's values ------------------------------------------------------------------------------


def _read_csv(run: Run, path: Path) -> pd.DataFrame | None:
    """A table of the run (verified), None when the run has not made it yet."""
    return run.read_table(path, index_col=0) if path.exists() else None


def _name(run: Run, path: Path) -> str:
    return path.relative_to(run.root).as_posix()


def _lookup(table: pd.DataFrame | None, model: str, metric: str, source: str) -> tuple[float, str]:
    if table is None:
        return np.nan, f"{source} not in this run"
    if model not in table.index:
        return np.nan, f"model {model!r} not in {source}"
    if metric not in table.columns:
        return np.nan, f"{metric!r} not in {source}"
    value = pd.to_numeric(pd.Series([table.at[model, metric]]), errors="coerce").iloc[0]
    return float(value), "" if np.isfinite(value) else f"{metric!r} of {model!r} is empty in {source}"


def mean_over_replicates(table: pd.DataFrame | None) -> tuple[pd.DataFrame | None, dict[str, str]]:
    """`table` with the rows `<name>_s<k>` (replicate k of `<name>`, `runs.run.split_seed`) and `<name>` replaced
    by one row `<name>`, the mean of their numeric values; and per such name a note listing the replicates
    and each column's range. A table without seed suffixes comes back unchanged, with no notes."""
    if table is None:
        return None, {}
    stems = pd.Series([split_seed(str(m))[0] for m in table.index], index=table.index)
    seeded = {stem for m, stem in stems.items() if stem != m}
    if not seeded:
        return table, {}
    numeric = table.apply(pd.to_numeric, errors="coerce")
    rows, notes = {}, {}
    for m in table.index:
        stem = stems[m]
        if stem not in seeded:
            rows[m] = table.loc[m]
        elif stem not in rows:
            group = numeric[stems == stem]
            rows[stem] = group.mean()
            spread = ", ".join(f"{c} {group[c].min():.4g} to {group[c].max():.4g}" for c in group.columns
                               if group[c].notna().sum() > 1)
            count = f"mean of {len(group)} replicates" if len(group) > 1 else "one replicate"
            notes[stem] = (f"{count} ({', '.join(map(str, group.index))})"
                           + (f"; range: {spread}" if spread else ""))
    out = pd.DataFrame.from_dict(rows, orient="index")
    out.index.name = table.index.name
    return out, notes


def _xu_table1_values(run: Run) -> tuple[pd.DataFrame | None, str]:
    """Accuracy in %: notebook 03's zoo table, its missing rows from notebook 02's table."""
    paths = {name: run.attack_table(name) for name in ("zoo_table1_accuracy", "table1_accuracy")}
    zoo, base = (_read_csv(run, path) for path in paths.values())
    if zoo is None and base is None:
        return None, _name(run, paths["table1_accuracy"])
    table = base if zoo is None else zoo if base is None else zoo.combine_first(base)
    return table * 100, _name(run, paths["table1_accuracy" if zoo is None else "zoo_table1_accuracy"])


def _budget_notes(run: Run) -> dict[str, str]:
    """This run's attack budgets (notebook 02's budgets.json), to print beside Xu et al.'s."""
    path = run.attack_table("budgets", ".json")
    budgets = run.read_json(path) if path.exists() else {}
    keys = {"fgsm": ("eps",), "pgd": ("eps", "steps"), "stadv": ("tau", "max_flow")}
    return {name: "run " + ", ".join(f"{k}={budgets[name][k]:.4g}" if isinstance(budgets[name][k], float)
                                     else f"{k}={budgets[name][k]}" for k in ks if k in budgets[name])
            for name, ks in keys.items() if isinstance(budgets.get(name), dict)}


def _histories(run: Run) -> dict[str, list[str]]:
    """The run's training histories by model: `<name>` -> [`<name>`] or its replicates [`<name>_s<k>`, ...]."""
    found: dict[str, list[str]] = {}
    for stem in sorted(p.stem for p in (run / "history").glob("*.csv")):
        found.setdefault(split_seed(stem)[0], []).append(stem)
    return found


def _stutz_run_models(run: Run) -> list[str]:
    """The four objectives' names, then the run's other models (training histories, replicates as one)
    that have a Stutz row."""
    return list(STUTZ_MODELS.values()) + [m for m in _histories(run) if m not in STUTZ_MODELS.values()
                                          and stutz_row(m)]


def _stutz_values(run: Run) -> pd.DataFrame:
    """Per trained model (per replicate `<name>_s<k>`; `compare` averages them): RErr (%) at the last and
    at the selected epoch (history/<name>.csv) and the average-case flatness of notebook 05 (flatness.csv)."""
    rows: dict[str, dict[str, float]] = {}
    histories = _histories(run)
    for model in [h for m in _stutz_run_models(run) for h in histories.get(m, [m])]:
        history = _read_csv(run, run.history(model))
        row: dict[str, float] = {}
        if history is not None and "test_robust_err" in history.columns and len(history):
            history = history.reset_index()
            row["test_robust_err_last"] = 100 * float(history["test_robust_err"].iloc[-1])
            if "train_robust_err" in history.columns:
                row["train_robust_err_last"] = 100 * float(history["train_robust_err"].iloc[-1])
            if "val_robust_loss" in history.columns and history["val_robust_loss"].notna().any():
                best = history["val_robust_loss"].idxmin()
                row["test_robust_err_best"] = 100 * float(history["test_robust_err"].loc[best])
        if row:
            rows[model] = row
    flatness = _read_csv(run, run.flatness)
    table = pd.DataFrame.from_dict(rows, orient="index").reindex(columns=[c for c, _ in STUTZ_COLUMNS.values()])
    if flatness is not None and "avg_case_flatness" in flatness.columns:
        table["avg_case_flatness"] = pd.to_numeric(flatness["avg_case_flatness"], errors="coerce").reindex(table.index)
    return table


def _sources(run: Run, claim: str) -> tuple[pd.DataFrame | None, str]:
    if claim == "xu_table1":
        return _xu_table1_values(run)
    if claim in ("xu_table2", "xu_sharpness_order"):
        path = run.attack_table("table2_ssim_distance") if claim == "xu_table2" else run.landscape_table("sharpness")
        return _read_csv(run, path), _name(run, path)
    return _stutz_values(run), "history/"


def compare(run: Run | str | Path, claim: str, *, dataset: str | Dataset = "cifar10",
            models: Sequence[str] | None = None) -> pd.DataFrame:
    """One claim's table: published value, this run's value, difference (run - published) and notes.

    On a dataset other than CIFAR-10 the published values are shown for reference only: the
    difference is NaN and the note says so. On CIFAR-10 given as the loaded `Dataset`, every note names
    the files it came from (`Dataset.source`): on a JPEG copy the difference includes the copy's shift
    from the original pixels the papers measured on. The ordering claim adds rows with Kendall's tau
    and the pairwise agreement of the run's ordering (rank 1 = sharpest) with the published one.
    `models` keeps only those rows (e.g. ["base"] before the fine-tunes exist).
    """
    _check_claim(claim)
    data_note = f"run data: {dataset.source}" if isinstance(dataset, Dataset) and dataset.source else ""
    dataset = dataset.name if isinstance(dataset, Dataset) else dataset
    if dataset not in DATASETS:
        raise ValueError(f"dataset={dataset!r} is not available; choose one of {list(DATASETS)}")
    run = Run.of(run)
    comparable = dataset == "cifar10"
    data_note = data_note if comparable else ""  # elsewhere the reference note below names the dataset
    table, source = _sources(run, claim)
    table, replicates = mean_over_replicates(table)
    budgets = _budget_notes(run) if claim in ("xu_table1", "xu_table2") else {}
    entries = [p for p in PUBLISHED if p.claim == claim and claim != "stutz_table1"]
    if claim == "stutz_table1":  # a row per model of the run with a Stutz row (the four objectives always)
        entries = [replace(p, model=m) for m in _stutz_run_models(run) for p in PUBLISHED
                   if p.claim == claim and p.row == stutz_row(m)]
    entries = [p for p in entries if models is None or p.model in models]
    rows = []
    run_values = {p.model: _lookup(table, p.model, p.metric, source) for p in entries}
    ranks: dict[str, float] = {}
    if claim == "xu_sharpness_order":  # the run's rank among the models it has
        present = {m: v for m, (v, _) in run_values.items() if np.isfinite(v)}
        order = sorted(present, key=present.get, reverse=True)
        ranks = {m: float(order.index(m) + 1) if m in present else np.nan for m in run_values}
    for p in entries:
        value, note = _lookup(table, p.model, p.metric, source)
        if claim == "xu_sharpness_order":
            note = note or f"surface_sharpness = {value:.4g}"
            value = ranks[p.model]
        elif p.metric in budgets and np.isfinite(value):
            note = budgets[p.metric]
        elif claim == "stutz_table1" and p.metric == "avg_case_flatness" and p.model in table.index:
            note = ("run: flatness.csv, notebook 05's xi and subset" if np.isfinite(value)
                    else "no flatness.csv row for this model (notebook 05)")
        elif claim == "stutz_table1" and not note:
            note = "run: PGD RErr on notebook 03's fixed test subset"
        reference = data_note if comparable else f"published value is CIFAR-10; this run: {dataset} (for reference)"
        note = "; ".join(n for n in (note, replicates.get(p.model, "")) if n)
        diff = value - p.value if comparable or claim == "xu_sharpness_order" else np.nan
        rows.append({"claim": claim, "row": p.row, "column": p.column, "model": p.model, "published": p.value,
                     "reproduced": value, "difference": diff, "unit": p.unit,
                     "source": f"{p.paper}, {p.table}, {p.row}, {p.column}",
                     "note": "; ".join(n for n in (note, reference) if n)})
    if claim == "xu_sharpness_order":
        present = {m: v for m, (v, _) in run_values.items() if np.isfinite(v)}
        agreement = ordering_agreement(XU_SHARPNESS_ORDER, present)
        verdict = "matches" if agreement["matches"] else "differs"
        note = (f"{agreement['n_items']} of {len(XU_SHARPNESS_ORDER)} models; run ordering {verdict}: "
                + " > ".join(sorted(present, key=present.get, reverse=True)))
        for stat in ("kendall_tau", "pairwise_agreement"):
            rows.append({"claim": claim, "row": "ordering", "column": stat, "model": "", "published": 1.0,
                         "reproduced": agreement[stat], "difference": agreement[stat] - 1.0,
                         "unit": "", "source": f"{XU}, Sec. 3, Fig. 1, FGSM > PGD > stAdv > clean",
                         "note": "; ".join(n for n in (note, data_note) if n)})
    return pd.DataFrame(rows)


def reported_vs_reproduced(run: Run | str | Path, claims: Sequence[str] | str, *,
                           dataset: str | Dataset = "cifar10", models: Sequence[str] | None = None,
                           write: bool = True) -> pd.DataFrame:
    """The tables of `claims` for one run (rows of `models` only, if given), concatenated; each is also
    written atomically to `run.reported(claim)` (the notebooks' one call, given the loaded Dataset so
    that the notes name the data, `compare`)."""
    run = Run.of(run)
    claims = [claims] if isinstance(claims, str) else list(claims)
    for claim in claims:
        _check_claim(claim)
    tables = []
    for claim in claims:
        table = compare(run, claim, dataset=dataset, models=models)
        if write:
            run.write_table(run.reported(claim), table, index=False)
        tables.append(table)
    return pd.concat(tables, ignore_index=True)


def load_tables(run: Run | str | Path) -> dict[str, pd.DataFrame]:
    """Every reported-vs-reproduced table a run has written, by claim (verified)."""
    run = Run.of(run)
    return {c: run.read_table(run.reported(c)) for c in CLAIMS if run.reported(c).exists()}


__all__ = ["CLAIMS", "PUBLISHED", "Published", "STUTZ_MODELS", "XU_SHARPNESS_ORDER", "compare", "load_tables",
           "mean_over_replicates", "ordering_agreement", "published", "reported_vs_reproduced", "stutz_row"]


if __name__ == "__main__":  # print a run's tables: python -m advkit.studies.published runs/<run>
    import sys

    with pd.option_context("display.width", 200, "display.max_columns", 20, "display.max_colwidth", 60):
        for name, frame in load_tables(sys.argv[1]).items():
            print(f"\n## {name}\n")
            print(frame.drop(columns=["source"]).to_string(index=False))
