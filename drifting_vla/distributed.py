"""Process groups and model wrapping for `torchrun`: DDP by default, FSDP for the largest configs.

    training.distributed.strategy=ddp    every rank holds the whole model; gradients all-reduced
    training.distributed.strategy=fsdp   parameters, gradients and optimizer state sharded over
                                         the ranks (FSDP2 `fully_shard`): each DiT block is its own
                                         unit, the root holds the rest (encoders, fusion, decoder)

Either way each rank takes its slice of the global batch and the drift statistics are all-reduced,
so the trajectory does not depend on the strategy or the number of ranks.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

COLLECTIVE_TIMEOUT = timedelta(hours=3)


@dataclass
class DistributedContext:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(backend: str, device: str) -> DistributedContext:
    """torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; without them this is a single process."""
    cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    if cuda:
        torch.cuda.set_device(local_rank)
    if world_size > 1 and not dist.is_initialized():
        # Other ranks wait at a barrier while rank 0 runs the simulation evaluation (many minutes).
        dist.init_process_group(("nccl" if cuda else "gloo") if backend == "auto" else backend, timeout=COLLECTIVE_TIMEOUT)
    return DistributedContext(rank, world_size, torch.device(f"cuda:{local_rank}" if cuda else "cpu"))


def shard_model(model: nn.Module) -> None:
    """FSDP2 in place: one unit per DiT block, then the root. Build the optimizer and the EMA
    after this, from the sharded parameters."""
    from torch.distributed.fsdp import fully_shard

    for block in model.dit.blocks:
        fully_shard(block)
    fully_shard(model)


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """A small vector of statistics summed over all ranks (a copy; itself when not distributed)."""
    if dist.is_available() and dist.is_initialized():
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a sharded DTensor (collective: every rank calls it), else itself."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
