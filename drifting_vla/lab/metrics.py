"""How close a set of 2D samples is to the target: energy distance and modes covered."""

from __future__ import annotations

import torch
from torch import Tensor

from drifting_vla.lab.targets import Target


def energy_distance(x: Tensor, y: Tensor) -> float:
    """2 E|X - Y| - E|X - X'| - E|Y - Y'| (>= 0, zero iff the distributions are equal)."""
    return (2 * torch.cdist(x, y).mean() - torch.cdist(x, x).mean() - torch.cdist(y, y).mean()).item()


def modes_covered(x: Tensor, target: Target, min_share: float = 0.2) -> int:
    """A mode counts as covered when at least `min_share` of its fair share (1 / modes) of the
    samples lands within `mode_radius` of it. One sample near a mode is not coverage."""
    dist = torch.cdist(x, target.modes)
    nearest = dist.argmin(1)
    near = dist.min(1).values <= target.mode_radius
    counts = torch.bincount(nearest[near], minlength=len(target.modes))
    return int((counts >= min_share * len(x) / len(target.modes)).sum())
