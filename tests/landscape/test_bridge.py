"""The referee's bridge (advkit.curvature): dᵀHd, the fit curvature and eigenvalue maps against
closed forms (a linear model with squared error, whose Hessian is XᵀX/n everywhere), finite
differences of real surfaces, and a CIFAR-shaped smoke run."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
import xarray as xr
from torch import nn

from advkit.attacks.pgd import pgd
from advkit.landscape import bridge as C
from advkit.landscape.directions import explicit_directions, random_directions
from advkit.landscape.settings import SurfaceSettings
from advkit.landscape.sharpness import quadratic_fit
from advkit.landscape.surfaces import compute_surface, model_surfaces
from advkit.models import get_model


def half_squared_error(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return 0.5 * (out[:, 0] - y) ** 2


def linear_case(seed: int = 0, k: int = 4, n: int = 32):
    """nn.Linear(k, 1) with a bias, squared error: the weights' Hessian block is XᵀX/n exactly."""
    gen = torch.Generator().manual_seed(seed)
    model = nn.Linear(k, 1)
    x = torch.randn(n, k, generator=gen) + 0.5   # non-zero mean: the bias block couples to the weights
    y = torch.randn(n, generator=gen)
    return model, x, y, (x.T @ x / n).double().numpy()


def test_directional_curvature_is_dHd_of_the_weights_block():
    model, x, y, H = linear_case()
    d = random_directions(model, 2, seed=3, norm="filter")      # bias ignored: zero direction entry
    assert "bias" in d.ignored
    got = C.directional_curvature(model, d, x, y, loss_fn=half_squared_error)
    D = np.stack([v["weight"].reshape(-1).double().numpy() for v in d.vectors])
    np.testing.assert_allclose(got.matrix, D @ H @ D.T, rtol=1e-4, atol=1e-6)
    assert got.n_params == 4 and got.n_hvp == 2     # the bias is out of the parameter set


def test_fit_curvature_of_an_exact_quadratic_surface_equals_dHd():
    """f(α, β) = L(θ + α d1 + β d2) of a quadratic loss is ½ [α β] DHDᵀ [α β]ᵀ + linear: the fit's
    entries (∂²f/∂α² etc.) equal dᵀHd for any radius."""
    model, x, y, H = linear_case(1)
    d = random_directions(model, 2, seed=0, norm="filter")
    exact = C.directional_curvature(model, d, x, y, loss_fn=half_squared_error).matrix
    a = np.linspace(-1, 1, 9)
    A, B = np.meshgrid(a, a, indexing="ij")
    w0 = model.weight.detach().reshape(-1).double().numpy()
    D = np.stack([v["weight"].reshape(-1).double().numpy() for v in d.vectors])
    X, Y = x.double().numpy(), y.double().numpy()
    b0 = float(model.bias.detach())
    loss = np.array([[np.mean(0.5 * (X @ (w0 + p * D[0] + q * D[1]) + b0 - Y) ** 2) for q in a] for p in a])
    ds = xr.Dataset({"loss": (("alpha", "beta"), loss)}, coords={"alpha": a, "beta": a})
    for radius in (0.5, 1.0):
        fit = quadratic_fit(ds, radius=radius)
        assert fit["curvature_aa"] == pytest.approx(exact[0, 0], rel=1e-4)
        assert fit["curvature_bb"] == pytest.approx(exact[1, 1], rel=1e-4)
        assert fit["curvature_ab"] == pytest.approx(exact[0, 1], rel=1e-4, abs=1e-6)


def test_eigen_map_of_a_quadratic_is_constant_and_excludes_the_bias():
    model, x, y, H = linear_case(2)
    d = random_directions(model, 2, seed=1)
    ev = np.linalg.eigvalsh(H)
    full = C.HessianOperator(model, x, y, loss_fn=half_squared_error).dense().double().numpy()
    assert not np.isclose(np.linalg.eigvalsh(full).max(), ev.max(), rtol=1e-3)  # the bias would change it
    m = C.hessian_eigen_map(model, d, x, y, [-1.0, 0.0, 1.0], loss_fn=half_squared_error, steps=4)
    np.testing.assert_allclose(m["lambda_max"].values, ev.max(), rtol=1e-4)
    np.testing.assert_allclose(m["lambda_min"].values, ev.min(), rtol=1e-3)
    np.testing.assert_allclose(m["ratio"].values, abs(ev.min() / ev.max()), rtol=1e-3)
    assert m["converged"].values.all() and m["ratio"].dims == ("alpha", "beta")


