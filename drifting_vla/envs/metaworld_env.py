"""Meta-World tasks as the embedded benchmark: offscreen MuJoCo rendering, instructions, experts.

The demonstrations (`scripts/collect_demos.py`) and the closed-loop evaluation both go through
`MetaWorldEnv`, so the policy sees identical observations in both:

    images   uint8 [V, 3, H, W]  `cameras` rendered at `image_size` (fast settings, see below)
    proprio  float32 [4]         hand xyz + gripper opening (the first 4 of Meta-World's 39 floats),
                                 then the goal xyz (its last 3) with `observe_goal=True`
    state    float32 [39]        only with `privileged_state=True` (a state-policy baseline)

Episodes are seeded: `reset(seed)` samples the object and goal positions from the task's random
reset space with `seed`, so a seed list names the same scenes on every machine. Training and
evaluation use disjoint seed ranges (`drifting_vla/configs/data/metaworld.yaml`).

Experts: `expert="stock"` is Meta-World's scripted policy; `expert="routes"` (wall tasks only)
goes around the wall on a side drawn from the seed (`metaworld_routes.py`, the multimodal suite).
On the wall tasks every step's `info["mode"]` says which way the hand or puck got past the wall.

Rendering: one `mujoco.Renderer` per env, multisampling, shadows and reflections off (about 10x
cheaper than the defaults, same geometry). Set `MUJOCO_GL=egl` (or `osmesa`) on a headless machine.
Use one env per process: several GL contexts in one process have corrupted frames in the past.
"""

from __future__ import annotations

import os

import numpy as np

from drifting_vla.envs.base_env import MujocoEnv, StepResult
from drifting_vla.envs.metaworld_routes import TRACKED as ROUTE_TASKS
from drifting_vla.envs.metaworld_routes import (
    RouteExpert,
    RouteTracker,
    check_route_task,
    route_for_seed,
)

MT10_TASKS = (
    "reach-v3",
    "push-v3",
    "pick-place-v3",
    "door-open-v3",
    "drawer-open-v3",
    "drawer-close-v3",
    "button-press-topdown-v3",
    "peg-insert-side-v3",
    "window-open-v3",
    "window-close-v3",
)

TASK_INSTRUCTIONS = {
    "assembly-v3": "put the ring onto the peg",
    "basketball-v3": "dunk the ball into the basket",
    "bin-picking-v3": "move the cube from one bin to the other",
    "box-close-v3": "put the lid on the box",
    "button-press-topdown-v3": "press the button from the top",
    "button-press-topdown-wall-v3": "press the button from the top behind the wall",
    "button-press-v3": "press the button from the front",
    "button-press-wall-v3": "press the button behind the wall",
    "coffee-button-v3": "press the button on the coffee machine",
    "coffee-pull-v3": "pull the mug away from the coffee machine",
    "coffee-push-v3": "push the mug under the coffee machine",
    "dial-turn-v3": "turn the dial",
    "disassemble-v3": "take the ring off the peg",
    "door-close-v3": "close the door",
    "door-lock-v3": "lock the door by turning the lock",
    "door-open-v3": "open the door",
    "door-unlock-v3": "unlock the door by turning the lock",
    "hand-insert-v3": "put the hand into the hole",
    "drawer-close-v3": "close the drawer",
    "drawer-open-v3": "open the drawer",
    "faucet-open-v3": "turn the faucet on",
    "faucet-close-v3": "turn the faucet off",
    "hammer-v3": "hammer the nail into the wall",
    "handle-press-side-v3": "press the handle down from the side",
    "handle-press-v3": "press the handle down",
    "handle-pull-side-v3": "pull the handle up from the side",
    "handle-pull-v3": "pull the handle up",
    "lever-pull-v3": "pull the lever up",
    "pick-place-wall-v3": "pick up the puck and place it at the goal behind the wall",
    "pick-out-of-hole-v3": "pick the peg out of the hole",
    "pick-place-v3": "pick up the puck and place it at the goal",
    "plate-slide-v3": "slide the plate into the cabinet",
    "plate-slide-side-v3": "slide the plate sideways into the cabinet",
    "plate-slide-back-v3": "slide the plate out of the cabinet",
    "plate-slide-back-side-v3": "slide the plate sideways out of the cabinet",
    "peg-insert-side-v3": "insert the peg into the hole from the side",
    "peg-unplug-side-v3": "unplug the peg from the side",
    "soccer-v3": "kick the ball into the goal",
    "stick-push-v3": "push the thermos with the stick",
    "stick-pull-v3": "pull the thermos with the stick",
    "push-v3": "push the puck to the goal",
    "push-wall-v3": "push the puck to the goal behind the wall",
    "push-back-v3": "pull the puck back to the goal",
    "reach-v3": "reach the goal with the gripper",
    "reach-wall-v3": "reach the goal behind the wall",
    "shelf-place-v3": "put the puck on the shelf",
    "sweep-into-v3": "sweep the puck into the hole",
    "sweep-v3": "sweep the puck off the table",
    "window-open-v3": "slide the window open",
    "window-close-v3": "slide the window closed",
}
"""One short imperative sentence per task (Meta-World ships none); shipped, so it is identical in
the demonstrations, in training and in evaluation."""

