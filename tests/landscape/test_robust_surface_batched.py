"""Robust surfaces batched across grid points (advkit.landscape.robust): one attack call on P
stacked copies of a batch, copy p at point p's weights, equals the attack re-run point by point.

The comparisons run in float64: in float32 the batched (grouped) convolutions round differently
from the per-point ones, and where a ReLU input sits within rounding of 0 that flips a
gradient sign, moving a pixel by 2 eps; float64 makes that vanishingly rare, so what is compared
is the computation, not the rounding (the float32 forward is checked on its own, below).
"""

import functools

import numpy as np
import pytest
import torch

from advkit._torch import WithParams
from advkit.attacks.pgd import fgsm, pgd, pgd_on_copies
from advkit.landscape.directions import random_directions
from advkit.landscape.engine import Engine
from advkit.landscape.robust import PointsModule, attack_points, on_copies
from advkit.landscape.surfaces import line
from advkit.models import get_model

EPS = 8 / 255
PGD_FIXED_START = functools.partial(pgd, eps=EPS, steps=2, restarts=0)
FGSM = functools.partial(fgsm, eps=EPS)
PROFILE_PGD = functools.partial(pgd, eps=EPS, steps=2, seed=0)  # as notebook 04 builds it (random start)
ROBUST = ("robust_loss", "robust_accuracy")


def _resnet(dtype: torch.dtype) -> torch.nn.Module:
    """ResNet-20 with BatchNorm statistics measured on CIFAR-shaped noise (not the 0/1 defaults)."""
    torch.manual_seed(0)
    model = get_model("resnet20", 10, 3).to(dtype)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None
    model.train()
    with torch.no_grad():
        model(torch.rand(64, 3, 32, 32, generator=torch.Generator().manual_seed(1), dtype=dtype))
    return model.eval()


@pytest.fixture(scope="module")
def resnet():
    return _resnet(torch.float64)


@pytest.fixture(scope="module")
def xy():
    g = torch.Generator().manual_seed(2)
    return torch.rand(8, 3, 32, 32, generator=g, dtype=torch.float64), torch.randint(0, 10, (8,), generator=g)


def _robust_line(model, xy, attack, points_per_forward, bn="ignore", **settings):
    d = random_directions(model, 1, seed=0, bn=bn)
    ds = line(model, d, *xy, resolution=4, span=0.5, attack=attack, quantities=ROBUST, precision="fp32",
                points_per_forward=points_per_forward, **settings)
    return {q: ds[q].values for q in ROBUST}


@pytest.mark.slow
@pytest.mark.parametrize("attack, points, settings", [
    (PGD_FIXED_START, 3, {}),  # groups of 3 and 1 points
    (PGD_FIXED_START, 4, {"channels_last": True}),
    (FGSM, 4, {}),
    (PROFILE_PGD, 4, {}),  # random start: drawn once per copy, as each per-point call draws it
    (PROFILE_PGD, 3, {"bn": "include"}),  # BatchNorm perturbed: folded at every point inside vmap
    (PROFILE_PGD, 4, {"fold_bn": False}),  # BatchNorm itself under vmap, per-point statistics
], ids=["pgd-fixed-start-3", "pgd-fixed-start-4-channels-last", "fgsm-4", "pgd-random-start-4",
        "pgd-bn-perturbed-3", "pgd-unfolded-4"])
def test_batched_robust_line_equals_the_per_point_loop(resnet, xy, attack, points, settings):
    loop = _robust_line(resnet, xy, attack, 1, **settings)
    batched = _robust_line(resnet, xy, attack, points, **settings)
    np.testing.assert_allclose(batched["robust_loss"], loop["robust_loss"], rtol=1e-5)
    np.testing.assert_array_equal(batched["robust_accuracy"], loop["robust_accuracy"])
    assert np.ptp(loop["robust_loss"]) > 1.0  # the points differ: a constant line would prove little


def test_batched_robust_line_in_float32_within_rounding_of_the_loop(xy):
    """float32 (the default): equal up to ReLU-kink sign flips in a few examples, which move the
    robust loss by 4e-4 relative here (3e-3 for PGD without random start); the loop moves as much
    under other kernels (channels_last, unfolded BatchNorm). 1e-2 bounds rounding; a wrong point's
    weights would be off by a factor (the line's losses span 7x), float64 above checks exactly."""
    model = _resnet(torch.float32)
    x, y = xy[0].float(), xy[1]
    loop = _robust_line(model, (x, y), PROFILE_PGD, 1)
    batched = _robust_line(model, (x, y), PROFILE_PGD, 4)
    np.testing.assert_allclose(batched["robust_loss"], loop["robust_loss"], rtol=1e-2)


