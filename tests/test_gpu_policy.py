"""The GPU policy on the CPU (ADVKIT_GPU_POLICY=1, `advkit._torch.gpu_policy`): every branch a GPU run
takes is taken here too (several points per forward, BatchNorm folding, channels_last, bf16 autocast,
the precision probe, batched robust copies, fused optimizers, Hessian blocks above 1), and its results
equal the plain CPU ones within the tolerances the code claims. A compile that fails falls back to eager.

Small conv nets on 16x16 images: bf16 is slow on most CPUs. CI also runs these with the variable set
for the whole process (`-m gpu_policy`), with the other engine tests marked so.
"""

import functools
import math
import warnings

import numpy as np
import pytest
import torch
import torch._dynamo
from torch import nn

from advkit._torch import GPU_POLICY_ENV, autocast, gpu_policy, resolve_precision
from advkit.attacks.ascent import prepare
from advkit.attacks.model import attack_model, resolve_fold_bn
from advkit.attacks.pgd import ON_COPIES, pgd, pgd_on_copies
from advkit.curvature.estimators import hessian_trace
from advkit.data import Batcher
from advkit.landscape.directions import random_directions
from advkit.landscape.engine import Engine
from advkit.landscape.precision import AUTOCAST_TOLERANCE, probe_points
from advkit.landscape.settings import SurfaceSettings, auto_points_per_forward
from advkit.landscape.surfaces import grid, line
from advkit.training.fit import TrainConfig, fit

pytestmark = pytest.mark.gpu_policy


@pytest.fixture()
def policy_on(monkeypatch):
    """The switch for this test (CI sets it for the whole process)."""
    monkeypatch.setenv(GPU_POLICY_ENV, "1")


@pytest.fixture()
def policy_off(monkeypatch):
    monkeypatch.delenv(GPU_POLICY_ENV, raising=False)


