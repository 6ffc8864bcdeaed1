"""Shared fixtures: the digits dataset and a small CNN trained on it (seconds on CPU)."""

import pytest
import torch

from advkit._torch import to_float
from advkit.data import Batcher, get_dataset
from advkit.models import get_model
from advkit.training.fit import TrainConfig, fit

# Tiny models run fastest single-threaded (and test files may run side by side); the CIFAR-10
# integration test asks for more threads itself.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def digits():
    return get_dataset("digits")


@pytest.fixture(scope="session")
def trained_cnn(digits):
    """small_cnn trained 15 epochs on digits: about 97% test accuracy, eval mode, CPU."""
    torch.manual_seed(0)
    model = get_model("small_cnn", 10, 1)
    config = TrainConfig(epochs=15, lr=0.05, schedule="cosine", seed=0)
    fit(model, Batcher(digits.x_train, digits.y_train, 64, augment=True, padding=1, seed=0), config, progress=False)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(True)
    return model


@pytest.fixture(scope="session")
def digits_test(digits):
    """The first 256 test images as floats in [0, 1] with their labels."""
    return to_float(digits.x_test[:256]), digits.y_test[:256]


@pytest.fixture()
def tmp_run(tmp_path, monkeypatch):
    """An isolated runs/ and figures/ folder."""
    monkeypatch.setenv("ADVKIT_RUNS_DIR", str(tmp_path / "runs"))
    monkeypatch.setenv("ADVKIT_FIGURES_DIR", str(tmp_path / "figures"))
    return tmp_path
