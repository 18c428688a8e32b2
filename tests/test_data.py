"""Datasets, the safe RLBench reader, the downloader's offline paths, normalization, the queue."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

from drifting_vla.configs import CONFIG_DIR
from drifting_vla.data.collate import collate_samples
from drifting_vla.data.fixtures import write_rlbench_fixture
from drifting_vla.data.metaworld_dataset import MetaWorldDataset, write_task_store
from drifting_vla.data.normalization import Normalizer, compute_stats, dataset_stats
from drifting_vla.data.registry import build_dataset
from drifting_vla.data.rlbench_dataset import (
    POSE_ACTION_SPEC,
    RLBENCH_TASKS,
    RLBenchDataset,
    keyframe_indices,
    load_rlbench_episode,
)
from drifting_vla.data.rlbench_download import (
    DownloadError,
    check_request,
    download_rlbench,
    unpack_task_zip,
)
from drifting_vla.data.rlbench_pickle import (
    CorruptEpisodeError,
    UnsafePickleError,
    load_rlbench_pickle,
    loads_rlbench,
)
from drifting_vla.data.sample_queue import SampleQueue
from drifting_vla.data.sampler import SampleKey
from drifting_vla.data.transforms import action_window, canonical_quaternion
from drifting_vla.rotations import quaternion_to_rotation6d
from drifting_vla.specs import METAWORLD_ACTION_SPEC, RLBENCH_ACTION_SPEC, ActionSpec

SAMPLE_KEYS = {"images", "proprio", "instruction", "actions", "action_mask", "task"}


@pytest.fixture(scope="module")
def rlbench_root(tmp_path_factory):
    return write_rlbench_fixture(tmp_path_factory.mktemp("rlbench"), tasks=("close_jar", "open_drawer"))


def _episode(root, task="close_jar", n=0):
    return root / task / "all_variations" / "episodes" / f"episode{n}"


def _assert_sample(sample, views, size, proprio, horizon, action_dim):
    assert set(sample) == SAMPLE_KEYS
    assert sample["images"].dtype == torch.uint8 and sample["images"].shape == (views, 3, size, size)
    assert sample["proprio"].dtype == torch.float32 and sample["proprio"].shape == (proprio,)
    assert sample["actions"].dtype == torch.float32 and sample["actions"].shape == (horizon, action_dim)
    assert sample["action_mask"].dtype == torch.bool and sample["action_mask"].shape == (horizon,)
    assert isinstance(sample["instruction"], str) and isinstance(sample["task"], str)


# --- the restricted unpickler -------------------------------------------------------------------


def test_pickle_naming_os_system_is_refused_not_executed(tmp_path):
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    with pytest.raises(UnsafePickleError, match="os.system|posix.system"):
        loads_rlbench(pickle.dumps(Evil()))
    assert not marker.exists()


def test_pickle_naming_builtins_eval_is_refused():
    payload = b"cbuiltins\neval\n(S'1+1'\ntR."
    with pytest.raises(UnsafePickleError, match="builtins.eval"):
        loads_rlbench(payload)


def test_numpy_arrays_and_plain_values_load(tmp_path):
    value = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.float64(2.5), "c": [1, "x"]}
    for protocol in (0, 2, 4, 5):
        out = loads_rlbench(pickle.dumps(value, protocol=protocol))
        np.testing.assert_array_equal(out["a"], value["a"])
        assert out["b"] == 2.5 and out["c"] == [1, "x"]


def test_episode_reads_without_rlbench_installed(rlbench_root):
    ep = load_rlbench_episode(_episode(rlbench_root))
    assert "rlbench" not in sys.modules
    assert ep.instructions[0] == "close jar"
    assert ep.gripper_pose.shape == (10, 7) and ep.gripper_open.shape == (10,)
    assert ep.joint_positions.shape == (10, 7)
    assert ep.rgb("front", 0).shape == (16, 16, 3)
    np.testing.assert_allclose(ep.depth("front", 0), 0.01 + 0.5 * 4.5, atol=1e-5)


def test_quaternions_are_unit_and_sign_canonical(rlbench_root):
    ep = load_rlbench_episode(_episode(rlbench_root))
    q = ep.gripper_pose[:, 3:]
    np.testing.assert_allclose(np.linalg.norm(q, axis=1), 1.0, atol=1e-5)
    assert (q[:, 3] >= 0).all()


def test_truncated_pickle_raises_naming_the_file(tmp_path):
    root = write_rlbench_fixture(tmp_path, episodes=2, steps=6)
    bad = _episode(root, n=1) / "low_dim_obs.pkl"
    bad.write_bytes(bad.read_bytes()[:50])
    with pytest.raises(CorruptEpisodeError, match="episode1/low_dim_obs.pkl"):
        RLBenchDataset(root, ["close_jar"], ["front"], horizon=2)
    ds = RLBenchDataset(root, ["close_jar"], ["front"], horizon=2, skip_corrupt=True)
    assert len(ds.skipped) == 1 and len(ds.episodes) == 1


def test_a_non_finite_pose_is_refused_naming_the_episode_step_and_field(tmp_path):
    from drifting_vla.data.fixtures import _fake_rlbench_modules

    root = write_rlbench_fixture(tmp_path, episodes=2, steps=6)
    path = _episode(root, n=1) / "low_dim_obs.pkl"
    with _fake_rlbench_modules():  # our own fixture file, read with plain pickle to damage it
        demo = pickle.loads(path.read_bytes())
        demo._observations[3].gripper_pose[2] = np.nan
        path.write_bytes(pickle.dumps(demo))
    with pytest.raises(CorruptEpisodeError, match=r"episode1/low_dim_obs.pkl: observation 3 has a non-finite gripper_pose .*nan"):
        RLBenchDataset(root, ["close_jar"], ["front"], horizon=2)
    assert len(RLBenchDataset(root, ["close_jar"], ["front"], horizon=2, skip_corrupt=True).episodes) == 1


def test_pickles_of_another_shape_name_the_file(tmp_path):
    root = write_rlbench_fixture(tmp_path, episodes=2, steps=6)
    (_episode(root, n=1) / "variation_number.pkl").write_bytes(pickle.dumps([1, 2]))
    with pytest.raises(CorruptEpisodeError, match="episode1/variation_number.pkl holds a list.*skip_corrupt"):
        RLBenchDataset(root, ["close_jar"], ["front"], horizon=2)
    assert len(RLBenchDataset(root, ["close_jar"], ["front"], horizon=2, skip_corrupt=True).episodes) == 1


def test_missing_image_and_missing_camera_are_clear_errors(tmp_path):
    root = write_rlbench_fixture(tmp_path, episodes=1, steps=6)
    (_episode(root) / "front_rgb" / "5.png").unlink()
    with pytest.raises(CorruptEpisodeError, match="front_rgb/5.png"):
        RLBenchDataset(root, ["close_jar"], ["front"], horizon=2)
    with pytest.raises(CorruptEpisodeError, match="camera 'overhead' missing.*present"):
        RLBenchDataset(root, ["close_jar"], ["wrist", "overhead"], horizon=2)


def test_corrupt_png_raises_naming_the_file(tmp_path):
    root = write_rlbench_fixture(tmp_path, episodes=1, steps=6)
    (_episode(root) / "wrist_rgb" / "0.png").write_bytes(b"not a png")
    ds = RLBenchDataset(root, ["close_jar"], ["wrist"], horizon=2)
    with pytest.raises(CorruptEpisodeError, match="wrist_rgb/0.png"):
        ds[0]


def _damage(file, how):
    """Truncate `file`, or flip bytes in its middle at the same size."""
    data = bytearray(file.read_bytes())
    if how == "truncated":
        file.write_bytes(bytes(data[: len(data) // 2]))
        return
    middle = len(data) // 2
    data[middle : middle + 8] = bytes(b ^ 0xFF for b in data[middle : middle + 8])
    file.write_bytes(bytes(data))


RLBENCH_CONFIG = {"name": "rlbench", "tasks": ["close_jar"], "cameras": ["front"], "horizon": 2, "image_size": None,
                  "keyframes": False, "cache_dir": None, "action_spec": RLBENCH_ACTION_SPEC.to_config()}


@pytest.mark.parametrize("how", ["truncated", "same size"])
def test_a_frame_damaged_mid_episode_names_the_file_or_is_replaced_the_same_way_every_time(tmp_path, how):
    root = write_rlbench_fixture(tmp_path / "train", episodes=2, steps=6)
    _damage(_episode(root, n=1) / "front_rgb" / "3.png", how)
    damaged = 5 + 3  # episode 1, step 3: five samples per episode
    strict = build_dataset({**RLBENCH_CONFIG, "root": str(tmp_path)})
    with pytest.raises(CorruptEpisodeError, match="episode1/front_rgb/3.png.*skip_corrupt=true"):
        strict[damaged]

    skipping = build_dataset({**RLBENCH_CONFIG, "root": str(tmp_path), "skip_corrupt": True})
    key = SampleKey(damaged, draw=7)
    replacement = skipping[key]
    assert any(torch.equal(replacement["images"], strict[j]["images"]) for j in range(len(strict)) if j != damaged)
    again = build_dataset({**RLBENCH_CONFIG, "root": str(tmp_path), "skip_corrupt": True})[key]  # a resumed run, another worker
    for name in ("images", "actions", "proprio"):
        assert torch.equal(again[name], replacement[name])
    assert torch.equal(skipping[damaged - 1]["images"], strict[damaged - 1]["images"])  # readable samples untouched
    assert len(skipping) == len(strict) and skipping.all_actions().shape == strict.all_actions().shape


@pytest.mark.parametrize("how", ["truncated", "same size", "without its sha256"])
def test_a_damaged_frame_cache_is_rebuilt_from_the_episode(rlbench_root, tmp_path, caplog, how):
    # at the same size, the shape still fits: only the sha256 beside the cache tells wrong pixels
    ds = RLBenchDataset(rlbench_root, ["close_jar"], ["front"], horizon=2, cache_dir=tmp_path)
    expected = [ds[i]["images"] for i in range(len(ds))]
    cache = next(tmp_path.rglob("*.npy"))
    if how == "without its sha256":  # a cache of an earlier version, which cannot be checked
        cache.with_name(cache.name + ".sha256").unlink()
    _damage(cache, "truncated" if how == "truncated" else "same size")
    with caplog.at_level("WARNING"):
        rebuilt = RLBenchDataset(rlbench_root, ["close_jar"], ["front"], horizon=2, cache_dir=tmp_path)
        assert all(torch.equal(rebuilt[i]["images"], expected[i]) for i in range(len(rebuilt)))
    assert cache.name in caplog.text and "decoding the episode again" in caplog.text


def test_unknown_task_lists_the_18_names(rlbench_root):
    with pytest.raises(ValueError, match="open_drawer.*place_cups"):
        RLBenchDataset(rlbench_root, ["close_jars"], ["front"], horizon=2)
    assert len(RLBENCH_TASKS) == 18


def test_task_folder_absent_points_to_the_downloader(tmp_path):
    with pytest.raises(FileNotFoundError, match="download_rlbench_data.py"):
        RLBenchDataset(tmp_path, ["stack_cups"], ["front"], horizon=2)


# --- RLBench samples ------------------------------------------------------------------------------


def test_rlbench_dense_samples_follow_the_contract(rlbench_root, tmp_path):
    ds = RLBenchDataset(rlbench_root, ["close_jar", "open_drawer"], ["front", "wrist"], horizon=4, cache_dir=tmp_path)
    assert len(ds) == 2 * 2 * 9  # tasks * episodes * (steps - 1)
    _assert_sample(ds[0], 2, 16, 8, 4, 9)
    ep = ds.episodes[0]
    np.testing.assert_allclose(ds[0]["actions"][:, :8].numpy(), ep.actions()[1:5])
    np.testing.assert_array_equal(ds[0]["actions"][:, 8].numpy(), ep.ignore_collisions[0:4])
    last = ds[8]  # step 8 of a 10-step episode: one real target, three padded
    assert last["action_mask"].tolist() == [True, False, False, False]
    assert torch.equal(last["actions"][1], last["actions"][0])


def test_rlbench_keyframe_targets_are_the_next_keyframes(rlbench_root):
    ds = RLBenchDataset(rlbench_root, ["close_jar"], ["front"], horizon=2, keyframes=True)
    ep = ds.episodes[0]
    keys = ep.keyframes()
    assert keys == [5, 7, 9]
    np.testing.assert_allclose(ds[0]["actions"][:, :8].numpy(), ep.actions()[[5, 7]])
    np.testing.assert_allclose(ds[5]["actions"][0, :8].numpy(), ep.actions()[7])


def test_ignore_collisions_target_of_a_keyframe_is_the_demo_flag_of_the_step_before_it(rlbench_root):
    # PerAct's convention: keyframe k's target is obs[k-1].ignore_collisions, read here straight
    # from the pickle (the fixture records 1.0 at steps 0, 4, 8; the keyframes are 5, 7, 9).
    demo = load_rlbench_pickle(_episode(rlbench_root) / "low_dim_obs.pkl")
    recorded = [float(obs.ignore_collisions) for obs in demo._observations]
    ds = RLBenchDataset(rlbench_root, ["close_jar"], ["front"], horizon=3, keyframes=True)
    keys = ds.episodes[0].keyframes()
    targets = ds[0]["actions"][:, 8].tolist()
    assert targets == [recorded[k - 1] for k in keys] == [1.0, 0.0, 1.0]
    assert targets != [recorded[k] for k in keys]  # the keyframe's own flag would be all 0
    assert ds[5]["actions"][0, 8].item() == recorded[keys[1] - 1]  # from step 5 the next keyframe is 7


def test_demos_without_ignore_collisions_take_the_configured_flag_and_warn_once(tmp_path, caplog):
    root = write_rlbench_fixture(tmp_path, episodes=2, steps=6, records_ignore_collisions=False)
    with caplog.at_level("WARNING", logger="drifting_vla.data.rlbench_dataset"):
        ds = RLBenchDataset(root, ["close_jar"], ["front"], horizon=2, keyframes=True, ignore_collisions=True)
    assert (ds.all_actions()[:, 8] == 1.0).all()
    warnings = [r.getMessage() for r in caplog.records if "ignore_collisions" in r.getMessage()]
    assert len(warnings) == 1 and "2 of 2" in warnings[0] and "data.ignore_collisions=True" in warnings[0]


def test_an_action_spec_without_the_flag_gives_pose_and_gripper_only(rlbench_root):
    ds = RLBenchDataset(rlbench_root, ["close_jar"], ["front"], horizon=2, keyframes=True, action_spec=POSE_ACTION_SPEC)
    np.testing.assert_allclose(ds[0]["actions"].numpy(), ds.episodes[0].actions()[[5, 7]])
    with pytest.raises(ValueError, match="RLBench demos give the action spec"):
        RLBenchDataset(rlbench_root, ["close_jar"], ["front"], horizon=2, action_spec=METAWORLD_ACTION_SPEC)


def test_the_rlbench_data_config_learns_ignore_collisions(rlbench_root):
    cfg = OmegaConf.load(CONFIG_DIR / "data" / "rlbench.yaml")
    cfg.root, cfg.tasks, cfg.cameras, cfg.cache_dir = str(rlbench_root.parent), ["close_jar"], ["front"], None
    ds = build_dataset(cfg, split=rlbench_root.name)
    assert ActionSpec.from_config(cfg.action_spec) == RLBENCH_ACTION_SPEC and ds[0]["actions"].shape == (1, 9)


def test_keyframes_detect_gripper_change_stops_and_the_end():
    gripper = np.array([1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0], dtype=np.float32)
    vel = np.full((12, 7), 1.0)
    vel[2] = 0.0  # a stop
    assert keyframe_indices(gripper, vel) == [2, 5, 11]


def test_png_cache_returns_the_same_images_as_decoding(rlbench_root, tmp_path):
    plain = RLBenchDataset(rlbench_root, ["close_jar"], ["front", "wrist"], horizon=2)
    cached = RLBenchDataset(rlbench_root, ["close_jar"], ["front", "wrist"], horizon=2, cache_dir=tmp_path)
    for i in (0, 3, 10):
        assert torch.equal(plain[i]["images"], cached[i]["images"])
    assert len(list(tmp_path.rglob("*.npy"))) == 2  # one file per episode, decoded once


def test_one_frame_cache_serves_two_data_roots_each_its_own_images(tmp_path):
    first = write_rlbench_fixture(tmp_path / "a", episodes=1, steps=6, seed=0)
    second = write_rlbench_fixture(tmp_path / "b", episodes=1, steps=6, seed=1)  # same names, other images
    cache = tmp_path / "frames"
    for root in (first, second, first):
        cached = RLBenchDataset(root, ["close_jar"], ["front"], horizon=2, cache_dir=cache)
        plain = RLBenchDataset(root, ["close_jar"], ["front"], horizon=2)
        assert torch.equal(cached[0]["images"], plain[0]["images"]), root
    assert len(list(cache.rglob("*.npy"))) == 2


def test_frame_cache_follows_a_changed_episode_and_redecodes_a_file_of_the_wrong_shape(tmp_path):
    from PIL import Image

    root = write_rlbench_fixture(tmp_path / "data", episodes=1, steps=6)
    cache = tmp_path / "frames"
    assert RLBenchDataset(root, ["close_jar"], ["front"], horizon=2, cache_dir=cache)[0]["images"].any()
    frame = _episode(root) / "front_rgb" / "0.png"
    Image.fromarray(np.zeros((16, 16, 3), dtype=np.uint8)).save(frame)
    os.utime(frame, ns=(frame.stat().st_atime_ns, frame.stat().st_mtime_ns + 10**9))
    assert not RLBenchDataset(root, ["close_jar"], ["front"], horizon=2, cache_dir=cache)[0]["images"].any()

    current = max(cache.rglob("*.npy"), key=lambda p: p.stat().st_mtime_ns)  # decoded from the changed frame
    np.save(current, np.zeros((2, 1, 3, 16, 16), dtype=np.uint8))  # another episode's length
    images = RLBenchDataset(root, ["close_jar"], ["front"], horizon=2, cache_dir=cache)[3]["images"]
    assert torch.equal(images, RLBenchDataset(root, ["close_jar"], ["front"], horizon=2)[3]["images"])


def test_rlbench_resizes_to_image_size(rlbench_root):
    ds = RLBenchDataset(rlbench_root, ["close_jar"], ["front"], horizon=2, image_size=8)
    assert ds[0]["images"].shape == (1, 3, 8, 8)


def test_training_instructions_vary_evaluation_instructions_do_not(rlbench_root):
    train = RLBenchDataset(rlbench_root, ["close_jar"], ["front"], horizon=2)
    evaluation = RLBenchDataset(rlbench_root, ["close_jar"], ["front"], horizon=2, random_instruction=False)
    # A phrasing is drawn per (epoch draw, index): it varies across epochs and is the same each time
    # the same key is read (every worker, rank and resume agree).
    assert len({train[SampleKey(0, draw)]["instruction"] for draw in range(30)}) > 1
    assert len({train[SampleKey(0, 7)]["instruction"] for _ in range(5)}) == 1
    assert {evaluation[SampleKey(0, draw)]["instruction"] for draw in range(5)} == {"close jar"}


def test_fixture_writer_leaves_no_fake_rlbench_modules(tmp_path):
    write_rlbench_fixture(tmp_path, episodes=1, steps=3)
    assert not [m for m in sys.modules if m == "rlbench" or m.startswith("rlbench.")]


# --- the downloader (no network) ------------------------------------------------------------------


def test_downloader_rejects_a_wrong_task_name_before_any_network(tmp_path):
    with pytest.raises(ValueError, match="close_jars.*the 18 valid names.*stack_cups"):
        download_rlbench(["close_jars"], "train", tmp_path)


def test_downloader_fails_at_once_when_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DownloadError, match="HF_HUB_OFFLINE"):
        check_request(["close_jar"], "train")
    with pytest.raises(ValueError, match="split"):
        check_request(["close_jar"], "training")


def test_download_script_exits_with_a_message_offline(tmp_path):
    result = subprocess.run(
        [sys.executable, "scripts/download_rlbench_data.py", "--tasks", "close_jar", "--output", str(tmp_path)],
        capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.getcwd()},
        timeout=60,
    )
    assert result.returncode == 2 and "HF_HUB_OFFLINE" in result.stderr


def _zip_dir(src, zip_path, prefix):
    with zipfile.ZipFile(zip_path, "w") as zf:
        for p in sorted(src.rglob("*")):
            if p.is_file():
                zf.write(p, f"{prefix}/{p.relative_to(src)}")


def test_unpack_verifies_unzips_and_marks_complete(rlbench_root, tmp_path):
    zip_path = tmp_path / "close_jar.zip"
    _zip_dir(rlbench_root / "close_jar", zip_path, "close_jar")
    target = unpack_task_zip(zip_path, "close_jar", tmp_path / "train")
    assert (target / ".complete").is_file()
    ds = RLBenchDataset(tmp_path / "train", ["close_jar"], ["front"], horizon=2)
    assert len(ds.episodes) == 2


def test_corrupt_zip_is_deleted_with_a_message(tmp_path):
    zip_path = tmp_path / "close_jar.zip"
    with zipfile.ZipFile(zip_path, "w", compression=zipfile.ZIP_STORED) as zf:
        zf.writestr("close_jar/all_variations/episodes/episode0/x.txt", "hello world" * 100)
    data = bytearray(zip_path.read_bytes())
    data[60:70] = b"XXXXXXXXXX"  # inside the stored member: CRC mismatch
    zip_path.write_bytes(bytes(data))
    with pytest.raises(DownloadError, match="corrupt.*re-run"):
        unpack_task_zip(zip_path, "close_jar", tmp_path / "train")
    assert not zip_path.exists()


# --- Meta-World store and dataset (synthetic episodes; collection is tested in test_envs) ---------


def _fake_episodes(n, steps, views=2, size=8, seed=0):
    rng = np.random.default_rng(seed)
    return [
        {
            "images": rng.integers(0, 256, (steps, views, 3, size, size), dtype=np.uint8),
            "proprio": rng.normal(size=(steps, 4)).astype(np.float32),
            "state": rng.normal(size=(steps, 39)).astype(np.float32),
            "actions": rng.uniform(-1, 1, (steps, 4)).astype(np.float32),
            "seed": k,
        }
        for k in range(n)
    ]


@pytest.fixture(scope="module")
def metaworld_store(tmp_path_factory):
    store = tmp_path_factory.mktemp("mw")
    (store / "collection.json").write_text(json.dumps({"cameras": ["corner", "topview"], "image_size": 8}))
    for task in ("reach-v3", "push-v3"):
        write_task_store(store / task, _fake_episodes(3, 5), {"instruction": f"do {task}"})
    return store


def test_metaworld_samples_follow_the_contract(metaworld_store):
    ds = MetaWorldDataset(metaworld_store, ["reach-v3", "push-v3"], ["corner", "topview"], horizon=4)
    assert len(ds) == 2 * 3 * 5
    _assert_sample(ds[0], 2, 8, 4, 4, 4)
    actions = np.load(metaworld_store / "reach-v3" / "actions.npy")
    np.testing.assert_array_equal(ds[3]["actions"][:2].numpy(), actions[3:5])  # episode 0, step 3
    assert ds[3]["action_mask"].tolist() == [True, True, False, False]
    assert ds[5]["action_mask"].all()  # first step of episode 1: does not run into episode 0
    assert ds[20]["task"] == "push-v3" and ds[20]["instruction"] == "do push-v3"


def test_metaworld_val_split_holds_out_whole_episodes(metaworld_store):
    kwargs = dict(tasks=["reach-v3", "push-v3"], cameras=["corner"], horizon=2, holdout_every=3)
    train = MetaWorldDataset(metaworld_store, split="train", **kwargs)
    val = MetaWorldDataset(metaworld_store, split="val", **kwargs)
    assert len(train) == 2 * 2 * 5 and len(val) == 2 * 1 * 5  # episode 2 of each task is val
    actions = np.load(metaworld_store / "reach-v3" / "actions.npy")
    np.testing.assert_array_equal(val[0]["actions"][:1].numpy(), actions[10:11])
    with pytest.raises(ValueError, match="holdout_every"):
        MetaWorldDataset(metaworld_store, split="val", tasks=["reach-v3"], cameras=["corner"], horizon=2)


def test_metaworld_and_rlbench_number_the_episode_of_every_sample(metaworld_store, rlbench_root):
    train = MetaWorldDataset(metaworld_store, ["reach-v3", "push-v3"], ["corner"], horizon=2, split="train", holdout_every=3)
    assert train.episode_ids().tolist() == [0] * 5 + [1] * 5 + [2] * 5 + [3] * 5  # 2 training episodes per task
    rlbench = RLBenchDataset(rlbench_root, ["close_jar", "open_drawer"], ["front"], horizon=2)
    ids = rlbench.episode_ids()
    assert len(ids) == len(rlbench) and sorted(set(ids.tolist())) == list(range(len(rlbench.episodes)))
    assert (np.diff(ids) >= 0).all()


def test_normalization_statistics_see_only_the_training_episodes(metaworld_store):
    kwargs = dict(tasks=["reach-v3", "push-v3"], cameras=["corner"], horizon=2, holdout_every=3)
    train = MetaWorldDataset(metaworld_store, split="train", **kwargs)
    # episodes 0 and 1 of each task (rows 0..9); episode 2 (rows 10..14) is val
    expected = {key: np.concatenate([np.load(metaworld_store / t / f"{key}.npy")[:10] for t in kwargs["tasks"]])
                for key in ("actions", "proprio")}
    np.testing.assert_array_equal(train.all_actions(), expected["actions"])
    np.testing.assert_array_equal(train.all_proprio(), expected["proprio"])


def test_metaworld_camera_subset_and_missing_camera(metaworld_store):
    ds = MetaWorldDataset(metaworld_store, ["reach-v3"], ["topview"], horizon=2)
    images = np.load(metaworld_store / "reach-v3" / "images.npy")
    np.testing.assert_array_equal(ds[0]["images"].numpy(), images[0, 1:2])
    with pytest.raises(ValueError, match="gripperPOV.*collected"):
        MetaWorldDataset(metaworld_store, ["reach-v3"], ["gripperPOV"], horizon=2)
    with pytest.raises(FileNotFoundError, match="window-open-v3.*collect_demos"):
        MetaWorldDataset(metaworld_store, ["window-open-v3"], ["corner"], horizon=2)


def test_corrupt_metaworld_array_names_the_file(tmp_path):
    (tmp_path / "collection.json").write_text(json.dumps({"cameras": ["corner"], "image_size": 8}))
    write_task_store(tmp_path / "reach-v3", _fake_episodes(1, 3, views=1), {"instruction": "reach"})
    (tmp_path / "reach-v3" / "images.npy").write_bytes(b"garbage")
    with pytest.raises(CorruptEpisodeError, match="reach-v3/images.npy.*collect_demos"):
        MetaWorldDataset(tmp_path, ["reach-v3"], ["corner"], horizon=2)


def test_demo_images_damaged_at_the_same_size_are_refused_naming_the_file_and_the_remedy(tmp_path):
    (tmp_path / "collection.json").write_text(json.dumps({"cameras": ["corner"], "image_size": 8}))
    write_task_store(tmp_path / "reach-v3", _fake_episodes(2, 3, views=1), {"instruction": "reach"})
    MetaWorldDataset(tmp_path, ["reach-v3"], ["corner"], horizon=2)  # whole, and known so to this process
    images = tmp_path / "reach-v3" / "images.npy"
    written = images.stat().st_mtime_ns
    data = bytearray(images.read_bytes())
    data[-7] ^= 0x10  # one pixel: the header, the shape and the size are all as written
    images.write_bytes(bytes(data))
    os.utime(images, ns=(written + 1, written + 1))  # a later mtime, even within one tick of the file system's clock
    with pytest.raises(CorruptEpisodeError, match=rf"reach-v3/images.npy does not hold what was written.*sha256.*collect_demos.*delete {tmp_path}"):
        MetaWorldDataset(tmp_path, ["reach-v3"], ["corner"], horizon=2)


def test_a_demo_store_without_a_hash_of_every_array_is_not_read(tmp_path):
    (tmp_path / "collection.json").write_text(json.dumps({"cameras": ["corner"], "image_size": 8}))
    write_task_store(tmp_path / "reach-v3", _fake_episodes(1, 3, views=1), {"instruction": "reach"})
    meta_file = tmp_path / "reach-v3" / "meta.json"
    meta = json.loads(meta_file.read_text())
    del meta["sha256"]["images"]  # as written before images.npy was hashed
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(CorruptEpisodeError, match=r"meta.json records no sha256 of \['images'\].*collect_demos"):
        MetaWorldDataset(tmp_path, ["reach-v3"], ["corner"], horizon=2)


@pytest.mark.parametrize("key", ["proprio", "actions"])
def test_a_non_finite_demo_value_is_refused_naming_the_episode_step_and_array(tmp_path, key):
    (tmp_path / "collection.json").write_text(json.dumps({"cameras": ["corner"], "image_size": 8}))
    episodes = _fake_episodes(3, 5, views=1)
    episodes[1][key][2, 0] = np.inf
    write_task_store(tmp_path / "reach-v3", episodes, {"instruction": "reach"})
    with pytest.raises(CorruptEpisodeError, match=rf"reach-v3/{key}.npy: episode 1 \(seed 1\) has a non-finite {key} at step 2 .*collect_demos"):
        MetaWorldDataset(tmp_path, ["reach-v3"], ["corner"], horizon=2)


def test_normalization_statistics_refuse_non_finite_data():
    with pytest.raises(ValueError, match=r"'actions': row 1 of the data is not finite"):
        compute_stats({"actions": np.array([[0.0, 1.0], [np.nan, 0.0]]), "proprio": np.zeros((2, 1))})


def test_both_datasets_batch_identically_through_workers(metaworld_store, rlbench_root):
    mw = MetaWorldDataset(metaworld_store, ["reach-v3"], ["corner"], horizon=3)
    rl = RLBenchDataset(rlbench_root, ["close_jar"], ["front"], horizon=3)
    for ds in (mw, rl):
        batch = next(iter(DataLoader(ds, batch_size=4, num_workers=1, collate_fn=collate_samples)))
        assert set(batch) == SAMPLE_KEYS
        assert batch["images"].shape[:2] == (4, 1) and batch["actions"].shape[:2] == (4, 3)
        assert isinstance(batch["instruction"], list) and len(batch["task"]) == 4


# --- normalization --------------------------------------------------------------------------------


def test_normalizer_scales_positions_to_unit_range_rotates_quaternions_to_6d_and_keeps_binary_flags(rlbench_root):
    ds = RLBenchDataset(rlbench_root, ["close_jar"], ["front"], horizon=2)
    norm = Normalizer(dataset_stats(ds), RLBENCH_ACTION_SPEC, proprio_dim=8)
    actions = torch.from_numpy(ds.all_actions())
    out = norm.normalize("actions", actions)
    assert out.shape == (len(actions), 11) and RLBENCH_ACTION_SPEC.network_dim == 11
    assert out[:, :3].min() >= -1 - 1e-5 and out[:, :3].max() <= 1 + 1e-5
    torch.testing.assert_close(out[:, 3:9], quaternion_to_rotation6d(actions[:, 3:7]))
    assert torch.equal(out[:, 9:], actions[:, 7:])  # gripper and ignore_collisions
    torch.testing.assert_close(norm.unnormalize("actions", out), actions, atol=1e-5, rtol=0)


def test_rotation_targets_are_continuous_through_qw_zero(rlbench_root):
    # A top-down grasp has qw = 0 for every yaw: tilting it by +-1 degree flips the sign of a
    # qw >= 0 quaternion ([-0.966, -0.259, ...] vs [0.966, 0.259, ...]). The target must not jump.
    norm = Normalizer(dataset_stats(RLBenchDataset(rlbench_root, ["close_jar"], ["front"], horizon=2)), RLBENCH_ACTION_SPEC, proprio_dim=8)
    tilt = np.radians(np.linspace(-2, 2, 401))  # 0.01 degree apart
    yaw = np.radians(30)
    top_down = np.array([np.cos(yaw / 2), np.sin(yaw / 2), 0.0, 0.0])  # 180 degrees about a horizontal axis
    tilt_q = np.stack([np.zeros_like(tilt), np.sin(tilt / 2), np.zeros_like(tilt), np.cos(tilt / 2)], 1)
    quats = canonical_quaternion(_quat_multiply(tilt_q, top_down))
    assert (quats[:200, 3] < 0).any() or (np.sign(quats[:, 0]) != np.sign(quats[0, 0])).any()  # the sweep crosses the flip
    actions = torch.from_numpy(np.concatenate([np.full((len(quats), 3), 0.3), quats, np.ones((len(quats), 2))], 1).astype(np.float32))
    target = norm.normalize("actions", actions)
    assert (target[1:] - target[:-1]).norm(dim=-1).max() < 1e-3  # 0.01 degree = 1.7e-4 rad
    torch.testing.assert_close(norm.unnormalize("actions", target)[:, 3:7], torch.from_numpy(quats), atol=1e-5, rtol=0)


def _quat_multiply(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Hamilton product of [..., 4] quaternions as [x, y, z, w]."""
    ax, ay, az, aw = np.moveaxis(a, -1, 0)
    bx, by, bz, bw = np.moveaxis(b, -1, 0)
    return np.stack([aw * bx + ax * bw + ay * bz - az * by, aw * by - ax * bz + ay * bw + az * bx,
                     aw * bz + ax * by - ay * bx + az * bw, aw * bw - ax * bx - ay * by - az * bz], -1)


