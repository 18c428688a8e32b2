"""The demo store shared by the Meta-World and ALOHA demos: the folder each shipped config's demos
live in (users' caches), and collection, on a simulator-free suite."""

from __future__ import annotations

import importlib.metadata
import json

import numpy as np
import pytest

from drifting_vla.configs import data_config
from drifting_vla.data import aloha_demos, demo_store, metaworld_demos
from drifting_vla.data.metaworld_dataset import MetaWorldDataset, read_task_meta
from drifting_vla.envs import close_reused_env, reused_env
from drifting_vla.envs.base_env import BaseEnv, StepResult

COMMON_KEYS = {"format_version", "image_size", "max_episode_steps", "train_seeds", "simulator", "cameras", "expert"}
STORES = {
    # config: (suite module, the keys of its collection config, its store folder with every simulator package at 1.0)
    "metaworld": (metaworld_demos, COMMON_KEYS | {"observe_goal"}, "ecd7007cd4be"),
    "metaworld_mt10": (metaworld_demos, COMMON_KEYS | {"observe_goal"}, "f1867f456e11"),
    "metaworld_multimodal": (metaworld_demos, COMMON_KEYS | {"observe_goal", "expert_version"}, "0db209141129"),
    "aloha_transfer_cube": (aloha_demos, COMMON_KEYS | {"render_mode", "expert_version"}, "85c07014ccd7"),
    "aloha_insertion": (aloha_demos, COMMON_KEYS | {"render_mode", "expert_version"}, "85c07014ccd7"),
    "aloha_transfer_cube_bimodal": (aloha_demos, COMMON_KEYS | {"render_mode", "expert_version"}, "467b8e0e926e"),
}


@pytest.mark.parametrize("name", sorted(STORES))
def test_the_shipped_configs_keep_their_store_folders(name, monkeypatch, tmp_path):
    """A changed key, value or hash moves every user's cached demos (minutes to hours of collection
    each): change a pinned folder only with a change that must collect new demos (FORMAT_VERSION,
    an expert's EXPERT_VERSION)."""
    suite, keys, folder = STORES[name]
    monkeypatch.setattr(importlib.metadata, "version", lambda package: "1.0")
    cfg = {**data_config(name), "root": str(tmp_path)}
    assert set(suite.collection_config(cfg)) == keys
    assert suite.store_dir(cfg) == tmp_path / folder


class CountingEnv(BaseEnv):
    """Episodes of 3 + seed % 2 steps whose arrays hold the seed; every third seed fails, odd
    seeds go route `b`, even ones `a`."""

    built: list[tuple[str, int]] = []
    closed = 0

    def __init__(self, task: str, image_size: int, max_episode_steps: int) -> None:
        self.task, self.instruction, self.image_size, self.max_episode_steps = task, f"do {task}", image_size, max_episode_steps
        CountingEnv.built.append((task, image_size))

    @classmethod
    def from_config(cls, data_cfg, task: str) -> CountingEnv:
        return cls(task, int(data_cfg["image_size"]), int(data_cfg["max_episode_steps"]))

    def reset(self, seed: int) -> dict:
        return {}

    def step(self, action: np.ndarray) -> StepResult:
        return StepResult({}, 0.0, True, True)

    def render(self) -> np.ndarray:
        return np.zeros((4, 4, 3), np.uint8)

    def close(self) -> None:
        CountingEnv.closed += 1


def counting_episode(env: CountingEnv, seed: int) -> dict:
    steps, size = 3 + seed % 2, env.image_size
    route = "b" if seed % 2 else "a"
    return {"images": np.full((steps, 1, 3, size, size), seed, np.uint8), "proprio": np.full((steps, 2), seed, np.float32),
            "state": np.full((steps, 3), seed, np.float32), "actions": np.full((steps, 2), seed, np.float32),
            "success": seed % 3 != 0, "seed": seed, "route": route, "mode": route}


def counting_settings(cfg) -> dict:
    return {"cameras": ["top"], "expert": "counting"}


