"""The interface every simulator implements, so rollouts and policies never depend on a simulator.

An observation is the sample dict of `drifting_vla.specs` without the action keys:

    images       uint8   [V, 3, H, W]   the configured cameras, in config order
    proprio      float32 [S]
    instruction  str
    task         str

so a policy sees in closed loop exactly what it saw in the demonstrations.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class StepResult:
    """What `step` returns: the next observation, the reward, whether the episode is over
    (success, or the step limit reached) and whether the task was solved."""

    observation: dict
    reward: float
    done: bool
    success: bool
    info: dict = field(default_factory=dict)


class BaseEnv(ABC):
    """One task of one simulator. Not thread-safe; one instance per process."""

    task: str
    instruction: str
    max_episode_steps: int
    end_effector: slice | None = None
    """Where the end-effector position (xyz) sits in `proprio`; None when proprio has none. The
    evaluation's trajectory videos draw the path of `proprio[end_effector]`, and only when it is set."""

    @classmethod
    def known_tasks(cls) -> Collection[str] | None:
        """The task names this simulator builds, checked before an evaluation starts, so a misspelt
        task fails at once instead of as every one of its episodes; None where the simulator cannot
        list them without starting (its episodes then fail, and are reported as errors)."""
        return None

    @abstractmethod
    def reset(self, seed: int) -> dict:
        """Start an episode whose initial state is a pure function of `seed`; return the observation."""

    @abstractmethod
    def step(self, action: np.ndarray) -> StepResult:
        """Apply one action (raw units of the dataset's action spec). The step's `info` may label the
        episode so far, and the evaluation records the labels with it: `mode` (str, the route it took),
        `stage` (int, the furthest stage of a staged reward reached) with `stage_names` (the names of
        stages 1, 2, ...), and `error` (str) when the simulator failed."""

    @abstractmethod
    def render(self) -> np.ndarray:
        """A frame for videos: uint8 [H, W, 3] (larger than the policy's images)."""

    @abstractmethod
    def close(self) -> None:
        """Free simulator resources (GL contexts, processes)."""

    def __enter__(self) -> BaseEnv:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class MujocoEnv(BaseEnv):
    """A MuJoCo simulator (`_env`) drawn offscreen by a renderer of the policy's images (`_renderer`)
    and one of video frames (`_video_renderer`, made on the first `render()`): each renderer holds
    a GL context on the simulator's model, so they are closed first, and once."""

    _env: Any
    _renderer: Any
    _video_renderer: Any

    def close(self) -> None:
        for renderer in (self._renderer, self._video_renderer):
            if renderer is not None:
                renderer.close()
        self._renderer = self._video_renderer = None
        if self._env is not None:
            self._env.close()
            self._env = None
