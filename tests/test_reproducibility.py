"""set_reproducible: the one call every notebook makes first (seeds, threads, deterministic kernels)."""

import random

import numpy as np
import pandas as pd
import pytest
import torch
from threadpoolctl import threadpool_info, threadpool_limits

from advkit.reproducibility import set_reproducible


@pytest.fixture()
def restore_globals():
    threads, width, colwidth = torch.get_num_threads(), pd.get_option("display.width"), pd.get_option(
        "display.max_colwidth")
    with threadpool_limits(limits=None):     # restores the BLAS/OpenMP pools on exit
        yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(False)
    pd.set_option("display.width", width)
    pd.set_option("display.max_colwidth", colwidth)


def test_seeds_threads_and_deterministic_kernels(restore_globals):
    info = set_reproducible(3, threads=2)
    draws = (random.random(), np.random.rand(), torch.rand(2))
    assert info == {"seed": 3, "threads": 2, "deterministic": True}
    assert torch.get_num_threads() == 2 and torch.are_deterministic_algorithms_enabled()
    assert all(pool["num_threads"] == 2 for pool in threadpool_info() if pool["user_api"] == "blas")
    assert pd.get_option("display.width") >= 200               # wide tables print unwrapped
    assert pd.get_option("display.max_colwidth") is None         # and long text cells uncut
    set_reproducible(3, threads=1)
    again = (random.random(), np.random.rand(), torch.rand(2))
    assert draws[:2] == again[:2] and torch.equal(draws[2], again[2])
    assert torch.get_num_threads() == 1


def test_threads_none_leaves_the_thread_count(restore_globals):
    torch.set_num_threads(2)
    set_reproducible(0, threads=None)
    assert torch.get_num_threads() == 2


@pytest.mark.parametrize("kwargs, match", [({"seed": -1}, r"seed must be an integer in \[0, 4294967295\], got -1"),
                                           ({"seed": 1.5}, r"seed must be an integer in \[0, 4294967295\], got 1.5"),
                                           ({"seed": None}, r"seed must be an integer in \[0, 4294967295\], got None"),
                                           ({"seed": 0, "threads": 0}, "threads must be an integer >= 1, got 0"),
                                           ({"seed": 0, "threads": True}, "threads must be an integer >= 1, got True")])
def test_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        set_reproducible(**kwargs)
