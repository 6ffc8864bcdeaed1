"""Directions in parameter space along which loss landscapes are drawn.

Random Gaussian directions with filter normalization (Li et al. 2018; Eq. 6 of Xu et al.
2019), and explicit directions (model differences, Hessian eigenvectors, another tool's
directions) used exactly as given. A direction is a mapping from state-dict names
(parameters and, for model differences, floating BatchNorm statistics) to tensors; names
it does not mention are not perturbed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from torch import nn

from advkit._checks import DIRECTION_NORMS, check_choice, check_int
from advkit._torch import model_device, tensors_hash

BN_POLICIES = ("ignore", "include")
# Modules whose affine parameters are "BatchNorm parameters" in Li et al.'s sense.
NORM_MODULES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)

Direction = dict[str, torch.Tensor]


@dataclass(frozen=True, eq=False)
class Directions:
    """One or two directions, with how they were made (stored with every surface).

    `kind` is "random", "explicit" or "model_difference"; `seed`, `norm` and `bn` describe
    random directions ("given" for explicit ones). `raw_cosine` is the cosine between the
    two directions before orthogonalization.
    """

    vectors: tuple[Direction, ...]
    kind: str = "explicit"
    seed: int | None = None
    norm: str = "given"
    bn: str = "given"
    orthogonalized: bool = False
    raw_cosine: float | None = None
    note: str = ""
    ignored: tuple[str, ...] = field(default=())

    def __post_init__(self):
        if len(self.vectors) not in (1, 2):
            raise ValueError(f"Directions holds 1 or 2 directions, got {len(self.vectors)}")

    @property
    def ndim(self) -> int:
        return len(self.vectors)

    @cached_property
    def sha256(self) -> str:
        """Content hash of the directions (`directions_hash`): device and dtype independent."""
        return directions_hash(self.vectors)

    @cached_property
    def cosine(self) -> float | None:
        """Cosine between the two directions as used (None for a single direction)."""
        return cosine_similarity(*self.vectors) if self.ndim == 2 else None

    def settings(self) -> dict[str, str | int | float]:
        """Flat description for file attributes (netCDF-friendly scalars and strings)."""
        return {
            "direction_kind": self.kind,
            "direction_seed": "none" if self.seed is None else int(self.seed),
            "direction_norm": self.norm,
            "direction_bn": self.bn,
            "direction_orthogonalized": int(self.orthogonalized),
            "directions_sha256": self.sha256,
        }

    def check(self, model: nn.Module) -> None:
        """Raise ValueError unless every direction fits `model` (see `check_directions`)."""
        check_directions(model, self)

    def to(self, device: torch.device | str) -> Directions:
        """A copy with the tensors on `device` (hash and settings unchanged)."""
        vectors = tuple({k: v.to(device) for k, v in d.items()} for d in self.vectors)
        return Directions(vectors, self.kind, self.seed, self.norm, self.bn, self.orthogonalized,
                          self.raw_cosine, self.note, self.ignored)


# --- which parameters are "biases and BatchNorm parameters" --------------------------------


def ignored_parameters(model: nn.Module) -> set[str]:
    """Names of the normalization layers' affine parameters and of every module's `bias`.

    Chosen by module type and attribute, not by parameter name or dimensionality: these
    get a zero direction under bn="ignore" (Li et al.'s "biasbn").
    """
    ignored_ids = set()
    for module in model.modules():
        if isinstance(module, NORM_MODULES):
            ignored_ids.update(id(p) for p in module.parameters(recurse=False))
        bias = getattr(module, "bias", None)
        if isinstance(bias, nn.Parameter):
            ignored_ids.add(id(bias))
    return {name for name, p in model.named_parameters() if id(p) in ignored_ids}


# --- normalization (Eq. 6 of Xu et al.) ----------------------------------------------------


def normalize_direction(d: torch.Tensor, theta: torch.Tensor, norm: str) -> torch.Tensor:
    """Rescale one tensor of a direction to the scale of the weights `theta`.

    filter: each filter d_i (a slice along the first axis: an output channel of a conv,
    a row of a linear layer; single numbers for 1-D tensors) gets norm ||theta_i||
    (Li et al. 2018; Xu et al. Eq. 6). layer: the whole tensor gets norm ||theta||.
    weight: d * |theta| elementwise. none: unchanged.
    """
    check_choice("norm", norm, DIRECTION_NORMS)
    d, theta = d.float(), theta.detach().float()
    if norm == "none":
        return d.clone()
    if norm == "weight":
        return d * theta.abs()
    if norm == "layer":
        return d * (theta.norm() / (d.norm() + 1e-10))
    if d.dim() <= 1:
        return d * (theta.abs() / (d.abs() + 1e-10))
    d_norm = d.flatten(1).norm(dim=1)
    t_norm = theta.flatten(1).norm(dim=1)
    return d * (t_norm / (d_norm + 1e-10)).view(-1, *([1] * (d.dim() - 1)))


def random_directions(model: nn.Module, n: int = 2, *, seed: int, norm: str = "filter",
                      bn: str = "ignore", orthogonalize: bool = False) -> Directions:
    """Seeded Gaussian directions over the model's parameters, normalized per `norm`.

    The raw Gaussian entries are drawn on the CPU from one generator, parameter after
    parameter in `named_parameters` order (ignored ones included), so the same seed gives
    the same raw direction for every model of an architecture, on any device. With
    `orthogonalize`, the second direction loses its component along the first (after
    normalization, not renormalized: the filter norms change by the tiny overlap).
    """
    if n not in (1, 2):
        raise ValueError(f"n must be 1 or 2, got {n}")
    check_choice("norm", norm, DIRECTION_NORMS)
    check_choice("bn", bn, BN_POLICIES)
    check_int("seed", seed, minimum=0)
    params = dict(model.named_parameters())
    ignored = ignored_parameters(model) if bn == "ignore" else set()
    if not params:
        raise ValueError(f"{type(model).__name__} has no parameters to perturb: its loss surface would be flat")
    if set(params) <= ignored:
        raise ValueError(f"every parameter of {type(model).__name__} is a bias or normalization parameter, which "
                         "bn='ignore' leaves fixed: nothing to perturb (use bn='include')")
    device = model_device(model)
    gen = torch.Generator().manual_seed(int(seed))
    vectors = []
    for _ in range(n):
        d = {}
        for name, p in params.items():
            raw = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if name in ignored:
                d[name] = torch.zeros_like(raw)
            else:
                d[name] = normalize_direction(raw, p.detach().cpu(), norm)
        vectors.append(d)
    raw_cos = cosine_similarity(*vectors) if n == 2 else None
    if n == 2 and orthogonalize:
        vectors[1] = orthogonalized(vectors[0], vectors[1])
    vectors = [{k: v.to(device=device, dtype=params[k].dtype) for k, v in d.items()} for d in vectors]
    return Directions(tuple(vectors), "random", seed, norm, bn, bool(orthogonalize and n == 2),
                      raw_cos, ignored=tuple(sorted(ignored)))


# --- explicit directions ----------------------------------------------------------------


def perturbable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and persistent floating-point buffers (BatchNorm statistics), by name."""
    state = {k: p for k, p in model.named_parameters()}
    persistent = model.state_dict(keep_vars=True)
    for k, b in model.named_buffers():
        if k in persistent and b.is_floating_point():
            state[k] = b
    return state


def check_directions(model: nn.Module, directions: Directions) -> None:
    """Check directions against the model's perturbable entries before a surface is computed:
    every name must be a parameter or float buffer of the model, every tensor finite and of the
    model's shape (a transposed tensor of the right size is an error, not a different surface),
    and every parameter present (zeros for parameters that stay fixed; `explicit_directions`
    adds them). Errors name the direction and the key."""
    state = perturbable_state(model)
    params = [k for k, _ in model.named_parameters()]
    for i, d in enumerate(directions.vectors):
        label = f"direction {i + 1}"
        if not isinstance(d, Mapping):
            raise ValueError(f"{label} must be a mapping name -> tensor, got {type(d).__name__}")
        if not d:
            raise ValueError(f"{label} is empty: the model has no parameters to perturb (a flat, meaningless surface)")
        for k, v in d.items():
            if k not in state:
                raise ValueError(f"{label}[{k!r}] is not a parameter or float buffer of the model; "
                                 f"its entries are e.g. {params[:3]}")
            if not isinstance(v, torch.Tensor):
                raise ValueError(f"{label}[{k!r}] must be a tensor, got {type(v).__name__}")
            if tuple(v.shape) != tuple(state[k].shape):
                raise ValueError(f"{label}[{k!r}] has shape {tuple(v.shape)}, the model's is {tuple(state[k].shape)}")
            if not bool(torch.isfinite(v).all()):
                raise ValueError(f"{label}[{k!r}] holds NaN or infinite values")
        missing = [k for k in params if k not in d]
        if missing:
            raise ValueError(f"{label} has no entry for the parameters {missing[:5]}"
                             f"{' ...' if len(missing) > 5 else ''}: give zeros for parameters that stay "
                             "fixed (explicit_directions(model, ...) does)")


def as_direction(model: nn.Module, direction: Mapping[str, torch.Tensor] | Sequence[torch.Tensor],
                 name: str = "direction") -> Direction:
    """Check a given direction against the model: a name->tensor mapping, or tensors in
    `named_parameters` order. Shapes must match; names must be parameters or float buffers.
    Parameters it does not name get an explicit zero direction (they stay fixed)."""
    state = perturbable_state(model)
    if isinstance(direction, Mapping):
        d = dict(direction)
    elif isinstance(direction, Sequence) and not isinstance(direction, (str, bytes)):
        names = [k for k, _ in model.named_parameters()]
        if len(direction) != len(names):
            raise ValueError(f"{name}: a list direction needs one tensor per parameter "
                             f"({len(names)}), got {len(direction)}")
        d = dict(zip(names, direction))
    else:
        raise ValueError(f"{name} must be a mapping name->tensor or a list of tensors, "
                         f"got {type(direction).__name__}")
    unknown = sorted(set(d) - set(state))
    if unknown:
        raise ValueError(f"{name} names entries that are not parameters or float buffers of the "
                         f"model: {unknown[:5]}{' ...' if len(unknown) > 5 else ''}")
    out = {}
    for k, v in d.items():
        v = torch.as_tensor(v)
        if tuple(v.shape) != tuple(state[k].shape):
            raise ValueError(f"{name}[{k!r}] has shape {tuple(v.shape)}, the model's is {tuple(state[k].shape)}")
        out[k] = v.detach().to(device=state[k].device, dtype=state[k].dtype)
    for k, p in model.named_parameters():
        if k not in out:
            out[k] = torch.zeros_like(p.detach())
    return out


def explicit_directions(model: nn.Module, *directions: Mapping[str, torch.Tensor] | Sequence[torch.Tensor],
                        note: str = "") -> Directions:
    """One or two given directions, used as they are (no normalization, no orthogonalization)."""
    if len(directions) not in (1, 2):
        raise ValueError(f"give 1 or 2 directions, got {len(directions)}")
    vectors = tuple(as_direction(model, d, f"direction {i + 1}") for i, d in enumerate(directions))
    return Directions(vectors, "explicit", note=note)


def architecture_name(model: nn.Module) -> str:
    """The registered architecture a model was built as (`get_model`), else its class name."""
    spec = getattr(model, "advkit_spec", None)
    return str(spec["arch"]) if isinstance(spec, Mapping) and "arch" in spec else type(model).__name__


def architecture_mismatch(model_a: nn.Module, model_b: nn.Module) -> str | None:
    """Why theta_a and theta_b cannot be combined (interpolations, planes: Li et al. 2018 need one
    parameter space), or None when every perturbable entry has the same name and shape in both."""
    sa, sb = perturbable_state(model_a), perturbable_state(model_b)
    arch = f"{architecture_name(model_a)} vs {architecture_name(model_b)}"
    if set(sa) != set(sb):
        diff = sorted(set(sa) ^ set(sb))
        return f"different architectures ({arch}): {len(diff)} parameters/buffers in only one of them, e.g. {diff[0]!r}"
    for k, a in sa.items():
        if a.shape != sb[k].shape:
            return f"different architectures ({arch}): {k!r} is {tuple(a.shape)} vs {tuple(sb[k].shape)}"
    return None


def model_difference(model_a: nn.Module, model_b: nn.Module, buffers: bool = True) -> Direction:
    """theta_b - theta_a over the parameters (and BatchNorm statistics when `buffers`); both
    models must share one architecture (`architecture_mismatch`), else a ValueError says why."""
    reason = architecture_mismatch(model_a, model_b)
    if reason is not None:
        raise ValueError(f"model_a and model_b cannot be interpolated or spanned into a plane: {reason}")
    sa, sb = perturbable_state(model_a), perturbable_state(model_b)
    if not buffers:
        names = {k for k, _ in model_a.named_parameters()}
        sa = {k: v for k, v in sa.items() if k in names}
    missing = sorted(set(sa) - set(sb))
    if missing:
        raise ValueError(f"model_b lacks entries of model_a (different architectures?): {missing[:5]}")
    out = {}
    for k, a in sa.items():
        b = sb[k]
        if a.shape != b.shape:
            raise ValueError(f"{k!r}: shapes differ between the models: {tuple(a.shape)} vs {tuple(b.shape)}")
        out[k] = (b.detach().to(a.device, a.dtype) - a.detach())
    return out


def interpolation_directions(model_a: nn.Module, model_b: nn.Module) -> Directions:
    """The direction b - a (parameters and BatchNorm statistics): theta(t) = (1 - t) a + t b."""
    return Directions((model_difference(model_a, model_b),), "model_difference",
                      note="alpha is t in theta = (1 - t) theta_a + t theta_b")


def plane_directions(model_a: nn.Module, model_b: nn.Module, model_c: nn.Module) -> Directions:
    """Directions b - a and c - a: the plane through three models, b at (1, 0), c at (0, 1)."""
    d1, d2 = model_difference(model_a, model_b), model_difference(model_a, model_c)
    return Directions((d1, d2), "model_difference", raw_cosine=cosine_similarity(d1, d2),
                      note="theta = a + alpha (b - a) + beta (c - a); b at (1, 0), c at (0, 1)")


# --- exchange with tomgoldstein/loss-landscape ------------------------------------------------


def save_loss_landscape_directions(directions: Directions, model: nn.Module, path: str | Path) -> Path:
    """Write directions as a loss-landscape direction file (dir_type "weights": groups
    xdirection/ydirection holding one dataset per parameter, "0", "1", ... in parameter order),
    so the reference tool can compute the same surface for a point-by-point cross-check."""
    import h5py

    names = [k for k, _ in model.named_parameters()]
    extra = sorted(set().union(*directions.vectors) - set(names))
    if extra:
        raise ValueError(f"directions perturb buffers {extra[:3]}...; loss-landscape's 'weights' files hold "
                         "parameters only")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    params = dict(model.named_parameters())
    with h5py.File(path, "w") as f:
        for group, d in zip(("xdirection", "ydirection"), directions.vectors):
            grp = f.create_group(group)
            for i, k in enumerate(names):
                v = d.get(k, torch.zeros_like(params[k]))
                grp.create_dataset(str(i), data=v.detach().cpu().float().numpy())
    return path


def load_loss_landscape_directions(path: str | Path, model: nn.Module) -> Directions:
    """Read a loss-landscape direction file (dir_type "weights": one entry per parameter; or
    "states": one per state-dict entry) as explicit directions, used exactly as stored."""
    import h5py

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no direction file at {path}")
    params = [k for k, _ in model.named_parameters()]
    state_keys = list(model.state_dict())
    perturbable = perturbable_state(model)
    vectors = []
    try:
        f = h5py.File(path, "r")
    except OSError as err:
        raise ValueError(f"{path} is not a readable HDF5 direction file (truncated or another format?): {err}") \
            from err
    with f:
        for group in ("xdirection", "ydirection"):
            if group not in f:
                continue
            try:
                arrays = [torch.from_numpy(np.asarray(f[group][str(i)][()])) for i in range(len(f[group]))]
            except (KeyError, OSError, TypeError, ValueError) as err:
                raise ValueError(f"{path}:{group} is not a loss-landscape direction group (datasets '0', '1', "
                                 f"... of numbers): {err}") from err
            if len(arrays) == len(params):
                vectors.append(dict(zip(params, arrays)))
            elif len(arrays) == len(state_keys):  # dir_type "states": skip integer counters
                vectors.append({k: a for k, a in zip(state_keys, arrays) if k in perturbable})
            else:
                raise ValueError(f"{path}:{group} has {len(arrays)} entries; the model has {len(params)} "
                                 f"parameters and {len(state_keys)} state-dict entries")
    if not vectors:
        raise ValueError(f"{path} holds no 'xdirection' group: not a loss-landscape direction file")
    d = explicit_directions(model, *vectors, note=f"loaded from loss-landscape file {path.name}")
    return d


# --- geometry -------------------------------------------------------------------------------


def _dot(d1: Mapping[str, torch.Tensor], d2: Mapping[str, torch.Tensor]) -> torch.Tensor:
    total = torch.zeros((), dtype=torch.float64)
    for k in sorted(set(d1) & set(d2)):  # a fixed order: the same sum in every process
        total += (d1[k].double() * d2[k].double()).sum().cpu()
    return total


def cosine_similarity(d1: Mapping[str, torch.Tensor], d2: Mapping[str, torch.Tensor]) -> float:
    """Cosine between two directions flattened over all entries (missing names count as zero)."""
    denom = (_dot(d1, d1) * _dot(d2, d2)).sqrt()
    return float(_dot(d1, d2) / denom) if denom > 0 else 0.0


def orthogonalized(d1: Mapping[str, torch.Tensor], d2: Mapping[str, torch.Tensor]) -> Direction:
    """d2 minus its projection on d1 (Gram-Schmidt over all entries)."""
    coef = float(_dot(d1, d2) / _dot(d1, d1))
    return {k: v - coef * d1[k].to(v.dtype) if k in d1 else v.clone() for k, v in d2.items()}


def directions_hash(vectors: Sequence[Mapping[str, torch.Tensor]]) -> str:
    """`_torch.tensors_hash` over every direction's entries (names sorted, float32): the same
    directions give the same hash on any device and in any storage dtype."""
    return tensors_hash((f"direction{i}.{k}", d[k].detach().float()) for i, d in enumerate(vectors) for k in sorted(d))
