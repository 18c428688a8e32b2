"""Encode the dataset once with the frozen vision backbone (`training.feature_cache=true`).

The features live in memory for the run that computed them, from its own dataset and backbone;
nothing is written to disk, so no run can read features of another dataset or backbone.

With a frozen encoder and no image augmentation, every epoch recomputes the same backbone
features; caching them turns the most expensive part of a dit_b2 step into a table lookup. The
trainable camera embedding and everything after it still run every step.

Memory: samples x cameras x tokens x width x 2 bytes (bf16 on GPU; 4 bytes on CPU). RLBench 18 tasks with keyframes
(~18k samples), 4 cameras, DINOv2-L at 224 px (257 tokens x 1024): ~38 GB of host RAM; at 126 px
(82 tokens): ~12 GB. Lower `model.vision.input_size` or the camera count if that does not fit.
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from drifting_vla.data.collate import collate_samples
from drifting_vla.data.interface import DemoDataset


class CachedFeatures(Dataset):
    """The wrapped dataset's items plus `vision_features` [V, N, D] ([n, V, N, D] with an
    observation history) at the same index."""

    def __init__(self, dataset: DemoDataset, features: torch.Tensor) -> None:
        if len(features) != len(dataset):
            raise ValueError(f"{len(features)} cached feature rows for a dataset of {len(dataset)} samples")
        self.dataset, self.features = dataset, features

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict:
        return {**self.dataset[i], "vision_features": self.features[i]}

    def __getattr__(self, name: str):
        """all_actions(), all_proprio(), all_instructions(): the wrapped dataset's."""
        if name in ("dataset", "features"):
            raise AttributeError(name)
        return getattr(self.dataset, name)


@torch.no_grad()
def cache_vision_features(dataset: DemoDataset, vision_encoder, device: torch.device, batch_size: int = 64) -> CachedFeatures:
    """Run the frozen backbone over every sample once, in order; refuse a trainable backbone.

    Kept in bf16 on GPU (half the memory; a bf16 run rounds to about that precision anyway) and
    in fp32 on CPU, where a cached run trains exactly like an uncached one (tested)."""
    backbone = vision_encoder.backbone
    if any(p.requires_grad for p in backbone.parameters()):
        raise ValueError(
            f"training.feature_cache=true needs a frozen vision backbone (model.vision.name=dinov2); "
            f"{type(backbone).__name__} is trained, so its features change every step"
        )
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_samples)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows = []
    # Reading items draws random instruction phrasings; the run's own draws must not shift.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        for batch in tqdm(loader, desc="caching vision features", unit="batch", dynamic_ncols=True):
            images = batch["images"].to(device)  # [B, (n,) V, 3, H, W]
            rows.append(backbone(images.flatten(0, -4)).unflatten(0, images.shape[:-3]).to(dtype).cpu())
    return CachedFeatures(dataset, torch.cat(rows))
