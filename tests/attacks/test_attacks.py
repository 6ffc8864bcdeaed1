"""advkit.attacks / apgd / stadv: budgets, equivalences, strength, cross-checks, model hygiene, bad input.

The digits images have 17 grey levels (one level = 16/255), so "far below clean" is checked at
eps = 16/255: at 8/255 (half a level) a well-trained digits CNN keeps ~80% accuracy.
"""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from reference_attacks import last_iterate_pgd, torchattacks_autoattack
from torch import nn

from advkit.attacks import pgd as attacks
from advkit.attacks.apgd import apgd, checkpoints
from advkit.attacks.model import AttackRuntime, attack_model
from advkit.attacks.pgd import ATTACKS, fgsm, get_attack, pgd
from advkit.attacks.stadv import apply_flow, flow_loss, normalized_to_pixels, stadv

EPS = 16 / 255  # one grey level of the digits images

# name, kwargs, (norm, budget) -- cheap settings for every registered attack
CASES = [
    ("fgsm", {"eps": EPS}, ("linf", EPS)),
    ("pgd", {"eps": EPS, "steps": 5}, ("linf", EPS)),
    ("pgd", {"eps": EPS, "steps": 5, "loss": "margin", "restarts": 2}, ("linf", EPS)),
    ("pgd", {"eps": 0.5, "steps": 5, "norm": "l2"}, ("l2", 0.5)),
    ("apgd-ce", {"eps": EPS, "steps": 5}, ("linf", EPS)),
    ("apgd-dlr", {"eps": EPS, "steps": 5, "norm": "l2"}, ("l2", EPS)),
    ("apgd-t", {"eps": EPS, "steps": 5, "n_target_classes": 2}, ("linf", EPS)),
    ("autoattack", {"eps": EPS, "steps": 5, "n_target_classes": 2}, ("linf", EPS)),
    ("stadv", {"steps": 5, "max_flow": 0.5}, ("flow", 0.5)),
    ("stadv", {"steps": 5, "optimizer": "adam", "lr": 0.1}, ("flow", None)),
]


def accuracy(model, x, y):
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def ce(model, x, y):
    with torch.no_grad():
        return F.cross_entropy(model(x), y, reduction="none")


@pytest.fixture(scope="module")
def random_model():
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(0.2),
                         nn.Flatten(), nn.Linear(8 * 8 * 8, 10)).eval()


@pytest.fixture(scope="module")
def random_data():
    g = torch.Generator().manual_seed(0)
    return torch.rand(16, 1, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g)


