"""Neighbour positives: the expert chunks of the k training observations nearest to an observation.

With one expert chunk per observation, each drift problem has a single positive. Implicit Drifting
Policy (2026) adds the expert chunks of nearby observations: where demonstrations disagree near an
observation they are its other modes, where they agree more samples of its one mode. (The sample
queue, `sample_queue.py`, draws chunks of the same task at large instead.)

    index = NeighbourIndex(train_set, k=4, exclude_own_episode=True)       # once per run: ~13 s (docs/data.md)
    train = NeighbourPositives(train_set, index.neighbours(), index.chunks)
    val = NeighbourPositives(val_set, index.query(val_set), index.chunks)  # training neighbours
    train[i]["neighbour_actions"]                                          # [k, T, A], raw units

Only the training split is indexed, so a validation episode is never anyone's positive. The
candidates of an observation are the training observations of the same `task`, never itself and,
with `exclude_own_episode`, never of its own episode: those are its own chunk shifted by a step or
two, nothing new about what else an expert does there.

The observation descriptor, built once from the data alone:

    proprio [S]                              z-scored per dimension, then unit total variance
    images  [V, 3, H, W] -> [V * 3 * 8 * 8]  each camera average-pooled to 8 x 8 RGB, the same
    distance = L2 over both                  so the arm's state and the scene weigh alike

With an observation history (`data.n_obs_steps` = n > 1) the descriptor is the whole window the
policy conditions on, the n steps' proprio [n * S] and thumbnails [n * V * 3 * 8 * 8] side by side:
neighbours then also move alike, and n = 1 is the descriptor above.

Why these and not the network's fused condition: frozen inputs give a fixed index, built once,
the same after a resume; the condition is random at step 0, changes every step, and refreshing it
costs a pass of the network over the whole dataset. The instruction is left out: candidates share
the task already, and where a task's variations differ (RLBench's colours) the thumbnails see it.
Why both parts: the arm's state does not see where the objects
are; coarse thumbnails see the arm poorly. Measured on the default Meta-World data (18,140 training
samples; k = 4, own episode excluded), the mean L2 between an observation's expert chunk and its
neighbours' (normalized actions, 64 numbers a chunk): proprio + images 0.70, images alone 0.76,
proprio alone 0.93; random chunks of the same task, what the queue holds, 4.87.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from drifting_vla.data.interface import DemoDataset, HasEpisodes

THUMBNAIL_SIZE = 8
"""Side of each camera's pooled thumbnail. On the default Meta-World data (module docstring), 16
finds neighbours barely closer (0.687 against 0.695) with 4x the numbers; 4 finds 0.705."""

READ_BLOCK = 256
"""Items read, then pooled, at once."""

QUERY_BLOCK = 1024
"""Observations whose distances are computed at once: memory stays QUERY_BLOCK x (samples of one
task) doubles, whatever the dataset's size."""


@dataclass
class Observations:
    """One pass over a dataset, in index order: proprio [N, S] and thumbnails [N, V*3*8*8]
    ([N, n*S] and [N, n*V*3*8*8] with an observation history; float64, unscaled), the task of
    every sample, and the expert chunks [N, T, A] (raw units)."""

    proprio: Tensor
    thumbnails: Tensor
    tasks: np.ndarray
    chunks: Tensor


def read_observations(dataset: DemoDataset) -> Observations:
    """Every item of `dataset` once, indexed by plain ints (a dataset's random choices, such as
    RLBench's instruction phrasing, are then fixed and play no part here anyway). Images are
    pooled a block of items at a time: one call per item costs ~30x more."""
    proprio, thumbnails, tasks, chunks = [], [], [], []
    for start in range(0, len(dataset), READ_BLOCK):
        items = [dataset[i] for i in range(start, min(start + READ_BLOCK, len(dataset)))]
        images = torch.stack([item["images"] for item in items]).flatten(0, -4).float()  # frames; exact sums of uint8
        thumbnails.append(F.adaptive_avg_pool2d(images, THUMBNAIL_SIZE).reshape(len(items), -1))
        proprio += [item["proprio"].reshape(-1) for item in items]
        tasks += [item["task"] for item in items]
        chunks += [item["actions"] for item in items]
    return Observations(torch.stack(proprio).double(), torch.cat(thumbnails).double(), np.array(tasks), torch.stack(chunks).float())


class _UnitVariance:
    """z-scores a block of features with the training split's statistics, then divides by the
    square root of its number of varying features, so the block's total variance is 1. A feature
    constant over the training split (a pixel nothing ever covers) is dropped: it tells no
    training observation from another."""

    def __init__(self, block: Tensor) -> None:
        std = block.std(0, unbiased=False)
        varying = std > 1e-9
        self.mean = block.mean(0)
        self.scale = torch.where(varying, 1.0 / std.where(varying, 1.0), 0.0) / math.sqrt(max(int(varying.sum()), 1))

    def __call__(self, block: Tensor) -> Tensor:
        return (block - self.mean) * self.scale


