"""The attacks' speed paths (advkit.attacks.model) give the plain path's results, on CPU.

BatchNorm folded (`fold_bn=True`), torch.compile (`compile=...`) and the output check folded
into the attack's first forward; CIFAR-shaped inputs and a ResNet-20 with BatchNorm statistics.
Folding changes float rounding only, but a pre-activation within rounding of 0 switches its
ReLU, and PGD's sign steps turn the changed input gradient into flipped pixels that later steps
build on (ResNet-20, 5 steps: 2-5 % of pixels differ; channels_last alone: up to 1 %), so x_adv
are compared by the share of equal pixels (>= 95 %), robust accuracy (equal; within one image
for FGSM, APGD and AutoAttack, whose result on a CPU's other kernels may flip an image at the
margin) and adversarial loss (mean within 2 %).
"""

import pytest
import torch
import torch.nn.functional as F
from reference_attacks import last_iterate_pgd
from torch import nn
from torch.optim.swa_utils import update_bn

from advkit._torch import WithParams
from advkit.attacks import model as attack_model
from advkit.attacks.apgd import apgd
from advkit.attacks.ascent import attack_loss, loss_and_grad
from advkit.attacks.model import folded_model, forward_fn, resolve_fold_bn
from advkit.attacks.pgd import autoattack, fgsm, pgd
from advkit.models import get_model

EPS = 2 / 255


def smooth_images(n: int, generator: torch.Generator) -> torch.Tensor:
    """CIFAR-shaped images with low-frequency colour structure (uniform noise alone gives a
    random ResNet nearly the same features for every image)."""
    low = F.interpolate(torch.rand(n, 3, 4, 4, generator=generator), size=32, mode="bilinear", align_corners=False)
    return (0.7 * low + 0.3 * torch.rand(n, 3, 32, 32, generator=generator)).clamp(0, 1)


def resnet(seed: int = 0) -> nn.Module:
    """ResNet-20 whose BatchNorm statistics are estimated on 64 images, eval mode."""
    torch.manual_seed(seed)
    model = get_model("resnet20", 10, 3)
    x = smooth_images(64, torch.Generator().manual_seed(seed + 1))
    update_bn([x[:32], x[32:]], model)
    return model.eval()


@pytest.fixture(scope="module")
def model():
    return resnet()


@pytest.fixture(scope="module")
def data(model):
    x = smooth_images(32, torch.Generator().manual_seed(7))
    with torch.no_grad():
        return x, model(x).argmax(1)


def robust_accuracy_and_loss(model, x_adv, y):
    with torch.no_grad():
        logits = model(x_adv)
    return (logits.argmax(1) == y).float().mean().item(), F.cross_entropy(logits, y).item()


def assert_same_attack(model, a, b, y, flips=0):
    """>= 95 % equal pixels, robust accuracies within `flips` images, losses within 2 %."""
    assert (a == b).float().mean() >= 0.95
    acc_a, loss_a = robust_accuracy_and_loss(model, a, y)
    acc_b, loss_b = robust_accuracy_and_loss(model, b, y)
    assert abs(acc_a - acc_b) <= flips / len(y) + 1e-9
    assert abs(loss_a - loss_b) <= 0.02 * abs(loss_a)


def count_calls(module: nn.Module) -> list[int]:
    """Batch sizes of every forward call of `module` (a hook; removed by the caller)."""
    sizes = []
    module.register_forward_hook(lambda m, inp, out: sizes.append(len(inp[0])))
    return sizes


# --- BatchNorm folded -------------------------------------------------------------------------------


def fast(model: nn.Module, **options) -> nn.Module:
    """`model` with the attack runtime `options` (`advkit.attacks.model.attack_model`)."""
    return attack_model.attack_model(model, **options)


def seeded_last_iterate(model, x, y, eps, steps):
    """Madry et al.'s PGD (the last iterate) from pgd's seed-0 random start, alpha as pgd's."""
    return last_iterate_pgd(model, x, y, eps, 2.5 * eps / steps, steps, torch.Generator().manual_seed(0))


@pytest.mark.slow
@pytest.mark.parametrize("attack", [seeded_last_iterate, pgd])
def test_pgd_with_folded_batchnorm_matches_plain(model, data, attack):
    x, y = data
    plain = attack(fast(model, fold_bn=False), x, y, EPS, steps=5)
    folded = attack(fast(model, fold_bn=True), x, y, EPS, steps=5)
    assert_same_attack(model, plain, folded, y)
    acc, _ = robust_accuracy_and_loss(model, plain, y)
    assert 0 < acc < 1, "the attack must break some examples and not others, else nothing is compared"
    bn = next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    calls = count_calls(bn)
    pgd(fast(model, fold_bn=True), x, y, EPS, steps=2)  # the copy exists: its BatchNorms are gone
    assert calls == []
    bn._forward_hooks.clear()


@pytest.mark.slow
def test_fgsm_apgd_and_autoattack_with_folded_batchnorm_match_plain(model, data):
    x, y = data
    for attack, kw in [(fgsm, {}), (apgd, {"steps": 4}), (autoattack, {"steps": 4, "n_target_classes": 2})]:
        plain = attack(fast(model, fold_bn=False), x, y, EPS, **kw)
        folded = attack(fast(model, fold_bn=True), x, y, EPS, **kw)
        assert_same_attack(model, plain, folded, y, flips=1)  # an image at the margin may flip on another CPU


def test_cpu_default_is_the_plain_model(model, data):
    x, y = data
    assert resolve_fold_bn(None, torch.device("cpu")) is False
    assert resolve_fold_bn(None, torch.device("cuda")) is True
    assert torch.equal(pgd(model, x, y, EPS, steps=3), pgd(fast(model, fold_bn=False), x, y, EPS, steps=3))
    with pytest.raises(ValueError, match="fold_bn"):
        fast(model, fold_bn="yes")
    with pytest.raises(ValueError, match="compile"):
        fast(model, compile="fast")


