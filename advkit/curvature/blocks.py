"""How many probes one batched Hessian-vector product takes (`hessian_trace(block_size="auto")`).

Independent probes (Hutchinson, Hutch++) can share one batched product: one vmap per data chunk
on the forward backend, one vmapped backward through the cached graph on the reverse backend.
That pays on a GPU, where a ResNet-32 product leaves the device mostly idle; on CPUs it is slower,
so "auto" is 1 there (and results stay those of the one-probe loop). Under the GPU policy
(`advkit._torch.gpu_policy`: on CUDA) "auto" is the largest block, up to `cap` and the number of
probes, whose memory fits in a `safety` share of the free memory, the memory of one probe measured
on one product (on a CPU: the host's available memory and the process's peak resident memory).
"""

from __future__ import annotations

import contextlib
import os
import warnings
from typing import Any

import torch

from advkit._checks import check_int, check_number
from advkit._torch import gpu_policy

BLOCK_CAP = 32      # past ~32 probes a block no longer shortens a ResNet-32 product on an H200 (launch-bound)
SAFETY = 0.5        # share of the free memory a block may use: allocator fragmentation, cuDNN workspaces


def resolve_block_size(free_bytes: int, bytes_per_probe: int, n: int, *, cap: int = BLOCK_CAP,
                       safety: float = SAFETY) -> int:
    """Probes per batched product: as many as fit in safety * free_bytes, at most min(n, cap), at least 1."""
    check_int("n", n)
    check_int("cap", cap)
    check_number("safety", safety, low_open=True, high=1.0)
    if free_bytes < 0 or bytes_per_probe < 0:
        raise ValueError(f"free_bytes and bytes_per_probe must be >= 0, got {free_bytes} and {bytes_per_probe}")
    fit = int(safety * free_bytes // max(bytes_per_probe, 1))
    return max(1, min(fit, n, cap))


def free_cuda_bytes(device: torch.device) -> int:
    """Free device memory plus what PyTorch's allocator holds unused (it can hand that out first)."""
    free, _ = torch.cuda.mem_get_info(device)
    return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))


def free_host_bytes() -> int:
    """The host memory available to a new allocation (Linux MemAvailable; else the free pages)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes(reset: bool = False) -> int:
    """This process's peak resident memory (VmHWM), reset to the current one first when `reset`
    (Linux /proc/self/clear_refs; where that is refused, the peak since the process started)."""
    if reset:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:  # not Linux: nothing measured (one byte a probe: the block is capped by `cap` and n)
        pass
    return 0


def bytes_per_probe(op: Any) -> int:
    """Peak memory of a one-probe `op.matmat` above what was allocated before (one product): on
    CUDA the allocator's peak, on a CPU the growth of the process's peak resident memory (a lower
    bound: memory the allocator already holds is reused unseen).

    The reverse backend's cached graph is built first, so it is not counted. Resets the device's
    peak-memory statistics."""
    device = op.device
    if op.backend == "reverse":
        op._cached_gradient()
    if device.type != "cuda":
        base = _peak_rss_bytes(reset=True)
        op.matmat(torch.ones(1, op.dim, device=device))
        return max(_peak_rss_bytes() - base, 1)
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    op.matmat(torch.ones(1, op.dim, device=device))
    torch.cuda.synchronize(device)
    return max(int(torch.cuda.max_memory_allocated(device) - base), 1)


def auto_block_size(op: Any, n: int, *, cap: int = BLOCK_CAP, safety: float = SAFETY) -> int:
    """block_size="auto": 1 off the GPU policy; under it `resolve_block_size` with one measured
    product (`bytes_per_probe`, counted in op.n_hvp) against `free_cuda_bytes` (`free_host_bytes`
    on a CPU)."""
    if not gpu_policy(op.device) or min(n, cap) == 1:
        return 1
    per_probe = bytes_per_probe(op)
    free = free_cuda_bytes(op.device) if op.device.type == "cuda" else free_host_bytes()
    return resolve_block_size(free, per_probe, n, cap=cap, safety=safety)


def block_size_of(op: Any, block_size: int | str, n: int) -> int:
    """A `block_size` argument ("auto" or a positive int) as the number of probes per product."""
    if block_size == "auto":
        return auto_block_size(op, n)
    if isinstance(block_size, str):
        raise ValueError(f"block_size must be 'auto' or an integer >= 1, got {block_size!r}")
    check_int("block_size", block_size)
    return block_size


@contextlib.contextmanager
def no_vmap_fallback():
    """Inside: an op without a vmap batching rule raises instead of looping over the batch (per probe),
    and the legacy vmap (autograd's is_grads_batched) warns when it loops."""
    was = torch._C._functorch._is_vmap_fallback_enabled()
    was_legacy = torch._C._debug_only_are_vmap_fallback_warnings_enabled()
    torch._C._functorch._set_vmap_fallback_enabled(False)
    torch._C._debug_only_display_vmap_fallback_warnings(True)
    try:
        yield
    finally:
        torch._C._functorch._set_vmap_fallback_enabled(was)
        torch._C._debug_only_display_vmap_fallback_warnings(was_legacy)


def vmap_fallback(op: Any, k: int = 2) -> str | None:
    """None when a block of k probes runs batched through every op of `op.matmat`, else the message
    naming the first op that loops over the probes (a diagnostic for the batched path)."""
    V = torch.ones(k, op.dim, device=op.device)
    try:
        with no_vmap_fallback(), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            op.matmat(V)
    except RuntimeError as err:
        return str(err).splitlines()[0]
    loops = [str(w.message) for w in caught if "batching rule" in str(w.message)]
    return loops[0].split(". ")[0] if loops else None