CAMERAS = ("corner", "corner2", "corner3", "corner4", "topview", "behindGripper", "gripperPOV")
UPSIDE_DOWN_CAMERAS = frozenset({"corner", "corner2", "corner3", "corner4", "behindGripper"})
"""These cameras are rolled by 180 degrees in Meta-World's scene: rotate their frames back."""

PROPRIO_DIM = 4
GOAL_DIM = 3
STATE_DIM = 39
EXPERTS = ("stock", "routes")


def check_task(task: str) -> None:
    if task not in TASK_INSTRUCTIONS:
        raise ValueError(
            f"unknown Meta-World task {task!r}; valid names: {sorted(TASK_INSTRUCTIONS)}"
        )


def instruction_for(task: str) -> str:
    check_task(task)
    return TASK_INSTRUCTIONS[task]


class MetaWorldEnv(MujocoEnv):
    """One Meta-World task with seeded resets and multi-camera uint8 observations."""

    end_effector = slice(0, 3)  # proprio = hand xyz + gripper opening

    def __init__(
        self,
        task: str,
        cameras: tuple[str, ...] | list[str] = ("corner", "topview"),
        image_size: int = 64,
        max_episode_steps: int = 200,
        video_camera: str = "corner",
        video_size: int = 256,
        privileged_state: bool = False,
        expert: str = "stock",
        observe_goal: bool = False,
    ) -> None:
        check_task(task)
        if expert not in EXPERTS:
            raise ValueError(f"unknown Meta-World expert {expert!r}; valid: {list(EXPERTS)}")
        if expert == "routes":
            check_route_task(task)
        unknown = [c for c in cameras if c not in CAMERAS]
        if unknown or not cameras:
            raise ValueError(f"unknown Meta-World camera(s) {unknown or cameras}; valid: {list(CAMERAS)}")
        if video_camera not in CAMERAS:
            raise ValueError(f"unknown Meta-World video camera {video_camera!r}; valid: {list(CAMERAS)}")
        os.environ.setdefault("MUJOCO_GL", "egl")
        import metaworld
        import mujoco
        from metaworld.env_dict import ALL_V3_ENVIRONMENTS

        self.task = task
        self.instruction = TASK_INSTRUCTIONS[task]
        self.cameras = tuple(cameras)
        self.image_size = int(image_size)
        self.max_episode_steps = int(max_episode_steps)
        self.video_camera = video_camera
        self.video_size = int(video_size)
        self.privileged_state = privileged_state
        self.expert = expert
        self.observe_goal = bool(observe_goal)
        self.route: str | None = None
        self._expert = None
        self._route_tracker = RouteTracker(task) if task in ROUTE_TASKS else None

        self._env = ALL_V3_ENVIRONMENTS[task]()
        # Any task sets the env's private fields; resets then draw positions from `seed` instead.
        self._env.set_task(metaworld.MT1(task, seed=0).train_tasks[0])
        self._env._freeze_rand_vec = False
        self._env.seeded_rand_vec = True
        self._env.max_path_length = max(self._env.max_path_length, self.max_episode_steps)
        model = self._env.model
        model.vis.quality.offsamples = 0
        model.light_castshadow[:] = 0
        model.mat_reflectance[:] = 0
        self._mujoco = mujoco
        # MuJoCo's offscreen framebuffer is the model's (Meta-World: 640 x 480); any image_size the
        # config allows (config.MAX_IMAGE_SIZE) and the video size must fit in it.
        model.vis.global_.offwidth = max(model.vis.global_.offwidth, self.image_size, self.video_size)
        model.vis.global_.offheight = max(model.vis.global_.offheight, self.image_size, self.video_size)
        self._renderer = mujoco.Renderer(model, self.image_size, self.image_size)
        self._video_renderer = None
        self.state = np.zeros(STATE_DIM)
        self.steps = 0

    @classmethod
    def known_tasks(cls) -> frozenset[str]:
        return frozenset(TASK_INSTRUCTIONS)

    @classmethod
    def from_config(cls, data_cfg, task: str, **kwargs) -> MetaWorldEnv:
        """The env with the data config's observation settings (those the demos were collected
        with), so evaluation observations match training ones."""
        return cls(
            task,
            cameras=tuple(data_cfg["cameras"]),
            image_size=int(data_cfg["image_size"]),
            max_episode_steps=int(data_cfg["max_episode_steps"]),
            privileged_state=bool(data_cfg.get("privileged_state", False)),
            expert=str(data_cfg.get("expert", "stock")),
            observe_goal=bool(data_cfg.get("observe_goal", False)),
            **kwargs,
        )

    def reset(self, seed: int) -> dict:
        self._env.seed(int(seed))
        self.state, _ = self._env.reset()
        self.steps = 0
        if self.expert == "routes":
            self.route = route_for_seed(seed)
            self._expert = RouteExpert(self.task, self.route)
        if self._route_tracker is not None:
            self._route_tracker.reset(self.state)
        return self.observation()

    def step(self, action: np.ndarray) -> StepResult:
        action = np.clip(np.asarray(action, dtype=np.float64).reshape(4), -1.0, 1.0)
        self.state, reward, _, _, info = self._env.step(action)
        self.steps += 1
        success = bool(info.get("success", 0.0))
        done = success or self.steps >= self.max_episode_steps
        info = dict(info)
        if self._route_tracker is not None:
            info["mode"] = self._route_tracker.update(self.state)
        return StepResult(self.observation(), float(reward), done, success, info)

    def observation(self) -> dict:
        proprio = self.state[:PROPRIO_DIM]
        if self.observe_goal:
            proprio = np.concatenate([proprio, self.state[-GOAL_DIM:]])
        obs = {
            "images": self._render_cameras(),
            "proprio": proprio.astype(np.float32),
            "instruction": self.instruction,
            "task": self.task,
        }
        if self.privileged_state:
            obs["state"] = self.state.astype(np.float32)
        return obs

    def render(self) -> np.ndarray:
        if self._video_renderer is None:
            self._video_renderer = self._mujoco.Renderer(self._env.model, self.video_size, self.video_size)
        return self._render(self._video_renderer, self.video_camera)

    def expert_action(self) -> np.ndarray:
        """The scripted expert's action for the current state: Meta-World's (`ENV_POLICY_MAP`), or
        the route expert of this episode's seed."""
        if self._expert is None:
            from metaworld.policies import ENV_POLICY_MAP

            self._expert = ENV_POLICY_MAP[self.task]()
        return np.clip(self._expert.get_action(self.state), -1.0, 1.0).astype(np.float32)

    def _render_cameras(self) -> np.ndarray:
        """uint8 [V, 3, H, W]."""
        frames = [self._render(self._renderer, cam) for cam in self.cameras]
        return np.ascontiguousarray(np.stack(frames).transpose(0, 3, 1, 2))

    def _render(self, renderer, camera: str) -> np.ndarray:
        renderer.update_scene(self._env.data, camera=camera)
        frame = renderer.render()
        return frame[::-1, ::-1].copy() if camera in UPSIDE_DOWN_CAMERAS else frame


def run_expert_episode(env: MetaWorldEnv, seed: int) -> dict:
    """One scripted-expert episode from `reset(seed)` until success or the step limit.

    Returns numpy arrays, one row per step t (the observation before action t):
    images uint8 [L, V, 3, H, W], proprio float32 [L, 4 or 7], state float32 [L, 39],
    actions float32 [L, 4], plus `success` (bool), `seed`, and on the wall tasks `mode` (the way
    past the wall the episode took) and `route` (the one the route expert was told to take).
    """
    obs = env.reset(seed)
    images, proprio, state, actions = [], [], [], []
    success, mode = False, None
    for _ in range(env.max_episode_steps):
        action = env.expert_action()
        images.append(obs["images"])
        proprio.append(obs["proprio"])
        state.append(env.state.astype(np.float32))
        actions.append(action)
        result = env.step(action)
        obs, success, mode = result.observation, result.success, result.info.get("mode")
        if result.done:
            break
    return {
        "images": np.stack(images),
        "proprio": np.stack(proprio),
        "state": np.stack(state),
        "actions": np.stack(actions),
        "success": success,
        "seed": int(seed),
        "mode": mode,
        "route": env.route,
    }