def test_normalizer_round_trips_through_a_plain_dict(metaworld_store):
    ds = MetaWorldDataset(metaworld_store, ["reach-v3"], ["corner"], horizon=2)
    norm = Normalizer(dataset_stats(ds), METAWORLD_ACTION_SPEC, proprio_dim=4)
    saved = json.loads(json.dumps(norm.to_dict()))
    loaded = Normalizer.from_dict(saved, METAWORLD_ACTION_SPEC, proprio_dim=4)
    x = torch.randn(5, 3, 4)
    torch.testing.assert_close(loaded.normalize("actions", x), norm.normalize("actions", x))
    torch.testing.assert_close(loaded.normalize("proprio", x), norm.normalize("proprio", x))
    assert set(saved["stats"]["actions"]) == {"mean", "std", "min", "max", "q01", "q99"}


def test_normalizer_refuses_stats_of_another_layout():
    stats = compute_stats({"actions": np.random.rand(10, 4), "proprio": np.random.rand(10, 4)})
    with pytest.raises(ValueError, match=r"stats\['actions'\]\['mean'\] has 4 dims, expected 9"):
        Normalizer(stats, RLBENCH_ACTION_SPEC)
    with pytest.raises(ValueError, match=r"stats\['proprio'\].*expected 8.*proprio_dim"):
        Normalizer(stats, METAWORLD_ACTION_SPEC, proprio_dim=8)
    with pytest.raises(ValueError, match="lack key"):
        Normalizer({"actions": stats["actions"]}, METAWORLD_ACTION_SPEC)
    saved = Normalizer(stats, METAWORLD_ACTION_SPEC).to_dict()
    with pytest.raises(ValueError, match="action spec"):
        Normalizer.from_dict(saved, RLBENCH_ACTION_SPEC)
    with pytest.raises(ValueError, match="last dim of the input is 3"):
        Normalizer(stats, METAWORLD_ACTION_SPEC).normalize("actions", torch.zeros(2, 3))


