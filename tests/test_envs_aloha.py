"""The ALOHA suite: env wrapper layout, seeded scenes, inverse kinematics, scripted experts,
renderer modes, the demo store and its LeRobot export.

The slow tests replay whole 400-step episodes (a few seconds each with the fast renderer, over a
minute with the faithful one):

    MUJOCO_GL=egl python -m pytest tests/test_envs_aloha.py -m slow
"""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("gym_aloha")

from drifting_vla.configs import data_config  # noqa: E402
from drifting_vla.data.aloha_demos import JOINT_NAMES, export_aloha_store  # noqa: E402
from drifting_vla.data.metaworld_dataset import MetaWorldDataset, write_task_store  # noqa: E402
from drifting_vla.envs import make_env, simulation_config  # noqa: E402
from drifting_vla.envs.aloha_env import AlohaEnv, HandoverTracker, object_pose, run_expert_episode  # noqa: E402
from drifting_vla.envs.aloha_experts import (  # noqa: E402
    DOWN_RIGHT,
    HELD_BELOW,
    ROUTE_MEETS,
    ArmKinematics,
    plan_for,
    route_for_seed,
    start_poses,
)
from drifting_vla.envs.seeds import evaluation_seeds  # noqa: E402

CONFIGS = ("aloha_transfer_cube", "aloha_insertion", "aloha_transfer_cube_bimodal")


@pytest.fixture(scope="module")
def env():
    env = AlohaEnv("transfer_cube", image_size=16, max_episode_steps=400)
    yield env
    env.close()


def test_observation_and_action_layout(env):
    obs = env.reset(3)
    assert obs["images"].shape == (1, 3, 16, 16) and obs["images"].dtype == np.uint8
    assert obs["proprio"].shape == (14,) and obs["proprio"].dtype == np.float32
    assert obs["task"] == "transfer_cube" and "cube" in obs["instruction"]
    # proprio: per arm 6 joints + normalised gripper, left first; the reset pose is gym-aloha's
    from gym_aloha.constants import START_ARM_POSE

    assert np.allclose(obs["proprio"][[0, 1, 2, 3, 4, 5]], START_ARM_POSE[:6], atol=1e-4)
    assert np.allclose(obs["proprio"][[7, 8, 9, 10, 11, 12]], START_ARM_POSE[8:14], atol=1e-4)
    hold = np.concatenate([obs["proprio"][:6], [1.0], obs["proprio"][7:13], [1.0]])
    result = env.step(hold)
    assert result.observation["images"].shape == (1, 3, 16, 16) and not result.done and not result.success
    assert result.info["stage"] == 0 and result.info["stage_names"][-1] == "transferred"
    with pytest.raises(ValueError, match="non-finite"):
        env.step(np.full(14, np.nan))
    with pytest.raises(ValueError, match="14 values"):
        env.step(np.zeros(7))


def test_reset_places_the_objects_as_gym_aloha_does_for_the_same_seed(env):
    from gym_aloha.utils import sample_box_pose

    for seed in (0, 7):
        env.reset(seed)
        assert np.allclose(env.physics.data.qpos[16:23], sample_box_pose(seed))
        assert np.allclose(object_pose("transfer_cube", seed), sample_box_pose(seed))
    a, b = env.reset(5)["images"], env.reset(5)["images"]
    assert np.array_equal(a, b)


def test_config_builds_the_env_through_the_registry_and_seeds_are_disjoint():
    for name in CONFIGS:
        cfg = data_config(name)
        train = set(range(cfg["train_seeds"]["start"], cfg["train_seeds"]["start"] + cfg["train_seeds"]["count"]))
        assert not train & set(evaluation_seeds(cfg)), name
        assert cfg["max_episode_steps"] == 400 and cfg["proprio_dim"] == 14
        assert sum(c["dim"] for c in cfg["action_spec"]["components"]) == 14
    with make_env(data_config("aloha_insertion"), "insertion") as env:
        assert env.reset(0)["images"].shape == (1, 3, 64, 64)
    with pytest.raises(ValueError, match="unknown ALOHA task"):
        AlohaEnv("fold_laundry")


def test_inverse_kinematics_reaches_the_plans_poses(env):
    env.reset(0)
    model, qpos0 = env.physics.model.ptr, env.physics.data.qpos.copy()
    kinematics = ArmKinematics(model)
    target = object_pose("transfer_cube", 0)[:3] + [0, 0, 0.1]
    qpos = kinematics.solve(qpos0, "right", target, DOWN_RIGHT)
    point, rotation = kinematics.grasp_pose(qpos, "right")
    assert np.linalg.norm(point - target) < 1e-3 and np.allclose(rotation, DOWN_RIGHT, atol=1e-2)
    assert np.array_equal(qpos[:8], qpos0[:8])  # the other arm is left alone