def assert_within_budget(x, x_adv, norm, budget):
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    delta = (x_adv - x).flatten(1)
    if norm == "linf":
        assert delta.abs().max() <= budget + 1e-6
    elif norm == "l2":
        assert delta.norm(dim=1).max() <= budget * (1 + 1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("name,kwargs,budget", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
@pytest.mark.parametrize("which", ["random", "trained"])
def test_attack_keeps_budget_and_box(name, kwargs, budget, which, random_model, random_data, trained_cnn,
                                     digits_test):
    model, (x, y) = (random_model, random_data) if which == "random" else (trained_cnn, (digits_test[0][:32],
                                                                                        digits_test[1][:32]))
    norm, bound = budget
    if name == "stadv":
        x_adv, flow = stadv(model, x, y, return_flow=True, **kwargs)
        assert flow.shape == (len(x), 2, *x.shape[2:])
        if bound is not None:
            assert flow.abs().max() <= bound
        torch.testing.assert_close(x_adv, apply_flow(x, flow).clamp(0, 1), rtol=0, atol=0)
    x_adv = get_attack(name)(model, x, y, **kwargs)
    assert_within_budget(x, x_adv, norm, bound)


def test_fgsm_is_one_pgd_step_of_size_eps(trained_cnn, digits_test):
    x, y = digits_test
    one_step = last_iterate_pgd(trained_cnn, x, y, eps=EPS, alpha=EPS, steps=1)
    assert torch.equal(fgsm(trained_cnn, x, y, eps=EPS), one_step)
    assert not torch.equal(one_step, x)


def test_pgd_is_stronger_than_fgsm_and_far_below_clean(trained_cnn, digits_test):
    x, y = digits_test
    x_fgsm = fgsm(trained_cnn, x, y, eps=EPS)
    x_pgd = pgd(trained_cnn, x, y, eps=EPS, steps=10)
    assert ce(trained_cnn, x_pgd, y).mean() >= ce(trained_cnn, x_fgsm, y).mean()
    clean, robust = accuracy(trained_cnn, x, y), accuracy(trained_cnn, x_pgd, y)
    assert clean > 0.9 and robust < 0.5 * clean
    assert accuracy(trained_cnn, x_pgd, y) <= accuracy(trained_cnn, x_fgsm, y)


def _strength(model, x_adv, y):
    """(fooled, loss) per example: the order the attacks keep their strongest result by."""
    return ce(model, x_adv, y), fooled_mask(model, x_adv, y)


def fooled_mask(model, x, y):
    with torch.no_grad():
        return model(x).argmax(1) != y


@pytest.mark.parametrize("fewer,more", [({"steps": 3}, {"steps": 8}), ({"restarts": 1}, {"restarts": 3})])
def test_more_steps_or_restarts_never_weaker(trained_cnn, digits_test, fewer, more):
    x, y = digits_test[0][:128], digits_test[1][:128]
    kw = {"eps": 12 / 255, "alpha": 3 / 255, "steps": 4, "seed": 3}
    weak = pgd(trained_cnn, x, y, **{**kw, **fewer})
    strong = pgd(trained_cnn, x, y, **{**kw, **more})
    loss_w, fooled_w = _strength(trained_cnn, weak, y)
    loss_s, fooled_s = _strength(trained_cnn, strong, y)
    assert bool((fooled_w <= fooled_s).all()), "an example broken by the weaker run survived the stronger one"
    same = fooled_w == fooled_s
    assert bool((loss_s[same] >= loss_w[same] - 1e-5).all())
    assert fooled_s.sum() > fooled_w.sum() or bool((loss_s > loss_w + 1e-4).any())


def test_restarts_keep_the_strongest_per_example(trained_cnn, digits_test):
    x, y = digits_test[0][:64], digits_test[1][:64]
    kw = {"eps": 10 / 255, "alpha": 2 / 255, "steps": 3}
    g = torch.Generator().manual_seed(5)  # `seed` takes a generator: the three calls draw one stream
    singles = [pgd(trained_cnn, x, y, seed=g, **kw) for _ in range(3)]
    combined = pgd(trained_cnn, x, y, restarts=3, seed=torch.Generator().manual_seed(5), **kw)
    fooled = torch.stack([fooled_mask(trained_cnn, s, y) for s in singles]).any(0)
    assert torch.equal(fooled_mask(trained_cnn, combined, y), fooled)
    losses = torch.stack([ce(trained_cnn, s, y) for s in singles])
    unbroken = ~fooled
    torch.testing.assert_close(ce(trained_cnn, combined, y)[unbroken], losses.max(0).values[unbroken])


def test_seeded_randomness_is_reproducible(random_model, random_data):
    x, y = random_data
    a = pgd(random_model, x, y, eps=EPS, steps=2, seed=7)
    assert torch.equal(a, pgd(random_model, x, y, eps=EPS, steps=2, seed=7))
    assert not torch.equal(a, pgd(random_model, x, y, eps=EPS, steps=2, seed=8))


def test_pgd_keeps_each_examples_strongest_iterate(trained_cnn, digits_test):
    """Per example, the returned point is the strongest of all iterates of a plain PGD
    loop (written out here): fooled if any iterate fooled the model, else the highest loss."""
    x, y = digits_test[0][:128], digits_test[1][:128]
    eps, alpha, steps = 12 / 255, 8 / 255, 6  # large steps: the path oscillates, the last is rarely best
    losses, fooled, x_adv = [], [], x.clone()
    for k in range(steps + 1):
        x_adv.requires_grad_(True)
        logits = trained_cnn(x_adv)
        loss = F.cross_entropy(logits, y, reduction="none")
        losses.append(loss.detach())
        fooled.append(logits.argmax(1).detach() != y)
        if k < steps:
            (grad,) = torch.autograd.grad(loss.sum(), x_adv)
            x_adv = torch.min(torch.max(x_adv.detach() + alpha * grad.sign(), x - eps), x + eps).clamp(0, 1)
    losses, fooled = torch.stack(losses), torch.stack(fooled)  # (iterates, examples)
    best = pgd(attack_model(trained_cnn, precision="fp32"), x, y, eps=eps, alpha=alpha, steps=steps, restarts=0)
    last = last_iterate_pgd(trained_cnn, x, y, eps=eps, alpha=alpha, steps=steps)
    ever_fooled = fooled.any(0)
    strongest = torch.where(fooled, losses, -math.inf).amax(0).where(ever_fooled, losses.amax(0))
    assert torch.equal(fooled_mask(trained_cnn, best, y), ever_fooled)
    torch.testing.assert_close(ce(trained_cnn, best, y), strongest, rtol=1e-5, atol=1e-5)
    # the test can tell: for some examples the last iterate is weaker than an earlier one
    weaker = (fooled_mask(trained_cnn, last, y) < ever_fooled) | (ce(trained_cnn, last, y) < strongest - 1e-3)
    assert weaker.any()


def test_channels_last_and_cpu_autocast_agree(trained_cnn, digits_test):
    x, y = digits_test[0][:64], digits_test[1][:64]
    ref = pgd(trained_cnn, x, y, eps=EPS, steps=3)
    torch.testing.assert_close(pgd(attack_model(trained_cnn, channels_last=True), x, y, eps=EPS, steps=3), ref)
    bf16 = pgd(attack_model(trained_cnn, AttackRuntime(precision="bf16")), x, y, eps=EPS, steps=3)
    assert_within_budget(x, bf16, "linf", EPS)
    assert abs(accuracy(trained_cnn, bf16, y) - accuracy(trained_cnn, ref, y)) <= 3 / 64


# --- stAdv -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(8, 8), (28, 28), (7, 13), (32, 32)])
def test_zero_flow_returns_input_exactly(shape):
    x = torch.rand(2, 3, *shape, generator=torch.Generator().manual_seed(0))
    assert torch.equal(apply_flow(x, torch.zeros(2, 2, *shape)), x)


def test_flow_moves_pixels_as_eq3_says():
    """x_adv(p) = x(p + f_p): a flow of +1 px (horizontal) reads the right neighbour; border repeats."""
    x = torch.rand(1, 1, 6, 6, generator=torch.Generator().manual_seed(0))
    flow = torch.zeros(1, 2, 6, 6)
    flow[:, 0] = 1.0
    out = apply_flow(x, flow)
    assert torch.equal(out[..., :-1], x[..., 1:]) and torch.equal(out[..., -1], x[..., -1])
    flow = torch.zeros(1, 2, 6, 6)
    flow[:, 1] = 0.5  # half a pixel down: the mean of vertical neighbours
    torch.testing.assert_close(apply_flow(x, flow)[..., :-1, :], (x[..., :-1, :] + x[..., 1:, :]) / 2)


def test_flow_loss_and_warp_pass_gradcheck():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 2, 5, 6, generator=g, dtype=torch.float64)
    flow = (torch.rand(2, 2, 5, 6, generator=g, dtype=torch.float64) * 1.8 - 0.9).requires_grad_()
    assert torch.autograd.gradcheck(flow_loss, (flow,))
    assert torch.autograd.gradcheck(lambda f: apply_flow(x, f), (flow,))
    zero = torch.zeros(1, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(flow_loss, (zero,))  # finite at zero flow, where stAdv starts


def test_flow_loss_is_total_variation():
    flow = torch.zeros(1, 2, 3, 3)
    assert flow_loss(flow, eps=0).item() == 0
    flow[0, 0, 1, 1] = 3.0  # one pixel moved: 4 neighbours, each pair counted from both sides,
    assert math.isclose(flow_loss(flow, eps=0).item(), 2 * 4 * 3.0 / 9, rel_tol=1e-6)  # mean over 9 pixels


def test_stadv_lowers_accuracy(trained_cnn, digits_test):
    x, y = digits_test[0][:64], digits_test[1][:64]
    x_adv = stadv(trained_cnn, x, y, steps=10)
    assert accuracy(trained_cnn, x_adv, y) < accuracy(trained_cnn, x, y) - 0.5
    assert math.isclose(normalized_to_pixels(0.3 / 64, 32), 0.075)


# --- APGD ---------------------------------------------------------------------------------------------


def test_apgd_checkpoints_follow_croce_hein():
    assert checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]


def test_autoattack_keeps_the_worst_case_per_example(trained_cnn, digits_test):
    """Per example: AutoAttack's point is APGD-CE's when APGD-CE breaks it, else APGD-T's when that
    breaks it (run on the survivors only), else APGD-CE's; so it is broken iff either attack breaks it."""
    x, y = digits_test
    correct = ~fooled_mask(trained_cnn, x, y)  # AutoAttack attacks these; so do the stand-alone runs
    x, y = x[correct], y[correct]
    kw = dict(eps=12 / 255, steps=10)  # APGD-T then breaks a few (4 of ~170) that APGD-CE left
    x_ce = attacks.apgd_ce(trained_cnn, x, y, seed=0, **kw)
    broken_ce = fooled_mask(trained_cnn, x_ce, y)
    rest = (~broken_ce).nonzero().squeeze(1)
    x_t = attacks.apgd_t(trained_cnn, x[rest], y[rest], seed=1, n_target_classes=3, **kw)
    broken_t = fooled_mask(trained_cnn, x_t, y[rest])
    assert broken_ce.any() and broken_t.any() and not broken_t.all()  # each stage decides some examples
    expected = x_ce.clone()
    expected[rest[broken_t]] = x_t[broken_t]
    x_aa = attacks.autoattack(trained_cnn, x, y, seed=0, n_target_classes=3, **kw)
    assert torch.equal(x_aa, expected)
    expected_broken = broken_ce.clone()
    expected_broken[rest] = broken_t
    assert torch.equal(fooled_mask(trained_cnn, x_aa, y), expected_broken)


# --- cross-checks against torchattacks ----------------------------------------------------------------


def test_pgd_matches_torchattacks(trained_cnn, digits_test):
    torchattacks = pytest.importorskip("torchattacks")
    x, y = digits_test
    ref = torchattacks.PGD(trained_cnn, eps=EPS, alpha=2 / 255, steps=10, random_start=False)(x, y)
    ours = last_iterate_pgd(trained_cnn, x, y, eps=EPS, alpha=2 / 255, steps=10)  # advkit's loop
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)  # the same algorithm, step by step
    strongest = pgd(trained_cnn, x, y, eps=EPS, alpha=2 / 255, steps=10, restarts=0)  # its best iterate
    assert accuracy(trained_cnn, strongest, y) <= accuracy(trained_cnn, ref, y)
    torch.manual_seed(0)
    ref = torchattacks.PGD(trained_cnn, eps=EPS, alpha=2 / 255, steps=10, random_start=True)(x, y)
    ours = pgd(trained_cnn, x, y, eps=EPS, alpha=2 / 255, steps=10, seed=0)
    assert abs(accuracy(trained_cnn, ours, y) - accuracy(trained_cnn, ref, y)) <= 0.01


