"""A batch sampler whose position can be saved and restored, and whose global batch is the same
whatever the number of ranks.

    epoch e: permutation of all samples, seeded by (seed, e)
    global batch k = permutation[k*B*W : (k+1)*B*W]      (B per rank, W ranks; the tail is dropped)
    rank r gets    global batch k [r*B : (r+1)*B]

So a 2-rank run sees exactly the batches a 1-rank run with batch 2B sees, and a resumed run
continues with the batch the killed run would have taken next.

Every index it yields is a `SampleKey`: the sample's index (an int) carrying the draw of its epoch,
and a dataset that makes a random choice for a sample (RLBench's instruction phrasing) takes it
from `sample_rng(key)`. A choice is then a function of (seed, epoch, index) alone: the same in any
rank, any loader worker, and after a resume, where each worker's own RNG stream would differ.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import Sampler


class SampleKey(int):
    """A dataset index that also carries `draw`, the (seed, epoch) its random choices come from."""

    draw: int

    def __new__(cls, index: int, draw: int) -> SampleKey:
        key = super().__new__(cls, index)
        key.draw = draw
        return key

    def __reduce__(self):  # pickled to loader workers with its draw
        return SampleKey, (int(self), self.draw)


def sample_rng(index: int) -> np.random.Generator:
    """The random generator of one sample: from its `SampleKey`'s (draw, index), or from the
    index alone when indexed by hand (the same choice every time)."""
    return np.random.default_rng([getattr(index, "draw", 0), int(index)])


class ResumableBatchSampler(Sampler[list[int]]):
    def __init__(self, dataset_size: int, batch_size: int, *, seed: int, rank: int = 0, world_size: int = 1) -> None:
        if dataset_size < batch_size * world_size:
            raise ValueError(
                f"the dataset has {dataset_size} samples, fewer than one global batch "
                f"({batch_size} per rank x {world_size} ranks); lower training.batch_size or add data"
            )
        self.dataset_size, self.batch_size = dataset_size, batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.epoch, self.batch_in_epoch = 0, 0

    def __len__(self) -> int:
        return self.dataset_size // (self.batch_size * self.world_size)

    def __iter__(self) -> Iterator[list[int]]:
        """Endless: epoch after epoch, from the saved position."""
        while True:
            draw = self.seed * 100_003 + self.epoch
            order = torch.randperm(self.dataset_size, generator=torch.Generator().manual_seed(draw))
            global_size = self.batch_size * self.world_size
            while self.batch_in_epoch < len(self):
                start = self.batch_in_epoch * global_size + self.rank * self.batch_size
                self.batch_in_epoch += 1
                yield [SampleKey(i, draw) for i in order[start : start + self.batch_size].tolist()]
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0

    def state_dict(self) -> dict:
        """The position of the next batch the sampler will yield. A DataLoader with workers
        prefetches ahead of what training consumed: use `state_after` for checkpoints."""
        return {"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch}

    def state_after(self, start: dict, consumed: int) -> dict:
        """The position after `consumed` batches taken from position `start`."""
        total = int(start["epoch"]) * len(self) + int(start["batch_in_epoch"]) + consumed
        return {"epoch": total // len(self), "batch_in_epoch": total % len(self)}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.batch_in_epoch = int(state["epoch"]), int(state["batch_in_epoch"])
