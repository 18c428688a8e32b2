"""The Meta-World wrapper and the demo collection that goes through it."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("metaworld")

from drifting_vla.data.metaworld_dataset import MetaWorldDataset  # noqa: E402
from drifting_vla.data.metaworld_demos import ensure_metaworld_demos, store_dir  # noqa: E402
from drifting_vla.envs.metaworld_env import (  # noqa: E402
    MT10_TASKS,
    TASK_INSTRUCTIONS,
    MetaWorldEnv,
    run_expert_episode,
)


@pytest.fixture(scope="module")
def env():
    with MetaWorldEnv("reach-v3", cameras=("corner", "topview"), image_size=32, max_episode_steps=100) as e:
        yield e


def _cfg(root, **kw):
    cfg = {
        "root": str(root),
        "tasks": ["reach-v3"],
        "cameras": ["corner", "topview"],
        "image_size": 32,
        "max_episode_steps": 100,
        "train_seeds": {"start": 0, "count": 2},
        "collect_workers": 1,
    }
    return {**cfg, **kw}


def test_observation_matches_the_sample_contract(env):
    obs = env.reset(seed=0)
    assert obs["images"].dtype == np.uint8 and obs["images"].shape == (2, 3, 32, 32)
    assert obs["proprio"].dtype == np.float32 and obs["proprio"].shape == (4,)
    assert obs["instruction"] == TASK_INSTRUCTIONS["reach-v3"] and obs["task"] == "reach-v3"
    assert "state" not in obs
    assert env.render().shape == (256, 256, 3)


def test_reset_is_a_function_of_the_seed(env):
    a, b = env.reset(seed=3), env.reset(seed=4)
    c = env.reset(seed=3)
    np.testing.assert_array_equal(a["images"], c["images"])
    assert not np.array_equal(a["images"], b["images"])  # the goal moved


def test_expert_solves_reach_and_step_reports_success(env):
    episode = run_expert_episode(env, seed=1)
    assert episode["success"] and len(episode["actions"]) < 100
    assert episode["images"].shape[1:] == (2, 3, 32, 32)


def test_every_mt10_task_has_an_instruction():
    assert set(MT10_TASKS) <= set(TASK_INSTRUCTIONS) and len(TASK_INSTRUCTIONS) == 50


def test_unknown_task_and_camera_are_clear_errors():
    with pytest.raises(ValueError, match="unknown Meta-World task 'reach'.*reach-v3"):
        MetaWorldEnv("reach")
    with pytest.raises(ValueError, match="camera.*front.*gripperPOV"):
        MetaWorldEnv("reach-v3", cameras=("front",))


def test_demos_hold_the_observations_the_env_gives(tmp_path, env):
    store = ensure_metaworld_demos(_cfg(tmp_path), progress=False)
    ds = MetaWorldDataset(store, ["reach-v3"], ["corner", "topview"], horizon=4)
    obs = env.reset(seed=0)
    first = ds[0]
    np.testing.assert_array_equal(first["images"].numpy(), obs["images"])
    np.testing.assert_array_equal(first["proprio"].numpy(), obs["proprio"])
    assert first["instruction"] == obs["instruction"]
    mtime = (store / "reach-v3" / "images.npy").stat().st_mtime_ns
    assert ensure_metaworld_demos(_cfg(tmp_path), progress=False) == store  # cached: not collected again
    assert (store / "reach-v3" / "images.npy").stat().st_mtime_ns == mtime


def test_env_from_config_uses_the_collection_settings():
    cfg = {"cameras": ["topview"], "image_size": 24, "max_episode_steps": 10}
    with MetaWorldEnv.from_config(cfg, "drawer-close-v3") as e:
        assert e.reset(seed=0)["images"].shape == (1, 3, 24, 24) and e.max_episode_steps == 10


def test_store_folder_changes_with_the_collection_settings(tmp_path):
    assert store_dir(_cfg(tmp_path)) != store_dir(_cfg(tmp_path, image_size=64))
    assert store_dir(_cfg(tmp_path)) == store_dir(_cfg(tmp_path, tasks=["push-v3"]))


@pytest.mark.slow
def test_parallel_collection_equals_serial_collection(tmp_path):
    serial = ensure_metaworld_demos(_cfg(tmp_path / "a"), workers=1, progress=False)
    parallel = ensure_metaworld_demos(_cfg(tmp_path / "b"), workers=2, progress=False)
    for name in ("images", "actions", "proprio", "episode_ends"):
        np.testing.assert_array_equal(
            np.load(serial / "reach-v3" / f"{name}.npy"), np.load(parallel / "reach-v3" / f"{name}.npy")
        )
