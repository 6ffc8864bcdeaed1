"""Shared fixtures: the digits dataset and a small CNN trained on it (seconds on CPU), and the cores a test may use."""

import os

import pytest
import torch

from advkit._torch import to_float
from advkit.data import Batcher, get_dataset
from advkit.models import get_model
from advkit.training.fit import TrainConfig, fit

# Tiny models run fastest single-threaded (and test files may run side by side); the CIFAR-10
# integration test asks for more threads itself.
torch.set_num_threads(1)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """Under pytest-xdist's `--dist loadfile`, a test file goes to one worker, and so do all the notebooks, in
    order: they are one pipeline (02 reads what 01 wrote)."""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class NotebooksInOneWorker(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return "notebooks" if ".ipynb::" in nodeid else super()._split_scope(nodeid)

    return NotebooksInOneWorker(config, log)


@pytest.fixture(scope="session")
def cores() -> int:
    """The CPU cores one test process may use: its share when pytest-xdist runs workers side by side (more torch
    threads than cores leave OpenMP's waiting threads stalling each other: several times slower)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    return max(1, len(os.sched_getaffinity(0)) // workers)


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
