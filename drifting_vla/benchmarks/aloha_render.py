"""ALOHA observation cost: gym-aloha's step against the renderer options of `AlohaEnv`.

One control step of gym-aloha's `AlohaTransferCube-v0` renders three 480x640 cameras with the
scene's settings (4096 shadow map, 4x multisampling); the policy sees one camera at 64x64. Rows
(wall time of one call, this process, one env per row since the fast options change the model):

    physics                 one control step without any render (10 MuJoCo steps)
    faithful                the top camera as gym-aloha renders it (480x640, scene settings, the
                            same pixels as dm_control's render), resized to 64x64: the baseline
    fast, + <option>        a mujoco.Renderer at 64x85 with shadows, reflections and multisampling
                            off, then with one of them back on
    fast at 480x640         the fast settings at gym-aloha's size
    gym-aloha env.step      `gym.make("gym_aloha/AlohaTransferCube-v0").step` (physics + 3 renders)
"""

from __future__ import annotations

import numpy as np

from drifting_vla.benchmarks.timing import Row, time_call
from drifting_vla.envs.aloha_env import AlohaEnv, TopCameraRenderer

SIZE = 64
BASELINE = "faithful (480x640, scene settings) + resize"


ROUNDS = 3
"""Every render option is timed once per round, the rounds interleaved, and its fastest round kept:
on a shared machine the other jobs' load then weighs on every option alike."""


def run(args) -> list[Row]:
    options = {
        BASELINE: {"mode": "faithful"},
        "fast (64x85, no shadows / reflections / MSAA) + resize": {},
        "fast + shadows": {"shadows": True},
        "fast + reflections": {"reflections": True},
        "fast + 4x multisampling": {"multisampling": True},
        "fast settings at 480x640 + resize": {"render_size": (480, 640)},
    }
    envs = {name: _env() for name in options}  # one env each: the fast options change its model
    renderers = {name: TopCameraRenderer(envs[name].physics, SIZE, **{"mode": "fast", **kwargs})
                 for name, kwargs in options.items()}
    best = dict.fromkeys(options, float("inf"))
    try:
        for _ in range(ROUNDS):
            for name, renderer in renderers.items():
                best[name] = min(best[name], time_call(renderer.render, warmup=2, repeats=10, min_seconds=0.5))
    finally:
        for name in options:
            renderers[name].close()
            envs[name].close()
    rows = [Row("aloha_render", "physics only (one 50 Hz control step)", _physics_seconds(), BASELINE)]
    rows += [Row("aloha_render", name, seconds, None if name == BASELINE else BASELINE) for name, seconds in best.items()]
    rows.append(Row("aloha_render", "gym-aloha env.step (physics + three 480x640 renders)", _gym_aloha_step_seconds(), BASELINE))
    return rows


def _env() -> AlohaEnv:
    env = AlohaEnv("transfer_cube", image_size=SIZE)
    env.reset(100000)
    return env


def _physics_seconds() -> float:
    env = _env()
    ctrl = env.physics.data.ctrl  # [left 6 joints, 2 fingers, right 6 joints, 2 fingers]
    hold = np.concatenate([ctrl[0:6], [1.0], ctrl[8:14], [1.0]])
    try:
        return time_call(lambda: env._env.step(hold), warmup=2, repeats=50, min_seconds=0.5)
    finally:
        env.close()


def _gym_aloha_step_seconds() -> float:
    import gym_aloha  # noqa: F401  (registers the gym_aloha/ ids)
    import gymnasium as gym

    env = gym.make("gym_aloha/AlohaTransferCube-v0", obs_type="pixels_agent_pos")
    env.reset(seed=100000)
    action = np.zeros(14, dtype=np.float32)
    try:
        return time_call(lambda: env.step(action), warmup=1, repeats=5, min_seconds=0.0)
    finally:
        env.close()
