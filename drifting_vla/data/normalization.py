"""Normalization statistics over the training split, applied on the device, saved with checkpoints.

    stats = compute_stats({"actions": dataset.all_actions(), "proprio": dataset.all_proprio()})
    normalizer = Normalizer.from_stats(stats, action_spec)      # an nn.Module: .to(device)
    a = normalizer.normalize("actions", batch["actions"])       # [..., A] -> [-1, 1] where scaled
    raw = normalizer.unnormalize("actions", a)
    ckpt["normalization"] = normalizer.to_dict()                # plain lists, JSON-safe
    normalizer = Normalizer.from_dict(ckpt["normalization"], action_spec, proprio_dim=4)

Actions are scaled per component kind (`drifting_vla.specs.COMPONENT_KINDS`): position and raw
components min/max to [-1, 1]; gripper components pass through unchanged (the open-closed
meaning); quaternions become the network's continuous 6D rotation (`drifting_vla.rotations`), so
normalized actions are `[..., action_spec.network_dim]` and `unnormalize` gives quaternions back
(unit, qw >= 0). Proprio is min/max scaled in full. A constant dimension (max == min) is only
centred, never divided by zero.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from drifting_vla.data.interface import DemoDataset, ShipsNormalizationStats
from drifting_vla.data.transforms import first_non_finite
from drifting_vla.rotations import quaternion_to_rotation6d, rotation6d_to_quaternion
from drifting_vla.specs import ActionSpec

STATS = ("mean", "std", "min", "max", "q01", "q99")
SCALED_KINDS = ("position", "raw")
_EPS = 1e-6


def compute_stats(arrays: dict[str, np.ndarray]) -> dict[str, dict[str, list[float]]]:
    """Per-dimension statistics of each `[N, D]` array: mean, std, min, max, 1% and 99% quantiles."""
    stats = {}
    for key, x in arrays.items():
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 2 or len(x) == 0:
            raise ValueError(f"normalization stats for {key!r} need a non-empty [N, D] array, got shape {x.shape}")
        row = first_non_finite(x)
        if row is not None:  # the datasets name the episode; a dataset of a plugin may not have
            raise ValueError(f"normalization stats for {key!r}: row {row} of the data is not finite ({x[row].tolist()})")
        q01, q99 = np.quantile(x, [0.01, 0.99], axis=0)
        stats[key] = {
            "mean": x.mean(0).tolist(),
            "std": x.std(0).tolist(),
            "min": x.min(0).tolist(),
            "max": x.max(0).tolist(),
            "q01": q01.tolist(),
            "q99": q99.tolist(),
        }
    return stats


def dataset_stats(dataset: DemoDataset) -> dict[str, dict[str, list[float]]]:
    """The statistics a dataset ships (`normalization_stats()`: LeRobot's meta/stats.json), else
    those of its `all_actions()` and `all_proprio()`."""
    if isinstance(dataset, ShipsNormalizationStats):
        return dataset.normalization_stats()
    return compute_stats({"actions": dataset.all_actions(), "proprio": dataset.all_proprio()})


class Normalizer(nn.Module):
    """y = (x - offset) * scale per dimension; identity where a component is not rescaled."""

    def __init__(self, stats: dict, action_spec: ActionSpec, proprio_dim: int | None = None) -> None:
        super().__init__()
        check_stats(stats, action_spec, proprio_dim)
        self.action_spec = action_spec
        self.stats = {k: {s: list(map(float, v[s])) for s in STATS} for k, v in stats.items()}
        scaled = np.zeros(action_spec.dim, dtype=bool)
        for comp, sl in zip(action_spec.components, action_spec.slices().values(), strict=True):
            scaled[sl] = comp.kind in SCALED_KINDS
        masks = {"actions": scaled, "proprio": np.ones(len(stats["proprio"]["min"]), dtype=bool)}
        for key, mask in masks.items():
            lo, hi = np.array(stats[key]["min"]), np.array(stats[key]["max"])
            centre, half = (hi + lo) / 2, (hi - lo) / 2
            offset = np.where(mask, centre, 0.0)
            scale = np.where(mask, 1.0 / np.where(half > _EPS, half, 1.0), 1.0)
            self.register_buffer(f"{key}_offset", torch.tensor(offset, dtype=torch.float32))
            self.register_buffer(f"{key}_scale", torch.tensor(scale, dtype=torch.float32))

    @classmethod
    def from_stats(cls, stats: dict, action_spec: ActionSpec, proprio_dim: int | None = None) -> Normalizer:
        return cls(stats, action_spec, proprio_dim)

    def normalize(self, key: str, x: torch.Tensor) -> torch.Tensor:
        """[..., D] raw -> normalized. key: "actions" ([..., A] -> [..., network_dim]) or "proprio"."""
        offset, scale = self._params(key, x)
        y = (x - offset) * scale
        if key != "actions":
            return y
        parts = y.split([c.dim for c in self.action_spec.components], dim=-1)
        return torch.cat([quaternion_to_rotation6d(p) if c.kind == "quaternion" else p
                          for c, p in zip(self.action_spec.components, parts, strict=True)], dim=-1)

    def unnormalize(self, key: str, x: torch.Tensor) -> torch.Tensor:
        if key == "actions":
            if x.shape[-1] != self.action_spec.network_dim:
                raise ValueError(f"Normalizer.unnormalize('actions'): last dim is {x.shape[-1]}, the network's "
                                 f"action dim is {self.action_spec.network_dim}")
            parts = x.split([c.network_dim for c in self.action_spec.components], dim=-1)
            x = torch.cat([rotation6d_to_quaternion(p) if c.kind == "quaternion" else p
                           for c, p in zip(self.action_spec.components, parts, strict=True)], dim=-1)
        offset, scale = self._params(key, x)
        return x / scale + offset

    def to_dict(self) -> dict:
        """Plain-Python form for checkpoints: the statistics and the action spec they belong to."""
        return {"stats": self.stats, "action_spec": self.action_spec.to_config()}

    @classmethod
    def from_dict(cls, data: dict, action_spec: ActionSpec, proprio_dim: int | None = None) -> Normalizer:
        """Rebuild from `to_dict()`, refusing statistics saved for another action layout."""
        saved = ActionSpec.from_config(data["action_spec"])
        if saved != action_spec:
            raise ValueError(
                f"normalization stats were computed for action spec {saved.to_config()} but the run uses "
                f"{action_spec.to_config()}; recompute the stats for this dataset"
            )
        return cls(data["stats"], action_spec, proprio_dim)

    def _params(self, key: str, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if key not in ("actions", "proprio"):
            raise KeyError(f"Normalizer has no statistics for {key!r}; it knows 'actions' and 'proprio'")
        offset, scale = getattr(self, f"{key}_offset"), getattr(self, f"{key}_scale")
        if x.shape[-1] != offset.shape[0]:
            raise ValueError(
                f"Normalizer[{key!r}]: last dim of the input is {x.shape[-1]} (shape {tuple(x.shape)}), "
                f"the statistics have {offset.shape[0]}"
            )
        return offset.to(x.dtype), scale.to(x.dtype)


def check_stats(stats: dict, action_spec: ActionSpec, proprio_dim: int | None = None) -> None:
    """Loud errors when statistics do not fit the action spec or the observation keys."""
    missing = [k for k in ("actions", "proprio") if k not in stats]
    if missing:
        raise ValueError(f"normalization stats lack key(s) {missing}; they have {sorted(stats)}")
    expected = {"actions": action_spec.dim, "proprio": proprio_dim}
    for key, dim in expected.items():
        absent = [s for s in STATS if s not in stats[key]]
        if absent:
            raise ValueError(f"normalization stats[{key!r}] lack {absent}; need {list(STATS)}")
        for s in STATS:
            actual = len(stats[key][s])
            if dim is not None and actual != dim:
                raise ValueError(
                    f"normalization stats[{key!r}][{s!r}] has {actual} dims, expected {dim} "
                    f"({'action spec ' + str(action_spec.names) if key == 'actions' else 'data.proprio_dim'})"
                )
            # A NaN or an infinity here becomes every action the policy outputs (min/max scaling).
            try:
                finite = np.isfinite(np.asarray(stats[key][s], dtype=np.float64)).all()
            except (TypeError, ValueError):
                finite = False
            if not finite:
                raise ValueError(f"normalization stats[{key!r}][{s!r}] are not all finite numbers: {stats[key][s]}")