def test_eigen_map_sees_an_indefinite_hessian():
    """loss ½ wᵀAw (a module returning its own loss) with A indefinite: λmin < 0, ratio = |λmin/λmax|."""
    A = torch.diag(torch.tensor([3.0, 1.0, -1.5]))

    class Quad(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.tensor([[0.5, -0.2, 1.0]]))

        def forward(self, x):
            w = self.w[0]
            return (0.5 * w @ A @ w).expand(len(x), 1)

    model = Quad()
    e = {"w": torch.eye(3)[:1]}, {"w": torch.eye(3)[1:2]}
    d = explicit_directions(model, *e)
    got = C.directional_curvature(model, d, torch.zeros(4, 1), torch.zeros(4), loss_fn=lambda o, y: o[:, 0])
    np.testing.assert_allclose(got.matrix, [[3.0, 0.0], [0.0, 1.0]], atol=1e-5)
    m = C.hessian_eigen_map(model, d, torch.zeros(4, 1), torch.zeros(4), [-1.0, 1.0], loss_fn=lambda o, y: o[:, 0],
                            steps=3)
    np.testing.assert_allclose(m["lambda_min"].values, -1.5, rtol=1e-4)
    np.testing.assert_allclose(m["ratio"].values, 0.5, rtol=1e-4)


