"""What every pretrained, frozen encoder shares: no gradients, eval mode, inference-mode forward,
and a record of where its weights came from."""

from __future__ import annotations

import contextlib
import os

import torch
import torch.nn as nn


class FrozenModule(nn.Module):
    """Base for pretrained encoders that never train.

    Parameters get `requires_grad=False`, so they stay out of `trainable_parameters()` and the
    optimizer. `train()` on the parent policy must not switch a frozen backbone to training mode
    (dropout would change its features), so `train` always keeps it in eval.

    `weights_source` says where pretrained weights came from (set by `load_source`), None for
    random weights. Checkpoints and exports reference weights with a source by that source and a
    content hash instead of storing a second copy of hundreds of millions of parameters.
    """

    frozen = True
    weights_source: dict | None = None

    def freeze(self) -> None:
        for p in self.parameters():
            p.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> FrozenModule:
        return super().train(False)

    def load_source(self, cls, name_or_path: str, revision: str | None, config_key: str, source: str | None = None):
        """`cls.from_pretrained(name_or_path, revision=revision)`, remembering the source.

        config_key: the config section the encoder is built from (`model.vision`), so a loader can
        pin `<config_key>.revision`; source: how a person gets the weights, when that is not
        `name_or_path` (weights shipped in a package)."""
        model = load_pretrained(cls, name_or_path, f"{config_key}.name_or_path", revision)
        self.weights_source = {
            "config_key": config_key,
            "source": source or str(name_or_path),
            "revision": resolved_revision(name_or_path, revision),
        }
        return model


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


def load_pretrained(cls, name_or_path: str, config_key: str, revision: str | None = None):
    """`cls.from_pretrained(name_or_path)`, with an error that says how to run offline."""
    try:
        return cls.from_pretrained(name_or_path, revision=revision)
    except OSError as err:
        at = "" if revision is None else f" at revision {revision!r}"
        raise OSError(
            f"could not load {cls.__name__} weights from {name_or_path!r}{at} ({err}). Offline, point "
            f"{config_key} at a local directory saved with save_pretrained, or set "
            f"model.pretrained=false for random weights."
        ) from err


def resolved_revision(name_or_path: str, revision: str | None) -> str | None:
    """The commit a hub id resolved to, read from the local hub cache (no network), so a
    checkpoint pins the exact weights even when the config said `main` or nothing. None for a
    local directory, which has no revision."""
    if os.path.isdir(name_or_path):
        return None
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(str(name_or_path), "config.json", revision=revision)
    if isinstance(cached, str):  # <cache>/models--org--name/snapshots/<commit>/config.json
        return os.path.basename(os.path.dirname(cached))
    return revision