@pytest.mark.slow
def test_apgd_matches_torchattacks(trained_cnn, digits_test):
    torchattacks = pytest.importorskip("torchattacks")
    x, y = digits_test[0][:128], digits_test[1][:128]
    ref = torchattacks.APGD(trained_cnn, eps=EPS, steps=10, n_restarts=1, seed=0, loss="ce")(x, y)
    ours = attacks.apgd_ce(trained_cnn, x, y, eps=EPS, steps=10)
    assert abs(accuracy(trained_cnn, ours, y) - accuracy(trained_cnn, ref, y)) <= 0.02
    ref = torchattacks.APGDT(trained_cnn, eps=EPS, steps=10, n_restarts=1, seed=0, n_classes=10)(x, y)
    ours = attacks.apgd_t(trained_cnn, x, y, eps=EPS, steps=10)
    assert abs(accuracy(trained_cnn, ours, y) - accuracy(trained_cnn, ref, y)) <= 0.02


def test_autoattack_matches_torchattacks_autoattack(trained_cnn, digits_test):
    pytest.importorskip("torchattacks")
    x, y = digits_test[0][:16], digits_test[1][:16]
    ref = torchattacks_autoattack(trained_cnn, x, y, eps=0.3)  # the full suite; APGD-CE breaks all
    ours = attacks.autoattack(trained_cnn, x, y, eps=0.3)
    for x_adv in (ref, ours):
        assert_within_budget(x, x_adv, "linf", 0.3)
        assert accuracy(trained_cnn, x_adv, y) == 0


