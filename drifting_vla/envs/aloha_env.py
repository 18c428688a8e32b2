"""The ALOHA simulation tasks (gym-aloha's transfer cube and insertion) as a `BaseEnv`.

Observation (what the policy sees, in demonstrations and in evaluation alike):

    images   uint8   [1, 3, S, S]  the top camera, resized to S = `image_size` (PIL bilinear, as
                                   LeRobot datasets are resized by `data/lerobot_dataset.py`)
    proprio  float32 [14]          per arm (left, then right): 6 joint positions (rad) + the
                                   gripper opening normalised to [0 closed, 1 open]
Action: float32 [14], the same layout as absolute targets (joints in rad, grippers in [0, 1]).

The physics, the object placement and the reward are gym-aloha's own task classes (`tasks.sim`),
stepped at 50 Hz through dm_control; only the observation is made here, so that one step costs the
physics (under a millisecond) and one small render instead of gym-aloha's three 480x640 renders.
`reset(seed)` places the objects with gym-aloha's `sample_box_pose(seed)` /
`sample_insertion_pose(seed)`, so seed k is the same scene as `gym.make(...).reset(seed=k)`.

Success: the task's staged reward (0-4, from contacts) reaches its maximum 4 during the episode,
the definition ACT and LeRobot report (gym-aloha's `is_success`); the episode then ends, since
the rate counts episodes that ever reached 4 and a later drop (the cube put down) does not undo it.
Every step's `info["stage"]` is the highest reward reached so far and `info["stage_names"]` what
each value means (`STAGES`): evaluations report how far the failed episodes got.

Rendering (`render_mode`):
    fast      one `mujoco.Renderer` per env at the size the policy sees (S x 4S/3, the camera's
              4:3 frame) with shadows, reflections and multisampling off, then resized to S x S.
    faithful  what gym-aloha renders (480x640 with the scene's own settings: 4096 shadow map, 4x
              multisampling; the same pixels as its dm_control `physics.render`), then resized to
              S x S: a policy trained on LeRobot's hub `aloha_sim_*` datasets is evaluated on the
              images it learned from.
`benchmarks/aloha_render.py` measures both and the options in between (docs/benchmarks.md).
Use one env per process (one GL context); set `MUJOCO_GL=egl` on a headless machine.
"""

from __future__ import annotations

import os

import numpy as np

from drifting_vla.data.transforms import resize_image
from drifting_vla.envs.aloha_experts import (
    HELD_BELOW,
    HORIZON,
    ROUTE_MEETS,
    ROUTES,
    TASKS,
    joint_trajectory,
    plan_for,
    route_for_seed,
    start_poses,
)
from drifting_vla.envs.base_env import MujocoEnv, StepResult

INSTRUCTIONS = {
    "transfer_cube": "pick up the cube with the right arm and hand it to the left arm",
    "insertion": "pick up the peg and the socket and insert the peg into the socket",
}
XML = {"transfer_cube": "bimanual_viperx_transfer_cube.xml", "insertion": "bimanual_viperx_insertion.xml"}
CAMERA = "top"
FAITHFUL_SIZE = (480, 640)
"""gym-aloha's observation size (height, width) and LeRobot's hub ALOHA datasets' frame size."""
RENDER_MODES = ("fast", "faithful")
EXPERTS = ("scripted", "routes")
PROPRIO_DIM = ACTION_DIM = 14
MAX_REWARD = 4
STAGES = {
    "transfer_cube": ("touched", "lifted", "transfer attempted", "transferred"),
    "insertion": ("both touched", "both lifted", "peg meets socket", "inserted"),
}
"""What each value 1-4 of gym-aloha's staged reward means (its contact tests): an episode's stage
is the highest reached. ACT's paper reports the same stages; below full success they say how far a
policy got (the right gripper on the cube, the cube off the table, ...)."""
HANDOVER_RADIUS = 0.045
"""How close (m) to where a route hands the cube over the cube must be when the left gripper first
touches it for the episode to count as that route (the two are 11 cm apart); farther away it is
`other`, never touched by the left gripper `none`."""


def check_task(task: str) -> None:
    if task not in TASKS:
        raise ValueError(f"unknown ALOHA task {task!r}; valid names: {list(TASKS)}")


def object_pose(task: str, seed: int) -> np.ndarray:
    """The objects' free-joint poses at reset for `seed`: transfer [7] (cube), insertion [14]
    (peg, socket), drawn exactly as gym-aloha's `AlohaEnv.reset(seed)` draws them."""
    from gym_aloha.utils import sample_box_pose, sample_insertion_pose

    check_task(task)
    if task == "transfer_cube":
        return np.asarray(sample_box_pose(int(seed)), dtype=np.float64)
    return np.concatenate(sample_insertion_pose(int(seed))).astype(np.float64)


