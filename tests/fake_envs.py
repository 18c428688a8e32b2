"""Test-only simulators, registered as the envs `scripted`, `drift` and `replay` when this module is imported
(tests/conftest.py does; a script names it, `plugins=[tests.fake_envs]`), as a user registers one.

`ScriptedEnv` decides each episode's fate from its seed, so a rollout test can mix outcomes:

    seed % 4 == 0   success at step 3
    seed % 4 == 1   the simulator raises at step 2 (like InvalidActionError)
    seed % 4 == 2   the worker process dies at step 2 (like a segfaulting simulator)
    seed % 4 == 3   never succeeds: runs to max_episode_steps

`SensorFaultEnv` reports a proprio of 1e20 on odd seeds and refuses non-finite actions.

`ReplayEnv` replays the episodes of a Meta-World demo store whatever the actions.

`FakeRLBench` stands in for RLBench and CoppeliaSim behind `RLBenchEnv`, recording the commands a
step sends to the simulator.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import numpy as np

from drifting_vla.envs import register_env
from drifting_vla.envs.base_env import BaseEnv, StepResult


class ScriptedEnv(BaseEnv):
    end_effector = slice(0, 3)

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
        stage = 3 if success else min(self.steps, 2)  # a staged reward, like ALOHA's: the worker passes it on
        info = {"stage": stage, "stage_names": ("moved", "moved twice", "succeeded")}
        return StepResult(self._obs(), 0.0, success or self.steps >= self.max_episode_steps, success, info)

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

    end_effector = slice(0, 3)

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


class FakeRLBench:
    """The RLBench names `RLBenchEnv` imports (`import_rlbench`, to monkeypatch), with one object as
    the simulator and its task: it takes `action_size` numbers a step (9 in PerAct's fork, 8 in
    upstream RLBench), records each command in `commands`, and never ends an episode."""

    def __init__(self, action_size: int = 9, instruction: str = "close jar", image_size: int = 32):
        self.action_shape = (action_size,)
        self.instruction, self.image_size = instruction, image_size
        self.commands: list[np.ndarray] = []

    def import_rlbench(self) -> dict:
        def anything(*args, **kwargs):
            return None

        return {
            "Environment": lambda action_mode, obs_config, headless: self,
            "MoveArmThenGripper": anything,
            "ik": anything,
            "planner": anything,
            "Discrete": anything,
            "CameraConfig": anything,
            "ObservationConfig": anything,
            "task_class": lambda task: task,
            "errors": (),
        }

    def launch(self) -> None:
        pass

    def shutdown(self) -> None:
        pass

    def get_task(self, task_class) -> FakeRLBench:
        return self

    def variation_count(self) -> int:
        return 1

    def set_variation(self, variation: int) -> None:
        pass

    def reset(self):
        return [self.instruction], self._observation()

    def step(self, command):
        self.commands.append(np.asarray(command, dtype=np.float64))
        return self._observation(), 0.0, False

    def _observation(self) -> SimpleNamespace:
        rgb = np.zeros((self.image_size, self.image_size, 3), dtype=np.uint8)
        cameras = ("front", "left_shoulder", "right_shoulder", "wrist", "overhead")
        return SimpleNamespace(
            **{f"{camera}_rgb": rgb for camera in cameras},
            gripper_pose=np.array([0.2, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0]),
            gripper_open=1.0,
        )


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


class SensorFaultEnv(ScriptedEnv):
    """ScriptedEnv whose odd seeds report a proprio of 1e20 from step 2 on (a sensor fault), and
    which raises on any non-finite action, as a robot refusing NaN commands would."""

    def step(self, action: np.ndarray) -> StepResult:
        if not np.isfinite(action).all():
            raise RuntimeError(f"a non-finite action reached the simulator: {action}")
        self.steps += 1
        return StepResult(self._obs(), 0.0, self.steps >= self.max_episode_steps, False)

    def _obs(self) -> dict:
        obs = super()._obs()
        obs["proprio"] = np.full(4, 0.1, dtype=np.float32)
        if self.seed % 2 and self.steps >= 2:
            obs["proprio"][0] = 1e20
        return obs


register_env("scripted", "tests.fake_envs:ScriptedEnv")
register_env("drift", "tests.fake_envs:DriftEnv")
register_env("replay", "tests.fake_envs:ReplayEnv")
register_env("sensor_fault", "tests.fake_envs:SensorFaultEnv")

