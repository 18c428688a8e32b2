"""Generative objectives on one network: a new objective is one class in this registry.

Every objective sees the same thing, the policy network as a callable
`model(obs, num_samples, noise) -> [B, G, T, A]` and the expert chunk of each observation in
normalized units, and returns the loss plus what the panels show. The trainer never changes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from drifting_vla.data.sample_queue import SampleQueue
from drifting_vla.training.losses import DriftingLoss


@dataclass
class ObjectiveOutput:
    """loss: scalar. samples `[B, G, T, A]` (detached). field: where the objective moves each
    sample `[B, G, T, A]` (the drift V for drifting; the error for regression). metrics: 0-dim."""

    loss: Tensor
    samples: Tensor
    field: Tensor
    metrics: dict[str, Tensor]


class DriftingObjective:
    """G chunks per observation from G noise draws; one drift problem per observation with the
    expert chunk as positive (plus `extra_positives` chunks of the same task from a queue, which
    only training batches fill: validation runs without grad and leaves it alone)."""

    def __init__(self, cfg) -> None:
        d = cfg.drifting
        self.num_samples = int(cfg.num_samples)
        self.loss = DriftingLoss(
            tuple(d.temperatures), affinity_floor=float(d.affinity_floor), per_timestep=bool(d.per_timestep)
        )
        self.extra_positives = int(d.extra_positives)
        self.queue = SampleQueue(capacity_per_task=int(d.queue_size)) if self.extra_positives else None

    def __call__(self, model, obs: dict, actions: Tensor, noise: Tensor) -> ObjectiveOutput:
        samples = model(obs, self.num_samples, noise)
        positives = actions[:, None]
        if self.queue is not None:
            if torch.is_grad_enabled():
                # Chunks padded past an episode's end repeat its last action: a valid "hold" target.
                self.queue.push(list(obs["task"]), actions.detach())
            extra = self.queue.sample(list(obs["task"]), self.extra_positives).to(actions)
            positives = torch.cat([positives, extra], dim=1)
        out = self.loss(samples, positives)
        return ObjectiveOutput(out.loss, samples.detach(), out.field, out.metrics)


class RegressionObjective:
    """The simplest baseline: the same network with fixed zero noise, trained by MSE to the expert
    chunk, so the side-by-side shows what the generative objective buys."""

    num_samples = 1

    def __init__(self, cfg) -> None:
        del cfg

    def __call__(self, model, obs: dict, actions: Tensor, noise: Tensor) -> ObjectiveOutput:
        samples = model(obs, 1, torch.zeros_like(noise[:, :1]))
        error = actions[:, None] - samples
        mask = obs["action_mask"][:, None, :, None].to(error.dtype)
        loss = (error.square() * mask).sum() / (mask.sum() * error.shape[-1]).clamp_min(1)
        return ObjectiveOutput(loss, samples.detach(), error.detach(), {"loss": loss.detach()})


OBJECTIVES = {"drifting": DriftingObjective, "regression": RegressionObjective}


def build_objective(training_cfg):
    name = str(training_cfg.objective)
    if name not in OBJECTIVES:
        raise ValueError(f"training.objective={name!r} is unknown; choose from {sorted(OBJECTIVES)}")
    return OBJECTIVES[name](training_cfg)
