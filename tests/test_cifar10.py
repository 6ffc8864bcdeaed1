"""Integration test on the real (JPEG re-encoded) CIFAR-10 copy; .ci/run sets ADVKIT_CIFAR10_DIR."""

import os

import pytest
import torch

from advkit.data import Batcher, get_dataset
from advkit.models import get_model
from advkit.training.fit import TrainConfig, fit

CIFAR = os.environ.get("ADVKIT_CIFAR10_DIR")
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not CIFAR, reason="set ADVKIT_CIFAR10_DIR to an extracted CIFAR-10 copy")]


@pytest.fixture()
def two_threads(cores):
    before = torch.get_num_threads()
    torch.set_num_threads(min(2, cores))
    yield
    torch.set_num_threads(before)


def test_resnet20_learns_cifar10_subset(two_threads):
    data = get_dataset("cifar10", CIFAR)
    assert data.x_train.shape == (50_000, 3, 32, 32) and data.x_test.shape == (10_000, 3, 32, 32)
    assert torch.bincount(data.y_test).tolist() == [1000] * 10
    torch.manual_seed(0)
    model = get_model("resnet20", 10, 3)
    config = TrainConfig(epochs=3, optimizer="sgd", lr=0.1, schedule="onecycle",
                         weight_decay=5e-4, seed=0)
    # 3000 training images, 1000 test images: a couple of minutes on 2 CPU cores.
    result = fit(model, Batcher(data.x_train[:3000], data.y_train[:3000], 128, augment=True, padding=4), config,
                 test=(data.x_test[::10], data.y_test[::10]), progress=False)
    # Chance is 10%; a ResNet-20 seeing 3000 images 3 times reaches about 35%. 25% leaves margin
    # for thread-count noise while still failing for broken data, labels, augmentation or training.
    assert result.history["test_acc"].iloc[-1] > 0.25
