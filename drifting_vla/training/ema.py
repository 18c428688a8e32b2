"""Exponential moving average (EMA) of the generator's weights: what is evaluated and exported.

A one-step generator trained with the drifting loss moves a little along the field every step; the
EMA smooths that walk. Early in training the raw weights change fast and an EMA with decay 0.9999
would average mostly the random initialization, so the decay warms up:

    decay(step) = min(max_decay, (1 + step) / (10 + step))     # 0.1, 0.18, ... -> max_decay

Only trainable parameters are averaged. Frozen encoders (DINOv2, CLIP) never change, so the EMA
shares them with the model instead of holding a second copy of hundreds of millions of weights.
Buffers of trainable modules (e.g. running statistics) are copied, not averaged: they are already
averages, and integer counters cannot be averaged.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from drifting_vla.distributed import full_tensor


def ema_decay(step: int, max_decay: float) -> float:
    """The warmed-up decay at optimizer step `step` (0-based): `min(max_decay, (1+step)/(10+step))`."""
    return min(max_decay, (1.0 + step) / (10.0 + step))


def _tracked_buffer_names(model: nn.Module) -> list[str]:
    """Buffers whose owning module has trainable parameters; a frozen module's buffers are shared."""
    names = []
    for module_name, module in model.named_modules():
        if not any(p.requires_grad for p in module.parameters()):
            continue
        for buffer_name, _ in module.named_buffers(recurse=False):
            names.append(f"{module_name}.{buffer_name}" if module_name else buffer_name)
    return names


class EMA:
    """Shadow copies of `model`'s trainable parameters (averaged) and their modules' buffers (copied).

    Usage in a training loop:

        ema = EMA(model, max_decay=0.9999)
        ...
        optimizer.step()
        ema.update(model, step)
        with ema.applied_to(model):      # evaluate / export with the EMA weights
            evaluate(model)

    `state_dict()` uses the model's own parameter names, so `model.load_state_dict(ema.state_dict(),
    strict=False)` exports the EMA weights into a plain model.
    """

    def __init__(self, model: nn.Module, max_decay: float = 0.9999) -> None:
        if not 0.0 <= max_decay < 1.0:
            raise ValueError(f"EMA max_decay must be in [0, 1), got {max_decay}")
        self.max_decay = max_decay
        self._parameter_names = [n for n, p in model.named_parameters() if p.requires_grad]
        self._buffer_names = _tracked_buffer_names(model)
        if not self._parameter_names:
            raise ValueError(
                "EMA: the model has no trainable parameters; unfreeze the generator first"
            )
        parameters = dict(model.named_parameters())
        buffers = dict(model.named_buffers())
        self.shadow: dict[str, torch.Tensor] = {
            n: parameters[n].detach().clone() for n in self._parameter_names
        }
        self.shadow.update({n: buffers[n].detach().clone() for n in self._buffer_names})

    def _model_tensors(self, model: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The model's live (trainable parameters, tracked buffers), in the shadow's order."""
        parameters = dict(model.named_parameters())
        buffers = dict(model.named_buffers())
        live_parameters = [parameters[n] for n in self._parameter_names]
        return live_parameters, [buffers[n] for n in self._buffer_names]

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> float:
        """Move the shadow toward the model after optimizer step `step`; returns the decay used."""
        decay = ema_decay(step, self.max_decay)
        live_parameters, live_buffers = self._model_tensors(model)
        shadow_parameters = [self.shadow[n] for n in self._parameter_names]
        torch._foreach_lerp_(shadow_parameters, [p.detach() for p in live_parameters], 1.0 - decay)
        for name, buffer in zip(self._buffer_names, live_buffers, strict=True):
            self.shadow[name].copy_(buffer)
        return decay

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Overwrite the model's trainable parameters and tracked buffers with the EMA values."""
        live_parameters, live_buffers = self._model_tensors(model)
        names = self._parameter_names + self._buffer_names
        for name, tensor in zip(names, live_parameters + live_buffers, strict=True):
            tensor.copy_(self.shadow[name])

    @contextmanager
    def applied_to(self, model: nn.Module) -> Iterator[nn.Module]:
        """Temporarily put the EMA weights into `model` (for evaluation); the raw weights come back."""
        live_parameters, live_buffers = self._model_tensors(model)
        backup = [t.detach().clone() for t in live_parameters + live_buffers]
        self.copy_to(model)
        try:
            yield model
        finally:
            with torch.no_grad():
                for tensor, saved in zip(live_parameters + live_buffers, backup, strict=True):
                    tensor.copy_(saved)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The full shadow tensors by model name, on CPU (safetensors-ready). Under FSDP the
        shadow is sharded like the parameters and this all-gathers it: call on every rank."""
        return {name: full_tensor(tensor).detach().cpu() for name, tensor in self.shadow.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore the shadow; the names must be exactly the ones this EMA tracks."""
        missing = sorted(set(self.shadow) - set(state))
        unexpected = sorted(set(state) - set(self.shadow))
        if missing or unexpected:
            raise KeyError(
                f"EMA state does not match the model: missing {missing[:5]}, unexpected "
                f"{unexpected[:5]}. Was the checkpoint written for a model with the same "
                "architecture and the same frozen parts?"
            )
        with torch.no_grad():
            for name, tensor in self.shadow.items():
                tensor.copy_(_like(state[name], tensor))


def _like(full: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """`full` placed as `target` is: this rank's shard of a sharded (DTensor) target."""
    full = full.to(device=target.device, dtype=target.dtype)
    if isinstance(target, DTensor):
        return distribute_tensor(full, target.device_mesh, target.placements)
    return full