def _engine(model, points=2):
    d = random_directions(model, 1, seed=0)
    engine = Engine(model, d, batch_size=64, points_per_forward=points, precision="fp32", channels_last=False,
                    fold_bn=True, bn_mode="eval", bn_x=None, bn_batch_size=64)
    stacked = engine.perturbed(torch.tensor([[-0.5], [0.5]], dtype=torch.float64))
    return engine, stacked, PointsModule(engine.exec_module, stacked, 2, engine.forward)


def _point(engine, stacked, j):
    return WithParams(engine.exec_module, {k: v[j] for k, v in stacked.items()}, forward=engine.forward)


def test_each_copy_is_attacked_at_its_own_point(resnet, xy):
    """x_adv of copy p equals the attack on point p alone, and the two points' x_adv differ."""
    x, y = xy
    engine, stacked, module = _engine(resnet)
    x_adv = attack_points(PROFILE_PGD, module, x, y)
    assert x_adv.shape == (2, *x.shape)
    for j in range(2):
        torch.testing.assert_close(x_adv[j], PROFILE_PGD(_point(engine, stacked, j), x, y), rtol=0, atol=1e-12)
    assert (x_adv[0] - x_adv[1]).abs().amax() > EPS  # different weights, different adversarial examples


def test_points_module_float32_logits_match_each_point(xy):
    """In float32 the stacked forward rounds differently from the per-point one, by no more than 1e-5."""
    model = _resnet(torch.float32)
    x = xy[0].float()
    engine, stacked, module = _engine(model)
    with torch.no_grad():
        logits = module(x.repeat(2, 1, 1, 1)).unflatten(0, (2, -1))
        for j in range(2):
            torch.testing.assert_close(logits[j], _point(engine, stacked, j)(x), rtol=1e-5, atol=1e-5)
        # one image (the attacks' output check) cannot be split: every point runs on it
        one = module(x[:1])
        torch.testing.assert_close(one, _point(engine, stacked, 0)(x[:1]), rtol=1e-5, atol=1e-5)
        stacked["conv1.weight"][1] = float("nan")
        assert module(x[:1]).isnan().all()  # point 1's non-finite logits are not hidden by point 0's


@pytest.mark.slow
def test_attacks_without_copies_run_point_by_point(resnet, xy):
    """An attack without a version on copies (here a lambda) gets the per-point loop, bit for bit."""
    attack = lambda model, x, y: PROFILE_PGD(model, x, y)  # noqa: E731
    assert on_copies(attack) is None and on_copies(PROFILE_PGD) is not None and on_copies(fgsm) is not None
    assert on_copies(PROFILE_PGD).func is pgd_on_copies and on_copies(PROFILE_PGD).keywords == PROFILE_PGD.keywords
    loop = _robust_line(resnet, xy, attack, 1)
    batched = _robust_line(resnet, xy, attack, 4)
    np.testing.assert_array_equal(batched["robust_loss"], loop["robust_loss"])


def test_pgd_copies_draws_each_copys_start_as_a_call_on_it_alone(xy):
    """pgd on copies=3 of x stacked: each copy equals pgd on x (random starts, 2 restarts)."""
    torch.manual_seed(0)
    model = get_model("small_cnn", 10, 3, width=4).double().eval()
    x, y = xy
    attack = functools.partial(pgd, eps=EPS, steps=2, restarts=2, seed=3)
    alone = attack(model, x, y)
    stacked = on_copies(attack)(model, x.repeat(3, 1, 1, 1), y.repeat(3), copies=3)
    for j in range(3):
        torch.testing.assert_close(stacked[j * len(y):(j + 1) * len(y)], alone, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="copies"):
        on_copies(attack)(model, x, y, copies=3)  # 8 images are not 3 copies


@pytest.mark.slow
def test_large_groups_are_attacked_in_sub_groups_with_the_same_result(resnet, xy, monkeypatch):
    """Groups above ATTACK_EXAMPLES_PER_CALL examples go in sub-groups of points (here 2 points of 8
    images per call for a group of 4): each copy is still its own point's attack."""
    import advkit.landscape.engine as engine
    whole = _robust_line(resnet, xy, PROFILE_PGD, 4)
    calls = []
    monkeypatch.setattr(engine, "ATTACK_EXAMPLES_PER_CALL", 16)
    monkeypatch.setattr(engine, "attack_points", lambda attack, module, x, y: calls.append(module.points)
                        or attack_points(attack, module, x, y))
    split = _robust_line(resnet, xy, PROFILE_PGD, 4)
    assert calls and set(calls) == {2}
    np.testing.assert_allclose(split["robust_loss"], whole["robust_loss"], rtol=1e-5)
    np.testing.assert_array_equal(split["robust_accuracy"], whole["robust_accuracy"])
