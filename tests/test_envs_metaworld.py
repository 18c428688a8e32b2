"""The Meta-World wrapper and the demo collection that goes through it."""

from __future__ import annotations

import importlib.metadata
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("metaworld")

from drifting_vla.data.metaworld_dataset import MetaWorldDataset  # noqa: E402
from drifting_vla.data.metaworld_demos import collection_config, ensure_metaworld_demos, store_dir  # noqa: E402
from drifting_vla.data.rlbench_pickle import CorruptEpisodeError  # noqa: E402
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


def test_store_folder_changes_with_the_installed_simulator_versions(tmp_path, monkeypatch):
    import drifting_vla.data.demo_store as demos

    installed = store_dir(_cfg(tmp_path))
    assert collection_config(_cfg(tmp_path))["simulator"] == {
        "metaworld": importlib.metadata.version("metaworld"), "mujoco": importlib.metadata.version("mujoco")}
    real = importlib.metadata.version
    monkeypatch.setattr(demos.importlib.metadata, "version", lambda package: "99.0" if package == "mujoco" else real(package))
    assert store_dir(_cfg(tmp_path)) != installed  # an upgraded mujoco collects a store of its own


def test_a_store_key_without_the_simulator_installed_says_what_to_install(tmp_path, monkeypatch):
    import drifting_vla.data.demo_store as demos

    def absent(package):
        raise importlib.metadata.PackageNotFoundError(package)

    monkeypatch.setattr(demos.importlib.metadata, "version", absent)
    with pytest.raises(ImportError, match=r"metaworld is not installed.*keyed by the simulator versions.*\[sim\]"):
        store_dir(_cfg(tmp_path))


@pytest.mark.slow
def test_parallel_collection_equals_serial_collection(tmp_path):
    serial = ensure_metaworld_demos(_cfg(tmp_path / "a"), workers=1, progress=False)
    parallel = ensure_metaworld_demos(_cfg(tmp_path / "b"), workers=2, progress=False)
    for name in ("images", "actions", "proprio", "episode_ends"):
        np.testing.assert_array_equal(
            np.load(serial / "reach-v3" / f"{name}.npy"), np.load(parallel / "reach-v3" / f"{name}.npy")
        )


def test_demos_cut_short_or_damaged_on_disk_are_collected_again_and_killed_writes_cleared(tmp_path, capsys):
    store = ensure_metaworld_demos(_cfg(tmp_path), progress=False)
    task = store / "reach-v3"
    written = {name: np.load(task / f"{name}.npy") for name in ("images", "actions")}
    killed = store / ".reach-v3.partial-99999"  # a writer killed before its rename
    killed.mkdir()
    (killed / "images.npy").write_bytes(b"\x93NUMPY")
    for damage in ("cut short", "same size"):
        actions = task / "actions.npy"
        data = bytearray(actions.read_bytes())
        if damage == "cut short":
            data = data[: len(data) // 2]
        else:
            data[-5] ^= 0x40
        actions.write_bytes(bytes(data))
        with pytest.raises(CorruptEpisodeError, match="reach-v3.*actions.npy.*collect_demos"):
            MetaWorldDataset(store, ["reach-v3"], ["corner"], horizon=4)
        assert ensure_metaworld_demos(_cfg(tmp_path), progress=False) == store
        assert "reach-v3: the demos in" in capsys.readouterr().out
        for name, array in written.items():
            np.testing.assert_array_equal(np.load(task / f"{name}.npy"), array)
    assert not killed.exists()


COLLECT_ELSEWHERE = """
import json, sys, time
import numpy as np
from drifting_vla.data.metaworld_dataset import write_task_store
from drifting_vla.data.metaworld_demos import collection_config, store_dir
from drifting_vla.formats.files import FileLock
cfg = json.loads(sys.argv[1])
out = store_dir(cfg)
lock = FileLock(out / ".lock", "the store", "").acquire()
print("collecting", flush=True)
time.sleep(1.5)
(out / "collection.json").write_text(json.dumps(collection_config(cfg)))
steps = 3
episode = {"images": np.zeros((steps, 2, 3, 32, 32), np.uint8), "proprio": np.zeros((steps, 4), np.float32),
           "state": np.zeros((steps, 39), np.float32), "actions": np.zeros((steps, 4), np.float32), "seed": 0}
write_task_store(out / "reach-v3", [episode], {"instruction": "reach"})
lock.release()
"""


def test_a_second_process_waits_for_the_collection_in_progress_and_reads_it(tmp_path, monkeypatch, capsys):
    import drifting_vla.data.demo_store as demos

    cfg = _cfg(tmp_path)
    other = subprocess.Popen([sys.executable, "-c", COLLECT_ELSEWHERE, json.dumps(cfg)], stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": str(pathlib.Path(__file__).resolve().parents[1])})
    assert other.stdout.readline() == "collecting\n"

    def collect_again(job):
        raise AssertionError("collected a store another process was collecting")

    monkeypatch.setattr(demos, "_collect_one", collect_again)
    store = ensure_metaworld_demos(cfg, progress=False)
    assert other.wait(timeout=60) == 0
    assert f"is in use by process {other.pid}" in capsys.readouterr().err
    assert MetaWorldDataset(store, ["reach-v3"], ["corner"], horizon=2)[0]["instruction"] == "reach"
