"""RLBench tasks in CoppeliaSim, for closed-loop evaluation inside the `drifting-vla:rlbench` image.

RLBench, PyRep and CoppeliaSim 4.1 exist only in that Docker image (docker/Dockerfile.rlbench,
docs/docker.md); they are imported when an env is built, never when this module is imported, and
their absence is an error that says which image to use.

Two control protocols (label every result with the one used; they are different benchmarks):

    control: planner   next-keyframe control, the RLBench leaderboard protocol (PerAct, RVT-2):
                       each action is the next keyframe pose, executed by RLBench's motion planner
                       (`EndEffectorPoseViaPlanning`) with a discrete gripper. Data: keyframes=true.
    control: ik        dense end-effector pose control for action chunks: each action is the pose
                       of the next control step, reached through inverse kinematics
                       (`EndEffectorPoseViaIK`) with a discrete gripper. Data: keyframes=false.

The default follows the data config (`keyframes: true` -> planner); `data.control` overrides it.

Actions `[x, y, z, qx, qy, qz, qw, gripper_open, ignore_collisions]` are sanitized before they
reach the simulator (`sanitize_action`): the quaternion is made unit length with qw >= 0, the
position is clipped to `data.workspace_bounds` (default PerAct's scene bounds), the gripper and
the flag are 1 above 0.5, else 0. PerAct's fork of RLBench (the Docker image's) takes the flag as a
9th number: the policy's prediction when its action spec has the flag, else the constant
`data.ignore_collisions` (checkpoints trained before it was learned send 8 numbers). Upstream
RLBench takes 8 numbers; the flag is dropped there.
A pose the planner or IK cannot reach (RLBench's InvalidActionError, PyRep's IKError or
ConfigurationPathError) ends the episode as a failure, with the error in `StepResult.info["error"]`.

Observations match `drifting_vla.data.rlbench_dataset`: the configured cameras' RGB as uint8
[V, 3, H, W] at `image_size`, proprio = gripper pose (7, canonical quaternion) + gripper open (1),
instruction = the first of the task variation's descriptions.

Seeds: `reset(seed)` seeds numpy and python's `random` (RLBench samples scenes from them) and picks
variation `seed % variation_count`. This is NOT PerAct's test split (which resets to the stored
test demos); report it as its own protocol.

What has been run: `sanitize_action`, the missing-RLBench error and the command a step sends (to a
fake RLBench), in tests without CoppeliaSim.
What has NOT been run: everything that talks to the simulator (this env was written against the
RLBench/PerAct-fork API but not executed against CoppeliaSim).
"""

from __future__ import annotations

import importlib.util
import random
from pathlib import Path

import numpy as np

from drifting_vla.envs.base_env import BaseEnv, StepResult

CAMERAS = ("front", "left_shoulder", "right_shoulder", "wrist", "overhead")
CONTROL_MODES = ("planner", "ik")
PERACT_WORKSPACE_BOUNDS = ((-0.3, -0.5, 0.6), (0.7, 0.5, 1.6))
"""PerAct's SCENE_BOUNDS (metres, world frame): the region every RLBench-18 keyframe lies in."""

DOCKER_HINT = (
    "RLBench evaluation needs RLBench, PyRep and CoppeliaSim 4.1, which are installed only in the "
    "RLBench Docker image `drifting-vla:rlbench`: build it with "
    "`docker build -f docker/Dockerfile.rlbench -t drifting-vla:rlbench .` (after drifting-vla:base; "
    "see docs/docker.md) and run the evaluation inside it."
)