def _dm_env(xml: str, task):
    """A dm_control Environment of one gym-aloha XML at 50 Hz (10 physics steps of 2 ms)."""
    from dm_control import mujoco
    from dm_control.rl import control
    from gym_aloha.constants import ASSETS_DIR, DT

    physics = mujoco.Physics.from_xml_path(str(ASSETS_DIR / xml))
    return control.Environment(physics, task, time_limit=float("inf"), control_timestep=DT,
                               n_sub_steps=None, flat_observation=False)


def _joint_task(task: str):
    """gym-aloha's joint-space task, observing joints and object poses only (rendering is ours)."""
    from gym_aloha.tasks.sim import InsertionTask, TransferCubeTask

    base = TransferCubeTask if task == "transfer_cube" else InsertionTask

    class JointTask(base):
        def get_observation(self, physics):
            return {"qpos": self.get_qpos(physics), "env_state": self.get_env_state(physics)}

    return JointTask()


class TopCameraRenderer:
    """The top camera as uint8 [S, S, 3], drawn by one `mujoco.Renderer` and resized to S x S.

    `fast`: drawn at S x 4S/3 with shadows, reflections and multisampling off (`shadows`,
    `reflections`, `multisampling` turn each back on, `render_size` sets the drawn size: for the
    renderer benchmark). `faithful`: drawn at 480x640 with the scene's own settings, pixel for pixel
    what gym-aloha's dm_control `physics.render` draws (checked). dm_control's renderer itself is not
    used: its GL context and a `mujoco.Renderer` made after it in one process draw noise."""

    def __init__(self, physics, size: int, mode: str = "fast", shadows: bool = False,
                 reflections: bool = False, multisampling: bool = False, render_size: tuple[int, int] | None = None) -> None:
        import mujoco

        if mode not in RENDER_MODES:
            raise ValueError(f"unknown ALOHA render_mode {mode!r}; valid: {list(RENDER_MODES)}")
        self.physics, self.size, self.mode = physics, int(size), mode
        model = physics.model
        if mode == "fast":
            if not multisampling:
                model.vis.quality.offsamples = 0
            if not shadows:
                model.light_castshadow[:] = 0
            if not reflections:
                model.mat_reflectance[:] = 0
            height, width = render_size or (self.size, round(self.size * 4 / 3))
        else:
            height, width = FAITHFUL_SIZE
        self._renderer = mujoco.Renderer(model.ptr, height, width)

    def render(self) -> np.ndarray:
        self._renderer.update_scene(self.physics.data.ptr, camera=CAMERA)
        return resize_image(np.ascontiguousarray(self._renderer.render()), self.size)

    def close(self) -> None:
        if self._renderer is not None:
            self._renderer.close()
            self._renderer = None


class HandoverTracker:
    """The route a transfer-cube episode took: where the cube was when the left gripper first
    touched it (reward >= 3), named after the nearest route's hand-over point within
    `HANDOVER_RADIUS`, else `other`; `none` until the left gripper touches the cube."""

    def __init__(self) -> None:
        self.mode = "none"

    def update(self, reward: float, cube_xyz: np.ndarray) -> str:
        if self.mode == "none" and reward >= 3:
            held = {route: ROUTE_MEETS[route] - [0.0, 0.0, HELD_BELOW] for route in ROUTES}
            distances = {route: float(np.linalg.norm(cube_xyz - held[route])) for route in ROUTES}
            nearest = min(distances, key=distances.get)
            self.mode = nearest if distances[nearest] <= HANDOVER_RADIUS else "other"
        return self.mode


