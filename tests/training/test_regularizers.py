"""advkit.training.regularizers: label noise, AutoAugment batches; weight averaging under adversarial training."""

import numpy as np
import pytest
import torch
from torchvision.transforms import v2

from advkit._torch import to_float
from advkit.data import Batcher
from advkit.models import get_model
from advkit.training.fit import TrainConfig, fit
from advkit.training.objectives import PGDAT
from advkit.training.regularizers import AutoAugmentBatcher, noisy_labels


def test_noisy_labels_corrupt_exactly_the_fraction_once(digits):
    y = digits.y_train
    noisy = noisy_labels(y, 0.2, 10, seed=3)
    assert (noisy != y).sum() == round(0.2 * len(y))
    assert torch.equal(noisy, noisy_labels(y, 0.2, 10, seed=3))
    assert not torch.equal(noisy, noisy_labels(y, 0.2, 10, seed=4))
    assert torch.equal(noisy_labels(y, 0.0), y) and (noisy_labels(y, 1.0) != y).all()
    assert noisy.min() >= 0 and noisy.max() <= 9 and torch.equal(y, digits.y_train)  # input untouched
    counts = torch.bincount(noisy[noisy != y], minlength=10)
    assert (counts > 0).all()  # wrong labels spread over all classes
    with pytest.raises(ValueError, match="fraction"):
        noisy_labels(y, 1.5)


def cifar_like(n=48, seed=0):
    gen = torch.Generator().manual_seed(seed)
    # smooth-ish random images so geometric and colour operations both change pixels
    small = torch.randint(0, 256, (n, 3, 8, 8), generator=gen, dtype=torch.uint8)
    return torch.nn.functional.interpolate(small.float(), size=32, mode="bilinear").round().to(torch.uint8)


def test_autoaugment_gives_each_image_its_own_sub_policy():
    x = cifar_like()
    batcher = AutoAugmentBatcher(x, torch.zeros(len(x), dtype=torch.int64), 16)
    aa = batcher.autoaugment
    out = batcher.autoaugment_batch(x, torch.Generator().manual_seed(5))
    assert out.dtype == torch.uint8 and out.shape == x.shape
    # Redraw the same random numbers and apply torchvision's operations image by image.
    gen = torch.Generator().manual_seed(5)
    choice = torch.randint(len(aa._policies), (len(x),), generator=gen)
    coins = torch.rand(len(x), 2, generator=gen)
    negative = torch.rand(len(x), 2, generator=gen) <= 0.5
    for i in range(len(x)):
        img = x[i]
        for stage in range(2):
            op, probability, _ = aa._policies[choice[i]][stage]
            if coins[i, stage] <= probability:
                op, magnitude = batcher._operation(int(choice[i]), int(negative[i, stage]), stage, 32, 32)
                img = aa._apply_image_or_video_transform(img, op, magnitude, interpolation=aa.interpolation,
                                                         fill=aa._fill)
        assert torch.equal(out[i], img), i
    assert len(set(choice.tolist())) > 10  # many sub-policies within one batch
    assert 0.3 < (out != x).flatten(1).any(1).float().mean() < 1.0


def test_autoaugment_batcher_is_a_deterministic_batcher():
    x, y = cifar_like(40), torch.arange(40) % 10
    batcher = AutoAugmentBatcher(x, y, 16, augment=True, seed=2)
    first = list(batcher)
    assert [len(b[1]) for b in first] == [16, 16, 8]
    assert all(b[0].dtype == torch.float32 and 0 <= b[0].min() and b[0].max() <= 1 for b in first)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, batcher))  # same (seed, epoch)
    plain = Batcher(x, y, 16, augment=True, seed=2)
    assert all(torch.equal(a[1], b[1]) for a, b in zip(first, plain))  # same order as a plain Batcher
    batcher.set_epoch(1)
    assert not torch.equal(first[0][0], next(iter(batcher))[0])
    with pytest.raises(ValueError, match="policy='cifar'"):
        AutoAugmentBatcher(x, y, 16, policy="cifar")
    with pytest.raises(ValueError, match="uint8"):
        AutoAugmentBatcher(to_float(x), y, 16)
    assert {p.value for p in v2.AutoAugmentPolicy} >= {"cifar10", "imagenet", "svhn"}


class RecordBatches:
    """Clean cross-entropy that records every batch `fit` trains on."""

    def __init__(self):
        self.batches = []

    def __call__(self, model, x, y):
        self.batches.append((x.clone(), y.clone()))
        return torch.nn.functional.cross_entropy(model(x), y)


def test_fit_trains_on_the_autoaugmented_batches(digits):
    x, y = digits.x_train[:64], digits.y_train[:64]
    runs = {}
    for name, cls in (("autoaugment", AutoAugmentBatcher), ("plain", Batcher)):
        torch.manual_seed(0)
        model, objective = get_model("small_cnn", 10, 1, width=8), RecordBatches()
        batcher = cls(x, y, 32, augment=True, padding=1, seed=2)
        result = fit(model, batcher, TrainConfig(epochs=2, lr=0.05), objective=objective, progress=False)
        batcher.set_epoch(2)  # what the last epoch's batches were
        runs[name] = result, objective.batches, list(batcher)
    (aa, aa_seen, aa_last), (plain, plain_seen, _) = runs["autoaugment"], runs["plain"]
    assert len(aa_seen) == 4 and all(torch.equal(a[0], b[0]) for a, b in zip(aa_seen[2:], aa_last))
    assert all(torch.equal(a[1], b[1]) for a, b in zip(aa_seen, plain_seen))  # same images in the same order
    changed = torch.cat([(a[0] != b[0]).flatten(1).any(1) for a, b in zip(aa_seen, plain_seen)])
    assert 0.3 < changed.float().mean() < 1.0  # each image draws its own sub-policy; some apply nothing
    assert np.isfinite(aa.history["train_loss"]).all()
    assert aa.history["train_loss"].iloc[0] != plain.history["train_loss"].iloc[0]
    assert not torch.equal(aa.model.linear.weight, plain.model.linear.weight)


class RecordIterates(PGDAT):
    """PGD-AT that records the weights after every optimizer step (fit's after_step hook)."""

    def __post_init__(self):
        super().__post_init__()
        self.iterates = []

    def after_step(self, model):
        self.iterates.append({k: v.detach().clone() for k, v in model.state_dict().items()})


def test_ema_of_adversarial_training_averages_the_iterates(digits):
    torch.manual_seed(0)
    model = get_model("small_cnn", 10, 1, width=8)
    objective = RecordIterates(eps=0.1, alpha=0.04, steps=2)
    decay = 0.8
    config = TrainConfig(epochs=2, lr=0.05, ema_decay=decay)
    batcher = Batcher(digits.x_train[:96], digits.y_train[:96], 32, augment=True, padding=1)
    result = fit(model, batcher, config, objective=objective, progress=False)
    assert len(objective.iterates) == 6
    for name, value in result.model.state_dict().items():
        if not value.is_floating_point():
            continue
        ema = objective.iterates[0][name].clone()
        for it in objective.iterates[1:]:
            ema = decay * ema + (1 - decay) * it[name]
        torch.testing.assert_close(value, ema, rtol=1e-5, atol=1e-6, msg=name)
    assert not torch.allclose(result.model.linear.weight, objective.iterates[-1]["linear.weight"])
