"""advkit.training.augment: static adversarial augmentation (Xu et al. 2019) and its cache."""

import copy
import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F

from advkit._checks import XU_ATTACKS
from advkit._torch import state_hash, to_float
from advkit.runs.checkpoints import load_model, save_model
from advkit.runs.run import Run, StaleCacheWarning
from advkit.training import augment
from advkit.training.augment import augmented_dataset, finetune_batcher, finetune_config, xu_budget

N = 48



@pytest.fixture(scope="module")
def train_images(digits):
    return digits.x_train[:N], digits.y_train[:N]


def within_neighbourhood(x_adv, x):
    """Each pixel of x_adv lies between the min and max of x's 3x3 neighbourhood (flows < 1 px)."""
    padded = F.pad(x.float(), (1, 1, 1, 1), mode="replicate")
    hi = F.max_pool2d(padded, 3, stride=1)
    lo = -F.max_pool2d(-padded, 3, stride=1)
    return bool(((x_adv.float() >= lo) & (x_adv.float() <= hi)).all())


@pytest.mark.parametrize("attack", XU_ATTACKS)
def test_augmented_set_doubles_the_images_within_the_budget(trained_cnn, train_images, attack):
    x, y = train_images
    x2, y2 = augmented_dataset(trained_cnn, x, y, attack, batch_size=20, progress=False)
    assert x2.shape == (2 * N, *x.shape[1:]) and x2.dtype == torch.uint8
    assert torch.equal(y2, torch.cat([y, y])) and torch.equal(x2[:N], x)
    clean, adv = x2[:N], x2[N:]
    assert (adv != clean).flatten(1).any(1).float().mean() > 0.5  # most images changed
    if attack == "stadv":
        assert within_neighbourhood(adv, clean)
    else:  # uint8 keeps |delta| <= eps exactly: eps is a whole number of grey levels
        levels = round(xu_budget(attack)["eps"] * 255)
        assert (adv.int() - clean.int()).abs().max() <= levels
        assert (adv.int() - clean.int()).abs().max() == levels  # and uses it


def test_fgsm_examples_fool_the_base_model(trained_cnn, train_images):
    x, y = train_images
    x_adv, stats = augment.adversarial_examples(trained_cnn, x, y, "fgsm", eps=0.2, progress=False)
    assert stats["clean_accuracy"] > 0.9
    assert stats["fooled_stored"] > 0.3 and stats["fooled_stored"] == stats["fooled_float"]  # FGSM is lossless
    with torch.no_grad():
        assert (trained_cnn(to_float(x_adv)).argmax(1) != y).float().mean() == pytest.approx(stats["fooled_stored"])


def test_float32_storage_keeps_the_budget(trained_cnn, train_images):
    x, y = train_images
    x2, y2 = augmented_dataset(trained_cnn, x, y, "pgd", dtype="float32", progress=False)
    assert x2.dtype == torch.float32 and torch.equal(x2[:N], to_float(x))
    assert (x2[N:] - x2[:N]).abs().max() <= 1 / 255 + 1e-6


def test_cache_is_reused_and_invalidated_by_other_settings(trained_cnn, train_images, tmp_path, monkeypatch):
    x, y = train_images
    first = augmented_dataset(trained_cnn, x, y, "fgsm", run=tmp_path, progress=False)
    meta = json.loads((tmp_path / "attacks" / "augment_fgsm.json").read_text())
    assert meta["settings"]["budget"] == {"eps": 8 / 255} and meta["settings"]["model"] == state_hash(trained_cnn)
    assert set(meta["stats"]) == {"clean_accuracy", "fooled_float", "fooled_stored"}
    calls = []
    real = augment.adversarial_examples
    monkeypatch.setattr(augment, "adversarial_examples", lambda *a, **k: calls.append(k) or real(*a, **k))
    again = augmented_dataset(trained_cnn, x, y, "fgsm", run=tmp_path, progress=False)
    assert not calls and all(torch.equal(a, b) for a, b in zip(first, again))
    with pytest.warns(StaleCacheWarning, match=r"augment_fgsm.pt was made with budget=.*recomputing"):
        other = augmented_dataset(trained_cnn, x, y, "fgsm", run=tmp_path, eps=16 / 255, progress=False)
    assert len(calls) == 1 and (other[0][N:].int() - x.int()).abs().max() == 16
    other_base = copy.deepcopy(trained_cnn)
    with torch.no_grad():
        next(other_base.parameters()).add_(1e-3)
    with pytest.warns(StaleCacheWarning, match="augment_fgsm.pt was made with model="):  # another base model
        augmented_dataset(other_base, x, y, "fgsm", run=tmp_path, eps=16 / 255, progress=False)
    assert len(calls) == 2