def _net(seed=0):
    """Conv + BatchNorm (running statistics of 64 images, not the identity init), eval mode."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 10))
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None
    with torch.no_grad():
        net.train()(torch.rand(64, 3, 16, 16, generator=torch.Generator().manual_seed(seed + 1)))
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = 0.1  # training goes on as usual (and compiles whole)
    return net.eval()


@pytest.fixture(scope="module")
def xy():
    g = torch.Generator().manual_seed(3)
    return torch.rand(32, 3, 16, 16, generator=g), torch.randint(0, 10, (32,), generator=g)


class Seen:
    """What the first convolution receives: channels_last or not, autocast dtype, per call. The hook
    is a plain function, so a folded (deep) copy made afterwards reports into the same list."""

    def __init__(self, conv: nn.Module):
        calls: list[tuple[bool, torch.dtype | None]] = []

        def hook(module, args):
            x = args[0]
            dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None
            calls.append((x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous(), dtype))

        self.calls = calls
        self.handle = conv.register_forward_pre_hook(hook)


def test_the_switch_is_visible(monkeypatch):
    monkeypatch.delenv(GPU_POLICY_ENV, raising=False)
    assert not gpu_policy("cpu") and gpu_policy("cuda") and gpu_policy(torch.device("cuda", 0))
    monkeypatch.setenv(GPU_POLICY_ENV, "0")
    assert not gpu_policy(torch.device("cpu"))
    monkeypatch.setenv(GPU_POLICY_ENV, "1")
    assert gpu_policy("cpu")


def test_the_cuda_choices_are_made_on_the_cpu(policy_on):
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == "bf16" and resolve_precision("tf32", cpu) == "fp32"  # no TF32 on CPUs
    with autocast(cpu, "auto"):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    assert resolve_fold_bn(None, cpu) is True and resolve_fold_bn(False, cpu) is False
    assert prepare(torch.rand(2, 3, 4, 4)).is_contiguous(memory_format=torch.channels_last)
    assert auto_points_per_forward(cpu, 1000, 10_000) == 16
    s = SurfaceSettings().for_inputs(2, cpu, n_images=1000)
    assert (s.points_per_forward, s.channels_last, s.batch_size) == (16, True, 10_000)


def test_defaults_without_the_switch_are_the_plain_cpu_ones(policy_off):
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == "fp32" and resolve_fold_bn(None, cpu) is False
    assert prepare(torch.rand(2, 3, 4, 4)).is_contiguous()
    s = SurfaceSettings().for_inputs(2, cpu, n_images=1000)
    assert (s.points_per_forward, s.channels_last, s.batch_size) == (1, False, 1024)


def test_surface_under_the_policy_equals_the_plain_one(xy, monkeypatch):
    """Points per forward > 1, folded BatchNorm, channels_last and the precision probe; the loss
    within AUTOCAST_TOLERANCE at the probe points (the probe's claim) whichever precision it chose."""
    net = _net()
    dirs = random_directions(net, 2, seed=0)
    monkeypatch.delenv(GPU_POLICY_ENV, raising=False)
    plain = grid(net, dirs, *xy, resolution=5, span=0.5)
    monkeypatch.setenv(GPU_POLICY_ENV, "1")
    bn_calls = []
    hook = net[1].register_forward_hook(lambda *a: bn_calls.append(1))
    fast = grid(net, dirs, *xy, resolution=5, span=0.5)
    hook.remove()
    a = fast.attrs
    assert plain.attrs["points_per_forward"] == 1 and a["points_per_forward"] == 16
    assert a["channels_last"] == 1 and a["fold_bn_pairs"] == 2 and a["batch_size"] == 10_000
    assert a["precision"] in ("bf16", "fp32") and a["precision_probe_points"] == 7  # measured, not assumed
    assert plain.attrs["precision_probe_points"] == 0
    assert bn_calls == []  # the folded copy ran, not the model
    probes = probe_points([fast.alpha.values, fast.beta.values])
    for alpha, beta in probes:
        p, f = (float(d.loss.sel(alpha=alpha, beta=beta)) for d in (plain, fast))
        assert abs(f - p) / p <= AUTOCAST_TOLERANCE + 1e-5, (alpha, beta)
    np.testing.assert_allclose(fast.loss.values, plain.loss.values, rtol=2 * AUTOCAST_TOLERANCE)


def test_forced_bf16_surface_runs_under_autocast(xy, policy_on):
    net = _net()
    dirs = random_directions(net, 1, seed=0)
    exec_dtypes = []
    real = Engine.fixed

    def spy(self, *args, **kw):
        exec_dtypes.append(self.precision)
        return real(self, *args, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Engine, "fixed", spy)
        ds = line(net, dirs, *xy, resolution=3, span=0.5, precision="bf16")
    assert ds.attrs["precision"] == "bf16" and "bf16" in exec_dtypes
    assert isinstance(ds.attrs["autocast_relative_error"], float)


def test_attack_under_the_policy_folds_channels_last_and_bf16(xy, monkeypatch):
    """fold_bn=None folds, inputs are channels_last, "auto" is bf16 autocast. In fp32 the folded
    channels_last attack equals the plain one within the folding tests' bounds (advkit's attack
    speed-path tests: >= 95 % equal pixels, robust accuracy within one image)."""
    net, (x, y) = _net(), xy
    monkeypatch.delenv(GPU_POLICY_ENV, raising=False)
    plain = pgd(net, x, y, 4 / 255, steps=3, restarts=0)
    monkeypatch.setenv(GPU_POLICY_ENV, "1")
    bn_calls = []
    hook = net[1].register_forward_hook(lambda *a: bn_calls.append(1))
    seen = Seen(net[0])
    fast32 = pgd(attack_model(net, precision="fp32"), x, y, 4 / 255, steps=3, restarts=0)
    pgd(net, x, y, 4 / 255, steps=2)
    hook.remove()
    seen.handle.remove()
    assert bn_calls == [1]  # the folded copy ran; the model only once, for the copy's check on the first images
    assert seen.calls and all(cl for cl, _ in seen.calls)
    assert {d for _, d in seen.calls} == {None, torch.bfloat16}  # fp32 call, then "auto" = bf16 autocast
    assert (fast32 == plain).float().mean() >= 0.95
    with torch.no_grad():
        acc = [(net(a).argmax(1) == y).float().mean().item() for a in (plain, fast32)]
    assert abs(acc[0] - acc[1]) <= 1 / len(y) + 1e-9


def test_batched_robust_copies_under_the_policy_equal_the_loop(xy, monkeypatch):
    """Robust points in one attack call on stacked copies (`copies`) under the policy; the robust
    loss within float32 rounding of the point-by-point loop (1e-2, the batched tests' bound)."""
    net, (x, y) = _net(), xy
    calls = []

    def attack(model, xb, yb):
        calls.append(1)
        return pgd(attack_model(model, precision="fp32"), xb, yb, 8 / 255, steps=2, restarts=0)

    def attack_on_copies(model, xb, yb, copies):
        calls.append(copies)
        return pgd_on_copies(attack_model(model, precision="fp32"), xb, yb, 8 / 255, steps=2, restarts=0,
                             copies=copies)

    monkeypatch.setitem(ON_COPIES, attack, attack_on_copies)  # its version on stacked copies

    dirs = random_directions(net, 1, seed=0)
    kw = dict(resolution=4, span=0.5, attack=attack, quantities=("robust_loss", "robust_accuracy"), precision="fp32")
    monkeypatch.delenv(GPU_POLICY_ENV, raising=False)
    loop = line(net, dirs, x[:8], y[:8], **kw)
    assert calls == [1] * 4
    calls.clear()
    monkeypatch.setenv(GPU_POLICY_ENV, "1")
    batched = line(net, dirs, x[:8], y[:8], **kw)
    assert calls == [4]  # four points, one call
    np.testing.assert_allclose(batched.robust_loss.values, loop.robust_loss.values, rtol=1e-2)


def test_training_under_the_policy_is_fused_channels_last_and_bf16(monkeypatch):
    """Fused SGD and channels_last; in fp32 the weights equal the plain run's within float
    tolerance; "auto" trains under bf16 autocast."""
    created = []
    real_sgd = torch.optim.SGD

    class SpySGD(real_sgd):
        def __init__(self, *args, **kw):
            created.append(kw.get("fused"))
            super().__init__(*args, **kw)

    monkeypatch.setattr(torch.optim, "SGD", SpySGD)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (32, 3, 16, 16), generator=g, dtype=torch.uint8)
    y = torch.randint(0, 10, (32,), generator=g)
    config = functools.partial(TrainConfig, epochs=1, lr=0.05, seed=3, channels_last=True)

    def run(precision):
        net = _net()
        seen = Seen(net[0])
        result = fit(net, Batcher(x, y, 16, seed=0), config(precision=precision), progress=False)
        seen.handle.remove()
        return result.model.state_dict(), seen.calls

    monkeypatch.delenv(GPU_POLICY_ENV, raising=False)
    plain, plain_seen = run("fp32")
    monkeypatch.setenv(GPU_POLICY_ENV, "1")
    fast, fast_seen = run("fp32")
    _, auto_seen = run("auto")
    assert created == [None, True, True]
    assert not any(cl for cl, _ in plain_seen) and all(cl for cl, _ in fast_seen)
    assert {d for _, d in auto_seen} == {torch.bfloat16}
    for k, v in plain.items():
        torch.testing.assert_close(fast[k], v, rtol=1e-4, atol=1e-5, msg=k)