def import_rlbench() -> dict:
    """The RLBench/PyRep names this env uses; a clear error naming the Docker image when missing."""
    try:
        from pyrep.errors import ConfigurationPathError, IKError
        from rlbench.action_modes.action_mode import MoveArmThenGripper
        from rlbench.action_modes.arm_action_modes import (
            EndEffectorPoseViaIK,
            EndEffectorPoseViaPlanning,
        )
        from rlbench.action_modes.gripper_action_modes import Discrete
        from rlbench.backend.exceptions import InvalidActionError
        from rlbench.backend.utils import task_file_to_task_class
        from rlbench.environment import Environment
        from rlbench.observation_config import CameraConfig, ObservationConfig
    except ImportError as error:
        raise ModuleNotFoundError(f"{DOCKER_HINT} (import failed: {error})") from error
    return {
        "Environment": Environment,
        "MoveArmThenGripper": MoveArmThenGripper,
        "ik": EndEffectorPoseViaIK,
        "planner": EndEffectorPoseViaPlanning,
        "Discrete": Discrete,
        "CameraConfig": CameraConfig,
        "ObservationConfig": ObservationConfig,
        "task_class": task_file_to_task_class,
        "errors": (InvalidActionError, IKError, ConfigurationPathError),
    }


def sanitize_action(action, workspace_bounds=PERACT_WORKSPACE_BOUNDS) -> np.ndarray:
    """`[x, y, z, qx, qy, qz, qw, gripper(, ignore_collisions)]` -> an action the simulator
    accepts, float64 [8] or [9] (as given).

    Unit quaternion with qw >= 0 (a zero quaternion becomes the identity), position clipped to
    `workspace_bounds` ((x, y, z) low, (x, y, z) high), gripper 1.0 (open) if > 0.5 else 0.0, and
    so the flag. A non-finite value is an error: there is no safe pose to substitute for it.
    """
    action = np.asarray(action, dtype=np.float64).reshape(-1)
    if action.shape not in ((8,), (9,)):
        raise ValueError(
            f"an RLBench action has 8 values [x,y,z,qx,qy,qz,qw,gripper] or 9 with ignore_collisions, got {action.shape[0]}"
        )
    if not np.isfinite(action).all():
        raise ValueError(f"non-finite RLBench action {action.tolist()}")
    low, high = (np.asarray(b, dtype=np.float64) for b in workspace_bounds)
    position = np.clip(action[:3], low, high)
    quat = action[3:7]
    norm = np.linalg.norm(quat)
    quat = quat / norm if norm > 1e-8 else np.array([0.0, 0.0, 0.0, 1.0])
    if quat[3] < 0:
        quat = -quat
    binary = (action[7:] > 0.5).astype(np.float64)  # the gripper, and the flag if given
    return np.concatenate([position, quat, binary])