# --- model hygiene --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,kwargs,budget", CASES[:1] + CASES[2:3] + CASES[5:8] + CASES[8:9],
                         ids=["fgsm", "pgd", "apgd-dlr", "apgd-t", "autoattack", "stadv"])
def test_model_mode_restored_and_no_parameter_grads(name, kwargs, budget, random_data):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(0.5),
                          nn.Flatten(), nn.Linear(8 * 8 * 8, 10))
    model.train()
    model[3].eval()  # mixed flags must come back exactly
    flags = [m.training for m in model.modules()]
    stats = model[1].running_mean.clone()
    x, y = random_data
    get_attack(name)(model, x, y, **kwargs)
    assert [m.training for m in model.modules()] == flags
    assert torch.equal(model[1].running_mean, stats), "BatchNorm statistics changed: not in eval mode"
    assert all(p.grad is None for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters())


# --- bad input ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("call,match", [
    (lambda m, x, y: pgd(m, x, y, eps=-0.1), "eps"),
    (lambda m, x, y: pgd(m, x, y, eps=1.5), "eps"),
    (lambda m, x, y: fgsm(m, x, y, eps=2.0), "eps"),
    (lambda m, x, y: pgd(m, x, y, steps=0), "steps"),
    (lambda m, x, y: pgd(m, x, y, norm="l1"), "norm"),
    (lambda m, x, y: pgd(m, x, y, loss="hinge"), "loss"),
    (lambda m, x, y: pgd(m, x, y, alpha=-1.0), "alpha"),
    (lambda m, x, y: pgd(attack_model(m, precision="fp16"), x, y), "precision='fp16'"),
    (lambda m, x, y: stadv(attack_model(m, AttackRuntime(precision=True)), x, y), "precision=True"),
    (lambda m, x, y: attack_model(m, compile="fast"), "compile"),
    (lambda m, x, y: attack_model(m, fold_bn="yes"), "fold_bn"),
    (lambda m, x, y: attack_model(m, chanels_last=True), "chanels_last"),
    (lambda m, x, y: attack_model(m, AttackRuntime(), precision="fp32"), "either runtime"),
    (lambda m, x, y: pgd(m, x, y, restarts=-1), "restarts"),
    (lambda m, x, y: apgd(m, x, y, rho=0.0), "rho"),
    (lambda m, x, y: pgd(m, x, y, eps=math.nan), "eps"),
    (lambda m, x, y: attacks.apgd_ce(m, x, y, eps=-1.0), "eps"),
    (lambda m, x, y: attacks.apgd_t(m, x, y, steps=0), "steps"),
    (lambda m, x, y: apgd(m, x, y, loss="ce2"), "loss"),
    (lambda m, x, y: attacks.autoattack(m, x, y, version="plus"), "version"),
    (lambda m, x, y: attacks.autoattack(m, x, y, eps=3.0), "eps"),
    (lambda m, x, y: stadv(m, x, y, steps=0), "steps"),
    (lambda m, x, y: stadv(m, x, y, optimizer="sgd"), "optimizer"),
    (lambda m, x, y: stadv(m, x, y, tau=-1.0), "tau"),
    (lambda m, x, y: stadv(m, x, y, max_flow=-0.1), "max_flow"),
    (lambda m, x, y: pgd(m, (x * 255).to(torch.uint8), y), "x must"),
    (lambda m, x, y: pgd(m, x * 2, y), "x must"),
    (lambda m, x, y: pgd(m, x, y.float()), "y must"),
    (lambda m, x, y: get_attack("deepfool"), "attack"),
])
def test_bad_input_raises_naming_the_parameter(call, match, random_model, random_data):
    with pytest.raises(ValueError, match=match):
        call(random_model, *random_data)