def test_constant_dimensions_do_not_divide_by_zero():
    stats = compute_stats({"actions": np.ones((5, 4)), "proprio": np.zeros((5, 4))})
    out = Normalizer(stats, METAWORLD_ACTION_SPEC).normalize("actions", torch.ones(2, 4))
    assert torch.isfinite(out).all() and torch.equal(out, torch.zeros(2, 4))


# --- small pieces ---------------------------------------------------------------------------------


def test_action_window_pads_with_the_last_row():
    rows = np.arange(10, dtype=np.float32).reshape(5, 2)
    chunk, mask = action_window(rows, 3, 4)
    np.testing.assert_array_equal(chunk, rows[[3, 4, 4, 4]])
    assert mask.tolist() == [True, True, False, False]


def test_sample_queue_returns_chunks_of_the_same_task_only():
    q = SampleQueue(capacity_per_task=3)
    q.push(["a", "b", "a"], torch.tensor([1.0, 2.0, 3.0]).view(3, 1, 1).expand(3, 2, 4))
    out = q.sample(["a", "b"], k=5)
    assert out.shape == (2, 5, 2, 4)
    assert set(out[0].flatten().tolist()) <= {1.0, 3.0} and set(out[1].flatten().tolist()) == {2.0}
    q.push(["a"] * 4, torch.full((4, 2, 4), 9.0))
    assert q.size("a") == 3 and set(q.sample(["a"], 20).flatten().tolist()) == {9.0}
    with pytest.raises(ValueError, match="no chunks yet.*'c'"):
        q.sample(["c"], 1)


def test_sample_queue_skips_padded_chunks():
    q = SampleQueue(4)
    q.push(["a", "a"], torch.zeros(2, 3, 4), mask=torch.tensor([[True, True, True], [True, False, False]]))
    assert q.size("a") == 1


def test_collate_stacks_tensors_and_keeps_strings_as_lists():
    samples = [{"x": torch.zeros(2), "s": "hi", "n": np.ones(3)} for _ in range(3)]
    batch = collate_samples(samples)
    assert batch["x"].shape == (3, 2) and batch["n"].shape == (3, 3) and batch["s"] == ["hi"] * 3
