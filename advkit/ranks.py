"""The processes of one `torchrun` job: who computes what, and who writes.

Outside torchrun (no process group) there is one process: rank 0 of 1, every helper is the
identity and nothing is communicated, so the single-process path is exactly what it was.
Inside (`init` makes the group: NCCL when the ranks use GPUs, gloo on CPUs) work is shared in
**rounds** (`in_rounds`): round k hands item k * world + r to rank r, and every rank receives
every result of the round (`all_gather_object`), in item order. Rank 0 is the **one writer**: it
writes after each round, atomically, what one process would have written after those items; a
killed job leaves only complete rounds on disk and resumes from them, with any number of ranks.
An exception on one rank is raised on every rank (no rank waits for a result that never comes).
Before computing, the ranks check that they agree on what they compute (`agree`): ranks started
with other settings raise, on every rank, before any file is touched.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")
R = TypeVar("R")


def active() -> bool:
    """Whether a process group is running (this process is one rank of several, or of one)."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank (0 outside torchrun)."""
    return dist.get_rank() if active() else 0


def world_size() -> int:
    """The number of processes sharing the work (1 outside torchrun)."""
    return dist.get_world_size() if active() else 1


def is_writer() -> bool:
    """Whether this process writes the shared files: rank 0, the one writer."""
    return rank() == 0


def launched() -> bool:
    """Whether torchrun (or another launcher that sets WORLD_SIZE) started this process as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(cuda: bool, timeout_s: float = 1800.0) -> None:
    """Start the process group of a torchrun job (env:// rendezvous: RANK, WORLD_SIZE,
    LOCAL_RANK, MASTER_ADDR/PORT): NCCL with `cuda` (each rank on cuda:LOCAL_RANK), else gloo.
    Nothing happens outside torchrun or when a group is already running."""
    if active() or not launched():
        return
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=timeout_s))


def finish(wait: bool = True) -> None:
    """End the process group (if one is running), after every rank gets here when `wait`."""
    if active():
        if wait:
            dist.barrier()
        dist.destroy_process_group()


def device(dev: torch.device | str) -> torch.device:
    """The device this rank computes on: cuda:LOCAL_RANK for a CUDA device inside torchrun,
    `dev` itself otherwise."""
    dev = torch.device(dev)
    if dev.type == "cuda" and active():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return dev


def barrier() -> None:
    """Wait until every rank gets here (e.g. until the writer's file is complete); no-op alone."""
    if world_size() > 1:
        dist.barrier()


def broadcast(value: T) -> T:
    """Rank 0's `value` on every rank (a decision all ranks must share); `value` itself alone."""
    if world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(value: T) -> list[T]:
    """Every rank's `value`, in rank order, on every rank; [value] alone."""
    if world_size() == 1:
        return [value]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, value)
    return out


def agree(what: str, values: Mapping[str, Any]) -> None:
    """Raise on every rank, naming the differing entries, unless every rank holds rank 0's
    `values` (e.g. a surface's settings and cache key): ranks started with other parameters
    would otherwise compute parts of different results into one file. Nothing happens alone."""
    if world_size() == 1:
        return
    every = gather(dict(values))  # not a broadcast: rank 0 too must learn that another rank differs
    shown = lambda d, k: repr(d[k]) if k in d else "nothing"  # noqa: E731 (repr: exact floats, NaN equal to NaN)
    differing = [f"rank {r} has {k}={shown(mine, k)} where rank 0 has {shown(every[0], k)}"
                 for r, mine in enumerate(every) for k in sorted(set(mine) | set(every[0]), key=str)
                 if shown(mine, k) != shown(every[0], k)]
    if differing:
        raise RanksDisagree(f"the ranks disagree on the {what}: {'; '.join(differing)}. Start every rank with "
                            "the same command, parameters and files (none of it is computed or written)")


class RanksDisagree(ValueError):
    """The ranks of one job were given different settings (see `agree`)."""


class RankFailed(RuntimeError):
    """Another rank raised while computing its share of a round."""


def in_rounds(items: Sequence[T], compute: Callable[[T], R]) -> Iterator[list[tuple[T, R]]]:
    """Yield, round after round, [(item, compute(item))] for the next `world_size()` items: rank r
    computes the round's r-th item, every rank receives all of them, in item order. Alone, each
    round is one item computed here. An exception on any rank is raised on every rank."""
    w, r = world_size(), rank()
    for start in range(0, len(items), w):
        part = items[start:start + w]
        error: Exception | None = None
        result: Any = None
        if r < len(part):
            try:
                result = compute(part[r])
            except Exception as err:  # noqa: BLE001 - re-raised below, after telling the others
                if w == 1:
                    raise
                error = err
        shared = gather(("error", f"{type(error).__name__}: {error}") if error is not None else ("ok", result))
        if error is not None:
            raise error
        failed = [(i, text) for i, (status, text) in enumerate(shared) if status == "error"]
        if failed:
            i, text = failed[0]
            raise RankFailed(f"rank {i} failed on {part[i]!r}: {text}")
        yield [(item, value) for item, (_, value) in zip(part, shared)]
