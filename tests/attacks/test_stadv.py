"""advkit.attacks.stadv at CIFAR-10's scale: the paper preset flips a CIFAR-shaped model, the flow term's
scale does not depend on the image size, the flow-bound sweep, and crashes turned into errors."""

import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from advkit.attacks.evaluate import XU2019, accuracy, ssim_distance, stadv_flow_sweep
from advkit.attacks.stadv import flow_loss, normalized_to_pixels, stadv
from advkit.data import Batcher
from advkit.models import get_model
from advkit.training.fit import TrainConfig, fit


@pytest.fixture(scope="module")
def cifar_shaped():
    """A small CNN trained briefly on 3x32x32 images whose labels come from a fixed random
    teacher CNN (a learnable rule): like a briefly trained CIFAR-10 model, it is right on ~30 %
    of held-out images with small margins. Returns (model, x_test, y_test)."""
    g = torch.Generator().manual_seed(0)
    x = F.interpolate(torch.rand(700, 3, 8, 8, generator=g), size=32, mode="bicubic",
                      align_corners=False).clamp(0, 1)
    torch.manual_seed(1)
    teacher = get_model("small_cnn", 10, 3, width=8).eval()
    with torch.no_grad():
        z = teacher(x)
    y = ((z - z.mean(0)) / z.std(0)).argmax(1)  # standardized logits: roughly balanced classes
    images = (x * 255).round().to(torch.uint8)
    torch.manual_seed(0)
    model = get_model("small_cnn", 10, 3, width=16)
    fit(model, Batcher(images[:600], y[:600], 50, augment=True, seed=0),
        TrainConfig(epochs=6, lr=0.05, schedule="cosine", seed=0), progress=False)
    return model.eval(), images[600:].float() / 255, y[600:]


@pytest.mark.slow
def test_paper_preset_flips_cifar_shaped_model(cifar_shaped):
    # Regression for the root cause: with Eq. 5 summed over the 32x32 pixels, tau = 0.05 made zero
    # flow the objective's minimizer and stAdv changed no prediction (max |flow| ~1e-3 px).
    model, x, y = cifar_shaped
    with torch.no_grad():
        correct = model(x).argmax(1) == y
    x, y = x[correct][:24], y[correct][:24]
    assert len(y) >= 12, "the fixture model should classify some held-out images correctly"
    spec = XU2019.attacks["stadv"]
    x_adv, flow = spec(model, x, y, return_flow=True)
    assert accuracy(model, x_adv, y) <= 0.25  # most correctly classified images flipped
    assert flow.abs().amax() <= spec.params["max_flow"] + 1e-6
    assert flow.abs().amax() > 0.1 * spec.params["max_flow"]  # the attack leaves the zero flow
    assert 1e-4 < ssim_distance(x, x_adv) < 0.05  # Xu et al. Table 2: 0.0028 on a CIFAR-10 ResNet-32


def test_flow_loss_scale_does_not_grow_with_image_size():
    # The same deformation (a horizontal shear of slope 0.1 px per px) at 8x8 and 32x32: Eq. 5's
    # plain sum grows 18x, the mean over pixels about 1.1x (only the border pairs differ).
    def shear(size):
        flow = torch.zeros(1, 2, size, size)
        flow[:, 0] = 0.1 * torch.arange(size, dtype=torch.float32).view(size, 1)
        return flow
    small, large = flow_loss(shear(8), eps=0).item(), flow_loss(shear(32), eps=0).item()
    assert math.isclose(small, 2 * 8 * 7 * 0.1 / 64, rel_tol=1e-5)
    assert 1.0 < large / small < 1.2


def test_flow_sweep_gives_accuracy_and_ssim_per_bound(cifar_shaped):
    model, x, y = cifar_shaped
    table = stadv_flow_sweep(model, x[:8], y[:8], [0.05, 0.8], steps=5)
    assert list(table.columns) == ["max_flow", "accuracy", "ssim_distance"]
    assert table["max_flow"].tolist() == [0.05, 0.8]
    # a larger bound moves pixels further: 1 - SSIM grows with it
    assert table["ssim_distance"].iloc[0] < table["ssim_distance"].iloc[1]
    assert table["accuracy"].between(0, 1).all()
    with pytest.raises(ValueError, match="max_flows"):
        stadv_flow_sweep(model, x[:2], y[:2], [0.1, -1.0])
    with pytest.raises(ValueError, match="max_flows"):
        stadv_flow_sweep(model, x[:2], y[:2], [])


def test_preset_bound_is_xu_code_bound_at_32_px():
    assert math.isclose(XU2019.attacks["stadv"].params["max_flow"], normalized_to_pixels(0.05, 32))


def test_stadv_on_nan_weights_is_an_error(cifar_shaped):
    model = get_model("small_cnn", 10, 3, width=8).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
    _, x, y = cifar_shaped
    with pytest.raises(ValueError, match="non-finite logits"):
        stadv(model, x[:4], y[:4], steps=3)


@pytest.mark.slow
def test_warp_with_nan_flow_does_not_crash():
    # grid_sample's CPU backward reads out of bounds at NaN coordinates (exit 139): run it in a
    # child process so that a regression fails this test instead of killing the test session.
    code = ("import torch; from advkit.attacks.stadv import apply_flow\n"
            "x = torch.rand(2, 3, 32, 32)\n"
            "flow = torch.full((2, 2, 32, 32), float('nan'), requires_grad=True)\n"
            "apply_flow(x, flow).sum().backward(); print('ok')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-2000:]


@pytest.mark.parametrize("optimizer", ["lbfgs", "adam"])
def test_stadv_on_empty_batch_returns_empty(optimizer):
    # L-BFGS's first step reduced over the empty batch (a RuntimeError deep in torch): an empty
    # batch has nothing to attack, as for pgd.
    model = get_model("small_cnn", 10, 3, width=8).eval()
    x, y = torch.rand(2, 3, 32, 32)[:0], torch.zeros(0, dtype=torch.int64)
    x_adv, flow = stadv(model, x, y, steps=3, optimizer=optimizer, return_flow=True)
    assert x_adv.shape == (0, 3, 32, 32) and flow.shape == (0, 2, 32, 32)
    assert stadv(model, x, y, steps=3).shape == (0, 3, 32, 32)
