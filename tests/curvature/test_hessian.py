"""Hessian-vector products and the estimators built on them, against known Hessians."""

import numpy as np
import pytest
import scipy.integrate
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.functional import hessian
from torch.func import functional_call

from advkit.curvature.estimators import hessian_eigenvalues, hessian_spectrum, hessian_trace, per_layer
from advkit.curvature.operator import HessianOperator, layer_names, select_params


def squared_error(out, y):
    return 0.5 * (out.squeeze(-1) - y) ** 2


@pytest.fixture(scope="module")
def quadratic():
    """Least squares 0.5 (x.w - y)^2: the Hessian is X^T X / N, with a spread-out spectrum."""
    g = torch.Generator().manual_seed(0)
    d, n = 12, 60
    X = torch.randn(n, d, generator=g) * torch.linspace(0.3, 3.0, d)
    model = nn.Linear(d, 1, bias=False)
    return model, X, torch.randn(n, generator=g), (X.T @ X / n).double()


@pytest.fixture(scope="module")
def tiny():
    """Smooth tiny network with BatchNorm (in train mode: the operator must switch to eval)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 3))
    with torch.no_grad():
        model[1].running_mean.uniform_(-0.5, 0.5)
        model[1].running_var.uniform_(0.5, 2.0)
        model[1].weight.uniform_(0.5, 1.5)
    model.train()
    x = torch.rand(40, 3)
    y = torch.randint(0, 3, (40,))
    return model, x, y


def reference_hessian(model, x, y, names):
    """Dense Hessian of the mean CE in eval mode by torch.autograd.functional.hessian."""
    params = dict(model.named_parameters())
    flat0 = torch.cat([params[n].detach().reshape(-1) for n in names])
    sizes = [params[n].numel() for n in names]
    was_training = model.training
    model.eval()

    def loss(flat):
        p = {n: t.view(params[n].shape) for n, t in zip(names, torch.split(flat, sizes))}
        return F.cross_entropy(functional_call(model, p, (x,)), y)

    H = hessian(loss, flat0)
    model.train(was_training)
    return H.double()


def test_quadratic_dense_eigenvalues_and_trace(quadratic):
    model, X, y, H = quadratic
    op = HessianOperator(model, X, y, loss_fn=squared_error, batch_size=25)
    torch.testing.assert_close(op.dense().double(), H, rtol=1e-5, atol=1e-6)
    exact = torch.linalg.eigvalsh(H).flip(0).numpy()
    res = hessian_eigenvalues(op, k=3, iters=12)
    np.testing.assert_allclose(res.eigenvalues, exact[:3], rtol=1e-5)
    assert res.converged and res.n_hvp <= 12
    power = hessian_eigenvalues(op, k=2, method="power", iters=500, tol=1e-8)
    np.testing.assert_allclose(power.eigenvalues, exact[:2], rtol=1e-3)
    assert power.converged and power.n_hvp < 500
    assert not hessian_eigenvalues(op, method="power", iters=3, tol=0.0).converged
    # more steps than dimensions: the Krylov space becomes invariant, the breakdown is handled
    beyond = hessian_eigenvalues(op, k=3, iters=20)
    np.testing.assert_allclose(beyond.eigenvalues, exact[:3], rtol=1e-4)
    assert beyond.converged
    # Hutch++ with 3 * dim products sketches the whole space: exact.
    pp = hessian_trace(op, n_samples=36, method="hutchpp")
    assert pp.value == pytest.approx(float(torch.trace(H)), rel=1e-4)
    hutch = hessian_trace(op, n_samples=400, seed=1, block_size=100)
    assert 0 < hutch.std_error < 0.1 * hutch.value
    assert abs(hutch.value - float(torch.trace(H))) < 4 * hutch.std_error
    assert hutch.n_hvp == 400


def test_spectrum_integrates_to_one_and_finds_eigenvalues(quadratic):
    model, X, y, H = quadratic
    exact = torch.linalg.eigvalsh(H).numpy()
    sp = hessian_spectrum(model, X, y, loss_fn=squared_error, steps=12, runs=3, kernel_width=0.005)
    assert scipy.integrate.trapezoid(sp.density, sp.grid) == pytest.approx(1.0, abs=1e-6)
    assert np.all(sp.density >= 0) and sp.n_hvp == 36 and sp.converged
    np.testing.assert_allclose(sp.weights.sum(1), 1.0, rtol=1e-6)
    # a full Krylov space: the quadrature nodes are the eigenvalues themselves
    np.testing.assert_allclose(np.sort(sp.nodes[0]), exact, rtol=1e-4, atol=1e-5)
    # the density's mean is the average eigenvalue, up to Rademacher noise
    mean = scipy.integrate.trapezoid(sp.grid * sp.density, sp.grid)
    assert mean == pytest.approx(exact.mean(), rel=0.15)


def test_tiny_network_matches_autograd_hessian(tiny):
    model, x, y = tiny
    op = HessianOperator(model, x, y, batch_size=16)
    assert op.names == ["0.weight", "0.bias", "3.weight", "3.bias"]      # BatchNorm left out
    H = reference_hessian(model, x, y, op.names)
    torch.testing.assert_close(op.dense().double(), H, rtol=1e-4, atol=1e-6)
    exact = torch.linalg.eigvalsh(H).flip(0).numpy()
    res = hessian_eigenvalues(op, k=2, iters=op.dim)
    np.testing.assert_allclose(res.eigenvalues, exact[:2], rtol=1e-4)
    assert res.converged
    tr = hessian_trace(op, n_samples=3 * op.dim, method="hutchpp", block_size=3 * op.dim)
    assert tr.value == pytest.approx(float(torch.trace(H)), rel=1e-3)
    assert model.training and model[1].training                           # caller's mode restored


def test_bn_layers_and_blocks(tiny):
    model, x, y = tiny
    with_bn = HessianOperator(model, x, y, include_bn=True)
    assert {"1.weight", "1.bias"} <= set(with_bn.names)
    H = reference_hessian(model, x, y, with_bn.names)
    torch.testing.assert_close(with_bn.dense().double(), H, rtol=1e-4, atol=1e-6)
    # a layer's Hessian is the diagonal block of the full one
    block = HessianOperator(model, x, y, layers=["3"])
    full = HessianOperator(model, x, y)
    start = full.names.index("3.weight")
    offset = sum(full.numels[:start])
    Hf = full.dense()
    torch.testing.assert_close(block.dense(), Hf[offset:, offset:], rtol=1e-5, atol=1e-7)
    assert layer_names(model) == ["0", "3"]
    traces = per_layer(hessian_trace, model, x, y, n_samples=3 * 15, method="hutchpp", block_size=45)
    assert set(traces) == {"0", "3"}
    assert traces["3"].value == pytest.approx(float(torch.trace(Hf[offset:, offset:])), rel=1e-3)


def test_chunking_vmap_and_model_untouched(tiny):
    model, x, y = tiny
    before = {k: v.clone() for k, v in model.state_dict().items()}
    a = HessianOperator(model, x, y, batch_size=7)
    b = HessianOperator(model, x, y, batch_size=100)
    V = torch.randn(3, a.dim, generator=torch.Generator().manual_seed(0))
    loop = torch.stack([a.matvec(v) for v in V])
    torch.testing.assert_close(loop, b.matmat(V), rtol=1e-5, atol=1e-7)
    assert a.n_hvp == 3 and b.n_hvp == 3
    blocked = hessian_trace(a, n_samples=6, block_size=4, seed=3)
    single = hessian_trace(b, n_samples=6, block_size=1, seed=3)
    assert blocked.value == pytest.approx(single.value, rel=1e-5)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_reverse_backend_matches(tiny):
    model, x, y = tiny
    fwd = HessianOperator(model, x, y, batch_size=16)
    rev = HessianOperator(model, x, y, batch_size=16, backend="reverse")
    torch.testing.assert_close(rev.dense(), fwd.dense(), rtol=1e-5, atol=1e-7)
    v = torch.randn(fwd.dim, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(rev.matvec(v), fwd.matvec(v), rtol=1e-5, atol=1e-7)
    a = hessian_eigenvalues(rev, k=2, iters=10)
    b = hessian_eigenvalues(fwd, k=2, iters=10)
    np.testing.assert_allclose(a.eigenvalues, b.eigenvalues, rtol=1e-4)
    rev.release()
    torch.testing.assert_close(rev.matvec(v), fwd.matvec(v), rtol=1e-5, atol=1e-7)
    assert model.training


def test_robust_loss_uses_attacked_inputs(tiny):
    model, x, y = tiny
    calls = []

    def shift(net, xb, yb):
        calls.append(len(xb))
        assert not net.training                     # attacks run in eval mode too
        return (xb + 0.25).clamp(0, 1)

    op = HessianOperator(model, x, y, attack=shift, batch_size=16)
    assert calls == [16, 16, 8]
    torch.testing.assert_close(op.x, (x + 0.25).clamp(0, 1))
    clean = HessianOperator(model, x, y)
    assert not torch.allclose(op.dense(), clean.dense())


def test_bad_input(tiny):
    model, x, y = tiny
    with pytest.raises(ValueError, match="k must"):
        hessian_eigenvalues(model, x, y, k=0)
    with pytest.raises(ValueError, match="iters"):
        hessian_eigenvalues(model, x, y, iters=0)
    with pytest.raises(ValueError, match="method"):
        hessian_eigenvalues(model, x, y, method="arnoldi")
    with pytest.raises(ValueError, match="n_samples"):
        hessian_trace(model, x, y, n_samples=0)
    with pytest.raises(ValueError, match="method"):
        hessian_trace(model, x, y, method="exact")
    with pytest.raises(ValueError, match="kernel_width"):
        hessian_spectrum(model, x, y, kernel_width=0)
    with pytest.raises(ValueError, match="layers.*'conv9'.*choose among"):
        select_params(model, layers=["conv9"])
    with pytest.raises(ValueError, match="equal length"):
        HessianOperator(model, x, y[:5])
    with pytest.raises(ValueError, match="batch_size"):
        HessianOperator(model, x, y, batch_size=0)
    with pytest.raises(ValueError, match="backend"):
        HessianOperator(model, x, y, backend="exact")


# --- batched probes (issue 12: block_size="auto", one batched product per block) ---------------


@pytest.fixture(scope="module")
def cifar_resnet():
    """CIFAR-shaped ResNet-20 with BatchNorm (stored statistics made non-trivial) on 8 random images."""
    from advkit.models import get_model
    torch.manual_seed(0)
    model = get_model("resnet20", 10, 3)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    g = torch.Generator().manual_seed(1)
    return model, torch.rand(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["reverse", "forward"])
def test_trace_blocks_keep_probes_and_std_error(cifar_resnet, backend):
    from advkit.curvature.estimators import hutchinson
    model, x, y = cifar_resnet
    op = HessianOperator(model, x, y, include_bn=True, batch_size=4, backend=backend)
    one = hessian_trace(op, n_samples=8, block_size=1, seed=5)
    blocked = hessian_trace(op, n_samples=8, block_size=8, seed=5)
    assert blocked.value == pytest.approx(one.value, rel=1e-5)
    assert blocked.std_error == pytest.approx(one.std_error, rel=1e-4)
    assert (one.block_size, blocked.block_size, one.n_hvp, blocked.n_hvp) == (1, 8, 8, 8)
    if backend == "reverse":
        # the same probes whatever the block (3 + 3 + 2 here); the std error is that of the samples
        apply = lambda V: torch.stack([op.matvec(v) for v in V])  # noqa: E731
        value, se, s = hutchinson(apply, op.dim, 8, torch.Generator().manual_seed(5), op.device, block_size=1)
        _, _, s3 = hutchinson(op.matmat, op.dim, 8, torch.Generator().manual_seed(5), op.device, block_size=3)
        np.testing.assert_allclose(s3, s, rtol=1e-4, atol=1e-6 * np.abs(s).max())
        assert se == pytest.approx(s.std(ddof=1) / np.sqrt(8), rel=1e-12)
        assert (value, se) == (one.value, one.std_error)
        # CPU default ("auto" -> 1): bit-identical to the one-probe loop; Hutch++ blocks agree too
        auto = hessian_trace(op, n_samples=8, seed=5)
        assert (auto.value, auto.std_error, auto.block_size) == (one.value, one.std_error, 1)
        pp = [hessian_trace(op, n_samples=9, method="hutchpp", block_size=b, seed=2).value for b in (1, 4)]
        assert pp[1] == pytest.approx(pp[0], rel=1e-4)


def test_batched_product_has_no_per_probe_loop(cifar_resnet):
    from advkit.curvature.blocks import vmap_fallback
    model, x, y = cifar_resnet
    for backend in ("reverse", "forward"):
        op = HessianOperator(model, x, y, include_bn=True, batch_size=8, backend=backend)
        assert vmap_fallback(op) is None, backend


def test_resolve_block_size():
    from advkit.curvature.blocks import resolve_block_size
    gib = 2 ** 30
    assert resolve_block_size(100 * gib, gib, 100) == 32                    # capped
    assert resolve_block_size(100 * gib, gib, 100, cap=64) == 50            # half the free memory
    assert resolve_block_size(100 * gib, gib, 10) == 10                     # no more than the probes
    assert resolve_block_size(10 * gib, 3 * gib, 100) == 1                  # 5 GiB hold one 3 GiB probe
    assert resolve_block_size(gib, 4 * gib, 100) == 1                       # never below one
    assert resolve_block_size(40 * gib, 2 * gib, 100, safety=0.2) == 4
    for bad in ({"safety": 0.0}, {"safety": 1.5}, {"cap": 0}):
        with pytest.raises(ValueError):
            resolve_block_size(gib, gib, 10, **bad)
    with pytest.raises(ValueError, match="block_size"):
        hessian_trace(nn.Linear(2, 1), torch.rand(4, 2), torch.zeros(4, dtype=torch.long), block_size="big")


def test_auto_block_size_measures_one_product(monkeypatch):
    """The CUDA path of "auto" with the device's memory counters replaced by a fake (CPU only)."""
    from advkit.curvature import blocks as hb
    gib = 2 ** 30
    mem = {"allocated": 10 * gib, "peak": 30 * gib}

    class FakeOp:
        device, backend, dim, n_hvp = torch.device("cuda"), "forward", 3, 0

        def matmat(self, V):
            mem["peak"] = mem["allocated"] + 2 * gib * len(V)      # one probe: 2 GiB at the peak
            self.n_hvp += len(V)
            return V

    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: mem["allocated"])
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: mem.update(peak=mem["allocated"]))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: mem["peak"])
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 12 * gib)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (38 * gib, 80 * gib))
    monkeypatch.setattr(torch, "ones", lambda *shape, device=None: torch.zeros(*shape))
    op = FakeOp()
    assert hb.bytes_per_probe(op) == 2 * gib and op.n_hvp == 1
    assert hb.auto_block_size(op, 100) == 10                 # half of 38 + 2 GiB free, 2 GiB a probe
    assert hb.auto_block_size(op, 6) == 6
    assert hb.auto_block_size(op, 1) == 1 and op.n_hvp == 3  # one probe: nothing measured
