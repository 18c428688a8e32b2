"""AdamW over the trainable parameters, with weight-decay groups and a warmup + cosine schedule.

Weight decay pulls weights toward zero. That regularizes matrices, but on biases, normalization
gains and embeddings it only shifts or shrinks what the layer is meant to represent, so those get
no decay (the usual practice of DiT / nanoGPT). Frozen parameters (pretrained encoders) are left out
entirely: AdamW would otherwise allocate two state tensors for each of them.

Learning-rate multiplier over optimizer steps (0-based):

    1.0 |      ________
        |     /        ``--..
        |    /               `-.
        |   /                   `-._ min_lr_ratio
    0.0 |__/________________________`---
        0  warmup_steps            max_steps
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

_NO_DECAY_MODULES = (
    nn.Embedding,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.RMSNorm,
    nn.modules.batchnorm._BatchNorm,
    nn.modules.instancenorm._InstanceNorm,
)
_NO_DECAY_NAME_ENDINGS = ("pos_embed", "pos_embedding", "cls_token", "mask_token")
_FUSED_DEVICE_TYPES = ("cuda", "cpu")


@dataclass(frozen=True)
class OptimizerConfig:
    """`training.*` keys that shape the optimizer and the schedule."""

    learning_rate: float = 1e-4
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    warmup_steps: int = 1000
    max_steps: int = 100_000
    min_lr_ratio: float = 0.0

    def __post_init__(self) -> None:
        if self.max_steps <= 0:
            raise ValueError(f"training.max_steps must be positive, got {self.max_steps}")
        if not 0 <= self.warmup_steps <= self.max_steps:
            raise ValueError(
                f"training.warmup_steps must be in [0, max_steps={self.max_steps}], "
                f"got {self.warmup_steps}"
            )
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"training.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")


def _takes_no_decay(name: str, parameter: nn.Parameter, owner: nn.Module) -> bool:
    """Biases, norm gains, embeddings and learned tokens: parameters decay would distort."""
    return (
        parameter.ndim < 2
        or isinstance(owner, _NO_DECAY_MODULES)
        or name.endswith(_NO_DECAY_NAME_ENDINGS)
    )


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups over the trainable parameters: `[{decay}, {no decay}]` (empty ones dropped)."""
    decay, no_decay = [], []
    for module_name, module in model.named_modules():
        for parameter_name, parameter in module.named_parameters(recurse=False):
            if not parameter.requires_grad:
                continue
            full_name = f"{module_name}.{parameter_name}" if module_name else parameter_name
            bucket = no_decay if _takes_no_decay(full_name, parameter, module) else decay
            bucket.append(parameter)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def _fused_supported(parameters: list[nn.Parameter]) -> bool:
    """Fused AdamW needs floating-point parameters on one device type that has the fused kernel."""
    device_types = {p.device.type for p in parameters}
    return (
        len(device_types) == 1
        and device_types <= set(_FUSED_DEVICE_TYPES)
        and all(p.is_floating_point() for p in parameters)
    )


def build_optimizer(model: nn.Module, cfg: OptimizerConfig) -> torch.optim.AdamW:
    """AdamW over `model`'s trainable parameters; the fused kernel whenever the device supports it."""
    groups = parameter_groups(model, cfg.weight_decay)
    if not groups:
        raise ValueError("the model has no trainable parameters; nothing to optimize")
    parameters = [p for g in groups for p in g["params"]]
    return torch.optim.AdamW(
        groups,
        lr=cfg.learning_rate,
        betas=cfg.betas,
        eps=cfg.eps,
        fused=_fused_supported(parameters),
    )


def warmup_cosine(step: int, warmup_steps: int, max_steps: int, min_lr_ratio: float) -> float:
    """Learning-rate multiplier at optimizer step `step` (0-based): linear warmup, then cosine.

    Warmup starts at `1/warmup_steps` (never 0: the first step already learns) and reaches 1.0 at
    `step = warmup_steps - 1`; the cosine then decays to `min_lr_ratio` at `max_steps` and stays.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimizerConfig) -> LambdaLR:
    """Warmup + cosine as a `LambdaLR`; call `scheduler.step()` once per optimizer step."""
    multiplier = partial(
        warmup_cosine,
        warmup_steps=cfg.warmup_steps,
        max_steps=cfg.max_steps,
        min_lr_ratio=cfg.min_lr_ratio,
    )
    return LambdaLR(optimizer, multiplier)