def test_joint_replay_follows_the_end_effector_plan(env):
    """The joint targets from IK, replayed through the position actuators, put the right
    gripper where the plan says (above the cube at step 90) within 1.5 cm."""
    actions = env.expert_actions(0)
    env.reset(0)
    model, qpos0 = env.physics.model.ptr, env.physics.data.qpos.copy()
    plan = plan_for("transfer_cube", object_pose("transfer_cube", 0), start_poses(model, qpos0))
    for action in actions[:90]:
        env.step(action)
    reached, _ = ArmKinematics(model).grasp_pose(env.physics.data.qpos.copy(), "right")
    planned, _, opening = plan.at("right", 90)
    assert np.linalg.norm(reached - planned) < 0.015
    assert actions[89, 13] == pytest.approx(opening)


def test_route_labels_follow_where_the_left_gripper_takes_the_cube():
    routes = [route_for_seed(s) for s in range(200)]
    assert 0.4 < routes.count("early_high") / 200 < 0.6 and routes == [route_for_seed(s) for s in range(200)]
    for route, meet in ROUTE_MEETS.items():
        tracker = HandoverTracker()
        assert tracker.update(2, meet) == "none"  # lifted, not yet touched by the left gripper
        assert tracker.update(3, meet - [0, 0, HELD_BELOW]) == route
        assert tracker.update(4, np.zeros(3)) == route  # the first touch decides
    assert HandoverTracker().update(4, np.array([0.0, 0.5, 0.5])) == "other"


def _short_store(tmp_path, steps: int = 12):
    """A store of two 12-step expert replays at 16x16, written as the collector writes it."""
    env = AlohaEnv("transfer_cube", image_size=16, max_episode_steps=400)
    episodes = []
    for seed in (0, 1):
        actions = env.expert_actions(seed)[:steps]
        episodes.append({**run_expert_episode(env, seed, actions), "task": "transfer_cube"})
    env.close()
    store = tmp_path / "store"
    store.mkdir()
    (store / "collection.json").write_text(json.dumps({"cameras": ["top"], "image_size": 16, "render_mode": "fast",
                                                       "expert": "scripted", "max_episode_steps": 400,
                                                       "train_seeds": {"start": 0, "count": 2}}))
    write_task_store(store / "transfer_cube", episodes, {"instruction": env.instruction})
    return store, episodes


def test_lerobot_export_has_lerobots_aloha_layout_and_loads_with_its_simulator(tmp_path):
    from drifting_vla.data.registry import build_dataset

    store, episodes = _short_store(tmp_path)
    out = export_aloha_store(store, tmp_path / "lerobot", ["transfer_cube"], {"start": 100000, "count": 50}, vcodec="libx264")
    info = json.loads((out / "meta" / "info.json").read_text())
    assert info["fps"] == 50 and info["robot_type"] == "aloha"
    assert info["features"]["observation.images.top"]["dtype"] == "video"
    assert info["features"]["observation.state"]["shape"] == [14] and info["features"]["action"]["shape"] == [14]
    assert info["features"]["observation.state"]["names"] == JOINT_NAMES
    cfg = {**data_config("aloha_lerobot"), "root": str(out), "horizon": 4, "image_size": 16, "holdout_every": 2}
    dataset = build_dataset(cfg, "train")
    native = MetaWorldDataset(store, ["transfer_cube"], ["top"], horizon=4, split="train", holdout_every=2)
    assert len(dataset) == len(native) == 12
    for i in (0, 11):
        a, b = native[i], dataset[i]
        assert np.allclose(a["actions"], b["actions"]) and np.allclose(a["proprio"], b["proprio"])
        assert b["images"].shape == (1, 3, 16, 16)
    sim = simulation_config({**cfg, "simulator": dataset.simulator()})
    assert (sim["name"], sim["tasks"], sim["cameras"], sim["eval_seeds"]["start"]) == ("aloha", ["transfer_cube"], ["top"], 100000)
    with make_env(sim, "transfer_cube") as env:
        assert env.reset(100000)["images"].shape == (1, 3, 16, 16)


@pytest.mark.slow
@pytest.mark.parametrize("task,seeds", [("transfer_cube", (0, 1)), ("insertion", (0,))])
def test_expert_succeeds_on_training_seeds(task, seeds):
    with AlohaEnv(task, image_size=16) as env:
        for seed in seeds:
            assert run_expert_episode(env, seed)["success"], (task, seed)
            assert env.step(env.observation()["proprio"]).info["stage"] == 4  # the stage is the furthest reached


@pytest.mark.slow
def test_two_route_expert_succeeds_on_both_routes_and_labels_them():
    with AlohaEnv("transfer_cube", image_size=16, expert="routes") as env:
        for seed in (0, 3):
            episode = run_expert_episode(env, seed)
            assert episode["success"] and episode["mode"] == episode["route"] == route_for_seed(seed)


@pytest.mark.slow
def test_faithful_and_fast_rendering_give_the_same_episode():
    """Rendering never touches the physics: the same actions from the same seed reach the same
    state and the same success whatever the renderer (the faithful one renders 480x640)."""
    results = []
    for mode in ("fast", "faithful"):
        with AlohaEnv("transfer_cube", image_size=16, render_mode=mode) as env:
            episode = run_expert_episode(env, 0)
            results.append((episode["success"], env.physics.data.qpos.copy(), episode["proprio"]))
    assert results[0][0] and results[1][0]
    assert np.array_equal(results[0][1], results[1][1]) and np.array_equal(results[0][2], results[1][2])
