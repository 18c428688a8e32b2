"""Contracts shared by data/, models/ and envs/: what an action chunk and a sample look like.

This module imports nothing of ours, so every layer can depend on it without depending on each
other (models/ knows nothing about files, data/ nothing about the network).

Sample dict (what a dataset item holds; collate stacks along a new batch dim B):

    images       uint8   [V, 3, H, W]   V cameras, in the order of the data config's `cameras`
    proprio      float32 [S]            proprioception (Meta-World: hand xyz + gripper opening)
    instruction  str                    one phrasing of the task's instruction
    actions      float32 [T, A]         the next T actions (or keyframes), raw units
    action_mask  bool    [T]            False for steps padded past the episode's end
    task         str                    task name, e.g. "reach-v3" or "close_jar"

With an observation history (`data.n_obs_steps` = n > 1) images are [n, V, 3, H, W] and proprio
[n, S]: the observations of steps t-n+1 .. t, oldest first, the episode's first one repeated
before its start; n = 1 is the layout above.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

COMPONENT_KINDS = ("position", "quaternion", "gripper", "raw")
"""How the action decoder and the normalizer treat a slice of the action vector:

- position:   Cartesian coordinates; min/max normalized to [-1, 1].
- quaternion: [qx, qy, qz, qw] in the data and at the env; the network predicts and learns it as
              a continuous 6D rotation (two rotation-matrix columns, `drifting_vla.rotations`),
              since q and -q are one rotation and any sign convention jumps somewhere. Never
              rescaled by the normalizer.
- gripper:    a binary state: the gripper open (1) / closed (0), or a flag such as RLBench's
              ignore_collisions; decoded in [0, 1] (a sigmoid), never rescaled, made 0 or 1 at a
              threshold of 0.5 where it is executed (the env's sanitization, temporal ensembling).
- raw:        any other continuous value (Meta-World's xyz deltas and gripper effort); min/max
              normalized to [-1, 1].
"""


NETWORK_DIMS = {"quaternion": 6}
"""Component kinds the network sees in another form than the data, and that form's size (the
normalizer converts between the two; every other kind keeps its dim)."""


def default_execute_steps(horizon: int) -> int:
    """Actions executed per chunk before replanning when none is set: a quarter of the horizon
    (4 of 16). Replanning that often beat Diffusion Policy's half (8 of 16) for drifting and
    regression alike, over 2 training seeds on both Meta-World suites (docs/benchmarks.md); every
    path that executes chunks (training's evaluation, the policy, the served client) uses this."""
    return max(1, horizon // 4)


@dataclass(frozen=True)
class ActionComponent:
    name: str
    kind: str
    dim: int

    @property
    def network_dim(self) -> int:
        return NETWORK_DIMS.get(self.kind, self.dim)

    def __post_init__(self) -> None:
        if self.kind not in COMPONENT_KINDS:
            raise ValueError(
                f"action component {self.name!r} has kind {self.kind!r}; "
                f"expected one of {COMPONENT_KINDS}"
            )
        if self.kind == "quaternion" and self.dim != 4:
            raise ValueError(f"action component {self.name!r}: a quaternion has dim 4, got {self.dim}")
        if self.dim < 1:
            raise ValueError(f"action component {self.name!r}: dim must be >= 1, got {self.dim}")


@dataclass(frozen=True)
class ActionSpec:
    """The layout of one action vector, read from the data config (`data.action_spec`)."""

    components: tuple[ActionComponent, ...]

    @property
    def dim(self) -> int:
        return sum(c.dim for c in self.components)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.components)

    @property
    def network_dim(self) -> int:
        """The size of an action as the network predicts it (normalized space, quaternions as 6D)."""
        return sum(c.network_dim for c in self.components)

    def slices(self) -> dict[str, slice]:
        """Where each component sits in the action vector, by name."""
        return _slices([(c.name, c.dim) for c in self.components])

    def network_slices(self) -> dict[str, slice]:
        """Where each component sits in the network's (normalized) action vector, by name."""
        return _slices([(c.name, c.network_dim) for c in self.components])

    def to_config(self) -> dict:
        return {"components": [{"name": c.name, "kind": c.kind, "dim": c.dim} for c in self.components]}

    @classmethod
    def from_config(cls, cfg: Mapping | Iterable) -> ActionSpec:
        """Build from `{"components": [{name, kind, dim}, ...]}` (a dict or an OmegaConf node)."""
        components = cfg["components"] if isinstance(cfg, Mapping) or hasattr(cfg, "keys") else cfg
        built = tuple(ActionComponent(str(c["name"]), str(c["kind"]), int(c["dim"])) for c in components)
        if not built:
            raise ValueError("action_spec has no components")
        names = [c.name for c in built]
        if len(set(names)) != len(names):
            raise ValueError(f"action_spec has duplicate component names: {names}")
        return cls(built)


def _slices(sizes: list[tuple[str, int]]) -> dict[str, slice]:
    out, start = {}, 0
    for name, dim in sizes:
        out[name] = slice(start, start + dim)
        start += dim
    return out


RLBENCH_ACTION_SPEC = ActionSpec(
    (
        ActionComponent("position", "position", 3),
        ActionComponent("rotation", "quaternion", 4),
        ActionComponent("gripper", "gripper", 1),
        ActionComponent("ignore_collisions", "gripper", 1),
    )
)
"""RLBench end-effector actions as PerAct learns them, `[x, y, z, qx, qy, qz, qw, gripper_open,
ignore_collisions]`: the motion planner may let the arm touch objects on its way to a keyframe
whose flag is 1 (a peg into a hole, a lid onto a jar), and the demonstrations record when."""

METAWORLD_ACTION_SPEC = ActionSpec(
    (
        ActionComponent("delta_position", "raw", 3),
        ActionComponent("gripper_effort", "raw", 1),
    )
)
"""Meta-World actions `[dx, dy, dz, gripper]`, each in [-1, 1]."""
