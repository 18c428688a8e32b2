"""Action decoder: DiT features -> an action chunk laid out by the dataset's ActionSpec.

    features [B, G, T, D] --one MLP head per component--> outputs [B, G, T, A'] (normalized space,
                                                          A' = action_spec.network_dim)
    outputs --activate--> actions, where the outputs stand for an action chunk

The heads are linear: a flow or diffusion objective reads them as a velocity or a noise estimate,
which no activation may bend. Where the output IS an action chunk (drifting, regression),
`activate` gives each component kind the output its kind means (`drifting_vla.specs.COMPONENT_KINDS`):

- position, raw: unbounded linear output (the normalizer maps these to roughly [-1, 1]).
- quaternion:    predicted as a 6D rotation (two rotation-matrix columns), made orthonormal by
                 Gram-Schmidt: continuous, where a sign-canonical quaternion jumps at qw = 0 (the
                 normalizer turns data quaternions into this form and back).
- gripper:       sigmoid, in [0, 1].
"""

from __future__ import annotations

import torch
import torch.nn as nn

from drifting_vla.models.dit import init_linear_layers
from drifting_vla.rotations import orthonormal_rotation6d
from drifting_vla.specs import ActionSpec

OUTPUT_ACTIVATIONS = {
    "position": lambda x: x,
    "raw": lambda x: x,
    "quaternion": orthonormal_rotation6d,
    "gripper": torch.sigmoid,
}
"""Component kind -> how a head's raw output becomes a valid action component."""


class ActionDecoder(nn.Module):
    def __init__(self, action_spec: ActionSpec, dim: int, hidden_size: int):
        super().__init__()
        self.action_spec = action_spec
        self.heads = nn.ModuleDict(
            {
                c.name: nn.Sequential(nn.Linear(dim, hidden_size), nn.SiLU(), nn.Linear(hidden_size, c.network_dim))
                for c in action_spec.components
            }
        )
        self.initialize_weights()

    def initialize_weights(self) -> None:
        init_linear_layers(self)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """features [..., D] -> head outputs [..., A'], components in the spec's order."""
        return torch.cat([self.heads[c.name](features) for c in self.action_spec.components], dim=-1)

    def activate(self, outputs: torch.Tensor) -> torch.Tensor:
        """outputs [..., A'] -> valid actions [..., A']: each component through its kind's activation."""
        parts = outputs.split([c.network_dim for c in self.action_spec.components], dim=-1)
        return torch.cat(
            [OUTPUT_ACTIVATIONS[c.kind](part) for c, part in zip(self.action_spec.components, parts, strict=True)],
            dim=-1,
        )
