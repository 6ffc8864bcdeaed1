"""Walter et al. 2025 (advkit.curvature.local_global) against hand-computable cases."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from advkit.curvature.flatness import relative_flatness
from advkit.curvature.local_global import (
    bound_vs_eps,
    flatness_bound,
    kappa_along_path,
    loss_change_bound,
    rescaling_study,
    scale_logits,
    transfer_across_eps,
    walter_models,
)


def linear_softmax(weight, bias=None):
    """f(x) = W x + b on 2-D 'images' of shape (N, 1, 1, 2): phi(x) = x exactly."""
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        lin.weight.copy_(weight)
        if bias is not None:
            lin.bias.copy_(bias)
    return nn.Sequential(nn.Flatten(), lin).double()


def kappa_by_hessian(model, x, y):
    """sum_{s,s'} <w_s, w_s'> Tr(H_{s,s'}) with H the autograd Hessian of the mean CE w.r.t. W."""
    lin = model[-1] if isinstance(model, nn.Sequential) else model.model[-1]
    W0 = lin.weight.detach().clone()
    phi = x.flatten(1).to(W0.dtype)
    bias = lin.bias.detach() if lin.bias is not None else 0.0

    def loss(W):
        return F.cross_entropy(phi @ W.T + bias, y)

    H = torch.autograd.functional.hessian(loss, W0)            # (d, m, d, m)
    traces = torch.einsum("aibi->ab", H)                       # Tr(H_{s,s'})
    return float((W0 @ W0.T * traces).sum())


@pytest.fixture
def three_class():
    torch.manual_seed(0)
    W = torch.tensor([[2.0, -1.0], [-1.5, 1.0], [0.3, 2.5]], dtype=torch.float64)
    b = torch.tensor([0.1, -0.2, 0.05], dtype=torch.float64)
    x = torch.rand(16, 1, 1, 2, dtype=torch.float64)
    y = torch.randint(0, 3, (16,))
    return linear_softmax(W, b), x, y


def test_kappa_closed_form_equals_hessian_definition(three_class):
    model, x, y = three_class
    kappa = relative_flatness(model, x).value
    assert kappa == pytest.approx(kappa_by_hessian(model, x, y), rel=1e-9)


def test_two_class_kappa_by_hand():
    # kappa = ||phi||^2 p (1 - p) ||w_1 - w_2||^2 for two classes; with logits scaled by c, p = sigmoid(c (z1 - z2))
    W = torch.tensor([[1.0, 2.0], [-1.0, 0.5]], dtype=torch.float64)
    x = torch.tensor([[[[0.6, 0.3]]]], dtype=torch.float64)
    phi = x.flatten(1)[0]
    for c in (0.5, 1.0, 2.0, 4.0):
        model = scale_logits(linear_softmax(W), c)
        p = torch.sigmoid(c * (W[0] - W[1]) @ phi)
        expected = c ** 2 * phi.dot(phi) * p * (1 - p) * (W[0] - W[1]).dot(W[0] - W[1])
        assert relative_flatness(model, x).value == pytest.approx(float(expected), rel=1e-9)


def test_rescaling_keeps_predictions_and_changes_kappa_as_predicted(three_class):
    model, x, y = three_class
    base = model(x)
    kappas = []
    for c in (0.5, 2.0, 4.0):
        scaled = scale_logits(model, c)
        assert torch.equal(scaled(x).argmax(1), base.argmax(1))
        assert torch.allclose(scaled(x), c * base)
        kappas.append(relative_flatness(scaled, x).value)
        assert kappas[-1] == pytest.approx(kappa_by_hessian(scaled, x, y), rel=1e-9)
    assert model[-1].weight[0, 0].item() == 2.0                  # the original is untouched
    assert len(set(np.round(kappas, 9))) == 3                     # kappa does change


def test_feature_reparametrization_leaves_kappa_unchanged():
    # phi -> c phi (ReLU layer scaled by c), W -> W / c: the same function and, as relative flatness promises,
    # the same kappa
    torch.manual_seed(1)
    net = nn.Sequential(nn.Flatten(), nn.Linear(2, 5), nn.ReLU(), nn.Linear(5, 3)).double()
    x = torch.rand(8, 1, 1, 2, dtype=torch.float64)
    k0 = relative_flatness(net, x).value
    with torch.no_grad():
        net[1].weight.mul_(3.0), net[1].bias.mul_(3.0), net[3].weight.div_(3.0)
    assert relative_flatness(net, x).value == pytest.approx(k0, rel=1e-9)


def brute_force_max_change(W, b, phi, y, delta, n=721, radii=60):
    """max over a fine polar grid of ||u|| <= delta ||phi|| of CE(W (phi + u) + b) - CE(W phi + b)."""
    r = torch.linspace(0, 1, radii, dtype=torch.float64)[:, None] * delta * phi.norm()
    t = torch.linspace(0, 2 * math.pi, n, dtype=torch.float64)[None, :]
    u = torch.stack([r * torch.cos(t), r * torch.sin(t)], -1).reshape(-1, 2)
    loss = F.cross_entropy((phi + u) @ W.T + b, y.expand(len(u)), reduction="none")
    return float(loss.max() - F.cross_entropy((phi @ W.T + b)[None], y))


def test_bound_holds_locally_by_brute_force_and_needs_the_flatness_term():
    W = torch.tensor([[2.0, -1.0], [-1.5, 1.0], [0.3, 2.5]], dtype=torch.float64)
    b = torch.zeros(3, dtype=torch.float64)
    phi, y = torch.tensor([0.4, 0.5], dtype=torch.float64), torch.tensor([2])
    z = phi @ W.T
    for delta in (0.01, 0.03, 0.1):
        brute = brute_force_max_change(W, b, phi, y, delta)
        bound = float(flatness_bound(W, phi[None], z[None], y, delta))
        first_order = float(flatness_bound(W, phi[None], z[None], y, delta) -
                            0.5 * delta ** 2 * relative_flatness(linear_softmax(W), phi.view(1, 1, 1, 2)).value)
        assert brute <= bound + 1e-12
        assert brute > first_order                                   # the kappa term is what makes it hold


def test_bound_is_local_not_global():
    # a confidently correct point (p_y = 0.98): the curvature grows as the features move, so the dropped
    # O(delta^3) remainder is negligible for small delta and dominates for large delta (two classes: the bound
    # is tight at 2nd order)
    W = torch.tensor([[4.0, 0.0], [0.0, 4.0]], dtype=torch.float64)
    b = torch.zeros(2, dtype=torch.float64)
    phi, y = torch.tensor([1.0, 0.0], dtype=torch.float64), torch.tensor([0])
    z = phi @ W.T
    ratio = {d: brute_force_max_change(W, b, phi, y, d) / float(flatness_bound(W, phi[None], z[None], y, d))
             for d in (0.001, 0.01, 0.5, 1.0)}
    assert abs(ratio[0.001] - 1) < 1e-4 and abs(ratio[0.01] - 1) < 1e-3      # exact to second order
    assert ratio[0.5] > 1.5 and ratio[1.0] > 3                                  # not a global bound


def test_loss_change_bound_measures_delta_and_loss(three_class):
    model, x, y = three_class
    x_adv = (x + 0.01).clamp(0, 1)
    df = loss_change_bound(model, x, x_adv, y)
    phi, phi_adv = x.flatten(1), x_adv.flatten(1)
    np.testing.assert_allclose(df["delta"], ((phi_adv - phi).norm(dim=1) / phi.norm(dim=1)).numpy(), rtol=1e-9)

    def ce(v):
        return F.cross_entropy(model(v), y, reduction="none")

    np.testing.assert_allclose(df["loss_change"], (ce(x_adv) - ce(x)).detach().numpy(), rtol=1e-9, atol=1e-12)
    assert df["holds"].all()


def float_model():
    torch.manual_seed(3)
    net = nn.Sequential(nn.Flatten(), nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    x = torch.rand(24, 1, 2, 2)
    return net, x, net(x).argmax(1).detach()


def test_bound_vs_eps_and_kappa_path_shapes():
    net, x, y = float_model()
    curve = bound_vs_eps(net, x, y, [0.01, 0.1], steps=3)
    assert list(curve["eps"]) == [0.01, 0.1] and curve["bound_holds"].between(0, 1).all()
    assert curve["robust_accuracy"].iloc[0] >= curve["robust_accuracy"].iloc[1]
    path = kappa_along_path(net, x, y, eps=0.1, steps=4)
    assert list(path["step"]) == [0, 1, 2, 3] and np.isfinite(path["kappa_median"]).all()
    assert path["loss"].iloc[-1] >= path["loss"].iloc[0]


def test_rescaling_study_margin_pgd_is_scale_free():
    net, x, y = float_model()
    df = rescaling_study(net, x, y, [0.5, 1.0, 2.0], eps=0.2, steps=5)
    assert df["accuracy"].nunique() == 1
    assert df["robust_accuracy_margin"].nunique() == 1            # powers of two: logits scale exactly
    assert df["kappa_median"].nunique() == 3


def test_transfer_across_eps():
    net, x, y = float_model()
    out = transfer_across_eps(net, x, y, 0.3, 0.8, steps=5)
    assert 0 < out["fooled_small"] <= 1 - out["robust_accuracy_large_warm"] + 1e-9   # warm start keeps them
    assert out["robust_accuracy_large"] < 1 - out["fooled_small"]
    assert 0 <= out["also_fooled_large"] <= 1 and 0 <= out["robust_accuracy_large"] <= 1
    with pytest.raises(ValueError):
        transfer_across_eps(net, x, y, 0.3, 0.05)


def test_summary_lines_state_each_claim_and_enter_the_notebook_summary():
    import pandas as pd

    from advkit.curvature.local_global import summary_lines
    from advkit.studies import correlation
    curve = pd.DataFrame({"eps": [0.01, 0.1], "bound_holds": [1.0, 0.3], "spearman_kappa_change": [0.9, 0.1],
                          "spearman_p": [1e-5, 0.5], "n": [64, 64]})
    scaled = pd.DataFrame({"scale": [1.0, 16.0], "kappa_median": [3.0, 0.0], "robust_accuracy_ce": [0.1, 0.3],
                           "robust_accuracy_margin": [0.1, 0.1]})
    moved = {"eps_small": 0.01, "eps_large": 0.1, "fooled_small": 0.2, "also_fooled_large": 1.0,
             "robust_accuracy_large": 0.1, "robust_accuracy_large_warm": 0.1}
    lines = summary_lines({"base": curve}, {"base": scaled}, {"base": moved})
    assert len(lines) == 3 and "SUPPORTED" in lines[0] and "gradient masking" in lines[1]
    assert "NOT SUPPORTED" in summary_lines({"base": curve.assign(bound_holds=[0.5, 0.3])}, {"base": scaled},
                                            {"base": moved})[0]
    table = pd.DataFrame(index=["base"])
    text = correlation.summary(table, pd.DataFrame(), local=lines)
    assert text.endswith(lines[-1]) or lines[-1] in text


def test_cifar_shaped_resnet_runs_every_analysis():
    """The intended scale: a CIFAR ResNet on 3x32x32 images at the paper's 8/255, every analysis once."""
    from advkit.models import get_model
    torch.manual_seed(0)
    model = get_model("resnet20", 10, 3).eval()
    x, y = torch.rand(8, 3, 32, 32), torch.randint(0, 10, (8,))
    curve = bound_vs_eps(model, x, y, [2 / 255, 8 / 255], steps=2)
    assert list(curve["eps"]) == pytest.approx([2 / 255, 8 / 255])
    assert np.isfinite(curve[["loss_change", "bound"]].to_numpy()).all()
    assert (curve["bound_holds"].between(0, 1)).all()
    path = kappa_along_path(model, x, y, eps=8 / 255, steps=2)
    assert len(path) == 2 and np.isfinite(path.select_dtypes("number").to_numpy()).all()
    scaled = rescaling_study(model, x, y, [1.0, 4.0], eps=8 / 255, steps=2)
    assert scaled["accuracy"].nunique() == 1  # logit rescaling keeps every prediction
    moved = transfer_across_eps(model, x, y, 2 / 255, 8 / 255, steps=2)
    assert 0 <= moved["fooled_small"] <= 1


def test_walter_models_set_the_first_robust_model_the_run_has_beside_the_reference():
    assert walter_models("base", ["base", "fgsm", "trades", "pgd_at"]) == ["base", "pgd_at"]
    assert walter_models("base", ["base", "trades"]) == ["base", "trades"]
    assert walter_models("pgd_at", ["base", "pgd_at", "trades"]) == ["pgd_at", "trades"]
    assert walter_models("base", ["base", "fgsm"]) == ["base"]