def small_bn_net(seed: int = 0) -> nn.Module:
    """Conv (bias) + BatchNorm + tanh + linear: smooth, so second differences of its surface converge
    (with ReLU they see activation patterns switching within the step, which the Hessian at θ does not)."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Tanh(), nn.Flatten(), nn.Linear(64, 3))
    with torch.no_grad():   # non-trivial running statistics: eval mode differs from train mode
        net[1].running_mean.uniform_(-0.2, 0.2)
        net[1].running_var.uniform_(0.5, 2.0)
    return net.eval()


def test_hvp_equals_finite_differences_of_the_surface_itself():
    """Second differences of compute_surface (biases, BatchNorm ignored, eval statistics) at the centre
    agree with d1ᵀHd1, d2ᵀHd2, d1ᵀHd2: the same function, parameter set and BatchNorm mode."""
    model = small_bn_net()
    gen = torch.Generator().manual_seed(0)
    x, y = torch.rand(16, 1, 4, 4, generator=gen), torch.randint(0, 3, (16,), generator=gen)
    d = random_directions(model, 2, seed=0)
    h = 0.02
    ds = compute_surface(model, d, x, y, SurfaceSettings(span=h, resolution=3, precision="fp32", fold_bn=False))
    f = ds["loss"].transpose("alpha", "beta").values.astype(np.float64)
    fd = np.array([[(f[2, 1] + f[0, 1] - 2 * f[1, 1]) / h ** 2, (f[2, 2] - f[2, 0] - f[0, 2] + f[0, 0]) / (4 * h ** 2)],
                   [0.0, (f[1, 2] + f[1, 0] - 2 * f[1, 1]) / h ** 2]])
    fd[1, 0] = fd[0, 1]
    exact = C.directional_curvature(model, C.surface_directions(model, ds, x, y), x, y).matrix
    np.testing.assert_allclose(exact, fd, rtol=0.05, atol=0.02 * np.abs(fd).max())


def test_curvature_table_and_its_checks():
    model = small_bn_net(1)
    gen = torch.Generator().manual_seed(1)
    x, y = torch.rand(12, 1, 4, 4, generator=gen), torch.randint(0, 3, (12,), generator=gen)
    attack = functools.partial(pgd, eps=0.05, steps=2, seed=0)
    settings = SurfaceSettings(span=0.1, resolution=5, precision="fp32")
    surfaces = model_surfaces({"m": model}, x, y, None, settings, attack=attack, attack_name="pgd")
    table = C.curvature_table({"m": model}, x, y, surfaces, attack=attack, radius=0.1)
    assert list(table.index) == [("m", "clean"), ("m", "robust")]
    clean = table.loc[("m", "clean")]
    assert clean["fit_aa"] == pytest.approx(clean["hvp_aa"], rel=0.1)     # small radius: the fit is the Hessian
    assert np.isnan(table.loc[("m", "robust"), "hvp_bb"]) and np.isfinite(table.loc[("m", "robust"), "hvp_aa"])
    with pytest.raises(ValueError, match="images"):     # other images than the surface's
        C.surface_directions(model, surfaces["grid"]["m"], x[:6], y[:6])
    with pytest.raises(ValueError, match="directions|weights"):
        C.surface_directions(small_bn_net(2), surfaces["grid"]["m"], x, y)


def test_cifar_shaped_resnet_smoke():
    model = get_model("resnet20", 10, 3).eval()
    gen = torch.Generator().manual_seed(0)
    x, y = torch.rand(4, 3, 32, 32, generator=gen), torch.randint(0, 10, (4,), generator=gen)
    d = random_directions(model, 2, seed=0)
    got = C.directional_curvature(model, d, x, y)
    assert got.n_params == sum(p.numel() for n, p in model.named_parameters() if n not in d.ignored)
    assert np.isfinite(got.matrix).all()
    attack = functools.partial(pgd, eps=8 / 255, steps=1, seed=0)
    m = C.hessian_eigen_map(model, d, x, y, [0.0], attack=attack, steps=3)
    assert m["lambda_max"].item() >= m["lambda_min"].item() and m.attrs["loss"] == "robust (Danskin)"


def test_robust_curvature_is_the_hessian_at_the_attacked_inputs_held_fixed():
    """Danskin: with an attack, dᵀHd is the clean dᵀHd at the attack's points (computed at θ*); in the
    eigenvalue map the attack sees the perturbed weights of each point."""
    model = small_bn_net(3)
    gen = torch.Generator().manual_seed(3)
    x, y = torch.rand(8, 1, 4, 4, generator=gen), torch.randint(0, 3, (8,), generator=gen)
    d = random_directions(model, 2, seed=0)
    seen = []

    def attack(net, xb, yb):
        seen.append(net(xb).detach())
        return (xb + 0.1).clamp(0, 1)

    robust = C.directional_curvature(model, d, x, y, attack=attack).matrix
    np.testing.assert_allclose(robust, C.directional_curvature(model, d, (x + 0.1).clamp(0, 1), y).matrix, rtol=1e-5)
    seen.clear()
    C.hessian_eigen_map(model, d, x, y, [-0.5, 0.5], attack=attack, steps=2)
    assert len(seen) == 4 and not torch.allclose(seen[0], seen[-1])


def test_backends_agree():
    model = small_bn_net(4)
    gen = torch.Generator().manual_seed(4)
    x, y = torch.rand(10, 1, 4, 4, generator=gen), torch.randint(0, 3, (10,), generator=gen)
    d = random_directions(model, 2, seed=2)
    fwd = C.directional_curvature(model, d, x, y, backend="forward", batch_size=3).matrix
    np.testing.assert_allclose(C.directional_curvature(model, d, x, y, backend="reverse").matrix, fwd,
                               rtol=1e-4, atol=1e-7)


def test_eigen_maps_are_each_models_maps_in_its_surface_plane():
    models = {"base": small_bn_net(1), "b": small_bn_net(2)}
    gen = torch.Generator().manual_seed(1)
    x, y = torch.rand(12, 1, 4, 4, generator=gen), torch.randint(0, 3, (12,), generator=gen)
    attack = functools.partial(pgd, eps=0.05, steps=2, seed=0)
    surfaces = model_surfaces(models, x, y, None, SurfaceSettings(span=0.1, resolution=3, precision="fp32"))
    coords = [-0.1, 0.0, 0.1]
    maps = C.eigen_maps(models, surfaces["grid"], x, y, coords, names=["b", "absent"], n_images=6, attack=attack,
                        steps=3, seed=2)
    assert list(maps) == ["b"] and list(maps["b"]) == ["clean", "robust"]
    d = C.surface_directions(models["b"], surfaces["grid"]["b"], x, y)
    for loss, a in (("clean", None), ("robust", attack)):
        xr.testing.assert_identical(maps["b"][loss], C.hessian_eigen_map(models["b"], d, x[:6], y[:6], coords,
                                                                         attack=a, steps=3, seed=2))
    assert list(C.eigen_maps(models, surfaces["grid"], x, y, coords, names=["base"], steps=3)["base"]) == ["clean"]
    summary = C.eigen_map_summary(maps)
    assert list(summary.index) == [("b", "clean"), ("b", "robust")]
    clean = maps["b"]["clean"]
    assert summary.loc[("b", "clean"), "lambda_max_centre"] == float(clean["lambda_max"][1, 1])
    assert summary.loc[("b", "clean"), "ratio_max"] == float(clean["ratio"].max())
