"""Drift statistics are global across data-parallel ranks: 2 gloo processes == 1 process on the whole batch."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from drifting_vla.objectives.losses import DriftingLoss
from tests.helpers import free_port


def _batch():
    g = torch.Generator().manual_seed(0)
    return torch.randn(8, 8, 4, 3, generator=g), torch.randn(8, 1, 4, 3, generator=g) + 1.0


def _rank_main(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        x, y = _batch()
        half = x.shape[0] // world
        shard = slice(rank * half, (rank + 1) * half)
        x_local = x[shard].clone().requires_grad_(True)
        out = DriftingLoss()(x_local, y[shard])
        out.loss.backward()
        torch.save(
            {"metrics": out.metrics, "field": out.field, "grad": x_local.grad},
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_match_one_process_on_the_concatenated_batch(tmp_path):
    mp.spawn(_rank_main, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]

    x, y = _batch()
    x = x.clone().requires_grad_(True)
    single = DriftingLoss()(x, y)
    single.loss.backward()

    for key, value in single.metrics.items():
        if key == "loss":
            continue  # the loss is a local mean; DDP averages the gradients instead
        for r in ranks:
            torch.testing.assert_close(r["metrics"][key], value, rtol=1e-5, atol=1e-7, msg=key)
    torch.testing.assert_close(torch.cat([r["field"] for r in ranks]), single.field, rtol=1e-5, atol=1e-6)
    # DDP averages gradients over 2 ranks, each a mean over half the batch: the same as one process.
    ddp_grad = torch.cat([r["grad"] for r in ranks]) / 2
    torch.testing.assert_close(ddp_grad, x.grad, rtol=1e-5, atol=1e-9)