@pytest.mark.slow
def test_folded_copy_follows_changes_of_the_model(data):
    x, _ = data
    model = resnet(seed=3)
    folded = folded_model(model, x[:2])
    assert folded is not model and folded_model(model) is folded  # cached

    def agrees():
        copy = folded_model(model)
        with torch.no_grad():
            return copy is folded and torch.allclose(copy(x), model(x), rtol=1e-4, atol=1e-4)

    bn = next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    with torch.no_grad():
        bn.running_mean.add_(0.5)  # statistics changed in place
    assert agrees()
    with torch.no_grad():
        conv.weight.mul_(1.5)  # weights changed in place
    assert agrees()
    model.load_state_dict(resnet(seed=4).state_dict())  # other weights
    assert agrees()
    model.train()
    with torch.no_grad():
        model(x)  # training-mode BatchNorm updates its running statistics
    assert folded_model(model) is model, "never fold while a BatchNorm is in training mode"
    model.eval()
    assert agrees()
    with torch.no_grad():
        conv.weight.mul_(0.5)
    assert folded_model(model, lazy=True) is model, "lazy: changed since the last call, as in a training loop"
    assert folded_model(model, lazy=True) is folded, "unchanged for a second call: refreshed"
    assert agrees()
    model.double()  # new tensors of another dtype: a new copy
    assert folded_model(model, x[:2].double()) is not folded
    with torch.no_grad():
        assert torch.allclose(folded_model(model)(x.double()), model(x.double()), rtol=1e-6, atol=1e-6)


def test_bf16_weights_give_autocasts_numbers_exactly(data):
    """With bf16 precision the folded copy stores its conv/linear weights in bf16, as autocast
    would cast them at every forward: logits and input gradients are bit for bit the same."""
    x, y = data
    model = resnet(seed=8)

    def same_as_autocast():
        low = forward_fn(model, fold_bn=True, precision="bf16")
        assert low is not folded_model(model) and low.linear.weight.dtype == torch.bfloat16
        out = [loss_and_grad(f, x, attack_loss("ce", y), "bf16") for f in (folded_model(model), low)]
        return all(torch.equal(a, b) for a, b in zip(*out))

    assert same_as_autocast()
    conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    with torch.no_grad():
        conv.weight.mul_(1.1)
    assert same_as_autocast()  # refreshed after the fp32 copy


def test_wrappers_with_substituted_weights_are_not_folded(model, data):
    x, _ = data
    other = {k: v + 0.05 * torch.randn_like(v) if v.is_floating_point() else v
             for k, v in resnet(seed=5).state_dict().items()}
    wrapped = WithParams(model, other)
    assert folded_model(wrapped, x[:2]) is wrapped

    class Substituted(nn.Module):  # like WithParams, but a class the cache does not know
        def __init__(self):
            super().__init__()
            self.model, self.params = model, other

        def forward(self, z):
            return torch.func.functional_call(self.model, self.params, (z,))

    sub = Substituted()
    with torch.no_grad():
        assert torch.allclose(forward_fn(sub, fold_bn=True, probe=x[:2])(x), sub(x), rtol=1e-4, atol=1e-4)


# --- checks on the attack's own first forward -----------------------------------------------------------


@pytest.mark.parametrize("fold_bn", [False, True])
def test_checks_cost_no_extra_forward(model, data, fold_bn):
    x, y = data
    runner = fast(model, fold_bn=fold_bn)
    pgd(runner, x, y, EPS, steps=1)  # builds the folded copy (checked once on x[:2])
    counted = folded_model(model) if fold_bn else model
    calls = count_calls(counted)
    try:
        pgd(runner, x, y, EPS, steps=3)
        assert calls == [len(x)] * 4, "one forward (+ backward) per step and one at the last iterate, no x[:1] forward"
        calls.clear()
        fgsm(runner, x, y, EPS)
        assert calls == [len(x)]
    finally:
        counted._forward_hooks.clear()


@pytest.mark.parametrize("fold_bn", [False, True])
@pytest.mark.parametrize("attack", [pgd, fgsm])
def test_nan_weights_and_bad_labels_still_raise(data, attack, fold_bn):
    x, y = data
    model = resnet(seed=6)
    bad = y.clone()
    bad[3] = 10
    with pytest.raises(ValueError, match=r"y must be class indices in \[0, 9\]"):
        attack(fast(model, fold_bn=fold_bn), x, bad, EPS)
    with torch.no_grad():
        model.linear.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite logits"):
        attack(fast(model, fold_bn=fold_bn), x, y, EPS)


# --- torch.compile (slow on CPU: one small model, one test) -----------------------------------------------


@pytest.mark.slow
@pytest.mark.gpu_policy
def test_compiled_folded_pgd_matches_plain():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                        nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 10))
    g = torch.Generator().manual_seed(2)
    x = smooth_images(32, g)
    update_bn([x], net)
    net.eval()
    with torch.no_grad():
        y = net(x).argmax(1)
    plain = seeded_last_iterate(fast(net, fold_bn=False, precision="fp32"), x, y, 4 / 255, steps=4)
    compiled = seeded_last_iterate(fast(net, fold_bn=True, compile="reduce-overhead", precision="fp32"), x, y,
                                   4 / 255, steps=4)  # fp32 also under ADVKIT_GPU_POLICY=1 (whose "auto" is bf16)
    assert_same_attack(net, plain, compiled, y)
    assert "reduce-overhead" in folded_model(net).__dict__["_attack_compiled"]  # the folded copy was compiled
    assert net not in attack_model._compiled