def test_finetune_config_follows_the_seed_code(train_images):
    config = finetune_config(5)
    assert (config.epochs, config.optimizer, config.lr, config.weight_decay, config.schedule) == \
        (5, "adam", 1e-3, 0.0, "constant")
    assert finetune_config(2, lr=1e-4, seed=3).seed == 3
    batcher = finetune_batcher(*train_images)
    assert (batcher.batch_size, batcher.augment, batcher.padding) == (128, True, 4)


@pytest.mark.parametrize("kwargs, match", [
    (dict(attack="cw"), "attack='cw'.*fgsm"),
    (dict(attack="fgsm", dtype="float16"), "dtype='float16'"),
    (dict(attack="fgsm", epsilon=0.1), "invalid settings for attack 'fgsm'"),
    (dict(attack="fgsm", eps=-0.1), "eps"),
    (dict(attack="pgd", batch_size=0), "batch_size"),
])
def test_bad_input(trained_cnn, train_images, kwargs, match):
    with pytest.raises(ValueError, match=match):
        augmented_dataset(trained_cnn, *train_images, progress=False, **kwargs)


# --- Xu et al.'s switches: budget, regeneration per batch, float32 storage (CIFAR-shaped) ----------------


@pytest.fixture(scope="module")
def cifar_shaped():
    from advkit.models import get_model

    torch.manual_seed(0)
    model = get_model("resnet20", 10, 3).eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8, generator=g)
    y = torch.randint(0, 10, (16,), generator=g)
    return model, x, y


