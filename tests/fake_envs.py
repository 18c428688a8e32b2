"""Test-only simulators, importable by spawned rollout workers as `tests.fake_envs:<Class>`.

`ScriptedEnv` decides each episode's fate from its seed, so a rollout test can mix outcomes:

    seed % 4 == 0   success at step 3
    seed % 4 == 1   the simulator raises at step 2 (like InvalidActionError)
    seed % 4 == 2   the worker process dies at step 2 (like a segfaulting simulator)
    seed % 4 == 3   never succeeds: runs to max_episode_steps
"""

from __future__ import annotations

import os

import numpy as np

from drifting_vla.envs.base_env import BaseEnv, StepResult


class ScriptedEnv(BaseEnv):
    def __init__(self, task: str, instruction: str, cameras: int, image_size: int, max_episode_steps: int):
        self.task, self.instruction = task, instruction
        self.cameras, self.image_size = cameras, image_size
        self.max_episode_steps = max_episode_steps
        self.seed, self.steps = 0, 0

    @classmethod
    def from_config(cls, data_cfg, task: str) -> ScriptedEnv:
        if task == "unbuildable":
            raise RuntimeError("this task cannot be built")
        return cls(
            task,
            str(data_cfg["instructions"][0]),
            len(data_cfg["cameras"]),
            int(data_cfg["image_size"]),
            int(data_cfg["max_episode_steps"]),
        )

    def reset(self, seed: int) -> dict:
        self.seed, self.steps = seed, 0
        return self._obs()

    def step(self, action: np.ndarray) -> StepResult:
        self.steps += 1
        fate = self.seed % 4
        if fate == 1 and self.steps == 2:
            raise RuntimeError("simulated InvalidActionError")
        if fate == 2 and self.steps == 2:
            os._exit(3)
        success = fate == 0 and self.steps == 3
        return StepResult(self._obs(), 0.0, success or self.steps >= self.max_episode_steps, success)

    def render(self) -> np.ndarray:
        return np.full((32, 32, 3), 10 * self.steps % 255, dtype=np.uint8)

    def close(self) -> None:
        pass

    def _obs(self) -> dict:
        size = self.image_size
        return {
            "images": np.zeros((self.cameras, 3, size, size), dtype=np.uint8),
            "proprio": np.full(4, self.steps, dtype=np.float32),
            "instruction": self.instruction,
            "task": self.task,
        }


class DriftEnv(BaseEnv):
    """An episode's fate depends on the actions: the hand starts at a seed-dependent x and the
    episode succeeds once the summed first action component has moved it past x = 0.

    The images show the hand's x (every pixel), so the policy's chunks change with the state."""

    def __init__(self, instruction: str, cameras: int, image_size: int, max_episode_steps: int):
        self.instruction, self.cameras, self.image_size = instruction, cameras, image_size
        self.max_episode_steps = max_episode_steps
        self.x, self.steps = 0.0, 0

    @classmethod
    def from_config(cls, data_cfg, task: str) -> DriftEnv:
        return cls(str(data_cfg["instructions"][0]), len(data_cfg["cameras"]), int(data_cfg["image_size"]),
                   int(data_cfg["max_episode_steps"]))

    def reset(self, seed: int) -> dict:
        self.x, self.steps = float(np.random.default_rng(seed).uniform(-2.0, 0.5)), 0
        return self._obs()

    def step(self, action: np.ndarray) -> StepResult:
        self.steps += 1
        self.x += float(action[0])
        success = self.x > 0
        return StepResult(self._obs(), 0.0, success or self.steps >= self.max_episode_steps, success)

    def render(self) -> np.ndarray:
        return np.zeros((32, 32, 3), dtype=np.uint8)

    def close(self) -> None:
        pass

    def _obs(self) -> dict:
        size, level = self.image_size, int(np.clip(128 + 200 * self.x, 0, 255))
        return {
            "images": np.full((self.cameras, 3, size, size), level, dtype=np.uint8),
            "proprio": np.array([self.x, 0.0, 0.0, self.steps / 10], dtype=np.float32),
            "instruction": self.instruction,
            "task": "drift",
        }


class ReplayEnv(BaseEnv):
    """Replays recorded episodes of a Meta-World demo store (`data.replay_store`), whatever the
    actions: episode `seed` of the task, one recorded step per env step. What a policy observes in
    it is exactly what the dataset made of the same episode for training."""

    def __init__(self, store: str, task: str, max_episode_steps: int):
        from drifting_vla.data.metaworld_dataset import open_task_arrays, read_task_meta

        meta, self.ends = read_task_meta(f"{store}/{task}")
        self.arrays, self.instruction, self.task = open_task_arrays(f"{store}/{task}"), meta["instruction"], task
        self.max_episode_steps = max_episode_steps
        self.row, self.end = 0, 0

    @classmethod
    def from_config(cls, data_cfg, task: str) -> ReplayEnv:
        return cls(str(data_cfg["replay_store"]), task, int(data_cfg["max_episode_steps"]))

    def reset(self, seed: int) -> dict:
        self.row = int(self.ends[seed - 1]) if seed else 0
        self.end = int(self.ends[seed])
        return self._obs()

    def step(self, action: np.ndarray) -> StepResult:
        self.row += 1
        done = self.row == self.end - 1
        return StepResult(self._obs(), 0.0, done, False)

    def render(self) -> np.ndarray:
        return np.zeros((32, 32, 3), dtype=np.uint8)

    def close(self) -> None:
        pass

    def _obs(self) -> dict:
        return {
            "images": np.array(self.arrays["images"][self.row]),
            "proprio": np.array(self.arrays["proprio"][self.row]),
            "instruction": self.instruction,
            "task": self.task,
        }
