"""What every pretrained, frozen encoder shares: no gradients, eval mode, inference-mode forward."""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn


class FrozenModule(nn.Module):
    """Base for pretrained encoders that never train.

    Parameters get `requires_grad=False`, so they stay out of `trainable_parameters()` and the
    optimizer. `train()` on the parent policy must not switch a frozen backbone to training mode
    (dropout would change its features), so `train` always keeps it in eval.
    """

    frozen = True

    def freeze(self) -> None:
        for p in self.parameters():
            p.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> FrozenModule:
        return super().train(False)


@contextlib.contextmanager
def frozen_forward(device: torch.device):
    """Run a frozen encoder: no autograd bookkeeping at all, bf16 autocast on CUDA.

    Outputs are inference tensors; callers `.clone()` them outside this context before trainable
    layers use them, because inference tensors cannot be saved for backward.
    """
    with torch.inference_mode(), torch.autocast(
        device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"
    ):
        yield


def load_pretrained(cls, name_or_path: str, config_key: str):
    """`cls.from_pretrained(name_or_path)`, with an error that says how to run offline."""
    try:
        return cls.from_pretrained(name_or_path)
    except OSError as err:
        raise OSError(
            f"could not load {cls.__name__} weights from {name_or_path!r} ({err}). Offline, point "
            f"{config_key} at a local directory saved with save_pretrained, or set "
            f"model.pretrained=false for random weights."
        ) from err