class NeighbourIndex:
    """The training split's observations as descriptors, with their expert chunks (`chunks`,
    [N, T, A] raw units, what neighbour indices point into)."""

    def __init__(self, train_set: DemoDataset, k: int, exclude_own_episode: bool = True) -> None:
        observations = read_observations(train_set)
        self.k = int(k)
        self.tasks, self.chunks = observations.tasks, observations.chunks
        self._scales = (_UnitVariance(observations.proprio), _UnitVariance(observations.thumbnails))
        self.embeddings = self._embed(observations)
        # Left out of an observation's candidates: its own group, i.e. its episode or itself alone.
        self._groups = torch.from_numpy(_episode_ids(train_set)) if exclude_own_episode else torch.arange(len(train_set))

    def _embed(self, observations: Observations) -> Tensor:
        proprio, images = self._scales
        return torch.cat([proprio(observations.proprio), images(observations.thumbnails)], dim=1)

    def neighbours(self) -> Tensor:
        """[N, k] indices of each training observation's neighbours, nearest first."""
        return nearest_neighbours(self.embeddings, self.tasks, self.embeddings, self.tasks, self.k, self._groups, self._groups)

    def query(self, dataset: DemoDataset) -> Tensor:
        """[M, k] indices of the training neighbours of another split's observations (validation)."""
        observations = read_observations(dataset)
        return nearest_neighbours(self._embed(observations), observations.tasks, self.embeddings, self.tasks, self.k)


def nearest_neighbours(
    queries: Tensor,
    query_tasks: np.ndarray,
    keys: Tensor,
    key_tasks: np.ndarray,
    k: int,
    query_groups: Tensor | None = None,
    key_groups: Tensor | None = None,
) -> Tensor:
    """For queries [M, F], the k keys [N, F] nearest in L2 among those of the query's task, leaving
    out keys of the query's own group (if groups are given): [M, k] key indices, nearest first."""
    query_tasks, key_tasks = np.asarray(query_tasks), np.asarray(key_tasks)
    found = torch.empty(len(queries), k, dtype=torch.long)
    for task in np.unique(query_tasks):
        rows = torch.from_numpy(np.flatnonzero(query_tasks == task))
        candidates = torch.from_numpy(np.flatnonzero(key_tasks == task))
        for block in rows.split(QUERY_BLOCK):
            distances = torch.cdist(queries[block], keys[candidates])
            fewest = len(candidates)
            if query_groups is not None:
                excluded = query_groups[block, None] == key_groups[None, candidates]
                distances[excluded] = math.inf
                fewest -= int(excluded.sum(1).max())
            if fewest < k:
                raise ValueError(
                    f"neighbour positives: an observation of task {str(task)!r} has {fewest} candidate training "
                    f"observations, fewer than k={k}; lower training.drifting.positives.k, set "
                    "training.drifting.positives.exclude_own_episode=false, or add demonstrations"
                )
            found[block] = candidates[distances.topk(k, dim=1, largest=False).indices]
    return found


def _episode_ids(dataset: DemoDataset) -> np.ndarray:
    if not isinstance(dataset, HasEpisodes):
        raise ValueError(
            f"{type(dataset).__name__} has no episode_ids(), so neighbour positives cannot leave an observation's "
            "own episode out: add the method, or set training.drifting.positives.exclude_own_episode=false"
        )
    return np.asarray(dataset.episode_ids(), dtype=np.int64)


class NeighbourPositives(Dataset):
    """The wrapped dataset's items plus `neighbour_actions` [k, T, A]: the expert chunks (raw
    units) of item i's neighbours, `chunks[neighbours[i]]`. A `SampleKey` index is passed on
    as it is, so the wrapped dataset's random choices are those of the unwrapped one."""

    def __init__(self, dataset: DemoDataset, neighbours: Tensor, chunks: Tensor) -> None:
        if len(neighbours) != len(dataset):
            raise ValueError(f"{len(neighbours)} rows of neighbours for a dataset of {len(dataset)} samples")
        self.dataset, self.neighbours, self.chunks = dataset, neighbours, chunks

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict:
        return {**self.dataset[i], "neighbour_actions": self.chunks[self.neighbours[int(i)]]}

    def __getattr__(self, name: str):
        """all_actions(), all_proprio(), episode_ids(), ...: the wrapped dataset's."""
        if name in ("dataset", "neighbours", "chunks"):
            raise AttributeError(name)
        return getattr(self.dataset, name)
