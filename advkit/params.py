"""One declaration per notebook parameter: its type, range, list-element rule and the
cross-parameter rules it takes part in, so every value is checked before a notebook starts.

`validate` needs neither torch nor papermill (a bad value fails in well under a second);
only the checks of the environment (`run` name, `device`, models of an existing run) import
advkit.runs, and they come last. `notebook_parameters` reads the notebooks' `parameters`
cells with `ast`; tests/test_params.py keeps this table and those cells in step.
"""

from __future__ import annotations

import ast
import io
import json
import math
import os
import tokenize
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Registries of the package, copied so that validation does not import torch;
# tests/test_params.py asserts that they equal advkit's own.
MODELS = ("small_cnn", "resnet20", "resnet32", "resnet44", "resnet56", "preact_resnet18", "resnet18")
DATASETS = ("digits", "cifar10")
OPTIMIZERS = ("sgd", "adam")                        # advkit.train.OPTIMIZERS
SCHEDULES = ("constant", "multistep", "cosine", "onecycle")  # advkit.train.SCHEDULES
NORMS = ("filter", "layer", "weight", "none")       # advkit.directions.NORMS
XU_ATTACKS = ("fgsm", "pgd", "stadv")               # advkit.augment.XU_ATTACKS
AUGMENT_MODES = ("static", "regenerate")            # advkit.augment.AUGMENT_MODES
AUGMENT_DTYPES = ("uint8", "float32")               # advkit.augment.DTYPES
SPLITS = ("test", "train")
HESSIAN_BACKENDS = ("forward", "reverse")           # advkit.zoo.HESSIAN_BACKENDS
CI_METHODS = ("fisher", "bootstrap")                # advkit.correlation.CI_METHODS
# (train, test) images of each dataset (digits: 1797 split 1437/360; CIFAR-10: 50000/10000).
DATASET_SIZES = {"digits": (1437, 360), "cifar10": (50000, 10000)}
NUM_CLASSES = 10  # both datasets
# Largest loss-landscape grids: a resolution x resolution grid holds float64 arrays of that many
# points and needs a forward pass over n_images per point; 1000^2 points (8 MB per quantity) is
# already weeks of compute, 100000^2 would need 74.5 GiB per quantity.
MAX_GRID_POINTS = 10**6


@dataclass(frozen=True)
class Param:
    """How one parameter is checked: `kind` (int, float, str, bool, list), `ok(value)` in words
    `allowed`, None accepted when `optional`, and `item` checking each element of a list."""

    kind: type
    allowed: str = ""
    ok: Callable[[Any], bool] | None = None
    optional: bool = False
    item: Param | None = None
    min_len: int = 0


def integer(lo: int | None = None, hi: int | None = None, optional: bool = False) -> Param:
    """An int (not a bool) in [lo, hi]."""
    words = f"an integer >= {lo}" if hi is None else f"an integer in [{lo}, {hi}]"
    return Param(int, words + (" or None" if optional else ""),
                 lambda v: (lo is None or v >= lo) and (hi is None or v <= hi), optional)


def number(lo: float = -math.inf, hi: float = math.inf, lo_open: bool = False, optional: bool = False) -> Param:
    """A finite float in [lo, hi] ((lo, hi] when `lo_open`)."""
    if hi == math.inf:
        words = f"a finite number {'>' if lo_open else '>='} {lo:g}"
    else:
        words = f"a number in {'(' if lo_open else '['}{lo:g}, {hi:g}]"
    return Param(float, words + (" or None" if optional else ""),
                 lambda v: (v > lo if lo_open else v >= lo) and v <= hi, optional)


def choice(values: Sequence[str]) -> Param:
    """One of the names `values`."""
    return Param(str, f"one of {list(values)}", lambda v: v in values)


def text(optional: bool = False) -> Param:
    """A non-empty string (a name, a path)."""
    return Param(str, "a non-empty string" + (" or None" if optional else ""), lambda v: v.strip() != "", optional)


def flag() -> Param:
    return Param(bool, "true or false")


def listof(item: Param, min_len: int = 1) -> Param:
    """A list whose elements each pass `item` (no repeats for names), with at least `min_len`."""
    words = f"a list{' of at least one element' if min_len else ''}, each {item.allowed}"
    return Param(list, words, None, item=item, min_len=min_len)


def _grid(max_points: float, dims: int, lo: int = 3) -> Param:
    """Points per axis of a `dims`-D landscape grid, bounded so the grid fits (MAX_GRID_POINTS)."""
    hi = int(round(max_points ** (1 / dims)))
    return integer(lo, hi)


def _variant(spec: str) -> bool:
    """An adversarial training variant `objective[+modifier...]` (advkit.variants.parse_variant;
    imports torch, so only when at_variants is given)."""
    from advkit.variants import parse_variant

    parse_variant(spec)
    return True


def _cuda_device(v: str) -> bool:
    return v in ("auto", "cpu", "cuda") or (v.startswith("cuda:") and v[5:].isdigit())


