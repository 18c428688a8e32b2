"""`ToTensor` (PIL image -> float [3, H, W] in [0, 1]) and the `v2` names LeRobot imports."""

import numpy as np
import torch

from torchvision.transforms import v2


class ToTensor:
    def __call__(self, image) -> torch.Tensor:
        array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
        return torch.from_numpy(array.transpose(2, 0, 1).copy())


__all__ = ["ToTensor", "v2"]
