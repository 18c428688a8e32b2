"""The names `lerobot.datasets.transforms` imports at module level; LeRobot's image augmentations
(`dataset.image_transforms.enable=true`) need the real torchvision."""

import types

import torch


class Transform(torch.nn.Module):
    def __init__(self, *args, **kwargs) -> None:
        raise RuntimeError("image augmentations need the real torchvision; the plugin's test stand-in has none")


def _unavailable(name):
    def call(*args, **kwargs):
        raise RuntimeError(f"torchvision.transforms.v2.{name} needs the real torchvision")

    return call


functional = types.SimpleNamespace(adjust_sharpness=_unavailable("functional.adjust_sharpness"))


def __getattr__(name):
    return _unavailable(name)
