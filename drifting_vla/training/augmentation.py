"""Image augmentation of training batches, on the device (`training.augmentation`).

Random shift (DrQ; Diffusion Policy's random crop is the same idea): each camera's frame is
replicate-padded by `pad` pixels on every side, then cropped back to its size at a random offset,
so the image moves by up to `pad` pixels in each direction and the border repeats its edge pixels:

    one row, pad = 2:   frame           a b c d e
                        padded      a a a b c d e e e
                        offset 3          b c d e e      (offsets 0..4; 2 leaves it in place)

Off by default, on evidence: at the embedded budget (3000 steps, 64 px, fixed Meta-World cameras)
a 4-pixel shift cost drifting about 28 points on the quickstart suite and 12 on the multimodal one
(docs/benchmarks.md, "Image shift, positives, history, G and grouping"). With fixed cameras the absolute pixel position of a
handle or button is what the policy must read, and a shift makes it learn that invariance slowly;
longer runs, moving cameras or real robots are where DrQ and Diffusion Policy found it pays.

Only training batches are augmented: validation, the training panels and every inference path see
the frames as recorded. The offsets are drawn on the CPU from the training step's generator
(seeded by seed and step, like the objective's noise) for the GLOBAL batch and sliced per rank, so
a resumed run, and a run on any number of ranks, shifts exactly the images the uninterrupted
single-process run shifted.
"""

from __future__ import annotations

import torch


def shift_offsets(batch_size: int, num_cameras: int, pad: int, generator: torch.Generator) -> torch.Tensor:
    """Crop offsets int64 [B, V, 2] (rows, columns), uniform in 0..2*pad; drawn on the CPU."""
    return torch.randint(0, 2 * pad + 1, (batch_size, num_cameras, 2), generator=generator)


def random_shift(images: torch.Tensor, offsets: torch.Tensor, pad: int) -> torch.Tensor:
    """images uint8 [B, V, 3, H, W] or, with observation history, [B, n, V, 3, H, W]; offsets
    [B, V, 2] from `shift_offsets` -> the same shape and dtype, shifted.

    One offset per sample and camera, the same for every history step of that sample, so the
    motion between steps stays what the camera saw. Computed as two gathers of clamped indices,
    which equals padding and cropping without materializing the padded copy."""
    history = images if images.ndim == 6 else images.unsqueeze(1)  # [B, n, V, 3, H, W]
    h, w = history.shape[-2:]
    offsets = offsets.to(images.device)
    rows = (torch.arange(h, device=images.device) + offsets[..., :1] - pad).clamp(0, h - 1)  # [B, V, H]
    cols = (torch.arange(w, device=images.device) + offsets[..., 1:] - pad).clamp(0, w - 1)  # [B, V, W]
    shifted = history.gather(-2, rows[:, None, :, None, :, None].expand(history.shape))
    shifted = shifted.gather(-1, cols[:, None, :, None, None, :].expand(history.shape))
    return shifted if images.ndim == 6 else shifted.squeeze(1)
