"""One declaration per notebook parameter: its type, range, list-element rule and the
cross-parameter rules it takes part in, so every value is checked before a notebook starts.

A declaration checks with the library's own validators and is built from the library's own names
and rules (`advkit._checks`, the torch-free part of the library: optimizers, schedules, recipes,
Xu et al.'s attacks, the seed range, the device rule, the quadratic-fit point rule); the library's
settings dataclasses check themselves with the same validators and never import this module.

Torch-free: only the pipeline layer (advkit.pipeline and the modules that run it) imports it, and
`checked_values` fails on a bad value in well under a second. The checks that need the library (variant
specs) or the machine (run name, device, files) are `advkit.pipeline.driver`'s. `notebook_parameters` reads
the notebooks' `parameters` cells with `ast`; tests/pipeline/test_params.py keeps this table, those
cells and the profiles in step.
"""

from __future__ import annotations

import ast
import difflib
import io
import json
import math
import re
import tokenize
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from advkit._checks import (
    AUGMENT_DTYPES,
    AUGMENT_MODES,
    CI_METHODS,
    DIRECTION_NORMS,
    HESSIAN_BACKENDS,
    MAX_SEED,
    OPTIMIZERS,
    QUADRATIC_FIT_POINTS,
    RECIPES,
    SCHEDULES,
    XU_ATTACKS,
    check_choice,
    check_device,
    check_int,
    check_number,
    points_within,
    shown,
)

# Registries of constructors in torch-importing modules, named here so that validation does not import torch;
# tests/pipeline/test_params.py asserts that they equal advkit's own. (Plain choices live in advkit._checks.)
MODELS = ("small_cnn", "resnet20", "resnet32", "resnet44", "resnet56", "preact_resnet18", "resnet18")
DATASETS = ("digits", "cifar10")
SPLITS = ("test", "train")
# (train, test) images of each dataset (digits: 1797 split 1437/360; CIFAR-10: 50000/10000).
DATASET_SIZES = {"digits": (1437, 360), "cifar10": (50000, 10000)}
NUM_CLASSES = 10  # both datasets
# Largest loss-landscape grids: a resolution x resolution grid holds float64 arrays of that many
# points and needs a forward pass over n_images per point; 1000^2 points (8 MB per quantity) is
# already weeks of compute, 100000^2 would need 74.5 GiB per quantity.
MAX_GRID_POINTS = 10**6
# Image side of each dataset in pixels: stAdv's flow bound cannot exceed it (advkit.attacks.evaluate.stadv_flow_sweep).
IMAGE_SIDES = {"digits": 8, "cifar10": 32}
# File-name parts: a component holds 255 bytes; the kit adds up to 40 around a name (`.<name>.<pid>.<random>.tmp`
# of atomic writes, `.sha256` sidecars), and a model's name holds its variant and `_eNNN` besides model_suffix.
FILE_NAME_BYTES = 255 - 40
MAX_SUFFIX_BYTES = 100


@dataclass(frozen=True)
class Param:
    """How one parameter is checked: its `kind` (int, float, str, bool, list), `check(name, value)`
    raising ValueError (`allowed` says the rule in words), None accepted when `optional`, and
    `item` checking each element of a list of at least `min_len`, no value twice when `distinct`."""

    kind: type
    allowed: str = ""
    check: Callable[[str, Any], None] | None = None
    optional: bool = False
    item: Param | None = None
    min_len: int = 0
    distinct: bool = False


def _or_none(words: str, optional: bool) -> str:
    return words + (" or None" if optional else "")


def integer(lo: int = 0, hi: int | None = None, optional: bool = False) -> Param:
    """An int (not a bool) in [lo, hi] (`advkit._checks.check_int`)."""
    words = f"an integer >= {lo}" if hi is None else f"an integer in [{lo}, {hi}]"
    return Param(int, _or_none(words, optional), lambda name, v: check_int(name, v, lo, hi), optional)


def number(lo: float = -math.inf, hi: float = math.inf, lo_open: bool = False, optional: bool = False) -> Param:
    """A finite float in [lo, hi] ((lo, hi] when `lo_open`; `advkit._checks.check_number`)."""
    if hi == math.inf:
        words = f"a finite number {'>' if lo_open else '>='} {lo:g}"
    else:
        words = f"a number in {'(' if lo_open else '['}{lo:g}, {hi:g}]"
    return Param(float, _or_none(words, optional),
                 lambda name, v: check_number(name, v, lo, hi, low_open=lo_open), optional)


