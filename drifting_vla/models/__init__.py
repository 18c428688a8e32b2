"""The Drifting-VLA network: encoders, fusion, DiT and action decoder (see docs/models.md)."""

from drifting_vla.models.drifting_vla import Condition, DriftingVLA, build_model, parameter_table
from drifting_vla.models.language_encoder import LANGUAGE_ENCODERS
from drifting_vla.models.vision_encoder import VISION_BACKBONES

__all__ = ["Condition", "DriftingVLA", "LANGUAGE_ENCODERS", "VISION_BACKBONES", "build_model", "parameter_table"]
