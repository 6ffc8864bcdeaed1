"""advkit.augment: static adversarial augmentation (Xu et al. 2019) and its cache."""

import json

import pytest
import torch
import torch.nn.functional as F

from advkit import augment
from advkit.augment import XU_ATTACKS, augmented_dataset, finetune_config, model_fingerprint, xu_budget
from advkit.data import to_float

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
    assert meta["settings"]["budget"] == {"eps": 8 / 255} and meta["settings"]["model"] == model_fingerprint(trained_cnn)
    assert set(meta["stats"]) == {"clean_accuracy", "fooled_float", "fooled_stored"}
    calls = []
    real = augment.adversarial_examples
    monkeypatch.setattr(augment, "adversarial_examples", lambda *a, **k: calls.append(k) or real(*a, **k))
    again = augmented_dataset(trained_cnn, x, y, "fgsm", run=tmp_path, progress=False)
    assert not calls and all(torch.equal(a, b) for a, b in zip(first, again))
    other = augmented_dataset(trained_cnn, x, y, "fgsm", run=tmp_path, eps=16 / 255, progress=False)
    assert len(calls) == 1 and (other[0][N:].int() - x.int()).abs().max() == 16


def test_finetune_config_follows_the_seed_code():
    config = finetune_config(5)
    assert (config.epochs, config.optimizer, config.lr, config.batch_size, config.augment, config.padding) == \
        (5, "adam", 1e-3, 128, True, 4)
    assert finetune_config(2, lr=1e-4, seed=3).seed == 3


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