SUITE = demo_store.DemoSuite(name="Counting", default_root="unused", simulator_packages=("numpy",),
                             instructions={"count": "do count", "tally": "do tally"}, settings=counting_settings,
                             env=CountingEnv, run_episode=counting_episode)


def _cfg(root, **kw) -> dict:
    return {"root": str(root), "tasks": ["count", "tally"], "image_size": 4, "max_episode_steps": 5,
            "train_seeds": {"start": 0, "count": 6}, "collect_workers": 1, **kw}


def test_the_store_keeps_the_successes_in_seed_order_and_records_the_rest(tmp_path):
    store = SUITE.ensure_demos(_cfg(tmp_path), progress=False)
    assert json.loads((store / "collection.json").read_text()) == SUITE.collection_config(_cfg(tmp_path))
    meta, ends = read_task_meta(store / "tally")
    kept = [1, 2, 4, 5]
    assert meta["instruction"] == "do tally" and meta["failed_seeds"] == [0, 3]
    assert (meta["episodes_attempted"], meta["episodes_kept"], meta["steps"]) == (6, 4, 14)
    assert meta["routes"] == meta["modes"] == ["b", "a", "a", "b"]
    assert ends.tolist() == np.cumsum([3 + s % 2 for s in kept]).tolist()
    assert np.load(store / "tally" / "seeds.npy").tolist() == kept
    sample = MetaWorldDataset(store, ["count"], ["top"], horizon=2)[0]
    assert sample["instruction"] == "do count" and sample["images"].shape == (1, 3, 4, 4)


def test_a_whole_store_is_read_without_collecting_again(tmp_path, monkeypatch):
    store = SUITE.ensure_demos(_cfg(tmp_path), progress=False)
    mtime = (store / "count" / "images.npy").stat().st_mtime_ns

    def collect_again(job):
        raise AssertionError("collected a whole store again")

    monkeypatch.setattr(demo_store, "_collect_one", collect_again)
    assert SUITE.ensure_demos(_cfg(tmp_path), progress=False) == store
    assert (store / "count" / "images.npy").stat().st_mtime_ns == mtime


def test_one_worker_reuses_one_env_per_task_and_closes_the_last(tmp_path):
    CountingEnv.built, CountingEnv.closed = [], 0
    SUITE.ensure_demos(_cfg(tmp_path), progress=False)
    assert CountingEnv.built == [("count", 4), ("tally", 4)] and CountingEnv.closed == 2


def test_spawned_workers_collect_what_one_worker_collects(tmp_path):
    serial = SUITE.ensure_demos(_cfg(tmp_path / "a"), progress=False)
    parallel = SUITE.ensure_demos(_cfg(tmp_path / "b"), workers=2, progress=False)
    for task in ("count", "tally"):
        for name in ("images", "actions", "episode_ends", "seeds"):
            np.testing.assert_array_equal(np.load(serial / task / f"{name}.npy"), np.load(parallel / task / f"{name}.npy"))


def test_an_unknown_task_names_the_suite_and_the_valid_tasks(tmp_path):
    with pytest.raises(ValueError, match=r"unknown Counting task 'cont'; valid names: \['count', 'tally'\]"):
        SUITE.ensure_demos(_cfg(tmp_path, tasks=["cont"]), progress=False)


def test_a_reused_env_is_rebuilt_when_the_task_or_the_settings_change():
    CountingEnv.built, CountingEnv.closed = [], 0
    cfg = {"image_size": 4, "max_episode_steps": 5}
    first = reused_env(CountingEnv, cfg, "count")
    assert reused_env(CountingEnv, dict(cfg), "count") is first
    reused_env(CountingEnv, cfg, "tally")
    reused_env(CountingEnv, {**cfg, "image_size": 8}, "tally")
    close_reused_env()
    assert CountingEnv.built == [("count", 4), ("tally", 4), ("tally", 8)] and CountingEnv.closed == 3