class RLBenchEnv(BaseEnv):
    """One RLBench task in a headless CoppeliaSim (one per process; CoppeliaSim is not re-entrant)."""

    end_effector = slice(0, 3)  # proprio = gripper pose (xyz, quaternion) + gripper open

    def __init__(
        self,
        task: str,
        cameras: tuple[str, ...] | list[str] = ("front", "left_shoulder", "right_shoulder", "wrist"),
        image_size: int = 128,
        control: str = "planner",
        max_episode_steps: int = 25,
        workspace_bounds=PERACT_WORKSPACE_BOUNDS,
        ignore_collisions: bool = False,
    ) -> None:
        """`ignore_collisions`: the flag sent with actions that do not carry one."""
        unknown = [c for c in cameras if c not in CAMERAS]
        if unknown or not cameras:
            raise ValueError(f"unknown RLBench camera(s) {unknown or cameras}; valid: {list(CAMERAS)}")
        if control not in CONTROL_MODES:
            raise ValueError(f"unknown RLBench control {control!r}; choose one of {CONTROL_MODES}")
        rlbench = import_rlbench()
        self.task = task
        self.cameras = tuple(cameras)
        self.image_size = int(image_size)
        self.control = control
        self.max_episode_steps = int(max_episode_steps)
        self.workspace_bounds = workspace_bounds
        self.ignore_collisions = ignore_collisions
        self._errors = rlbench["errors"]

        camera = rlbench["CameraConfig"](
            rgb=True, depth=False, point_cloud=False, mask=False, image_size=(self.image_size, self.image_size)
        )
        off = rlbench["CameraConfig"](rgb=False, depth=False, point_cloud=False, mask=False)
        obs_config = rlbench["ObservationConfig"](
            **{f"{name}_camera": camera if name in self.cameras else off for name in CAMERAS},
            gripper_pose=True,
            gripper_open=True,
        )
        action_mode = rlbench["MoveArmThenGripper"](rlbench[control](), rlbench["Discrete"]())
        self._sim = rlbench["Environment"](action_mode, obs_config=obs_config, headless=True)
        self._sim.launch()
        self._task_env = self._sim.get_task(rlbench["task_class"](task))
        self.instruction = task.replace("_", " ")
        self._last = None
        self.steps = 0

    @classmethod
    def known_tasks(cls) -> frozenset[str] | None:
        """The task files of the installed RLBench (`rlbench/tasks/<task>.py`), found without
        importing it (its import needs PyRep and CoppeliaSim); None without RLBench, where building any env says which
        Docker image to use."""
        spec = importlib.util.find_spec("rlbench")
        if spec is None or spec.origin is None:
            return None
        return frozenset(p.stem for p in (Path(spec.origin).parent / "tasks").glob("*.py") if p.stem != "__init__")

    @classmethod
    def from_config(cls, data_cfg, task: str, **kwargs) -> RLBenchEnv:
        keyframes = bool(data_cfg.get("keyframes", True))
        return cls(
            task,
            cameras=tuple(data_cfg["cameras"]),
            image_size=int(data_cfg["image_size"]),
            control=str(data_cfg.get("control") or ("planner" if keyframes else "ik")),
            max_episode_steps=int(data_cfg.get("max_episode_steps") or (25 if keyframes else 200)),
            workspace_bounds=data_cfg.get("workspace_bounds") or PERACT_WORKSPACE_BOUNDS,
            ignore_collisions=bool(data_cfg.get("ignore_collisions", False)),
            **kwargs,
        )

    def reset(self, seed: int) -> dict:
        np.random.seed(int(seed) % 2**32)
        random.seed(int(seed))
        self._task_env.set_variation(int(seed) % self._task_env.variation_count())
        descriptions, obs = self._task_env.reset()
        self.instruction = str(descriptions[0]) if descriptions else self.task.replace("_", " ")
        self.steps = 0
        self._last = self._observation(obs)
        return self._last

    def step(self, action: np.ndarray) -> StepResult:
        command = sanitize_action(action, self.workspace_bounds)
        if len(command) == 8:
            command = np.concatenate([command, [float(self.ignore_collisions)]])
        command = command[: self._sim.action_shape[0]]  # 9 in PerAct's fork, 8 upstream (no flag)
        self.steps += 1
        try:
            obs, reward, terminate = self._task_env.step(command)
        except self._errors as error:
            info = {"error": f"{type(error).__name__}: {error}"}
            return StepResult(self._last, 0.0, True, False, info)
        success = float(reward) >= 1.0
        self._last = self._observation(obs)
        done = bool(terminate) or success or self.steps >= self.max_episode_steps
        return StepResult(self._last, float(reward), done, success)

    def render(self) -> np.ndarray:
        """The first camera's last frame, uint8 [H, W, 3] (at the observation size)."""
        return np.ascontiguousarray(self._last["images"][0].transpose(1, 2, 0))

    def close(self) -> None:
        self._sim.shutdown()

    def _observation(self, obs) -> dict:
        images = np.stack([np.asarray(getattr(obs, f"{cam}_rgb"), dtype=np.uint8) for cam in self.cameras])
        pose = np.asarray(obs.gripper_pose, dtype=np.float64)
        quat = pose[3:7] / max(np.linalg.norm(pose[3:7]), 1e-12)
        quat = -quat if quat[3] < 0 else quat
        proprio = np.concatenate([pose[:3], quat, [float(obs.gripper_open)]]).astype(np.float32)
        return {
            "images": np.ascontiguousarray(images.transpose(0, 3, 1, 2)),
            "proprio": proprio,
            "instruction": self.instruction,
            "task": self.task,
        }