EPS = number(0, 1)  # a budget in [0, 1] pixel space
STEPS = integer(1, 100_000)
PARAMS: dict[str, Param] = {
    # shared
    "run": text(),
    "dataset": choice(DATASETS),
    "data_dir": text(optional=True),
    "device": Param(str, "auto, cpu, cuda or cuda:N", _cuda_device),
    "seed": integer(0),
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
    "pretrained_checkpoint": text(optional=True),
    # 02 attacks
    "n_eval": integer(1),
    "fgsm_eps": EPS,
    "xu_pgd_eps": EPS,
    "xu_pgd_steps": STEPS,
    "stadv_tau": number(0),
    "stadv_steps": STEPS,
    "stadv_max_flow": number(0, lo_open=True, optional=True),
    "stadv_flow_grid": listof(number(0, lo_open=True)),  # pixels; each <= the image side (stadv_flow_sweep checks)
    "n_autoattack": integer(1),
    "aa_eps": EPS,
    "aa_steps": STEPS,
    "aa_targets": integer(1, NUM_CLASSES - 1),
    "eps_grid": listof(EPS),
    # 03 zoo
    "xu_attacks": listof(choice(XU_ATTACKS)),
    "finetune_epochs": integer(1),
    "finetune_lr": number(0, lo_open=True),
    "finetune_batch_size": integer(1),
    "xu_augment_eps": number(0, 1, lo_open=True, optional=True),
    "xu_augment_mode": choice(AUGMENT_MODES),
    "xu_storage": choice(AUGMENT_DTYPES),
    "at_variants": listof(Param(str, "a variant objective[+modifier...] (advkit.variants)", _variant)),
    "at_model": Param(str, f"one of {list(MODELS)} or None", lambda v: v in MODELS, optional=True),
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
    # 04 landscapes
    "n_images": integer(1),
    "landscape_split": choice(SPLITS),
    "direction_seed": integer(0),
    "normalization": choice(NORMS),
    "span": number(0, lo_open=True),
    "resolution": _grid(MAX_GRID_POINTS, 2),
    "line_resolution": _grid(MAX_GRID_POINTS, 1),
    "log_scale": flag(),
    "robust": flag(),
    "pgd_eps": EPS,
    "pgd_steps": STEPS,
    "robust_n_images": integer(1, optional=True),
    "robust_resolution": Param(int, f"0 (off) or {_grid(MAX_GRID_POINTS, 2).allowed}",
                               lambda v: v == 0 or _grid(MAX_GRID_POINTS, 2).ok(v)),
    "radius": number(0, lo_open=True),
    "sensitivity_norms": listof(choice(NORMS)),
    "sensitivity_radii": listof(number(0, lo_open=True)),
    "sensitivity_none_radii": listof(number(0, lo_open=True)),
    "sensitivity_resolution": _grid(MAX_GRID_POINTS, 1, lo=4),
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
    "hessian_samples": integer(3),  # Hutch++ needs 3 (advkit.zoo.ZooSettings)
    "hessian_backend": choice(HESSIAN_BACKENDS),
    "n_resamples": integer(10),  # advkit.correlation's bootstrap minimum
    "ci": choice(CI_METHODS),
    "confidence_model": text(),
    "confidence_eps": EPS,
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
    """landscape.check_radius: the quadratic fit needs 4 (1D) or 7 (2D) points within `radius`."""
    def check(radius, span, resolution):
        n = points_within(radius, span, resolution, dims)
        need = 4 if dims == 1 else 7
        if n < need:
            return (f"radius holds only {n} point(s) of the {dims}D grid of {resolution} points over "
                    f"[-span, span]; the quadratic fit needs {need}: increase radius or {res_name}, or decrease span")
        return None
    return Rule(("radius", "span", res_name), check)


def points_within(radius: float, span: float, resolution: int, dims: int) -> int:
    """Grid points within `radius` of the centre, as advkit.landscape.check_radius counts them."""
    import numpy as np

    c = np.linspace(-float(span), float(span), int(resolution))
    if dims == 1:
        return int(np.sum(np.abs(c) <= radius + 1e-12))
    a, b = np.meshgrid(c, c)
    return int(np.sum(np.hypot(a, b) <= radius + 1e-12))


def _sensitivity(norms):
    if "filter" not in norms:
        return "sensitivity_norms must include 'filter': its largest radius is the reference ordering"
    return None


def _pretrained(checkpoint, dataset, model):
    if checkpoint is None or (dataset == "cifar10" and model in AKAMASTER_MODELS):
        return None
    return f"pretrained_checkpoint (akamaster's CIFAR-10 ResNets) needs dataset='cifar10' and model in {list(AKAMASTER_MODELS)}"


AKAMASTER_MODELS = ("resnet20", "resnet32", "resnet44", "resnet56")
RULES: list[Rule] = [
    Rule(("pretrained_checkpoint", "dataset", "model"), _pretrained),
    _at_most("n_autoattack", "n_eval"),
    _at_most("robust_n_images", "n_images"),
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


def _type_ok(value: Any, kind: type) -> bool:
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is list:
        return isinstance(value, (list, tuple))
    return isinstance(value, kind)


def check_value(name: str, value: Any, decl: Param) -> str | None:
    """The problem with one value (its type, finiteness, range, elements), or None."""
    if value is None:
        return None if decl.optional else f"{name}=None is not allowed: must be {decl.allowed}"
    if not _type_ok(value, decl.kind):
        return f"{name}={value!r} has the wrong type: expected {decl.kind.__name__} ({decl.allowed})"
    if decl.kind is float and not math.isfinite(value):
        return f"{name}={value!r} is not finite: must be {decl.allowed}"
    if decl.item is not None:
        if len(value) < decl.min_len:
            return f"{name}={list(value)!r} is empty: must be {decl.allowed}"
        for i, v in enumerate(value):
            problem = check_value(f"element {i}", v, decl.item)
            if problem:
                return f"{name}={list(value)!r}: {problem}"
        if decl.item.kind is str and len(set(value)) < len(value):
            return f"{name}={list(value)!r} repeats an element"
    elif decl.ok is not None:
        try:
            ok = decl.ok(value)
        except ValueError as err:  # a library parser's own reason (e.g. advkit.variants)
            return f"{name}={value!r} is invalid: {err}"
        if not ok:
            return f"{name}={value!r} is out of range: must be {decl.allowed}"
    return None


def effective_values(values: Mapping[str, Any], declared: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The notebooks' defaults (first notebook that declares a name) overridden by `values`."""
    out: dict[str, Any] = {}
    for params in declared.values():
        for name, info in params.items():
            out.setdefault(name, info["default"])
    return {**out, **values}


def validate(values: Mapping[str, Any], declared: Mapping[str, Mapping[str, Any]], environment: bool = True) -> None:
    """Raise ValueError naming the first unknown, mistyped or out-of-range parameter, then the
    first violated cross-parameter rule (naming every parameter in it); `environment` also
    checks the run name, the device and `confidence_model` against the run's models."""
    known = {name for params in declared.values() for name in params}
    for name, value in values.items():
        if name not in known:
            raise ValueError(f"unknown parameter {name!r}; the notebooks take: {', '.join(sorted(known))}")
        if name not in PARAMS:
            raise ValueError(f"parameter {name!r} has no declaration in advkit/params.py (PARAMS)")
        problem = check_value(name, value, PARAMS[name])
        if problem:
            raise ValueError(f"parameter {problem}")
    full = effective_values(values, declared)
    for rule in RULES:
        if all(n in full for n in rule.names):
            args = [full[n] for n in rule.names]
            problem = rule.check(*args)
            if problem:
                given = ", ".join(f"{n}={full[n]!r}" for n in rule.names)
                raise ValueError(f"parameters {given}: {problem}")
    if environment:
        check_environment(full)


def expected_models(values: Mapping[str, Any], name: Callable[[str], str] = str) -> list[str]:
    """The models a full run makes: base (01), the Xu fine-tunes and each adversarial training
    variant (03), final and early-stopped, with its kept epochs (`<name>_eNNN`); `name` maps a
    variant spec to its model name (advkit.variants)."""
    variants = [name(v) for v in values.get("at_variants") or []]
    return (["base"] + list(values.get("xu_attacks") or []) + variants + [f"{v}_early" for v in variants]
            + [f"{v}_e{e:03d}" for v in variants for e in values.get("keep_epochs") or []])


def check_environment(values: Mapping[str, Any]) -> None:
    """Checks that need the machine, the torch-free ones first: an existing data_dir and
    pretrained_checkpoint, a confidence_model the run will have (or has), a present GPU for
    device=cuda, a valid run name (advkit.runs.check_run_name)."""
    data_dir = values.get("data_dir")
    if data_dir is not None and not Path(os.path.expanduser(data_dir)).is_dir():
        raise ValueError(f"parameter data_dir={data_dir!r} is not a folder")
    checkpoint = values.get("pretrained_checkpoint")
    if checkpoint is not None and not Path(os.path.expanduser(checkpoint)).is_file():
        raise ValueError(f"parameter pretrained_checkpoint={checkpoint!r} is not a file")
    device = values.get("device", "auto")
    if device.startswith("cuda"):
        import torch

        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = int(device[5:]) if device.startswith("cuda:") else 0
        if index >= count:
            raise ValueError(f"parameter device={device!r}: this machine has {count} CUDA device(s); "
                             f"use device='auto' or 'cpu'" + (f" or 'cuda:0'..'cuda:{count - 1}'" if count else ""))
    from advkit import runs  # imports torch

    folder = runs.run_dir(runs.check_run_name(values.get("run", "quick")), create=False)  # names run= itself
    model = values.get("confidence_model")
    if model is not None and model not in expected_models(values):
        from advkit.variants import parse_variant

        expected = expected_models(values, name=lambda spec: parse_variant(spec).name)
        present = sorted(p.stem for p in (folder / "models").glob("*.pt")) if (folder / "models").is_dir() else []
        if model not in expected + present:
            raise ValueError(f"parameters confidence_model={model!r}, xu_attacks={values.get('xu_attacks')!r}, "
                             f"at_variants={values.get('at_variants')!r}, keep_epochs={values.get('keep_epochs')!r}: "
                             f"confidence_model must be one of the run's models {sorted(set(expected + present))}")