def choice(values: Sequence[str], optional: bool = False) -> Param:
    """One of the names `values` (`advkit._checks.check_choice`)."""
    return Param(str, _or_none(f"one of {list(values)}", optional),
                 lambda name, v: check_choice(name, v, values), optional)


def _check_text(name: str, value: Any) -> None:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{name}={shown(value)} must be a non-empty string")


def text(optional: bool = False, allowed: str = "a non-empty string", max_bytes: int | None = None) -> Param:
    """A non-empty string (a name, a path; `allowed` says which) of at most `max_bytes` in UTF-8
    (a file name's part)."""
    def check(name: str, value: Any) -> None:
        _check_text(name, value)
        if max_bytes is not None and len(value.encode("utf-8", "surrogateescape")) > max_bytes:
            raise ValueError(f"{name}={shown(value)} is {len(value.encode('utf-8', 'surrogateescape'))} bytes long: "
                             f"a file name's part holds at most {max_bytes}")
    words = allowed + (f" of at most {max_bytes} bytes" if max_bytes is not None else "")
    return Param(str, _or_none(words, optional), check, optional)


def _check_flag(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {shown(value)}")


def flag() -> Param:
    return Param(bool, "true or false", _check_flag)


def listof(item: Param, min_len: int = 1, distinct: bool | None = None) -> Param:
    """A list whose elements each pass `item`, with at least `min_len`; `distinct` (default: for names) refuses
    repeats, for the grids whose values index a table (a repeated eps breaks notebook 02's pivot)."""
    words = f"a list{' of at least one element' if min_len else ''}, each {item.allowed}"
    return Param(list, words, None, item=item, min_len=min_len,
                 distinct=item.kind is str if distinct is None else distinct)


def _grid(max_points: float, dims: int, lo: int = 3) -> Param:
    """Points per axis of a `dims`-D landscape grid, bounded so the grid fits (MAX_GRID_POINTS)."""
    return integer(lo, int(round(max_points ** (1 / dims))))


def _check_robust_resolution(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value != 0:  # 0: off
        _grid(MAX_GRID_POINTS, 2).check(name, value)


ZOO_PARTS = ("xu", "at", "report")  # notebook 03's parts: Xu fine-tunes, adversarial training, the zoo's tables
_SUFFIX = re.compile(r"[A-Za-z0-9_.+-]*")


def _check_suffix(name: str, value: Any) -> None:
    if not isinstance(value, str) or not _SUFFIX.fullmatch(value) or value.startswith("."):
        raise ValueError(f"{name}={shown(value)} must be letters, digits and _ . + - "
                         f"(a file-name suffix; may be empty)")
    if len(value) > MAX_SUFFIX_BYTES:
        raise ValueError(f"{name}={shown(value)} is {len(value)} characters long: a file-name suffix holds at most "
                         f"{MAX_SUFFIX_BYTES}")


EPS = number(0, 1)  # a budget in [0, 1] pixel space
STEPS = integer(1, 100_000)
PARAMS: dict[str, Param] = {
    # shared
    "run": text(allowed="a run name (a folder name)", max_bytes=FILE_NAME_BYTES),
    "dataset": choice(DATASETS),
    "data_dir": text(optional=True),
    "device": Param(str, "auto, cpu, cuda or cuda:N", check_device),
    "seed": integer(0, MAX_SEED),
    "threads": integer(1, optional=True),
    # 01 base model
    "model": choice(MODELS),
    "n_train": integer(1, optional=True),
    "epochs": integer(1),
    "batch_size": integer(1),
    "optimizer": choice(OPTIMIZERS),
    "lr": number(0, lo_open=True),
    "weight_decay": number(0),
    "schedule": choice(SCHEDULES),
    "recipe": choice(RECIPES),
    "pretrained_checkpoint": text(optional=True),
    # 02 attacks
    "n_eval": integer(1),
    "fgsm_eps": EPS,
    "xu_pgd_eps": EPS,
    "xu_pgd_steps": STEPS,
    "stadv_tau": number(0),
    "stadv_steps": STEPS,
    "stadv_max_flow": number(0, lo_open=True, optional=True),
    "stadv_flow_grid": listof(number(0, lo_open=True), distinct=True),  # pixels; each <= the image side (RULES)
    "n_autoattack": integer(1),
    "aa_eps": EPS,
    "aa_steps": STEPS,
    "aa_targets": integer(1, NUM_CLASSES - 1),
    "eps_grid": listof(EPS, distinct=True),
    # 03 zoo
    "xu_attacks": listof(choice(XU_ATTACKS)),
    "finetune_epochs": integer(1),
    "finetune_lr": number(0, lo_open=True),
    "finetune_batch_size": integer(1),
    "xu_augment_eps": number(0, 1, lo_open=True, optional=True),
    "xu_augment_mode": choice(AUGMENT_MODES),
    "xu_storage": choice(AUGMENT_DTYPES),
    # each spec is parsed by advkit.training.variants.parse_variant (imports torch):
    # advkit.pipeline.driver.check_variants
    "at_variants": listof(text(allowed="a variant objective[+modifier...] (advkit.training.variants)")),
    "at_model": choice(MODELS, optional=True),
    "at_epochs": integer(1),
    "at_eps": EPS,
    "at_alpha": number(0, 1, lo_open=True, optional=True),
    "at_steps": STEPS,
    "at_batch_size": integer(1),
    "n_robust_train": integer(1),
    "n_robust_test": integer(1),
    "n_val": integer(1),
    "epoch_eps": EPS,
    "epoch_steps": STEPS,
    "early_stop_steps": STEPS,
    "keep_epochs": listof(integer(1), min_len=0),
    "zoo_parts": listof(choice(ZOO_PARTS)),
    "model_suffix": Param(str, f"letters, digits and _ . + - (may be empty), at most {MAX_SUFFIX_BYTES}",
                          _check_suffix),
    # 04 landscapes
    "n_images": integer(1),
    "landscape_split": choice(SPLITS),
    "direction_seed": integer(0, MAX_SEED),
    "normalization": choice(DIRECTION_NORMS),
    "span": number(0, lo_open=True),
    "resolution": _grid(MAX_GRID_POINTS, 2),
    "line_resolution": _grid(MAX_GRID_POINTS, 1),
    "log_scale": flag(),
    "robust": flag(),
    "pgd_eps": EPS,
    "pgd_steps": STEPS,
    "robust_n_images": integer(1, optional=True),
    "robust_resolution": Param(int, f"0 (off) or {_grid(MAX_GRID_POINTS, 2).allowed}", _check_robust_resolution),
    "radius": number(0, lo_open=True),
    "sensitivity_norms": listof(choice(DIRECTION_NORMS)),
    "sensitivity_radii": listof(number(0, lo_open=True), distinct=True),
    "sensitivity_none_radii": listof(number(0, lo_open=True), distinct=True),
    "sensitivity_resolution": _grid(MAX_GRID_POINTS, 1, lo=4),
    "direction_replicates": integer(2, 1000),  # advkit.landscape.replicates: direction seeds per surface
    "replicate_norms": listof(choice(DIRECTION_NORMS)),
    "replicate_dims": listof(integer(1, 2), distinct=True),
    "replicate_resolution": _grid(MAX_GRID_POINTS, 2, lo=5),
    "replicate_n_images": integer(1),
    "replicate_robust": choice(("filter", "all")),
    "curvature_images": integer(1),  # advkit.landscape.bridge: eigenvalue maps on the landscape subset's first images
    "eigen_map_resolution": _grid(MAX_GRID_POINTS, 2),
    "eigen_map_steps": integer(2, 1000),
    # advkit.pipeline.driver.check_environment
    "eigen_map_models": listof(text(allowed="a model of the run"), min_len=0),
    "overwrite": flag(),
    # 05 flatness and correlation
    "n_subset": integer(1),
    "pgd_alpha": number(0, 1, lo_open=True, optional=True),
    "pgd_restarts": integer(1, 1000),
    "flatness_xi": number(0),
    "flatness_samples": integer(1),
    "worst_xi": number(0),
    "worst_steps": STEPS,
    "hessian_iters": integer(1),
    "hessian_samples": integer(3),  # Hutch++ needs 3 (advkit.studies.zoo.ZooSettings)
    "hessian_backend": choice(HESSIAN_BACKENDS),
    "n_resamples": integer(10),  # advkit.studies.correlation's bootstrap minimum
    "ci": choice(CI_METHODS),
    "confidence_model": text(),
    "confidence_eps": EPS,
    "invariance_images": integer(1),  # 05: scale-invariance audit (Stutz et al. Fig. 4)
    "recompute": flag(),
}


# ---------------------------------------------------------------- cross-parameter rules
@dataclass(frozen=True)
class Rule:
    """A constraint between parameters: `check(*values)` returns the problem in words, or None."""

    names: tuple[str, ...]
    check: Callable[..., str | None]


def _at_most(a: str, b: str) -> Rule:
    return Rule((a, b), lambda x, y: None if x is None or y is None or x <= y else f"{a} must be <= {b}")


def _fits_data(name: str, split: str, minus: str | None = None) -> Rule:
    """`name` images cannot exceed the dataset's `split` ("train", "test", or the name of the
    parameter holding it), less the `minus` images held out of it."""
    names = (name, "dataset") + ((split,) if split not in SPLITS else ()) + ((minus,) if minus else ())

    def check(n, dataset, *rest):
        which = rest[0] if split not in SPLITS else split
        held_out = rest[-1] if minus else 0
        if n is None or dataset not in DATASET_SIZES or which not in SPLITS:
            return None
        size = DATASET_SIZES[dataset][SPLITS.index(which) ^ 1] - (held_out or 0)  # sizes are (train, test)
        if n > size:
            what = f"{which} images" + (f" left beside {minus}={held_out}" if minus else "")
            return f"{name} must be <= {size}, the {dataset} {what}"
        return None
    return Rule(names, check)


def _keep_epochs(keep, epochs):
    late = [e for e in keep if e > epochs]
    return f"keep_epochs {late} lie beyond at_epochs: they would never be saved" if late else None


def _radius_rule(res_name: str, dims: int) -> Rule:
    """landscape.check_radius: the quadratic fit needs QUADRATIC_FIT_POINTS[dims] points within `radius`."""
    def check(radius, span, resolution):
        n = points_within(radius, np.linspace(-float(span), float(span), int(resolution)), dims)
        need = QUADRATIC_FIT_POINTS[dims]
        if n < need:
            return (f"radius holds only {n} point(s) of the {dims}D grid of {resolution} points over "
                    f"[-span, span]; the quadratic fit needs {need}: increase radius or {res_name}, or decrease span")
        return None
    return Rule(("radius", "span", res_name), check)


def _sensitivity(norms):
    if "filter" not in norms:
        return "sensitivity_norms must include 'filter': its largest radius is the reference ordering"
    return None


def _pretrained(checkpoint, dataset, model):
    if checkpoint is None or (dataset == "cifar10" and model in AKAMASTER_MODELS):
        return None
    return ("pretrained_checkpoint (akamaster's CIFAR-10 ResNets) needs dataset='cifar10' and model in "
            f"{list(AKAMASTER_MODELS)}")


def _flow_bounds(grid, max_flow, dataset):
    """stAdv's flow bounds (pixels) cannot exceed the image side (advkit.attacks.evaluate.stadv_flow_sweep)."""
    side = IMAGE_SIDES.get(dataset)
    over = [f for f in [*(grid or []), max_flow] if side is not None and isinstance(f, (int, float)) and f > side]
    return f"stAdv flow bounds {shown(over)} exceed the {dataset} image side of {side} pixels" if over else None


AKAMASTER_MODELS = ("resnet20", "resnet32", "resnet44", "resnet56")
RULES: list[Rule] = [
    Rule(("stadv_flow_grid", "stadv_max_flow", "dataset"), _flow_bounds),
    Rule(("pretrained_checkpoint", "dataset", "model"), _pretrained),
    _at_most("n_autoattack", "n_eval"),
    _at_most("robust_n_images", "n_images"),
    _at_most("curvature_images", "n_images"),
    _at_most("invariance_images", "n_subset"),
    Rule(("keep_epochs", "at_epochs"), _keep_epochs),
    _fits_data("n_train", "train"),
    _fits_data("n_eval", "test"),
    _fits_data("n_images", "landscape_split"),
    _fits_data("n_subset", "test"),
    _fits_data("n_robust_train", "train"),
    _fits_data("n_robust_test", "test"),
    _fits_data("n_val", "test", minus="n_robust_test"),  # the last n_val test images, after the first n_robust_test
    _radius_rule("resolution", 2),
    _radius_rule("line_resolution", 1),
    Rule(("sensitivity_norms",), _sensitivity),
]


# ---------------------------------------------------------------- notebook parameters cells
def notebook_parameters(paths: Sequence[Path]) -> dict[str, dict[str, dict[str, Any]]]:
    """{notebook: {parameter: {"inferred_type_name", "default", "help"}}} read from each
    notebook's `parameters` cell with `ast` (the keys of papermill.inspect_notebook)."""
    return {Path(p).stem: parameters_cell(Path(p)) for p in paths}


def parameters_cell(path: Path) -> dict[str, dict[str, Any]]:
    nb = json.loads(Path(path).read_text())
    cells = [c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])]
    if not cells:
        return {}
    source = "".join(cells[0]["source"]) if isinstance(cells[0]["source"], list) else cells[0]["source"]
    comments = {tok.start[0]: tok.string.lstrip("#").strip()
                for tok in tokenize.generate_tokens(io.StringIO(source).readline) if tok.type == tokenize.COMMENT}
    out = {}
    for node in ast.parse(source).body:
        if isinstance(node, (ast.AnnAssign, ast.Assign)):
            target = node.target if isinstance(node, ast.AnnAssign) else node.targets[0]
            if not isinstance(target, ast.Name):
                continue
            out[target.id] = {"inferred_type_name": ast.unparse(node.annotation)
                              if isinstance(node, ast.AnnAssign) else "None",
                              "default": ast.literal_eval(node.value), "help": comments.get(node.lineno, "")}
    return out


