"""Reproducible notebook runs: one call pins seeds, thread counts and deterministic kernels.

Thread counts change results (each thread sums its own share of a reduction), so every notebook
pins them, for torch and for the BLAS/OpenMP pools numpy and scipy use (threadpoolctl). What
pinning cannot remove is the CPU's own float path (AVX-512 vs AVX2 kernels in MKL, oneDNN and
OpenBLAS): those last bits, and what training makes of them, are what nbval's sanitizers
(`nbval_sanitize.cfg`) tolerate. Tables are printed unwrapped and untruncated, so that a number
one character wider on another CPU does not move the point where pandas wraps a wide table or
cuts a long text cell.
"""

from __future__ import annotations

import os
import random

import numpy as np
import pandas as pd
import torch
from threadpoolctl import threadpool_limits

from advkit._checks import check_int, check_seed


def set_reproducible(seed: int, threads: int | None = 1) -> dict:
    """Seed python, numpy and torch with `seed`, run torch and BLAS on `threads` threads (None: leave the
    libraries' defaults), ask torch for deterministic algorithms (warnings only where none exists) and
    print pandas tables unwrapped and text cells uncut (`display.width`, `display.max_colwidth`); every
    notebook's first code cell calls it."""
    check_seed("seed", seed)
    if threads is not None:
        check_int("threads", threads)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")   # deterministic cuBLAS; read at its first use
    if threads is not None:
        torch.set_num_threads(threads)
        threadpool_limits(limits=threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    pd.set_option("display.width", 1000)
    pd.set_option("display.max_colwidth", None)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return {"seed": seed, "threads": torch.get_num_threads(), "deterministic": True}
