"""A stand-in for the few torchvision names LeRobot 0.4.4 imports or calls on the paths the
plugin's tests use, for test environments without torchvision (PyPI's torchvision wheel is built
against CUDA torch and does not import beside a CPU torch; see docs/lerobot.md).

Only put on sys.path by the plugin's tests/conftest.py, and only where no real torchvision is
importable. What it provides, and what uses it in LeRobot 0.4.4:

- `io.VideoReader` (PyAV-backed) and `set_video_backend`: `datasets/video_utils.py`'s
  `decode_video_frames_torchvision`, LeRobot's "pyav" video backend, which seeks and iterates
  frames through torchvision's reader. LeRobot's own code still picks the frames and checks the
  timestamp tolerance.
- `transforms.ToTensor`: `datasets/utils.py` converts PNG image features with it.
- `transforms.v2.Transform` and `v2.functional`: imported by `datasets/transforms.py` for image
  augmentations, which the tests leave off (anything that calls them fails loudly).
"""

from torchvision import io, transforms

__version__ = "0.0.0+standin"


def set_video_backend(backend: str) -> None:
    if backend != "pyav":
        raise ValueError(f"the torchvision stand-in decodes with PyAV only, not {backend!r}")


__all__ = ["io", "set_video_backend", "transforms"]