# ---------------------------------------------------------------- validation
def coerce(name: str, value: Any, raw: str | None = None) -> Any:
    """Read a value as its declaration's type: a number given for a text parameter is that
    text (`run=2024` names the run "2024"); YAML 1.1's "1e-3" string is a float."""
    decl = PARAMS.get(name)
    if decl is None or value is None:
        return value
    if decl.kind is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return raw.strip() if raw is not None else str(value)
    if decl.kind is float and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def check(name: str, value: Any, decl: Param) -> None:
    """Raise ValueError naming `name` when `value` breaks `decl` (None, type, range, elements)."""
    if value is None:
        if not decl.optional:
            raise ValueError(f"{name}=None is not allowed: must be {decl.allowed}")
        return
    if decl.item is None:
        decl.check(name, value)
        return
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{name}={shown(value)} must be {decl.allowed}")
    if len(value) < decl.min_len:
        raise ValueError(f"{name}=[] is empty: must be {decl.allowed}")
    for i, v in enumerate(value):
        check(f"{name}[{i}]", v, decl.item)
    seen: set[Any] = set()
    for v in value if decl.distinct else ():
        if v in seen:
            raise ValueError(f"{name}={shown(list(value))} repeats an element, {shown(v)}: each value may appear once")
        seen.add(v)