def test_regenerated_augmentation_follows_the_current_model(cifar_shaped):
    model, x, y = cifar_shaped
    model = copy.deepcopy(model)
    objective = augment.RegeneratedAugmentation("fgsm")
    xf = to_float(x)
    first = objective.perturb(model, xf, y)
    assert torch.equal(first, objective.perturb(model, xf, y))  # FGSM: same model, same examples
    assert (first - xf).abs().max() <= 8 / 255 + 1e-6 and (first != xf).float().mean() > 0.5
    static, _ = augment.adversarial_examples(model, x, y, "fgsm", dtype="float32", progress=False)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(3):  # the model changes under training on the objective
        loss = objective(model, xf, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    again = objective.perturb(model, xf, y)
    changed = (again != first).flatten(1).any(1).float().mean()
    assert changed > 0.5  # regenerated against the new weights
    assert torch.equal(static, first)  # the static set stays what the base model gave
    with torch.no_grad():
        expected = F.cross_entropy(model(torch.cat([xf, again])), torch.cat([y, y]))
        assert objective.training_loss(model, xf, again, y) == pytest.approx(expected.item())


def test_regenerated_pgd_draws_its_start_from_the_global_rng(cifar_shaped):
    model, x, y = cifar_shaped
    objective = augment.RegeneratedAugmentation("pgd", eps=8 / 255, alpha=2 / 255, steps=2)
    xf = to_float(x)
    torch.manual_seed(5)
    a = objective.perturb(model, xf, y)
    torch.manual_seed(5)
    assert torch.equal(a, objective.perturb(model, xf, y))  # fit reseeds per epoch: exact resume
    assert not torch.equal(a, objective.perturb(model, xf, y))


def test_float32_storage_keeps_a_1_255_pgd_perturbation_that_uint8_loses(cifar_shaped):
    model, x, y = cifar_shaped
    budget = dict(eps=1 / 255, alpha=0.25 / 255, steps=10)  # Xu et al. Table 1's PGD
    x32, _ = augment.adversarial_examples(model, x, y, "pgd", dtype="float32", progress=False, **budget)
    x8, _ = augment.adversarial_examples(model, x, y, "pgd", dtype="uint8", progress=False, **budget)
    delta32 = x32 - to_float(x)
    assert delta32.abs().max() <= 1 / 255 + 1e-6
    assert torch.equal(x8, x32.mul(255).round().to(torch.uint8))  # uint8 is the float result rounded
    fractional = (delta32.abs() > 1e-7) & ((delta32 * 255 - (delta32 * 255).round()).abs() > 1e-3)
    assert fractional.float().mean() > 0.05  # float32 keeps sub-level steps (about 10 %)
    lost = (delta32.abs() > 1e-7) & (x8 == x)
    assert lost.float().mean() > 0.02  # ... that uint8 rounds back to the clean pixel (about 4 %)


def test_training_budget_switch():
    table1 = {"eps": 1 / 255, "alpha": 0.25 / 255, "steps": 10}
    assert augment.xu_training_budget("pgd", table1) == table1
    assert augment.xu_training_budget("pgd", table1, augment.CODE_EPS) == {"eps": 8 / 255, "alpha": 2 / 255,
                                                                           "steps": 10}
    assert augment.xu_training_budget("fgsm", {"eps": 8 / 255}, 16 / 255) == {"eps": 16 / 255}
    stadv = {"tau": 0.05, "steps": 50, "max_flow": None}
    assert augment.xu_training_budget("stadv", stadv, 8 / 255) == {"tau": 0.05, "steps": 50}
    with pytest.raises(ValueError, match="eps must be a finite number > 0 and <= 1, got 2.0"):
        augment.xu_training_budget("pgd", table1, 2.0)


@pytest.mark.parametrize("kwargs, match", [
    (dict(attack="cw"), "attack='cw'.*fgsm"),
    (dict(attack="pgd", epsilon=0.1), "invalid settings for attack 'pgd'"),
])
def test_regenerated_augmentation_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        augment.RegeneratedAugmentation(**kwargs)


def test_fit_takes_the_regenerating_objective(cifar_shaped):
    from advkit.training.fit import fit

    model, x, y = cifar_shaped
    model = copy.deepcopy(model)
    before = [p.detach().clone() for p in model.parameters()]
    result = fit(model, augment.finetune_batcher(x, y, 8), augment.finetune_config(1),
                 objective=augment.RegeneratedAugmentation("fgsm"), progress=False)
    assert len(result.history) == 1 and math.isfinite(result.history.train_loss.iloc[0])
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_a_fine_tune_made_with_other_switches_is_not_resumed_silently(tmp_path):
    settings = {"augment_mode": "static", "storage": "float32", "augment_eps": None}
    augment.check_finetune_settings(tmp_path, "pgd", settings)  # no checkpoint yet: recorded
    (tmp_path / "checkpoints" / "pgd.state.pt").write_bytes(b"")
    augment.check_finetune_settings(tmp_path, "pgd", settings)  # same switches: resume is fine
    with pytest.raises(ValueError, match="augment_mode='static'.*asks for augment_mode='regenerate'"):
        augment.check_finetune_settings(tmp_path, "pgd", {**settings, "augment_mode": "regenerate"})
    (tmp_path / "checkpoints" / "fgsm.state.pt").write_bytes(b"")  # made before the switches: uint8, static
    with pytest.raises(ValueError, match="storage='uint8'"):
        augment.check_finetune_settings(tmp_path, "fgsm", settings)


@pytest.mark.parametrize("mode, dtype", [("static", "float32"), ("regenerate", None)])
def test_xu_finetune_is_the_fine_tune_of_its_mode(trained_cnn, digits, tmp_path, mode, dtype):
    from advkit.training.fit import fit

    data = dataclasses.replace(digits, x_train=digits.x_train[:N], y_train=digits.y_train[:N])
    runs = [Run(tmp_path / name) for name in ("xu", "by_hand")]
    for run in runs:
        save_model(run.model("base"), trained_cnn, {})
    config = finetune_config(1, seed=3)
    done = augment.xu_finetune(runs[0], data, "fgsm", {}, config, mode=mode, storage="float32", batch_size=16)
    model = load_model(runs[1].model("base"))
    if mode == "static":  # 1:1 set made once against the base model, batches of 16
        x, y = augmented_dataset(load_model(runs[1].model("base")), data.x_train, data.y_train, "fgsm",
                                 run=runs[1], seed=3, dtype=dtype)
        batches, objective = finetune_batcher(x, y, 16, padding=1, seed=3), "clean"
    else:  # 8 clean images a batch, each with its example against the current weights
        batches = finetune_batcher(data.x_train, data.y_train, 8, padding=1, seed=3)
        objective = augment.RegeneratedAugmentation("fgsm")
    by_hand = fit(model, batches, config, objective=objective, run=runs[1], name="fgsm")
    assert runs[0].model("fgsm").exists()
    for a, b in zip(done.model.parameters(), by_hand.model.parameters()):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="mode"):
        augment.xu_finetune(runs[0], data, "fgsm", {}, config, mode="dynamic")
