"""The scripted ALOHA demonstrations, collected (and cached) by the shared demo store
(`demo_store.py`: its layout, hashing and guarantees), and their export to LeRobot v3.0.

    store = ensure_aloha_demos(data_cfg)          # collects what is missing, returns the store dir
    export_aloha_store(store, out, tasks, eval_seeds)   # LeRobot's ALOHA layout, fps 50

The store holds, per task:

    images  uint8 [N, 1, 3, S, S]  the top camera      proprio float32 [N, 14]  joint positions
    state   float32 [N, nq]        every joint (arms, objects' free joints)
    actions float32 [N, 14]        the joint targets the expert sent at that step

Episode k of a task replays the expert from `reset(seed=train_seeds.start + k)`; a replay that never
reaches reward 4 is dropped (its seed listed in meta.json as failed). On the two-route variant
meta.json records the route each kept episode was planned along (`routes`) and took (`modes`).
The hash covers the settings, the expert's version and the installed gym-aloha, dm-control and
mujoco versions, so a changed simulator or plan never reads stale demos.
"""

from __future__ import annotations

import pathlib

from drifting_vla.data.demo_store import DemoSuite
from drifting_vla.data.metaworld_dataset import open_task_arrays, read_collection, read_task_meta
from drifting_vla.envs.aloha_env import INSTRUCTIONS, AlohaEnv, run_expert_episode
from drifting_vla.envs.aloha_experts import EXPERT_VERSION
from drifting_vla.formats.config import AlohaDataConfig

FPS = 50
JOINT_NAMES = [f"{arm}_{joint}" for arm in ("left", "right")
               for joint in ("waist", "shoulder", "elbow", "forearm_roll", "wrist_angle", "wrist_rotate", "gripper")]
"""LeRobot's ALOHA order: per arm (left, then right) 6 joints and the normalised gripper."""


def _settings(cfg) -> dict:
    return {
        "cameras": ["top"],
        "render_mode": str(cfg.get("render_mode", "fast")),
        "expert": str(cfg.get("expert", "scripted")),
        "expert_version": EXPERT_VERSION,
    }


ALOHA = DemoSuite(name="ALOHA", default_root=AlohaDataConfig.root, simulator_packages=("gym-aloha", "dm-control", "mujoco"),
                  instructions=INSTRUCTIONS, settings=_settings, env=AlohaEnv, run_episode=run_expert_episode)
collection_config, store_dir, ensure_aloha_demos = ALOHA.collection_config, ALOHA.store_dir, ALOHA.ensure_demos


def export_aloha_store(store: str | pathlib.Path, output: str | pathlib.Path, tasks: list[str], eval_seeds: dict,
                       vcodec: str = "libsvtav1") -> pathlib.Path:
    """The demos of `tasks` as a LeRobot v3.0 dataset with LeRobot's ALOHA feature names:
    `observation.images.top` (video), `observation.state` (14), `action` (14), fps 50, and
    `observation.environment_state` (every joint). meta/drifting_vla.json names this simulator,
    so `data=lerobot data.root=<output> data.cameras=[observation.images.top]` evaluates in it."""
    from drifting_vla.data.lerobot_writer import LeRobotWriter

    store = pathlib.Path(store)
    collection = read_collection(store)
    size = int(collection["image_size"])
    task_names, nq = {}, None
    writer = None
    for task in tasks:
        meta, ends = read_task_meta(store / task)
        arrays = open_task_arrays(store / task)
        if writer is None:
            nq = int(arrays["state"].shape[1])
            writer = LeRobotWriter(output, fps=FPS, cameras={"observation.images.top": (size, size)},
                                   state_names=JOINT_NAMES, action_names=JOINT_NAMES, vcodec=vcodec, robot_type="aloha",
                                   extra_features={"observation.environment_state": [f"qpos_{i}" for i in range(nq)]})
        task_names[meta["instruction"]] = task
        for start, end in zip([0, *ends[:-1]], ends, strict=True):
            writer.add_episode(
                meta["instruction"],
                {"observation.images.top": arrays["images"][start:end, 0].transpose(0, 2, 3, 1)},
                {"observation.state": arrays["proprio"][start:end], "action": arrays["actions"][start:end],
                 "observation.environment_state": arrays["state"][start:end]},
            )
    if writer is None:
        raise ValueError("export_aloha_store: no tasks given")
    simulator = {
        "name": "aloha", "tasks": list(tasks), "cameras": {"observation.images.top": "top"},
        "image_size": size, "render_mode": collection["render_mode"], "expert": collection["expert"],
        "max_episode_steps": int(collection["max_episode_steps"]),
        "train_seeds": dict(collection["train_seeds"]), "eval_seeds": {k: int(v) for k, v in dict(eval_seeds).items()},
    }
    return writer.finalize({"task_names": task_names, "simulator": simulator})