def check_value(name: str, value: Any, decl: Param) -> str | None:
    """The problem with one value in words (as `check` raises it), or None."""
    try:
        check(name, value, decl)
    except ValueError as err:
        return str(err)
    return None


def effective_values(values: Mapping[str, Any], declared: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The notebooks' defaults (first notebook that declares a name) overridden by `values`."""
    out: dict[str, Any] = {}
    for params in declared.values():
        for name, info in params.items():
            out.setdefault(name, info["default"])
    return {**out, **values}


def checked_values(values: Mapping[str, Any], declared: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Raise ValueError naming the first unknown, mistyped or out-of-range parameter, then the
    first violated cross-parameter rule (naming every parameter in it); return the effective
    values (the notebooks' defaults overridden by `values`). Torch-free: the checks of variant
    specs and of the machine are `advkit.pipeline.driver.check_parameters`'s."""
    known = {name for params in declared.values() for name in params}
    for name, value in values.items():
        if name not in known:
            close = difflib.get_close_matches(str(name), sorted(known), n=3)
            hint = (f"did you mean {' or '.join(map(repr, close))}?" if close
                    else f"the notebooks take: {', '.join(sorted(known))}")
            raise ValueError(f"unknown parameter {shown(name)}; {hint}")
        if name not in PARAMS:
            raise ValueError(f"parameter {shown(name)} has no declaration in advkit/params.py (PARAMS)")
        problem = check_value(name, value, PARAMS[name])
        if problem:
            raise ValueError(f"parameter {problem}")
    full = effective_values(values, declared)
    for rule in RULES:
        if all(n in full for n in rule.names):
            problem = rule.check(*[full[n] for n in rule.names])
            if problem:
                given = ", ".join(f"{n}={shown(full[n])}" for n in rule.names)
                raise ValueError(f"parameters {given}: {problem}")
    return full


def expected_models(values: Mapping[str, Any], name: Callable[[str], str] = str) -> list[str]:
    """The models a full run makes: base (01), the Xu fine-tunes and each adversarial training
    variant (03), final and early-stopped, with its kept epochs (`<name>_eNNN`); `name` maps a
    variant spec to its model name (advkit.training.variants). Only the `zoo_parts` that train ("xu", "at")
    count, and every trained name ends in `model_suffix` (a sweep cell's, advkit.pipeline.sweep)."""
    parts, suffix = values.get("zoo_parts") or ZOO_PARTS, values.get("model_suffix") or ""
    xu = [a + suffix for a in values.get("xu_attacks") or []] if "xu" in parts else []
    variants = [name(v) + suffix for v in values.get("at_variants") or []] if "at" in parts else []
    return (["base"] + xu + variants + [f"{v}_early" for v in variants]
            + [f"{v}_e{e:03d}" for v in variants for e in values.get("keep_epochs") or []])
