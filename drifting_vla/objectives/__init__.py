"""The generative objectives on one network: each owns its training loss and the sampler the
policy draws chunks with (drifting: the field in drifting_field.py and DriftingLoss in losses.py;
regression, flow matching and diffusion as baselines), so what is evaluated is what was trained."""

from drifting_vla.objectives.methods import OBJECTIVES, Objective, ObjectiveOutput, build_objective

__all__ = ["OBJECTIVES", "Objective", "ObjectiveOutput", "build_objective"]
