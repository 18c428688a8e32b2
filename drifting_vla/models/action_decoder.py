"""Action decoder: DiT features -> an action chunk laid out by the dataset's ActionSpec.

    features [B, G, T, D] --one MLP head per component--> outputs [B, G, T, A] (normalized space)
    outputs --activate--> actions, where the outputs stand for an action chunk

The heads are linear: a flow or diffusion objective reads them as a velocity or a noise estimate,
which no activation may bend. Where the output IS an action chunk (drifting, regression),
`activate` gives each component kind the output its kind means (`drifting_vla.specs.COMPONENT_KINDS`):

- position, raw: unbounded linear output (the normalizer maps these to roughly [-1, 1]).
- quaternion:    unit length and sign-canonical (qw >= 0), since q and -q are the same rotation and
                 the generator should not have to pick between two targets.
- gripper:       sigmoid, in [0, 1].
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from drifting_vla.models.dit import init_linear_layers
from drifting_vla.specs import ActionSpec


def canonical_quaternion(q: torch.Tensor) -> torch.Tensor:
    """[..., 4] as [qx, qy, qz, qw] -> unit length with qw >= 0."""
    q = F.normalize(q, dim=-1, eps=1e-8)
    return torch.where(q[..., 3:4] < 0, -q, q)


OUTPUT_ACTIVATIONS = {
    "position": lambda x: x,
    "raw": lambda x: x,
    "quaternion": canonical_quaternion,
    "gripper": torch.sigmoid,
}
"""Component kind -> how a head's raw output becomes a valid action component."""


class ActionDecoder(nn.Module):
    def __init__(self, action_spec: ActionSpec, dim: int, hidden_size: int):
        super().__init__()
        self.action_spec = action_spec
        self.heads = nn.ModuleDict(
            {
                c.name: nn.Sequential(nn.Linear(dim, hidden_size), nn.SiLU(), nn.Linear(hidden_size, c.dim))
                for c in action_spec.components
            }
        )
        self.initialize_weights()

    def initialize_weights(self) -> None:
        init_linear_layers(self)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """features [..., D] -> head outputs [..., A], components in the spec's order."""
        return torch.cat([self.heads[c.name](features) for c in self.action_spec.components], dim=-1)

    def activate(self, outputs: torch.Tensor) -> torch.Tensor:
        """outputs [..., A] -> valid actions [..., A]: each component through its kind's activation."""
        parts = outputs.split([c.dim for c in self.action_spec.components], dim=-1)
        return torch.cat(
            [OUTPUT_ACTIVATIONS[c.kind](part) for c, part in zip(self.action_spec.components, parts, strict=True)],
            dim=-1,
        )
