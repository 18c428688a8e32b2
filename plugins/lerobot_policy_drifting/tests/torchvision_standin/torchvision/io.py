"""`VideoReader` as LeRobot 0.4.4's "pyav" backend uses it: `seek(seconds, keyframes_only=True)`,
then iteration over {"data": uint8 [3, H, W], "pts": seconds}, and `.container.close()`."""

from __future__ import annotations

import av
import numpy as np
import torch


class VideoReader:
    def __init__(self, path: str, stream: str = "video") -> None:
        if stream != "video":
            raise ValueError(f"the torchvision stand-in reads video streams only, not {stream!r}")
        self.container = av.open(str(path))
        self.stream = self.container.streams.video[0]

    def seek(self, seconds: float, keyframes_only: bool = True) -> VideoReader:
        """Like torchvision's pyav reader: to the keyframe at or before `seconds`."""
        del keyframes_only  # PyAV seeks to keyframes only; LeRobot asks for exactly that
        self.container.seek(int(seconds / self.stream.time_base), stream=self.stream, backward=True, any_frame=False)
        return self

    def __iter__(self):
        for frame in self.container.decode(self.stream):
            rgb = np.ascontiguousarray(frame.to_ndarray(format="rgb24").transpose(2, 0, 1))
            yield {"data": torch.from_numpy(rgb), "pts": float(frame.pts * self.stream.time_base)}
