"""Flatness metrics: zero and non-negativity where they must be, invariance where the relative ball promises it."""

import functools

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.functional import hessian
from torch.func import functional_call

from advkit.curvature.estimators import hessian_trace
from advkit.curvature.flatness import (
    FlatnessLoss,
    adaptive_sharpness,
    avg_case_flatness,
    confidence_flatness,
    dataset_loss,
    epsilon_sharpness,
    feature_layer,
    relative_flatness,
    relative_flatness_closed_form,
    worst_case_flatness,
)


def fgsm(model, x, y, eps=0.1):
    """Minimal attack with the advkit call shape, independent of advkit.attacks."""
    x = x.clone().requires_grad_(True)
    with torch.enable_grad():
        (g,) = torch.autograd.grad(F.cross_entropy(model(x), y), x)
    return (x + eps * g.sign()).clamp(0, 1).detach()


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 3))


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(96, 6, generator=g)
    y = (x[:, 0] + x[:, 1] > 1).long() + (x[:, 2] > 0.7).long()
    return x, y


@pytest.fixture(scope="module")
def convex_minimum(data):
    """Multinomial logistic regression at its minimum (L-BFGS): CE is convex in the weights."""
    x, y = data
    y = y.clone()
    y[::5] = (y[::5] + 1) % 3                    # label noise: not separable, finite minimizer
    torch.manual_seed(0)
    model = nn.Linear(6, 3)
    opt = torch.optim.LBFGS(model.parameters(), lr=1, max_iter=500, tolerance_grad=1e-9, tolerance_change=1e-12,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    opt.step(closure)
    return model, x, y


def rescaled(model, c):
    """Same function: layer 0 (weight and bias) times c, layer 2's weight divided by c (ReLU is 1-homogeneous)."""
    other = mlp()
    other.load_state_dict(model.state_dict())
    with torch.no_grad():
        other[0].weight.mul_(c)
        other[0].bias.mul_(c)
        other[2].weight.div_(c)
    return other


def test_zero_radius_gives_zero(data):
    x, y = data
    model = mlp()
    res = avg_case_flatness(model, x, y, xi=0.0, n_samples=3)
    assert res.value == 0.0 and res.samples == [0.0, 0.0, 0.0]
    assert worst_case_flatness(model, x, y, xi=0.0, steps=3).value == 0.0
    assert epsilon_sharpness(model, x, y, epsilon=0.0, steps=2).value == 0.0
    assert adaptive_sharpness(model, x, y, rho=0.0, steps=2).value == 0.0


def test_non_negative_at_a_minimum(convex_minimum):
    model, x, y = convex_minimum
    res = avg_case_flatness(model, x, y, xi=0.1, n_samples=20)
    assert min(res.samples) >= -1e-6 and res.value > 1e-4
    assert worst_case_flatness(model, x, y, xi=0.01, steps=5).value >= -1e-6
    assert epsilon_sharpness(model, x, y, epsilon=1e-2, steps=5).value > 0
    assert adaptive_sharpness(model, x, y, rho=0.1, steps=3).value > 0


def test_worst_case_beats_random_directions(data):
    x, y = data
    model = mlp()
    random = avg_case_flatness(model, x, y, xi=0.02, n_samples=10)
    worst = worst_case_flatness(model, x, y, xi=0.02, steps=10)
    assert worst.value > max(random.samples) > 0
    assert worst.loss == pytest.approx(random.loss)


def test_relative_ball_is_invariant_to_layerwise_rescaling(data):
    x, y = data
    a = mlp()
    b = rescaled(a, 5.0)
    torch.testing.assert_close(a(x), b(x), rtol=1e-4, atol=1e-5)
    fa = avg_case_flatness(a, x, y, xi=0.3, n_samples=4, seed=3)
    fb = avg_case_flatness(b, x, y, xi=0.3, n_samples=4, seed=3)
    np.testing.assert_allclose(fb.samples, fa.samples, rtol=1e-3, atol=1e-5)
    wa = worst_case_flatness(a, x, y, xi=0.01, steps=4, seed=1)
    wb = worst_case_flatness(b, x, y, xi=0.01, steps=4, seed=1)
    assert wb.value == pytest.approx(wa.value, rel=1e-3, abs=1e-6)
    # what the relative ball protects against: the Hessian trace is not invariant
    ta = hessian_trace(a, x, y, n_samples=8, block_size=8).value
    tb = hessian_trace(b, x, y, n_samples=8, block_size=8).value
    assert abs(tb - ta) > 0.5 * abs(ta)
    # relative flatness is invariant to rescaling features vs the last layer
    c = mlp()
    c.load_state_dict(a.state_dict())
    with torch.no_grad():
        c[2].weight.mul_(3.0)
        c[2].bias.mul_(3.0)
        c[4].weight.div_(3.0)
    assert relative_flatness(c, x).value == pytest.approx(relative_flatness(a, x).value, rel=1e-4)


def test_robust_loss_reruns_the_attack(data):
    x, y = data
    model = mlp()
    calls = []

    def counting(net, xb, yb):
        calls.append(1)
        return fgsm(net, xb, yb)

    res = avg_case_flatness(model, x, y, FlatnessLoss(attack=counting, batch_size=40), xi=0.2, n_samples=2)
    assert len(calls) == 3 * 3                       # (reference + 2 perturbations) x 3 chunks
    assert res.loss > dataset_loss(model, x, y)      # robust loss above clean loss
    assert "counting" in res.settings["attack"]
    joint = worst_case_flatness(model, x, y, xi=0.01, steps=3, eps=0.1)
    assert joint.loss > dataset_loss(model, x, y)
    with pytest.raises(ValueError, match="either attack"):
        worst_case_flatness(model, x, y, FlatnessLoss(attack=fgsm), eps=0.1)


def test_joint_ascent_is_pgd_from_a_random_start(data):
    """Stutz et al.'s joint ascent on the inputs, written out by hand: x_adv uniform in the L-inf
    eps-ball (first draw of the seeded generator), then one sign step of 2.5 eps / steps per weight
    step, projected onto the ball and the [0, 1] box. With xi = 0 the reference loss L(w) is it."""
    x, y = data
    model = mlp()
    eps, steps = 0.1, 3
    res = worst_case_flatness(model, x, y, FlatnessLoss(batch_size=40), xi=0.0, steps=steps, eps=eps, seed=5)
    gen = torch.Generator().manual_seed(5)
    x_adv = (x + (2 * torch.rand(x.shape, generator=gen) - 1) * eps).clamp(0, 1)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        (g,) = torch.autograd.grad(F.cross_entropy(model(x_adv), y), x_adv)
        x_adv = torch.min(torch.max(x_adv.detach() + 2.5 * eps / steps * g.sign(), x - eps), x + eps).clamp(0, 1)
    assert res.loss == pytest.approx(F.cross_entropy(model(x_adv), y).item(), rel=1e-6)
    assert res.loss > dataset_loss(model, x, y)
    # weights and inputs ascend together: above both the robust L(w) and the clean worst case
    joint = worst_case_flatness(model, x, y, xi=0.02, steps=10, eps=eps)
    clean = worst_case_flatness(model, x, y, xi=0.02, steps=10)
    assert joint.perturbed_loss > max(joint.loss, clean.perturbed_loss) and joint.value > 0

def test_with_advkit_pgd_and_batchnorm(data):
    attacks = pytest.importorskip("advkit.attacks.pgd")
    x, y = data
    x = x[:, :4, None, None].repeat(1, 1, 4, 4)            # (N, 4, 4, 4) images in [0, 1]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.Flatten(),
                          nn.Linear(24, 3)).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pgd = functools.partial(attacks.pgd, eps=0.05, steps=2)
    res = avg_case_flatness(model, x, y, FlatnessLoss(attack=pgd), xi=0.1, n_samples=2)
    assert np.isfinite(res.value) and "pgd" in res.settings["attack"] and "eps=0.05" in res.settings["attack"]
    assert model.training and model[1].training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    bn_too = avg_case_flatness(model, x, y, FlatnessLoss(include_bn=True), xi=0.1, n_samples=2)
    assert bn_too.value != avg_case_flatness(model, x, y, xi=0.1, n_samples=2).value