class AlohaEnv(MujocoEnv):
    """One ALOHA task in joint space with seeded object poses and the top camera."""

    def __init__(self, task: str, image_size: int = 64, render_mode: str = "fast", max_episode_steps: int = HORIZON,
                 expert: str = "scripted", video_size: int = 240) -> None:
        check_task(task)
        if expert not in EXPERTS:
            raise ValueError(f"unknown ALOHA expert {expert!r}; valid: {list(EXPERTS)}")
        if expert == "routes" and task != "transfer_cube":
            raise ValueError(f"the two-route expert exists for transfer_cube only, got task {task!r}")
        os.environ.setdefault("MUJOCO_GL", "egl")
        self.task, self.instruction = task, INSTRUCTIONS[task]
        self.image_size, self.render_mode = int(image_size), render_mode
        self.max_episode_steps, self.expert, self.video_size = int(max_episode_steps), expert, int(video_size)
        self._env = _dm_env(XML[task], _joint_task(task))
        self.physics = self._env.physics
        self._renderer = TopCameraRenderer(self.physics, self.image_size, render_mode)
        self._video_renderer = None
        self._tracker = HandoverTracker() if expert == "routes" else None
        self.seed, self.route, self.steps, self.max_reward, self._qpos = None, None, 0, 0.0, None

    @classmethod
    def known_tasks(cls) -> frozenset[str]:
        return frozenset(TASKS)

    @classmethod
    def from_config(cls, data_cfg, task: str, **kwargs) -> AlohaEnv:
        """The env with the data config's observation settings (those the demos were collected with)."""
        return cls(task, image_size=int(data_cfg["image_size"]), render_mode=str(data_cfg.get("render_mode", "fast")),
                   max_episode_steps=int(data_cfg["max_episode_steps"]), expert=str(data_cfg.get("expert", "scripted")),
                   **kwargs)

    def reset(self, seed: int) -> dict:
        from gym_aloha.tasks.sim import BOX_POSE

        self.seed, self.steps, self.max_reward = int(seed), 0, 0.0
        self.route = route_for_seed(seed) if self.expert == "routes" else None
        BOX_POSE[0] = object_pose(self.task, seed)  # gym-aloha's tasks read the pose from this global at reset
        self._qpos = self._env.reset().observation["qpos"]
        if self._tracker is not None:
            self._tracker = HandoverTracker()
        return self.observation()

    def step(self, action: np.ndarray) -> StepResult:
        action = np.asarray(action, dtype=np.float64)
        if action.size != ACTION_DIM:
            raise ValueError(f"an ALOHA action has {ACTION_DIM} values (per arm, left first: 6 joint targets in rad and "
                             f"the gripper opening in [0, 1]), got shape {action.shape}")
        action = action.reshape(ACTION_DIM)
        if not np.all(np.isfinite(action)):
            raise ValueError(f"ALOHA action has non-finite values: {action.tolist()}")
        step = self._env.step(action)
        self._qpos = step.observation["qpos"]
        self.steps += 1
        reward = float(step.reward)
        self.max_reward = max(self.max_reward, reward)
        success = self.max_reward >= MAX_REWARD
        info = {"reward": reward, "stage": int(self.max_reward), "stage_names": STAGES[self.task]}
        if self._tracker is not None:
            info["mode"] = self._tracker.update(reward, self.physics.data.qpos[16:19].copy())
        return StepResult(self.observation(), reward, success or self.steps >= self.max_episode_steps, success, info)

    def observation(self) -> dict:
        frame = self._renderer.render()
        return {
            "images": np.ascontiguousarray(frame.transpose(2, 0, 1)[None]),
            "proprio": np.asarray(self._qpos, dtype=np.float32),
            "instruction": self.instruction,
            "task": self.task,
        }

    def render(self) -> np.ndarray:
        if self._video_renderer is None:
            self._video_renderer = TopCameraRenderer(self.physics, self.video_size, self.render_mode,
                                                     render_size=(self.video_size, round(self.video_size * 4 / 3)))
        return self._video_renderer.render()

    def expert_actions(self, seed: int, route: str | None = None) -> np.ndarray:
        """float32 [max_episode_steps, 14]: the scripted expert's joint actions for `seed` (on the
        two-route variant along `route`, by default the seed's), planned from the reset state."""
        if self.expert == "routes":
            route = route or route_for_seed(seed)
        self.reset(seed)
        model, qpos0 = self.physics.model.ptr, self.physics.data.qpos.copy()
        plan = plan_for(self.task, object_pose(self.task, seed), start_poses(model, qpos0), route)
        return joint_trajectory(model, qpos0, plan, self.max_episode_steps)


def run_expert_episode(env: AlohaEnv, seed: int, actions: np.ndarray | None = None) -> dict:
    """Replay the expert's joint actions (or `actions` [L, 14]) in `env` from `reset(seed)`,
    all of them (the published demos run the whole 400 steps, past the success).

    Returns images uint8 [L, 1, 3, S, S], proprio float32 [L, 14], state float32 [L, nq] (every
    joint, the objects' poses included), actions float32 [L, 14] (row t: the observation before
    action t), `success` (max reward 4 reached on the replay), `seed`, `route` (the one planned)
    and `mode` (the one the replay took, on the two-route variant)."""
    actions = env.expert_actions(seed) if actions is None else np.asarray(actions, dtype=np.float32)
    obs = env.reset(seed)
    images, proprio, state, mode = [], [], [], None
    for action in actions:
        images.append(obs["images"])
        proprio.append(obs["proprio"])
        state.append(env.physics.data.qpos.astype(np.float32))
        result = env.step(action)
        obs, mode = result.observation, result.info.get("mode", mode)
    return {
        "images": np.stack(images),
        "proprio": np.stack(proprio),
        "state": np.stack(state),
        "actions": actions,
        "success": env.max_reward >= MAX_REWARD,
        "seed": int(seed),
        "route": env.route,
        "mode": mode,
    }
