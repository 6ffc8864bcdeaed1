"""The Hessian of the loss in weight space as a matrix-free operator (Hessian-vector products through
`torch.func`), with the parameter selection and data checks it needs; the estimators that take any
such operator are `advkit.curvature.estimators`."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Sequence

import torch
from torch import nn
from torch.func import functional_call, grad, jvp, vmap

from advkit._checks import HESSIAN_BACKENDS, check_choice, check_int
from advkit._torch import Attack, PerExampleLoss, WithParams, chunks, eval_mode, model_device, to_float


def per_example_cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Default loss: softmax cross-entropy per example (reduction='none').

    Written as -log_softmax(z)[y]: same values as `_torch.cross_entropy` (F.cross_entropy), but
    its forward-mode derivative (jvp of grad) is several times cheaper than cross_entropy's
    decomposition, so the HVPs and the flatness metrics built on them keep this one.
    """
    return -torch.log_softmax(logits, dim=1).gather(1, y[:, None]).squeeze(1)


def is_batchnorm(module: nn.Module) -> bool:
    """BatchNorm layers (1d/2d/3d, SyncBatchNorm, lazy): their parameters are excluded by default."""
    return isinstance(module, nn.modules.batchnorm._BatchNorm)


def select_params(model: nn.Module, *, include_bn: bool = False,
                  layers: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
    """Named trainable parameters to perturb or differentiate (detached views, never copies).

    BatchNorm parameters are skipped by module type unless `include_bn`; `layers` keeps
    only parameters of the named modules (module names as in `model.named_modules()`,
    prefixes allowed, e.g. "layer3" or "linear").
    """
    selected: dict[str, torch.Tensor] = {}
    for mod_name, module in model.named_modules():
        if is_batchnorm(module) and not include_bn:
            continue
        for p_name, p in module.named_parameters(recurse=False):
            if p.requires_grad:
                selected[f"{mod_name}.{p_name}" if mod_name else p_name] = p.detach()
    if layers is not None:
        layers = [layers] if isinstance(layers, str) else list(layers)
        if not layers:
            raise ValueError("layers must name at least one module (or be None for all parameters)")
        available = sorted({n.rsplit(".", 1)[0] for n in selected if "." in n})
        for layer in layers:
            if not any(n == layer or n.startswith(layer + ".") for n in selected):
                raise ValueError(f"layers: {layer!r} has no selectable parameters; "
                                 f"choose among {available}")
        selected = {n: p for n, p in selected.items()
                    if any(n == layer or n.startswith(layer + ".") for layer in layers)}
    if not selected:
        raise ValueError("the model has no trainable parameters to select "
                         "(all are BatchNorm? pass include_bn=True)")
    return selected


def layer_names(model: nn.Module, *, include_bn: bool = False) -> list[str]:
    """Modules that own selectable parameters, in model order: the units of per-layer metrics."""
    names = []
    for name in select_params(model, include_bn=include_bn):
        mod = name.rsplit(".", 1)[0] if "." in name else name
        if mod not in names:
            names.append(mod)
    return names


def check_data(x: torch.Tensor, y: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise ValueError("x and y must be tensors (x: inputs in [0, 1], y: labels)")
    if len(x) == 0 or len(x) != len(y):
        raise ValueError(f"x and y must be non-empty with equal length, got {len(x)} and {len(y)}")


def adversarial_inputs(model: nn.Module, x: torch.Tensor, y: torch.Tensor, attack: Attack,
                       batch_size: int, params: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """attack(model, x, y) chunk by chunk (optionally at substituted `params`), detached."""
    net = model if params is None else WithParams(model, params)
    with eval_mode(model):
        return torch.cat([attack(net, x[s], y[s]).detach() for s in chunks(len(x), batch_size)])


class HessianOperator:
    """The Hessian of the mean loss over (x, y) w.r.t. the selected parameters, as a linear map.

    `matvec(v)` / `matmat(V)` act on flat float32 vectors of length `dim` (parameters
    concatenated in `names` order); `n_hvp` counts the vectors. Two ways to get H v:

    - backend="forward" (default): forward-over-reverse, `jvp(grad(loss))` with torch.func,
      chunk by chunk (`batch_size` images) and summed. Memory of one chunk's double pass;
      every product redoes the forward and backward pass.
    - backend="reverse": reverse-over-reverse on a cached graph. The gradient of the whole
      subset is taken once with create_graph=True and kept; each product is one backward
      pass through it (as PyHessian for one batch), blocks of vectors in one vmapped backward.
      About 1.5-2.5x cheaper per product, but holds the double-backward graph of the whole
      subset in memory.

    `matmat` maps a block of vectors at once with `torch.func.vmap` (one vmap per chunk on the
    forward backend, one over the cached graph's backward on the reverse one: every op batched,
    no per-vector loop; autograd's `is_grads_batched` uses the legacy vmap, which loops over the
    vectors in the convolution and BatchNorm backward ops): better GPU use, often slower on CPUs.
    """

    def __init__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *,
                 loss_fn: PerExampleLoss | None = None, attack: Attack | None = None, include_bn: bool = False,
                 layers: Sequence[str] | None = None, batch_size: int = 500, backend: str = "forward"):
        check_data(x, y)
        check_int("batch_size", batch_size)
        check_choice("backend", backend, HESSIAN_BACKENDS)
        self.model = model
        self.loss_fn = loss_fn or per_example_cross_entropy
        self.batch_size = batch_size
        self.backend = backend
        params = select_params(model, include_bn=include_bn, layers=layers)
        self.names = list(params)
        self.shapes = [p.shape for p in params.values()]
        self.numels = [p.numel() for p in params.values()]
        self.device = model_device(model)
        self.p0 = torch.cat([p.reshape(-1) for p in params.values()]).to(torch.float32).clone()
        self.dim = self.p0.numel()
        self.x = to_float(x.to(self.device)).to(torch.float32)
        self.y = y.to(self.device)
        if attack is not None:
            self.x = adversarial_inputs(model, self.x, self.y, attack, batch_size)
        self.n = len(self.x)
        self.n_hvp = 0
        self._leaf: torch.Tensor | None = None
        self._grad: torch.Tensor | None = None

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        return {n: t.view(s) for n, t, s in zip(self.names, torch.split(flat, self.numels), self.shapes)}

    def flatten(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([tensors[n].reshape(-1) for n in self.names])

    def _loss(self, p: torch.Tensor, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        out = functional_call(self.model, self.unflatten(p), (xb,))
        return self.loss_fn(out, yb).sum() / self.n

    def _hvp_chunk(self, v: torch.Tensor, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        return jvp(grad(lambda p: self._loss(p, xb, yb)), (self.p0,), (v,))[1]

    @contextlib.contextmanager
    def _context(self) -> Iterator[None]:
        with eval_mode(self.model), torch.autocast(self.device.type, enabled=False), torch.no_grad(), \
                warnings.catch_warnings():
            # torch-internal: some forward-mode decompositions still go through jit.script
            warnings.filterwarnings("ignore", message=".*torch.jit.script.*deprecated")
            yield

    def _cached_gradient(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(leaf, gradient with its graph) for the reverse backend, built on first use."""
        if self._grad is None:
            leaf = self.p0.clone().requires_grad_(True)
            with self._context(), torch.enable_grad():
                total = None
                for s in chunks(self.n, self.batch_size):
                    (g,) = torch.autograd.grad(self._loss(leaf, self.x[s], self.y[s]), leaf, create_graph=True)
                    total = g if total is None else total + g
            self._leaf, self._grad = leaf, total
        return self._leaf, self._grad

    def release(self) -> None:
        """Drop the cached graph of the reverse backend (it is rebuilt when needed)."""
        self._leaf = self._grad = None

    def loss(self) -> float:
        """Mean loss over the subset at the current weights."""
        with self._context():
            return float(sum(self._loss(self.p0, self.x[s], self.y[s]) for s in chunks(self.n, self.batch_size)))

    def gradient(self) -> torch.Tensor:
        with self._context():
            return sum(grad(self._loss)(self.p0, self.x[s], self.y[s]) for s in chunks(self.n, self.batch_size))

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        v = v.to(self.p0)
        if self.backend == "reverse":
            leaf, g = self._cached_gradient()
            with self._context():
                (out,) = torch.autograd.grad(g, leaf, grad_outputs=v, retain_graph=True)
        else:
            with self._context():
                out = torch.zeros_like(self.p0)
                for s in chunks(self.n, self.batch_size):
                    out += self._hvp_chunk(v, self.x[s], self.y[s])
        self.n_hvp += 1
        return out

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        """H @ V.T for a block V of shape (k, dim), returned as (k, dim)."""
        V = V.to(self.p0)
        if self.backend == "reverse":
            leaf, g = self._cached_gradient()
            with self._context():
                out = vmap(lambda v: torch.autograd.grad(g, leaf, grad_outputs=v, retain_graph=True)[0])(V)
        else:
            with self._context():
                out = torch.zeros_like(V)
                for s in chunks(self.n, self.batch_size):
                    xb, yb = self.x[s], self.y[s]
                    out += vmap(lambda v: self._hvp_chunk(v, xb, yb))(V)
        self.n_hvp += V.shape[0]
        return out

    def dense(self) -> torch.Tensor:
        """The full (dim x dim) Hessian, column by column: for tests and tiny models only."""
        eye = torch.eye(self.dim, device=self.device)
        return torch.cat([self.matmat(eye[i:i + 64]) for i in range(0, self.dim, 64)]).T

    def apply_block(self, V: torch.Tensor, block_size: int) -> torch.Tensor:
        """H applied to the rows of V, `block_size` rows per vmap call (1: plain matvec loop)."""
        if block_size == 1:
            return torch.stack([self.matvec(v) for v in V])
        return torch.cat([self.matmat(V[i:i + block_size]) for i in range(0, len(V), block_size)])