def test_result_row_has_value_and_settings(data):
    x, y = data
    row = avg_case_flatness(mlp(), x, y, n_samples=2).as_row()
    assert {"avg_case_flatness", "avg_case_flatness_loss", "avg_case_flatness_xi", "avg_case_flatness_seed",
            "avg_case_flatness_n_samples", "avg_case_flatness_attack"} <= set(row)
    assert row["avg_case_flatness_xi"] == 0.5 and row["avg_case_flatness_n_samples"] == 2
    pd.DataFrame([row])                               # one flatness.csv row


def test_relative_flatness_closed_form_equals_autograd(data):
    x, y = data
    model = mlp()
    name, lin = feature_layer(model)
    assert name == "4"
    W0 = lin.weight.detach()

    def mean_loss(W, xs, ys):
        return F.cross_entropy(functional_call(model, {"4.weight": W}, (xs,)), ys)

    def kappa(xs, ys):
        H = hessian(lambda W: mean_loss(W, xs, ys), W0)                    # (d, m, d, m)
        tr = torch.einsum("skqk->sq", H)                                    # Tr(H_{s,s'})
        return float((W0 @ W0.T * tr).sum())                                # sum <w_s, w_s'> Tr(H_ss')

    res = relative_flatness(model, x[:32])
    assert res.value == pytest.approx(kappa(x[:32], y[:32]), rel=1e-4)
    for i in (0, 7):
        assert res.per_example[i] == pytest.approx(kappa(x[i:i + 1], y[i:i + 1]), rel=1e-4)