def test_registry_lists_names_in_error():
    with pytest.raises(ValueError) as info:
        get_attack("cw")
    for name in ("fgsm", "pgd", "stadv", "apgd-ce", "apgd-t", "autoattack"):
        assert name in str(info.value) and name in ATTACKS


NAMED_ATTACKS = ["fgsm", "pgd", "apgd-ce", "apgd-dlr", "apgd-t", "autoattack", "stadv"]


@pytest.mark.parametrize("name", NAMED_ATTACKS)
def test_nan_pixels_are_rejected(name, random_model, random_data):
    x, y = random_data
    x = x.clone()
    x[0, 0, 0, 0] = float("nan")  # NaN fails both x < 0 and x > 1: the old range check let it in
    kwargs = {} if name == "fgsm" else {"steps": 1}
    with pytest.raises(ValueError, match="NaN"):
        get_attack(name)(random_model, x, y, **kwargs)


@pytest.mark.parametrize("name", NAMED_ATTACKS)
@pytest.mark.parametrize("bad", [10, -1])
def test_labels_outside_the_classes_are_rejected(name, bad, random_model, random_data):
    x, y = random_data
    y = y.clone()
    y[1] = bad  # the model has 10 outputs: torch would raise an IndexError deep inside the attack
    kwargs = {} if name == "fgsm" else {"steps": 1}
    with pytest.raises(ValueError, match=r"y must be class indices in \[0, 9\]"):
        get_attack(name)(random_model, x, y, **kwargs)