def test_hessian_blocks_above_one_under_the_policy(xy, monkeypatch):
    """block_size="auto" sizes a block from the host's memory and one measured product; the trace
    equals the one-probe loop's (the same probes) within float rounding."""
    net, (x, y) = _net(), xy
    monkeypatch.delenv(GPU_POLICY_ENV, raising=False)
    one = hessian_trace(net, x, y, n_samples=6, seed=1, block_size="auto")
    monkeypatch.setenv(GPU_POLICY_ENV, "1")
    blocked = hessian_trace(net, x, y, n_samples=6, seed=1, block_size="auto")
    assert one.block_size == 1 and blocked.block_size == 6
    assert blocked.value == pytest.approx(one.value, rel=1e-5)
    assert blocked.std_error == pytest.approx(one.std_error, rel=1e-4)


# --- compile=True never stops a run -------------------------------------------------------------


@pytest.fixture()
def failing_compile(monkeypatch, request):
    """torch.compile whose backend fails as inductor's C++ build does under a generic ATen (the
    test's name in the message: a cause is warned about once per process)."""
    real = torch.compile

    def backend(gm, example_inputs):
        raise RuntimeError(f"error: 'at::vec' has not been declared ({request.node.name})")

    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real(fn, backend=backend, dynamic=kw.get("dynamic")))
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _compile_warnings(caught):
    return [w for w in caught if issubclass(w.category, RuntimeWarning) and "torch.compile failed" in str(w.message)]


def test_a_failing_compile_falls_back_to_eager_with_one_warning(xy, failing_compile, policy_off):
    net, (x, y) = _net(), xy
    dirs = random_directions(net, 2, seed=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        surface = grid(net, dirs, x, y, resolution=3, points_per_forward=4, compile=True)
        adv = pgd(attack_model(net, fold_bn=True, compile=True), x, y, 4 / 255, steps=2, restarts=0)
    found = _compile_warnings(caught)
    assert len(found) == 1 and "at::vec" in str(found[0].message)  # one warning, naming the cause
    plain = grid(net, dirs, x, y, resolution=3, points_per_forward=4)
    np.testing.assert_array_equal(surface.loss.values, plain.loss.values)
    assert torch.equal(adv, pgd(attack_model(net, fold_bn=True), x, y, 4 / 255, steps=2, restarts=0))


def test_a_failing_compile_does_not_stop_training(failing_compile, policy_off):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (16, 3, 16, 16), generator=g, dtype=torch.uint8)
    y = torch.randint(0, 10, (16,), generator=g)
    config = functools.partial(TrainConfig, epochs=1, lr=0.05, seed=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled = fit(_net(), Batcher(x, y, 8, seed=0), config(compile=True), progress=False)
    assert len(_compile_warnings(caught)) == 1
    eager = fit(_net(), Batcher(x, y, 8, seed=0), config(), progress=False)
    for k, v in eager.model.state_dict().items():
        assert torch.equal(compiled.model.state_dict()[k], v), k
    assert math.isfinite(compiled.history["train_loss"][0])
