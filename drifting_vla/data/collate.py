"""Batching of sample dicts (see `drifting_vla.specs`): tensors stacked along a new dim B,
strings kept as lists."""

from __future__ import annotations

import numpy as np
import torch


def collate_samples(samples: list[dict]) -> dict:
    """[{images [V,3,H,W], ...}] * B -> {images [B,V,3,H,W], ..., instruction: [str] * B}."""
    if not samples:
        raise ValueError("collate_samples got an empty list")
    batch = {}
    for key in samples[0]:
        values = [s[key] for s in samples]
        first = values[0]
        if isinstance(first, torch.Tensor):
            batch[key] = torch.stack(values)
        elif isinstance(first, np.ndarray):
            batch[key] = torch.from_numpy(np.stack(values))
        elif isinstance(first, (int, float, bool)):
            batch[key] = torch.tensor(values)
        else:
            batch[key] = list(values)
    return batch