@pytest.mark.parametrize("name", ["fgsm", "pgd", "apgd-ce", "apgd-t", "autoattack", "stadv"])
def test_attacks_name_a_dtype_mismatch_and_a_model_without_logits(name, random_model, random_data):
    x, y = random_data
    attack = get_attack(name)
    with pytest.raises(ValueError, match="x has dtype torch.float64 but the model's weights are torch.float32"):
        attack(random_model, x.double(), y)

    class TwoOutputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = random_model

        def forward(self, x):
            return self.inner(x), x

    with pytest.raises(ValueError, match="must return a tensor of logits .* got a tuple"):
        attack(TwoOutputs().eval(), x, y)


def test_accuracy_of_a_model_with_nan_weights_is_an_error(random_model, random_data):
    import copy

    from advkit.attacks.evaluate import accuracy as top1

    x, y = random_data
    broken = copy.deepcopy(random_model)
    with torch.no_grad():
        for p in broken.parameters():
            p.fill_(float("nan"))
    assert 0 <= top1(random_model, x, y) <= 1
    with pytest.raises(ValueError, match="non-finite logits"):
        top1(broken, x, y)


# --- short signatures: one call shape, the speed options travel with the model ---------------------------


def test_pgd_signature_is_short():
    import inspect

    params = inspect.signature(pgd).parameters
    assert len(params) <= 10, list(params)
    for speed_option in ("precision", "channels_last", "compile", "fold_bn", "copies", "generator"):
        for attack in (fgsm, pgd, apgd, attacks.apgd_t, attacks.autoattack, stadv):
            assert speed_option not in inspect.signature(attack).parameters, (attack.__name__, speed_option)


def test_attack_model_carries_its_runtime_and_is_the_plain_model_elsewhere(trained_cnn, digits_test):
    x, y = digits_test[0][:32], digits_test[1][:32]
    fast = attack_model(trained_cnn, precision="fp32", channels_last=True)
    assert fast.runtime == AttackRuntime(precision="fp32", channels_last=True)
    assert attack_model(fast, fold_bn=False).runtime == AttackRuntime("fp32", True, False, False)  # options replace
    assert attack_model(fast).runtime == fast.runtime
    with torch.no_grad():
        assert torch.equal(fast(x), trained_cnn(x))
    with pytest.raises(dataclasses.FrozenInstanceError):
        fast.runtime.precision = "bf16"  # frozen: one runtime object, shared safely
    # the default runtime is today's defaults: bit-identical results
    assert torch.equal(pgd(attack_model(trained_cnn), x, y, eps=EPS, steps=3), pgd(trained_cnn, x, y, eps=EPS, steps=3))
    # the runtime reaches the attack: bf16 autocast changes the path on CPU
    bf16 = attack_model(trained_cnn, precision="bf16")
    assert not torch.equal(pgd(bf16, x, y, eps=EPS, steps=3), pgd(trained_cnn, x, y, eps=EPS, steps=3))
    assert not torch.equal(attacks.autoattack(bf16, x, y, eps=EPS, steps=3, n_target_classes=2),
                           attacks.autoattack(trained_cnn, x, y, eps=EPS, steps=3, n_target_classes=2))


def test_restarts_zero_starts_at_x_and_targeted_losses(trained_cnn, digits_test):
    x, y = digits_test[0][:32], digits_test[1][:32]
    from_x = pgd(trained_cnn, x, y, eps=EPS, steps=3, restarts=0)
    assert torch.equal(from_x, pgd(trained_cnn, x, y, eps=EPS, steps=3, restarts=0, seed=5))  # no randomness
    assert not torch.equal(from_x, pgd(trained_cnn, x, y, eps=EPS, steps=3))
    target = (y + 1) % 10
    hit = pgd(trained_cnn, x, target, eps=0.5, steps=10, loss="ce-targeted", restarts=0)
    with torch.no_grad():
        assert (trained_cnn(hit).argmax(1) == target).float().mean() > 0.5
