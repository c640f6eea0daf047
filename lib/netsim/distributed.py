"""Data-parallel scale-out over a `torch.distributed` process group.

Every rank makes the same call with the same inputs; each works on a contiguous shard of the
samples, partial sums meet in `all_reduce`, computed rows in `all_gather`, and every rank
returns the single-process result. Launch with `torchrun --nproc-per-node K script.py`
(one process per GPU or core set), or across machines with `--nnodes`.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor


def shard(n: int, group) -> slice:
    """This rank's contiguous share of n samples (the last ranks may get fewer, or none)."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    size = math.ceil(n / world)
    return slice(min(n, rank * size), min(n, (rank + 1) * size))


def all_reduce_(tensors: list[Tensor], group) -> None:
    """Sums each tensor across the ranks, in place."""
    for t in tensors:
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)


def gather_rows(local: Tensor, n: int, group) -> Tensor:
    """Concatenates every rank's `shard(n)` rows, in rank order: the full `(n, ...)` tensor."""
    world = dist.get_world_size(group)
    size = math.ceil(n / world)
    padded = torch.zeros((size, *local.shape[1:]), dtype=local.dtype, device=local.device)
    padded[:local.shape[0]] = local
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded, group=group)
    return torch.cat(parts)[:n]


def rank0_choice(choice: str, options: tuple[str, ...], group, device) -> str:
    """Rank 0's `choice` on every rank: a choice each rank makes by itself (`method="auto"`
    times the engines) must be the same everywhere, or the ranks' collectives would not match."""
    index = torch.tensor([options.index(choice)], device=device)
    dist.broadcast(index, src=dist.get_global_rank(group, 0), group=group)
    return options[int(index.item())]
