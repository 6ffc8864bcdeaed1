"""The speed paths of clean surfaces (advkit.landscape): precision chosen at the surface's own
points, several points per forward, torch.compile, strict fp32 / TF32; each equal to the plain path."""

import warnings

import numpy as np
import pytest
import torch
import torch._dynamo
from torch import nn
from torch._dynamo.utils import counters

from advkit._torch import autocast, resolve_precision
from advkit.landscape.directions import random_directions
from advkit.landscape.engine import Engine
from advkit.landscape.precision import autocast_error, choose_precision, choose_surface_precision, probe_points
from advkit.landscape.settings import SurfaceSettings, auto_points_per_forward
from advkit.landscape.surfaces import grid
from advkit.models import get_model


def _with_bn_statistics(model, x):
    """Running statistics of `x` (cumulative average), so eval mode is not the identity init."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None
    model.train()
    with torch.no_grad():
        for i in range(0, len(x), 32):
            model(x[i:i + 32])
    return model.eval()


@pytest.fixture(scope="module")
def cifar_xy():
    gen = torch.Generator().manual_seed(0)
    return torch.rand(32, 3, 32, 32, generator=gen), torch.randint(0, 10, (32,), generator=gen)


@pytest.fixture(scope="module")
def resnet(cifar_xy):
    torch.manual_seed(0)
    return _with_bn_statistics(get_model("resnet20", 10, 3), torch.rand(96, 3, 32, 32))


def _engine(model, dirs, points_per_forward=1):
    return Engine(model, dirs, batch_size=1024, points_per_forward=points_per_forward, precision="fp32",
                    channels_last=False, fold_bn=True, bn_mode="eval", bn_x=None, bn_batch_size=256)


def test_auto_points_per_forward_fills_a_launch_on_cuda_only():
    for device in ("cuda", torch.device("cuda"), "cuda:0"):
        assert auto_points_per_forward(device, 1000, 10_000) == 16
    assert auto_points_per_forward("cuda", 10_000, 10_000) == 1
    assert auto_points_per_forward("cuda", 2048, 10_000) == 8
    assert auto_points_per_forward("cuda", 50_000, 4096) == 4  # images per batch count, not images
    assert auto_points_per_forward("cuda", 100, 10_000) == 16  # capped
    assert auto_points_per_forward("cuda", 1000, 10_000, "recalibrate") == 1
    assert auto_points_per_forward("cpu", 100, 1024) == 1
    settings = SurfaceSettings()
    assert settings.points_per_forward is None and "points_per_forward" not in settings.cache_key()
    assert settings.for_inputs(2, torch.device("cuda"), n_images=1000).points_per_forward == 16
    assert settings.for_inputs(2, torch.device("cuda"), n_images=20_000).points_per_forward == 1
    assert settings.for_inputs(2, torch.device("cpu"), n_images=1000).points_per_forward == 1
    assert settings.replace(points_per_forward=3).for_inputs(2, "cuda", n_images=1000).points_per_forward == 3
    assert settings.replace(bn_mode="recalibrate").for_inputs(2, "cuda", n_images=1000).points_per_forward == 1


@pytest.mark.slow
def test_vmapped_points_equal_one_at_a_time_on_a_cifar_resnet(resnet, cifar_xy):
    dirs = random_directions(resnet, 2, seed=1)
    plain = grid(resnet, dirs, *cifar_xy, resolution=3, span=0.5, precision="fp32")
    assert plain.attrs["points_per_forward"] == 1 and plain.attrs["fold_bn_pairs"] > 0  # CPU default
    for ppf in (4, 9):
        ds = grid(resnet, dirs, *cifar_xy, resolution=3, span=0.5, precision="fp32", points_per_forward=ppf)
        assert ds.attrs["points_per_forward"] == ppf
        np.testing.assert_allclose(ds.loss.values, plain.loss.values, rtol=1e-5)
        np.testing.assert_allclose(ds.accuracy.values, plain.accuracy.values)
    assert np.ptp(plain.loss.values) > 0.1  # the points really differ


def test_probe_points_are_centre_extremes_and_random_grid_points():
    a, b = np.linspace(-1, 1, 5), np.linspace(-0.5, 2, 6)
    pts = probe_points([a, b], n_random=2)
    assert pts.shape == (7, 2) and (pts[0] == 0).all()
    assert {tuple(p) for p in pts[1:5]} == {(-1, -0.5), (-1, 2), (1, -0.5), (1, 2)}
    assert all(p[0] in a and p[1] in b for p in pts[5:])
    assert [tuple(p) for p in probe_points([np.linspace(0, 1, 3)], n_random=0)] == [(0.0,), (1.0,)]  # no repeats


@pytest.mark.slow
def test_auto_precision_checks_the_surfaces_corners_not_only_its_centre(resnet, cifar_xy):
    x, y = cifar_xy
    dirs = random_directions(resnet, 2, seed=0)
    engine = _engine(resnet, dirs, points_per_forward=3)
    centre_model = autocast_error(resnet, x, y)
    centre_engine = choose_surface_precision(engine, torch.zeros(1, 2), x, y, "bf16").errors["bf16"]
    probes = torch.tensor(probe_points([np.linspace(-1, 1, 11)] * 2), dtype=torch.float32)
    full = choose_surface_precision(engine, probes, x, y, "bf16")
    assert full.n_points == 7 and full.n_images == 32
    tolerance = 2 * max(centre_model, centre_engine)
    assert full.errors["bf16"] > tolerance  # the perturbed corners lose more to bf16 than the centre
    # the old rule (the model's own weights) accepts bf16; the surface's own points refuse it
    assert choose_precision(resnet, x, y, "auto", check_on_cpu=True, tolerance=tolerance)[0] == "bf16"
    refused = choose_surface_precision(engine, probes, x, y, "auto", check_on_cpu=True, tolerance=tolerance)
    assert refused.precision == "fp32" and refused.errors == full.errors  # no TF32 off CUDA
    accepted = choose_surface_precision(engine, probes, x, y, "auto", check_on_cpu=True,
                                          tolerance=2 * full.errors["bf16"])
    assert accepted.precision == "bf16"
    assert choose_surface_precision(engine, probes, x, y, "auto") == ("fp32", {}, 0, 0)  # CPU: unchecked
    assert choose_surface_precision(engine, probes, x, y, "tf32").precision == "fp32"  # no TF32 off CUDA
    # a surface records the largest error over its probe points
    ds = grid(resnet, dirs, x[:8], y[:8], resolution=3, precision="bf16", points_per_forward=3)
    expected = choose_surface_precision(
        engine, torch.tensor(probe_points([np.linspace(-1, 1, 3)] * 2), dtype=torch.float32), x[:8], y[:8],
        "bf16").errors["bf16"]
    assert ds.attrs["precision"] == "bf16" and ds.attrs["precision_probe_points"] == 7
    assert ds.attrs["autocast_relative_error"] == pytest.approx(expected, rel=1e-6)
    assert ds.attrs["tf32_relative_error"] == "not measured"


def test_fp32_is_strict_and_tf32_allows_tf32_on_cuda_and_is_fp32_elsewhere(recwarn):
    assert resolve_precision("tf32", torch.device("cpu")) == "fp32"
    assert resolve_precision("tf32", "cuda") == "tf32" and resolve_precision("fp32", "cuda") == "fp32"
    flags = lambda: (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)  # noqa: E731
    before = flags()
    for precision, inside in (("fp32", (False, False)), ("tf32", (True, True))):
        with autocast(torch.device("cuda"), precision):  # no GPU needed to set the flags
            assert flags() == inside and not torch.is_autocast_enabled("cuda")
        assert flags() == before
    with autocast("cpu", "tf32"):
        assert flags() == before and not torch.is_autocast_enabled("cpu")
    with pytest.raises(ValueError, match="precision='fp16'"):
        SurfaceSettings(precision="fp16")
    assert SurfaceSettings(precision="tf32").precision == "tf32"


@pytest.mark.gpu_policy
def test_compiled_surface_equals_the_plain_one():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten(), nn.Linear(4, 10))
    x = torch.rand(16, 3, 8, 8)
    y = torch.randint(0, 10, (16,))
    net = _with_bn_statistics(net, torch.rand(64, 3, 8, 8))
    dirs = random_directions(net, 2, seed=0)
    plain = grid(net, dirs, x, y, resolution=3, points_per_forward=4)
    torch._dynamo.reset()
    counters.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled = grid(net, dirs, x, y, resolution=3, points_per_forward=4, compile=True)  # 4 + 4 + 1 points
    fell_back = [str(w.message) for w in caught if "torch.compile failed, running eagerly" in str(w.message)]
    if fell_back:  # a CPU whose inductor build fails (e.g. ATEN_CPU_CAPABILITY=default): eager, with the cause
        assert all("(" in m for m in fell_back), fell_back
    else:
        assert counters["stats"]["unique_graphs"] == 2 and not counters["graph_break"]  # vmapped and 1-point, whole
    assert compiled.attrs["compile"] == 1 and plain.attrs["compile"] == 0
    np.testing.assert_allclose(compiled.loss.values, plain.loss.values, rtol=1e-5)
    np.testing.assert_allclose(compiled.accuracy.values, plain.accuracy.values)
