"""`training.precision` as one rule for every path that runs the network: training, validation, the
in-training rollouts and the loaded policy all autocast alike, so what is evaluated is what was
trained."""

from __future__ import annotations

import torch


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 for `bf16`, and for `auto` on CUDA; None (fp32, no autocast) otherwise."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None