def test_confidence_flatness_table(data):
    x, y = data
    model = mlp()
    df = confidence_flatness(model, x, y)
    assert list(df.columns) == ["label", "predicted", "confidence", "correct", "loss", "relative_flatness"]
    with torch.no_grad():
        p = torch.softmax(model(x), 1)
    np.testing.assert_allclose(df["confidence"], p.max(1).values.numpy(), rtol=1e-5)
    assert (df["correct"] == (df["predicted"] == df["label"])).all()
    np.testing.assert_allclose(df["relative_flatness"], relative_flatness(model, x).per_example, rtol=1e-6)
    adv = confidence_flatness(model, x, y, attack=fgsm)
    assert adv["loss"].mean() > df["loss"].mean()
    np.testing.assert_allclose(adv["relative_flatness"], relative_flatness(model, fgsm(model, x, y)).per_example,
                               rtol=1e-6)
    # a confident prediction is flat, whatever its class: kappa -> 0 as p becomes one-hot
    W, phi = torch.randn(3, 5), torch.randn(4, 5)
    uniform = relative_flatness_closed_form(W, phi, torch.zeros(4, 3))
    spread = (W ** 2).sum(1).mean() - (W.mean(0) ** 2).sum()                # variance of w_c under uniform p
    torch.testing.assert_close(uniform, (phi ** 2).sum(1).double() * spread.double())
    confident = relative_flatness_closed_form(W, phi, torch.tensor([[30.0, 0, 0]] * 4))
    assert float(confident.max()) < 1e-9 * float(uniform.min())


def test_feature_layer_of_advkit_models():
    models = pytest.importorskip("advkit.models")
    model = models.get_model("small_cnn", 10, 1)
    name, lin = feature_layer(model)
    assert name == "linear" and lin is model.linear
    res = relative_flatness(model, torch.rand(5, 1, 8, 8))
    assert res.per_example.shape == (5,) and res.settings["layer"] == "linear"
    with pytest.raises(ValueError, match="nn.Linear"):
        feature_layer(nn.Sequential(nn.Conv2d(1, 2, 3)))


def test_bad_input(data):
    x, y = data
    model = mlp()
    with pytest.raises(ValueError, match="xi"):
        avg_case_flatness(model, x, y, xi=-0.1)
    with pytest.raises(ValueError, match="n_samples"):
        avg_case_flatness(model, x, y, n_samples=0)
    with pytest.raises(ValueError, match="xi"):
        worst_case_flatness(model, x, y, xi=-1)
    with pytest.raises(ValueError, match="steps"):
        worst_case_flatness(model, x, y, steps=0)
    with pytest.raises(ValueError, match="restarts"):
        worst_case_flatness(model, x, y, restarts=0)
    with pytest.raises(ValueError, match="eps"):
        worst_case_flatness(model, x, y, eps=float("nan"))
    with pytest.raises(ValueError, match="eps must be a finite number >= 0 and <= 1"):
        worst_case_flatness(model, x, y, eps=2.0)
    with pytest.raises(ValueError, match="epsilon"):
        epsilon_sharpness(model, x, y, epsilon=-1)
    with pytest.raises(ValueError, match="rho"):
        adaptive_sharpness(model, x, y, rho=-1)
    with pytest.raises(ValueError, match="equal length"):
        avg_case_flatness(model, x, y[:3])
    with pytest.raises(ValueError, match="layers"):
        avg_case_flatness(model, x, y, FlatnessLoss(layers=["nope"]))
