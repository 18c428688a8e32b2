"""What the training loop reads of a dataset, declared as protocols rather than found by probing.

A dataset builder (`register_dataset`, drifting_vla/data/registry.py) returns a `DemoDataset`:
indexable sample dicts (drifting_vla/specs.py) plus the whole-dataset views the trainer needs
before the first batch (normalization statistics, the instruction vocabulary). A dataset may also
offer the optional capabilities below; the code that uses one checks for it with `isinstance`, and
the wrappers (skip_corrupt.py, neighbours.py, training/feature_cache.py) pass each through from the
dataset they wrap.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class DemoDataset(Protocol):
    """Demonstrations cut into training samples."""

    def __len__(self) -> int: ...

    def __getitem__(self, index) -> dict:
        """One sample dict: images [n_obs, V, 3, H, W] uint8, proprio [n_obs, P], actions [T, A],
        action_mask [T], instruction, task (drifting_vla/specs.py). `index` is an int or a
        `SampleKey` (drifting_vla/data/sampler.py) whose draw seeds the sample's random choices."""
        ...

    def all_actions(self) -> np.ndarray:
        """[N, A]: every action the samples are cut from, raw units (normalization statistics)."""
        ...

    def all_proprio(self) -> np.ndarray:
        """[N, P]: every proprio vector, raw units (normalization statistics)."""
        ...

    def all_instructions(self) -> list[str]:
        """Every instruction a sample can carry: the vocabulary of learned task embeddings."""
        ...


@runtime_checkable
class HasEpisodes(Protocol):
    """Samples know their episode, so neighbour positives can leave an observation's own out."""

    def episode_ids(self) -> np.ndarray:
        """[len(dataset)] int: the episode each sample is cut from."""
        ...


@runtime_checkable
class ShipsNormalizationStats(Protocol):
    """The dataset carries its statistics (LeRobot's meta/stats.json), used instead of recomputing them."""

    def normalization_stats(self) -> dict[str, dict[str, list[float]]]:
        """{"actions" | "proprio": {"mean", "std", "min", "max", "q01", "q99": per-dimension lists}}."""
        ...


@runtime_checkable
class RecordsSimulator(Protocol):
    """The dataset records the simulator its demonstrations came from (`data.simulator=auto`)."""

    def simulator(self) -> dict | None:
        """A registered simulator's data config, or None when the dataset names none."""
        ...
