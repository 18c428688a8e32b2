"""The Drifting-VLA network: encoders, fusion, DiT and action decoder (see docs/models.md)."""

from drifting_vla.models.drifting_vla import Condition, DriftingVLA, build_model, parameter_table
from drifting_vla.models.registry import LANGUAGE_ENCODERS, VISION_BACKBONES, register_language_encoder, register_vision_encoder

__all__ = ["Condition", "DriftingVLA", "LANGUAGE_ENCODERS", "VISION_BACKBONES", "build_model", "parameter_table",
           "register_language_encoder", "register_vision_encoder"]
